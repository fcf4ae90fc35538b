import json

import pytest

import transformers_astra as astra


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


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        astra.AstraConfig.from_dict({"bogus": 1})
