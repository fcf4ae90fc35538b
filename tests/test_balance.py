"""Balanced shards (`balance`): the sizes, their properties, and what the planner predicts for them."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_gpt2_config, tiny_vit_config
from transformers import GPT2LMHeadModel, ViTForImageClassification

import transformers_astra as astra
from transformers_astra.balance import ShardCosts, balanced_sizes, rank_costs
from transformers_astra.distributed import PROJECTION_TABLE_MAX_BYTES
from transformers_astra.patch import astra_state
from transformers_astra.planner import DeviceProfile, LinkModel, predict_astra

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(1, "hidden"), (8, "hidden"), (8, "kv"), (16, "hidden"), (32, "hidden"), (32, "kv")]


def gpt2_costs(groups: int, quantize: str, num_devices: int = 4) -> ShardCosts:
    config = astra.AstraConfig(num_devices=num_devices, groups=groups, quantize=quantize)
    return ShardCosts.for_model(768, 768, config, PROJECTION_TABLE_MAX_BYTES)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(1, 5000), devices=st.integers(1, 9), width=st.sampled_from([32, 64, 768, 4096]),
    setting=st.sampled_from(SETTINGS),
)
def test_sizes_sum_to_the_length_and_every_shard_has_a_token(tokens, devices, width, setting):
    if tokens < devices:
        with pytest.raises(ValueError, match=f"num_devices={devices}"):
            balanced_sizes(tokens, devices, gpt2_costs(*setting))
        return
    config = astra.AstraConfig(num_devices=devices, groups=setting[0], quantize=setting[1])
    costs = ShardCosts.for_model(width, width, config, PROJECTION_TABLE_MAX_BYTES)
    sizes = balanced_sizes(tokens, devices, costs)
    assert len(sizes) == devices and sum(sizes) == tokens and min(sizes) >= 1
    assert all(isinstance(size, int) for size in sizes)
    base = tokens // devices
    even = [base + (1 if i < tokens % devices else 0) for i in range(devices)]
    assert max(rank_costs(costs, sizes)) <= max(rank_costs(costs, even))  # never worse than even shards


@pytest.mark.parametrize("groups, quantize", SETTINGS)
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_earlier_ranks_get_more_tokens(groups, quantize, devices):
    # Every rank that sends codes attends to more keys and rebuilds more tokens than the one before it;
    # the last rank encodes nothing, so it may take more than the rank before it.
    sizes = balanced_sizes(1024, devices, gpt2_costs(groups, quantize, devices))
    senders = sizes[:-1]
    assert list(senders) == sorted(senders, reverse=True), sizes
    costs = rank_costs(gpt2_costs(groups, quantize, devices), sizes)
    even_costs = rank_costs(gpt2_costs(groups, quantize, devices), [1024 // devices] * devices)
    assert max(costs) / min(costs) < max(even_costs) / min(even_costs)


def test_gpt2_n4_g32_hidden_sizes():
    # The worked case of docs/benchmarks.md ("Balanced shards"): G=32, K=1024 without projection tables (201 MB a
    # layer, over the default limit), so the later ranks decode and project what they receive; with tables
    # (a runtime given a larger limit) the received tokens cost less and the shards are nearer even.
    assert balanced_sizes(1024, 4, gpt2_costs(32, "hidden")) == (312, 261, 221, 230)
    config = astra.AstraConfig(num_devices=4, groups=32, quantize="hidden")
    assert balanced_sizes(1024, 4, ShardCosts.for_model(768, 768, config, 256 * 2**20)) == (270, 251, 235, 268)


def test_same_sizes_from_every_process_and_the_config_round_trip():
    assert astra.AstraConfig().shard_sizes is None  # even by default: balanced was slower on real links (docs/benchmarks.md)
    model = astra.patch(GPT2LMHeadModel(tiny_gpt2_config()).eval(), num_devices=3, groups=4, codebook_size=16, shard_sizes="balanced")
    state = astra_state(model)
    assert state.config.shard_sizes == "balanced"
    sizes = state.layout(40).sizes
    assert sizes == balanced_sizes(40, 3, state.shard_costs) and sizes[0] > sizes[1]
    # A pure function of (T, N, config, widths): a second model built the same way agrees.
    other = astra_state(astra.patch(GPT2LMHeadModel(tiny_gpt2_config()).eval(), num_devices=3, groups=4, codebook_size=16,
                                    shard_sizes="balanced"))
    assert other.layout(40).sizes == sizes
    assert astra.AstraConfig.from_dict(state.config.to_dict()).shard_sizes == "balanced"


def test_bidirectional_models_stay_even():
    model = astra.patch(ViTForImageClassification(tiny_vit_config()).eval(), num_devices=3, groups=4, codebook_size=16,
                        shard_sizes="balanced")
    assert astra_state(model).layout(16 + 3).sizes == (7, 6, 6)


def test_bad_shard_sizes_name_the_field():
    with pytest.raises(ValueError, match="AstraConfig.shard_sizes must be 'balanced', None or a list"):
        astra.AstraConfig(num_devices=2, shard_sizes="even")


def test_the_planner_predicts_flatter_rank_times_for_balanced_shards():
    record = json.loads((ROOT / "docs/results/device_profiles/gpt2-1t-dev-vm-shared-with-other-engineers-jobs.json").read_text())
    profile = DeviceProfile.from_dict(record["profile"])
    free = LinkModel(1e6)
    for groups, quantize in [(8, "hidden"), (8, "kv"), (32, "hidden"), (32, "kv")]:
        config = astra.AstraConfig(num_devices=4, groups=groups, quantize=quantize, shard_sizes="balanced")
        balanced = predict_astra(profile, config, 1024, free).compute_s
        even = predict_astra(profile, config.replace(shard_sizes=None), 1024, free).compute_s
        assert max(balanced) / min(balanced) < max(even) / min(even), (groups, quantize, balanced, even)
        assert max(balanced) < max(even)
