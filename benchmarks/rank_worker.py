"""One rank of the latency benchmark: one edge device, a process in its own network namespace.

Started by `benchmarks.run_latency` (``ip netns exec ... taskset -c CORES python -m benchmarks.rank_worker``).
It joins the gloo group over TCP at rank 0's namespace address, builds the workload (same seed on
every rank) and its part of the method, then serves commands, one JSON object per stdin line:

    {"mode": "real" | "simulated" | "compute", "mbps": 10, "warmup": 1, "runs": 5}

and answers each with one stdout line ``RESULT {"times": [...], "bytes_sent": [...], ...}``: per
timed run, the seconds from leaving a barrier to this rank's output, the payload bytes this rank's
collectives sent, the bytes its network interface sent (wire bytes, headers included), the
simulated link's sleep and (ASTRA) the runtime's timings of the forward: its wall time and how long
this rank waited for peers, by kind and per layer (`DistributedRuntime.timings`; None for the
baselines). ``{"quit": true}`` ends it.

``{"load": true}`` makes the rank a load on its cores instead (`run_latency --loaded-baseline`): it answers
``RESULT {"loading": true}`` after its first forward and goes on running forwards, without barriers, until the
next line arrives (``{"stop": true}``); then it answers ``RESULT {"load_forwards": n, "load_forward_s": [...]}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import sys
import time

from . import links

links.install()  # before anything imports torch.distributed's collectives by name

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .methods import make_method  # noqa: E402
from .workloads import build  # noqa: E402

INTERFACE_COUNTER = "/sys/class/net/eth0/statistics/tx_bytes"


def wire_bytes() -> int | None:
    """Bytes sent by this namespace's link so far (None outside a benchmark namespace)."""
    try:
        with open(INTERFACE_COUNTER) as f:
            return int(f.read())
    except OSError:
        return None


def timed_runs(method, count: int) -> dict:
    out = {"times": [], "bytes_sent": [], "wire_bytes": [], "slept_s": [], "timings": []}
    timings = getattr(method, "timings", None)  # ASTRA's runtime only
    for _ in range(count):
        dist.barrier()
        links.STATE.reset()
        wire_before = wire_bytes()
        start = time.perf_counter()
        method.forward()
        out["times"].append(time.perf_counter() - start)
        wire_after = wire_bytes()
        out["bytes_sent"].append(links.STATE.bytes_sent)
        out["wire_bytes"].append(None if wire_before is None else wire_after - wire_before)
        out["slept_s"].append(links.STATE.slept_s)
        out["timings"].append(None if timings is None else timings())
    return out


def load(method) -> dict:
    """Forwards, one after another, from now until a line waits on stdin (which the caller then reads)."""
    times = []
    while True:
        start = time.perf_counter()
        method.forward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            print("RESULT " + json.dumps({"loading": True}), flush=True)
        if select.select([sys.stdin], [], [], 0)[0]:
            return {"load_forwards": len(times), "load_forward_s": times}


def serve(method) -> None:
    # readline, not iteration: iterating stdin reads ahead, and `load` asks the file descriptor whether a line waits.
    for line in iter(sys.stdin.readline, ""):
        command = json.loads(line)
        if command.get("quit"):
            return
        if command.get("load"):
            result = load(method)
            stop = json.loads(sys.stdin.readline() or "{}")
            if stop.get("quit"):
                return
            print("RESULT " + json.dumps(result), flush=True)
            continue
        links.set_mode(command["mode"], command.get("mbps"))
        for _ in range(command.get("warmup", 0)):
            dist.barrier()
            method.forward()
        result = timed_runs(method, command["runs"])
        links.set_mode("real", None)
        print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="rank 0's address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--astra-settings", default="{}", help="AstraSettings fields as JSON (astra only)")
    parser.add_argument("--tokens", type=int, help="prefill length of a causal workload (default: the workload's)")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank, world_size=args.world,
        timeout=datetime.timedelta(minutes=10),  # a collective at 10 Mbps can take minutes, not hours
    )
    try:
        settings = None
        if args.method == "astra":
            from .astra_method import AstraSettings

            settings = AstraSettings.from_json(args.astra_settings)
        method = make_method(args.method, settings)
        method.setup(build(args.workload, tokens=args.tokens), args.rank, args.world)
        cores = sorted(os.sched_getaffinity(0))
        print("RESULT " + json.dumps({"ready": True, "cores": cores, "threads": torch.get_num_threads()}), flush=True)
        serve(method)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
