"""Per-layer fixed costs of one ASTRA rank: its forward with no network, against the plain model on its tokens.

Each rank r of N is emulated in one process (`links` compute mode: collectives return at once), as in
`profile_astra`, with even shards (``shard_sizes=None``) so that two source trees run the same layout:

- ViT-B/16, N=4, G=8 hidden: every rank's forward (49-50 tokens), and the plain ViT layers on 50 tokens
  (the floor: what the rank's own tokens cost without ASTRA); the difference over 12 layers is the
  per-layer overhead (encoding, the exchange's bookkeeping, gathering the received K/V, the masks).
- GPT2, 1024 tokens, N=4, G=32 hidden: ranks 1 and 3 (256-token shards).
- ``gpt2-balance``: GPT2 as above, all four ranks, even shards against the default balanced ones
  (alternating forward by forward in one process); the slowest rank sets the latency.

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
CASES = {"vit": ("vit", 8, [0, 1, 2, 3]), "gpt2": ("gpt2", 32, [1, 3]), "gpt2-g1": ("gpt2", 1, [1, 3]), "gpt2-balance": ("gpt2", 32, [0, 1, 2, 3])}


def worker(case: str, repeats: int) -> dict:
    """Time this tree's rank forwards (and the ViT floor) in this process; returns {label: [seconds]}."""
    import torch
    import torch.distributed as dist

    import transformers_astra as astra
    from transformers_astra.distributed import DistributedRuntime

    from . import links
    from .profile_astra import as_rank, timed_runs
    from .workloads import build

    torch.set_num_threads(1)
    port = 29500 + os.getpid() % 1000
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    links.install()
    links.set_mode("compute", None)
    name, groups, ranks = CASES[case]
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
    extra = {"logits_to_keep": 1} if workload.causal else {}
    layouts = {"even": None, "balanced": "balanced"} if case == "gpt2-balance" else {"": None}
    for _ in range(repeats):  # the layouts alternate forward by forward
        for layout, sizes in layouts.items():
            astra.patch(workload.model, astra.AstraConfig(num_devices=4, groups=groups, shard_sizes=sizes))
            for rank in ranks:
                with as_rank(rank, 4), torch.inference_mode():
                    runtime = DistributedRuntime(workload.model, check_inputs=False)
                    label = " ".join(filter(None, [layout, f"rank {rank}"]))
                    out.setdefault(label, []).extend(timed_runs(lambda: runtime(**workload.inputs, **extra), 1))
                    if layout:
                        out[f"{layout} sizes"] = list(runtime.layout.sizes)
            astra.unpatch(workload.model)
    dist.destroy_process_group()
    return out


def run_tree(src: str, case: str, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}:{ROOT}"}
    command = [sys.executable, "-m", "benchmarks.per_layer_costs", "--worker", case, "--repeats", str(repeats)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per tree (alternating with --before)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per process")
    parser.add_argument("--before", help="another source tree (its src/ directory) to time alternately")
    parser.add_argument("--machine", default=platform.node())
    parser.add_argument("--out", help="append the row to this JSON list")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    trees = {"after": str(ROOT / "src")}
    if args.before:
        trees = {"before": args.before, **trees}
    rows = []
    for case in args.case:
        samples: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
        for _ in range(args.runs):
            for tree, src in trees.items():  # alternate the trees run by run
                for label, times in run_tree(src, case, args.repeats).items():
                    if "sizes" in label:
                        samples[tree][label] = times
                    else:
                        samples[tree].setdefault(label, []).extend(times)
        row = {
            "case": case, "N": 4, "G": CASES[case][1], "quantize": "hidden", "threads": 1,
            "shard_sizes": "even and balanced" if case == "gpt2-balance" else "even",
            "median_s": {tree: {k: statistics.median(v) for k, v in s.items() if "sizes" not in k} for tree, s in samples.items()},
            "sizes": {tree: {k: v for k, v in s.items() if "sizes" in k} for tree, s in samples.items()},
            "samples": {tree: {k: len(v) for k, v in s.items() if "sizes" not in k} for tree, s in samples.items()},
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
