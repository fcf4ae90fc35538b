"""Where the encoder's time goes on a host, and whether another form of its score product is faster there.

On the GPU host (Xeon, torch 2.11) a goal-1 rank (GPT2, N=4, kv G=16 K=256) spends 59-62 ms a forward encoding at
2 threads, against 29 ms on the dev VM (AMD EPYC, torch 2.13), and the second thread buys 1.3x there against 2x
here (docs/benchmarks.md, "05:50 UTC" and "Encoder"). This times, per layer and setting, at each thread count:

- ``encode``: `quantizer.nearest_codewords` as the runtime calls it (exact codes, recheck included);
- ``scores (baddbmm)``: its score product alone, ``|c|^2 - 2 x.c`` for all groups in one ``baddbmm``;
- ``rest of encode``: the difference (block minima, counts, rechecks);
- other forms of the same scores: one ``addmm`` per group, ``baddbmm`` against contiguous transposed codewords,
  ``einsum``; each checked equal to the ``baddbmm`` scores (float32 tolerance) before it is timed;
- ``reference GEMM``: a rank's MLP product (tokens x 768 @ 768 x 3072), as the host's matmul speed at this size.

Timings (`encoder_speed.interleaved`) are medians of ``--reps`` calls, interleaved form by form, with p10-p90, and
GFLOP/s for the products.

    python -m benchmarks.encoder_forms --out docs/results/encoder_forms.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch

from transformers_astra.quantizer import _ENCODE_CHUNK_ELEMENTS_CPU, codebook_summary, nearest_codewords

from .encoder_speed import interleaved

# (label, quantized width, groups, K): goal 1's kv G=16 K=256 (keys and values, 2G groups), G=32 kv K=256, G=1 hidden,
# and kv G=16 at fewer codewords (accuracy_sweep call 19's candidates: the encoder's work falls with K).
SETTINGS = (("kv G=16 K=256", 1536, 32, 256), ("kv G=32 K=256", 1536, 64, 256), ("hidden G=1 K=1024", 768, 1, 1024),
            ("kv G=16 K=128", 1536, 32, 128), ("kv G=16 K=64", 1536, 32, 64))
MLP = (768, 3072)


def score_forms(points: torch.Tensor, centres: torch.Tensor, summary: tuple | None = None) -> dict:
    """Functions of no argument, each giving the (G, n, K) scores |c|^2 - 2 x.c (``summary``: `codebook_summary`)."""
    squared = (summary or codebook_summary(centres))[0]  # (G, 1, K), as the encoder keeps it
    transposed = centres.transpose(1, 2)
    contiguous = transposed.contiguous()
    return {
        "scores (baddbmm)": lambda: torch.baddbmm(squared, points, transposed, alpha=-2.0),
        "scores (baddbmm, contiguous codewords)": lambda: torch.baddbmm(squared, points, contiguous, alpha=-2.0),
        "scores (addmm per group)": lambda: torch.stack(
            [torch.addmm(squared[g], points[g], transposed[g], alpha=-2.0) for g in range(points.shape[0])]
        ),
        "scores (einsum)": lambda: squared - 2.0 * torch.einsum("gnd,gkd->gnk", points, centres),
    }


def setting_row(label: str, width: int, groups: int, size: int, tokens: int, threads: int, reps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    dim = width // groups
    points = torch.randn(groups, tokens, dim, generator=generator)
    centres = torch.randn(groups, size, dim, generator=generator)
    summary = codebook_summary(centres)
    forms = score_forms(points, centres, summary)
    reference = forms["scores (baddbmm)"]()
    for name, form in forms.items():  # the same scores, or the form is not a candidate
        if not torch.allclose(form(), reference, rtol=1e-4, atol=1e-3 * dim):
            raise AssertionError(f"{name} gives other scores than baddbmm")
    mlp_in = torch.randn(tokens, MLP[0], generator=generator)
    mlp_weight = torch.randn(*MLP, generator=generator)
    functions = {"encode": lambda: nearest_codewords(points, centres, _ENCODE_CHUNK_ELEMENTS_CPU, summary), **forms,
                 "reference GEMM": lambda: mlp_in @ mlp_weight}  # fmt: skip
    torch.set_num_threads(threads)
    for function in functions.values():  # warm-ups beyond `interleaved`'s one: the first calls of a shape vary most
        function(), function()
    result = interleaved(functions, reps)
    result["rest of encode"] = {"median_ms": result["encode"]["median_ms"] - result["scores (baddbmm)"]["median_ms"]}
    score_flop = 2 * groups * tokens * size * dim
    for name in forms:
        result[name]["gflop_s"] = score_flop / result[name]["median_ms"] / 1e6
    result["reference GEMM"]["gflop_s"] = 2 * tokens * MLP[0] * MLP[1] / result["reference GEMM"]["median_ms"] / 1e6
    return {"setting": label, "width": width, "groups": groups, "codebook_size": size, "group_width": dim, "tokens": tokens,
            "threads": threads, "timings": result}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    names = list(rows[0]["timings"])
    lines = ["| setting | threads | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            t = row["timings"][name]
            cells.append(f"{t['median_ms']:.2f}" + (f" ({t['gflop_s']:.0f} GFLOP/s)" if "gflop_s" in t else ""))
        lines.append(f"| {row['setting']} | {row['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_settings(module: str, description: str, settings, setting_row, markdown, argv: list[str] | None) -> list[dict]:
    """The command line of an encoder benchmark (this one, `encoder_variants`): parse ``argv``, time
    ``setting_row(label, width, groups, K, tokens, threads, reps)`` for every setting and thread count, print
    ``markdown(rows)`` and append the rows, each with its machine, torch, date, load and command, to --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON file the rows are appended to")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=256, help="a rank's shard (GPT2 1024 tokens over 4)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--machine", default=platform.node())
    parser.add_argument("--smoke", action="store_true", help="one setting, few tokens and reps, to check the script")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.tokens < 1 or min(args.threads) < 1:
        parser.error("--reps, --tokens and --threads must be >= 1")
    settings = settings[:1] if args.smoke else settings
    tokens, reps = (16, 3) if args.smoke else (args.tokens, args.reps)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for threads in args.threads:
        for label, width, groups, size in settings:
            row = setting_row(label, width, groups, size, tokens, threads, reps)
            row.update(machine=args.machine, torch=torch.__version__, date=date, load_average_1m=os.getloadavg()[0],
                       command=f"python -m benchmarks.{module} " + shlex.join(sys.argv[1:] if argv is None else argv))  # fmt: skip
            rows.append(row)
    print(markdown(rows))
    previous = json.loads(open(args.out).read()) if os.path.exists(args.out) else []
    with open(args.out, "w") as f:
        json.dump(previous + rows, f, indent=1)
    return rows


def main(argv: list[str] | None = None) -> None:
    run_settings("encoder_forms", __doc__.split("\n")[0], SETTINGS, setting_row, markdown, argv)


if __name__ == "__main__":
    main()
