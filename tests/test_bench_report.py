"""The benchmark's row hygiene: runtime defaults, labelled deviations, old rows relabelled, the Pareto join."""

import argparse
import json

import pytest

from benchmarks import netns
from benchmarks.astra_method import AstraSettings, runtime_default
from benchmarks.report import load_rows, pareto_rows, plot_pareto
from benchmarks.run_latency import Variant, merge_ranks, row_command
from benchmarks.workloads import WorkloadUnavailable, build, workload_available


def test_astra_rows_default_to_the_runtime_and_label_deviations():
    default = AstraSettings(groups=8, quantize="kv")
    assert default.label == "astra G=8 kv"
    record = default.record(4)
    assert record["overlap"] == runtime_default("overlap") and record["projection_table"] == runtime_default("projection_table")
    assert record["num_devices"] == 4 and record["codebook_size"] == 1024 and record["shard_sizes"] is None
    deviating = AstraSettings(groups=1, overlap=not runtime_default("overlap"), projection_table=False, codebook_size=256,
                              shard_sizes=(3, 1))  # fmt: skip
    assert deviating.label == f"astra G=1 hidden overlap={not runtime_default('overlap')} projection_table=False K=256 shards=3/1"
    assert AstraSettings.from_json(deviating.to_json()) == deviating


def test_row_command_reproduces_every_setting():
    args = argparse.Namespace(workload="gpt2", runs=5, cores_per_rank=2, row_budget_s=12.0, nice=0, tokens=256, interleave=True,
                              oversubscribe=False, paced=False, loaded_baseline=False)  # fmt: skip
    settings = AstraSettings(groups=32, quantize="kv", projection_table=False, shard_sizes=(100, 156))
    command = row_command(args, Variant("astra", settings), 2, "real", 10.0, loss=1.0)
    for part in ("--tokens 256", "--groups 32 --quantize kv", "--projection-table off", "--shard-sizes 100 156",
                 "--bandwidths 10", "--loss 1"):  # fmt: skip
        assert part in command
    assert "--overlap" not in command and "--paced" not in command  # the defaults are not pinned
    args.paced = True
    assert row_command(args, Variant("astra", settings), 2, "real", 10.0).endswith("--bandwidths 10 --paced")
    assert "--paced" not in row_command(args, Variant("astra", settings), 2, "compute", None)  # no links to pace
    assert "--loaded-baseline" not in row_command(args, Variant("astra", settings), 2, "real", 10.0)
    args.loaded_baseline = True
    assert " --loaded-baseline " in row_command(args, Variant("astra", settings), 2, "real", 10.0)
    assert "--loaded-baseline" not in row_command(args, Variant("single"), 1, "none", None)  # the one device's own row


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def base_row(**overrides):
    row = {"machine": "m: cpu", "model": "gpt2", "tokens": 1024, "method": "astra", "N": 4, "G": 1, "quantize": "hidden",
           "bandwidth_mbps": 10.0, "link": "real", "cores_per_rank": 2, "median_s": 0.5, "p10_s": 0.4, "p90_s": 0.6,
           "runs": 5, "command": "cmd"}  # fmt: skip
    row.update(overrides)
    return row


def test_old_rows_are_labelled_with_what_they_ran_and_new_rows_use_their_own_baseline(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_rows(raw / "a.jsonl", [
        base_row(),  # recorded before the benchmark used the runtime's defaults
        base_row(method="single", N=1, G=None, quantize=None, bandwidth_mbps=None, link="none", median_s=2.0),
        base_row(G=32, label="astra G=32 kv", quantize="kv", settings={"projection_table": True}, codebook_size=1024,
                 loss_percent=0.0, single_median_s=1.5, median_s=0.75),
    ])  # fmt: skip
    rows = {r["label"]: r for r in load_rows(raw)}
    old = rows["astra G=1 hidden overlap=False projection_table=False"]
    assert old["settings"]["projection_table"] is False and old["speedup_vs_single"] == 4.0
    assert rows["astra G=32 kv"]["speedup_vs_single"] == 2.0  # its interleaved baseline, not the single row


def test_pareto_joins_latency_with_accuracy_and_the_control(tmp_path):
    latency = [base_row(label="astra G=1 hidden", codebook_size=1024, loss_percent=0.0, speedup_vs_single=3.0, G=1),
               base_row(label="astra G=32 hidden", codebook_size=1024, loss_percent=0.0, speedup_vs_single=2.0, G=32),
               base_row(label="astra G=32 hidden", codebook_size=1024, loss_percent=1.0, speedup_vs_single=1.0, G=32)]  # fmt: skip
    accuracy = [
        {"model": "outputs/gpt2-base", "N": 4, "G": 1, "K": 1024, "quantize": "hidden", "metric": "perplexity", "value": 40.0,
         "base_value": 38.0, "command": "acc1", "run": "gpt2-g1-hidden"},
        {"model": "outputs/gpt2-base", "N": 4, "G": 32, "K": 1024, "quantize": "hidden", "metric": "perplexity", "value": 36.0,
         "base_value": 38.0, "command": "acc32", "run": "gpt2-g32-hidden"},
        {"model": "outputs/gpt2-base", "N": 4, "G": 1, "K": 1024, "quantize": "hidden", "metric": "perplexity", "value": 1.0,
         "base_value": 38.0, "command": "ablation", "run": "gpt2-g1-hidden-naq0"},
    ]  # fmt: skip
    controls = [{"model": "outputs/gpt2-base", "N": 4, "metric": "perplexity", "value": 36.0}]
    rows = pareto_rows(latency, (accuracy, controls))
    assert [(r["G"], r["accuracy_command"]) for r in rows] == [(1, "acc1"), (32, "acc32")]  # lossy row and ablation left out
    first = rows[0]
    for key in ("model", "N", "bandwidth_mbps", "G", "quantize", "codebook_size", "speedup_vs_single", "metric", "value",
                "base_value", "control_value", "latency_command", "accuracy_command"):  # fmt: skip
        assert key in first
    assert first["change_vs_control"] == pytest.approx(100 * 4 / 36) and first["pareto_optimal"]
    assert rows[1]["pareto_optimal"]  # slower but more accurate: also on the front


def test_the_newest_measurement_of_a_row_wins_whatever_file_holds_it(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    newer = dict(label="astra G=32 kv", G=32, quantize="kv", codebook_size=1024, loss_percent=0.0, single_median_s=1.5)
    # "x-2026-session3.jsonl" sorts before "x-2026.jsonl"; the date decides, not the file name.
    write_rows(raw / "x-2026-session3.jsonl", [base_row(**newer, median_s=0.5, date="2026-11-27 17:05 UTC")])
    write_rows(raw / "x-2026.jsonl", [base_row(**newer, median_s=0.75, date="2026-11-27 12:00 UTC")])
    (row,) = [r for r in load_rows(raw) if r["label"] == "astra G=32 kv"]
    assert row["median_s"] == 0.5 and row["speedup_vs_single"] == 3.0


def test_pareto_joins_a_smaller_codebook_with_its_own_fine_tuning():
    latency = [base_row(label="astra G=32 kv K=256", codebook_size=256, loss_percent=0.0, speedup_vs_single=2.2, G=32, quantize="kv")]
    accuracy = [
        {"model": "outputs/gpt2-base", "N": 4, "G": 32, "K": 1024, "quantize": "kv", "metric": "perplexity", "value": 36.4,
         "base_value": 38.0, "command": "k1024", "run": "gpt2-g32-kv"},
        {"model": "outputs/gpt2-base", "N": 4, "G": 32, "K": 256, "quantize": "kv", "metric": "perplexity", "value": 36.45,
         "base_value": 38.0, "command": "k256", "run": "gpt2-g32-kv-k256"},
    ]  # fmt: skip
    rows = pareto_rows(latency, (accuracy, [{"model": "outputs/gpt2-base", "N": 4, "metric": "perplexity", "value": 36.36}]))
    assert [(r["codebook_size"], r["accuracy_command"]) for r in rows] == [(256, "k256")]


@pytest.mark.parametrize("loss", [-1, 100, float("nan"), True])
def test_loss_outside_the_range_is_named(loss):
    with pytest.raises(ValueError, match="loss"):
        netns.check_loss(loss)


def test_llama_workload_errors_clearly_until_the_adapter_lands():
    if workload_available("llama"):
        assert build("llama", small=True).causal
    else:
        with pytest.raises(WorkloadUnavailable, match="LlamaForCausalLM"):
            build("llama", small=True)
    with pytest.raises(ValueError, match="tokens"):
        build("vit", tokens=10)


def test_llama_rows_of_every_method_and_bandwidth_reach_the_tables_and_latency_json(tmp_path):
    """The gpu_host.sh Llama block's rows: ASTRA, sp-fp16 and tp at 10 and 100 Mbps, each with its command."""
    from benchmarks.report import main

    raw, docs = tmp_path / "raw", tmp_path / "docs"
    raw.mkdir()
    docs.mkdir()
    extra = dict(model="llama", threads_per_rank=2, date="2026-11-27 16:00 UTC", load_average_1m=1.0, per_rank_median_s=[1.0] * 4,
                 bytes_sent_per_rank=1e6, wire_bytes_per_rank=1.1e6, loss_percent=0.0, single_median_s=2.0, single_p10_s=1.9,
                 single_p90_s=2.1)  # fmt: skip
    rows = []
    methods = (("astra G=32 kv", "astra", 32, "kv"), ("sp-fp16", "sp-fp16", None, None), ("tp", "tp", None, None))
    for label, method, G, quantize in methods:
        for mbps, median in ((10.0, 4.0), (100.0, 1.0)):
            command = f"python -m benchmarks.run_latency --workload llama --n 4 --methods {method} --bandwidths {mbps:g}"
            rows.append(base_row(**extra, label=label, method=method, G=G, quantize=quantize, bandwidth_mbps=mbps,
                                 median_s=median, command=command))  # fmt: skip
    write_rows(raw / "latency-gpu-host-llama.jsonl", rows)
    main(["--raw", str(raw), "--docs", str(docs)])
    page = (docs / "benchmarks.md").read_text()
    assert "### llama, 1024 tokens, N=4" in page
    for label in ("astra G=32 kv", "sp-fp16", "tp"):
        assert f"| {label} | real |  | 4 (0.4–0.6) [5] | 1 (0.4–0.6) [5] |" in page
    for method in ("astra", "sp-fp16", "tp"):
        assert f"--methods {method} --bandwidths 10 100" in page  # one reproduce command per method, both bandwidths
    recorded = json.loads((docs / "results/latency.json").read_text())
    assert sorted((r["method"], r["bandwidth_mbps"], r["command"].split()[-1]) for r in recorded) == sorted(
        (r["method"], r["bandwidth_mbps"], f"{r['bandwidth_mbps']:g}") for r in rows
    )


def timings(total: float, codes: list[float], sends: float = 0.0) -> dict:
    waited = {"codes": sum(codes), "sends": sends, "pooling": 0.0, "control": 0.001}
    return {"total_s": total, "waited_s": sum(waited.values()), "compute_s": total - sum(waited.values()), "waited": waited,
            "codes_per_layer": codes}  # fmt: skip


def rank_answer(times: list[float], timed: list[dict] | None) -> dict:
    return {"times": times, "bytes_sent": [1] * len(times), "wire_bytes": [None] * len(times), "slept_s": [0.0] * len(times),
            **({} if timed is None else {"timings": timed})}  # fmt: skip


def test_rows_carry_each_ranks_median_waits_and_compute_and_the_slowest_ranks_layers():
    # Two ranks, three runs each answered in one RESULT: rank 1 is the slowest and waits at layer 1.
    rank0 = rank_answer([0.30, 0.20, 0.25], [timings(0.30, [0.0, 0.0], 0.01), timings(0.20, [0.0, 0.0], 0.03), timings(0.25, [0.0, 0.0], 0.02)])
    rank1 = rank_answer([0.50, 0.70, 0.60], [timings(0.50, [0.1, 0.2]), timings(0.70, [0.1, 0.4]), timings(0.60, [0.1, 0.3])])
    merged = merge_ranks([[rank0], [rank1]])
    assert merged["times"] == [0.50, 0.70, 0.60] and merged["slowest_rank"] == 1
    assert merged["per_rank_waited_s"] == [0.021, 0.401]  # medians: sends 0.02 + control 0.001; codes 0.4 + 0.001
    assert merged["per_rank_compute_s"] == [0.229, 0.199]
    assert merged["per_rank_waited_by_kind_s"][1] == {"codes": 0.4, "sends": 0.0, "pooling": 0.0, "control": 0.001}
    assert merged["slowest_rank_codes_wait_per_layer_s"] == [0.1, 0.3]
    # The baselines (no runtime, None per run) and answers from before the timings carry no breakdown.
    for untimed in (rank_answer([0.3], [None]), rank_answer([0.3], None)):
        assert "per_rank_waited_s" not in merge_ranks([[untimed], [untimed]])


def test_the_report_shows_the_wait_breakdown_and_still_renders_rows_without_it(tmp_path):
    from benchmarks.report import main

    raw, docs = tmp_path / "raw", tmp_path / "docs"
    raw.mkdir()
    docs.mkdir()
    extra = dict(threads_per_rank=2, date="2026-11-27 16:00 UTC", load_average_1m=1.0, per_rank_median_s=[0.3, 0.6],
                 bytes_sent_per_rank=1e6, wire_bytes_per_rank=1.1e6, loss_percent=0.0, N=2, settings={}, codebook_size=1024)  # fmt: skip
    breakdown = dict(per_rank_waited_s=[0.021, 0.401], per_rank_compute_s=[0.229, 0.199], slowest_rank=1,
                     per_rank_waited_by_kind_s=[{"codes": 0.0, "sends": 0.02, "pooling": 0.0, "control": 0.001},
                                                {"codes": 0.4, "sends": 0.0, "pooling": 0.0, "control": 0.001}],
                     slowest_rank_codes_wait_per_layer_s=[0.1, 0.3])  # fmt: skip
    write_rows(raw / "a.jsonl", [base_row(**extra, label="astra G=1 hidden"),  # recorded before the timings
                                 base_row(**extra, **breakdown, label="astra G=32 hidden", G=32)])  # fmt: skip
    main(["--raw", str(raw), "--docs", str(docs)])
    page = (docs / "benchmarks.md").read_text()
    assert page.count("| 0.5 (0.4–0.6) [5] |") == 2  # both rows in the latency table
    assert "| astra G=32 hidden | real | 10 | 0.021 / 0.401 | 0.229 / 0.199 | 1: codes 0.400, control 0.001 | 100 300 |" in page
    assert "| astra G=1 hidden | real | 10 | " not in page.split("Where each rank's time went")[1].split("Crossover")[0]
    recorded = {r["label"]: r for r in json.loads((docs / "results/latency.json").read_text())}
    assert recorded["astra G=32 hidden"]["per_rank_waited_s"] == [0.021, 0.401]
    assert "per_rank_waited_s" not in recorded["astra G=1 hidden"]


def test_balanced_shards_can_be_asked_for_and_are_labelled():
    from benchmarks import run_latency

    args = run_latency.parse_args(["--workload", "gpt2", "--n", "2", "--methods", "astra", "--shard-sizes", "balanced"])
    assert args.shard_sizes == "balanced"
    settings = AstraSettings(groups=32, quantize="hidden", shard_sizes="balanced")
    assert settings.label == "astra G=32 hidden shards=balanced"
    assert settings.config(2).shard_sizes == "balanced"
    assert AstraSettings.from_json(settings.to_json()) == settings
    assert run_latency.parse_args(["--workload", "gpt2", "--n", "2", "--shard-sizes", "3", "5"]).shard_sizes == [3, 5]
    with pytest.raises(SystemExit):
        run_latency.parse_args(["--workload", "gpt2", "--n", "2", "--shard-sizes", "3", "x"])


def test_a_loaded_baseline_is_asked_for_with_the_interleaved_one_and_reported_beside_it(tmp_path):
    from benchmarks import run_latency
    from benchmarks.report import main

    with pytest.raises(SystemExit):
        run_latency.parse_args(["--workload", "gpt2", "--n", "2", "--loaded-baseline", "--no-interleave"])
    assert run_latency.parse_args(["--workload", "gpt2", "--n", "2", "--loaded-baseline"]).loaded_baseline
    raw, docs = tmp_path / "raw", tmp_path / "docs"
    raw.mkdir()
    docs.mkdir()
    extra = dict(threads_per_rank=2, date="2026-11-28 06:00 UTC", load_average_1m=1.0, per_rank_median_s=[0.3, 0.5],
                 bytes_sent_per_rank=1e6, wire_bytes_per_rank=1.1e6, loss_percent=0.0, N=2, settings={}, codebook_size=1024,
                 single_median_s=1.0, single_p10_s=0.9, single_p90_s=1.1, speedup_vs_single=2.0)  # fmt: skip
    loaded = dict(single_loaded_median_s=1.5, single_loaded_p10_s=1.4, single_loaded_p90_s=1.6, speedup_vs_loaded_single=3.0,
                  host_load={"processes": 1, "tokens": 512, "forwards": 12, "forward_median_s": 0.41})  # fmt: skip
    write_rows(raw / "a.jsonl", [base_row(**extra, **loaded, label="astra G=16 kv K=256", G=16, quantize="kv"),
                                 base_row(**extra, label="astra G=1 hidden")])  # fmt: skip
    main(["--raw", str(raw), "--docs", str(docs)])
    page = (docs / "benchmarks.md").read_text()
    assert ("| astra G=16 kv K=256 | real | 10 | 0.5 (0.4–0.6) | 1 (0.9–1.1) | 1.5 (1.4–1.6) | 2.00× | 3.00× | "
            "1 × 12 forwards of 512 tokens, 0.41 s each |") in page
    assert page.count("speed-up vs loaded") == 1  # one table, and only the row that has a loaded baseline in it
    assert "| astra G=1 hidden | real | 10 | 0.5 (0.4–0.6) | 1 (0.9–1.1) |" not in page


def test_a_rank_worker_loads_its_cores_until_told_to_stop_and_then_serves_runs_again():
    """The load protocol of `benchmarks.rank_worker` (the host load of --loaded-baseline), on a small GPT2 prefill."""
    import socket
    import subprocess
    import sys
    import time

    from benchmarks.run_latency import REPO

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.rank_worker", "--rank", "0", "--world", "1", "--master", "127.0.0.1",
         "--port", str(port), "--workload", "gpt2", "--method", "single", "--tokens", "8", "--threads", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**__import__("os").environ, "GLOO_SOCKET_IFNAME": "lo"},
    )  # fmt: skip

    def answer() -> dict:
        while True:
            line = worker.stdout.readline()
            assert line, "the worker ended"
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])

    def send(command: dict) -> None:
        worker.stdin.write(json.dumps(command) + "\n")
        worker.stdin.flush()

    try:
        assert answer()["ready"]
        send({"load": True})
        assert answer() == {"loading": True}  # after its first forward
        time.sleep(1.0)
        send({"stop": True})
        stopped = answer()
        assert stopped["load_forwards"] >= 2 and len(stopped["load_forward_s"]) == stopped["load_forwards"]
        assert all(0 < t < 1.0 for t in stopped["load_forward_s"])
        send({"mode": "compute", "mbps": None, "warmup": 0, "runs": 2})  # still serves timed runs afterwards
        assert len(answer()["times"]) == 2
        send({"quit": True})
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_the_pareto_plot_draws_every_row_whatever_the_number_of_hosts(tmp_path):
    import matplotlib.pyplot as plt

    plt.close("all")
    # Six hosts of one kind (one per call) and one of another: all seven points drawn, one legend entry per kind.
    rows = [{"model": "gpt2", "machine": f"GPU host (kind): Xeon, 16 cores; call 07{i}0", "change_vs_control": 0.1 * i,
             "speedup_vs_single": 2.0 + 0.1 * i, "pareto_optimal": i == 5, "G": 16, "quantize": "kv", "codebook_size": 128,
             "metric": "perplexity"} for i in range(6)]
    rows.append({**rows[0], "machine": "dev VM (shared): AMD EPYC, 2 cores", "codebook_size": 1024, "change_vs_control": 0.9})
    rows.append({**rows[0], "change_vs_control": None})  # no accuracy row to join: not drawn
    plot_pareto(rows, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    ax = plt.gcf().axes[0]
    drawn = [tuple(point) for c in ax.collections for point in c.get_offsets()]
    assert sorted(drawn) == sorted((r["change_vs_control"], r["speedup_vs_single"]) for r in rows if r["change_vs_control"] is not None)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["GPU host (kind)", "dev VM (shared)"]
    labels = {t.get_text() for t in ax.texts}
    assert labels == {"G=16 kv K=128", "G=16 kv"}  # the codebook size where it is not the default
    plt.close("all")
