"""Linux network namespaces joined by veth pairs and a bridge, every link shaped with tc tbf.

One namespace per rank stands for one edge device. Rank i lives in namespace ``astra-r{i}`` with
address 10.77.0.{i+1}; its link is the veth pair ``astra-h{i}`` (host side, on bridge ``astra-br``)
<-> ``eth0`` (inside the namespace). A link of B Mbps is a tbf of rate B on both ends of the pair:
inside the namespace it limits what the rank sends, on the host side what it receives.

The token bucket: by default 64 KiB (`MIN_BURST_BYTES`, so that segmentation-offload packets pass and bulk
TCP reaches the rate); after an idle moment up to 64 KiB then leave at the veth's speed, not the link's: one
30 KB message took 0.3 ms on a "10 Mbps" link of the dev VM where the rate says 24.6 ms. ``paced=True``
(`Topology.shape`, ``run_latency --paced``) shapes with a two-frame bucket and one frame per packet, so a burst
leaves at the rate as on a real radio (23.5 ms for the same message). ``measure --message-bytes`` times it.

Cleanup is guaranteed three ways: ``Topology`` is a context manager (try/finally), it registers an
``atexit`` hook, and SIGTERM/SIGINT/SIGHUP become SystemExit so those run. Leftovers of a killed
run go with ``python -m benchmarks.netns cleanup``. Verify a shaped rate with
``python -m benchmarks.netns measure --mbps 10 20 50 100 500 1000``.

Packet loss: netem is not in these kernels, so ``set_loss(percent)`` adds, inside every rank's
namespace, ``iptables -A OUTPUT -o eth0 -m statistic --mode random --probability P -j DROP``: each
packet a rank sends (data and acknowledgements alike) is dropped with probability P. The OUTPUT hook
sees TCP's segmentation-offload packets (up to 64 KiB, dozens of frames), so `segment_per_frame`
first sets ``gso_max_segs 1`` on every rank's eth0: TCP then hands over one frame per packet and P is
the loss per frame, as on a real lossy link. The rules live in
the benchmark's own namespaces only, so they vanish with them (cleanup deletes the namespaces) and
never touch the host's traffic.

Needs root and ``ip``/``tc`` (iproute2) on PATH; loss also needs ``iptables`` (``iptables-legacy`` is
preferred: the nft variant needs nf_tables). `benchmarks/get_net_tools.sh DIR` downloads both as
.debs for a machine without them.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import shlex
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager

PREFIX = "astra-"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.77.0"
LOCK_PATH = "/tmp/astra-bench-netns.lock"
# tbf queue: enough for a few TCP windows so the shaped rate is reached, small enough that a
# 10 Mbps link does not hold seconds of data (queue delay = limit / rate).
QUEUE_LATENCY_MS = 100
# Token bucket depth: at least one max-size packet (64 KiB GSO) and about 2 ms of traffic at the rate,
# so the timer granularity does not cap throughput at 500-1000 Mbps.
FRAME_BYTES = 1514
MIN_BURST_BYTES = 64 * 1024 + FRAME_BYTES
# Paced links (``paced=True``): one frame per packet and a bucket of two frames (or 2 ms of traffic), so a burst
# leaves at the link's rate as on a real 10 Mbps radio; the 64 KiB bucket lets up to 64 KiB after an idle moment
# through at the veth's speed.
PACED_MIN_BURST_BYTES = 2 * FRAME_BYTES


def namespace(rank: int) -> str:
    return f"{PREFIX}r{rank}"


def address(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def host_veth(rank: int) -> str:
    return f"{PREFIX}h{rank}"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_namespace(rank: int, *args: str) -> list[str]:
    return ["ip", "netns", "exec", namespace(rank), *args]


def tbf_args(mbps: float, paced: bool = False) -> list[str]:
    rate_bytes = mbps * 1e6 / 8
    burst = max(PACED_MIN_BURST_BYTES if paced else MIN_BURST_BYTES, int(rate_bytes * 0.002))
    return ["tbf", "rate", f"{mbps}mbit", "burst", str(burst), "latency", f"{QUEUE_LATENCY_MS}ms"]


def require_tools() -> None:
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{missing} not found on PATH: install iproute2 (apt-get install -y iproute2) or unpack the "
            ".debs of shared/net/get-iproute2.sh and put their bin/sbin on PATH"
        )


def iptables_tool() -> str:
    """The iptables binary for loss rules: $ASTRA_IPTABLES, else iptables-legacy, else iptables on PATH."""
    for candidate in (os.environ.get("ASTRA_IPTABLES"), "iptables-legacy", "iptables"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "packet loss needs iptables (iptables-legacy or iptables) on PATH, or ASTRA_IPTABLES set to it: "
        "apt-get install iptables, or unpack the .debs of benchmarks/get_net_tools.sh into NET and put "
        "NET/usr/sbin on PATH with XTABLES_LIBDIR=NET/usr/lib/x86_64-linux-gnu/xtables"
    )


def check_loss(percent: float) -> float:
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent < 100:
        raise ValueError(f"loss must be a percentage in [0, 100), got {percent!r}")
    return float(percent)


class Topology(AbstractContextManager):
    """``num_ranks`` namespaces on one bridge; ``shape(mbps)`` sets every link's rate (None: unshaped)."""

    def __init__(self, num_ranks: int):
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self._up = False
        self.loss_percent = 0.0
        self.per_frame = False

    def __enter__(self) -> "Topology":
        require_tools()
        self._lock = open(LOCK_PATH, "w")
        try:  # one benchmark at a time: the start-up cleanup would tear down a running one's links
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another benchmark holds {LOCK_PATH}; wait for it to end") from None
        cleanup()  # leftovers of an earlier killed run would make `ip link add` fail
        atexit.register(cleanup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
        try:
            self._create()
        except BaseException:
            cleanup()
            raise
        self._up = True
        return self

    def __exit__(self, *exc) -> None:
        cleanup()
        self._up = False
        self._lock.close()  # releases the lock

    def _create(self) -> None:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        for rank in range(self.num_ranks):
            ns, host = namespace(rank), host_veth(rank)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", f"{PREFIX}n{rank}")
            sh("ip", "link", "set", f"{PREFIX}n{rank}", "netns", ns)
            sh(*in_namespace(rank, "ip", "link", "set", f"{PREFIX}n{rank}", "name", "eth0"))
            sh(*in_namespace(rank, "ip", "addr", "add", f"{address(rank)}/24", "dev", "eth0"))
            sh(*in_namespace(rank, "ip", "link", "set", "eth0", "up"))
            sh(*in_namespace(rank, "ip", "link", "set", "lo", "up"))
            sh("ip", "link", "set", host, "master", BRIDGE)
            sh("ip", "link", "set", host, "up")

    def shape(self, mbps: float | None, paced: bool = False) -> None:
        """Rate-limit both directions of every rank's link to ``mbps`` (None removes the limit).

        ``paced``: a bucket of two frames (`PACED_MIN_BURST_BYTES`), one frame per packet (`segment_per_frame`),
        so that bursts leave at the rate too; otherwise a 64 KiB bucket (`MIN_BURST_BYTES`).
        """
        if paced and not self.per_frame:
            self.segment_per_frame()  # a 64 KiB offload packet could never pass a two-frame bucket
        for rank in range(self.num_ranks):
            for cmd in (["tc", "qdisc"], in_namespace(rank, "tc", "qdisc")):
                dev = host_veth(rank) if cmd[0] == "tc" else "eth0"
                sh(*cmd, "del", "dev", dev, "root", check=False)
                if mbps is not None:
                    sh(*cmd, "replace", "dev", dev, "root", *tbf_args(mbps, paced))

    def segment_per_frame(self) -> None:
        """One TCP segment per packet (no segmentation offload) on every rank's link, so loss applies per frame."""
        for rank in range(self.num_ranks):
            sh(*in_namespace(rank, "ip", "link", "set", "eth0", "gso_max_segs", "1"))
        self.per_frame = True

    def set_loss(self, percent: float) -> None:
        """Drop each packet every rank sends with probability ``percent``/100 (0 removes the rules)."""
        percent = check_loss(percent)
        if percent == self.loss_percent:
            return
        tool = iptables_tool() if percent or self.loss_percent else None
        for rank in range(self.num_ranks):
            sh(*in_namespace(rank, tool, "-F", "OUTPUT"))  # only our rules live in our namespaces
            if percent:
                sh(*in_namespace(rank, tool, "-A", "OUTPUT", "-o", "eth0", "-m", "statistic", "--mode", "random",
                                 "--probability", f"{percent / 100:.6f}", "-j", "DROP"))  # fmt: skip
        self.loss_percent = percent

    def dropped_packets(self) -> int:
        """Packets the loss rules have dropped so far, over all ranks."""
        if not self.loss_percent:
            return 0
        total, tool = 0, iptables_tool()
        for rank in range(self.num_ranks):
            listing = sh(*in_namespace(rank, tool, "-L", "OUTPUT", "-v", "-n", "-x")).stdout.splitlines()
            total += sum(int(line.split()[0]) for line in listing if "statistic" in line)
        return total

    def tx_bytes(self, rank: int) -> int:
        """Bytes rank ``rank`` has sent on its link (read from the host side's receive counter)."""
        with open(f"/sys/class/net/{host_veth(rank)}/statistics/rx_bytes") as f:
            return int(f.read())


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def cleanup() -> list[str]:
    """Remove every namespace and link this module creates (also those of a killed run). Idempotent."""
    removed = []
    listing = sh("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ")[0]
        if name.startswith(PREFIX):
            sh("ip", "netns", "del", name, check=False)  # its veth end goes with it, and so the pair
            removed.append(name)
    links = sh("ip", "-o", "link", "show", check=False).stdout.split("\n")
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].split("@")[0].startswith(PREFIX):
            name = parts[1].split("@")[0]
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


# A tiny TCP sink/source for checking the shaped rate (no iperf needed on the hosts).
_SINK = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); total = 0; start = None
while True:
    data = conn.recv(1 << 20)
    if not data: break
    if start is None: start = time.perf_counter()
    total += len(data)
print(total * 8 / (time.perf_counter() - start) / 1e6, flush=True)
"""
_SOURCE = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2]))); chunk = b"x" * (1 << 16)
end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end: sock.sendall(chunk)
sock.close()
"""


# One message after an idle moment, acknowledged by the receiver: what a layer's codes meet on the link.
_MESSAGE_SINK = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[3])):
    left = int(sys.argv[2])
    while left: left -= len(conn.recv(min(left, 1 << 20)))
    conn.sendall(b"k")
"""
_MESSAGE_SOURCE = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2]))); sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
message, times = b"x" * int(sys.argv[3]), []
for _ in range(int(sys.argv[4])):
    time.sleep(float(sys.argv[5]))  # the link idles: a token bucket refills
    start = time.perf_counter(); sock.sendall(message); sock.recv(1); times.append(time.perf_counter() - start)
print(sorted(times)[len(times) // 2], flush=True)
"""


def measure_message(topology: Topology, nbytes: int, repeats: int = 5, idle_s: float = 0.5, port: int = 5202) -> float:
    """Median seconds from sending one ``nbytes`` message (after ``idle_s`` of silence) to its 1-byte receipt."""
    sink = subprocess.Popen(in_namespace(1, sys.executable, "-c", _MESSAGE_SINK, str(port), str(nbytes), str(repeats)),
                            stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()
        out = subprocess.run(in_namespace(0, sys.executable, "-c", _MESSAGE_SOURCE, address(1), str(port), str(nbytes),
                                          str(repeats), str(idle_s)), check=True, capture_output=True, text=True)
        return float(out.stdout.strip())
    finally:
        sink.wait(timeout=60)


def measure_mbps(topology: Topology, seconds: float = 3.0, port: int = 5201) -> float:
    """Goodput of one TCP stream from rank 0 to rank 1 over the current shaping, in Mbps."""
    sink = subprocess.Popen(in_namespace(1, sys.executable, "-c", _SINK, str(port)), stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()
        subprocess.run(
            in_namespace(0, sys.executable, "-c", _SOURCE, address(1), str(port), str(seconds)), check=True
        )
        return float(sink.stdout.readline())
    finally:
        sink.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup", help="remove leftover namespaces, veths and the bridge")
    measure = sub.add_parser("measure", help="TCP goodput between two namespaces at each shaped rate")
    measure.add_argument("--mbps", type=float, nargs="+", default=[10, 20, 50, 100, 500, 1000])
    measure.add_argument("--seconds", type=float, default=3.0)
    measure.add_argument("--loss", type=float, nargs="+", default=[0.0], help="packet loss (percent) of each rate")
    measure.add_argument("--json", help="write the measurements here")
    measure.add_argument("--machine", default="", help="the machine label the rows carry (as the latency rows')")
    measure.add_argument("--paced", action="store_true", help="paced links (two-frame bucket, one frame per packet)")
    measure.add_argument("--message-bytes", type=int, nargs="*", default=[],
                         help="also time one message of each size after an idle moment (e.g. a layer's codes)")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        with open(LOCK_PATH, "w") as lock:
            try:  # a running benchmark holds the lock: its links are not leftovers
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(f"a benchmark is running (it holds {LOCK_PATH}); nothing removed")
            print("removed:", cleanup() or "nothing")
        return
    rows = []
    with Topology(2) as topology:
        if any(args.loss):
            topology.segment_per_frame()  # loss per frame (see the module doc)
        # Unshaped only without loss: one frame per packet makes an unshaped link CPU-bound, not a link measurement.
        for mbps in ([] if any(args.loss) else [None]) + list(args.mbps):
            for loss in args.loss if mbps is not None else [0.0]:
                if loss and not topology.per_frame:
                    topology.segment_per_frame()
                topology.shape(mbps, args.paced)
                topology.set_loss(loss)
                measured = measure_mbps(topology, args.seconds)
                messages = {str(n): round(measure_message(topology, n), 5) for n in args.message_bytes}
                rows.append({"machine": args.machine, "shaped_mbps": mbps, "loss_percent": loss, "measured_mbps": round(measured, 2),
                             "paced": args.paced, "message_seconds": messages,
                             "message_seconds_at_rate": {str(n): round(n * 8 / (mbps * 1e6), 5) for n in args.message_bytes} if mbps else {},
                             "seconds": args.seconds, "date": time.strftime("%Y-%m-%d"),
                             "command": "python -m benchmarks.netns " + shlex.join(argv or sys.argv[1:])})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
