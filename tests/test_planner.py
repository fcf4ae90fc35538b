"""The planner's cost model: limits, monotonicity, the runtime's byte formula, named errors."""

import dataclasses
import json
import math
import os
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import transformers_astra as astra
from benchmarks.workloads import build
from transformers_astra.distributed import expected_code_bytes
from transformers_astra.planner import (
    DeviceProfile,
    LinkModel,
    RankProbe,
    balanced_shard_sizes,
    expected_bytes_sent,
    fit_rank_overheads,
    predict_astra,
    predict_baseline,
    rank_compute_s,
)
from transformers_astra.patch import astra_state
from transformers_astra.sharding import ShardLayout


def gpt2_profile(**overrides) -> DeviceProfile:
    """Rates of GPT2-small on one thread of the dev VM (orders of magnitude of a real calibration)."""
    keys = [f"{g}/{q}" for g in (1, 8, 16, 32) for q in ("hidden", "kv")]
    values = dict(
        model_type="gpt2", hidden_size=768, num_layers=12, num_heads=12, causal=True, threads=1,
        fixed_s=0.03, per_token_s=2.2e-3, attention_causal_s=9e-8, attention_masked_s=7e-8, attention_full_s=6e-8,
        project_kv_s=2.4e-5, encode_s={k: 1e-5 * int(k.split("/")[0]) ** 0.5 for k in keys},
        decode_s={k: 4e-7 for k in keys}, table_s={"1/hidden": 8e-7, "8/hidden": 5e-6},
    )  # fmt: skip
    values.update(overrides)
    return DeviceProfile(**values)


def vit_profile() -> DeviceProfile:
    return dataclasses.replace(gpt2_profile(), model_type="vit", causal=False)


def fast_link(**kw) -> LinkModel:
    return LinkModel(1e9, per_message_s=0.0, **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("quantize", ["hidden", "kv"])
@pytest.mark.parametrize(("groups", "codebook_size", "sizes"), [(1, 1024, None), (8, 256, [3, 2, 2, 1]), (32, 1000, [1, 1, 1, 5])])
def test_bytes_formula_agrees_with_the_runtime(causal, quantize, groups, codebook_size, sizes):
    config = astra.AstraConfig(num_devices=4, groups=groups, quantize=quantize, codebook_size=codebook_size, shard_sizes=sizes)
    layout = ShardLayout.for_sequence(203, 4, sizes)
    for rank in range(4):
        for batch in (1, 3):
            assert expected_bytes_sent(config, layout, rank, 12, causal, batch) == expected_code_bytes(
                config, layout, rank, batch, 12, causal
            )


@pytest.mark.parametrize("profile", [gpt2_profile(), vit_profile()], ids=["causal", "bidirectional"])
def test_latency_falls_as_bandwidth_rises_and_loss_only_adds(profile):
    tokens = 1024 if profile.causal else 197
    config = astra.AstraConfig(num_devices=4, groups=32, quantize="kv")
    for predict in (lambda link: predict_astra(profile, config, tokens, link),
                    lambda link: predict_baseline(profile, "sp-fp16", tokens, 4, link),
                    lambda link: predict_baseline(profile, "tp", tokens, 4, link)):  # fmt: skip
        times = [predict(LinkModel(mbps)).latency_s for mbps in (1, 10, 100, 1000)]
        assert times == sorted(times, reverse=True) and times[0] > times[-1]
        lossless, lossy = predict(LinkModel(10)).latency_s, predict(LinkModel(10, loss_percent=1.0)).latency_s
        assert lossy > lossless
        assert predict(LinkModel(10, latency_ms=5)).latency_s > lossless


def test_a_free_network_leaves_the_slowest_ranks_compute():
    profile = gpt2_profile()
    for groups in (1, 32):
        config = astra.AstraConfig(num_devices=4, groups=groups)
        prediction = predict_astra(profile, config, 1024, fast_link())
        # Only the wait for a slower sender's codes (lockstep per layer) comes on top of the slowest compute.
        assert max(prediction.compute_s) <= prediction.latency_s <= 1.02 * max(prediction.compute_s)
    single = predict_baseline(profile, "single", 1024, 1, LinkModel(1))
    assert single.latency_s == predict_baseline(profile, "single", 1024, 1, LinkModel(1000)).latency_s


def test_more_devices_less_work_per_device_but_never_below_the_fixed_cost():
    profile = gpt2_profile()
    slowest = [max(predict_astra(profile, astra.AstraConfig(num_devices=n, groups=1), 1024, fast_link()).compute_s) for n in (1, 2, 4, 8)]
    assert slowest == sorted(slowest, reverse=True) and slowest[-1] > profile.fixed_s
    one = predict_astra(profile, astra.AstraConfig(num_devices=1, groups=1), 1024, fast_link())
    assert one.bytes_sent_per_rank == 0
    # The causal last rank carries the longest attention: it is the slowest with even shards.
    compute = predict_astra(profile, astra.AstraConfig(num_devices=4, groups=1), 1024, fast_link()).compute_s
    assert compute[-1] == max(compute)


def test_tables_and_kv_mode_skip_the_projection():
    profile = gpt2_profile(project_kv_s=1e-3)  # an expensive projection
    link = fast_link()
    plain = predict_astra(profile, astra.AstraConfig(num_devices=4, groups=1), 1024, link, projection_table=False)
    table = predict_astra(profile, astra.AstraConfig(num_devices=4, groups=1), 1024, link, projection_table=True)
    kv = predict_astra(profile, astra.AstraConfig(num_devices=4, groups=1, quantize="kv"), 1024, link)
    assert table.latency_s < plain.latency_s and kv.latency_s < plain.latency_s
    # G=32 hidden: the tables would be 201 MB per layer, so the runtime (and the model) projects.
    big = astra.AstraConfig(num_devices=4, groups=32)
    assert predict_astra(profile, big, 1024, link, True).latency_s == predict_astra(profile, big, 1024, link, False).latency_s


def test_plan_recommends_one_device_when_astra_would_be_slower():
    keys = [f"{g}/{q}" for g in (1, 8, 16, 32) for q in ("hidden", "kv")]
    slow_encoder = gpt2_profile(encode_s={k: 1.0 for k in keys})
    result = astra.plan(num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=slow_encoder)
    assert result.recommended.method == "single"
    assert "slower than one device" in result.summary()
    fast = astra.plan(num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=gpt2_profile())
    assert fast.recommended.method == "astra" and fast.recommended.speedup_vs_single > 1
    assert fast.recommended.latency_s == min(p.latency_s for p in fast.predictions if p.method == "astra")
    assert "recommended: astra" in fast.summary()


def test_accuracy_bound_keeps_only_measured_settings_within_it():
    rows = [
        {"N": 4, "G": 1, "K": 1024, "quantize": "hidden", "metric": "perplexity", "value": 39.45, "run": "gpt2-g1-hidden"},
        {"N": 4, "G": 32, "K": 1024, "quantize": "kv", "metric": "perplexity", "value": 36.38, "run": "gpt2-g32-kv"},
        {"N": 4, "G": 1, "K": 1024, "quantize": "kv", "metric": "perplexity", "value": 30.0, "run": "gpt2-g1-kv-naq0"},  # ablation
    ]
    result = astra.plan(num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=gpt2_profile(), accuracy_rows=rows,
                        reference_value=36.38, max_perplexity_increase_percent=1.0)  # fmt: skip
    assert (result.recommended.groups, result.recommended.quantize) == (32, "kv")
    allowed = {(p.groups, p.quantize) for p in result.predictions if p.method == "astra" and p.allowed}
    assert allowed == {(32, "kv")}
    assert "within the accuracy bound" in result.summary()
    vit_rows = [{"N": 4, "G": 8, "K": 1024, "quantize": "hidden", "metric": "accuracy", "value": 85.04, "run": "vit-g8-hidden"}]
    none_left = astra.plan(num_tokens=197, num_devices=4, bandwidth_mbps=10, profile=vit_profile(), accuracy_rows=vit_rows,
                           reference_value=86.23, max_accuracy_drop_points=0.5)  # fmt: skip
    assert none_left.recommended.method == "single" and "accuracy bound" in none_left.recommended.reason


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_devices": 0}, "num_devices"),
        ({"num_tokens": 1.5}, "num_tokens"),
        ({"num_tokens": 3, "num_devices": 4}, "num_tokens"),
        ({"bandwidth_mbps": -1}, "bandwidth_mbps"),
        ({"bandwidth_mbps": float("inf")}, "bandwidth_mbps"),
        ({"loss_percent": 100}, "loss_percent"),
        ({"latency_ms": float("nan")}, "latency_ms"),
        ({"groups": (0,)}, "groups"),
        ({"quantize": ("keys",)}, "quantize"),
        ({"max_perplexity_increase_percent": 1.0}, "accuracy_rows"),
        ({"max_perplexity_increase_percent": 1.0, "max_accuracy_drop_points": 1.0}, "one accuracy bound"),
        ({"num_tokens": None}, "num_tokens is needed"),
        ({"codebook_size": 256}, "codebook_size"),
    ],
)
def test_bad_inputs_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        astra.plan(**{"num_tokens": 1024, "num_devices": 4, "bandwidth_mbps": 10, "profile": gpt2_profile(), **kwargs})


def test_plan_needs_a_model_or_a_profile_and_a_matching_one():
    with pytest.raises(ValueError, match="model or a DeviceProfile"):
        astra.plan(num_tokens=64, num_devices=2)
    model = build("gpt2", small=True).model
    with pytest.raises(ValueError, match="calibrate_device"):
        astra.plan(model, num_tokens=48, num_devices=2, profile=gpt2_profile())
    with pytest.raises(ValueError, match="missing field"):
        DeviceProfile.from_dict({"model_type": "gpt2"})


def test_balanced_shards_give_the_causal_last_rank_fewer_tokens():
    profile = gpt2_profile()
    config = astra.AstraConfig(num_devices=4, groups=1)
    sizes = balanced_shard_sizes(profile, 1024, config)
    assert sum(sizes) == 1024 and sizes[0] > sizes[-1] and min(sizes) >= 1
    even = predict_astra(profile, config, 1024, fast_link())
    balanced = predict_astra(profile, config.replace(shard_sizes=sizes), 1024, fast_link())
    assert max(balanced.compute_s) < max(even.compute_s)
    assert max(balanced.compute_s) - min(balanced.compute_s) < 0.05 * max(balanced.compute_s)


@pytest.mark.parametrize("workload", ["gpt2", "vit"])
def test_calibration_measures_positive_rates_and_leaves_a_patched_model_alone(workload):
    torch.manual_seed(0)
    built = build(workload, small=True)
    astra.patch(built.model, num_devices=2, groups=4, codebook_size=16)
    profile = astra.calibrate_device(built.model, num_tokens=48 if built.causal else None, groups=(1, 4), repeats=1,
                                     progress=False)  # fmt: skip
    assert astra.is_patched(built.model) and profile.codebook_size == 16  # the patched model's own K
    assert profile.causal == built.causal and profile.num_layers == 2 and profile.hidden_size == 64
    assert min(profile.measured_forward_s) > 0 and profile.per_token_s >= 0 and profile.fixed_s >= 0
    assert profile.attention_masked_s > 0 and profile.attention_full_s > 0 and profile.project_kv_s > 0
    assert set(profile.encode_s) == {"1/hidden", "1/kv", "4/hidden", "4/kv"} and min(profile.encode_s.values()) > 0
    assert DeviceProfile.from_dict(profile.to_dict()) == profile
    # one device's forward is timed at the planned length too: beyond the fitted lengths for causal models, among them for images
    assert profile.full_forward_s > 0 and (profile.full_tokens == 48 if built.causal else profile.full_tokens in profile.measured_tokens)
    assert (profile.full_tokens > max(profile.measured_tokens)) == built.causal
    result = astra.plan(built.model, num_tokens=None if not built.causal else built.num_tokens, num_devices=2, bandwidth_mbps=10,
                        profile=profile, groups=(1, 4))  # fmt: skip
    assert {p.method for p in result.predictions} >= {"single", "astra", "sp-fp16"}
    assert all(p.latency_s > 0 for p in result.predictions)
    assert result.summary().splitlines()[0].startswith("ASTRA plan:")


def probes_of(profile: DeviceProfile, ranks: list[int], tokens: int, settings=((1, "hidden"), (32, "kv")), world: int = 4) -> list:
    """What a rank forward would measure if the device were exactly ``profile`` (its overheads included)."""
    return [
        RankProbe(g, q, world, rank, tokens, rank_compute_s(profile, astra.AstraConfig(num_devices=world, groups=g, quantize=q,
                                                                                       shard_sizes=None), tokens, rank))  # fmt: skip
        for g, q in settings
        for rank in ranks
    ]


def test_fit_rank_overheads_recovers_known_send_and_receive_overheads():
    truth = {"1/hidden": [2e-3, 5e-4], "32/kv": [-3e-4, 4e-3]}  # per layer; a negative one: components overstate it
    measured = gpt2_profile(rank_overhead_s=truth)
    fitted = fit_rank_overheads(gpt2_profile(), probes_of(measured, [0, 3], 256))
    assert fitted.keys() == truth.keys()
    for key, (send, receive) in truth.items():
        assert fitted[key] == pytest.approx([send, receive], rel=1e-9, abs=1e-12)
    # A middle rank, never probed, sends and receives: predicted with both overheads, at any length.
    config = astra.AstraConfig(num_devices=4, groups=32, quantize="kv", shard_sizes=None)
    with_fit = dataclasses.replace(gpt2_profile(), rank_overhead_s=fitted)
    for tokens in (256, 1024):
        assert rank_compute_s(with_fit, config, tokens, 1) == pytest.approx(rank_compute_s(measured, config, tokens, 1))
        assert rank_compute_s(with_fit, config, tokens, 1) - rank_compute_s(gpt2_profile(), config, tokens, 1) == pytest.approx(
            12 * (truth["32/kv"][0] + truth["32/kv"][1]))


def test_fit_rank_overheads_at_two_n_predicts_overheads_that_grow_with_the_peers():
    # A device whose rank overheads grow with the number of peers (per layer: 1 ms + 0.5 ms per receiver to send,
    # 0.2 ms + 1.5 ms per source to receive, and 2 ms for every rank with a peer): probes at N=4 alone fit N=4 and
    # miss N=8; probes at N=4 and 8 (with a middle rank, which both sends and receives) fit every rank at every N.
    truth = {"1/hidden": [1e-3, 2e-4, 5e-4, 1.5e-3, 2e-3], "32/kv": [-1e-3, 3e-3, 5e-4, 1.5e-3, -5e-4]}  # per-peer: shared
    measured = gpt2_profile(rank_overhead_s=truth)
    two_n = probes_of(measured, [0, 3], 1024) + probes_of(measured, [0, 4, 7], 1024, world=8)
    fitted = fit_rank_overheads(gpt2_profile(), two_n)
    for key, values in truth.items():
        assert fitted[key] == pytest.approx(values, rel=1e-6, abs=1e-12)
    # Without the middle rank the common part cannot be told apart: it goes into send and receive (0 for common).
    ends = fit_rank_overheads(gpt2_profile(), probes_of(measured, [0, 3], 1024) + probes_of(measured, [0, 7], 1024, world=8))
    assert ends["1/hidden"] == pytest.approx([3e-3, 2.2e-3, 5e-4, 1.5e-3], rel=1e-6)
    one_n = fit_rank_overheads(gpt2_profile(), probes_of(measured, [0, 3], 1024))
    assert all(len(v) == 2 for v in one_n.values())  # one N: the fixed parts only, as version-2 profiles
    one_n_middle = fit_rank_overheads(gpt2_profile(), probes_of(measured, [0, 2, 3], 1024))  # + common, still no per-peer part
    assert all(len(v) == 5 and v[2:4] == [0.0, 0.0] for v in one_n_middle.values())
    with_two, with_one = gpt2_profile(rank_overhead_s=fitted), gpt2_profile(rank_overhead_s=one_n)
    for world in (2, 4, 6, 8, 16):
        config = astra.AstraConfig(num_devices=world, groups=1, quantize="hidden", shard_sizes=None)
        for rank in range(world):  # every rank, probed or not, at every N
            assert rank_compute_s(with_two, config, 1024, rank) == pytest.approx(rank_compute_s(measured, config, 1024, rank), rel=1e-9)
        assert predict_astra(with_two, config, 1024, LinkModel(10)).latency_s == pytest.approx(
            predict_astra(measured, config, 1024, LinkModel(10)).latency_s, rel=1e-9)
    config = astra.AstraConfig(num_devices=8, groups=1, quantize="hidden", shard_sizes=None)
    missed = rank_compute_s(measured, config, 1024, 7) - rank_compute_s(with_one, config, 1024, 7)
    assert missed == pytest.approx(12 * 1.5e-3 * (7 - 3))  # 4 more sources than at N=4, 1.5 ms each and layer
    doubled = rank_compute_s(gpt2_profile(rank_overhead_s=ends), config, 1024, 4) - rank_compute_s(measured, config, 1024, 4)
    assert doubled == pytest.approx(12 * 2e-3)  # a middle rank, fitted from the end ranks only, pays the common part twice
    # Bidirectional: every rank sends to and receives from N-1 peers; two N give the fixed and per-peer sums, split evenly.
    vit_truth = {"8/hidden": [1e-3, 3e-3, 2e-4, 6e-4]}
    vit_measured = dataclasses.replace(vit_profile(), rank_overhead_s=vit_truth)
    vit_fit = fit_rank_overheads(vit_profile(), probes_of(vit_measured, [0], 197, ((8, "hidden"),))
                                 + probes_of(vit_measured, [0], 197, ((8, "hidden"),), world=8))  # fmt: skip
    assert vit_fit["8/hidden"] == pytest.approx([2e-3, 2e-3, 4e-4, 4e-4])
    for world in (2, 4, 8):
        vit_config = astra.AstraConfig(num_devices=world, groups=8, quantize="hidden")
        assert predict_astra(dataclasses.replace(vit_profile(), rank_overhead_s=vit_fit), vit_config, 197, fast_link()).latency_s == (
            pytest.approx(predict_astra(vit_measured, vit_config, 197, fast_link()).latency_s))


def test_fit_rank_overheads_bidirectional_splits_the_sum_evenly():
    truth = {"8/hidden": [1e-3, 3e-3]}
    measured = dataclasses.replace(vit_profile(), rank_overhead_s=truth)
    fitted = fit_rank_overheads(vit_profile(), probes_of(measured, [0], 197, settings=((8, "hidden"),)))
    assert fitted["8/hidden"] == pytest.approx([2e-3, 2e-3])  # every ViT rank sends and receives: only the sum counts
    config = astra.AstraConfig(num_devices=4, groups=8, quantize="hidden")
    with_fit = dataclasses.replace(vit_profile(), rank_overhead_s=fitted)
    assert predict_astra(with_fit, config, 197, fast_link()).latency_s == pytest.approx(predict_astra(measured, config, 197, fast_link()).latency_s)
    with pytest.raises(ValueError, match="at least one RankProbe"):
        fit_rank_overheads(vit_profile(), [])
    with pytest.raises(ValueError, match="RankProbe.seconds"):
        fit_rank_overheads(vit_profile(), [RankProbe(8, "hidden", 4, 0, 197, 0.0)])


def test_measured_rank_overheads_can_make_plan_recommend_one_device():
    fast = astra.plan(num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=gpt2_profile())
    assert fast.recommended.method == "astra"
    keys = [f"{g}/{q}" for g in (1, 8, 16, 32) for q in ("hidden", "kv")]
    costly = gpt2_profile(rank_overhead_s={k: [0.1, 0.1] for k in keys})  # 2.4 s a forward of per-layer fixed work
    slow = astra.plan(num_tokens=1024, num_devices=4, bandwidth_mbps=10, profile=costly)
    assert slow.recommended.method == "single" and "slower than one device" in slow.summary()
    for p in slow.predictions:
        if p.method == "astra":
            assert p.latency_s > fast.prediction("astra", p.groups, p.quantize).latency_s + 12 * 0.1


def test_profile_versions_old_loads_unknown_fails_clearly():
    old = {k: v for k, v in gpt2_profile().to_dict().items() if k not in ("rank_overhead_s", "probe_tokens", "probe_devices")}
    loaded = DeviceProfile.from_dict({**old, "version": 1})
    assert loaded.rank_overhead_s == {} and loaded.version == 1 and loaded.probe_devices == []
    # Version 2: one N of probes as an int, [send, receive] per setting; predicts as before (no per-peer parts).
    v2 = DeviceProfile.from_dict({**old, "version": 2, "rank_overhead_s": {"8/hidden": [1e-3, 2e-3]}, "probe_tokens": 1024,
                                  "probe_devices": 4})  # fmt: skip
    assert v2.probe_devices == [4] and v2.version == 2
    assert DeviceProfile.from_dict({**old, "version": 2, "probe_devices": 0}).probe_devices == []
    for world in (4, 8):
        config = astra.AstraConfig(num_devices=world, groups=8, quantize="hidden", shard_sizes=None)
        assert rank_compute_s(v2, config, 1024, world - 1) - rank_compute_s(gpt2_profile(), config, 1024, world - 1) == pytest.approx(12 * 2e-3)
    v3 = gpt2_profile(rank_overhead_s={"8/hidden": [1e-3, 2e-3, 1e-4, 3e-4]}, probe_tokens=1024, probe_devices=[4, 8])
    assert v3.version == 3 and DeviceProfile.from_dict(json.loads(json.dumps(v3.to_dict()))) == v3
    config = astra.AstraConfig(num_devices=4, groups=8)
    assert predict_astra(loaded, config, 1024, fast_link()).latency_s == predict_astra(gpt2_profile(), config, 1024, fast_link()).latency_s
    with pytest.raises(ValueError, match="version 99 .*calibrate again"):
        DeviceProfile.from_dict({**old, "version": 99})


def test_calibration_times_every_setting_on_patched_ranks_and_fits_them():
    built = build("gpt2", small=True)
    calls = []

    def rank_forward(model, rank, inputs):
        config = astra_state(model).config  # patched for this setting, N=4, even shards
        calls.append((config.groups, config.quantize, config.num_devices, rank, inputs["input_ids"].shape[1]))
        return lambda: time.sleep(0.02 + 0.01 * rank)

    profile = astra.calibrate_device(built.model, num_tokens=48, groups=(1, 4), repeats=1, progress=False,
                                     rank_forward=rank_forward, probe_tokens=32, probe_repeats=2, probe_devices=4)  # fmt: skip
    assert not astra.is_patched(built.model)
    assert sorted(set(calls)) == sorted((g, q, 4, r, 32) for g in (1, 4) for q in ("hidden", "kv") for r in (0, 2, 3))
    assert set(profile.rank_overhead_s) == {"1/hidden", "1/kv", "4/hidden", "4/kv"}
    assert (profile.probe_tokens, profile.probe_devices, profile.version) == (32, [4], 3)
    for g in (1, 4):
        config = astra.AstraConfig(num_devices=4, groups=g, quantize="kv", shard_sizes=None)
        for rank, slept in ((0, 0.02), (2, 0.04), (3, 0.05)):  # the fitted profile reproduces each probed rank's time
            assert rank_compute_s(profile, config, 32, rank) == pytest.approx(slept, rel=0.5)
    assert DeviceProfile.from_dict(profile.to_dict()) == profile


def test_calibration_probes_two_n_by_default_and_fits_per_peer_overheads():
    built = build("gpt2", small=True)
    calls = []

    def rank_forward(model, rank, inputs):  # the last rank's time grows with its sources (N-1): a per-peer cost
        config = astra_state(model).config
        calls.append((config.num_devices, rank))
        return lambda: time.sleep(0.04 if rank == 0 else 0.02 * (config.num_devices - 1))  # >> the tiny model's components, even under load

    profile = astra.calibrate_device(built.model, num_tokens=48, groups=(4,), repeats=1, progress=False, rank_forward=rank_forward,
                                     probe_tokens=32, probe_repeats=2)  # fmt: skip
    assert sorted(set(calls)) == [(4, 0), (4, 3), (8, 0), (8, 4), (8, 7)] and profile.probe_devices == [4, 8]
    assert all(len(v) == 5 for v in profile.rank_overhead_s.values())
    for world in (4, 8):
        config = astra.AstraConfig(num_devices=world, groups=4, quantize="kv", shard_sizes=None)
        last = rank_compute_s(profile, config, 32, world - 1)
        assert last == pytest.approx(0.02 * (world - 1), rel=0.5)  # both N reproduced, from one profile
    per_source = profile.rank_overhead_s["4/kv"][3]
    assert per_source * 2 == pytest.approx(0.02, rel=0.5)  # 20 ms per source over the small model's 2 layers
    with pytest.raises(ValueError, match="probe_devices"):
        astra.calibrate_device(built.model, num_tokens=48, groups=(4,), repeats=1, progress=False, rank_forward=rank_forward,
                               probe_devices=(4, 1))  # fmt: skip
    with pytest.raises(ValueError, match="probe_devices"):
        astra.calibrate_device(built.model, num_tokens=48, groups=(4,), repeats=1, progress=False, rank_forward=rank_forward,
                               probe_devices=())  # fmt: skip


def test_validation_reports_latency_against_the_rows_own_one_device():
    from benchmarks.validate_planner import machine_key, markdown, validate

    profile = gpt2_profile()
    machine = "host (notes): CPU, 2 cores"
    row = {"machine": machine, "model": "gpt2", "tokens": 1024, "N": 4, "method": "astra", "label": "astra G=8 hidden",
           "G": 8, "quantize": "hidden", "codebook_size": 1024, "link": "compute", "bandwidth_mbps": None, "median_s": 2.0,
           "p10_s": 1.9, "p90_s": 2.1, "command": "cmd", "threads_per_rank": 1, "settings": {"projection_table": True}}  # fmt: skip
    old_row = {**row, "speedup_vs_single": 1.5}  # an older row: no single_median_s, its measured speed-up instead
    new_row = {**row, "speedup_vs_single": 1.5, "single_median_s": 3.3}
    profiles = {(machine_key(machine), "gpt2", 1, 1024): profile}
    old, new = validate([old_row, new_row], profiles)
    config = astra.AstraConfig(num_devices=4, groups=8, shard_sizes=None)
    predicted = predict_astra(profile, config, 1024, LinkModel(1e9, per_message_s=0.0)).latency_s
    speedup = profile.forward_s(1024) / predicted
    assert new["predicted_speedup"] == pytest.approx(speedup)
    assert new["error_vs_own_single"] == pytest.approx(3.3 / speedup / 2.0 - 1)
    assert old["error_vs_own_single"] == pytest.approx(1.5 * 2.0 / speedup / 2.0 - 1)
    assert new["error"] == pytest.approx(predicted / 2.0 - 1)  # the plain latency error stays
    text = markdown([old, new], profiles)
    assert "latency from own one device" in text and f"{100 * new['error_vs_own_single']:+.0f} %" in text
    # The ranks' own compute (wall time less waits) against the model's, at the run's speed (its one device's scale).
    compute = predict_astra(profile, config, 1024, LinkModel(1e9, per_message_s=0.0)).compute_s
    scale = 3.3 / profile.forward_s(1024)
    measured = [1.1 * c * scale for c in compute[:3]] + [1.5 * compute[3] * scale]
    (ranked,) = validate([{**new_row, "per_rank_compute_s": measured}], profiles)
    assert ranked["rank_compute_error_vs_own_single"] == pytest.approx(0.1)  # the median rank: 10 % beyond the model
    assert old["rank_compute_error_vs_own_single"] is None and new["rank_compute_error_vs_own_single"] is None
    assert "+10 %" in markdown([ranked], profiles)


def test_validation_needs_a_profile_of_the_rows_codebook_size():
    from benchmarks.validate_planner import machine_key, validate

    machine = "host: CPU, 2 cores"
    row = {"machine": machine, "model": "gpt2", "tokens": 1024, "N": 4, "method": "astra", "label": "astra G=32 kv K=256",
           "G": 32, "quantize": "kv", "codebook_size": 256, "link": "compute", "bandwidth_mbps": None, "median_s": 1.0,
           "p10_s": 0.9, "p90_s": 1.1, "command": "cmd", "threads_per_rank": 1}  # fmt: skip
    skipped = []
    assert validate([row], {(machine_key(machine), "gpt2", 1, 1024): gpt2_profile()}, skipped) == [] and skipped == [row]
    k256 = gpt2_profile(codebook_size=256)
    (predicted,) = validate([row], {(machine_key(machine), "gpt2", 1, 1024): gpt2_profile(), (machine_key(machine), "gpt2", 1, 256): k256})
    config = astra.AstraConfig(num_devices=4, groups=32, quantize="kv", codebook_size=256, shard_sizes=None)
    assert predicted["predicted_s"] == pytest.approx(predict_astra(k256, config, 1024, LinkModel(1e9, per_message_s=0.0), False).latency_s)


def test_the_validation_page_names_the_rows_it_could_not_predict_and_why():
    from benchmarks.validate_planner import machine_key, markdown, validate

    machine, elsewhere = "host: CPU, 2 cores", "another host: CPU, 2 cores; call 0514"
    row = {"machine": machine, "model": "gpt2", "tokens": 1024, "N": 4, "method": "astra", "label": "astra G=32 kv K=256",
           "G": 32, "quantize": "kv", "codebook_size": 256, "link": "compute", "bandwidth_mbps": None, "median_s": 1.0,
           "p10_s": 0.9, "p90_s": 1.1, "command": "cmd", "threads_per_rank": 1}  # fmt: skip
    unprofiled = {**row, "machine": elsewhere, "model": "vit", "label": "astra G=8 kv", "codebook_size": 1024, "G": 8}
    profiles = {(machine_key(machine), "gpt2", 1, 1024): gpt2_profile()}
    skipped = []
    assert validate([row, unprofiled], profiles, skipped) == [] and skipped == [row, unprofiled]
    page = markdown([], profiles, None, skipped)
    assert "Not predicted: 1 row(s) of a profiled machine and model at a codebook size or G that no profile timed (host, gpt2, astra G=32 kv K=256)" in page
    assert f"Not predicted: 1 row(s) of a machine, model and thread count without a profile: {elsewhere} (vit, 1 thread(s))." in page


# ------------------------------------------------------------------------- rank probes, no network
def loopback_runtime(model, rank: int):
    from transformers_astra.distributed import DistributedRuntime, LoopbackTransport

    return DistributedRuntime(model, check_inputs=False, transport=LoopbackTransport(rank, astra_state(model).config.num_devices, astra_state(model).config))


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_loopback_rank_runs_that_ranks_work_and_counts_its_codes(name):
    from transformers_astra.transport import payload_bytes

    built, plain = build(name, small=True), build(name, small=True).model
    config = astra.AstraConfig(num_devices=4, groups=4, quantize="hidden")
    astra.patch(built.model, config)
    layers = built.model.config.num_hidden_layers
    for rank in range(4):
        runtime = loopback_runtime(built.model, rank)
        with torch.inference_mode():
            out = runtime(**built.inputs)
        layout, traffic = runtime.layout, runtime.traffic
        # the rank's own output: its shard's logits (causal), the pooled classification (ViT)
        assert out.logits.shape == ((1, layout.sizes[rank], 101) if built.causal else (1, 10))
        sources = [s for s in range(4) if s < rank or (s != rank and not built.causal)]
        # it encoded (and sent) exactly when a peer needs its codes: never on the last causal rank
        assert traffic.sent["codes"] == expected_code_bytes(config, layout, rank, 1, layers, built.causal)
        assert (traffic.sent["codes"] == 0) == (built.causal and rank == 3)
        assert traffic.code_bytes_per_layer == [traffic.sent["codes"] // layers] * layers  # one exchange per layer
        assert traffic.received["codes"] == layers * sum(payload_bytes(config, layout, s, 1) for s in sources)
        assert traffic.sent["pooling"] == (0 if built.causal else 3 * 4 * built.model.config.hidden_size)  # ViT's pooled CLS
        assert runtime.timings.waited_s == 0.0 and runtime.timings.total_s > 0
    if built.causal:  # rank 0 receives nothing: its logits are the plain model's on its shard, exactly
        runtime = loopback_runtime(built.model, 0)
        with torch.inference_mode():
            logits = runtime(**built.inputs).logits
            reference = plain(input_ids=built.inputs["input_ids"][:, : runtime.layout.sizes[0]]).logits
        torch.testing.assert_close(logits, reference)
        with pytest.raises(ValueError, match="generate needs a process group"):
            runtime.generate(built.inputs["input_ids"], max_new_tokens=1)


def test_loopback_transport_named_errors():
    from transformers_astra.distributed import DistributedRuntime, LoopbackTransport

    config = astra.AstraConfig(num_devices=4, groups=4)
    with pytest.raises(ValueError, match="rank must be < world_size=4"):
        LoopbackTransport(4, 4, config)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        LoopbackTransport(0, 0, config)
    built = build("gpt2", small=True)
    astra.patch(built.model, config)
    with pytest.raises(ValueError, match="given without group or secret"):
        DistributedRuntime(built.model, secret="s", transport=LoopbackTransport(0, 4, config))
    with pytest.raises(ValueError, match="transport must be a LoopbackTransport"):
        DistributedRuntime(built.model, transport=object())
    with pytest.raises(ValueError, match="num_devices=4"):
        DistributedRuntime(built.model, transport=LoopbackTransport(0, 2, config))


EMULATED = r"""
import json, time, torch
from benchmarks import links
links.install()
import torch.distributed as dist
import transformers_astra as astra
from transformers import GPT2Config, GPT2LMHeadModel
from transformers_astra.distributed import DistributedRuntime
from transformers_astra.planner import loopback_rank_forward
from benchmarks.profile_astra import as_rank
from benchmarks.workloads import build
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
links.set_mode("compute", None)
built = build("gpt2", small=True)
astra.patch(built.model, astra.AstraConfig(num_devices=4, groups=4, quantize="%s"))
calls = {}
for rank in (0, 3):
    with as_rank(rank, 4):
        emulated = DistributedRuntime(built.model, check_inputs=False)
    def emulated_forward(rank=rank, runtime=emulated):
        with as_rank(rank, 4):
            runtime(**built.inputs)
    calls[f"emulated {rank}"] = emulated_forward
    calls[f"loopback {rank}"] = loopback_rank_forward(built.model, rank, built.inputs)
best = dict.fromkeys(calls, float("inf"))
with torch.inference_mode():
    for _ in range(15):
        for name, call in calls.items():
            start = time.perf_counter(); call(); best[name] = min(best[name], time.perf_counter() - start)
print(json.dumps(best))
"""


@pytest.mark.parametrize("quantize", ["hidden", "kv"])
def test_loopback_rank_takes_about_the_benchmarks_emulated_ranks_time(quantize):
    """The library's rank probe against the benchmarks' emulated rank (one-process gloo group, `links` in compute
    mode, `profile_astra.as_rank`), same tiny model and setting: the same order of time (a subprocess: `links`
    wraps torch.distributed's collectives for the whole process)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    script = EMULATED % (29600 + os.getpid() % 300 + (quantize == "kv"), quantize)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads(done.stdout.strip().splitlines()[-1])
    for rank in (0, 3):
        assert 1 / 3 < best[f"loopback {rank}"] / best[f"emulated {rank}"] < 3, best


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_calibration_with_rank_probes_fits_every_setting_and_plan_uses_them(name):
    built = build(name, small=True)
    profile = astra.calibrate_device(built.model, num_tokens=48 if built.causal else None, groups=(1, 4), repeats=1,
                                     progress=False, rank_probes=True, probe_repeats=1)  # fmt: skip
    assert not astra.is_patched(built.model)
    with pytest.raises(ValueError, match="rank_probes must be True or False"):
        astra.calibrate_device(built.model, rank_probes="yes")
    settings = {f"{g}/{q}" for g in (1, 4) for q in ("hidden", "kv")}
    assert profile.version == 3 and set(profile.rank_overhead_s) == settings
    assert all(len(v) == (5 if built.causal else 4) and all(map(math.isfinite, v)) for v in profile.rank_overhead_s.values())
    assert (profile.probe_devices, profile.probe_tokens) == ([4, 8], 48 if built.causal else 17)
    if not built.causal:  # every ViT rank sends and receives: the fitted sums are split evenly
        assert all(v[0] == pytest.approx(v[1]) and v[2] == pytest.approx(v[3]) for v in profile.rank_overhead_s.values())
    assert DeviceProfile.from_dict(profile.to_dict()) == profile
    components = dataclasses.replace(profile, rank_overhead_s={})
    tokens = 48 if built.causal else None
    with_probes = astra.plan(built.model, num_tokens=tokens, num_devices=4, bandwidth_mbps=1e6, profile=profile, groups=(1, 4))
    without = astra.plan(built.model, num_tokens=tokens, num_devices=4, bandwidth_mbps=1e6, profile=components, groups=(1, 4))
    layers = built.model.config.num_hidden_layers
    for key, values in profile.rank_overhead_s.items():
        send, receive, per_receiver, per_source, common = values + [0.0] * (5 - len(values))
        g, q = key.split("/")
        probed, plain = with_probes.prediction("astra", int(g), q), without.prediction("astra", int(g), q)
        send, receive = send + 3 * per_receiver + common, receive + 3 * per_source + common  # at N=4: 3 peers
        first = send + (0.0 if built.causal else receive)  # causal rank 0 only sends
        assert probed.compute_s[0] - plain.compute_s[0] == pytest.approx(layers * first, abs=1e-12)
        assert probed.compute_s[3] - plain.compute_s[3] == pytest.approx(layers * (receive + (0.0 if built.causal else send)), abs=1e-12)


def test_summary_says_whether_rank_overheads_were_probed():
    probed = gpt2_profile(rank_overhead_s={"8/hidden": [1e-3, 2e-3]}, probe_devices=4, probe_tokens=1024)
    head = astra.plan(num_tokens=1024, num_devices=4, profile=probed, groups=(8,)).summary().splitlines()[0]
    assert head.endswith("rank overheads probed at N=4, 1024 tokens")
    assert astra.plan(num_tokens=1024, num_devices=4, profile=gpt2_profile(), groups=(8,)).summary().splitlines()[0].endswith("(no rank probes)")


def test_plan_calibrates_with_rank_probes_when_asked():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=97)).eval()
    probed = astra.plan(model, num_tokens=64, num_devices=2, groups=(8,), quantize=("hidden",), rank_probes=True)
    assert probed.profile.probe_devices == [2] and set(probed.profile.rank_overhead_s) >= {"8/hidden"}
    assert probed.summary().splitlines()[0].endswith("rank overheads probed at N=2, 64 tokens")
    plain = astra.plan(model, num_tokens=64, num_devices=2, groups=(8,), quantize=("hidden",))
    assert plain.profile.rank_overhead_s == {} and plain.summary().splitlines()[0].endswith("(no rank probes)")
    with pytest.raises(ValueError, match="rank_probes"):
        astra.plan(model, num_tokens=64, num_devices=2, groups=(8,), rank_probes="yes")


def test_colocated_probes_run_every_rank_at_once_on_its_own_cores():
    from types import SimpleNamespace

    from benchmarks.validate_planner import colocated_probes

    args = SimpleNamespace(workload="gpt2", tokens=16, codebook_size=None, colocated=1, probe_devices=[2], threads=1, probe_repeats=1)
    probes = colocated_probes(args, [(8, "hidden")], 16)
    assert sorted((p.num_devices, p.rank, p.groups, p.quantize, p.num_tokens) for p in probes) == [(2, 0, 8, "hidden", 16),
                                                                                                  (2, 1, 8, "hidden", 16)]  # fmt: skip
    assert all(0 < p.seconds < 60 for p in probes)
    with pytest.raises(SystemExit, match="needs .* cores"):
        colocated_probes(SimpleNamespace(**{**vars(args), "probe_devices": [os.cpu_count() + 1]}), [(8, "hidden")], 16)


def test_one_device_is_the_fit_up_to_the_fitted_lengths_then_corrected_by_the_forward_at_the_planned_length():
    fitted = gpt2_profile(measured_tokens=[128, 256, 512])
    assert fitted.forward_s(1024) == fitted.fitted_forward_s(1024)  # not timed at 1024 (profiles before it was)
    profile = dataclasses.replace(fitted, full_tokens=1024, full_forward_s=1.5 * fitted.fitted_forward_s(1024))
    assert profile.forward_s(512) == fitted.forward_s(512) and profile.forward_s(300) == fitted.forward_s(300)
    assert profile.forward_s(1024) == pytest.approx(1.5 * fitted.forward_s(1024))
    assert profile.forward_s(768) == pytest.approx(1.25 * fitted.forward_s(768))  # halfway from 512 to 1024
    assert profile.forward_s(2048) == pytest.approx(1.5 * fitted.forward_s(2048))
    single = predict_baseline(profile, "single", 1024, 1, fast_link())
    assert single.latency_s == pytest.approx(profile.full_forward_s)
    assert DeviceProfile.from_dict(profile.to_dict()) == profile
    # a version-3 profile saved before the field existed loads as not timed
    old = {k: v for k, v in fitted.to_dict().items() if k not in ("full_tokens", "full_forward_s")}
    assert DeviceProfile.from_dict(old).forward_s(1024) == fitted.forward_s(1024)


def test_profile_files_of_a_tagged_host_do_not_replace_their_kinds(tmp_path):
    from benchmarks.validate_planner import profile_path

    kind = "GPU host (nvidia kind, CPU cores only): Intel Xeon, 32 cores"
    plain = profile_path(tmp_path, kind, "gpt2", 2)
    tagged = profile_path(tmp_path, kind + "; 2026-11-28 call A", "gpt2", 2)
    assert plain.name == "gpt2-2t-gpu-host-nvidia-kind-cpu-cores-only.json"
    assert tagged.name == "gpt2-2t-gpu-host-nvidia-kind-cpu-cores-only-2026-11-28-call-a.json"
    assert profile_path(tmp_path, kind + "; 2026-11-28 call A", "gpt2", 2, 256).name.startswith("gpt2-2t-k256-gpu-host")
