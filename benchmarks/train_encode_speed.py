"""The quantizer's forward during fine-tuning: the exact encoder (recheck of near-ties) against the matmul argmin.

A fine-tuning step runs `GroupedVQ.forward` in training mode once per layer. Since 2026-11-27 (session 4) it
encodes on accelerators with `fast_nearest_codewords` (the scores' argmin, no recheck; on CPU the exact encoder
stays, as fast there); before, always with the exact `nearest_codewords`, whose recheck of near-ties (and of every point near duplicated codewords, e.g. after
k-means on fewer samples than codewords) synchronises with the host and loops over groups. This times both on
the fine-tuning shapes of docs/results.md (width 256, one batch of 32 x 256 tokens), forward and backward, with
codebooks drawn from the data and with half the codewords duplicated:

    python -m benchmarks.train_encode_speed --device cuda --machine "..." --out docs/results/train_encode_speed.json \\
        --markdown docs/finetuning.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from transformers_astra.quantizer import GroupedVQ

from .encoder_speed import markdown_document, save_rows

MARKDOWN_START = "<!-- train-encode-speed:start -->"
MARKDOWN_END = "<!-- train-encode-speed:end -->"


def step_seconds(vq: GroupedVQ, x: torch.Tensor, exact: bool, repeats: int) -> list[float]:
    """Seconds of forward + backward of the quantizer in training mode, ``exact``: with the exact encoder."""

    def once():
        source = x.clone().requires_grad_(True)
        codes = vq.encode(source, exact=exact)  # exact=False: what training mode's forward does on accelerators
        decoded = vq.decode(codes).to(source.dtype)  # the rest of the training-mode forward, unchanged
        out = decoded + (source - source.detach())
        out.square().mean().backward()

    def synchronize():
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    once()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        once()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(device: str, repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for groups in (1, 8, 32):
        for codebook_size in (1024,):
            x = torch.randn(32 * 256, 256, generator=generator).to(device)
            vq = GroupedVQ(256, groups, codebook_size).to(device).train()
            for label in ("from the data", "half duplicated"):
                with torch.no_grad():
                    samples = x[torch.randperm(x.shape[0], generator=generator)[:codebook_size].to(device)]
                    book = samples.reshape(codebook_size, groups, 256 // groups).transpose(0, 1).contiguous()
                    if label == "half duplicated":
                        book[:, codebook_size // 2 :] = book[:, : codebook_size // 2]
                    vq.codebook.copy_(book)
                times = {}
                for _ in range(2):  # alternate the two, twice
                    for exact in (True, False):
                        times.setdefault(exact, []).extend(step_seconds(vq, x, exact, repeats))
                exact_ms, fast_ms = (1e3 * statistics.median(times[k]) for k in (True, False))
                rows.append({"device": device, "groups": groups, "codebook_size": codebook_size, "tokens": x.shape[0],
                             "width": 256, "codebook": label, "exact_ms": exact_ms, "argmin_ms": fast_ms,
                             "speedup": exact_ms / fast_ms, "repeats": 2 * repeats})
                print(f"{device} G={groups} K={codebook_size} codebook {label}: exact {exact_ms:.2f} ms, "
                      f"argmin {fast_ms:.2f} ms ({exact_ms / fast_ms:.1f}x)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [MARKDOWN_START, "| machine | device | G | K | codebook | exact encoder | matmul argmin | "
             "argmin's speed-up | date |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['machine']} | {r['device']} | {r['groups']} | {r['codebook_size']} | {r['codebook']} | "
                     f"{r['exact_ms']:.2f} ms | {r['argmin_ms']:.2f} ms | {r['speedup']:.1f}× | {r['date']} |")
    lines.append(f"\nCommand: `{rows[-1]['command']}`" if rows else "")
    return "\n".join([*lines, MARKDOWN_END]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--machine", default="unnamed")
    parser.add_argument("--out", help="JSON list the rows are appended to")
    parser.add_argument("--markdown", help="Markdown file whose train-encode-speed section is rewritten from --out")
    args = parser.parse_args(argv)
    if args.markdown:
        if not args.out:
            raise SystemExit("--markdown needs --out")
        markdown_document(args.markdown, MARKDOWN_START, MARKDOWN_END)
    stamp = {"machine": args.machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": "python -m benchmarks.train_encode_speed " + " ".join(sys.argv[1:] if argv is None else argv),
             "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    rows = [row | stamp for row in measure(args.device, args.repeats)]
    if args.out:
        save_rows(args.out, rows, args.markdown, markdown, MARKDOWN_START, MARKDOWN_END)


if __name__ == "__main__":
    main()
