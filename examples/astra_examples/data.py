"""Offline datasets for the examples, as `datasets.DatasetDict`s, with a Hub fallback for online users.

- ``"fashion-mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
- ``"kjv"``: the King James Bible of Debian's ``bible-kjv-text``, read through its ``bible`` program (package
  ``bible-kjv``; install both), or from a plain-text dump of it (``bible -f gen1:1-rev22:21``).
- anything else: a Hugging Face Hub dataset name, passed to `datasets.load_dataset` (needs a network or a cache).

A missing Debian source raises `FileNotFoundError` naming the package to install.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
KJV_DATA = Path("/usr/lib/bible.data")
KJV_WHOLE_TEXT = "gen1:1-rev22:21"
# One verse per line with pretty-printing off: "Ge1:1 In the beginning ...".
KJV_VERSE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")
# Held-out chapters: every 20th chapter goes to test, the one before it to validation (90/5/5, same style).
KJV_SPLIT_PERIOD = 20

# Environment variables that point the offline loaders elsewhere (e.g. a copy on a machine without apt).
FASHION_MNIST_ENV = "ASTRA_FASHION_MNIST_DIR"
KJV_TEXT_ENV = "ASTRA_KJV_TEXT"

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_image_dataset(name: str) -> DatasetDict:
    """``"fashion-mnist"`` offline (train/test; columns ``image``, ``label``) or a Hub dataset by name."""
    if name == "fashion-mnist":
        return load_fashion_mnist()
    return load_dataset(name)


def load_text_dataset(name: str, config_name: str | None = None) -> DatasetDict:
    """``"kjv"`` offline (train/validation/test of verses; column ``text``) or a Hub dataset by name."""
    if name == "kjv":
        return load_kjv()
    return load_dataset(name, config_name)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format; gzip or plain) as a numpy array of its declared shape and type."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Fashion-MNIST from its IDX files: 60k train and 10k test 28x28 grey images with 10 class labels."""
    root = Path(data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images = read_idx(_find_idx(root, images_name))
        labels = read_idx(_find_idx(root, labels_name))
        # Raw uint8 arrays (no PNG round trip, no Pillow needed); `image_batch_to_tensor` reads them.
        features = Features(
            {"image": Array2D(images.shape[1:], "uint8"), "label": ClassLabel(names=list(FASHION_MNIST_LABELS))}
        )
        splits[split] = Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)
    return DatasetDict(splits)


def _find_idx(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}. Install the Debian package: "
        f"`apt-get install dataset-fashion-mnist` (or set {FASHION_MNIST_ENV} to a folder holding the IDX files)."
    )


def load_kjv(text_file: str | os.PathLike | None = None) -> DatasetDict:
    """The King James Bible, one verse a row (``text``, ``reference``), split by chapter into train/validation/test."""
    text = _kjv_text(text_file or os.environ.get(KJV_TEXT_ENV))
    rows: dict[str, dict[str, list[str]]] = {split: {"text": [], "reference": []} for split in ("train", "validation", "test")}
    chapter_index, previous_chapter = -1, None
    for line in text.splitlines():
        match = KJV_VERSE.match(line.strip())
        if match is None:
            continue
        chapter = (match["book"], match["chapter"])
        if chapter != previous_chapter:
            chapter_index, previous_chapter = chapter_index + 1, chapter
        split = _kjv_split(chapter_index)
        rows[split]["text"].append(match["text"])
        rows[split]["reference"].append(f"{match['book']}{match['chapter']}:{match['verse']}")
    if not rows["train"]["text"]:
        raise ValueError("no verses found in the KJV text; expected lines like 'Ge1:1 In the beginning ...'")
    features = Features({"text": Value("string"), "reference": Value("string")})
    return DatasetDict({split: Dataset.from_dict(columns, features=features) for split, columns in rows.items()})


def _kjv_split(chapter_index: int) -> str:
    position = chapter_index % KJV_SPLIT_PERIOD
    if position == KJV_SPLIT_PERIOD - 1:
        return "test"
    if position == KJV_SPLIT_PERIOD - 2:
        return "validation"
    return "train"


def _kjv_text(text_file: str | os.PathLike | None) -> str:
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"KJV text file {path} not found")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    program = shutil.which("bible")
    if program is None or not KJV_DATA.is_file():
        raise FileNotFoundError(
            f"The King James Bible is not installed ({KJV_DATA} or the `bible` program is missing). Install the "
            f"Debian package: `apt-get install bible-kjv-text bible-kjv` (the data and the `bible` program), or set {KJV_TEXT_ENV} to a "
            f"text dump made with `bible -f {KJV_WHOLE_TEXT}`."
        )
    # -f turns pretty-printing off: one "Ge1:1 text" line per verse.
    return subprocess.run([program, "-f", KJV_WHOLE_TEXT], capture_output=True, text=True, check=True).stdout
