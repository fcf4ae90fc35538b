#!/bin/bash
# Downloads what the latency benchmark needs on a machine without ip/tc/iptables and without a package
# registry (the GPU hosts): Debian's iproute2 and iptables with the libraries they link, as .debs, into
# DIR/net (the package itself needs nothing beyond torch, transformers, safetensors and huggingface-hub).
# Run on the development machine (it has apt and pip); carry DIR with the run (an ignored folder, e.g.
# wheels/bench), unpack there with benchmarks/gpu_host.sh. Usage: bash benchmarks/get_net_tools.sh DIR
set -euo pipefail
dir=$(realpath -m "${1:?usage: get_net_tools.sh DIR}")
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir/net"
# iproute2 and its libraries: the project's shared script (next to the main checkout, or $ASTRA_SHARED)
for shared in "${ASTRA_SHARED:-}" "$here/../shared" "$here/../../shared"; do
    [ -n "$shared" ] && [ -f "$shared/net/get-iproute2.sh" ] && break
done
bash "$shared/net/get-iproute2.sh" "$dir/net"
cd "$dir/net"
apt-get download iptables libip4tc2 libip6tc2 libnetfilter-conntrack3 libnfnetlink0 libnftnl11 2>&1 \
    | grep -v '^W: Download is performed unsandboxed' || true
ls -1 "$dir/net"
