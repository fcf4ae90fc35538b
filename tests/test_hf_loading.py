"""ASTRA through transformers' quantization registry: pipeline and Trainer on a loaded checkpoint, what
transformers does without the plugin, 0.1.0 checkpoints, and tampered checkpoints (issue 11 item 7)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gpt2_batch, main_output, make_pair, tiny_gpt2_config
from safetensors.torch import load_file, save_file
from test_callback import TokenBlocks, training_args
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, pipeline

import transformers_astra as astra
from transformers_astra.convert import main as convert_main

CODEBOOK = "transformer.h.1.attn.astra_quantizer.codebook"
LOADERS = [AutoModelForCausalLM.from_pretrained, astra.from_pretrained]


def calibrated_gpt2(**settings):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, **{"num_devices": 4, "groups": 4, "codebook_size": 16, **settings})
    astra.calibrate(model, [gpt2_batch(batch=4)], progress=False)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    model = calibrated_gpt2()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def logits(model, batch):
    with torch.no_grad():
        return main_output(model(**batch))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer over the tiny GPT2's 61 ids: w3 ... w60 (0 pad, 1 bos, 2 eos)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 61)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------------------------------- pipeline, Trainer


def test_pipeline_loads_the_patched_model_and_generates_what_the_saved_model_generates(checkpoint):
    model, directory = checkpoint
    word_tokenizer().save_pretrained(directory)
    loaded = pipeline("text-generation", model=str(directory))
    assert astra.is_patched(loaded.model)
    batch = gpt2_batch(seed=7)
    assert torch.equal(logits(loaded.model, batch), logits(model, batch))
    saved = pipeline("text-generation", model=model, tokenizer=word_tokenizer())
    prompt = "w5 w6 w7 w8 w9 w10 w11 w12"
    options = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    assert loaded(prompt, **options)[0]["generated_text"] == saved(prompt, **options)[0]["generated_text"]


def test_trainer_fine_tunes_a_loaded_checkpoint_with_the_naq_callback(checkpoint, tmp_path):
    _, directory = checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    before = [q.codebook.detach().clone() for q in astra.quantizers(model)]
    model.train()
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=4, logging_steps=2),
                      train_dataset=TokenBlocks(), callbacks=[astra.AstraNAQCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(q.codebook, b) for q, b in zip(astra.quantizers(model), before))  # codebooks learned
    trainer.save_model(tmp_path / "tuned")
    model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    batch = gpt2_batch(seed=8)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


# ------------------------------------------------------------------------------------ without the plugin

UNREGISTERED = """
import sys, warnings
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("ATTENTION", model.config._attn_implementation)
print("QUANTIZER", getattr(model, "hf_quantizer", None))
print("HAS_CODEBOOK", any("astra_quantizer" in name for name, _ in model.named_parameters()))
"""


def test_without_the_plugin_transformers_warns_and_loads_a_plain_model(checkpoint):
    """transformers (5.9 to 5.24) has no hook for an unknown quant_method: it logs a warning, skips the
    quantization and reports the codebooks as unexpected keys. This records that behaviour, so a change in
    transformers shows up here, and that the checkpoint's own card says how to load it (docs/checkpoints.md)."""
    _, directory = checkpoint
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # transformers only
    run = subprocess.run([sys.executable, "-c", UNREGISTERED, str(directory)], capture_output=True, text=True,
                         env=env, timeout=300, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Unknown quantization type, got astra" in run.stderr and "skip the quantization" in run.stderr
    assert "astra_quantizer.codebook" in run.stderr and "UNEXPECTED" in run.stderr
    assert "ATTENTION astra" not in run.stdout and "QUANTIZER None" in run.stdout and "HAS_CODEBOOK False" in run.stdout
    card = astra.create_model_card(AutoModelForCausalLM.from_pretrained(directory)).text
    assert "pip install transformers-astra" in card and "import transformers_astra" in card


# ------------------------------------------------------------------------------------ 0.1.0 checkpoints


def write_v010_checkpoint(model, directory: Path) -> None:
    """The 0.1.0 format, by hand: config.json with an 'astra' block and no quantization_config; the weights with
    every layer's codebook under `...astra_quantizer.codebook` / `.initialized`."""
    plain, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    plain.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["astra"] = model._astra_state.config.to_dict()
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    tensors.pop("lm_head.weight")  # tied to the token embedding, saved once
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_v010_checkpoint_names_the_convert_command_and_converts(tmp_path, capsys):
    model = calibrated_gpt2()
    directory = tmp_path / "old"
    write_v010_checkpoint(model, directory)
    with pytest.raises(ValueError, match=rf"saved by transformers-astra 0\.1\.0 .*python -m transformers_astra\.convert {directory}"):
        astra.from_pretrained(directory)
    (directory / "tokenizer_note.txt").write_text("kept")
    convert_main([str(directory)])
    assert "converted" in capsys.readouterr().out
    config = json.loads((directory / "config.json").read_text())
    assert "astra" not in config and config["quantization_config"]["quant_method"] == "astra"
    assert (directory / "tokenizer_note.txt").read_text() == "kept"
    batch = gpt2_batch(seed=9)
    for load in LOADERS:
        loaded = load(directory)
        assert astra.is_patched(loaded) and torch.equal(logits(loaded, batch), logits(model, batch))
    with pytest.raises(ValueError, match="already has a quantization_config"):
        convert_main([str(directory)])


def test_convert_runs_as_a_module(tmp_path):
    model = calibrated_gpt2()
    write_v010_checkpoint(model, tmp_path / "old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "transformers_astra.convert", str(tmp_path / "old")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert astra.is_patched(AutoModelForCausalLM.from_pretrained(tmp_path / "old"))


# ----------------------------------------------------------------------------- tampered checkpoints


def shard(model, directory: Path) -> dict:
    model.save_pretrained(directory, max_shard_size="10KB")
    return json.loads((directory / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("target", ["../outside.safetensors", "ABSOLUTE"])
def test_shard_paths_leaving_the_checkpoint_folder_are_refused_alike_whether_the_file_exists(tmp_path, load, target):
    model = calibrated_gpt2()
    directory = tmp_path / "ckpt"
    index = shard(model, directory)
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(directory / first, tmp_path / "outside.safetensors")  # a real, loadable file outside
    messages = []
    for name in ("outside.safetensors", "never-there.safetensors"):
        path = str(tmp_path / name) if target == "ABSOLUTE" else target.replace("outside.safetensors", name)
        tampered = {key: path if file == first else file for key, file in index["weight_map"].items()}
        (directory / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": tampered}))
        with pytest.raises(ValueError, match="lists a weights file outside its folder") as error:
            load(directory)
        messages.append(str(error.value).replace("never-there", "outside"))
    assert messages[0] == messages[1]  # the message does not tell whether the file exists


@pytest.mark.parametrize("load", LOADERS)
def test_non_floating_codebook_is_refused(checkpoint, load):
    _, directory = checkpoint
    tensors = load_file(directory / "model.safetensors")
    tensors[CODEBOOK] = tensors[CODEBOOK].round().to(torch.int64)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"codebook of layer transformer\.h\.1\.attn is stored as torch\.int64"):
        load(directory)


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_a_flipped_byte_in_a_codebook_names_the_layer(checkpoint, load, dtype):
    _, directory = checkpoint
    path = directory / "model.safetensors"
    tensors = load_file(path)
    codebook = tensors[CODEBOOK]
    codebook.view(torch.int32).view(-1)[5] ^= 1 << 20  # one bit of one value
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"codebook of layer transformer\.h\.1\.attn .*does not match the blake2b digest"):
        load(directory, dtype=dtype) if dtype else load(directory)


@pytest.mark.parametrize("architectures", [["NoSuchModel"], ["os"], ["BertModel"]])
def test_tampered_architectures_is_a_named_error(checkpoint, architectures):
    _, directory = checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = architectures
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json 'architectures' .* does not name a transformers model class"):
        astra.from_pretrained(directory)
    assert astra.is_patched(astra.from_pretrained(directory, model_class=AutoModelForCausalLM))


def test_importing_the_library_pulls_in_neither_datasets_nor_evaluate():
    # The examples' data loaders and metrics live in examples/astra_examples (the [examples] extra).
    code = "import sys, transformers_astra; print(sorted({'datasets', 'evaluate'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]


def test_device_map_loading_goes_through_transformers_loader(checkpoint):
    model, directory = checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu")
    assert astra.is_patched(loaded) and {tensor.device.type for tensor in loaded.state_dict().values()} == {"cpu"}
    batch = gpt2_batch(seed=10)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
