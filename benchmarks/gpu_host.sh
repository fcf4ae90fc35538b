#!/bin/bash
# The latency benchmark on a GPU host's 16 CPU cores: 2 cores per device, N = 2, 4, 8 (the GPU is not used).
# The host has no ip/tc and no package registry: carry .bench_gpu/ (ignored), made on the development machine by
#   bash ../shared/net/get-iproute2.sh .bench_gpu/net        # iproute2 .debs
#   cp <vector-quantize-pytorch and its pure-Python deps, py3 wheels> .bench_gpu/whl/
# Usage, from the repository root, as root: bash benchmarks/gpu_host.sh OUT_DIR
# Steps run in order of importance; each appends its rows to OUT_DIR/latency-gpu-host.jsonl as it goes.
set -uo pipefail
out=${1:?usage: gpu_host.sh OUT_DIR}
net=/tmp/iproute2
mkdir -p "$net" && for f in .bench_gpu/net/*.deb; do dpkg -x "$f" "$net"; done
export PATH=$net/bin:$net/sbin:$net/usr/bin:$net/usr/sbin:$PATH
export LD_LIBRARY_PATH=$net/usr/lib/x86_64-linux-gnu:$net/lib/x86_64-linux-gnu
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench_gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nproc; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
machine="GPU host (nvidia-h200 kind, CPU cores only): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
run() { python3 -m benchmarks.run_latency --cores-per-rank 2 --row-budget-s 5 --machine "$machine" --out "$out/latency-gpu-host.jsonl" "$@"; }

python3 -m benchmarks.netns measure --seconds 1 --mbps 10 100 1000 --json "$out/shaping-gpu-host.json"
# The goal: GPT2 prefill of 1024 tokens over N=4 devices.
run --workload gpt2 --n 4 --methods single astra --groups 32 1 --quantize hidden \
    --links compute real simulated --simulated-bandwidths 10 100
run --workload gpt2 --n 4 --methods sp-fp16 sp-fp32 --links compute real --bandwidths 1000 100 10
run --workload gpt2 --n 4 --methods tp --links compute real --bandwidths 1000 100
run --workload gpt2 --n 8 2 --methods astra --groups 32 --quantize hidden --links compute real --bandwidths 10 100
run --workload gpt2 --n 4 --methods astra --groups 32 --quantize kv --links compute real --bandwidths 10 100
run --workload vit --n 4 --methods single astra sp-fp16 tp --groups 32 --quantize hidden --links compute real \
    --bandwidths 1000 100 10
