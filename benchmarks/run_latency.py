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

Each row carries its own one-device baseline: a one-device worker (rank 0's namespace and cores, idle
while the method runs) makes one timed run before each of the method's runs, so the baseline sees the
same moments of a shared machine; the row records both medians and p10–p90 and the speed-up
(``--no-interleave`` turns this off). ``--loaded-baseline`` times the one device a second time per run while
the other ranks' cores run forwards (`HostLoad`): the host sharing that the N ranks have. ASTRA rows run the
runtime's defaults unless ``--overlap``, ``--projection-table``, ``--codebook-size`` or ``--shard-sizes`` say
otherwise, and the row's label names every such deviation. ``--loss`` adds packet loss to the real links (`netns.Topology.set_loss`).
"""

from __future__ import annotations

import argparse
import contextlib
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

from transformers_astra.config import BALANCED

from . import netns
from .astra_method import AstraSettings
from .methods import METHODS
from .workloads import CAUSAL_TOKENS, CAUSAL_WORKLOADS, WORKLOADS

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = Path("/tmp/astra-bench-logs")
WARMUP_LIMIT_S = 10.0  # a warm-up run predicted slower than this is skipped (the row says so)
FAST_RUN_S = 3.0  # rows whose runs take at most this always get all --runs timed runs; slower ones obey the budget
# A row's breakdown of its ranks' time (`wait_breakdown`; ASTRA rows recorded since the runtime's timings).
WAIT_KEYS = ("per_rank_waited_s", "per_rank_compute_s", "per_rank_waited_by_kind_s", "slowest_rank", "slowest_rank_codes_wait_per_layer_s")


@dataclass(frozen=True)
class Variant:
    """One method; ASTRA rows also carry their `AstraSettings` (None for the baselines)."""

    method: str
    settings: AstraSettings | None = None

    @property
    def label(self) -> str:
        return self.method if self.settings is None else self.settings.label

    def record(self, world: int) -> dict:
        """The row's full settings."""
        if self.settings is not None:
            return self.settings.record(world)
        return {"wire_dtype": {"sp-fp32": "float32", "sp-fp16": "float16"}.get(self.method)} if self.method.startswith("sp") else {}


def variants(methods: list[str], groups: list[int], quantize: list[str], **astra_settings) -> list[Variant]:
    out = []
    for method in methods:
        if method == "astra":
            out += [Variant("astra", AstraSettings(groups=g, quantize=q, **astra_settings)) for g, q in itertools.product(groups, quantize)]
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
    """Rank ``rank``'s cores; past the machine's last core they wrap around (only with --oversubscribe)."""
    return [core % os.cpu_count() for core in range(rank * cores_per_rank, (rank + 1) * cores_per_rank)]


class Ranks:
    """The N worker processes of one method, each in its namespace; killed on exit whatever happens."""

    def __init__(self, variant: Variant, workload: str, world: int, cores_per_rank: int, port: int, nice: int = 0,
                 tokens: int | None = None, slot: int = 0):  # fmt: skip
        """``slot``: rank r runs in the namespace and on the cores of rank ``slot + r`` (a host load beside rank 0)."""
        LOG_DIR.mkdir(exist_ok=True)
        self.processes, self.logs = [], []
        for rank in range(world):
            cores = ",".join(map(str, cores_of(slot + rank, cores_per_rank)))
            command = netns.in_namespace(
                slot + rank, "nice", "-n", str(nice), "taskset", "-c", cores, sys.executable, "-m", "benchmarks.rank_worker",
                "--rank", str(rank), "--world", str(world), "--master", netns.address(slot), "--port", str(port),
                "--workload", workload, "--method", variant.method, "--threads", str(cores_per_rank),
                *(["--astra-settings", variant.settings.to_json()] if variant.settings else []),
                *(["--tokens", str(tokens)] if tokens else []),
            )  # fmt: skip
            log_path = LOG_DIR / f"{workload}-{variant.method}-n{world}-rank{rank}{f'-slot{slot}' if slot else ''}.log"
            log = open(log_path, "w")
            # gloo must use the namespace's link, not the loopback address its hostname resolves to.
            env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": str(cores_per_rank), "MKL_NUM_THREADS": str(cores_per_rank)}
            self.processes.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
            )
            self.logs.append((log, log_path))
        self.ready = self.answers()

    def answers(self) -> list[dict]:
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
        return self.send({"mode": mode, "mbps": mbps, "warmup": warmup, "runs": runs})

    def post(self, command: dict) -> None:
        """Write one command (`benchmarks.rank_worker`'s protocol) to every process, without waiting for answers."""
        line = json.dumps(command) + "\n"
        for process in self.processes:
            process.stdin.write(line)
            process.stdin.flush()

    def send(self, command: dict) -> list[dict]:
        self.post(command)
        return self.answers()

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


class HostLoad:
    """The other ranks' cores kept busy while the one device runs (``--loaded-baseline``).

    The emulation runs its N ranks on one host, where N busy core pairs share the caches, the memory and the
    clock that one busy pair has alone; separate devices would not. This load puts that sharing on the one
    device too: on the cores of ranks 1..N-1, one process each runs the one-device forward on a rank's share of
    the tokens (causal workloads; ViT: the whole image), forward after forward, for as long as the one device
    is timed. Its forwards and their times are kept, so a row shows that the load ran.
    """

    def __init__(self, workload: str, world: int, cores_per_rank: int, port: int, nice: int, tokens: int | None):
        self.loads = []
        self.tokens = max(1, (tokens or CAUSAL_TOKENS) // world) if workload in CAUSAL_WORKLOADS else None
        try:
            for slot in range(1, world):
                self.loads.append(Ranks(Variant("single"), workload, 1, cores_per_rank, port + slot, nice, self.tokens, slot=slot))
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Returns once every load has finished its first forward (and runs on)."""
        for load in self.loads:
            load.post({"load": True})
        for load in self.loads:
            answer = load.answers()[0]
            if not answer.get("loading"):
                raise RuntimeError(f"a host load answered {answer} instead of starting")

    def stop(self) -> list[dict]:
        """Stops every load after its current forward: per load, its forwards since `start` and their seconds."""
        for load in self.loads:
            load.post({"stop": True})
        return [load.answers()[0] for load in self.loads]

    def close(self) -> None:
        for load in self.loads:
            load.close()

    def __enter__(self) -> "HostLoad":
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
    merged = {
        "times": [max(run) for run in zip(*times)],
        "per_rank_median_s": [statistics.median(t) for t in times],
        "bytes_sent_per_rank": max(statistics.median(b) for b in per_rank("bytes_sent")),
        "wire_bytes_per_rank": max(wire) if wire else None,
        "slept_s": max(statistics.median(s) for s in per_rank("slept_s")),
    }
    timings = [[t for result in results for t in result.get("timings", [])] for results in answers]
    if all(timings) and all(t is not None for rank in timings for t in rank):  # ASTRA's runtime timed every run
        slowest = max(range(len(times)), key=lambda rank: merged["per_rank_median_s"][rank])
        merged.update(wait_breakdown(timings, slowest))
    return merged


def wait_breakdown(timings: list[list[dict]], slowest: int) -> dict:
    """Medians over the runs of each rank's `DistributedRuntime.timings`: seconds blocked waiting for peers, the
    rest (compute: total - waited), the waits by kind, and the slowest rank's code waits layer by layer."""

    def median(rank: int, value) -> float:
        return round(statistics.median(value(t) for t in timings[rank]), 4)

    ranks = range(len(timings))
    kinds = timings[0][0]["waited"]
    layers = range(len(timings[slowest][0]["codes_per_layer"]))
    return {
        "per_rank_waited_s": [median(rank, lambda t: t["waited_s"]) for rank in ranks],
        "per_rank_compute_s": [median(rank, lambda t: t["compute_s"]) for rank in ranks],
        "per_rank_waited_by_kind_s": [{kind: median(rank, lambda t: t["waited"][kind]) for kind in kinds} for rank in ranks],
        "slowest_rank": slowest,
        "slowest_rank_codes_wait_per_layer_s": [median(slowest, lambda t: t["codes_per_layer"][layer]) for layer in layers],
    }


def quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), deciles[0], deciles[-1]


def measure_row(ranks: Ranks, mode: str, mbps, runs: int, budget_s: float, predicted_s: float | None,
                single: Ranks | None = None, load: HostLoad | None = None) -> dict:  # fmt: skip
    """Warm-up (unless predicted slow), then timed runs: all ``runs`` when a run takes at most FAST_RUN_S,
    else as many as fit in ``budget_s`` (at least one).

    With ``single`` (the one-device worker), every timed run of the method is preceded by one timed run of
    the one device, so both see the same moments of the machine: the row's baseline and its speed-up come
    from these interleaved runs. With ``load`` too, the one device also makes one timed run while the load
    keeps the other ranks' cores busy (`HostLoad`), after its run alone and before the method's run.
    """
    warmup = 0 if predicted_s is not None and predicted_s > WARMUP_LIMIT_S else 1
    answers: list[list[dict]] = [[] for _ in ranks.processes]
    single_answers: list[dict] = []
    loaded_answers: list[dict] = []
    load_forward_s: list[float] = []
    spent, done = 0.0, 0
    while done < runs:
        if single is not None:
            single_answers.append(single.run("compute", None, 1 if done == 0 else 0, 1)[0])
            if load is not None:
                load.start()
                loaded_answers.append(single.run("compute", None, 0, 1)[0])
                load_forward_s += [t for answer in load.stop() for t in answer["load_forward_s"]]
        step = ranks.run(mode, mbps, warmup if done == 0 else 0, 1)
        for rank, answer in enumerate(step):
            answers[rank].append(answer)
        took = max(answer["times"][0] for answer in step)
        spent, done = spent + took, done + 1
        if took > FAST_RUN_S and spent + took > budget_s:
            break
    merged = merge_ranks(answers)
    merged["warmup"] = warmup
    if single is not None:
        merged["single_times"] = [answer["times"][0] for answer in single_answers]
    if loaded_answers:
        merged["single_loaded_times"] = [answer["times"][0] for answer in loaded_answers]
        merged["load_forward_s"] = load_forward_s
        merged["load_tokens"] = load.tokens
    return merged


def row_command(args, variant: Variant, world: int, link: str, mbps, loss: float = 0.0) -> str:
    parts = ["python -m benchmarks.run_latency", f"--workload {args.workload}", f"--n {world}",
             f"--methods {variant.method}", *([] if link == "none" else [f"--links {link}"]), f"--runs {args.runs}",
             f"--cores-per-rank {args.cores_per_rank}", f"--row-budget-s {args.row_budget_s:g}", f"--nice {args.nice}"]  # fmt: skip
    if args.tokens:
        parts.append(f"--tokens {args.tokens}")
    if not args.interleave and variant.method != "single":
        parts.append("--no-interleave")
    if args.loaded_baseline and args.interleave and variant.method != "single":
        parts.append("--loaded-baseline")
    if args.oversubscribe:
        parts.append("--oversubscribe")
    settings = variant.settings
    if settings is not None:
        parts += [f"--groups {settings.groups}", f"--quantize {settings.quantize}"]
        if settings.codebook_size is not None:
            parts.append(f"--codebook-size {settings.codebook_size}")
        if settings.overlap is not None:
            parts.append(f"--overlap {'on' if settings.overlap else 'off'}")
        if settings.projection_table is not None:
            parts.append(f"--projection-table {table_text(settings.projection_table)}")
        if isinstance(settings.shard_sizes, str):
            parts.append(f"--shard-sizes {settings.shard_sizes}")
        elif settings.shard_sizes is not None:
            parts.append("--shard-sizes " + " ".join(map(str, settings.shard_sizes)))
    if mbps is not None:
        parts.append(f"--bandwidths {mbps:g}")
    if loss:
        parts.append(f"--loss {loss:g}")
    if args.paced and link == "real":
        parts.append("--paced")
    return " ".join(parts)


def make_row(args, variant: Variant, world: int, link: str, mbps, merged: dict, ready: list[dict], loss: float = 0.0,
             dropped: int | None = None) -> dict:  # fmt: skip
    median, p10, p90 = quantiles(merged["times"])
    settings = variant.settings
    row = {
        "model": args.workload,
        "tokens": args.tokens or (CAUSAL_TOKENS if args.workload in CAUSAL_WORKLOADS else 197),
        "method": variant.method,
        "label": variant.label + (" paced" if args.paced and link == "real" else ""),
        "N": world,
        "G": settings.groups if settings else None,
        "quantize": settings.quantize if settings else None,
        "codebook_size": settings.record(world)["codebook_size"] if settings else None,
        "settings": variant.record(world),
        "bandwidth_mbps": mbps,
        "link": link,
        "loss_percent": loss,
        "dropped_packets": dropped,
        "one_frame_per_packet": any(args.loss) or args.paced,  # gso_max_segs 1 (netns.Topology.segment_per_frame)
        "paced_links": args.paced and link == "real",  # two-frame token bucket (netns.tbf_args)
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
        **{key: merged[key] for key in WAIT_KEYS if key in merged},  # ASTRA rows: where each rank's time went
        "cores_per_rank": args.cores_per_rank,
        "threads_per_rank": ready[0]["threads"],
        "pinned_cores": [r["cores"] for r in ready],
        "machine": args.machine,
        "load_average_1m": os.getloadavg()[0],
        "nice": args.nice,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": row_command(args, variant, world, link, mbps, loss),
    }
    if args.oversubscribe:
        row["oversubscribed"] = True  # ranks shared cores: a smoke test, not a measurement
    if "single_times" in merged:  # the interleaved one-device runs of this row
        single_median, single_p10, single_p90 = quantiles(merged["single_times"])
        pairs = [s / m for s, m in zip(merged["single_times"], merged["times"])]
        pair_median, pair_p10, pair_p90 = quantiles(pairs)
        row.update({
            "single_median_s": single_median, "single_p10_s": single_p10, "single_p90_s": single_p90,
            "single_times_s": merged["single_times"], "speedup_vs_single": round(single_median / median, 3),
            "speedup_pairs_p10": round(pair_p10, 3), "speedup_pairs_p90": round(pair_p90, 3),
            "baseline": "interleaved",
        })  # fmt: skip
    if "single_loaded_times" in merged:  # the one device again, with the other ranks' cores busy (HostLoad)
        loaded_median, loaded_p10, loaded_p90 = quantiles(merged["single_loaded_times"])
        row.update({
            "single_loaded_median_s": loaded_median, "single_loaded_p10_s": loaded_p10, "single_loaded_p90_s": loaded_p90,
            "single_loaded_times_s": merged["single_loaded_times"],
            "speedup_vs_loaded_single": round(loaded_median / median, 3),
            "host_load": {"processes": world - 1, "tokens": merged["load_tokens"],
                          "forwards": len(merged["load_forward_s"]),
                          "forward_median_s": statistics.median(merged["load_forward_s"])},
        })  # fmt: skip
    return row


def benchmark_variant(args, topology, variant: Variant, world: int, port: int, out) -> None:
    links = ["none"] if variant.method == "single" else args.links
    interleave = args.interleave and variant.method != "single"
    with contextlib.ExitStack() as stack:
        ranks = stack.enter_context(Ranks(variant, args.workload, world, args.cores_per_rank, port, args.nice, args.tokens))
        single = load = None
        if interleave:  # the one device: rank 0's namespace and cores, idle while the method runs
            single = stack.enter_context(
                Ranks(Variant("single"), args.workload, 1, args.cores_per_rank, port + 500, args.nice, args.tokens)
            )
            if args.loaded_baseline and world > 1:
                load = stack.enter_context(HostLoad(args.workload, world, args.cores_per_rank, port + 600, args.nice, args.tokens))
        previous: tuple[float, float] | None = None  # (median, mbps) of the last real/simulated row
        for link in links:
            chosen = args.simulated_bandwidths if link == "simulated" and args.simulated_bandwidths else args.bandwidths
            bandwidths = [None] if link in ("none", "compute") else sorted(chosen, reverse=True)
            losses = args.loss if link == "real" else [0.0]
            for mbps, loss in itertools.product(bandwidths, losses):
                topology.shape(mbps if link == "real" else None, args.paced)
                topology.set_loss(loss if link == "real" else 0.0)
                predicted = previous[0] * previous[1] / mbps if previous and mbps else None
                mode = "compute" if link in ("none", "compute") else link
                dropped_before = topology.dropped_packets()
                merged = measure_row(ranks, mode, mbps, args.runs, args.row_budget_s, predicted, single, load)
                dropped = topology.dropped_packets() - dropped_before if loss else None
                row = make_row(args, variant, world, link, mbps, merged, ranks.ready, loss, dropped)
                out.write(json.dumps(row) + "\n")
                out.flush()
                baseline = f", one device {row['single_median_s']:.3f} s -> {row['speedup_vs_single']:.2f}x" if "single_median_s" in row else ""
                if "single_loaded_median_s" in row:
                    baseline += f" (host loaded {row['single_loaded_median_s']:.3f} s -> {row['speedup_vs_loaded_single']:.2f}x)"
                if "per_rank_waited_s" in row:
                    baseline += ", waited/compute s per rank " + " ".join(f"{w:.3f}/{c:.3f}" for w, c in zip(row["per_rank_waited_s"], row["per_rank_compute_s"]))
                tqdm.write(
                    f"{args.workload} N={world} {variant.label:30s} {link:9s} {mbps or '-':>5} Mbps loss {loss:g}%: "
                    f"median {row['median_s']:.3f} s over {row['runs']} runs{baseline}, "
                    f"{row['bytes_sent_per_rank'] / 1e6:.3f} MB/rank (wire {(row['wire_bytes_per_rank'] or 0) / 1e6:.3f} MB)"
                )
                if mbps and not loss:
                    previous = (row["median_s"], mbps)
            previous = None


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def table_setting(text: str) -> bool | int:
    """on / off / a limit in MiB per layer (DistributedRuntime's projection_table takes bytes)."""
    if text in ("on", "off"):
        return text == "on"
    if text.isdigit():
        return int(text) * 2**20
    raise argparse.ArgumentTypeError(f"expected on, off or a number of MiB per layer, got {text!r}")


def table_text(value: bool | int) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value // 2**20)


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
    parser.add_argument("--codebook-size", type=int, help="ASTRA's K (default: AstraConfig's)")
    parser.add_argument("--overlap", type=on_off, help="on/off: DistributedRuntime(overlap=...) (default: the runtime's)")
    parser.add_argument("--projection-table", type=table_setting,
                        help="on/off or a limit in MiB per layer: DistributedRuntime(projection_table=...) (default: the runtime's)")
    parser.add_argument("--shard-sizes", nargs="+", help="AstraConfig.shard_sizes: one size per device, or 'balanced' "
                        "(the cost model's sizes for causal families); default AstraConfig's, even shards")
    parser.add_argument("--tokens", type=int, help="prefill length of a causal workload (default 1024)")
    parser.add_argument("--paced", action="store_true",
                        help="paced real links: a two-frame token bucket and one frame per packet, so a burst (a layer's "
                             "codes) leaves at the link's rate; default: a 64 KiB bucket that lets bursts through at once")
    parser.add_argument("--loss", type=float, nargs="+", default=[0.0],
                        help="packet loss on the real links, percent (iptables statistic DROP in every namespace)")  # fmt: skip
    parser.add_argument("--no-interleave", dest="interleave", action="store_false",
                        help="do not measure the one device between the method's runs")  # fmt: skip
    parser.add_argument("--loaded-baseline", action="store_true",
                        help="also time the one device while the other ranks' cores run forwards (HostLoad): the "
                             "host sharing that N ranks on one host have and separate devices would not")  # fmt: skip
    parser.add_argument("--oversubscribe", action="store_true",
                        help="let ranks share cores when N x cores exceed the machine's (smoke tests only: timings are meaningless)")  # fmt: skip
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
    if max(args.n) * args.cores_per_rank > os.cpu_count() and not args.oversubscribe:
        parser.error(f"N={max(args.n)} ranks x {args.cores_per_rank} cores exceed the {os.cpu_count()} cores here")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.loaded_baseline and not args.interleave:
        parser.error("--loaded-baseline loads the host around the interleaved one device: drop --no-interleave")
    for loss in args.loss:
        try:
            netns.check_loss(loss)
        except ValueError as error:
            parser.error(f"--loss: {error}")
    if args.tokens is not None and (args.workload == "vit" or args.tokens < 1):
        parser.error("--tokens sets the prefill length of a causal workload (gpt2, llama), >= 1")
    if args.shard_sizes == [BALANCED]:
        args.shard_sizes = BALANCED
    elif args.shard_sizes is not None:
        try:
            args.shard_sizes = [int(size) for size in args.shard_sizes]
        except ValueError:
            parser.error(f"--shard-sizes takes whole numbers, one per device, or 'balanced'; got {' '.join(args.shard_sizes)}")
        if len(args.n) != 1:
            parser.error("--shard-sizes needs exactly one --n (one size per device)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    astra_settings = {"codebook_size": args.codebook_size, "overlap": args.overlap, "projection_table": args.projection_table,
                      "shard_sizes": None if args.shard_sizes is None
                      else args.shard_sizes if isinstance(args.shard_sizes, str) else tuple(args.shard_sizes)}  # fmt: skip
    jobs = [(v, 1 if v.method == "single" else n) for v in variants(args.methods, args.groups, args.quantize, **astra_settings) for n in args.n]
    jobs = list(dict.fromkeys(jobs))  # the single device runs once, whatever --n says
    port = 29500 + os.getpid() % 400
    with netns.Topology(max(world for _, world in jobs)) as topology, open(args.out, "a") as out:
        if any(args.loss):  # loss per frame, and the lossless rows of the same run on the same links
            topology.segment_per_frame()
        for offset, (variant, world) in enumerate(tqdm(jobs, desc="methods", file=sys.stderr)):
            benchmark_variant(args, topology, variant, world, port + offset, out)


if __name__ == "__main__":
    main()
