"""Convert a checkpoint written by transformers-astra 0.1.0 to the current format, in place.

    python -m transformers_astra.convert DIR

0.1.0 stored the settings in config.json as an ``astra`` block, which transformers does not read: the Auto
classes load such a checkpoint as a plain, unpatched model. This loads it once through transformers'
``from_pretrained`` with the block as an `AstraQuantizationConfig` (the codebooks load from their saved
names, ``...astra_quantizer.codebook``), then saves it again: config.json gets ``quantization_config``
(``quant_method: "astra"``, the settings and each codebook's digest) and the weights are written anew.
Other files in DIR (tokenizer, README.md, ...) stay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoConfig

from .config import AstraConfig
from .hub import _model_class
from .patch import quantizers
from .quantization_config import AstraQuantizationConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def convert(directory: str | os.PathLike) -> Path:
    """Rewrite the 0.1.0 checkpoint in ``directory`` in the current format; returns the directory."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: pass the checkpoint directory")
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{directory} already has a quantization_config: nothing to convert")
    block = getattr(config, "astra", None)
    if block is None:
        raise ValueError(f"{directory}/config.json has no 'astra' block: it is not a transformers-astra 0.1.0 checkpoint")
    try:
        settings = AstraConfig.from_dict(block)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory}/config.json has an invalid 'astra' block: {error}") from error
    del config.astra
    model = _model_class(config, None).from_pretrained(
        directory, config=config, quantization_config=AstraQuantizationConfig.from_astra_config(settings)
    )
    missing = [index for index, quantizer in enumerate(quantizers(model)) if not bool(quantizer.initialized)]
    if missing:
        raise ValueError(f"{directory} lacks the codebooks of layer(s) {missing}: it cannot be converted")
    old_weights = _weight_files(directory)
    with tempfile.TemporaryDirectory(dir=directory) as work_dir:
        model.save_pretrained(work_dir)
        for file in old_weights:
            file.unlink()
        for file in Path(work_dir).iterdir():
            shutil.move(str(file), directory / file.name)
    return directory


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    # Only plain names inside the folder: the loader refused any other before we got here.
    return [directory / name for name in sorted({*WEIGHT_FILES, *names}) if (directory / name).is_file()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transformers_astra.convert", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="the checkpoint directory (holding config.json)")
    args = parser.parse_args(argv)
    convert(args.directory)
    print(f"converted {args.directory}: config.json now has quantization_config (quant_method 'astra')")


if __name__ == "__main__":
    main()
