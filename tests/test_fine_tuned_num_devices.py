"""The device counts a checkpoint was fine-tuned at (``fine_tuned_num_devices`` in its quantization config):
recorded by the fine-tuning callbacks, saved and loaded with the checkpoint, read by `astra.from_pretrained`'s
N warning and by the model card, validated, absent from the distributed handshake."""

import json
import logging
import warnings

import pytest
import torch
from conftest import gpt2_batch, main_output, make_pair, tiny_gpt2_config
from test_callback import TokenBlocks, training_args
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, Trainer

import transformers_astra as astra
from transformers_astra.handshake import check_same_model
from transformers_astra.patch import astra_state, fine_tuned_num_devices, record_fine_tuned_num_devices
from transformers_astra.random_shards import RandomShardsCallback

SETTINGS = dict(num_devices=4, groups=4, codebook_size=16)


def calibrated_gpt2(**settings):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, **{**SETTINGS, **settings})
    astra.calibrate(model, [gpt2_batch(batch=4)], progress=False)
    return model


def saved(tmp_path, fine_tuned, name="ckpt"):
    model = calibrated_gpt2()
    if fine_tuned is not None:
        record_fine_tuned_num_devices(model, fine_tuned)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def config_json(directory):
    return json.loads((directory / "config.json").read_text())


def num_devices_warnings(record):
    return [str(w.message) for w in record if "num_devices" in str(w.message)]


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("load", [AutoModelForCausalLM.from_pretrained, astra.from_pretrained])
def test_the_record_round_trips_through_save_and_load(tmp_path, load):
    model, directory = saved(tmp_path, [8, 2, 4, 3, 6, 2])
    assert fine_tuned_num_devices(model) == [2, 3, 4, 6, 8]  # sorted, without repeats
    assert config_json(directory)["quantization_config"]["fine_tuned_num_devices"] == [2, 3, 4, 6, 8]
    loaded = load(directory)
    assert fine_tuned_num_devices(loaded) == [2, 3, 4, 6, 8]
    assert astra_state(loaded).config == astra_state(model).config  # the AstraConfig is untouched by the record
    batch = gpt2_batch(batch=2, length=12)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded.eval()(**batch)), main_output(model.eval()(**batch)), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # and it survives a second save
    assert config_json(tmp_path / "again")["quantization_config"]["fine_tuned_num_devices"] == [2, 3, 4, 6, 8]


def test_the_record_does_not_change_the_forward_or_patch_equality():
    model, plain = calibrated_gpt2(), calibrated_gpt2()
    record_fine_tuned_num_devices(model, [2, 8])
    batch = gpt2_batch(batch=2, length=12)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**batch)), main_output(plain(**batch)), rtol=0, atol=0)
    assert astra_state(model).config == astra_state(plain).config
    assert astra.patch(model, astra.AstraConfig(**SETTINGS)) is model  # re-patching with the same settings: no-op
    assert fine_tuned_num_devices(model) == [2, 8]
    astra.set_shards(model, 3)  # a config replacement keeps the record
    assert fine_tuned_num_devices(model) == [2, 8] and model.config.quantization_config.num_devices == 3


def test_old_checkpoints_without_the_key_load_as_unknown(tmp_path):
    _, directory = saved(tmp_path, None)
    config = config_json(directory)
    assert config["quantization_config"]["fine_tuned_num_devices"] is None
    del config["quantization_config"]["fine_tuned_num_devices"]  # as saved before the key existed
    (directory / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert fine_tuned_num_devices(loaded) is None
    block = {k: v for k, v in config["quantization_config"].items() if k != "codebooks"}
    assert astra.AstraQuantizationConfig.from_dict(block).fine_tuned_num_devices is None
    with pytest.warns(UserWarning, match="saved with num_devices=4; loading it with num_devices=2"):
        astra.from_pretrained(directory, num_devices=2)  # today's warning


# ------------------------------------------------------------------------------------------ bad values


BAD_VALUES = [[], [0, 2], [2, -1], [True], [2.0], "4", 4, [[2]], {"2": 1}]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_values_raise_naming_the_field(value):
    with pytest.raises(ValueError, match=r"AstraQuantizationConfig\.fine_tuned_num_devices must be"):
        astra.AstraQuantizationConfig(fine_tuned_num_devices=value, **SETTINGS)
    model = calibrated_gpt2()
    with pytest.raises(ValueError, match="fine_tuned_num_devices"):
        record_fine_tuned_num_devices(model, value)
    assert fine_tuned_num_devices(model) is None  # unchanged after the error


@pytest.mark.parametrize("load", [AutoModelForCausalLM.from_pretrained, astra.from_pretrained])
def test_a_bad_value_in_config_json_is_a_clear_error(tmp_path, load):
    _, directory = saved(tmp_path, [4])
    config = config_json(directory)
    config["quantization_config"]["fine_tuned_num_devices"] = [4, "eight"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fine_tuned_num_devices must be .*'eight'"):
        load(directory)
    with pytest.raises(ValueError, match=r"invalid ASTRA quantization_config.*fine_tuned_num_devices"):
        astra.from_pretrained(directory, num_devices=2)


def test_a_bad_value_set_by_hand_fails_at_save_time(tmp_path):
    model = calibrated_gpt2()
    model.config.quantization_config.fine_tuned_num_devices = [0]
    with pytest.raises(ValueError, match="fine_tuned_num_devices"):
        model.save_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------- warning


@pytest.mark.parametrize("num_devices", [2, 3, 8])
def test_loading_at_a_recorded_n_does_not_warn(tmp_path, caplog, num_devices):
    _, directory = saved(tmp_path, [2, 3, 4, 6, 8])
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.INFO, "transformers_astra.hub"):
        warnings.simplefilter("always")
        loaded = astra.from_pretrained(directory, num_devices=num_devices)
    assert num_devices_warnings(record) == []
    assert f"fine-tuned at num_devices [2, 3, 4, 6, 8]; loading it with num_devices={num_devices}" in caplog.text
    assert astra_state(loaded).config.num_devices == num_devices
    assert fine_tuned_num_devices(loaded) == [2, 3, 4, 6, 8]


def test_loading_outside_the_recorded_set_warns_naming_it(tmp_path):
    _, directory = saved(tmp_path, [2, 3, 4])
    with pytest.warns(UserWarning) as record:
        astra.from_pretrained(directory, num_devices=8)
    [message] = num_devices_warnings(record)
    assert "fine-tuned at num_devices [2, 3, 4] (saved with num_devices=4); loading it with num_devices=8" in message
    assert "RandomShardsCallback" in message


def test_a_single_recorded_n_behaves_like_the_saved_one(tmp_path):
    _, directory = saved(tmp_path, [4])
    with pytest.warns(UserWarning, match=r"fine-tuned at num_devices \[4\] .*loading it with num_devices=2"):
        astra.from_pretrained(directory, num_devices=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        astra.from_pretrained(directory, noise_scale=0.0)  # an override at the recorded N
    assert num_devices_warnings(record) == []


def test_overriding_other_fields_at_an_unrecorded_saved_n_warns(tmp_path):
    # Saved at N=4 but fine-tuned only at N = 2 and 8 (RandomShardsCallback((2, 8)) on an N=4 model).
    _, directory = saved(tmp_path, [2, 8])
    with pytest.warns(UserWarning, match=r"fine-tuned at num_devices \[2, 8\] \(saved with num_devices=4\); loading it with num_devices=4"):
        astra.from_pretrained(directory, noise_scale=0.0)


# ------------------------------------------------------------------------------------------ who sets it


def test_naq_fine_tuning_records_its_n(tmp_path):
    model = calibrated_gpt2(num_devices=3).train()
    record_fine_tuned_num_devices(model, [2, 4, 8])  # an earlier fine-tuning's record is replaced
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenBlocks(rows=32))
    astra.AstraNAQCallback().attach(trainer)
    trainer.train()
    assert fine_tuned_num_devices(model) == [3]
    model.save_pretrained(tmp_path / "ckpt")
    assert config_json(tmp_path / "ckpt")["quantization_config"]["fine_tuned_num_devices"] == [3]


@pytest.mark.parametrize("naq_first", [True, False])
def test_random_shards_records_the_n_it_draws_from_whatever_the_callback_order(tmp_path, naq_first):
    model = calibrated_gpt2().train()  # N = 4, not among the draws
    shards = RandomShardsCallback(num_devices=(6, 2, 3, 2), seed=1)
    naq = astra.AstraNAQCallback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=TokenBlocks(rows=32),
                      callbacks=[naq, shards] if naq_first else [shards, naq])
    if naq_first:
        naq.attach(trainer)  # ahead of every other callback
    trainer.train()
    assert len(shards.history) == 3
    assert fine_tuned_num_devices(model) == [2, 3, 6]
    assert astra_state(model).config.num_devices == 4  # the model's own config is back
    model.save_pretrained(tmp_path / "ckpt")
    assert config_json(tmp_path / "ckpt")["quantization_config"]["fine_tuned_num_devices"] == [2, 3, 6]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        astra.from_pretrained(tmp_path / "ckpt", num_devices=6)
    assert num_devices_warnings(record) == []


def test_trainer_checkpoints_during_n_agnostic_training_carry_the_draws(tmp_path):
    model = calibrated_gpt2().train()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
                      train_dataset=TokenBlocks(rows=32), callbacks=[RandomShardsCallback(num_devices=(2, 8))])
    astra.AstraNAQCallback().attach(trainer)
    trainer.train()
    for step in (1, 2):
        assert config_json(tmp_path / f"checkpoint-{step}")["quantization_config"]["fine_tuned_num_devices"] == [2, 8]


# ----------------------------------------------------------------------------------------- model card


def test_the_model_card_states_the_recorded_n():
    model = calibrated_gpt2()
    unknown = astra.create_model_card(model, repo_id="me/m").text
    assert "fine-tuned at N" not in unknown and "The checkpoint was fine-tuned for N=4." in unknown
    record_fine_tuned_num_devices(model, [2, 3, 4, 6, 8])
    card = astra.create_model_card(model, repo_id="me/m").text
    assert "| fine-tuned at N | 2, 3, 4, 6, 8 (N drawn per step: `RandomShardsCallback`) |" in card
    assert "The checkpoint was fine-tuned at N in {2, 3, 4, 6, 8}" in card and "at any of these without a warning" in card
    record_fine_tuned_num_devices(model, [4])
    card = astra.create_model_card(model, repo_id="me/m").text
    assert "| fine-tuned at N | 4 |" in card and "The checkpoint was fine-tuned at N=4 " in card


# ------------------------------------------------------------------------------------------- handshake


class TwoRanks:
    """A transport whose other rank sent ``theirs`` (or, with None, only records what this rank sends)."""

    world_size = 2

    def __init__(self, theirs=None):
        self.theirs, self.sent = theirs, None

    def all_gather(self, tensor, what, channel):
        self.sent = tensor
        return [tensor, tensor if self.theirs is None else self.theirs]


def handshake_fields(model):
    transport = TwoRanks()
    check_same_model(transport, model, astra_state(model).config, astra.quantizers(model))
    return transport.sent


def test_the_handshake_ignores_the_record_but_not_the_settings():
    model, other = calibrated_gpt2(), calibrated_gpt2()
    record_fine_tuned_num_devices(other, [2, 4])
    check_same_model(TwoRanks(handshake_fields(other)), model, astra_state(model).config, astra.quantizers(model))
    changed = calibrated_gpt2(num_devices=2)  # the check above is not vacuous: a real difference is found
    with pytest.raises(ValueError, match="'AstraConfig' .*'model config'"):
        check_same_model(TwoRanks(handshake_fields(changed)), model, astra_state(model).config, astra.quantizers(model))
