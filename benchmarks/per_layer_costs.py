"""Per-layer fixed costs of one ASTRA rank: its forward with no network, against the plain model on its tokens.

Each rank r of N is emulated in one process (`links` compute mode: collectives return at once), as in
`profile_astra`, with even shards (``shard_sizes=None``) so that two source trees run the same layout:

- ViT-B/16, N=4, G=8 hidden: every rank's forward (49-50 tokens), and the plain ViT layers on 50 tokens
  (the floor: what the rank's own tokens cost without ASTRA); the difference over 12 layers is the
  per-layer overhead (encoding, the exchange's bookkeeping, gathering the received K/V, the masks).
- GPT2, 1024 tokens, N=4, G=32 hidden: ranks 1 and 3 (256-token shards).
- ``gpt2-balance``: GPT2 as above, all four ranks, even shards (the default) against balanced ones
  (alternating forward by forward in one process); the slowest rank sets the latency.
- ``vit-kv8``, ``vit-kv32``, ``vit-hidden32``: ViT-B/16, N=4, the settings of issue 12's goal 2 that keep the
  accuracy (G=8 kv, G=32 kv, G=32 hidden), ranks 0 and 3, with the plain 50-token floor.
- ``gpt2-kv32``, ``gpt2-kv8``: GPT2, 1024 tokens, N=4, kv mode at G=32 K=256 (goal 1's setting that keeps the
  perplexity) and G=8 K=1024, ranks 0, 1 and 3, each against its exact work (`ceiling.rank_call`: the plain
  model on its 256 tokens with a KV cache of the earlier ones, built untimed), "plain layers, rank r's exact work".
- ``gpt2-kv16-k256``: GPT2, 1024 tokens, N=4, kv G=16 K=256 (issue 12's most accurate cheap setting, +0.85 %
  perplexity), ranks 0, 1 and 3; ``gpt2-n8-g1``, ``gpt2-n8-g1-k256``: N=8 (`NUM_DEVICES`), G=1 hidden at K=1024
  and K=256 (goal 3's settings), ranks 0, 3 and 7 (128-token shards); ``gpt2-n2-g1``: N=2, G=1 hidden, both ranks (the
  dev VM's multi-process runtime, `run_latency --n 2`, has the same ranks). Every causal case times each of its ranks'
  exact work beside it.

``--ranks``: time these ranks instead of the case's (e.g. one rank per process, four processes at once).

``--threads``: torch threads of the timed process (1 by default; 2 as a rank of the GPU host's latency runs).
``--steps``: also the wall time of the runtime's steps per forward (``steps_ms``, the "after" tree only:
encoding, recheck, packing, unpacking, decoding and rebuilding the received K/V, the two partial attentions
and their merge, the masks, the pooling exchange), timed by wrapping those functions in the worker process;
for the ViT cases also one layer's kernels alone (`vit_kernels`: the encoder's score matmul, the partial
attentions and merge against one SDPA over all 197 keys), as "kernel ..." medians; and torch.profiler's
top aten ops by self CPU time of one forward of the last rank timed (``ops_ms``, with the count of aten ops
called from Python, "calls from Python"; the plain floor's count beside it; for the GPT2 kv cases the last
rank's exact work's ops too, ", exact work"). Step times are per rank ("<step>, rank r").

Every forward is timed twice: wall seconds and the process's CPU seconds (labels ending " (CPU time)"), which on a
shared machine leave out the moments other processes held the cores.

``--before SRC``: also time another source tree (e.g. ``git archive <commit> src | tar -x -C /tmp/before``),
alternating the two trees run by run (each run is a fresh process timing ``--repeats`` forwards), and write
both medians. ``--out`` appends a row to a JSON list (docs/results/per_layer_costs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# case -> (workload, G, quantize, ranks timed, codebook size K)
CASES = {
    "vit": ("vit", 8, "hidden", [0, 1, 2, 3], 1024), "gpt2": ("gpt2", 32, "hidden", [1, 3], 1024),
    "gpt2-g1": ("gpt2", 1, "hidden", [1, 3], 1024), "gpt2-balance": ("gpt2", 32, "hidden", [0, 1, 2, 3], 1024),
    "vit-kv8": ("vit", 8, "kv", [0, 3], 1024), "vit-kv32": ("vit", 32, "kv", [0, 3], 1024),
    "vit-hidden32": ("vit", 32, "hidden", [0, 3], 1024),
    "gpt2-kv32": ("gpt2", 32, "kv", [0, 1, 3], 256), "gpt2-kv8": ("gpt2", 8, "kv", [0, 1, 3], 1024),
    "gpt2-kv16-k256": ("gpt2", 16, "kv", [0, 1, 3], 256),
    "gpt2-n8-g1": ("gpt2", 1, "hidden", [0, 3, 7], 1024), "gpt2-n8-g1-k256": ("gpt2", 1, "hidden", [0, 3, 7], 256),
    "gpt2-n2-g1": ("gpt2", 1, "hidden", [0, 1], 1024),
}  # fmt: skip
# case -> N where it is not 4.
NUM_DEVICES = {"gpt2-n8-g1": 8, "gpt2-n8-g1-k256": 8, "gpt2-n2-g1": 2}


def num_devices(case: str) -> int:
    """The number of ranks N of ``case``'s layout (4 unless `NUM_DEVICES` says otherwise)."""
    return NUM_DEVICES.get(case, 4)
# (module, attribute, label) of the runtime steps `--steps` times; labels with "(all)" include others.
STEPS = [
    ("transformers_astra.quantizer", "GroupedVQ.encode", "encode (with recheck)"),
    ("transformers_astra.quantizer", "_recheck", "encode's recheck"),
    ("transformers_astra.transport", "pack", "pack"),
    ("transformers_astra.transport", "unpack", "unpack"),
    ("transformers_astra.transport", "unpack_rows", "unpack"),  # a layer's sources at once (`CodeTransport.unpack_all`)
    ("transformers_astra.distributed", "RankExchange.remote_keys_values", "received K/V (decode, projection)"),
    ("transformers_astra.distributed", "partial_attention", "partial attentions"),
    ("transformers_astra.distributed", "merge_partials", "merge_partials"),
    ("transformers_astra.distributed", "RankExchange.masks", "masks"),
    ("transformers_astra.distributed", "sent_vectors", "sent_vectors"),
    ("transformers_astra.distributed", "RankExchange.mean_across_shards", "pooling exchange"),
    ("transformers_astra.distributed", "RankExchange.attention", "RankExchange.attention (all)"),
    ("transformers_astra.distributed", "RankExchange.layer_input", "pre-hook send (all)"),
]


def time_steps() -> dict[str, float]:
    """Wrap the `STEPS` functions in this process so that each call adds its wall time to the returned dict."""
    import functools
    import importlib

    spent: dict[str, float] = {}
    for module_name, attribute, label in STEPS:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
    return spent


CPU_TIME = " (CPU time)"  # label suffix of a forward's CPU seconds (`profile_astra.cpu_timed_runs`)


def worker(case: str, repeats: int, threads: int = 1, steps: bool = False, only: list[int] | None = None) -> dict:
    """Time this tree's rank forwards (and the ViT floor) in this process; returns {label: [seconds]}."""
    import torch
    import torch.distributed as dist

    import transformers_astra as astra
    from transformers_astra.distributed import DistributedRuntime

    from . import links
    from .ceiling import rank_call
    from .profile_astra import as_rank, cpu_timed_runs, timed_runs
    from .workloads import build

    torch.set_num_threads(threads)
    spent = time_steps() if steps else None
    port = 29500 + os.getpid() % 1000
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    links.install()
    links.set_mode("compute", None)
    name, groups, quantize, ranks, size = CASES[case]
    ranks, world = only or ranks, num_devices(case)
    out: dict[str, list[float]] = {}
    workload = build(name)
    if name == "vit":  # the floor: the plain layers on one rank's 50 tokens
        hidden = torch.randn(1, 50, 768)
        layers = workload.model.vit.layers

        def plain():
            x = hidden
            for layer in layers:
                x = layer(x)
                x = x[0] if isinstance(x, tuple) else x

        with torch.inference_mode():
            out["plain layers, 50 tokens"] = timed_runs(plain, repeats)
            if steps:
                out["op calls from Python, plain layers"] = [profiled_ops(plain)["calls from Python"]]
    if workload.causal:  # the floor: each timed rank's exact work (`ceiling.rank_call`)
        with torch.inference_mode():
            for rank in ranks:
                prepare, run = rank_call(workload, world, rank)
                label = f"plain layers, rank {rank}'s exact work"
                out[label], out[label + CPU_TIME] = cpu_timed_runs(run, repeats, prepare)
                if steps and rank == ranks[-1]:  # its ops, beside the rank's own (``ops_ms``)
                    state = prepare()
                    for op, milliseconds in profiled_ops(lambda: run(state)).items():
                        out[f"op {op}, exact work"] = [milliseconds]
    if steps and name == "vit":
        out.update(vit_kernels(workload.model, groups, quantize, repeats))
    extra = {"logits_to_keep": 1} if workload.causal else {}
    layouts = {"even": None, "balanced": "balanced"} if case == "gpt2-balance" else {"": None}
    for _ in range(repeats):  # the layouts alternate forward by forward
        for layout, sizes in layouts.items():
            astra.patch(workload.model, astra.AstraConfig(num_devices=world, groups=groups, quantize=quantize, codebook_size=size, shard_sizes=sizes))
            for rank in ranks:
                with as_rank(rank, world), torch.inference_mode():
                    runtime = DistributedRuntime(workload.model, check_inputs=False)
                    label = " ".join(filter(None, [layout, f"rank {rank}"]))
                    runtime(**workload.inputs, **extra)  # the warm-up, not in the steps' times
                    if spent is not None:
                        spent.clear()
                    walls, cpus = cpu_timed_runs(lambda: runtime(**workload.inputs, **extra), 1)
                    out.setdefault(label, []).extend(walls)
                    out.setdefault(label + CPU_TIME, []).extend(cpus)
                    if spent is not None:  # per timed forward (timed_runs also runs one untimed warm-up)
                        for step, seconds in spent.items():
                            out.setdefault(f"step {step}, {label}", []).append(seconds / 2)
                    if layout:
                        out[f"{layout} sizes"] = list(runtime.layout.sizes)
                if spent is not None and rank == ranks[-1]:  # torch.profiler: one forward of the last rank, per op
                    with as_rank(rank, world), torch.inference_mode():
                        for op, milliseconds in profiled_ops(lambda: runtime(**workload.inputs, **extra)).items():
                            out.setdefault(f"op {op}", []).append(milliseconds)
            astra.unpatch(workload.model)
    dist.destroy_process_group()
    return out


def profiled_ops(forward, top: int = 12) -> dict[str, float]:
    """torch.profiler over one call of ``forward``: the ``top`` aten ops by self CPU time (ms), and the number of
    aten ops called from Python (not from other ops) as "calls from Python"."""
    from torch.profiler import profile

    with profile() as prof:
        forward()
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    outer = sum(1 for event in events if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
    ops = sorted(prof.key_averages(), key=lambda event: -event.self_cpu_time_total)
    return {**{event.key: event.self_cpu_time_total / 1e3 for event in ops[:top]}, "calls from Python": float(outer)}


def vit_kernels(model, groups: int, quantize: str, repeats: int) -> dict[str, list[float]]:
    """Seconds of one layer's kernels alone, operands in cache (``--steps``): the encoder's score matmul on 50
    tokens against K=1024 codewords, the two partial attentions of a rank (50 own keys, 147 received) and
    their merge, against one attention over all 197 keys."""
    import torch

    from transformers_astra.kernels import KeyMask, merge_partials, partial_attention
    from transformers_astra.quantizer import GroupedVQ

    from .profile_astra import timed_runs

    width = model.config.hidden_size * (2 if quantize == "kv" else 1)
    groups = groups * (2 if quantize == "kv" else 1)
    codebook = GroupedVQ(width, groups, 1024).codebook.detach().transpose(1, 2)  # (G, d, K)
    points = torch.randn(50, groups, width // groups).transpose(0, 1)
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    query = torch.randn(1, heads, 50, dim)
    keys, values = torch.randn(1, heads, 197, dim), torch.randn(1, heads, 197, dim)
    own, received = (KeyMask.of(torch.ones(1, 1, 50, n, dtype=torch.bool), query.dtype) for n in (50, 147))
    scale = dim**-0.5

    def partials():
        local = partial_attention(query, keys[:, :, :50], values[:, :, :50], own, scale)
        merge_partials(local, partial_attention(query, keys[:, :, 50:], values[:, :, 50:], received, scale))

    repeats = 10 * repeats
    with torch.inference_mode():
        return {
            "kernel encoder score matmul, a layer": timed_runs(lambda: torch.bmm(points, codebook), repeats),
            "kernel two partial attentions + merge, a layer": timed_runs(partials, repeats),
            "kernel one SDPA over 197 keys, a layer": timed_runs(
                lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scale), repeats
            ),
        }


def is_forward_time(label: str) -> bool:
    """Whether a worker's ``label`` holds forward times (not shard sizes, `--steps`' step times or profiled ops)."""
    return "sizes" not in label and not label.startswith(("step ", "op "))


def run_tree(src: str, case: str, repeats: int, threads: int = 1, steps: bool = False, ranks: list[int] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}:{ROOT}"}
    command = [sys.executable, "-m", "benchmarks.per_layer_costs", "--worker", case, "--repeats", str(repeats), "--threads", str(threads)]
    command += ["--steps"] if steps else []
    command += ["--ranks", *map(str, ranks)] if ranks else []
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per tree (alternating with --before)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per process")
    parser.add_argument("--before", help="another source tree (its src/ directory) to time alternately")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the timed processes")
    parser.add_argument("--steps", action="store_true", help="also time the runtime's steps (the 'after' tree)")
    parser.add_argument("--ranks", type=int, nargs="+", help="time these ranks instead of the case's")
    parser.add_argument("--machine", default=platform.node())
    parser.add_argument("--out", help="append the row to this JSON list")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for case in ([args.worker] if args.worker else args.case) if args.ranks else []:
        if max(args.ranks) >= num_devices(case) or min(args.ranks) < 0:
            parser.error(f"--ranks must lie in [0, {num_devices(case)}) for case {case} (N={num_devices(case)}), got {args.ranks}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.threads, args.steps, args.ranks)))
        return
    trees = {"after": str(ROOT / "src")}
    if args.before:
        trees = {"before": args.before, **trees}
    rows = []
    for case in args.case:
        samples: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
        for _ in range(args.runs):
            for tree, src in trees.items():  # alternate the trees run by run
                for label, times in run_tree(src, case, args.repeats, args.threads, args.steps and tree == "after", args.ranks).items():
                    if "sizes" in label:
                        samples[tree][label] = times
                    else:
                        samples[tree].setdefault(label, []).extend(times)
        row = {
            "case": case, "N": num_devices(case), "G": CASES[case][1], "quantize": CASES[case][2], "codebook_size": CASES[case][4],
            "ranks": args.ranks or CASES[case][3], "threads": args.threads,
            "shard_sizes": "even and balanced" if case == "gpt2-balance" else "even",
            "median_s": {tree: {k: statistics.median(v) for k, v in s.items() if is_forward_time(k)}
                         for tree, s in samples.items()},
            "spread_s": {tree: {k: [min(v), max(v)] for k, v in s.items() if is_forward_time(k)}
                         for tree, s in samples.items()},
            "steps_ms": {k[5:]: 1e3 * statistics.median(v) for k, v in samples["after"].items() if k.startswith("step ")},
            "ops_ms": {k[3:]: statistics.median(v) for k, v in samples["after"].items() if k.startswith("op ")},
            "sizes": {tree: {k: v for k, v in s.items() if "sizes" in k} for tree, s in samples.items()},
            "samples": {tree: {k: len(v) for k, v in s.items() if is_forward_time(k)} for tree, s in samples.items()},
            "machine": args.machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1m": os.getloadavg()[0],
            "command": "python -m benchmarks.per_layer_costs " + " ".join(argv if argv is not None else sys.argv[1:]),
        }  # fmt: skip
        print(json.dumps(row, indent=1))
        rows.append(row)
    if args.out:
        path = Path(args.out)
        existing = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(existing + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
