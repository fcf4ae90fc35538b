"""examples/accuracy_sweep.py without training: call plans, smoke selection, pack/collect, report aggregation."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("accuracy_sweep", None)
    import accuracy_sweep

    accuracy_sweep.use_docs(tmp_path / "docs")
    (tmp_path / "docs" / "results").mkdir(parents=True)
    return accuracy_sweep


def result(run, seed, value, metric="accuracy", task="vit", evals=(), control=False, N=4, base=86.0):
    return {
        "run": f"{run}-s{seed}", "model": "outputs/vit-base", "task": task, "dataset": "fashion-mnist", "N": N,
        "G": 1, "K": 1024, "quantize": "none (control)" if control else "hidden", "noise_scale": 1.0,
        "noise_schedule": "constant", "random_shards": None, "distributed_cls": True, "commitment_weight": 1e-4,
        "metric": metric, "seed": seed, "eval_dataset": "fashion-mnist:test", "eval_num_devices": None if control else N,
        "value": value, "value_before_finetune": None if control else value - 1, "base_value": base,
        "evals": list(evals), "base_evals": [], "bits_per_token": None if control else 10,
        "compression_ratio": None if control else 614.4, "hidden_size": 192, "epochs": 1.0, "train_steps": 235,
        "finetune_seconds": 70.0, "code_stats": {}, "hardware": "1x GPU", "date": "2026-11-27",
        "command": f"python examples/finetune_astra.py --seed {seed}",
    }


def test_plans_put_the_priorities_first_and_respect_dependencies(sweep):
    one = [job.name for job in sweep.call1()]
    assert one[:3] == ["gpt2-base", "vit-base", "gpt2-english-base"]
    assert one.index("gpt2-demo-n2-g32-hidden-k512-s0") < one.index("gpt2-g32-hidden-s0")
    for first, later in (("vit-g32-hidden-s2", "vit-g8-kv-s0"), ("gpt2-g1-hidden-s2", "gpt2-g1-kv-s0")):
        assert one.index(first) < one.index(later)
    assert {f"{t}-g{g}-{m}-s{s}" for t in ("gpt2", "vit") for g in (1, 8, 32) for m in ("hidden", "kv")
            for s in (0, 1, 2)} <= set(one)
    jobs = {job.name: job for job in sweep.call1() + sweep.call2()}
    assert jobs["vit-g32-hidden-s1"].needs == ["vit-base"] and "--seed" in jobs["vit-g32-hidden-s1"].args
    assert "--random-shards" in jobs["gpt2-g32-hidden-nagnostic-s0"].args
    assert len(one) == len(set(one))


def test_smoke_keeps_one_job_of_each_kind_with_tiny_settings(sweep):
    jobs = sweep.smoke(sweep.call1())
    names = [job.name for job in jobs]
    assert names[:3] == ["gpt2-base", "vit-base", "gpt2-english-base"] and len(names) < 15
    for job in jobs:
        assert job.args.count("--epochs") == 1 and job.args[job.args.index("--epochs") + 1] == "1"
        if job.script == "finetune_astra.py":
            assert job.args[job.args.index("--codebook-size") + 1] == "16"


def test_aggregate_means_stds_layouts_and_controls(sweep):
    evals = [{"eval_dataset": "fashion-mnist:test", "eval_num_devices": 2, "eval_shard_sizes": None, "value": 80.0}]
    results = [result("vit-g1-hidden", s, v, evals=evals) for s, v in ((0, 83.0), (1, 84.0), (2, 85.0))]
    results += [result("vit-control", s, v, control=True) for s, v in ((0, 86.0), (1, 86.5))]
    rows = {(r["run"], r["eval_num_devices"]): r for r in sweep.aggregate(results)}
    main = rows[("vit-g1-hidden", 4)]
    assert main["seeds"] == [0, 1, 2] and main["value"] == pytest.approx(84.0) and main["std"] == pytest.approx(1.0)
    assert main["control_value"] == pytest.approx(86.25) and main["eval_dataset"] == "fashion-mnist:test"
    other = rows[("vit-g1-hidden", 2)]
    assert other["value"] == 80.0 and other["std"] == 0.0 and other["N"] == 4 and other["control_value"] == 86.25
    assert rows[("vit-control", None)]["std"] == pytest.approx(0.35355, abs=1e-4)


def test_effects_are_established_only_when_the_seeds_say_so(sweep):
    results = [result("vit-g1-hidden", s, v) for s, v in ((0, 83.0), (1, 83.1), (2, 82.9))]
    results += [result("vit-g1-hidden-naq0", s, v) for s, v in ((0, 81.0), (1, 81.1), (2, 80.9))]  # clearly worse
    results += [result("vit-g1-hidden-beta0", s, v) for s, v in ((0, 83.5), (1, 82.5), (2, 83.2))]  # noise
    results += [result("vit-g1-hidden-nodct", 0, 82.0)]  # one seed
    lines = "\n".join(sweep.effect_lines(sweep.aggregate(results)))
    assert "vit naq0: 81.00 (3 seeds) against 83.00 (3): -2.00 points" in lines
    verdicts = {line.split(":")[0]: line.rsplit(":", 1)[1] for line in lines.splitlines()}
    assert "**established**" in verdicts["- NAQ, vit naq0"]
    assert "not established" in verdicts["- β, vit beta0"]
    assert "not testable" in verdicts["- DCT, vit nodct"]


def test_pack_and_collect_round_trip(sweep, tmp_path, monkeypatch):
    out, dest = tmp_path / "work", tmp_path / "OUT"
    for name in ("gpt2-base", "vit-base"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(bytes(range(256)) * 40)
        (out / name / "base_result.json").write_text(json.dumps({"value": 1.0}))
        (out / name / "trainer").mkdir()  # not packed
    demo = out / "sweep" / "vit-demo-n2-g32-hidden-k512-s0"
    demo.mkdir(parents=True)
    (demo / "model.safetensors").write_bytes(b"weights" * 1000)
    (demo / "command.txt").write_text("python examples/finetune_astra.py ...\n")
    (demo / "result.json").write_text(json.dumps(result("vit-demo-n2-g32-hidden-k512", 0, 85.0, N=2)))
    (out / "call1-summary.json").write_text(json.dumps({"call": "1", "date": "2026-11-27 14:00 UTC", "status": {
        "vit-demo-n2-g32-hidden-k512-s0": "ok", "vit-g8-kv-s2": "killed at the deadline"}}))
    (out / "logs").mkdir()
    (out / "logs" / "vit-base.log").write_text("x" * 10000)
    monkeypatch.setattr(sweep, "PART_BYTES", 4096)
    sweep.cmd_pack(type("Args", (), {"out": str(out), "dest": str(dest), "call": "1"}))
    files = sorted(p.name for p in dest.iterdir())
    assert "call1-results.tar.gz" in files and sum(f.startswith("bases.tar.part") for f in files) > 1
    assert all(p.stat().st_size <= 4096 for p in dest.glob("*.part*"))
    back = tmp_path / "back"
    sweep.cmd_collect(type("Args", (), {"source": str(dest), "out": str(back), "runs_dir": str(tmp_path / "runs"),
                                         "docs": str(tmp_path / "docs"), "checkpoints": None}))
    assert (back / "gpt2-base" / "model.safetensors").read_bytes() == bytes(range(256)) * 40
    assert not (back / "gpt2-base" / "trainer").exists()
    assert (back / "checkpoints" / "vit-fashion-mnist-astra" / "command.txt").is_file()
    assert (tmp_path / "runs" / "vit-demo-n2-g32-hidden-k512-s0.json").is_file()
    assert len((back / "logs" / "vit-base.log").read_text()) == 4000  # tails only
    left = sweep.left_lines(sweep.load_results([back]))
    assert left == ["- call 1 (2026-11-27 14:00 UTC): killed at the deadline: vit-g8-kv-s2"]


def test_legacy_rows_are_migrated_with_the_new_keys(sweep, tmp_path):
    old = {k: v for k, v in result("vit-g1-hidden", 0, 83.51).items()
           if k not in ("seed", "eval_dataset", "eval_num_devices", "evals", "base_evals", "run", "task")}
    old["command"] = "python examples/finetune_astra.py --output-dir outputs/sweep/vit-g1-hidden --workers 1"
    (tmp_path / "docs" / "results" / "accuracy.json").write_text(json.dumps([old]))
    assert sweep.migrate_legacy() == 1
    rows = sweep.aggregate(sweep.load_all([]))
    assert len(rows) == 1
    row = rows[0]
    assert row["run"] == "vit-g1-hidden" and row["seeds"] == [0] and row["std"] is None
    assert row["eval_num_devices"] == 4 and row["eval_dataset"] == "fashion-mnist:test"
    assert row["campaign"].startswith("2026-11-26") and row["value"] == 83.51


def test_call3_is_vit_only_and_call4_has_the_smaller_codebooks(sweep):
    three = sweep.call3()
    names = [job.name for job in three]
    assert len(names) == len(set(names)) and all(job.needs == ["vit-base"] for job in three)
    assert all(job.estimate > 0 for job in three)
    main = {f"vit-g{g}-{m}-s{s}" for g, m in (("8", "hidden"), ("8", "kv"), ("1", "kv")) for s in (0, 1, 2)}
    main |= {"vit-g32-kv-s1", "vit-g32-kv-s2"}
    ablations = {f"vit-g1-hidden-{a}-s{s}" for a in ("naq0", "nodct", "beta0.25") for s in (0, 1, 2)}
    assert set(names[:len(main)]) == main and set(names[len(main):len(main) + len(ablations)]) == ablations
    four = {job.name: job for job in sweep.call4()}
    assert list(four)[:2] == ["gpt2-g8-hidden-s1", "gpt2-g8-hidden-s2"]
    for k in ("256", "512"):
        for mode in ("hidden", "kv"):
            for seed in (0, 1, 2):
                args = four[f"gpt2-g32-{mode}-k{k}-s{seed}"].args
                assert args[args.index("--codebook-size") + 1] == k and args[args.index("--quantize") + 1] == mode
    smoke = sweep.plan_jobs("3", smoke_test=True)
    assert smoke[0].name == "vit-base" and smoke[0].script == "train_base.py" and len(smoke) < 10


def test_a_run_that_cannot_finish_before_the_deadline_is_not_started(sweep, tmp_path):
    job = sweep.Job("vit-g8-kv-s0", "finetune_astra.py", ["--task", "vit"], [], estimate=300)
    status = sweep.run_jobs([job], tmp_path, 4, 1, sweep.time.time() + 100, 1.0)
    assert status == {"vit-g8-kv-s0": "not started (estimated 300 s, past the deadline)"}
    assert not (tmp_path / "logs" / "vit-g8-kv-s0.log").exists()


def gpt2_result(run, seed, value, K=1024, control=False):
    return {**result(run, seed, value, metric="perplexity", task="gpt2", control=control, base=37.85),
            "model": "outputs/gpt2-base", "dataset": "kjv", "eval_dataset": "kjv:test", "G": 32, "K": K,
            "distributed_cls": False}


def test_report_has_codebook_rows_with_the_issue_keys(sweep, tmp_path):
    runs = tmp_path / "docs" / "results" / "runs"
    runs.mkdir(parents=True)
    results = [gpt2_result("gpt2-control", s, v, control=True) for s, v in ((0, 36.3), (1, 36.4), (2, 36.5))]
    results += [gpt2_result("gpt2-g32-hidden", s, v) for s, v in ((0, 36.6), (1, 36.7), (2, 36.65))]
    results += [gpt2_result("gpt2-g32-hidden-k256", s, v, K=256) for s, v in ((0, 37.0), (1, 37.2), (2, 37.1))]
    results += [gpt2_result("gpt2-g32-hidden-k512", s, v, K=512) for s, v in ((0, 36.6), (1, 36.7), (2, 36.8))]
    for row in results:
        (runs / f"{row['run']}.json").write_text(json.dumps(row))
    sweep.cmd_report(type("Args", (), {"out": None}))
    rows = {(r["run"], r["eval_num_devices"]): r for r in
            json.loads((tmp_path / "docs" / "results" / "accuracy.json").read_text())}
    k256 = rows[("gpt2-g32-hidden-k256", 4)]
    assert {"seeds", "std", "eval_num_devices", "eval_dataset", "control_value", "codebook_size"} <= set(k256)
    assert k256["codebook_size"] == 256 and k256["seeds"] == [0, 1, 2] and k256["value"] == pytest.approx(37.1)
    assert k256["std"] == pytest.approx(0.1) and k256["control_value"] == pytest.approx(36.4)
    assert k256["eval_dataset"] == "kjv:test" and rows[("gpt2-control", None)]["codebook_size"] is None
    report = (tmp_path / "docs" / "results.md").read_text()
    section = report.split("## Codebook size")[1].split("\n## ")[0]
    assert "| gpt2-g32-hidden-k256 | kjv | kjv:test | 4 | 4 | 32 | 256 | hidden |" in section
    assert "| gpt2-g32-hidden | kjv | kjv:test | 4 | 4 | 32 | 1024 | hidden |" in section
    assert "gpt2-control" not in section
    lines = report.split("## Smaller codebooks")[1].split("\n## ")[0]
    assert "gpt2-g32-hidden-k256 (K = 256, 3 seeds): 37.10 ± 0.10; control 36.40: +1.9% (goal within +1 %: " \
           "**missed**)" in lines
    assert "gpt2-g32-hidden-k512 (K = 512, 3 seeds): 36.70 ± 0.10; control 36.40: +0.8% (goal within +1 %: " \
           "**met**); against K = 1024 (36.65, 3 seeds): +0.05" in lines


def test_call5_trains_the_english_llama_base_before_its_rows_and_call6_is_vit_only(sweep):
    five = {job.name: job for job in sweep.call5()}
    names = list(five)
    assert names[0] == "llama-english-base" and five[names[0]].script == "train_base.py"
    assert "--dataset" in five[names[0]].args and "english-ood" in five[names[0]].args
    for run in ("llama-english-g32-hidden", "llama-english-g32-kv", "llama-english-control"):
        for seed in (0, 1, 2):
            job = five[f"{run}-s{seed}"]
            assert job.needs == ["llama-english-base"] and job.args[job.args.index("--task") + 1] == "llama"
            assert "english-ood" in job.args
    for recipe in ("ep6", "ep6-even"):
        args = five[f"gpt2-g1-hidden-nagnostic-{recipe}-s0"].args
        assert "--random-shards" in args and args[len(args) - 1 - args[::-1].index("--epochs") + 1] == "6"
        assert ("--uneven-probability" in args) == recipe.endswith("even")
    seven = {job.name: job for job in sweep.call7()}
    assert set(seven) == {"gpt2-g1-hidden-ep6-s0", "gpt2-g1-hidden-ep6-s1", "gpt2-g1-hidden-ep6-s2"} | {
        f"gpt2-g1-hidden-ep6-n{n}-s0" for n in (2, 3, 6, 8)}
    assert all(job.needs == ["gpt2-base"] for job in seven.values())
    six = sweep.call6()
    assert all(job.needs == ["vit-base"] and job.estimate > 0 for job in six) and len(six) == len({j.name for j in six})


def test_n_agnostic_recipes_are_compared_with_per_n_checkpoints_of_the_same_budget(sweep, tmp_path):
    def at(run, seed, value, N=4, evals=()):
        row = {**gpt2_result(run, seed, value), "G": 1, "N": N, "eval_num_devices": N}
        row["evals"] = [{"eval_dataset": "kjv:test", "eval_num_devices": n, "eval_shard_sizes": None, "value": v}
                        for n, v in evals]
        if "nagnostic" in run:
            row["random_shards"] = [2, 3, 4, 6, 8]
        return row

    runs = tmp_path / "docs" / "results" / "runs"
    runs.mkdir(parents=True)
    results = [at("gpt2-g1-hidden", 0, 39.4, evals=[(2, 38.9)]), at("gpt2-g1-hidden-n2", 0, 37.6, N=2),
               at("gpt2-g1-hidden-nagnostic", 0, 39.6, evals=[(2, 39.0)]),
               at("gpt2-g1-hidden-ep6", 0, 37.2, evals=[(2, 36.0)]), at("gpt2-g1-hidden-ep6-n2", 0, 36.5, N=2),
               at("gpt2-g1-hidden-nagnostic-ep6", 0, 37.3, evals=[(2, 36.8)])]
    for row in results:
        (runs / f"{row['run']}.json").write_text(json.dumps(row))
    sweep.cmd_report(type("Args", (), {"out": None}))
    report = (tmp_path / "docs" / "results.md").read_text().split("## One checkpoint for any number")[1]
    lines = [line for line in report.split("\n") if line.startswith("- gpt2-g1-hidden at N=2")]
    assert lines[0] == ("- gpt2-g1-hidden at N=2: fine-tuned at N=2: 37.60 (1); N=4 checkpoint: 38.90 (1) (+3.5%: "
                        "missed: at most 0.3 pts / 1 % worse); N-agnostic checkpoint: 39.00 (1) (+3.7%: missed: at "
                        "most 0.3 pts / 1 % worse)")
    assert lines[1] == ("- gpt2-g1-hidden at N=2, 6 epochs: fine-tuned at N=2: 36.50 (1); N=4 checkpoint: 36.00 (1) "
                        "(-1.4%: met: at most 0.3 pts / 1 % worse); N-agnostic checkpoint ep6: 36.80 (1) (+0.8%: met: "
                        "at most 0.3 pts / 1 % worse)")
    assert sweep.within(36.0, 36.5, "perplexity") and not sweep.within(37.0, 36.5, "perplexity")
    assert sweep.within(85.0, 84.0, "accuracy") and not sweep.within(83.6, 84.0, "accuracy")


def test_kv_checkpoints_are_compared_with_their_per_n_references_too(sweep, tmp_path):
    runs = tmp_path / "docs" / "results" / "runs"
    runs.mkdir(parents=True)
    n4 = {**gpt2_result("gpt2-g32-kv", 0, 36.40), "G": 32, "quantize": "kv", "eval_num_devices": 4}
    n4["evals"] = [{"eval_dataset": "kjv:test", "eval_num_devices": 8, "eval_shard_sizes": None, "value": 36.90}]
    n8 = {**gpt2_result("gpt2-g32-kv-n8", 0, 36.30), "G": 32, "quantize": "kv", "N": 8, "eval_num_devices": 8}
    for row in (n4, n8):
        (runs / f"{row['run']}.json").write_text(json.dumps(row))
    sweep.cmd_report(type("Args", (), {"out": None}))
    report = (tmp_path / "docs" / "results.md").read_text().split("## One checkpoint for any number")[1]
    assert ("- gpt2-g32-kv at N=8: fine-tuned at N=8: 36.30 (1); N=4 checkpoint: 36.90 (1) (+1.7%: missed: at most "
            "0.3 pts / 1 % worse)") in report.split("\n")


def test_later_calls_carry_one_family_and_compare_at_one_budget(sweep):
    """Calls 9-19 each carry one base (a call's 64 MiB hold ViT's or GPT2's inputs, not both), and every N-agnostic
    recipe they run has per-N references of the same number of epochs (in that call or an earlier one)."""
    runs = {}
    for number in ("9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19"):
        jobs = sweep.CALLS[number]()
        assert len({job.name for job in jobs}) == len(jobs) and all(job.estimate > 0 for job in jobs)
        assert len({base for job in jobs for base in job.needs}) == 1, number
        runs.update({job.name: job for job in jobs})

    def epochs(job):
        return job.args[len(job.args) - 1 - job.args[::-1].index("--epochs") + 1]

    for name, job in runs.items():
        if "-nagnostic-" in name:
            stem = name.split("-nagnostic-")[0]
            per_n = [j for j in runs.values() if j.name.startswith(stem) and "-nagnostic" not in j.name
                     and epochs(j) == epochs(job) and j.args[j.args.index("--num-devices") + 1] in ("2", "8")]
            assert per_n or epochs(job) == "4" and name.startswith("vit-g1-hidden-nagnostic-ep4-ends"), name
    assert epochs(runs["gpt2-g1-hidden-nagnostic-ep12-s0"]) == "12" and epochs(runs["vit-g1-hidden-ep8-n2-s0"]) == "8"


def test_call_19_fine_tunes_kv_at_fewer_codewords_with_three_seeds_each(sweep):
    jobs = sweep.CALLS["19"]()
    sizes = {}
    for job in jobs:
        args = job.args
        assert args[args.index("--quantize") + 1] == "kv" and job.needs == ["gpt2-base"]
        key = (args[args.index("--groups") + 1], args[args.index("--codebook-size") + 1])
        assert job.name.startswith(f"gpt2-g{key[0]}-kv-k{key[1]}-s")
        sizes.setdefault(key, set()).add(args[args.index("--seed") + 1])
    assert sizes == {("16", "128"): {"0", "1", "2"}, ("32", "128"): {"0", "1", "2"}, ("16", "64"): {"0", "1", "2"}}
