"""The example scripts end to end on a tiny offline dataset: train a base ViT, ASTRA-fine-tune it, save, reload."""

import json
import sys
from pathlib import Path

import pytest
from test_data import tiny_fashion  # noqa: F401  (fixture: tiny Fashion-MNIST IDX files)

import transformers_astra as astra
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
