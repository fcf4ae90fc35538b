"""The accuracy tables of docs/results.md: train the base models, run every ASTRA fine-tuning, write the report.

    python examples/accuracy_sweep.py bases  --out outputs            # outputs/vit-base, outputs/gpt2-base
    python examples/accuracy_sweep.py run    --out outputs --jobs 8   # outputs/sweep/<run>/result.json
    python examples/accuracy_sweep.py report --out outputs            # docs/results.md, docs/results/accuracy.json

``run`` starts the fine-tunings of `RUNS` as concurrent processes (several small trainings share one GPU),
skips those that already have a result, and stops at ``--deadline`` seconds. Every result row records the
exact finetune_astra.py command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = Path("examples")
DOCS = REPO / "docs"

BASE_COMMANDS = {
    "vit": ["--task", "vit", "--layers", "6", "--width", "192", "--epochs", "20", "--save-dtype", "float16"],
    "gpt2": ["--task", "gpt2", "--layers", "6", "--width", "256", "--epochs", "12", "--save-dtype", "float16"],
}
FINETUNE_EPOCHS = {"vit": "8", "gpt2": "3"}
SAVED_RUNS = ("vit-g32-hidden", "gpt2-g32-hidden")  # fine-tuned checkpoints kept (save_pretrained)
ABLATIONS = {  # run-name suffix -> finetune_astra.py flags; on top of G=1, hidden, lambda=1, beta=1e-4, DCT
    "naq0": ["--noise-scale", "0"],
    "naq0.3": ["--noise-scale", "0.3"],
    "nodct": ["--no-distributed-cls"],
    "beta0": ["--commitment-weight", "0"],
    "beta0.25": ["--commitment-weight", "0.25"],
}


def plan() -> dict[str, list[str]]:
    """Run name -> finetune_astra.py arguments (paths relative to --out). Targets first, ablations last."""
    runs: dict[str, list[str]] = {}
    for groups in ("32", "1", "8"):
        for task in ("vit", "gpt2"):
            for quantize in ("hidden", "kv"):
                runs[f"{task}-g{groups}-{quantize}"] = finetune_args(task, ["--groups", groups, "--quantize", quantize])
    for task in ("vit", "gpt2"):
        for suffix, flags in ABLATIONS.items():
            if suffix == "nodct" and task != "vit":
                continue  # GPT2 has no class token
            runs[f"{task}-g1-hidden-{suffix}"] = finetune_args(task, ["--groups", "1", "--quantize", "hidden", *flags])
    return runs


def finetune_args(task: str, flags: list[str]) -> list[str]:
    return ["--task", task, "--base", f"{task}-base", "--epochs", FINETUNE_EPOCHS[task], "--num-devices", "4", *flags]


def command_for(out: Path, name: str, args: list[str], workers: int) -> list[str]:
    resolved = [str(out / value) if previous == "--base" else value for previous, value in zip(["", *args], args)]
    extra = ["--save", "--save-dtype", "float16"] if name in SAVED_RUNS else []
    return [sys.executable, str(EXAMPLES / "finetune_astra.py"), *resolved, "--output-dir", str(out / "sweep" / name),
            "--workers", str(workers), *extra]


def run_all(commands: dict[str, list[str]], logs: Path, jobs: int, deadline: float) -> dict[str, int | None]:
    """Run ``commands`` (name -> argv) at most ``jobs`` at a time; kill what still runs at ``deadline``."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, returncodes = list(commands), {}, {}
    start = time.monotonic()
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            with open(logs / f"{name}.log", "w") as log:
                running[name] = subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            print(f"[{time.monotonic() - start:6.0f}s] start {name}", flush=True)
        for name, process in list(running.items()):
            if process.poll() is not None:
                returncodes[name] = process.returncode
                del running[name]
                print(f"[{time.monotonic() - start:6.0f}s] done  {name} rc={process.returncode}", flush=True)
        if time.monotonic() - start > deadline:
            for name, process in running.items():
                process.kill()
                returncodes[name] = None
                print(f"deadline: killed {name}", flush=True)
            returncodes.update({name: None for name in pending})
            break
        time.sleep(1)
    return returncodes


def cmd_bases(args) -> None:
    out = Path(args.out)
    commands = {
        f"{task}-base": [sys.executable, str(EXAMPLES / "train_base.py"), *flags, "--output-dir", str(out / f"{task}-base"),
                         "--max-minutes", str(args.max_minutes)]
        for task, flags in BASE_COMMANDS.items()
    }
    codes = run_all(commands, out / "logs", jobs=2, deadline=args.max_minutes * 60 + 120)
    if any(code != 0 for code in codes.values()):
        raise SystemExit(f"base training failed: {codes}")


def cmd_run(args) -> None:
    out = Path(args.out)
    runs = plan()
    selected = [name for name in runs if not args.only or name in args.only]
    todo = {name: command_for(out, name, runs[name], args.workers) for name in selected
            if not (out / "sweep" / name / "result.json").is_file()}
    codes = run_all(todo, out / "logs", args.jobs, args.deadline)
    print(json.dumps(codes, indent=1))


# --- report -----------------------------------------------------------------------------------------------


def load_rows(out: Path) -> tuple[list[dict], dict[str, dict]]:
    rows = [json.loads(path.read_text()) for path in sorted((out / "sweep").glob("*/result.json"))]
    bases = {path.parent.name: json.loads(path.read_text()) for path in sorted(out.glob("*-base/base_result.json"))}
    names = list(plan())
    rows.sort(key=lambda row: names.index(run_name(row)) if run_name(row) in names else len(names))
    return rows, bases


def run_name(row: dict) -> str:
    return Path(shlex.split(row["command"])[shlex.split(row["command"]).index("--output-dir") + 1]).name


def change(row: dict) -> str:
    if row["metric"] == "accuracy":
        return f"{row['value'] - row['base_value']:+.2f} pts"
    return f"{100 * (row['value'] / row['base_value'] - 1):+.1f}%"


def table_row(row: dict) -> str:
    fmt = "{:.2f}"
    cells = [
        run_name(row), row["dataset"], str(row["N"]), str(row["G"]), row["quantize"], f"{row['noise_scale']:g}",
        "on" if row["distributed_cls"] else "off" if row["task"] == "vit" else "n/a", f"{row['commitment_weight']:g}",
        row["metric"], fmt.format(row["base_value"]), fmt.format(row["value_before_finetune"]), fmt.format(row["value"]),
        change(row), str(row["bits_per_token"]), f"{row['compression_ratio']:.1f}x", f"{row['finetune_seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| run | dataset | N | G | quantize | λ | DCT | β | metric | base | ASTRA before FT | ASTRA after FT | change "
    "| bits/token | compression | FT seconds |\n" + "|---" * 16 + "|"
)


def json_row(row: dict) -> dict:
    keys = ("model", "dataset", "N", "G", "K", "quantize", "noise_scale", "distributed_cls", "commitment_weight", "metric",
            "value", "base_value", "value_before_finetune", "bits_per_token", "compression_ratio", "hidden_size",
            "epochs", "train_steps", "finetune_seconds", "hardware", "date", "code_stats", "command")
    return {"run": run_name(row), **{key: row[key] for key in keys}}


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the rows."""
    lines = []
    checks = [("vit", 32, "within 0.5 points of base", lambda r: r["value"] - r["base_value"] >= -0.5),
              ("vit", 1, "within 2.5 points of base", lambda r: r["value"] - r["base_value"] >= -2.5),
              ("gpt2", 32, "perplexity within +8% of base", lambda r: r["value"] <= 1.08 * r["base_value"])]
    for task, groups, goal, check in checks:
        for row in rows:
            if run_name(row) == f"{task}-g{groups}-{row['quantize']}":
                verdict = "met" if check(row) else "MISSED"
                lines.append(f"- {task.upper()} G={groups} {row['quantize']}: {goal} -> {change(row)}: **{verdict}**")
    return lines


def cmd_report(args) -> None:
    out = Path(args.out)
    rows, bases = load_rows(out)
    if not rows:
        raise SystemExit(f"no results under {out / 'sweep'}")
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    (DOCS / "results" / "accuracy.json").write_text(json.dumps([json_row(row) for row in rows], indent=1) + "\n")
    main_rows = [row for row in rows if run_name(row).count("-") == 2]
    ablation_rows = [row for row in rows if run_name(row).count("-") > 2]
    reference = {task: next(r for r in rows if r["task"] == task and run_name(r) == f"{task}-g1-hidden")
                 for task in ("vit", "gpt2") if any(run_name(r) == f"{task}-g1-hidden" for r in rows)}
    lines = [args.preamble.read_text().rstrip() + "\n" if args.preamble else "", "## Base models\n",
             "| model | dataset | metric (test) | parameters | training seconds | hardware | command |", "|---" * 7 + "|"]
    for name, base in bases.items():
        lines.append(f"| {base['model']} | {base['dataset']} | {base['metric']} {base['value']:.2f} | {base['parameters']:,} "
                     f"| {base['train_seconds']:.0f} | {base['hardware']} | `{base['command']}` |")
    lines += ["", "## ASTRA fine-tuning, N = 4, K = 1024\n", HEADER, *map(table_row, main_rows)]
    if ablation_rows:
        lines += ["", "## Ablations (G = 1, hidden; one change each from the G=1 hidden row)\n", HEADER]
        lines += [table_row(reference[task]) for task in reference] + list(map(table_row, ablation_rows))
    lines += ["", "## Targets\n", *targets(rows), "", "## Commands\n",
              "Every row above, in order (run from the repository root after the base models exist):", "", "```"]
    lines += [row["command"] for row in rows] + ["```", ""]
    hardware = sorted({row["hardware"] for row in rows})
    dates = sorted({row["date"] for row in rows})
    lines.append(f"Fine-tuning hardware: {', '.join(hardware)}; dates: {', '.join(dates)}. "
                 f"Written by `python examples/accuracy_sweep.py report --out {args.out}`.")
    (DOCS / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'results.md'} and {DOCS / 'results' / 'accuracy.json'} ({len(rows)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bases = commands.add_parser("bases", help="train the base ViT and GPT2 (concurrently)")
    bases.add_argument("--out", default="outputs")
    bases.add_argument("--max-minutes", type=float, default=5.0, help="stop base training after this long")
    run = commands.add_parser("run", help="run the fine-tunings that have no result yet")
    run.add_argument("--out", default="outputs")
    run.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="concurrent fine-tunings")
    run.add_argument("--workers", type=int, default=1, help="dataloader workers per fine-tuning")
    run.add_argument("--deadline", type=float, default=float("inf"), help="seconds; kill what still runs then")
    run.add_argument("--only", nargs="*", help="run names (see `plan`)")
    report = commands.add_parser("report", help="write docs/results.md and docs/results/accuracy.json")
    report.add_argument("--out", default="outputs")
    report.add_argument("--preamble", type=Path, help="Markdown put before the tables")
    commands.add_parser("plan", help="print the run names and their arguments")
    args = parser.parse_args()
    if args.command == "plan":
        for name, run_args in plan().items():
            print(name, shlex.join(run_args))
        return
    {"bases": cmd_bases, "run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
