"""The exact encoder on an accelerator: near-ties rechecked group by group against all at once.

`nearest_codewords` gives the reference's codes bit for bit: points whose best matmul score has a rival
within the rounding bound are rechecked in float64. Until 2026-11-27 (session 5) that recheck ran group by
group, with host synchronisations in each (`_recheck`, still CPU's); on accelerators it now rechecks every
marked point of every group in one pass of the reference itself (`_reference_rows`). Eval mode uses this
encoder: the runtime on GPUs, the simulation, every evaluation of a patched model. Timed here in eval mode
(codes identical, checked), on the runtime's shapes (GPT2 width 768: a 256-token shard, hidden G = 1 / 32 with
K = 1024, kv width 1536 G = 32 K = 256) and on the fine-tuning evaluations' (width 256, 32 x 256 tokens, G = 32),
with codebooks drawn from the points and with half the codewords duplicated (every point rechecked):

    python -m benchmarks.recheck_speed --device cuda --machine "..." --out docs/results/recheck_speed.json \\
        --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from transformers_astra.quantizer import GroupedVQ, nearest_codewords

from .encoder_speed import markdown_document, save_rows
from .train_encode_speed import device_seconds

MARKDOWN_START = "<!-- recheck-speed:start -->"
MARKDOWN_END = "<!-- recheck-speed:end -->"
SHAPES = [  # (label, width, groups, codebook size, tokens)
    ("runtime, hidden G=1", 768, 1, 1024, 256),
    ("runtime, hidden G=32", 768, 32, 1024, 256),
    ("runtime, kv G=32 K=256", 1536, 32, 256, 256),
    ("fine-tuning eval, G=32", 256, 32, 1024, 32 * 256),
]


def measure(device: str, repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for label, width, groups, size, tokens in SHAPES:
        x = torch.randn(tokens, width, generator=generator)
        vq = GroupedVQ(width, groups, size).eval()
        for codebook in ("from the points", "half duplicated"):
            with torch.no_grad():
                samples = torch.randn(size, width, generator=generator) if size > tokens else x[torch.randperm(tokens, generator=generator)[:size]]
                book = samples.reshape(size, groups, width // groups).transpose(0, 1).contiguous()
                if codebook == "half duplicated":
                    book[:, size // 2 :] = book[:, : size // 2]
                vq.codebook.copy_(book)
            centres = vq.codebook.detach().to(device)
            points = x.to(device).reshape(-1, groups, width // groups).transpose(0, 1)
            summary = vq._codebook_summary(centres)
            budget = 1 << 24
            codes = {rows_: nearest_codewords(points, centres, budget, summary, recheck_rows=rows_) for rows_ in (False, True)}
            times = {}
            for _ in range(2):  # alternate the two, twice
                for rows_ in (False, True):
                    times.setdefault(rows_, []).extend(
                        device_seconds(lambda: nearest_codewords(points, centres, budget, summary, recheck_rows=rows_), device, repeats))
            group_ms, rows_ms = (1e3 * statistics.median(times[k]) for k in (False, True))
            rows.append({"device": device, "shape": label, "width": width, "groups": groups, "codebook_size": size,
                         "tokens": tokens, "codebook": codebook, "per_group_ms": group_ms, "all_at_once_ms": rows_ms,
                         "speedup": group_ms / rows_ms, "same_codes": bool(torch.equal(codes[False], codes[True])),
                         "repeats": 2 * repeats})
            print(f"{device} {label} ({codebook}): per group {group_ms:.2f} ms, all at once {rows_ms:.2f} ms "
                  f"({group_ms / rows_ms:.1f}x), same codes {rows[-1]['same_codes']}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [MARKDOWN_START, "| machine | device | shape | tokens | codebook | recheck per group | all at once | "
             "speed-up | same codes | date |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['machine']} | {r['device']} | {r['shape']} | {r['tokens']} | {r['codebook']} | "
                     f"{r['per_group_ms']:.2f} ms | {r['all_at_once_ms']:.2f} ms | {r['speedup']:.1f}× | "
                     f"{r['same_codes']} | {r['date']} |")
    lines.append(f"\nCommand: `{rows[-1]['command']}`" if rows else "")
    return "\n".join([*lines, MARKDOWN_END]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--machine", default="unnamed")
    parser.add_argument("--out", help="JSON list the rows are appended to")
    parser.add_argument("--markdown", help="Markdown file whose recheck-speed section is rewritten from --out")
    args = parser.parse_args(argv)
    if args.markdown:
        if not args.out:
            raise SystemExit("--markdown needs --out")
        markdown_document(args.markdown, MARKDOWN_START, MARKDOWN_END)
    stamp = {"machine": args.machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": "python -m benchmarks.recheck_speed " + " ".join(sys.argv[1:] if argv is None else argv),
             "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    rows = [row | stamp for row in measure(args.device, args.repeats)]
    if args.out:
        save_rows(args.out, rows, args.markdown, markdown, MARKDOWN_START, MARKDOWN_END)


if __name__ == "__main__":
    main()
