import json

import pytest

import transformers_astra as astra
from transformers_astra.config import validate_timeout


def test_defaults_and_bits():
    config = astra.AstraConfig(num_devices=4, groups=32)
    assert config.codebook_size == 1024 and config.noise_scale == 1.0 and config.commitment_weight == 1e-4
    assert config.bits_per_token == 320
    assert config.compression_ratio(768) == pytest.approx(76.8)
    assert astra.AstraConfig(groups=1).compression_ratio(768) == pytest.approx(2457.6)
    kv = astra.AstraConfig(groups=32, quantize="kv")
    assert kv.bits_per_token == 640 and kv.codes_per_token == 64


def test_json_round_trip():
    config = astra.AstraConfig(num_devices=3, groups=8, quantize="kv", shard_sizes=[1, 2, 1])
    again = astra.AstraConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_devices", 0),
        ("num_devices", 2.5),
        ("codebook_size", 1),
        ("groups", 0),
        ("quantize", "keys"),
        ("noise_scale", -1.0),
        ("commitment_weight", float("nan")),
        ("noise_granularity", "token"),
        ("distributed_cls", "yes"),
        ("codebook_size", 2**16 + 1),  # codes are packed at 1 to 16 bits
        ("codebook_size", 2**40),
        ("noise_scale", float("inf")),
        ("noise_scale", 1e308),
        ("noise_scale", 101.0),
        ("commitment_weight", 1e300),
        ("commitment_weight", 10**400),  # an int too large for a float
        ("noise_scale", "1.0"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        astra.AstraConfig(**{field: value})


def test_shard_sizes_must_match_devices():
    with pytest.raises(ValueError, match="shard_sizes"):
        astra.AstraConfig(num_devices=3, shard_sizes=[1, 2])
    with pytest.raises(ValueError, match="shard_sizes"):
        astra.AstraConfig(num_devices=2, shard_sizes=[1, 0])


@pytest.mark.parametrize(
    "sizes", [[1, float("inf")], [1, 1e308], [1e308, 1e308], [1, float("nan")], [10**400, 1], [2**31 + 1, 1], ["1", 1], [True, 1]]
)
def test_shard_sizes_must_be_finite_and_bounded(sizes):
    with pytest.raises(ValueError, match="AstraConfig.shard_sizes"):
        astra.AstraConfig(num_devices=2, shard_sizes=sizes)


def test_largest_allowed_values_are_accepted():
    config = astra.AstraConfig(codebook_size=2**16, noise_scale=100.0, commitment_weight=100, shard_sizes=[2**31, 0.5])
    assert config.bits_per_code == 16


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e308, "5", None, 0, -1.0, True, 10**400])
def test_bad_timeouts_are_refused_by_name(timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        validate_timeout(timeout)


def test_good_timeouts_come_back_as_floats():
    assert validate_timeout(5) == 5.0 and validate_timeout(0.25) == 0.25 and validate_timeout(7 * 24 * 3600) == 604800.0


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        astra.AstraConfig.from_dict({"bogus": 1})


def test_runtime_refuses_a_bad_timeout_by_name(tmp_path):
    import torch.distributed as dist
    from conftest import make_pair, tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=1, groups=4, codebook_size=16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for timeout in (float("inf"), "5", float("nan"), 0):
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                astra.DistributedRuntime(model, timeout=timeout)
    finally:
        dist.destroy_process_group()


def test_sequence_longer_than_the_positions_is_a_named_error():
    from conftest import make_pair, tiny_gpt2_config, tiny_vit_config
    from transformers import GPT2LMHeadModel, ViTModel

    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config(n_positions=16))
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    adapter = model._astra_state.adapter
    assert adapter.max_positions(model) == 16 == model.config.max_position_embeddings
    adapter.check_sequence_length(model, 16)
    with pytest.raises(ValueError, match="needs 17 positions but this gpt2 model has 16"):
        adapter.check_sequence_length(model, 17)
    vit, _ = make_pair(ViTModel, tiny_vit_config())
    astra.patch(vit, num_devices=2, groups=4, codebook_size=16)
    assert vit._astra_state.adapter.max_positions(vit) is None  # patches: no position limit to check here
    vit._astra_state.adapter.check_sequence_length(vit, 10**6)
