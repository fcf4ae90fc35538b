"""benchmarks.per_layer_costs: the runtime steps it times exist, and its wrappers time them without changing them."""

import importlib

import torch

from benchmarks import per_layer_costs


def _owner(module_name: str, attribute: str):
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def test_every_timed_step_exists():
    for module_name, attribute, _ in per_layer_costs.STEPS:
        owner, name = _owner(module_name, attribute)
        assert callable(getattr(owner, name)), f"{module_name}.{attribute}"


def test_time_steps_adds_each_call_and_keeps_the_result(monkeypatch):
    for module_name, attribute, _ in per_layer_costs.STEPS:  # undone after the test
        owner, name = _owner(module_name, attribute)
        monkeypatch.setattr(owner, name, getattr(owner, name))
    from transformers_astra import packing, transport

    spent = per_layer_costs.time_steps()
    codes = torch.randint(0, 1024, (3, 7))
    packed = transport.pack(codes, 10)
    assert torch.equal(packed, packing.pack(codes, 10))
    assert torch.equal(transport.unpack(packed, 10, 21), codes.reshape(-1))
    assert set(spent) == {"pack", "unpack"} and all(seconds > 0 for seconds in spent.values())


def test_vit_kernels_time_each_kernel():
    from benchmarks.workloads import build

    model = build("vit", small=True).model
    times = per_layer_costs.vit_kernels(model, groups=4, quantize="kv", repeats=1)
    assert set(times) == {
        "kernel encoder score matmul, a layer",
        "kernel two partial attentions + merge, a layer",
        "kernel one SDPA over 197 keys, a layer",
    }
    assert all(len(seconds) == 10 and min(seconds) > 0 for seconds in times.values())


def test_every_case_names_its_codebook_size_and_gpt2_kv_floors_time_a_ranks_exact_work():
    from benchmarks.ceiling import rank_call
    from benchmarks.profile_astra import timed_runs
    from benchmarks.workloads import build

    for name, (workload, groups, quantize, ranks, size) in per_layer_costs.CASES.items():
        assert workload in ("gpt2", "vit") and quantize in ("hidden", "kv") and set(ranks) <= set(range(per_layer_costs.num_devices(name))), name
        assert size >= 2 and size & (size - 1) == 0, name
    assert per_layer_costs.CASES["gpt2-kv32"][1:] == (32, "kv", [0, 1, 3], 256)
    workload = build("gpt2", small=True)
    prepared = []

    def prepare():
        prepared.append(True)
        return prepare_rank()

    prepare_rank, run = rank_call(workload, 4, 3)
    with torch.inference_mode():
        times = timed_runs(run, 3, prepare)
    assert len(times) == 3 and min(times) > 0 and len(prepared) == 4  # a warm-up, then one untimed prepare per run


def test_cpu_timed_runs_time_each_call_in_wall_and_cpu_seconds_and_not_the_prepare():
    calls = []

    def prepare():
        calls.append("prepare")
        sum(range(300_000))  # CPU work that must not be counted
        return 3

    def run(value):
        calls.append(value)
        sum(range(30_000))

    from benchmarks.profile_astra import cpu_timed_runs

    walls, cpus = cpu_timed_runs(run, 2, prepare)
    assert len(walls) == len(cpus) == 2 and calls == ["prepare", 3] * 3  # a warm-up, then two timed calls
    assert all(wall > 0 and cpu >= 0 for wall, cpu in zip(walls, cpus))
    assert max(cpus) < 0.5 * min(_prepare_seconds() for _ in range(2))  # the prepare's work is not in the times


def _prepare_seconds() -> float:
    import time

    start = time.process_time()
    sum(range(300_000))
    return time.process_time() - start
