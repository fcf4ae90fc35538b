"""Checkpoints: save / load round trips, clear errors on bad checkpoints, the model card, and the push and
download paths against a stand-in Hub on localhost (tests/fake_hub.py; no network is reachable)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import gpt2_batch, main_output, make_pair, tiny_gpt2_config, tiny_vit_config, vit_batch
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from transformers import AutoModel, GPT2LMHeadModel, GPT2Model, ViTForImageClassification

import fake_hub
import transformers_astra as astra

CODEBOOK = "transformer.h.1.attn.astra_quantizer.codebook"


def calibrated(model_class, make_config, batch, **settings):
    model, _ = make_pair(model_class, make_config())
    astra.patch(model, **settings)
    astra.calibrate(model, [batch], progress=False)
    return model


@pytest.fixture
def gpt2_checkpoint(tmp_path):
    """A calibrated patched GPT2 (N=4, G=4, K=16) saved with save_pretrained: (model, directory)."""
    model = calibrated(GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch(batch=4), num_devices=4, groups=4, codebook_size=16)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def outputs(model, batch):
    with torch.no_grad():
        return main_output(model(**batch))


@pytest.fixture
def hub(monkeypatch):
    """A stand-in Hub; huggingface_hub sees it the way it sees HF_ENDPOINT (both constants it derives)."""
    stand_in = fake_hub.FakeHub()
    server = fake_hub.start(stand_in)
    monkeypatch.setattr(constants, "ENDPOINT", stand_in.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", stand_in.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield stand_in
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- saving


def test_save_pretrained_writes_the_astra_block_and_the_codebooks_in_safetensors(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    assert json.loads((directory / "config.json").read_text())["astra"] == model.config.astra
    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        for layer, quantizer in enumerate(astra.quantizers(model)):
            assert torch.equal(weights.get_tensor(f"transformer.h.{layer}.attn.astra_quantizer.codebook"), quantizer.codebook)
            assert weights.get_tensor(f"transformer.h.{layer}.attn.astra_quantizer.initialized").item() is True


def test_patch_follows_the_models_eval_mode():
    # An eval model must not get NAQ noise from freshly added quantizers (from_pretrained patches eval models).
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=8, noise_scale=1.0)
    assert not any(quantizer.training for quantizer in astra.quantizers(model))


def test_patched_model_push_to_hub_is_astras_until_unpatched():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=8)
    assert "ASTRA model card" in model.push_to_hub.__doc__
    astra.unpatch(model)
    assert model.push_to_hub.__func__ is GPT2LMHeadModel.push_to_hub


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "model_class, make_config, make_batch, settings",
    [
        (GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch, dict(num_devices=4, groups=4, codebook_size=16)),
        (GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch, dict(num_devices=3, groups=2, codebook_size=8, quantize="kv")),
        (ViTForImageClassification, tiny_vit_config, vit_batch, dict(num_devices=2, groups=8, codebook_size=16)),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path, model_class, make_config, make_batch, settings):
    model = calibrated(model_class, make_config, make_batch(batch=4), **settings)
    model.save_pretrained(tmp_path)
    loaded = astra.from_pretrained(tmp_path)
    assert type(loaded) is model_class and astra.is_patched(loaded) and not loaded.training
    assert loaded._astra_state.config == model._astra_state.config
    batch = make_batch(seed=1)
    assert torch.equal(outputs(loaded, batch), outputs(model, batch))
    with astra.full_precision(loaded), astra.full_precision(model):
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))


def test_sharded_checkpoint_round_trip(gpt2_checkpoint, tmp_path):
    model, _ = gpt2_checkpoint
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    batch = gpt2_batch(seed=5)
    assert torch.equal(outputs(astra.from_pretrained(tmp_path / "sharded"), batch), outputs(model, batch))


def test_auto_class_and_base_model_class(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    base = astra.from_pretrained(directory, model_class=AutoModel)  # the checkpoint's LM keys carry "transformer."
    assert type(base) is GPT2Model
    for mine, theirs in zip(astra.quantizers(base), astra.quantizers(model)):
        assert torch.equal(mine.codebook, theirs.codebook)
    batch = gpt2_batch(seed=2)
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, model.transformer(**batch).last_hidden_state)


def test_plain_checkpoint_is_patched_with_uninitialised_codebooks(tmp_path):
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"codebooks of layer\(s\) \[0, 1\] are uninitialised .*astra.calibrate"):
        loaded = astra.from_pretrained(tmp_path, astra.AstraConfig(num_devices=2, groups=4, codebook_size=8))
    assert loaded.config.astra["groups"] == 4 and not any(bool(q.initialized) for q in astra.quantizers(loaded))
    batch = gpt2_batch()
    with astra.full_precision(loaded):
        assert torch.allclose(outputs(loaded, batch), outputs(reference, batch), atol=1e-5)
    with pytest.warns(UserWarning, match="uninitialised"):  # AstraConfig fields as keyword arguments work too
        assert astra.from_pretrained(tmp_path, num_devices=3, groups=2).config.astra["num_devices"] == 3


def test_plain_checkpoint_without_an_astra_config_is_an_error(tmp_path):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="plain transformers checkpoint .*no 'astra' block.*astra_config="):
        astra.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------- N mismatch


def test_other_num_devices_loads_with_a_warning(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    with pytest.warns(UserWarning, match="saved with num_devices=4; loading it with num_devices=2"):
        loaded = astra.from_pretrained(directory, num_devices=2)
    assert loaded._astra_state.config.num_devices == 2 and loaded.config.astra["num_devices"] == 2
    for mine, theirs in zip(astra.quantizers(loaded), astra.quantizers(model)):
        assert torch.equal(mine.codebook, theirs.codebook)  # the codebooks do not depend on N
    batch = gpt2_batch(batch=1, length=12)
    with astra.capture_codes(loaded) as codes:
        outputs(loaded, batch)
    assert codes[0].shape == (1, 12, 4)  # it runs as a 2-device model


# ------------------------------------------------------------------------------------------ bad input


def test_truncated_weights_file_is_a_clear_error(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        astra.from_pretrained(directory)


def test_corrupt_weights_header_is_a_clear_error(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" * 16 + data[24:])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        astra.from_pretrained(directory)


def test_codebook_that_does_not_fit_the_config_names_the_layer(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["astra"]["groups"] = 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"codebook of layer transformer\.h\.0\.attn .*\(4, 16, 8\).*needs \(8, 16, 4\)"):
        astra.from_pretrained(directory)


def test_overriding_the_codebook_size_names_the_layer(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.attn .*codebook_size=32"):
        astra.from_pretrained(directory, codebook_size=32)


def test_missing_codebook_names_the_layer(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    tensors = load_file(directory / "model.safetensors")
    del tensors[CODEBOOK]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the codebooks of layer\(s\) \['transformer\.h\.1\.attn'\]"):
        astra.from_pretrained(directory)


def test_codebooks_for_layers_the_model_lacks_are_named(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["n_layer"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"modules this model does not have: \['transformer\.h\.1\.attn\.astra_quantizer"):
        astra.from_pretrained(directory)


def test_invalid_astra_block_names_the_field(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["astra"]["quantize"] = "everything"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"invalid 'astra' block: AstraConfig\.quantize"):
        astra.from_pretrained(directory)


def test_neither_directory_nor_repo_id_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repo id"):
        astra.from_pretrained(str(tmp_path / "missing" / "deeper" / "path"))


# ------------------------------------------------------------------------------------------ model card


def card_metadata(card_text: str) -> dict:
    return yaml.safe_load(card_text.split("---")[1])


def test_model_card_holds_the_settings_and_only_matching_results(gpt2_checkpoint, tmp_path):
    model, _ = gpt2_checkpoint
    row = dict(model="gpt2", dataset="wikitext", metric="perplexity", N=4, G=4, K=16, quantize="hidden", noise_scale=1.0,
               commitment_weight=1e-4, distributed_cls=False, value=17.25, base_value=15.5, command="python examples/x.py")
    other_groups = {**row, "G": 32, "value": 99.0}
    results = tmp_path / "accuracy.json"
    results.write_text(json.dumps([row, other_groups]))
    card = astra.create_model_card(model, repo_id="me/gpt2-astra-n4-g4", base_model="openai-community/gpt2", results=results)
    metadata = card_metadata(str(card))
    assert metadata["base_model"] == "openai-community/gpt2" and metadata["library_name"] == "transformers"
    assert {"astra", "vector-quantization", "sequence-parallel"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["wikitext"] and metadata["metrics"] == ["perplexity"]
    [result] = metadata["model-index"][0]["results"]
    assert result["metrics"] == [{"type": "perplexity", "value": 17.25}]
    body = card.text
    for fact in ("| N (devices) | 4 |", "| K (codebook size) | 16 (4 bits per code) |", "| G (groups per vector) | 4 |",
                 "`hidden`", "| bits per token and layer | 16 |", "| compression vs fp32 | 64.0x (width 32) |",
                 "| wikitext | perplexity | 17.25 | 15.5 | `python examples/x.py` |",
                 'astra.from_pretrained("me/gpt2-astra-n4-g4")', "accelerate launch --multi_gpu --num_processes 4 infer.py", "torchrun --nproc_per_node 4 infer.py",
                 "astra.DistributedRuntime(model)"):
        assert fact in body
    assert "99" not in body


def test_model_card_without_results_says_nothing_was_measured(gpt2_checkpoint):
    model, _ = gpt2_checkpoint
    card = astra.create_model_card(model)
    assert "No accuracy or perplexity measured" in card.text
    assert "model-index" not in card_metadata(str(card)) and "metrics" not in card_metadata(str(card))
    with pytest.raises(ValueError, match="needs a dataset, a metric and a finite numeric value"):
        astra.create_model_card(model, results=[{"dataset": "wikitext", "metric": "perplexity"}])


# -------------------------------------------------------------------------------------- push and pull


def test_push_to_hub_uploads_weights_config_and_card_and_pulls_back(gpt2_checkpoint, hub, tmp_path):
    model, _ = gpt2_checkpoint
    commit = model.push_to_hub("me/gpt2-astra-n4-g4", token=False, base_model="openai-community/gpt2")
    files = hub.repos["me/gpt2-astra-n4-g4"].files
    assert commit.oid == hub.repos["me/gpt2-astra-n4-g4"].sha
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["astra"] == model.config.astra
    assert torch.equal(load_safetensors_bytes(files["model.safetensors"])[CODEBOOK], model.transformer.h[1].attn.astra_quantizer.codebook)
    card = ModelCard(files["README.md"].decode())
    assert "astra" in card.data.tags and card.data.base_model == "openai-community/gpt2"
    assert "| N (devices) | 4 |" in card.text and hub.validated_readmes == [files["README.md"].decode()]

    loaded = astra.from_pretrained("me/gpt2-astra-n4-g4", cache_dir=tmp_path / "cache", token=False)
    batch = gpt2_batch(seed=3)
    assert torch.equal(outputs(loaded, batch), outputs(model, batch))
    # Pushed again after more fine-tuning, its card names the checkpoint it came from as the base model.
    assert astra.create_model_card(loaded).data.base_model == "me/gpt2-astra-n4-g4"


def test_hub_offline_mode_is_respected(gpt2_checkpoint, hub, tmp_path, monkeypatch):
    model, _ = gpt2_checkpoint
    astra.push_to_hub(model, "me/tiny", token=False, endpoint=hub.url)
    cache = tmp_path / "cache"
    astra.from_pretrained("me/tiny", cache_dir=cache, token=False)  # online: fills the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    batch = gpt2_batch(seed=4)
    assert torch.equal(outputs(astra.from_pretrained("me/tiny", cache_dir=cache), batch), outputs(model, batch))
    with pytest.raises(LocalEntryNotFoundError):
        astra.from_pretrained("me/never-downloaded", cache_dir=cache)
    assert hub.requests == []


def test_example_saves_a_checkpoint_with_its_card(gpt2_checkpoint, tmp_path, capsys):
    _, directory = gpt2_checkpoint
    # What examples/finetune_astra.py writes beside the checkpoint it saves (a local base folder as "model").
    run = dict(model="outputs/gpt2-base", dataset="kjv", metric="perplexity", N=4, G=4, K=16, quantize="hidden",
               noise_scale=1.0, commitment_weight=1e-4, value=41.5, base_value=38.25, command="python examples/finetune_astra.py")
    (directory / "result.json").write_text(json.dumps(run))
    (tmp_path / "table.json").write_text(json.dumps({"rows": [run, {**run, "N": 2, "value": 40.0}]}))
    spec = importlib.util.spec_from_file_location("save_checkpoint", Path(__file__).parent.parent / "examples" / "save_checkpoint.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(directory), "--output", str(tmp_path / "out"), "--base-model", "gpt2", "--dataset", "kjv",
                  "--results", str(tmp_path / "table.json")])
    saved = tmp_path / "out"
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in saved.iterdir()}
    card = (saved / "README.md").read_text()
    metadata = card_metadata(card)
    assert metadata["base_model"] == "gpt2" and metadata["datasets"] == ["kjv"]
    assert "| kjv | perplexity | 41.5 | 38.25 | `python examples/finetune_astra.py` |" in card and "40" not in card
    assert "1 measured result(s)" in capsys.readouterr().out
