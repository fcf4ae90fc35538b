"""`GroupedVQ.encode` of this tree against another tree's (``--before``: its ``src/``), per layer, on CPU.

Each shape: one layer's encode of a shard's tokens, the two trees' encoders called in turn ``--reps`` times
(`encoder_speed.interleaved`: median, p10, p90), their codes asserted equal (both must give the float64
reference's codes). Shapes: GPT2/ViT width 768 (hidden) and 1536 (kv), 256 tokens (GPT2's shard at N=4) and 50
(ViT's), codebooks drawn from points near the data:

    git archive <commit> src | tar -x -C /tmp/before
    python -m benchmarks.encoder_ab --before /tmp/before/src --threads 1 2 --out docs/results/encoder_ab.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from .encoder_speed import interleaved, save_rows

SHAPES = [  # (width, groups, codebook size, tokens)
    (1536, 32, 256, 256), (768, 32, 1024, 256), (768, 1, 1024, 256), (768, 8, 1024, 256),
    (768, 32, 1024, 50), (1536, 8, 1024, 50),
]


def load_quantizer(src: str):
    """The ``transformers_astra.quantizer`` module of the tree whose ``src/`` is ``src``."""
    for name in [name for name in sys.modules if name.startswith("transformers_astra")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        return importlib.import_module("transformers_astra.quantizer")
    finally:
        sys.path.remove(src)


def measure(before_src: str, threads: int, reps: int) -> list[dict]:
    torch.set_num_threads(threads)
    trees = {"before": load_quantizer(before_src), "after": load_quantizer(str(Path(__file__).resolve().parents[1] / "src"))}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for width, groups, size, tokens in SHAPES:
        x = torch.randn(tokens, width, generator=generator)
        centres = torch.randn(size, width, generator=generator)[torch.randint(size, (size,), generator=generator)]
        book = centres.reshape(size, groups, width // groups).transpose(0, 1) + 0.1 * torch.randn(groups, size, width // groups, generator=generator)
        encoders = {}
        for name, module in trees.items():
            vq = module.GroupedVQ(width, groups, size).eval()
            with torch.no_grad():
                vq.codebook.copy_(book)
            encoders[name] = vq
        same = torch.equal(encoders["before"].encode(x), encoders["after"].encode(x))
        if not same:
            raise AssertionError(f"codes differ at width {width} G={groups} K={size} tokens {tokens}")
        timed = interleaved({name: (lambda vq=vq: vq.encode(x)) for name, vq in encoders.items()}, reps)
        before, after = timed["before"]["median_ms"], timed["after"]["median_ms"]
        rows.append({"width": width, "groups": groups, "codebook_size": size, "tokens": tokens, "threads": threads,
                     "before": timed["before"], "after": timed["after"], "speedup": before / after, "same_codes": same})
        print(f"threads {threads} width {width} G={groups} K={size} tokens {tokens}: before {before:.2f} ms, "
              f"after {after:.2f} ms ({before / after:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the other tree's src/ directory")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--machine", default="unnamed")
    parser.add_argument("--out", help="JSON list the rows are appended to")
    args = parser.parse_args(argv)
    stamp = {"machine": args.machine, "torch": torch.__version__, "cpus": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1m": os.getloadavg()[0],
             "command": "python -m benchmarks.encoder_ab " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = [row | stamp for threads in args.threads for row in measure(args.before, threads, args.reps)]
    if args.out:
        save_rows(args.out, rows, None, None, "", "")


if __name__ == "__main__":
    main()
