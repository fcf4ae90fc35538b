"""Checkpoints: save / load round trips (Auto classes and astra.from_pretrained), clear errors on bad checkpoints,
the model card, and the push and download paths against a stand-in Hub on localhost (tests/fake_hub.py; no
network is reachable). Security checks and the unregistered / 0.1.0 cases: tests/test_hf_loading.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import huggingface_hub
import transformers
import yaml
from conftest import gpt2_batch, main_output, make_pair, tiny_gpt2_config, tiny_vit_config, vit_batch
from huggingface_hub import ModelCard, constants
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTForImageClassification,
)

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
    # transformers keeps one HfApi (made with the endpoint of its first use); model.push_to_hub goes through it.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None, raising=False)
    # transformers 5.9 calls huggingface_hub's module-level create_repo etc., bound to its default HfApi.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", stand_in.url)
    yield stand_in
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- saving


def test_save_pretrained_writes_the_quantization_config_and_the_codebooks_in_safetensors(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    saved = json.loads((directory / "config.json").read_text())
    assert "astra" not in saved  # one source of truth: the quantization config
    block = saved["quantization_config"]
    assert block["quant_method"] == "astra" and block == model.config.quantization_config.to_dict()
    assert astra.AstraQuantizationConfig.from_dict(block).astra_config == model._astra_state.config
    assert [record["layer"] for record in block["codebooks"]] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert block["codebooks"][0]["shape"] == [4, 16, 8] and set(block["codebooks"][0]["blake2b"]) == {"float32", "float16", "bfloat16"}
    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        for layer, quantizer in enumerate(astra.quantizers(model)):
            assert torch.equal(weights.get_tensor(f"transformer.h.{layer}.attn.astra_quantizer.codebook"), quantizer.codebook)
            assert weights.get_tensor(f"transformer.h.{layer}.attn.astra_quantizer.initialized").item() is True


def test_patch_follows_the_models_eval_mode():
    # An eval model must not get NAQ noise from freshly added quantizers (from_pretrained patches eval models).
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=8, noise_scale=1.0)
    assert not any(quantizer.training for quantizer in astra.quantizers(model))


def test_patch_records_the_quantization_config_quantizer_and_tags_until_unpatched():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=8)
    assert isinstance(model.hf_quantizer, astra.AstraHfQuantizer)
    assert model.hf_quantizer.quantization_config is model.config.quantization_config
    assert model.config.quantization_config.astra_config == model._astra_state.config
    assert {"astra", "vector-quantization", "sequence-parallel"} <= set(model.model_tags)
    assert "push_to_hub" not in vars(model)  # nothing bound onto the instance
    astra.unpatch(model)
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert "astra" not in (model.model_tags or []) and "quantization_config" not in model.config.to_dict()


def test_model_dequantize_unpatches():
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=8)
    model.dequantize()
    assert not astra.is_patched(model) and getattr(model, "hf_quantizer", None) is None
    batch = gpt2_batch()
    assert torch.equal(outputs(model, batch), outputs(reference, batch))


# ----------------------------------------------------------------------------------------- round trips


GPT2_CASE = (GPT2LMHeadModel, AutoModelForCausalLM, tiny_gpt2_config, gpt2_batch)
VIT_CASE = (ViTForImageClassification, AutoModelForImageClassification, tiny_vit_config, vit_batch)


@pytest.mark.parametrize(
    "model_class, auto_class, make_config, make_batch, settings",
    [
        (*GPT2_CASE, dict(num_devices=4, groups=4, codebook_size=16)),
        (*GPT2_CASE, dict(num_devices=3, groups=2, codebook_size=8, quantize="kv")),
        (*VIT_CASE, dict(num_devices=2, groups=8, codebook_size=16)),
    ],
)
def test_round_trip_through_auto_class_model_class_and_astra_gives_identical_outputs(
    tmp_path, model_class, auto_class, make_config, make_batch, settings
):
    model = calibrated(model_class, make_config, make_batch(batch=4), **settings)
    model.save_pretrained(tmp_path)
    batch = make_batch(seed=1)
    for load in (auto_class.from_pretrained, model_class.from_pretrained, astra.from_pretrained):
        loaded = load(tmp_path)
        assert type(loaded) is model_class and astra.is_patched(loaded) and not loaded.training
        assert loaded._astra_state.config == model._astra_state.config
        assert loaded.config._attn_implementation == "astra"
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))
        with astra.full_precision(loaded), astra.full_precision(model):
            assert torch.equal(outputs(loaded, batch), outputs(model, batch))


@pytest.mark.parametrize(
    "model_class, auto_class, make_config, make_batch, settings",
    [(*GPT2_CASE, dict(num_devices=4, groups=4, codebook_size=16)), (*VIT_CASE, dict(num_devices=2, groups=8, codebook_size=16))],
)
def test_sharded_and_float16_loading_through_the_auto_class(
    tmp_path, model_class, auto_class, make_config, make_batch, settings
):
    model = calibrated(model_class, make_config, make_batch(batch=4), **settings)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    batch = make_batch(seed=5)
    sharded = auto_class.from_pretrained(tmp_path / "sharded")
    assert torch.equal(outputs(sharded, batch), outputs(model, batch))

    half = auto_class.from_pretrained(tmp_path / "sharded", dtype=torch.float16)
    # Every weight, not only the codebooks (transformers 5.9 left ViT's renamed layer weights in fp32).
    assert {parameter.dtype for parameter in half.parameters()} == {torch.float16}
    reference = model_class.from_pretrained(tmp_path / "sharded").to(torch.float16)  # the saved model, cast
    for mine, theirs in zip(astra.quantizers(half), astra.quantizers(model)):
        assert torch.equal(mine.codebook, theirs.codebook.to(torch.float16))
    half_batch = {name: value.half() if value.is_floating_point() else value for name, value in batch.items()}
    assert torch.equal(outputs(half, half_batch), outputs(reference, half_batch))


def test_auto_class_and_base_model_class(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    base = AutoModel.from_pretrained(directory)  # the checkpoint's LM keys carry "transformer."
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
    assert loaded.config.quantization_config.groups == 4 and not any(bool(q.initialized) for q in astra.quantizers(loaded))
    batch = gpt2_batch()
    with astra.full_precision(loaded):
        assert torch.allclose(outputs(loaded, batch), outputs(reference, batch), atol=1e-5)
    with pytest.warns(UserWarning, match="uninitialised"):  # AstraConfig fields as keyword arguments work too
        assert astra.from_pretrained(tmp_path, num_devices=3, groups=2).config.quantization_config.num_devices == 3
    # The Auto classes do the same with transformers' own argument.
    with pytest.warns(UserWarning, match="uninitialised"):
        auto = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=astra.AstraQuantizationConfig(groups=4))
    assert astra.is_patched(auto) and auto._astra_state.config.groups == 4


def test_plain_checkpoint_without_an_astra_config_is_an_error(tmp_path):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="plain transformers checkpoint .*no ASTRA quantization_config.*astra_config="):
        astra.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------- N mismatch


def test_other_num_devices_loads_with_a_warning(gpt2_checkpoint):
    model, directory = gpt2_checkpoint
    with pytest.warns(UserWarning, match="saved with num_devices=4; loading it with num_devices=2"):
        loaded = astra.from_pretrained(directory, num_devices=2)
    assert loaded._astra_state.config.num_devices == 2 and loaded.config.quantization_config.num_devices == 2
    for mine, theirs in zip(astra.quantizers(loaded), astra.quantizers(model)):
        assert torch.equal(mine.codebook, theirs.codebook)  # the codebooks do not depend on N
    batch = gpt2_batch(batch=1, length=12)
    with astra.capture_codes(loaded) as codes:
        outputs(loaded, batch)
    assert codes[0].shape == (1, 12, 4)  # it runs as a 2-device model


# ------------------------------------------------------------------------------------------ bad input


LOADERS = [AutoModelForCausalLM.from_pretrained, astra.from_pretrained]


@pytest.mark.parametrize("load", LOADERS)
def test_truncated_weights_file_is_a_clear_error(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        load(directory)


@pytest.mark.parametrize("load", LOADERS)
def test_corrupt_weights_header_is_a_clear_error(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" * 16 + data[24:])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        load(directory)


@pytest.mark.parametrize("load", LOADERS)
def test_codebook_that_does_not_fit_the_config_names_the_layer(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["groups"] = 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"codebook of layer transformer\.h\.0\.attn .*\(4, 16, 8\).*needs \(8, 16, 4\)"):
        load(directory)


def test_overriding_the_codebook_size_names_the_layer(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.attn .*codebook_size=32"):
        astra.from_pretrained(directory, codebook_size=32)


@pytest.mark.parametrize("load", LOADERS)
def test_missing_codebook_names_the_layer(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    tensors = load_file(directory / "model.safetensors")
    del tensors[CODEBOOK]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the codebooks of layer\(s\) \['transformer\.h\.1\.attn'\]"):
        load(directory)


@pytest.mark.parametrize("load", LOADERS)
def test_codebooks_for_layers_the_model_lacks_are_named(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["n_layer"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"records codebooks for 2 layers, but the model has 1"):
        load(directory)


@pytest.mark.parametrize("load", LOADERS)
def test_invalid_quantization_config_names_the_field(gpt2_checkpoint, load):
    _, directory = gpt2_checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["quantize"] = "everything"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"AstraConfig\.quantize must be one of"):
        load(directory)


def test_a_file_instead_of_a_directory_is_a_clear_error(gpt2_checkpoint):
    _, directory = gpt2_checkpoint
    with pytest.raises(ValueError, match="is a file; pass the checkpoint directory"):
        astra.from_pretrained(directory / "config.json")


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
                 'AutoModelForCausalLM.from_pretrained("me/gpt2-astra-n4-g4")', "import transformers_astra",
                 "pip install transformers-astra", "accelerate launch --multi_gpu --num_processes 4 infer.py", "torchrun --nproc_per_node 4 infer.py",
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
    commit = astra.push_to_hub(model, "me/gpt2-astra-n4-g4", token=False, base_model="openai-community/gpt2")
    files = hub.repos["me/gpt2-astra-n4-g4"].files
    assert commit.oid == hub.repos["me/gpt2-astra-n4-g4"].sha
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"] == model.config.quantization_config.to_dict()
    assert torch.equal(load_safetensors_bytes(files["model.safetensors"])[CODEBOOK], model.transformer.h[1].attn.astra_quantizer.codebook)
    card = ModelCard(files["README.md"].decode())
    assert "astra" in card.data.tags and card.data.base_model == "openai-community/gpt2"
    assert "| N (devices) | 4 |" in card.text and hub.validated_readmes == [files["README.md"].decode()]

    loaded = AutoModelForCausalLM.from_pretrained("me/gpt2-astra-n4-g4", cache_dir=tmp_path / "cache", token=False)
    batch = gpt2_batch(seed=3)
    assert astra.is_patched(loaded) and torch.equal(outputs(loaded, batch), outputs(model, batch))
    # Pushed again after more fine-tuning, its card names the checkpoint it came from as the base model.
    assert astra.create_model_card(loaded).data.base_model == "me/gpt2-astra-n4-g4"

    # transformers' own model.push_to_hub: same format, the card already on the Hub kept and tagged.
    loaded.push_to_hub("me/gpt2-astra-n4-g4", token=False, commit_message="fine-tuned more")
    files = hub.repos["me/gpt2-astra-n4-g4"].files
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "astra"
    card = ModelCard(files["README.md"].decode())
    assert "| N (devices) | 4 |" in card.text and "astra" in card.data.tags


def test_model_push_to_hub_to_a_new_repo_carries_the_astra_tags(gpt2_checkpoint, hub, tmp_path):
    model, _ = gpt2_checkpoint
    model.push_to_hub("me/fresh", token=False)
    files = hub.repos["me/fresh"].files
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "astra"
    card = ModelCard(files["README.md"].decode())
    assert {"astra", "vector-quantization", "sequence-parallel"} <= set(card.data.tags)
    loaded = AutoModelForCausalLM.from_pretrained("me/fresh", cache_dir=tmp_path / "cache", token=False)
    batch = gpt2_batch(seed=6)
    assert torch.equal(outputs(loaded, batch), outputs(model, batch))


def test_hub_offline_mode_is_respected(gpt2_checkpoint, hub, tmp_path, monkeypatch):
    model, _ = gpt2_checkpoint
    astra.push_to_hub(model, "me/tiny", token=False, endpoint=hub.url)
    cache = tmp_path / "cache"
    astra.from_pretrained("me/tiny", cache_dir=cache, token=False)  # online: fills the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    batch = gpt2_batch(seed=4)
    assert torch.equal(outputs(astra.from_pretrained("me/tiny", cache_dir=cache), batch), outputs(model, batch))
    with pytest.raises(OSError):
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
