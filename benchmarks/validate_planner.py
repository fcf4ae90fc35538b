"""The planner (`transformers_astra.plan`) against the measured latency rows.

    # on each benchmark machine, with the cores and threads of one benchmark rank:
    taskset -c 0 python -m benchmarks.validate_planner calibrate --workload gpt2 --threads 1 --machine "LABEL"
    # a benchmark host whose N ranks share it: probe all ranks of each N at once, each on its own 2 cores
    python -m benchmarks.validate_planner calibrate --workload gpt2 --threads 2 --colocated 2 --machine "LABEL" --out DIR
    # anywhere: predict every row of docs/results/latency.json that has a profile of its machine and threads
    python -m benchmarks.validate_planner validate
    # shard sizes that balance the predicted per-rank compute (for --shard-sizes of benchmarks.run_latency)
    python -m benchmarks.validate_planner balance --workload gpt2 --n 4 --groups 1 --quantize hidden
    # do rank overheads fitted at some N predict other N? Loopback ranks at each N, fitted on subsets, predicted all
    taskset -c 0 python -m benchmarks.validate_planner held-out --workload gpt2 --threads 1 --machine "LABEL" \
        --devices 2 4 6 8 --fit 4 8 --out docs/results/raw/planner-held-out-LABEL.json

Profiles live in docs/results/device_profiles/*.json (one per machine label, workload and threads; the
label must be the rows' ``machine``). `validate` writes docs/results/planner_validation.json and
docs/planner.md: per row the measured median, the prediction and the error, and per machine and model
the median absolute error and the share of rows within 20 %.

Link models per row: ``compute`` rows (no network) get an unlimited link; ``simulated`` rows the
paper's bytes/bandwidth sleep (no efficiency loss, no per-message cost); ``real`` rows the default
`LinkModel` (its loss when the row has loss). Rows recorded with ``projection_table=False`` are
predicted without tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from transformers_astra import AstraConfig
from transformers_astra import patch, unpatch
from transformers_astra.planner import (GROUPS, PROBE_DEVICES, DeviceProfile, LinkModel, RankProbe, _interleaved_best,
                                       balanced_shard_sizes, calibrate_device, fit_rank_overheads, loopback_rank_forward,
                                       predict_astra, predict_baseline, probe_ranks, probed_at, rank_compute_s)  # fmt: skip

from .workloads import build

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "docs/results/device_profiles"
UNLIMITED_MBPS = 1e9
DEFAULT_K = AstraConfig().codebook_size


def machine_key(label: str) -> str:
    """A machine label without its parenthesised notes: "dev VM (shared ...): AMD EPYC, 2 cores" -> "dev VM: AMD EPYC, 2 cores"."""
    name, _, cpu = label.partition(":")
    return f"{name.split(' (')[0].strip()}: {cpu.strip()}"


def machine_tag(label: str) -> str:
    """What follows a ';' in a machine label (gpu_host.sh's MACHINE_TAG: one host of a kind, one call), or ""."""
    return label.partition(";")[2].strip()


def slug(text: str, length: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length]


def profile_path(directory: Path, machine: str, workload: str, threads: int, codebook_size: int = DEFAULT_K) -> Path:
    """The machine's name before its ':' names the file; a tag after a ';' (gpu_host.sh's MACHINE_TAG: one host of a
    kind, one call) is added, so that a tagged host's profile does not replace its kind's."""
    k = "" if codebook_size == DEFAULT_K else f"-k{codebook_size}"
    tag = machine_tag(machine)
    return directory / f"{workload}-{threads}t{k}-{slug(machine.split(':')[0])}{'-' + slug(tag, 40) if tag else ''}.json"


def load_profiles(directory: Path, commands: dict | None = None) -> dict[tuple, DeviceProfile]:
    """Profiles by (machine key, workload, threads, codebook size K); ``commands``, if given, gets each one's command."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        values = json.loads(path.read_text())
        profile = DeviceProfile.from_dict(values["profile"])
        key = (machine_key(values["machine"]), values["workload"], profile.threads, profile.codebook_size)
        out[key] = profile
        if commands is not None:
            commands[key] = values.get("command", "")
    return out


def machine_of(row: dict) -> tuple:
    """A row's (machine, model, threads): a profile's key (`load_profiles`) without its codebook size."""
    return machine_key(row["machine"]), row["model"], row.get("threads_per_rank")


def link_for(row: dict) -> LinkModel:
    if row["link"] in ("compute", "none") or row["bandwidth_mbps"] is None:
        return LinkModel(UNLIMITED_MBPS, per_message_s=0.0)
    if row["link"] == "simulated":
        return LinkModel(row["bandwidth_mbps"], bulk_efficiency=1.0, small_efficiency=1.0, per_message_s=0.0)
    return LinkModel(row["bandwidth_mbps"], loss_percent=row.get("loss_percent") or 0.0)


def prediction_of_row(profile: DeviceProfile, row: dict):
    link = link_for(row)
    if row["method"] == "astra":
        settings = row.get("settings") or {}
        config = AstraConfig(num_devices=row["N"], groups=row["G"], quantize=row["quantize"],
                             codebook_size=row.get("codebook_size") or 1024, shard_sizes=settings.get("shard_sizes"))  # fmt: skip
        table = settings.get("projection_table", False)  # rows without settings predate the tables
        return predict_astra(profile, config, row["tokens"], link, projection_table=table)
    return predict_baseline(profile, row["method"], row["tokens"], row["N"], link)


def rank_compute_error(row: dict, predicted_compute: list[float], own_scale: float | None) -> float | None:
    """Median over the ranks of (measured compute / (predicted compute × own scale) - 1): the ranks' own compute
    (`DistributedRuntime.timings`: wall time less waits for peers, rows' ``per_rank_compute_s``) against the model's,
    scaled as the row's own one device is against the predicted one (the machine's speed in that run)."""
    measured = row.get("per_rank_compute_s")
    if not measured or own_scale is None or len(measured) != len(predicted_compute):
        return None
    return statistics.median(m / (p * own_scale) - 1 for m, p in zip(measured, predicted_compute))


def validate(latency: list[dict], profiles: dict[tuple, DeviceProfile], skipped: list | None = None) -> list[dict]:
    """Predict every row that has a profile of its machine, threads and K; ``skipped`` gets the others (a profiled
    machine and model at another K or G than the profile timed, or a machine, model or thread count without one)."""
    out = []
    for row in latency:
        # A profile of the row's K: the encoder's work grows with K (plan() refuses a profile of another K, too).
        k = (row.get("codebook_size") or DEFAULT_K) if row["method"] == "astra" else DEFAULT_K
        profile = profiles.get((*machine_of(row), k))
        if profile is None and row["method"] != "astra":  # baselines do not encode: any K of the machine
            profile = next((p for key, p in profiles.items() if key[:3] == machine_of(row)), None)
        if profile is None or (row["method"] == "astra" and f"{row['G']}/{row['quantize']}" not in profile.encode_s):
            if skipped is not None:  # a profiled machine at another K or G, or a machine without a profile
                skipped.append(row)
            continue  # no profile of this machine, threads and K, or it did not time this G
        prediction = prediction_of_row(profile, row)
        predicted = prediction.latency_s
        single = predict_baseline(profile, "single", row["tokens"], 1, link_for(row)).latency_s
        measured_speedup = row.get("speedup_vs_single")
        predicted_speedup = single / predicted
        # The row's own one device (measured in the same run) divided by the predicted speed-up: a profile from
        # another call or host that is uniformly faster or slower than the row's run does not shift this one.
        # Rows without `single_median_s` (older ones): their measured speed-up times their median.
        own_single = None if row["method"] == "single" else row.get("single_median_s") or (
            measured_speedup * row["median_s"] if measured_speedup else None)
        own_predicted = own_single / predicted_speedup if own_single else None
        out.append({
            "machine": row["machine"], "model": row["model"], "tokens": row["tokens"], "N": row["N"],
            "label": row.get("label", row["method"]), "method": row["method"], "link": row["link"],
            "bandwidth_mbps": row["bandwidth_mbps"], "loss_percent": row.get("loss_percent") or 0.0,
            "measured_s": row["median_s"], "measured_p10_s": row["p10_s"], "measured_p90_s": row["p90_s"],
            "predicted_s": predicted, "error": (predicted - row["median_s"]) / row["median_s"],
            "within_spread": row["p10_s"] <= predicted <= row["p90_s"], "command": row["command"],
            "measured_speedup": measured_speedup, "predicted_speedup": predicted_speedup,
            "speedup_error": None if not measured_speedup or row["method"] == "single" else predicted_speedup / measured_speedup - 1,
            "measured_single_s": own_single, "predicted_from_own_single_s": own_predicted,
            "error_vs_own_single": None if own_predicted is None else (own_predicted - row["median_s"]) / row["median_s"],
            "profile_date": profile.date, "profile_rank_overheads": bool(profile.rank_overhead_s),
            "rank_compute_error_vs_own_single": rank_compute_error(row, prediction.compute_s, own_single / single if own_single else None),
        })  # fmt: skip
    return out


def markdown(rows: list[dict], profiles: dict[tuple, DeviceProfile], commands: dict | None = None, skipped: list | None = None) -> str:
    parts = ["# Planner: predicted against measured latency",
             "",
             "Generated by `python -m benchmarks.validate_planner validate` from docs/results/latency.json and the device "
             "profiles in docs/results/device_profiles/ (`transformers_astra.calibrate_device` on the machine, with one "
             "benchmark rank's threads). Error = (predicted − measured) / measured median. The cost model and its link "
             "model are described in `src/transformers_astra/planner.py`. The dev VM is shared with other jobs, so both its "
             "profile and its rows carry that machine's load at the time (in each row of latency.json).",
             ""]  # fmt: skip
    profiled = {key[:3] for key in profiles}
    other_k = [r for r in skipped or [] if machine_of(r) in profiled]
    unprofiled = [r for r in skipped or [] if r not in other_k]
    if other_k:
        parts += [f"Not predicted: {len(other_k)} row(s) of a profiled machine and model at a codebook size or G that no "
                  "profile timed (" + "; ".join(sorted({f"{r['machine'].split(':')[0]}, {r['model']}, {r.get('label', r['method'])}"
                                                        for r in other_k})) + ").", ""]  # fmt: skip
    if unprofiled:
        machines = sorted({f"{r['machine']} ({r['model']}, {r.get('threads_per_rank')} thread(s))" for r in unprofiled})
        parts += [f"Not predicted: {len(unprofiled)} row(s) of a machine, model and thread count without a profile: "
                  + "; ".join(machines) + ".", ""]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["machine"], row["model"], row["tokens"]), []).append(row)
    summary = []
    for (machine, model, tokens), group in sorted(groups.items()):
        errors = [abs(r["error"]) for r in group]
        speedup = [abs(r["speedup_error"]) for r in group if r["speedup_error"] is not None]
        own = [abs(r["error_vs_own_single"]) for r in group if r.get("error_vs_own_single") is not None]
        tag = machine_tag(machine)
        summary.append([machine.split(":")[0] + (f"; {tag}" if tag else ""), model, str(tokens), str(len(group)), f"{100 * statistics.median(errors):.0f} %",
                        f"{sum(e <= 0.2 for e in errors)}/{len(group)}", f"{100 * max(errors):.0f} %",
                        f"{100 * statistics.median(own):.0f} %" if own else "", f"{sum(e <= 0.2 for e in own)}/{len(own)}" if own else "",
                        f"{100 * statistics.median(speedup):.0f} %" if speedup else "",
                        f"{sum(e <= 0.2 for e in speedup)}/{len(speedup)}" if speedup else ""])  # fmt: skip
    parts += ["## Summary",
              "Latency: the predicted seconds against the measured median. Latency from the row's own one device: the "
              "one device measured in the row's run (`single_median_s`; older rows: their measured speed-up × median) "
              "divided by the predicted speed-up, against the "
              "measured median. Speed-up: the predicted speed-up over one device (both predicted) against the measured "
              "one (the row's baseline). A machine that is uniformly slower or faster at calibration than during the "
              "rows (shared machines; rows and profiles measured in other calls, possibly on other hosts of a kind) "
              "shifts the first, not the other two. Per row, the ranks' compute (rows that record each rank's wall time "
              "less its waits for peers, `per_rank_compute_s`) against the predicted per-rank compute scaled as the row's own one "
              "device is against the predicted one: what the ranks computed beyond the model at that run's machine speed "
              "(the waits on peers and links excluded). Profile with rank overheads: calibrated with rank forwards without a network "
              "(`calibrate_device(rank_probes=True)`, `fit_rank_overheads`; profiles of 2026-11-27 timed the benchmarks' "
              "emulated rank, `benchmarks.links` compute mode, which the library's loopback rank replaced; `calibrate --no-rank-probe` leaves them out); without: the components alone.",
              "",
              table(["machine", "model", "tokens", "rows", "latency: median |error|", "within 20 %", "largest |error|",
                     "latency from own one device: median |error|", "within 20 %",
                     "speed-up: median |error|", "within 20 %"], summary), ""]  # fmt: skip
    probed = [(key, p) for key, p in sorted(profiles.items()) if p.rank_overhead_s]
    if probed:
        settings = sorted({s for _, p in probed for s in p.rank_overhead_s}, key=lambda s: (int(s.split("/")[0]), s))
        parts += ["## Rank overheads",
                  "Per layer, what a rank's forward without a network (ranks 0 and N-1 of each N probed, and since "
                  "version-3 profiles rank N/2 of the largest N; the profile's length) took beyond the components, fitted by "
                  "`fit_rank_overheads` (ms, send / receive; profiles probed at several N add send per receiver / receive per "
                  "source / common: a rank sending to r ranks costs send + r × per receiver, one receiving from s ranks "
                  "receive + s × per source, and every rank with a peer common; bidirectional models: every rank does "
                  "both, so the sums are split evenly and common is not fitted). Negative: the components overstate that rank.",
                  "",
                  table(["profile", "N, tokens", *settings],
                        [[f"{key[1]}, {key[2]} thread(s), K={key[3]}, {key[0].split(':')[0]}, {p.date}", f"{probed_at(p)}, {p.probe_tokens}",
                          *[" / ".join(f"{1e3 * v:+.2f}" for v in p.rank_overhead_s[s]) if s in p.rank_overhead_s else ""
                            for s in settings]] for key, p in probed]), ""]  # fmt: skip
    for (machine, model, tokens), group in sorted(groups.items()):
        key = next((k for k in sorted(profiles, key=lambda k: k[3] != DEFAULT_K) if k[0] == machine_key(machine) and k[1] == model), None)
        profile = profiles[key] if key else None
        overheads = profile and (f", rank overheads probed at {profile.probe_tokens} tokens, N={probed_at(profile)}"
                                 if profile.rank_overhead_s else ", components only")  # fmt: skip
        parts.append(f"## {model}, {tokens} tokens — {machine}" + (f" (profile {profile.date}, {profile.threads} thread(s){overheads})" if profile else ""))
        if profile and (commands or {}).get(key):
            parts += ["", f"Profile: `{commands[key]}` on {profile.machine}, {profile.date}; rows: their own commands and "
                          "dates in docs/results/latency.json.", ""]
        lines = []
        for r in sorted(group, key=lambda r: (r["N"], r["method"] != "single", r["label"], r["link"], r["bandwidth_mbps"] or 0, r["loss_percent"])):
            link = r["link"] + (f" {r['bandwidth_mbps']:g} Mbps" if r["bandwidth_mbps"] else "") + (f", {r['loss_percent']:g} % loss" if r["loss_percent"] else "")
            speedups = ("", "", "") if r["speedup_error"] is None else (
                f"{r['measured_speedup']:.2f}×", f"{r['predicted_speedup']:.2f}×", f"{100 * r['speedup_error']:+.0f} %")
            own = ("", "") if r.get("error_vs_own_single") is None else (
                f"{r['measured_single_s']:.3g} / {r['predicted_speedup']:.2f} = {r['predicted_from_own_single_s']:.3g}",
                f"{100 * r['error_vs_own_single']:+.0f} %")
            compute = "" if r.get("rank_compute_error_vs_own_single") is None else f"{100 * r['rank_compute_error_vs_own_single']:+.0f} %"
            lines.append([str(r["N"]), r["label"], link, f"{r['measured_s']:.3g} ({r['measured_p10_s']:.3g}–{r['measured_p90_s']:.3g})",
                          f"{r['predicted_s']:.3g}", f"{100 * r['error']:+.0f} %", *own, compute, *speedups])  # fmt: skip
        parts += [table(["N", "method", "link", "measured median (p10–p90) s", "predicted s", "error",
                         "own one device s / predicted speed-up", "error vs own one device",
                         "ranks' compute vs predicted × own one device's scale (median rank)", "measured speed-up",
                         "predicted speed-up", "speed-up error"], lines), ""]  # fmt: skip
    return "\n".join(parts)


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def rank_inputs(workload) -> dict:
    """What a probed rank's forward gets: the workload's inputs, and for causal models the last token's logits only."""
    return {**workload.inputs, **({"logits_to_keep": 1} if workload.causal else {})}


def colocated_rank_worker(workload_name: str, tokens: int | None, codebook_size: int | None, settings: list, world: int,
                          rank: int, cores: list[int], threads: int, repeats: int, barrier, results) -> None:  # fmt: skip
    """One of ``world`` processes that run their loopback rank forwards at the same moments (`colocated_probes`)."""
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    workload = build(workload_name, tokens=tokens)
    inputs = rank_inputs(workload)
    out = []
    try:
        for groups, quantize in settings:
            patch(workload.model, AstraConfig(num_devices=world, groups=groups, quantize=quantize, shard_sizes=None,
                                              **({"codebook_size": codebook_size} if codebook_size else {})))  # fmt: skip
            try:
                forward, best = loopback_rank_forward(workload.model, rank, inputs), float("inf")
                for round_ in range(repeats + 1):  # one warm-up round
                    barrier.wait()
                    started = time.perf_counter()
                    forward()
                    best = best if round_ == 0 else min(best, time.perf_counter() - started)
            finally:
                unpatch(workload.model)
            out.append((groups, quantize, rank, best))
    finally:
        results.put(out)


def colocated_probes(args, settings: list, num_tokens: int) -> list[RankProbe]:
    """Every rank of each N of --probe-devices at once, one process per rank pinned to its own --colocated cores
    (rank r: cores r*C .. r*C+C-1, as `benchmarks.run_latency` pins its ranks), each round started together: the
    ranks' forwards as a benchmark host runs them, sharing its memory and caches, without a network."""
    import multiprocessing

    cores_per_rank, probes = args.colocated, []
    context = multiprocessing.get_context("spawn")
    for world in args.probe_devices:
        if world * cores_per_rank > os.cpu_count():
            raise SystemExit(f"--colocated {cores_per_rank} at N={world} needs {world * cores_per_rank} cores, this machine has {os.cpu_count()}")
        barrier, results = context.Barrier(world), context.Queue()
        workers = [context.Process(target=colocated_rank_worker, args=(
            args.workload, args.tokens, args.codebook_size, settings, world, rank,
            list(range(rank * cores_per_rank, (rank + 1) * cores_per_rank)), args.threads, args.probe_repeats, barrier, results))
            for rank in range(world)]  # fmt: skip
        for worker in workers:
            worker.start()
        answers = [results.get(timeout=1800) for _ in workers]
        for worker in workers:
            worker.join()
        if any(worker.exitcode for worker in workers) or any(len(a) != len(settings) for a in answers):
            raise SystemExit(f"a co-located rank at N={world} failed (exit codes {[w.exitcode for w in workers]})")
        probes += [RankProbe(g, q, world, rank, num_tokens, seconds) for answer in answers for g, q, rank, seconds in answer]
        print(f"co-located probes at N={world}: done", file=sys.stderr)
    return probes


def cmd_calibrate(args) -> None:
    torch.set_num_threads(args.threads)
    workload = build(args.workload, tokens=args.tokens)
    colocated = args.colocated is not None and not args.no_rank_probe
    if colocated and args.probe_tokens:
        raise SystemExit("--colocated probes run at the workload's own length: leave out --probe-tokens")
    profile = calibrate_device(workload.model, num_tokens=workload.num_tokens, threads=args.threads, repeats=args.repeats,
                               groups=tuple(args.groups), codebook_size=args.codebook_size,
                               machine=args.machine, rank_probes=not args.no_rank_probe and not colocated,
                               probe_tokens=args.probe_tokens, probe_repeats=args.probe_repeats,
                               probe_devices=tuple(args.probe_devices))  # fmt: skip
    if colocated:
        settings = [(g, q) for g in args.groups if not profile.hidden_size % g for q in ("hidden", "kv")]
        profile.rank_overhead_s = fit_rank_overheads(profile, colocated_probes(args, settings, workload.num_tokens))
        profile.probe_tokens, profile.probe_devices = workload.num_tokens, sorted(set(args.probe_devices))
    args.out.mkdir(parents=True, exist_ok=True)
    path = profile_path(args.out, args.machine, args.workload, args.threads, profile.codebook_size)
    command = "python -m benchmarks.validate_planner " + shlex.join(sys.argv[1:])
    path.write_text(json.dumps({"machine": args.machine, "workload": args.workload, "command": command,
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "colocated_cores_per_rank": args.colocated if colocated else None, "profile": profile.to_dict()},
                               indent=1) + "\n")  # fmt: skip
    print(f"profile -> {path}")


def cmd_validate(args) -> None:
    latency = json.loads(args.latency.read_text())
    profiles, commands = {}, {}
    for directory in args.profiles:
        profiles.update(load_profiles(directory, commands))
    skipped: list[dict] = []
    rows = validate(latency, profiles, skipped)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    args.markdown.write_text(markdown(rows, profiles, commands, skipped) + "\n")
    errors = [abs(r["error"]) for r in rows]
    if errors:
        print(f"{len(rows)} rows predicted; median |error| {100 * statistics.median(errors):.0f} %, "
              f"{sum(e <= 0.2 for e in errors)} within 20 % -> {args.json}, {args.markdown}")  # fmt: skip
    else:
        print("no latency row has a profile of its machine, model and threads")


def cmd_balance(args) -> None:
    profiles = load_profiles(args.profiles[0])
    matching = [p for (machine, workload, threads, k), p in profiles.items()
                if workload == args.workload and (args.machine is None or machine == machine_key(args.machine))]  # fmt: skip
    if not matching:
        raise SystemExit(f"no profile for workload {args.workload!r} (machine {args.machine!r}) in {args.profiles[0]}")
    config = AstraConfig(num_devices=args.n, groups=args.groups, quantize=args.quantize, shard_sizes=None)  # even
    sizes = balanced_shard_sizes(matching[-1], args.tokens, config)
    print(" ".join(map(str, sizes)))
    if args.predict:  # the slowest rank's predicted compute (no network), even against balanced shards
        free = LinkModel(UNLIMITED_MBPS, per_message_s=0.0)
        even = predict_astra(matching[-1], config, args.tokens, free).compute_s
        balanced = predict_astra(matching[-1], config.replace(shard_sizes=sizes), args.tokens, free).compute_s
        print(f"predicted per-rank compute, even: {' / '.join(f'{t:.3g}' for t in even)} s; balanced: "
              f"{' / '.join(f'{t:.3g}' for t in balanced)} s; slowest rank {max(even) / max(balanced):.3f}x faster", file=sys.stderr)


def cmd_held_out(args) -> None:
    """Loopback rank forwards (ranks 0, N/2 and N-1) at every N of --devices; overheads fitted, as `calibrate_device`
    would, on each N of --fit alone and on all of them (and without the middle rank); every probe predicted by each
    fit (components only, too). JSON rows and a summary printed."""
    torch.set_num_threads(args.threads)
    workload = build(args.workload, tokens=args.tokens)
    model = workload.model
    started = time.time()
    profile = calibrate_device(model, num_tokens=workload.num_tokens, threads=args.threads, repeats=args.repeats,
                               groups=tuple(args.groups), machine=args.machine)  # fmt: skip
    inputs = rank_inputs(workload)
    probes = []
    for g in args.groups:
        for quantize in args.quantize:
            for n in args.devices:
                ranks = probe_ranks(n, [n], workload.causal)  # at its own largest N: 0, N/2 and N-1
                patch(model, AstraConfig(num_devices=n, groups=g, quantize=quantize, shard_sizes=None))
                try:
                    timed = _interleaved_best([loopback_rank_forward(model, r, inputs) for r in ranks], args.probe_repeats)
                finally:
                    unpatch(model)
                probes += [RankProbe(g, quantize, n, r, workload.num_tokens, t) for r, t in zip(ranks, timed)]
    def probed(fit: list[int]) -> list[RankProbe]:  # the ranks calibrate_device(probe_devices=fit) times
        return [p for p in probes if p.num_devices in fit and p.rank in probe_ranks(p.num_devices, fit, workload.causal)]

    fits = {"components only": {}, **{f"fit N={n}": fit_rank_overheads(profile, probed([n])) for n in args.fit},
            "fit N=" + " and ".join(map(str, args.fit)): fit_rank_overheads(profile, probed(args.fit)),
            "fit N=" + " and ".join(map(str, args.fit)) + ", no middle rank": fit_rank_overheads(
                profile, [p for p in probed(args.fit) if p.rank in (0, p.num_devices - 1)])}  # fmt: skip
    rows = []
    for p in probes:
        config = AstraConfig(num_devices=p.num_devices, groups=p.groups, quantize=p.quantize, shard_sizes=None)
        predicted = {name: rank_compute_s(DeviceProfile.from_dict({**profile.to_dict(), "rank_overhead_s": fitted}), config,
                                          p.num_tokens, p.rank) for name, fitted in fits.items()}  # fmt: skip
        rows.append({"G": p.groups, "quantize": p.quantize, "N": p.num_devices, "rank": p.rank, "measured_s": p.seconds,
                     "predicted_s": predicted, "error": {k: v / p.seconds - 1 for k, v in predicted.items()}})  # fmt: skip
    command = "python -m benchmarks.validate_planner " + shlex.join(sys.argv[1:])
    result = {"machine": args.machine, "workload": args.workload, "threads": args.threads, "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.time() - started, 1),
              "load_average_1m": os.getloadavg()[0], "overheads_ms": {k: {s: [round(1e3 * x, 3) for x in v] for s, v in f.items()}
                                                                      for k, f in fits.items()},
              "rows": rows, "profile": profile.to_dict()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name in fits:
        per_n = {n: [abs(r["error"][name]) for r in rows if r["N"] == n] for n in args.devices}
        print(f"{name:24s} " + "  ".join(f"N={n}: median |error| {100 * statistics.median(e):4.1f} %, largest {100 * max(e):4.1f} %"
                                         for n, e in per_n.items()))  # fmt: skip
    print(f"-> {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calibrate = sub.add_parser("calibrate", help="time this device (see transformers_astra.calibrate_device)")
    calibrate.add_argument("--workload", choices=("gpt2", "vit", "llama"), required=True)
    calibrate.add_argument("--threads", type=int, required=True)
    calibrate.add_argument("--machine", required=True, help="the label the latency rows of this machine carry")
    calibrate.add_argument("--tokens", type=int, help="prefill length (causal workloads)")
    calibrate.add_argument("--repeats", type=int, default=5)
    calibrate.add_argument("--out", type=Path, default=PROFILES)
    calibrate.add_argument("--codebook-size", type=int, help=f"K of the settings timed (default {DEFAULT_K})")
    calibrate.add_argument("--groups", type=int, nargs="+", default=list(GROUPS), help="G of the settings timed")
    calibrate.add_argument("--probe-tokens", type=int, help="length of the timed rank forwards (default: calibrate_device's)")
    calibrate.add_argument("--probe-repeats", type=int, default=2, help="timed forwards per probed rank (after a warm-up)")
    calibrate.add_argument("--probe-devices", type=int, nargs="+", default=list(PROBE_DEVICES),
                           help="the N of the rank probes (two or more also fit per-peer overheads)")
    calibrate.add_argument("--no-rank-probe", action="store_true", help="components only (no rank forwards: overheads 0)")
    calibrate.add_argument("--colocated", type=int, metavar="CORES_PER_RANK",
                           help="probe every rank of each N at once, one process per rank on its own CORES_PER_RANK cores "
                                "(a benchmark host's ranks share its memory and caches; separate devices do not)")
    check = sub.add_parser("validate", help="predict the measured rows")
    check.add_argument("--latency", type=Path, default=REPO / "docs/results/latency.json")
    check.add_argument("--profiles", type=Path, nargs="+", default=[PROFILES],
                       help="directories of profiles; a later one's profile of the same machine, workload and threads wins")
    check.add_argument("--json", type=Path, default=REPO / "docs/results/planner_validation.json")
    check.add_argument("--markdown", type=Path, default=REPO / "docs/planner.md")
    balance = sub.add_parser("balance", help="print balanced shard sizes")
    balance.add_argument("--workload", choices=("gpt2", "vit", "llama"), required=True)
    balance.add_argument("--n", type=int, required=True)
    balance.add_argument("--groups", type=int, default=1)
    balance.add_argument("--quantize", default="hidden")
    balance.add_argument("--tokens", type=int, default=1024)
    balance.add_argument("--machine")
    balance.add_argument("--predict", action="store_true", help="also print the predicted per-rank compute (stderr)")
    balance.add_argument("--profiles", type=Path, nargs=1, default=[PROFILES])
    held = sub.add_parser("held-out", help="do rank overheads fitted at some N predict rank forwards at other N?")
    held.add_argument("--workload", choices=("gpt2", "vit", "llama"), required=True)
    held.add_argument("--threads", type=int, required=True)
    held.add_argument("--machine", required=True)
    held.add_argument("--tokens", type=int, help="prefill length (causal workloads)")
    held.add_argument("--repeats", type=int, default=3)
    held.add_argument("--probe-repeats", type=int, default=2)
    held.add_argument("--groups", type=int, nargs="+", default=[1, 32])
    held.add_argument("--quantize", nargs="+", default=["hidden", "kv"], choices=["hidden", "kv"])
    held.add_argument("--devices", type=int, nargs="+", default=[2, 4, 6, 8], help="the N of the timed rank forwards")
    held.add_argument("--fit", type=int, nargs="+", default=list(PROBE_DEVICES), help="the N whose ranks 0 and N-1 are fitted")
    held.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    {"calibrate": cmd_calibrate, "validate": cmd_validate, "balance": cmd_balance, "held-out": cmd_held_out}[args.command](args)


if __name__ == "__main__":
    main()
