"""Turn the benchmark's raw rows (docs/results/raw/*.jsonl) into docs/results/latency.json, the tables of
docs/benchmarks.md (between its ``<!-- generated -->`` markers; the prose around them is kept) and
docs/benchmarks_latency.png.

    python -m benchmarks.report

A configuration measured twice keeps its latest row. Speed-ups divide the single-device median of the
same machine, model and cores per device by the row's median.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- generated:start -->", "<!-- generated:end -->"
FULL_PRECISION = ("sp-fp32", "sp-fp16", "tp")
KEY_FIELDS = ("machine", "model", "method", "N", "G", "quantize", "bandwidth_mbps", "link", "cores_per_rank")


def load_rows(raw_dir: Path) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for path in sorted(raw_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                latest[tuple(row[k] for k in KEY_FIELDS)] = row
    rows = list(latest.values())
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    single = {(r["machine"], r["model"], r["cores_per_rank"]): r["median_s"] for r in rows if r["method"] == "single"}
    for row in rows:
        reference = single.get((row["machine"], row["model"], row["cores_per_rank"]))
        row["speedup_vs_single"] = round(reference / row["median_s"], 3) if reference else None


def variant(row: dict) -> str:
    return row["method"] if row["G"] is None else f"astra G={row['G']} {row['quantize']}"


def variant_order(name: str) -> tuple:
    order = {"single": 0, "astra": 1, "sp-fp32": 2, "sp-fp16": 3, "tp": 4}
    method = name.split(" ")[0]
    numbers = [int(x) for x in re.findall(r"G=(\d+)", name)]
    return order.get(method, 9), numbers, name


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        if row["method"] != "single":
            groups[(row["machine"], row["model"], row["N"], row["cores_per_rank"])].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])))


def fmt_latency(row: dict | None) -> str:
    if row is None:
        return ""
    text = f"{row['median_s']:.3g}"
    if row["runs"] > 1:
        text += f" ({row['p10_s']:.3g}–{row['p90_s']:.3g})"
    return text + ("" if row["runs"] >= 10 else f" [{row['runs']}]")


def fmt_speedup(row: dict | None) -> str:
    return "" if row is None or row["speedup_vs_single"] is None else f"{row['speedup_vs_single']:.2f}×"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def reproduce_commands(rows: list[dict]) -> list[str]:
    """One command per (method, link), with every bandwidth measured, from the rows' own commands."""
    merged: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        base = re.sub(r" --bandwidths \S+", "", row["command"])
        if row["bandwidth_mbps"] is not None:
            merged[base].append(row["bandwidth_mbps"])
        else:
            merged.setdefault(base, [])
    return [base + (" --bandwidths " + " ".join(f"{b:g}" for b in sorted(set(bws))) if bws else "") for base, bws in sorted(merged.items())]


def crossover(rows: list[dict], bandwidths: list[float]) -> list[str]:
    """For each full-precision method, the lowest bandwidth from which it is faster than the best ASTRA row."""
    lines = []
    for method in FULL_PRECISION:
        found = None
        for mbps in bandwidths:
            astra = [r["median_s"] for r in rows if r["method"] == "astra" and r["link"] == "real" and r["bandwidth_mbps"] == mbps]
            base = [r["median_s"] for r in rows if r["method"] == method and r["link"] == "real" and r["bandwidth_mbps"] == mbps]
            if astra and base and min(base) < min(astra):
                found = mbps
                break
        measured = [m for m in bandwidths if any(r["method"] == method and r["link"] == "real" and r["bandwidth_mbps"] == m for r in rows)]
        if not measured:
            continue
        lines.append(f"- {method}: " + (f"overtakes ASTRA at {found:g} Mbps" if found else f"slower than ASTRA at every measured bandwidth ({', '.join(f'{m:g}' for m in measured)} Mbps)"))
    return lines


def section(key: tuple, rows: list[dict], single: dict | None) -> str:
    machine, model, world, cores = key
    tokens = rows[0]["tokens"]
    bandwidths = sorted({r["bandwidth_mbps"] for r in rows if r["bandwidth_mbps"] is not None})
    by = {(variant(r), r["link"], r["bandwidth_mbps"]): r for r in rows}
    names = sorted({variant(r) for r in rows}, key=variant_order)
    threads = rows[0]["threads_per_rank"]
    dates = sorted({r["date"][:10] for r in rows} | ({single["date"][:10]} if single else set()))
    out = [f"### {model}, {tokens} tokens, N={world} — {machine}",
           f"{cores} core(s) and {threads} thread(s) per device; measured {', '.join(dates)}; "
           f"load average during the rows {min(r['load_average_1m'] for r in rows):.1f}–{max(r['load_average_1m'] for r in rows):.1f}."]  # fmt: skip
    if single:
        out.append(f"\nOne device: **{single['median_s']:.3g} s** (p10–p90 {single['p10_s']:.3g}–{single['p90_s']:.3g}, {single['runs']} runs; `{single['command']}`).")
    header = ["method", "link", "compute only", *[f"{b:g} Mbps" for b in bandwidths]]
    lines = []
    for name in names:
        for link in ("real", "simulated"):
            if any((name, link, b) in by for b in bandwidths):
                compute = by.get((name, "compute", None))
                lines.append([name, link, fmt_latency(compute) if link == "real" else "", *[fmt_latency(by.get((name, link, b))) for b in bandwidths]])
    out += ["\nLatency, seconds: median (p10–p90) [runs, when fewer than 10]", table(header, lines)]
    lines = []
    for name in names:
        compute = by.get((name, "compute", None))
        lines.append([name, "real", fmt_speedup(compute), *[fmt_speedup(by.get((name, "real", b))) for b in bandwidths]])
        if any((name, "simulated", b) in by for b in bandwidths):
            lines.append([name, "simulated", "", *[fmt_speedup(by.get((name, "simulated", b))) for b in bandwidths]])
    out += ["\nSpeed-up over one device (compute only: the ceiling with a free network)", table(header, lines)]
    lines = []
    for name in names:
        sample = next((r for r in rows if variant(r) == name and r["link"] == "real"), None) or next(r for r in rows if variant(r) == name)
        per_rank = [f"{t:.3g}" for t in by[(name, "compute", None)]["per_rank_median_s"]] if (name, "compute", None) in by else []
        lines.append([name, f"{sample['bytes_sent_per_rank'] / 1e6:.4g}",
                      "" if sample["wire_bytes_per_rank"] is None else f"{sample['wire_bytes_per_rank'] / 1e6:.4g}",
                      " / ".join(per_rank)])  # fmt: skip
    out += ["\nBytes per inference on the busiest rank's link (MB), and each rank's compute-only time (s)",
            table(["method", "payload sent", "on the wire (real link, headers included)", "compute only, rank 0 / 1 / …"], lines)]  # fmt: skip
    out += ["\nCrossover (real link):", *(crossover(rows, bandwidths) or ["- no full-precision method measured"])]
    out += ["\nReproduce:", "```", *reproduce_commands(rows + ([single] if single else [])), "```"]
    return "\n".join(out)


def shaping_section(results: Path) -> str:
    """The TCP goodput measured through each tbf rate (`python -m benchmarks.netns measure`)."""
    lines = []
    for path in sorted(results.glob("shaping*.json")):
        for row in json.loads(path.read_text()):
            shaped = "unshaped" if row["shaped_mbps"] is None else f"{row['shaped_mbps']:g}"
            lines.append([row.get("machine", ""), shaped, f"{row['measured_mbps']:g}", row["date"], f"`{row.get('command', '')}`"])
    if not lines:
        return ""
    return "### Shaped links: TCP goodput of one stream (Mbps)\n" + table(["machine", "tbf rate", "measured", "date", "command"], lines)


def profile_section(results: Path) -> str:
    """Per-layer and per-rank costs of ASTRA on one thread (`python -m benchmarks.profile_astra`)."""
    path = results / "astra_profile.json"
    if not path.exists():
        return ""
    rows = json.loads(path.read_text())
    ms = lambda seconds: f"{seconds * 1e3:.1f}"  # noqa: E731
    lines = [[str(r["N"]), str(r["G"]), r["quantize"], str(r["tokens_encoded"]), ms(r["encode_s"]), ms(r["encode_proposed_s"]),
              "yes" if r["proposed_codes_identical"] else "NO", ms(r["decode_and_project_last_rank_s"]), ms(r["block_on_shard_s"]),
              " / ".join(f"{t:.2f}" for t in r["rank_compute_s_overlap_false"]),
              " / ".join(f"{t:.2f}" for t in r["rank_compute_s_overlap_true"]),
              " / ".join(f"{t:.2f}" for t in r.get("rank_compute_s_table", [])),
              f"{r['single_device_s'] / max(r['rank_compute_s_overlap_false']):.2f}×",
              f"{r['single_device_s'] / max(r['rank_compute_s_table']):.2f}×" if r.get("rank_compute_s_table") else ""]
             for r in rows]  # fmt: skip
    first = rows[0]
    table_rows = [r for r in rows if "decode_project_table_s" in r]
    note = ""
    if table_rows:
        note = "\n\nHidden mode, G=1, last rank: decode + project K/V vs a gather from a precomputed table of each codeword's K/V " \
            "(same keys/values: " + ", ".join(f"N={r['N']}: {'yes' if r['table_matches'] else 'NO'}" for r in table_rows) + ")\n" + table(
            ["N", "decode + project ms/layer", "table gather ms/layer", "table MB/layer"],
            [[str(r["N"]), ms(r["decode_and_project_last_rank_s"]), ms(r["decode_project_table_s"]), f"{r['table_bytes_per_layer'] / 1e6:.1f}"] for r in table_rows],
        )  # fmt: skip
    return (
        f"### Where an ASTRA rank's time goes (GPT2, {first['tokens']} tokens, {first['threads']} thread, no network; "
        f"one device: {first['single_device_s']:.2f} s; {first['date']}; `{first['command']}`)\n"
        + table(["N", "G", "quantize", "tokens encoded", "encode ms/layer", "proposed encode ms/layer", "same codes",
                 "last rank: decode + project K/V ms/layer", "one block on the shard ms", "rank compute s (overlap off)",
                 "rank compute s (overlap on)", "rank compute s (projection tables, overlap off)",
                 "ceiling: one device / slowest rank", "ceiling with projection tables"], lines)  # fmt: skip
        + note
    )


def markdown(rows: list[dict], results: Path) -> str:
    singles = {(r["machine"], r["model"], r["cores_per_rank"]): r for r in rows if r["method"] == "single"}
    parts = [section(key, group, singles.get((key[0], key[1], key[3]))) for key, group in group_rows(rows).items()]
    parts += [shaping_section(results), profile_section(results)]
    return "\n\n".join(part for part in parts if part)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.8), squeeze=False)
    singles = {(r["machine"], r["model"], r["cores_per_rank"]): r for r in rows if r["method"] == "single"}
    names = sorted({variant(r) for r in rows if r["method"] != "single"}, key=variant_order)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per method, both links
    for ax, (key, group) in zip(axes[0], groups.items()):
        machine, model, world, cores = key
        for name in sorted({variant(r) for r in group}, key=variant_order):
            for link, style in (("real", "-o"), ("simulated", ":x")):
                points = sorted((r["bandwidth_mbps"], r["median_s"]) for r in group if variant(r) == name and r["link"] == link)
                if points:
                    ax.plot(*zip(*points), style, color=colors[name], label=f"{name} ({link})", alpha=1.0 if link == "real" else 0.7)
        single = singles.get((machine, model, cores))
        if single:
            ax.axhline(single["median_s"], color="black", linestyle="--", label="one device")
        ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbps)", ylabel="latency (s)",
               title=f"{model}, N={world}, {cores} core(s)/device\n{machine.split(':')[0]}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


JSON_KEYS = ("model", "tokens", "method", "N", "G", "quantize", "bandwidth_mbps", "link", "median_s", "p10_s", "p90_s",
             "bytes_sent_per_rank", "speedup_vs_single", "command")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, default=REPO / "docs/results/raw")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    rows = load_rows(args.raw)
    ordered = sorted(rows, key=lambda r: (r["machine"], r["model"], r["N"], variant_order(variant(r)), r["link"], r["bandwidth_mbps"] or 0))
    extra = [k for k in ordered[0] if k not in JSON_KEYS and k != "times_s"] if ordered else []
    results = [{**{k: r[k] for k in JSON_KEYS}, **{k: r.get(k) for k in extra}} for r in ordered]
    (args.docs / "results").mkdir(parents=True, exist_ok=True)
    (args.docs / "results/latency.json").write_text(json.dumps(results, indent=1) + "\n")
    page = args.docs / "benchmarks.md"
    text = page.read_text() if page.exists() else f"# Latency benchmark\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    page.write_text(f"{head}{START}\n{markdown(ordered, args.docs / 'results')}\n{END}{tail}")
    plot(ordered, args.docs / "benchmarks_latency.png")
    print(f"{len(results)} rows -> {args.docs / 'results/latency.json'}, {page}, {args.docs / 'benchmarks_latency.png'}")


if __name__ == "__main__":
    main()
