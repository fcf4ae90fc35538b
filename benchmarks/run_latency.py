"""End-to-end latency of one inference split over N edge devices joined by rate-limited links.

Each rank is a process in its own network namespace (`benchmarks.netns`), pinned to its own CPU cores
with a fixed thread count; the ranks talk gloo over real TCP sockets through veth pairs and a bridge,
every link shaped with tc tbf. For each method the ranks start once and are then driven through the
link modes and bandwidths (`benchmarks.rank_worker`); every configuration becomes one row, appended
to a JSON-lines file that `benchmarks.report` turns into docs/benchmarks.md.

    python -m benchmarks.run_latency --workload gpt2 --n 2 --methods single tp sp-fp32 astra \
        --groups 1 32 --quantize hidden kv --links compute simulated real

Latency of a run: the slowest rank's time from leaving a barrier to its output. Rows whose runs take
more than 3 s get only as many timed runs as fit in ``--row-budget-s`` (at least one; the row says
how many). Needs root.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import selectors
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import netns
from .methods import METHODS
from .workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = Path("/tmp/astra-bench-logs")
WARMUP_LIMIT_S = 10.0  # a warm-up run predicted slower than this is skipped (the row says so)
FAST_RUN_S = 3.0  # rows whose runs take at most this always get all --runs timed runs; slower ones obey the budget


@dataclass(frozen=True)
class Variant:
    """One method with its ASTRA settings (G and quantize are None for the baselines)."""

    method: str
    groups: int | None = None
    quantize: str | None = None

    @property
    def label(self) -> str:
        return self.method if self.groups is None else f"{self.method} G={self.groups} {self.quantize}"


def variants(methods: list[str], groups: list[int], quantize: list[str]) -> list[Variant]:
    out = []
    for method in methods:
        if method == "astra":
            out += [Variant("astra", g, q) for g, q in itertools.product(groups, quantize)]
        else:
            out.append(Variant(method))
    return out


def machine_label() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {model}, {os.cpu_count()} cores"


def cores_of(rank: int, cores_per_rank: int) -> list[int]:
    return list(range(rank * cores_per_rank, (rank + 1) * cores_per_rank))


class Ranks:
    """The N worker processes of one method, each in its namespace; killed on exit whatever happens."""

    def __init__(self, variant: Variant, workload: str, world: int, cores_per_rank: int, port: int, nice: int = 0):
        LOG_DIR.mkdir(exist_ok=True)
        self.processes, self.logs = [], []
        for rank in range(world):
            cores = ",".join(map(str, cores_of(rank, cores_per_rank)))
            command = netns.in_namespace(
                rank, "nice", "-n", str(nice), "taskset", "-c", cores, sys.executable, "-m", "benchmarks.rank_worker",
                "--rank", str(rank), "--world", str(world), "--master", netns.address(0), "--port", str(port),
                "--workload", workload, "--method", variant.method, "--threads", str(cores_per_rank),
                "--groups", str(variant.groups or 1), "--quantize", variant.quantize or "hidden",
            )  # fmt: skip
            log_path = LOG_DIR / f"{workload}-{variant.method}-rank{rank}.log"
            log = open(log_path, "w")
            # gloo must use the namespace's link, not the loopback address its hostname resolves to.
            env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": str(cores_per_rank), "MKL_NUM_THREADS": str(cores_per_rank)}
            self.processes.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
            )
            self.logs.append((log, log_path))
        self.ready = self._answers()

    def _answers(self) -> list[dict]:
        """One RESULT line from every rank; if any rank ends first, raise with its log (the rest are killed on exit)."""
        answers: dict[int, dict] = {}
        with selectors.DefaultSelector() as selector:
            for rank, process in enumerate(self.processes):
                selector.register(process.stdout, selectors.EVENT_READ, rank)
            while len(answers) < len(self.processes):
                for key, _ in selector.select(timeout=5.0):
                    rank = key.data
                    line = self.processes[rank].stdout.readline()
                    if line.startswith("RESULT "):
                        answers[rank] = json.loads(line[len("RESULT ") :])
                        selector.unregister(key.fileobj)
                    elif not line:
                        self._fail(rank)
                for rank, process in enumerate(self.processes):
                    if rank not in answers and process.poll() is not None:
                        self._fail(rank)
        return [answers[rank] for rank in range(len(self.processes))]

    def _fail(self, rank: int) -> None:
        log_path = self.logs[rank][1]
        code = self.processes[rank].wait()
        raise RuntimeError(f"rank {rank} ended (exit code {code}); its log {log_path} ends with:\n{log_path.read_text()[-3000:]}")

    def run(self, mode: str, mbps: float | None, warmup: int, runs: int) -> list[dict]:
        command = json.dumps({"mode": mode, "mbps": mbps, "warmup": warmup, "runs": runs}) + "\n"
        for process in self.processes:
            process.stdin.write(command)
            process.stdin.flush()
        return self._answers()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.stdin.write(json.dumps({"quit": True}) + "\n")
                    process.stdin.flush()
                except BrokenPipeError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log, _ in self.logs:
            log.close()

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_ranks(answers: list[list[dict]]) -> dict:
    """Per run: the slowest rank's time; bytes: the rank that sends most (the busiest link).

    ``answers[rank]`` holds that rank's RESULT objects, in order; their lists concatenate to one value per run.
    """

    def per_rank(key: str) -> list[list]:
        return [sum((result[key] for result in results), []) for results in answers]

    times = per_rank("times")
    wire = [statistics.median(w) for w in per_rank("wire_bytes") if w and w[0] is not None]
    return {
        "times": [max(run) for run in zip(*times)],
        "per_rank_median_s": [statistics.median(t) for t in times],
        "bytes_sent_per_rank": max(statistics.median(b) for b in per_rank("bytes_sent")),
        "wire_bytes_per_rank": max(wire) if wire else None,
        "slept_s": max(statistics.median(s) for s in per_rank("slept_s")),
    }


def quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), deciles[0], deciles[-1]


def measure_row(ranks: Ranks, mode: str, mbps, runs: int, budget_s: float, predicted_s: float | None) -> dict:
    """Warm-up (unless predicted slow), one timed run, then the rest of ``runs``, or for slow runs as many as the budget allows."""
    warmup = 0 if predicted_s is not None and predicted_s > WARMUP_LIMIT_S else 1
    first = ranks.run(mode, mbps, warmup, 1)
    first_time = max(answer["times"][0] for answer in first)
    more = runs - 1 if first_time <= FAST_RUN_S else min(runs - 1, int((budget_s - first_time) // first_time))
    answers = [[answer] for answer in first]
    if more > 0:
        for rank, answer in enumerate(ranks.run(mode, mbps, 0, more)):
            answers[rank].append(answer)
    merged = merge_ranks(answers)
    merged["warmup"] = warmup
    return merged


def row_command(args, variant: Variant, world: int, link: str, mbps) -> str:
    parts = ["python -m benchmarks.run_latency", f"--workload {args.workload}", f"--n {world}",
             f"--methods {variant.method}", *([] if link == "none" else [f"--links {link}"]), f"--runs {args.runs}",
             f"--cores-per-rank {args.cores_per_rank}", f"--row-budget-s {args.row_budget_s:g}", f"--nice {args.nice}"]  # fmt: skip
    if variant.groups is not None:
        parts += [f"--groups {variant.groups}", f"--quantize {variant.quantize}"]
    if mbps is not None:
        parts.append(f"--bandwidths {mbps:g}")
    return " ".join(parts)


def make_row(args, variant: Variant, world: int, link: str, mbps, merged: dict, ready: list[dict]) -> dict:
    median, p10, p90 = quantiles(merged["times"])
    return {
        "model": args.workload,
        "tokens": 1024 if args.workload == "gpt2" else 197,
        "method": variant.method,
        "N": world,
        "G": variant.groups,
        "quantize": variant.quantize,
        "bandwidth_mbps": mbps,
        "link": link,
        "median_s": median,
        "p10_s": p10,
        "p90_s": p90,
        "runs": len(merged["times"]),
        "warmup": merged["warmup"],
        "times_s": merged["times"],
        "per_rank_median_s": merged["per_rank_median_s"],
        "bytes_sent_per_rank": merged["bytes_sent_per_rank"],
        "wire_bytes_per_rank": merged["wire_bytes_per_rank"],
        "simulated_sleep_s": merged["slept_s"],
        "cores_per_rank": args.cores_per_rank,
        "threads_per_rank": ready[0]["threads"],
        "pinned_cores": [r["cores"] for r in ready],
        "machine": args.machine,
        "load_average_1m": os.getloadavg()[0],
        "nice": args.nice,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": row_command(args, variant, world, link, mbps),
    }


def benchmark_variant(args, topology, variant: Variant, world: int, port: int, out) -> None:
    links = ["none"] if variant.method == "single" else args.links
    with Ranks(variant, args.workload, world, args.cores_per_rank, port, args.nice) as ranks:
        previous: tuple[float, float] | None = None  # (median, mbps) of the last real/simulated row
        for link in links:
            chosen = args.simulated_bandwidths if link == "simulated" and args.simulated_bandwidths else args.bandwidths
            bandwidths = [None] if link in ("none", "compute") else sorted(chosen, reverse=True)
            for mbps in bandwidths:
                topology.shape(mbps if link == "real" else None)
                predicted = previous[0] * previous[1] / mbps if previous and mbps else None
                mode = "compute" if link in ("none", "compute") else link
                merged = measure_row(ranks, mode, mbps, args.runs, args.row_budget_s, predicted)
                row = make_row(args, variant, world, link, mbps, merged, ranks.ready)
                out.write(json.dumps(row) + "\n")
                out.flush()
                tqdm.write(
                    f"{args.workload} N={world} {variant.label:22s} {link:9s} {mbps or '-':>5} Mbps: "
                    f"median {row['median_s']:.3f} s over {row['runs']} runs, "
                    f"{row['bytes_sent_per_rank'] / 1e6:.3f} MB/rank (wire {(row['wire_bytes_per_rank'] or 0) / 1e6:.3f} MB)"
                )
                if mbps:
                    previous = (row["median_s"], mbps)
            previous = None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[2], help="numbers of ranks (devices)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 32], help="ASTRA's G values")
    parser.add_argument("--quantize", nargs="+", default=["hidden"], choices=["hidden", "kv"])
    parser.add_argument("--links", nargs="+", default=["compute", "simulated", "real"], choices=["compute", "simulated", "real"])
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[10, 20, 50, 100, 500, 1000], help="Mbps")
    parser.add_argument("--simulated-bandwidths", type=float, nargs="+", help="Mbps of the simulated link (default: --bandwidths)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per row (fewer when over the budget)")
    parser.add_argument("--row-budget-s", type=float, default=60.0, help="seconds of timed runs per row at most")
    parser.add_argument("--cores-per-rank", type=int, default=1)
    parser.add_argument("--machine", default=machine_label())
    parser.add_argument(
        "--nice", type=int, default=0,
        help="niceness of the rank processes (only orders them against processes of the same session: autogroups)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/raw/latency.jsonl")
    args = parser.parse_args(argv)
    if max(args.n) * args.cores_per_rank > os.cpu_count():
        parser.error(f"N={max(args.n)} ranks x {args.cores_per_rank} cores exceed the {os.cpu_count()} cores here")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(v, 1 if v.method == "single" else n) for v in variants(args.methods, args.groups, args.quantize) for n in args.n]
    jobs = list(dict.fromkeys(jobs))  # the single device runs once, whatever --n says
    port = 29500 + os.getpid() % 1000
    with netns.Topology(max(world for _, world in jobs)) as topology, open(args.out, "a") as out:
        for offset, (variant, world) in enumerate(tqdm(jobs, desc="methods", file=sys.stderr)):
            benchmark_variant(args, topology, variant, world, port + offset, out)


if __name__ == "__main__":
    main()
