"""Encoder micro-benchmark: `GroupedVQ.encode` against the encoder it replaced, per layer, on CPU.

Per row: one layer's encode of ``tokens`` vectors (a rank's shard) at one setting, the previous encoder
(main before the block-wise argmin: cache-sized chunks of ``baddbmm`` + ``argmin``, codeword norms
recomputed every call) and the current one timed interleaved in one loop (``--reps`` each, wall clock),
median and p10-p90, and whether their codes agree (they may differ only where two codewords are
closer than float32 rounding: the current encoder gives the exact nearest codeword, see
`transformers_astra.quantizer.nearest_codewords`). Shapes: GPT2/ViT (width 768; kv mode quantizes keys
and values, 1536 wide in 2G groups) and the Llama workload (`benchmarks.workloads`: hidden 1024; kv
mode 2 x 256 in 2G groups); 49 tokens (ViT-B/16's 197 over 4 devices) only for the 768-wide model.

``--receiver``: the last rank's side at G=32 hidden (GPT2 width, K=1024), 768 received tokens: decode +
K/V projection (`ModelAdapter.project_kv`) against the runtime's codeword-projection table
(`kernels.projection_tables`, the gather-sum of `kernels.projected_from_codes`), in float32 and with the
table stored in bfloat16; with the tables' size against `kernels.PROJECTION_TABLE_MAX_BYTES`.

    python -m benchmarks.encoder_speed --out docs/results/encoder_speed.json --markdown docs/benchmarks.md

Encoder rows stop after ``--budget-s`` (35 s; the rest are listed as skipped), the receiver rows take
about 15 s more; ``--smoke`` runs a few rows in seconds. ``--machine`` names the machine
(default: ``lscpu``'s model name). To put several machines' results in the docs:

    python -m benchmarks.encoder_speed --render docs/results/encoder_speed.json docs/results/encoder_speed-gpu-host.json --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from datetime import datetime, timezone

import torch

from transformers_astra.quantizer import GroupedVQ

# (name, quantized width per group count G, codes per token per G, token counts); kv mode: one
# quantizer over keys and values side by side, 2G groups (`ModelAdapter.quantized_width`).
SHAPES = (
    ("gpt2/vit hidden", 768, 1, (256, 49)),
    ("gpt2/vit kv", 1536, 2, (256, 49)),
    ("llama hidden", 1024, 1, (256,)),
    ("llama kv", 512, 2, (256,)),
)
GROUPS = (1, 8, 16, 32)
CODEBOOK_SIZES = (256, 512, 1024)
THREADS = (1, 2)
MARKDOWN_START = "<!-- encoder-speed:start -->"
MARKDOWN_END = "<!-- encoder-speed:end -->"


def previous_encode(quantizer: GroupedVQ, x: torch.Tensor) -> torch.Tensor:
    """`GroupedVQ.encode` before this benchmark's change (commit 53540d4), for comparison only."""
    codebook = quantizer.codebook.detach()
    points = x.reshape(-1, quantizer.groups, quantizer.group_width).to(codebook.dtype).transpose(0, 1)
    squared_norms = codebook.pow(2).sum(-1).unsqueeze(1)
    centres_t = codebook.transpose(1, 2)
    groups, n, _ = points.shape
    nearest = torch.empty(groups, n, dtype=torch.long)
    chunk = max(1, (1 << 20) // (groups * codebook.shape[1]))
    for start in range(0, n, chunk):
        scores = torch.baddbmm(squared_norms, points[:, start : start + chunk], centres_t, alpha=-2.0)
        nearest[:, start : start + chunk] = scores.argmin(-1)
    return nearest.T.reshape(*x.shape[:-1], quantizer.groups)


def interleaved(functions: dict, reps: int) -> dict:
    """Wall-clock seconds of each function, called in turn ``reps`` times after one warm-up each."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(reps):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: summary(values) for name, values in times.items()}


def summary(values: list[float]) -> dict:
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median_ms": 1e3 * statistics.median(values), "p10_ms": 1e3 * deciles[0], "p90_ms": 1e3 * deciles[-1], "reps": len(values)}


def fitted_quantizer(width: int, groups: int, size: int, generator: torch.Generator) -> tuple[GroupedVQ, torch.Tensor]:
    """A quantizer whose codebook is fitted (2 k-means steps) to activation-like data, and held-out data."""
    scale = torch.rand(width, generator=generator) * 3  # uneven per-dimension spread, as in real activations
    data = torch.randn(max(2 * size, 2048) + 256, width, generator=generator) * scale
    quantizer = GroupedVQ(width, groups, size).eval()
    quantizer.kmeans_init(data[:-256], num_iters=2, generator=generator)
    return quantizer, data[-256:]


def encoder_rows(args, context: dict) -> list[dict]:
    rows = []
    shapes = SHAPES[:1] + SHAPES[3:] if args.smoke else SHAPES
    groups_list = (1, 32) if args.smoke else GROUPS
    sizes = (1024,) if args.smoke else CODEBOOK_SIZES
    for threads in THREADS:
        torch.set_num_threads(threads)
        for name, width, per_g, token_counts in shapes:
            for groups in groups_list:
                for size in sizes:
                    quantizer, data = fitted_quantizer(width, groups * per_g, size, torch.Generator().manual_seed(groups * size))
                    for tokens in token_counts:
                        if time.perf_counter() - args.started > args.budget_s:
                            args.skipped.append(f"{name} G={groups} K={size} tokens={tokens} threads={threads}")
                            continue
                        x = data[:tokens]
                        same = torch.equal(previous_encode(quantizer, x), quantizer.encode(x))
                        times = interleaved({"previous": lambda: previous_encode(quantizer, x), "current": lambda: quantizer.encode(x)}, args.reps)
                        rows.append({
                            "kind": "encode", "shape": name, "width": width, "G": groups, "codes_per_token": groups * per_g,
                            "group_width": width // (groups * per_g), "K": size, "tokens": tokens, "threads": threads,
                            "previous": times["previous"], "current": times["current"],
                            "speedup": times["previous"]["median_ms"] / times["current"]["median_ms"],
                            "same_codes": same, "load_average_1m": os.getloadavg()[0], **context,
                        })  # fmt: skip
                        print(f"{name:16s} G={groups:2d} K={size:4d} n={tokens:3d} t={threads}: previous "
                              f"{times['previous']['median_ms']:6.2f} ms, current {times['current']['median_ms']:6.2f} ms", flush=True)  # fmt: skip
    return rows


def receiver_rows(args, context: dict) -> list[dict]:
    """G=32 hidden, GPT2 width: decode + project vs the projection table's gather-sum (float32, bf16 table)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import transformers_astra as astra
    from transformers_astra.exchange import merge_heads
    from transformers_astra.kernels import PROJECTION_TABLE_MAX_BYTES, projected_from_codes, projection_tables
    from transformers_astra.patch import astra_state

    received = 64 if args.smoke else 768
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=64, n_positions=1024)).eval()
    astra.patch(model, astra.AstraConfig(num_devices=4, groups=32, codebook_size=1024, quantize="hidden"))
    attention, adapter = model.transformer.h[0].attn, astra_state(model).adapter
    quantizer = attention.astra_quantizer
    codes = torch.randint(0, quantizer.codebook_size, (1, received, quantizer.groups), generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        tables = projection_tables(attention, adapter, quantizer)
        build_s = time.perf_counter() - start
        half_tables = (tables[0].bfloat16(), tables[1].bfloat16(), tables[2], tables[3])

        def decode_project():
            return adapter.project_kv(attention, quantizer.decode(codes))

        def half_table():
            index = codes + torch.arange(codes.shape[-1]) * quantizer.codebook_size
            key = torch.nn.functional.embedding(index, half_tables[0]).sum(-2, dtype=torch.float32) + tables[2]
            value = torch.nn.functional.embedding(index, half_tables[1]).sum(-2, dtype=torch.float32) + tables[3]
            return key, value

        exact = tuple(merge_heads(t) for t in decode_project())
        full = projected_from_codes(tables, codes, quantizer.codebook_size)
        half = half_table()
        error = lambda got: max(float((a - b).abs().max()) for a, b in zip(got, exact))  # noqa: E731
        table_bytes = sum(t.numel() * t.element_size() for t in tables[:2])
        for threads in THREADS:
            torch.set_num_threads(threads)
            times = interleaved(
                {"decode_project": decode_project, "table_fp32": lambda: projected_from_codes(tables, codes, quantizer.codebook_size), "table_bf16": half_table},
                args.reps,
            )  # fmt: skip
            rows.append({
                "kind": "receiver", "G": 32, "K": quantizer.codebook_size, "width": quantizer.width, "received_tokens": received,
                "threads": threads, **times, "table_bytes_per_layer": table_bytes, "table_bf16_bytes_per_layer": table_bytes // 2,
                "table_cap_bytes": PROJECTION_TABLE_MAX_BYTES, "table_build_s": build_s,
                "table_fp32_max_abs_error": error(full), "table_bf16_max_abs_error": error(half),
                "load_average_1m": os.getloadavg()[0], **context,
            })  # fmt: skip
            print(f"receiver t={threads}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in times.items()), flush=True)
    return rows


def machine_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def ms(part: dict) -> str:
    return f"{part['median_ms']:.2f} ({part['p10_ms']:.2f}-{part['p90_ms']:.2f})"


def markdown(runs: list[list[dict]]) -> str:
    """The generated section: one part per run (JSON file), between the markers."""
    return "\n".join([MARKDOWN_START, *(run_markdown(rows) for rows in runs if rows), MARKDOWN_END]) + "\n"


def run_markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"**{first['machine']}**",
        "",
        f"Machine: {first['machine']}, {first['cpus']} CPUs; {first['date']}; torch {first['torch']}; "
        f"`{first['command']}` (results: docs/results/encoder_speed.json, with each row's load average). "
        "Times per layer, ms: median (p10-p90) of the reps, the two encoders interleaved in one loop.",
        "",
    ]
    encode = [row for row in rows if row["kind"] == "encode"]
    if encode:
        lines += [
            "| shape | G | codes/token | K | tokens | threads | previous encoder ms | current ms | speed-up | same codes | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in encode:
            lines.append(
                f"| {row['shape']} | {row['G']} | {row['codes_per_token']} | {row['K']} | {row['tokens']} | {row['threads']} | "
                f"{ms(row['previous'])} | {ms(row['current'])} | {row['speedup']:.2f}x | {'yes' if row['same_codes'] else 'no'} | {row['load_average_1m']:.1f} |"
            )
    for row in rows:
        if row["kind"] == "skipped":
            lines += ["", f"{len(row['rows'])} rows not measured (over the {row['budget_s']:g} s budget; listed in the JSON)."]
    receiver = [row for row in rows if row["kind"] == "receiver"]
    if receiver:
        row = receiver[0]
        lines += [
            "",
            f"Receiver, G=32 hidden, K={row['K']}, width {row['width']}, {row['received_tokens']} received tokens per layer: "
            f"decode + K/V projection against the codeword-projection table ({row['table_bytes_per_layer'] / 2**20:.0f} MiB "
            f"per layer in float32, cap {row['table_cap_bytes'] / 2**20:.0f} MiB; built in {row['table_build_s']:.2f} s; "
            f"largest K/V difference to decode + project: float32 table {row['table_fp32_max_abs_error']:.1e}, "
            f"bfloat16 table {row['table_bf16_max_abs_error']:.1e}).",
            "",
            "| threads | decode + project ms | table float32 ms | table bfloat16 ms | load avg |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['threads']} | {ms(r['decode_project'])} | {ms(r['table_fp32'])} | {ms(r['table_bf16'])} | {r['load_average_1m']:.1f} |"
            for r in receiver
        ]
    return "\n".join(lines) + "\n"


def markdown_document(path: str, start: str = MARKDOWN_START, end: str = MARKDOWN_END) -> str:
    """The text of ``path``, which must hold the generated section's markers (checked before measuring)."""
    try:
        with open(path) as handle:
            document = handle.read()
    except OSError as error:
        raise ValueError(f"--markdown {path}: {error}") from error
    if start not in document or end not in document:
        raise ValueError(f"--markdown {path} has no {start} ... {end} section to fill")
    return document


def save_rows(path: str, rows: list[dict], markdown_path: str | None, render, start: str, end: str) -> None:
    """Append ``rows`` to the JSON list in ``path`` (created if missing); with ``markdown_path``, rewrite its
    section between ``start`` and ``end`` with ``render(every row the file now holds)``."""
    target = Path(path)
    every = (json.loads(target.read_text()) if target.exists() else []) + rows
    target.write_text(json.dumps(every, indent=1) + "\n")
    if markdown_path:
        write_markdown(markdown_path, render(every), start, end)


def write_markdown(path: str, text: str, start: str = MARKDOWN_START, end: str = MARKDOWN_END) -> None:
    """Replace the generated part between the markers in ``path`` (``text`` holds the markers)."""
    document = markdown_document(path, start, end)
    head, rest = document.split(start, 1)
    tail = rest.split(end, 1)[1].lstrip("\n")
    with open(path, "w") as handle:
        handle.write(head + text + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the rows (required unless --render)")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="measure nothing: write --markdown from these result files")
    parser.add_argument("--markdown", help="Markdown file whose encoder-speed section is rewritten")
    parser.add_argument("--reps", type=int, default=20, help="timed calls of each method per row (>= 20 for the docs)")
    parser.add_argument("--machine", default=None, help="machine description (default: lscpu's model name)")
    parser.add_argument("--no-receiver", action="store_true", help="skip the receiver-side rows")
    parser.add_argument("--smoke", action="store_true", help="a few rows, to check the script")
    parser.add_argument("--budget-s", type=float, default=35.0,
                        help="encoder rows that would start later than this are skipped and listed (threads=1 rows come first)")
    args = parser.parse_args(argv)
    if args.render:
        if not args.markdown:
            raise ValueError("--render needs --markdown (the file whose encoder-speed section is rewritten)")
        runs = []
        for path in args.render:
            with open(path) as handle:
                runs.append(json.load(handle))
        write_markdown(args.markdown, markdown(runs))
        return
    if not args.out:
        raise ValueError("--out is required (the JSON file for the rows)")
    if args.markdown:
        markdown_document(args.markdown)  # fail before measuring, not after
    if args.reps < 2:
        raise ValueError(f"--reps must be at least 2 for percentiles, got {args.reps}")
    argv = sys.argv[1:] if argv is None else argv
    context = {
        "command": "python -m benchmarks.encoder_speed " + shlex.join(argv),
        "machine": args.machine or machine_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    started = args.started = time.perf_counter()
    args.skipped = []
    rows = encoder_rows(args, context)
    if args.skipped:
        print(f"skipped (over --budget-s {args.budget_s:g}): " + "; ".join(args.skipped))
        rows.append({"kind": "skipped", "rows": args.skipped, "budget_s": args.budget_s, **context})
    if not args.no_receiver:
        rows += receiver_rows(args, context)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)
    if args.markdown:
        write_markdown(args.markdown, markdown([rows]))
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
