"""Turn the benchmark's raw rows (docs/results/raw/*.jsonl) into docs/results/latency.json, the tables of
docs/benchmarks.md (between its ``<!-- generated -->`` markers; the prose around them is kept),
docs/benchmarks_latency.png, and the speed/accuracy Pareto table (docs/results/pareto.json,
docs/benchmarks_pareto.png) that joins latency.json with docs/results/accuracy.json and controls.json.

    python -m benchmarks.report

A configuration measured twice keeps its latest row. A row with an interleaved one-device baseline
(``single_median_s``, measured between the row's own runs) divides that by its median; older rows
divide the single-device row of the same machine, model, tokens and cores per device.

Rows recorded before the benchmark ran the runtime's defaults (no ``settings`` field) were measured
with ``overlap=False`` and without projection tables; their labels say so.
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
KEY_FIELDS = ("machine", "model", "tokens", "label", "N", "bandwidth_mbps", "link", "loss_percent", "cores_per_rank")
# What the benchmark's ASTRA method ran before it used the runtime's defaults (commit eacb9b3 and earlier).
LEGACY_ASTRA = {"overlap": False, "projection_table": False, "codebook_size": 1024}


def upgrade(row: dict) -> dict:
    """Fill the fields that rows recorded by older versions of the benchmark lack, from what they ran."""
    row.setdefault("loss_percent", 0.0)
    if "label" not in row:
        if row["method"] == "astra":
            row["label"] = f"astra G={row['G']} {row['quantize']} overlap=False projection_table=False"
            row["settings"] = {"num_devices": row["N"], "groups": row["G"], "quantize": row["quantize"], **LEGACY_ASTRA}
            row["codebook_size"] = LEGACY_ASTRA["codebook_size"]
        else:
            row["label"] = row["method"]
    settings = row.get("settings") or {}
    if settings.get("shard_sizes") == "balanced" and "shards=" not in row["label"]:
        # Recorded while balanced shards were AstraConfig's default (2026-11-27, 16:40-17:10 UTC): a deviation now.
        row["label"] += " shards=balanced"
    return row


def load_rows(raw_dir: Path) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for path in sorted(raw_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = upgrade(json.loads(line))
                key = tuple(row.get(k) for k in KEY_FIELDS)
                if key not in latest or str(row.get("date") or "") >= str(latest[key].get("date") or ""):
                    latest[key] = row  # the newest measurement of a row, whatever file it is in
    rows = list(latest.values())
    add_speedups(rows)
    return rows


def single_key(row: dict) -> tuple:
    return row["machine"], row["model"], row["tokens"], row["cores_per_rank"]


def add_speedups(rows: list[dict]) -> None:
    single = {single_key(r): r["median_s"] for r in rows if r["method"] == "single"}
    for row in rows:
        reference = row.get("single_median_s") or single.get(single_key(row))
        row["speedup_vs_single"] = round(reference / row["median_s"], 3) if reference else None


def variant(row: dict) -> str:
    return row.get("label") or (row["method"] if row["G"] is None else f"astra G={row['G']} {row['quantize']}")


def link_name(row: dict) -> str:
    loss = row.get("loss_percent") or 0
    return row["link"] + (f", {loss:g} % loss" if loss else "")


def variant_order(name: str) -> tuple:
    order = {"single": 0, "astra": 1, "sp-fp32": 2, "sp-fp16": 3, "tp": 4}
    method = name.split(" ")[0]
    numbers = [int(x) for x in re.findall(r"G=(\d+)", name)]
    return order.get(method, 9), numbers, name


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        if row["method"] != "single":
            groups[(row["machine"], row["model"], row["tokens"], row["N"], row["cores_per_rank"])].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])))


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
    rows = [r for r in rows if not r["loss_percent"]]
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


def fmt_single(row: dict | None) -> str:
    if row is None or "single_median_s" not in row:
        return ""
    return f"{row['single_median_s']:.3g} ({row['single_p10_s']:.3g}–{row['single_p90_s']:.3g})"


def section(key: tuple, rows: list[dict], single: dict | None) -> str:
    machine, model, tokens, world, cores = key
    bandwidths = sorted({r["bandwidth_mbps"] for r in rows if r["bandwidth_mbps"] is not None})
    by = {(variant(r), link_name(r), r["bandwidth_mbps"]): r for r in rows}
    links = sorted({link_name(r) for r in rows if r["link"] != "compute"}, key=lambda name: (name.split(",")[0] != "real", name))
    names = sorted({variant(r) for r in rows}, key=variant_order)
    threads = rows[0]["threads_per_rank"]
    dates = sorted({r["date"][:10] for r in rows} | ({single["date"][:10]} if single else set()))
    out = [f"### {model}, {tokens} tokens, N={world} — {machine}",
           f"{cores} core(s) and {threads} thread(s) per device; measured {', '.join(dates)}; "
           f"load average during the rows {min(r['load_average_1m'] for r in rows):.1f}–{max(r['load_average_1m'] for r in rows):.1f}."]  # fmt: skip
    if single:
        out.append(f"\nOne device: **{single['median_s']:.3g} s** (p10–p90 {single['p10_s']:.3g}–{single['p90_s']:.3g}, {single['runs']} runs; `{single['command']}`).")
    header = ["method", "link", "compute only", *[f"{b:g} Mbps" for b in bandwidths]]
    def grid(fmt) -> list[list[str]]:
        lines = []
        for name in names:
            compute = by.get((name, "compute", None))
            shown = [link for link in links if any((name, link, b) in by for b in bandwidths)] or (["real"] if compute else [])
            for link in shown:
                lines.append([name, link, fmt(compute) if link == "real" else "", *[fmt(by.get((name, link, b))) for b in bandwidths]])
        return lines

    out += ["\nLatency, seconds: median (p10–p90) [runs, when fewer than 10]", table(header, grid(fmt_latency))]
    out += ["\nSpeed-up over one device (compute only: the ceiling with a free network; rows with an interleaved "
            "baseline divide by it, the others by the one-device row above)", table(header, grid(fmt_speedup))]  # fmt: skip
    if any("single_median_s" in r for r in rows):
        out += ["\nThe row's own one-device baseline, measured between its runs: median (p10–p90) s", table(header, grid(fmt_single))]
    lines = []
    for name in names:
        sample = next((r for r in rows if variant(r) == name and r["link"] == "real"), None) or next(r for r in rows if variant(r) == name)
        per_rank = [f"{t:.3g}" for t in by[(name, "compute", None)]["per_rank_median_s"]] if (name, "compute", None) in by else []
        lines.append([name, f"{sample['bytes_sent_per_rank'] / 1e6:.4g}",
                      "" if sample["wire_bytes_per_rank"] is None else f"{sample['wire_bytes_per_rank'] / 1e6:.4g}",
                      " / ".join(per_rank)])  # fmt: skip
    out += ["\nBytes per inference on the busiest rank's link (MB), and each rank's compute-only time (s)",
            table(["method", "payload sent", "on the wire (real link, headers included)", "compute only, rank 0 / 1 / …"], lines)]  # fmt: skip
    waits = waits_table(rows)
    if waits:
        out += ["\nWhere each rank's time went (ASTRA rows recorded with the runtime's timings): medians over the runs of the "
                "seconds each rank was blocked waiting for its peers and of the rest (compute: its forward's wall time "
                "minus the waits), the slowest rank's waits by kind, and its code waits layer by layer", waits]  # fmt: skip
    loaded = loaded_table(rows)
    if loaded:
        out += ["\nThe one device also timed with the host loaded like the ranks' (`--loaded-baseline`: the other ranks' cores "
                "run the one-device forward on a rank's share of the tokens meanwhile; `run_latency.HostLoad`): the N ranks of "
                "this emulation share one host, separate devices would not. Medians (p10–p90) s", loaded]  # fmt: skip
    lossy = sorted((r for r in rows if r["loss_percent"]), key=lambda r: (variant_order(variant(r)), r["loss_percent"]))
    if lossy:
        lines = [[variant(r), f"{r['bandwidth_mbps']:g}", f"{r['loss_percent']:g} %", str(r["runs"] + r["warmup"]),
                  str(r.get("dropped_packets")), f"{r['speedup_vs_single']:.2f}×" if r["speedup_vs_single"] else "",
                  f"{r['speedup_pairs_p10']:.2f}–{r['speedup_pairs_p90']:.2f}" if "speedup_pairs_p10" in r else ""] for r in lossy]  # fmt: skip
        out += ["\nPacket loss: packets the iptables rules dropped during the row (all ranks, warm-up included), and the "
                "speed-up with the spread of the run-by-run ratios against the interleaved one device",
                table(["method", "Mbps", "loss", "runs", "dropped packets", "speed-up", "run-by-run p10–p90"], lines)]  # fmt: skip
    out += ["\nCrossover (real link):", *(crossover(rows, bandwidths) or ["- no full-precision method measured"])]
    out += ["\nReproduce:", "```", *reproduce_commands(rows + ([single] if single else [])), "```"]
    return "\n".join(out)


def loaded_table(rows: list[dict]) -> str:
    """Rows with a loaded one-device baseline (`run_latency --loaded-baseline`); empty when none has one."""
    measured = sorted((r for r in rows if "single_loaded_median_s" in r),
                      key=lambda r: (variant_order(variant(r)), link_name(r), r["bandwidth_mbps"] or 0))  # fmt: skip
    span = lambda r, key: f"{r[key + '_median_s']:.3g} ({r[key + '_p10_s']:.3g}–{r[key + '_p90_s']:.3g})"  # noqa: E731
    lines = [[variant(r), link_name(r), "" if r["bandwidth_mbps"] is None else f"{r['bandwidth_mbps']:g}",
              f"{r['median_s']:.3g} ({r['p10_s']:.3g}–{r['p90_s']:.3g})", span(r, "single"), span(r, "single_loaded"),
              f"{r['speedup_vs_single']:.2f}×", f"{r['speedup_vs_loaded_single']:.2f}×",
              f"{r['host_load']['processes']} × {r['host_load']['forwards']} forwards of {r['host_load']['tokens'] or 'all'} tokens, "
              f"{r['host_load']['forward_median_s']:.3g} s each"] for r in measured]  # fmt: skip
    if not lines:
        return ""
    return table(["method", "link", "Mbps", "method s", "one device alone s", "one device, host loaded s",
                  "speed-up vs alone", "speed-up vs loaded", "the load"], lines)  # fmt: skip


def waits_table(rows: list[dict]) -> str:
    """The rows' wait breakdowns (`run_latency.wait_breakdown`); empty when no row has one (older rows)."""
    timed = sorted((r for r in rows if "per_rank_waited_s" in r),
                   key=lambda r: (variant_order(variant(r)), link_name(r), r["bandwidth_mbps"] or 0))  # fmt: skip
    lines = []
    for r in timed:
        slowest = r["slowest_rank"]
        kinds = {kind: seconds for kind, seconds in r["per_rank_waited_by_kind_s"][slowest].items() if seconds >= 5e-4}
        lines.append([variant(r), link_name(r), "" if r["bandwidth_mbps"] is None else f"{r['bandwidth_mbps']:g}",
                      " / ".join(f"{w:.3f}" for w in r["per_rank_waited_s"]), " / ".join(f"{c:.3f}" for c in r["per_rank_compute_s"]),
                      f"{slowest}: " + (", ".join(f"{kind} {seconds:.3f}" for kind, seconds in kinds.items()) or "all < 0.5 ms"),
                      " ".join(f"{seconds * 1e3:.0f}" for seconds in r["slowest_rank_codes_wait_per_layer_s"])])  # fmt: skip
    if not lines:
        return ""
    return table(["method", "link", "Mbps", "waited s, rank 0 / 1 / …", "compute s, rank 0 / 1 / …",
                  "slowest rank: its waits by kind, s", "its code waits per layer, ms"], lines)  # fmt: skip


def shaping_section(results: Path) -> str:
    """The TCP goodput measured through each tbf rate (`python -m benchmarks.netns measure`)."""
    lines = []
    for path in sorted(results.glob("shaping*.json")):
        for row in json.loads(path.read_text()):
            shaped = "unshaped" if row["shaped_mbps"] is None else f"{row['shaped_mbps']:g}"
            loss = f"{row['loss_percent']:g} %" if row.get("loss_percent") else ""
            lines.append([row.get("machine", ""), shaped, loss, f"{row['measured_mbps']:g}", row["date"], f"`{row.get('command', '')}`"])
    if not lines:
        return ""
    return "### Shaped links: TCP goodput of one stream (Mbps)\n" + table(["machine", "tbf rate", "loss per frame", "measured", "date", "command"], lines)


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
    singles = {single_key(r): r for r in rows if r["method"] == "single"}
    parts = [section(key, group, singles.get((key[0], key[1], key[2], key[4]))) for key, group in group_rows(rows).items()]
    parts += [shaping_section(results), profile_section(results)]
    return "\n\n".join(part for part in parts if part)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.8), squeeze=False)
    singles = {single_key(r): r for r in rows if r["method"] == "single"}
    names = sorted({variant(r) for r in rows if r["method"] != "single"}, key=variant_order)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per method, both links
    for ax, (key, group) in zip(axes[0], groups.items()):
        machine, model, tokens, world, cores = key
        for name in sorted({variant(r) for r in group}, key=variant_order):
            for link, style in (("real", "-o"), ("simulated", ":x")):
                points = sorted((r["bandwidth_mbps"], r["median_s"]) for r in group
                                if variant(r) == name and r["link"] == link and not r["loss_percent"])  # fmt: skip
                if points:
                    ax.plot(*zip(*points), style, color=colors[name], label=f"{name} ({link})", alpha=1.0 if link == "real" else 0.7)
        single = singles.get((machine, model, tokens, cores))
        if single:
            ax.axhline(single["median_s"], color="black", linestyle="--", label="one device")
        ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbps)", ylabel="latency (s)",
               title=f"{model} {tokens} tokens, N={world}, {cores} core(s)/device\n{machine.split(':')[0]}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


JSON_KEYS = ("model", "tokens", "method", "label", "N", "G", "quantize", "codebook_size", "settings", "bandwidth_mbps",
             "link", "loss_percent", "median_s", "p10_s", "p90_s", "bytes_sent_per_rank", "speedup_vs_single", "machine",
             "command")  # fmt: skip


# ------------------------------------------------------------------------------------------- Pareto
PARETO_BANDWIDTH_MBPS = 10.0
PARETO_KEYS = ("model", "N", "bandwidth_mbps", "G", "quantize", "codebook_size", "speedup_vs_single", "metric", "value",
               "base_value", "control_value", "latency_command", "accuracy_command")  # fmt: skip
LOWER_IS_BETTER = {"perplexity"}


def model_family(name: str) -> str | None:
    """gpt2 / vit / llama from a latency workload or an accuracy row's model path (e.g. outputs/gpt2-base)."""
    for family in ("gpt2", "vit", "llama"):
        if family in name.lower():
            return family
    return None


def load_accuracy(results: Path) -> tuple[list[dict], list[dict]]:
    """(ASTRA accuracy rows, control rows) of docs/results/accuracy.json and controls.json (empty if absent)."""
    read = lambda name: json.loads((results / name).read_text()) if (results / name).exists() else []  # noqa: E731
    return read("accuracy.json"), read("controls.json")


def accuracy_change(row: dict, reference: float | None) -> float | None:
    """Relative change in % for perplexity-like metrics (lower is better), points for accuracy."""
    if reference is None:
        return None
    if row["metric"] in LOWER_IS_BETTER:
        return 100.0 * (row["value"] - reference) / reference
    return row["value"] - reference


HEADLINE_RUN = re.compile(r"(gpt2|vit|llama)-g\d+-(hidden|kv)(-k\d+)?")  # -kN: the same fine-tuning with a codebook of N


def is_headline_accuracy_row(row: dict) -> bool:
    """The plain fine-tuning of a (model, G, quantize) evaluated as it was fine-tuned: its own N, even shards, the
    training data's test split, this campaign (not an ablation, an N-agnostic run, another layout or dataset)."""
    if not HEADLINE_RUN.fullmatch(row.get("run", "")) or row.get("campaign", "current") != "current":
        return False
    if row.get("eval_num_devices", row["N"]) != row["N"] or row.get("eval_shard_sizes"):
        return False
    return row.get("eval_dataset", f"{row.get('dataset')}:test") == f"{row.get('dataset')}:test"


def pareto_rows(latency: list[dict], accuracy: tuple[list[dict], list[dict]]) -> list[dict]:
    """Every ASTRA latency row at 10 Mbps (real link, no loss) joined with the accuracy row of the same model
    family, N, G, quantize and K (the plain run: no ablation of NAQ, DCT or beta), and that family's control."""
    rows, controls = accuracy
    plain = [r for r in rows if is_headline_accuracy_row(r)]
    control_of = {(model_family(c["model"]), c["N"]): c for c in controls}
    out = []
    for lat in latency:
        if lat["method"] != "astra" or lat["link"] != "real" or lat["bandwidth_mbps"] != PARETO_BANDWIDTH_MBPS or lat["loss_percent"]:
            continue
        codebook = lat.get("codebook_size") or 1024
        for acc in plain:
            if (model_family(acc["model"]), acc["N"], acc["G"], acc["quantize"], acc["K"]) != (lat["model"], lat["N"], lat["G"], lat["quantize"], codebook):
                continue
            control = control_of.get((lat["model"], acc["N"]))
            control_value = acc.get("control_value", control["value"] if control else None)
            row = {
                "model": lat["model"], "N": lat["N"], "bandwidth_mbps": lat["bandwidth_mbps"], "G": lat["G"],
                "quantize": lat["quantize"], "codebook_size": codebook, "speedup_vs_single": lat["speedup_vs_single"],
                "metric": acc["metric"], "value": acc["value"], "base_value": acc["base_value"],
                "control_value": control_value,
                "latency_command": lat["command"], "accuracy_command": acc.get("command") or (acc.get("commands") or [None])[0],
                "latency_label": lat["label"], "machine": lat["machine"], "latency_median_s": lat["median_s"],
                "accuracy_model": acc["model"], "accuracy_hardware": acc.get("hardware"),
                "accuracy_seeds": acc.get("seeds"), "accuracy_std": acc.get("std"),
            }  # fmt: skip
            row["change_vs_base"] = accuracy_change(acc, acc["base_value"])
            row["change_vs_control"] = accuracy_change(acc, row["control_value"])
            out.append(row)
    mark_frontier(out)
    return sorted(out, key=lambda r: (r["model"], r["machine"], -(r["speedup_vs_single"] or 0)))


def mark_frontier(rows: list[dict]) -> None:
    """``pareto_optimal``: no other row of the same model and machine is at least as fast and at least as accurate."""
    def quality(r):
        return -r["value"] if r["metric"] in LOWER_IS_BETTER else r["value"]

    for row in rows:
        rivals = [o for o in rows if o is not row and (o["model"], o["machine"]) == (row["model"], row["machine"])]
        row["pareto_optimal"] = row["speedup_vs_single"] is not None and not any(
            o["speedup_vs_single"] is not None and o["speedup_vs_single"] >= row["speedup_vs_single"] and quality(o) >= quality(row)
            and (o["speedup_vs_single"] > row["speedup_vs_single"] or quality(o) > quality(row))
            for o in rivals
        )


def fmt_change(row: dict, key: str) -> str:
    value = row[key]
    if value is None:
        return ""
    return f"{value:+.2f} %" if row["metric"] in LOWER_IS_BETTER else f"{value:+.2f} pt"


def pareto_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [[r["model"], str(r["N"]), f"G={r['G']} {r['quantize']} K={r['codebook_size']}", r["latency_label"],
              f"{r['speedup_vs_single']:.2f}×" if r["speedup_vs_single"] else "", f"{r['metric']} {r['value']:.4g}",
              fmt_change(r, "change_vs_base"), fmt_change(r, "change_vs_control"), "yes" if r["pareto_optimal"] else "",
              machine_kind(r["machine"])]
             for r in rows]  # fmt: skip
    return (
        "### Speed against accuracy (Pareto), 10 Mbps real links\n"
        "Each ASTRA latency row at 10 Mbps joined with the accuracy row of the same model family, N, G, quantize and K "
        "(`docs/results/accuracy.json`; its models are the small fine-tuned ones of docs/results.md, the latency "
        "workloads the full-size shapes with random weights). Change vs base / control: perplexity in % (lower is "
        "better), accuracy in points. Pareto: no other row of the same model and machine is both at least as fast and "
        "at least as accurate. Also in `docs/results/pareto.json` and `docs/benchmarks_pareto.png`.\n"
        + table(["model", "N", "setting", "latency row", "speed-up at 10 Mbps", "measured", "vs base", "vs control", "Pareto", "machine"], lines)
        + "\n\n![Speed-up at 10 Mbps against the accuracy change vs the control, per model](benchmarks_pareto.png)"
    )


def machine_kind(label: str) -> str:
    """A machine label's kind, before its ":" ("GPU host (nvidia-h100/h200 kind, CPU cores only)"): hosts and calls share it."""
    return label.split(":")[0]


def plot_pareto(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        # One marker per kind of machine (the label before its ":"; hosts of a kind and their calls share it), so that
        # every row is drawn however many hosts and calls there are.
        kinds = sorted({machine_kind(r["machine"]) for r in rows if r["model"] == model})
        for index, kind in enumerate(kinds):
            marker = "os^Dv<>P"[index % 8]
            points = [r for r in rows if r["model"] == model and machine_kind(r["machine"]) == kind and r["change_vs_control"] is not None]
            for r in points:
                ax.scatter(r["change_vs_control"], r["speedup_vs_single"], marker=marker, color="C0" if r["pareto_optimal"] else "C7")
                size = "" if r["codebook_size"] in (None, 1024) else f" K={r['codebook_size']}"
                ax.annotate(f"G={r['G']} {r['quantize']}{size}", (r["change_vs_control"], r["speedup_vs_single"]), fontsize=6)
            ax.scatter([], [], marker=marker, color="C7", label=kind)
        metric = next(r["metric"] for r in rows if r["model"] == model)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set(xlabel=f"{metric} change vs control ({'%' if metric in LOWER_IS_BETTER else 'points'})",
               ylabel="speed-up over one device at 10 Mbps", title=f"{model}: speed against accuracy (blue: Pareto)")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, default=REPO / "docs/results/raw")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    rows = load_rows(args.raw)
    ordered = sorted(rows, key=lambda r: (r["machine"], r["model"], r["tokens"], r["N"], variant_order(variant(r)), r["link"],
                                          r["bandwidth_mbps"] or 0, r["loss_percent"]))  # fmt: skip
    extra = sorted({k for r in ordered for k in r if k not in JSON_KEYS and k not in ("times_s", "single_times_s")})
    results = [{**{k: r.get(k) for k in JSON_KEYS}, **{k: r[k] for k in extra if k in r}} for r in ordered]
    (args.docs / "results").mkdir(parents=True, exist_ok=True)
    (args.docs / "results/latency.json").write_text(json.dumps(results, indent=1) + "\n")
    page = args.docs / "benchmarks.md"
    text = page.read_text() if page.exists() else f"# Latency benchmark\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    accuracy = load_accuracy(args.docs / "results")
    front = pareto_rows(results, accuracy)
    (args.docs / "results/pareto.json").write_text(json.dumps(front, indent=1) + "\n")
    body = "\n\n".join(part for part in (pareto_section(front), markdown(ordered, args.docs / "results")) if part)
    page.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # e.g. on a GPU host without it: tables and JSON only
        print("matplotlib is not installed: plots not redrawn")
    else:
        plot(ordered, args.docs / "benchmarks_latency.png")
        plot_pareto(front, args.docs / "benchmarks_pareto.png")
    print(f"{len(results)} rows -> {args.docs / 'results/latency.json'}, {page}, {args.docs / 'benchmarks_latency.png'}; "
          f"{len(front)} Pareto rows -> {args.docs / 'results/pareto.json'}, {args.docs / 'benchmarks_pareto.png'}")


if __name__ == "__main__":
    main()
