"""The example scripts end to end on a tiny offline dataset: train a base ViT, ASTRA-fine-tune it, save, reload."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import tiny_fashion  # noqa: F401  (fixture: tiny Fashion-MNIST IDX files)

import transformers_astra as astra
from transformers_astra.patch import astra_state
from astra_examples import data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for module in ("tasks", "train_base", "finetune_astra"):
        sys.modules.pop(module, None)


def test_train_base_then_finetune_astra(tiny_fashion, examples_on_path, tmp_path, monkeypatch):  # noqa: F811
    folder, _ = tiny_fashion
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(folder))
    import finetune_astra
    import train_base

    small = ["--workers", "0", "--batch-size", "4", "--epochs", "1"]
    base = train_base.main(["--task", "vit", "--layers", "1", "--width", "32", "--output-dir", str(tmp_path / "base"), *small])
    assert base["metric"] == "accuracy" and 0 <= base["value"] <= 100
    result = finetune_astra.main([
        "--task", "vit", "--base", str(tmp_path / "base"), "--output-dir", str(tmp_path / "astra"), "--groups", "4",
        "--codebook-size", "4", "--calibration-batches", "1", "--save", *small,
    ])
    saved = json.loads((tmp_path / "astra" / "result.json").read_text())
    assert saved == result and result["G"] == 4 and result["bits_per_token"] == 8
    for key in ("model", "dataset", "N", "G", "quantize", "noise_scale", "distributed_cls", "commitment_weight",
                "metric", "value", "base_value", "command"):
        assert key in result
    reloaded = astra.from_pretrained(tmp_path / "astra")
    assert reloaded.config.quantization_config.groups == 4 and all(bool(q.initialized) for q in astra.quantizers(reloaded))


def test_finetune_evaluates_other_layouts_and_saves_a_loadable_checkpoint(tiny_fashion, examples_on_path, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    folder, _ = tiny_fashion
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(folder))
    import finetune_astra
    import tasks
    import train_base
    from transformers import AutoImageProcessor

    small = ["--workers", "0", "--batch-size", "4", "--epochs", "1"]
    train_base.main(["--task", "vit", "--layers", "1", "--width", "32", "--output-dir", str(tmp_path / "base"), *small])
    result = finetune_astra.main([
        "--task", "vit", "--base", str(tmp_path / "base"), "--output-dir", str(tmp_path / "astra"), "--groups", "4",
        "--codebook-size", "4", "--calibration-batches", "1", "--save", "--seed", "3", "--random-shards", "2,3",
        "--eval-num-devices", "4", "2", "--eval-shard-sizes", "1,1,1,1", "1,3", *small,
    ])
    assert result["seed"] == 3 and result["random_shards"] == [2, 3] and result["eval_num_devices"] == 4
    evals = {(e["eval_num_devices"], str(e["eval_shard_sizes"])): e["value"] for e in result["evals"]}
    assert set(evals) == {(4, "None"), (2, "None"), (4, "[1, 1, 1, 1]"), (2, "[1, 3]")}
    # The training layout again (and its even weights) gives the main value: the model got its config back.
    assert evals[(4, "None")] == evals[(4, "[1, 1, 1, 1]")] == result["value"]
    saved = tmp_path / "astra"
    base_line, command_line = (saved / "command.txt").read_text().splitlines()
    assert base_line.startswith("# base (") and "python examples/train_base.py --task vit" in base_line
    assert command_line.startswith("python examples/finetune_astra.py --task vit")
    reloaded = astra.from_pretrained(saved)
    config = astra_state(reloaded).config
    assert config.num_devices == 4 and config.shard_sizes is None
    # The saved class is the PIL-based ViTImageProcessor (no torchvision, which does not install beside the CPU
    # torch build of our CI machines). transformers 5.9's AutoImageProcessor itself requires torchvision: there
    # the class the config names is loaded directly.
    assert json.loads((saved / "preprocessor_config.json").read_text())["image_processor_type"] == "ViTImageProcessor"
    try:
        processor = AutoImageProcessor.from_pretrained(saved, use_fast=False)
    except ImportError as error:
        assert "Torchvision" in str(error)
        from transformers import ViTImageProcessor

        processor = ViTImageProcessor.from_pretrained(saved)
    dataset = data.load_fashion_mnist(folder)
    image = dataset["test"][0]["image"]
    pixels = processor(np.asarray(image, dtype=np.uint8)[:, :, None], input_data_format="channels_last",
                       return_tensors="pt")["pixel_values"]
    collated = tasks.ImageCollator(reloaded.config)([{"image": torch.tensor(np.asarray(image))[None], "label": torch.tensor(0)}])
    torch.testing.assert_close(pixels, collated["pixel_values"])
