"""Offline loaders (IDX -> Dataset, KJV -> held-out split), their errors, and the offline accuracy metric."""

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from astra_examples import data
from astra_examples.metrics import load_accuracy, perplexity_from_loss


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(6) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 0, 4]),
    }
    for name, array in arrays.items():
        write_idx(tmp_path / f"{name}.gz", array)
    return tmp_path, arrays


def test_idx_round_trip(tiny_fashion):
    folder, arrays = tiny_fashion
    images = data.read_idx(folder / "train-images-idx3-ubyte.gz")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte"])


def test_idx_rejects_other_files(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)


def test_fashion_mnist_dataset(tiny_fashion):
    folder, arrays = tiny_fashion
    dataset = data.load_fashion_mnist(folder)
    assert set(dataset) == {"train", "test"} and len(dataset["train"]) == 6 and len(dataset["test"]) == 3
    assert dataset["train"].features["label"].names[9] == "Ankle boot"
    first = dataset["test"].with_format("numpy")[0]
    np.testing.assert_array_equal(first["image"], arrays["t10k-images-idx3-ubyte"][0])
    assert first["label"] == 9


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def kjv_text(chapters: int) -> str:
    return "\n".join(f"Ge{c}:{v} Verse {v} of chapter {c}." for c in range(1, chapters + 1) for v in (1, 2))


def test_kjv_is_split_by_chapter(tmp_path):
    path = tmp_path / "kjv.txt"
    path.write_text("Genesis\n" + kjv_text(40))  # lines that are not verses are skipped
    dataset = data.load_kjv(path)
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 72, "validation": 4, "test": 4}
    assert dataset["test"]["reference"] == ["Ge20:1", "Ge20:2", "Ge40:1", "Ge40:2"]
    assert dataset["train"][0]["text"] == "Verse 1 of chapter 1."
    assert not set(dataset["train"]["reference"]) & set(dataset["test"]["reference"])


def test_missing_kjv_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.delenv(data.KJV_TEXT_ENV, raising=False)
    monkeypatch.setattr(data, "KJV_DATA", tmp_path / "absent.data")
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv-text bible-kjv"):
        data.load_kjv()


def test_empty_kjv_text_is_an_error(tmp_path):
    path = tmp_path / "kjv.txt"
    path.write_text("no verses here\n")
    with pytest.raises(ValueError, match="no verses"):
        data.load_kjv(path)


@pytest.mark.skipif(not data.KJV_DATA.is_file(), reason="Debian package bible-kjv-text not installed")
def test_installed_kjv_has_every_verse():
    dataset = data.load_kjv()
    assert sum(len(rows) for rows in dataset.values()) == 31102
    assert dataset["train"][0]["text"].startswith("In the beginning God created")


def test_offline_accuracy_metric(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_accuracy()
    assert metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4])["accuracy"] == 0.75
    assert perplexity_from_loss(0.0) == 1.0


def test_install_script_installs_the_bible_program():
    """bible-kjv (the `bible` program) is only a Recommends of bible-kjv-text: the script must name it."""
    script = (Path(__file__).resolve().parents[1] / "scripts" / "install-data.sh").read_text()
    packages = re.search(r'^PACKAGES="([^"]*)"', script, re.M).group(1).split()
    assert {"dataset-fashion-mnist", "bible-kjv-text", "bible-kjv"} <= set(packages)
    assert "--no-install-recommends" not in script or "bible-kjv" in packages
