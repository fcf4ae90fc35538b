"""`make demo` (examples/distributed_inference.py) on checkpoints: a GPT2 with its tokenizer generates text,
a ViT classifies the images shipped with it; a missing shipped checkpoint falls back to the random model
with a warning. The checkpoints here are tiny, random and made in the test (the shipped ones are trained)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2_config, tiny_vit_config
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, ViTForImageClassification

import transformers_astra as astra
from transformers_astra.patch import astra_state

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "distributed_inference.py"
TOL = 1e-4
TIMEOUT_S = 180


def load_example():
    sys.path.insert(0, str(EXAMPLE.parent))  # the example imports examples/tasks.py for ViT preprocessing
    spec = importlib.util.spec_from_file_location("distributed_inference", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(tmp_path: Path, *arguments: str) -> tuple[dict, str]:
    result_path = tmp_path / "result.json"
    command = [sys.executable, str(EXAMPLE), "--num-processes", "2", "--cpu", "--repeats", "1", "--json", str(result_path), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result_path.read_text()), completed.stdout


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    sys.path.insert(0, str(EXAMPLE.parent))
    import tasks

    lines = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light: and there was light."]
    return tasks.train_tokenizer(lines * 20, vocab_size=300)


def test_a_missing_shipped_checkpoint_falls_back_to_the_random_model_with_a_warning(tmp_path, monkeypatch, capsys):
    example = load_example()
    monkeypatch.setattr(example, "SHIPPED", {"gpt2": tmp_path / "not-made-yet", "vit": tmp_path / "not-made-yet"})
    args = example.parse_args(["--task", "gpt2"])
    assert example.model_source(args, rank=0) is None
    assert re.match(r"WARNING: no trained gpt2 checkpoint in .*not-made-yet .*checkpoints/README.md.*tiny RANDOM model",
                    capsys.readouterr().err)
    assert example.model_source(args, rank=1) is None and capsys.readouterr().err == ""  # rank 0 says it once
    assert example.model_source(example.parse_args(["--random"]), rank=0) is None
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "config.json").write_text("{}")
    monkeypatch.setattr(example, "SHIPPED", {"gpt2": tmp_path / "made", "vit": tmp_path / "made"})
    assert example.model_source(example.parse_args([]), rank=0) == tmp_path / "made"
    with pytest.raises(SystemExit, match="no config.json there"):
        example.model_source(example.parse_args(["--model", str(tmp_path)]), rank=0)


@pytest.mark.slow
def test_the_example_generates_text_from_a_gpt2_checkpoint_with_its_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(tokenizer), n_positions=128, pad_token_id=tokenizer.eos_token_id,
                                             bos_token_id=None, eos_token_id=None)).eval()  # no early stop
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    astra.calibrate(model, [tokenizer(["In the beginning God created the heaven"] * 4, return_tensors="pt").data],
                    progress=False)
    astra.save_pretrained(model, tmp_path / "gpt2-ckpt", processor=tokenizer)

    result, stdout = run_example(tmp_path, "--model", str(tmp_path / "gpt2-ckpt"), "--max-new-tokens", "6")
    prediction = result["prediction"]
    assert result["task"] == "gpt2" and result["N"] == 2
    assert result["tokens"] == len(tokenizer(prediction["prompt"]).input_ids) > 10
    assert prediction["matches_simulation"] and len(prediction["new_tokens"][0]) == 6
    assert prediction["text"] == tokenizer.decode(prediction["new_tokens"][0], skip_special_tokens=True)
    assert prediction["time_to_first_token_s"] > 0 and prediction["generate_s"] > 0
    assert result["max_abs_diff_vs_simulation"] <= TOL
    assert result["code_bytes_sent_per_rank"] == result["expected_code_bytes"] and result["code_bytes_sent_per_rank"][0] > 0
    assert "generated: " in stdout and "time to first token" in stdout and "full-precision sequence parallelism" in stdout
    # transformers' TextStreamer printed the tokens on the last rank as they came, before rank 0's report.
    streamed = "\n".join(line for line in stdout.splitlines() if not line.startswith(("prompt: ", "generated: ")))
    assert prediction["text"].strip() and prediction["text"].strip() in streamed
    assert prediction["generation_stats"]["new_tokens"] == 6 and prediction["generation_stats"]["time_to_first_token_s"] > 0


@pytest.mark.slow
def test_the_example_classifies_the_images_shipped_with_a_vit_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = tiny_vit_config(image_size=28, num_channels=1, num_labels=10)
    config.image_mean, config.image_std = [0.5], [0.5]
    model = ViTForImageClassification(config).eval()
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    astra.calibrate(model, [{"pixel_values": torch.randn(8, 1, 28, 28)}], progress=False)
    checkpoint = tmp_path / "vit-ckpt"
    astra.save_pretrained(model, checkpoint)
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (150,), generator=generator)
    images = torch.randint(0, 256, (150, 28, 28), generator=generator, dtype=torch.uint8)
    save_file({"images": images, "labels": labels}, checkpoint / "demo_images.safetensors")

    result, stdout = run_example(tmp_path, "--model", str(checkpoint), "--images", "120")
    classification = result["prediction"]["classification"]
    assert result["task"] == "vit" and classification["images"] == 120

    # The same numbers from the models in this process: distributed == simulation, and the unpatched model.
    example = load_example()
    pixel_values, wanted_labels = example.demo_images(checkpoint, model, 120)
    assert torch.equal(wanted_labels, labels[:120])
    with torch.no_grad():
        simulated = model(pixel_values=pixel_values).logits.argmax(-1)
        unpatched = astra.unpatch(astra.from_pretrained(checkpoint)).eval()(pixel_values=pixel_values).logits.argmax(-1)
    assert classification["accuracy_simulation"] == pytest.approx(100.0 * (simulated == labels[:120]).float().mean().item())
    assert classification["accuracy_unpatched"] == pytest.approx(100.0 * (unpatched == labels[:120]).float().mean().item())
    assert classification["same_class_as_simulation"] == 100.0
    assert classification["accuracy_distributed"] == classification["accuracy_simulation"]
    assert "accuracy on 120 Fashion-MNIST test images" in stdout


def test_export_demo_images_writes_the_first_test_images(tmp_path):
    data = pytest.importorskip("astra_examples.data")
    try:
        test = data.load_image_dataset("fashion-mnist")["test"]
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed: {error}")
    sys.path.insert(0, str(EXAMPLE.parent))
    import export_demo_images

    tensors = export_demo_images.export(tmp_path / "images.safetensors", 7)
    rows = test.select(range(7)).with_format("torch")[:]
    assert tensors["images"].dtype == torch.uint8 and tensors["images"].shape == (7, 28, 28)
    assert torch.equal(tensors["images"], rows["image"].to(torch.uint8)) and torch.equal(tensors["labels"], rows["label"])
    with pytest.raises(ValueError, match="count must be >= 1"):
        export_demo_images.export(tmp_path / "x.safetensors", 0)


def finetuned_folder(tmp_path: Path, num_devices: int = 2, dtype=torch.float16) -> Path:
    """What finetune_astra.py --save leaves (a patched model, result.json), and the base's base_result.json."""
    base, source = tmp_path / "base", tmp_path / "finetuned"
    base.mkdir()
    (base / "base_result.json").write_text(json.dumps({"command": "python examples/train_base.py --task gpt2 --output-dir base",
                                                       "metric": "perplexity", "value": 42.5, "hardware": "test"}))
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(tokenizer))).eval()
    astra.patch(model, num_devices=num_devices, groups=4, codebook_size=16)
    astra.calibrate(model, [{"input_ids": torch.randint(0, len(tokenizer), (4, 12))}], progress=False)
    astra.save_pretrained(model.to(dtype), source, processor=tokenizer)
    (source / "trainer").mkdir()
    (source / "trainer" / "optimizer.pt").write_bytes(b"not shipped")
    (source / "result.json").write_text(json.dumps({
        "model": str(base), "N": num_devices, "G": 4, "K": 16, "quantize": "hidden", "metric": "perplexity", "value": 40.25,
        "hardware": "test machine", "date": "2026-11-27", "command": "python examples/finetune_astra.py --task gpt2 --save"}))
    return source


def test_ship_demo_checkpoint_copies_the_model_and_writes_its_card(tmp_path):
    sys.path.insert(0, str(EXAMPLE.parent))
    import ship_demo_checkpoint

    output = ship_demo_checkpoint.ship(finetuned_folder(tmp_path), tmp_path / "checkpoints" / "gpt2-kjv-astra-n2")
    names = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "COMMAND.md", "result.json", "base_result.json"} <= names
    assert "trainer" not in names
    card = (output / "COMMAND.md").read_text()
    assert "python examples/train_base.py --task gpt2 --output-dir base\npython examples/finetune_astra.py --task gpt2 --save" in card
    assert "| base model, test perplexity | 42.50 (test) |" in card and "N=2) | 40.25 |" in card
    model = load_example().load_checkpoint(output, 2)
    assert astra.is_patched(model) and next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("num_devices, dtype, message", [(3, torch.float16, "num_devices is 3, the demo runs 2"),
                                                         (2, torch.float32, "weights are float32")])
def test_ship_demo_checkpoint_refuses_what_the_demo_cannot_run(tmp_path, num_devices, dtype, message):
    sys.path.insert(0, str(EXAMPLE.parent))
    import ship_demo_checkpoint

    with pytest.raises(ValueError, match=message):
        ship_demo_checkpoint.ship(finetuned_folder(tmp_path, num_devices, dtype), tmp_path / "out")


def test_the_secret_file_is_read_or_refused_by_name(tmp_path):
    example = load_example()
    assert example.read_secret(None) is None
    (tmp_path / "secret").write_text("  s3cret\n")
    assert example.read_secret(tmp_path / "secret") == "s3cret"
    with pytest.raises(SystemExit, match="no such file"):
        example.read_secret(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        example.read_secret(tmp_path / "empty")


def test_load_checkpoint_goes_through_the_auto_classes_and_overrides_the_number_of_devices(tmp_path):
    example = load_example()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    astra.calibrate(model, [{"input_ids": torch.randint(0, 61, (4, 12))}], progress=False)
    astra.save_pretrained(model, tmp_path / "ckpt")
    ids = torch.randint(0, 61, (1, 9))
    loaded = example.load_checkpoint(tmp_path / "ckpt", 2)
    assert type(loaded) is GPT2LMHeadModel and astra.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.warns(UserWarning, match="num_devices"):
        three = example.load_checkpoint(tmp_path / "ckpt", 3)
    assert astra_state(three).config.num_devices == 3
