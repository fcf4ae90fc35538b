"""The speed-up that no sequence-parallel method can beat on given cores: one device over the slowest rank's minimum work.

Rank r of N must at least run its own T/N tokens through every layer, and a causal model's rank r must also
attend to the r·T/N earlier tokens' keys and values. That much work is timed here with the unmodified HF model,
on the cores and threads of one rank: a causal model runs rank r's tokens with a KV cache of the earlier tokens
(built before each timed run, untimed), with the logits of the last token only, as the latency benchmark does; a
bidirectional model (ViT) runs one shard's tokens alone (its attention spans T/N keys instead of T: slightly less
work than a rank must do, so the ceiling is generous). No encoding, no exchange, no network: ASTRA and every
baseline of `benchmarks.run_latency` do at least this much, so

    ceiling = one device's time on all T tokens / the slowest rank's minimum time

bounds every speed-up the latency table can show on these cores (the issue-12 goals: GPT2 N=4 >= 3.3x, ViT-B/16
N=4 >= 2x, GPT2 N=8 >= 5.5x). One device's runs alternate with the ranks' runs, so both see the same moments of
the machine; every row has medians and p10/p90 of each.

    taskset -c 0,1 python -m benchmarks.ceiling --workloads gpt2 vit --n 4 8 --threads 2 \\
        --machine "..." --out docs/results/ceiling.json --markdown docs/benchmarks.md

``--out`` appends rows to a JSON list; ``--markdown`` rewrites the file's ceiling section from all rows of ``--out``
(``--render FILE... --markdown DOC``: from these row files, measuring nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from transformers_astra.generation import cache_argument, output_cache
from transformers_astra.sharding import split_sizes

from .encoder_speed import markdown_document, save_rows, write_markdown
from .workloads import WORKLOADS, build

MARKDOWN_START = "<!-- ceiling:start -->"
MARKDOWN_END = "<!-- ceiling:end -->"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "p10_s": quantile(values, 0.1), "p90_s": quantile(values, 0.9),
            "runs": len(values)}


def shard_bounds(total: int, n: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s tokens with the runtime's even shards."""
    sizes = split_sizes(total, n)
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


def rank_call(workload, n: int, rank: int):
    """(prepare, run): ``prepare()`` builds what one timed ``run(state)`` needs (untimed)."""
    model, inputs = workload.model, workload.inputs
    if workload.causal:
        ids = inputs["input_ids"]
        start, end = shard_bounds(ids.shape[1], n, rank)
        argument = cache_argument(model)

        def prepare():
            if start == 0:
                return None
            return output_cache(model(input_ids=ids[:, :start], use_cache=True, logits_to_keep=1))

        def run(cache):
            positions = torch.arange(start, end).unsqueeze(0)
            return model(input_ids=ids[:, start:end], position_ids=positions, use_cache=cache is not None,
                         logits_to_keep=1, **{argument: cache})

        return prepare, run
    embeddings, layers = workload.model.vit.embeddings, workload.model.vit.layers
    with torch.inference_mode():
        tokens = embeddings(inputs["pixel_values"])
    start, end = shard_bounds(tokens.shape[1], n, rank)
    shard = tokens[:, start:end].contiguous()

    def run(_):
        x = shard
        for layer in layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
        return x

    return (lambda: None), run


def single_call(workload):
    extra = {"logits_to_keep": 1} if workload.causal else {}
    return lambda: workload.model(**workload.inputs, **extra)


def measure(name: str, ns: list[int], runs: int, small: bool = False) -> list[dict]:
    workload = build(name, small=small)
    single = single_call(workload)
    rows = []
    with torch.inference_mode():
        single()  # warm-up
        for n in ns:
            calls = [rank_call(workload, n, rank) for rank in range(n)]
            one, per_rank = [], {rank: [] for rank in range(n)}
            for round_index in range(runs + 1):  # the first round warms up and is dropped
                round_times = {}
                for rank, (prepare, run) in enumerate(calls):
                    state = prepare()
                    begin = time.perf_counter()
                    run(state)
                    round_times[rank] = time.perf_counter() - begin
                begin = time.perf_counter()
                single()
                one_time = time.perf_counter() - begin
                if round_index > 0:
                    one.append(one_time)
                    for rank, seconds in round_times.items():
                        per_rank[rank].append(seconds)
            ranks = {rank: summary(times) for rank, times in per_rank.items()}
            slowest = max(ranks, key=lambda rank: ranks[rank]["median_s"])
            single_summary = summary(one)
            pairs = [o / max(per_rank[r][i] for r in per_rank) for i, o in enumerate(one)]  # run by run
            rows.append({
                "workload": name, "tokens": workload.num_tokens, "N": n, "causal": workload.causal,
                "single": single_summary, "ranks": {str(rank): s for rank, s in ranks.items()}, "slowest_rank": slowest,
                "ceiling": single_summary["median_s"] / ranks[slowest]["median_s"],
                "ceiling_pairs_p10": quantile(pairs, 0.1),
                "ceiling_pairs_p90": quantile(pairs, 0.9),
            })
            print(f"{name} N={n}: one device {single_summary['median_s']:.3f} s, slowest rank ({slowest}) "
                  f"{ranks[slowest]['median_s']:.3f} s: ceiling {rows[-1]['ceiling']:.2f}x", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [MARKDOWN_START,
             "| machine | threads | workload | N | one device (median, p10–p90) | slowest rank's minimum work | "
             "ceiling (p10–p90 of run pairs) | date | command |", "|---" * 9 + "|"]
    for r in rows:
        one, rank = r["single"], r["ranks"][str(r["slowest_rank"])]
        lines.append(
            f"| {r['machine']} | {r['threads']} | {r['workload']} ({r['tokens']} tokens) | {r['N']} | "
            f"{one['median_s']:.3f} s ({one['p10_s']:.3f}–{one['p90_s']:.3f}) | rank {r['slowest_rank']}: "
            f"{rank['median_s']:.3f} s ({rank['p10_s']:.3f}–{rank['p90_s']:.3f}) | **{r['ceiling']:.2f}×** "
            f"({r['ceiling_pairs_p10']:.2f}–{r['ceiling_pairs_p90']:.2f}) | {r['date']} | `{r['command']}` |")
    return "\n".join([*lines, MARKDOWN_END]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["gpt2", "vit"])
    parser.add_argument("--n", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one rank's, and one device's)")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (each: every rank once, one device once)")
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument("--small", action="store_true", help="the workloads' tiny test models (to check the script)")
    parser.add_argument("--out", help="JSON list the rows are appended to")
    parser.add_argument("--markdown", help="Markdown file whose ceiling section is rewritten from --out's rows")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="measure nothing: rewrite --markdown's ceiling section from these row files")
    args = parser.parse_args(argv)
    if args.render:
        if not args.markdown:
            raise SystemExit("--render needs --markdown (the file whose ceiling section is rewritten)")
        rows = [row for path in args.render for row in json.loads(Path(path).read_text())]
        write_markdown(args.markdown, markdown(rows), MARKDOWN_START, MARKDOWN_END)
        return
    if any(n < 2 for n in args.n) or args.runs < 1 or args.threads < 1:
        raise SystemExit("--n must be >= 2, --runs and --threads >= 1")
    if args.markdown:
        if not args.out:
            raise SystemExit("--markdown needs --out (the rows it is written from)")
        markdown_document(args.markdown, MARKDOWN_START, MARKDOWN_END)  # fail before measuring
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python -m benchmarks.ceiling " + shlex.join(sys.argv[1:] if argv is None else argv)
    stamp = {"machine": args.machine, "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
             "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": command}
    rows = [row | stamp for name in args.workloads for row in measure(name, args.n, args.runs, args.small)]
    if args.out:
        save_rows(args.out, rows, args.markdown, markdown, MARKDOWN_START, MARKDOWN_END)


if __name__ == "__main__":
    main()
