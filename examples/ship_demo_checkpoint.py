"""Put a fine-tuned ASTRA checkpoint where `make demo` runs it, with the card of the commands that made it.

    python examples/ship_demo_checkpoint.py outputs/gpt2-astra-n2 --output checkpoints/gpt2-kjv-astra-n2
    python examples/ship_demo_checkpoint.py outputs/vit-astra-n2  --output checkpoints/vit-fashion-mnist-astra-n2

SOURCE is a folder written by ``examples/finetune_astra.py --save --save-dtype float16 --num-devices 2``
(its result.json records the command, metric, machine and date; the base model's base_result.json, found
through result.json's ``model`` or ``--base``, records the base training command). Copies the model files
only (no Trainer state), writes COMMAND.md from those records, adds the ViT demo's test images
(`export_demo_images.py`), checks the result loads and that everything under checkpoints/ stays within
25 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

import transformers_astra as astra

MAX_TOTAL_BYTES = 25 * 2**20
DEMO_DEVICES = 2
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "preprocessor_config.json", "result.json")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    return json.loads(path.read_text())


def check_source(source: Path) -> tuple[dict, dict]:
    """(config.json, result.json) of a fine-tuned fp16 checkpoint for the demo's 2 processes, or a ValueError."""
    config, result = read_json(source / "config.json"), read_json(source / "result.json")
    astra_block = config.get("quantization_config") or {}
    if astra_block.get("quant_method") != "astra":
        raise ValueError(f"{source}: config.json has no quantization_config with quant_method 'astra' (not saved "
                         "from a patched model, or saved by 0.1.0: convert it first, docs/checkpoints.md)")
    if astra_block.get("num_devices") != DEMO_DEVICES or result.get("N") != DEMO_DEVICES:
        raise ValueError(f"{source}: num_devices is {astra_block.get('num_devices')}, the demo runs {DEMO_DEVICES} "
                         f"processes: fine-tune with --num-devices {DEMO_DEVICES}")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype != "float16":
        raise ValueError(f"{source}: weights are {dtype}, the shipped checkpoints are float16: save with --save-dtype float16")
    for field in ("command", "metric", "value", "hardware", "date"):
        if field not in result:
            raise ValueError(f"{source}/result.json has no {field!r} (not written by finetune_astra.py?)")
    return config, result


def card(name: str, config: dict, result: dict, base: dict | None, images_command: str | None, files: dict[str, int]) -> str:
    lines = [f"# {name}", "", f"A {config['model_type']} checkpoint fine-tuned with ASTRA for {result['N']} devices "
             f"(G={result.get('G')}, K={result.get('K')}, quantize={result.get('quantize')}), stored in float16, "
             "run by `make demo` (examples/distributed_inference.py).", "", "## Commands that made it", "", "```bash"]
    if base is not None:
        lines.append(base["command"])
    lines.append(result["command"])
    if images_command:
        lines.append(images_command)
    lines += ["```", "", "## Measured", "", "| | value |", "| --- | --- |"]
    if base is not None:
        lines.append(f"| base model, test {base['metric']} | {base['value']:.2f} ({base.get('hardware', '?')}) |")
    lines.append(f"| after ASTRA fine-tuning, test {result['metric']} (single-process simulation, N={result['N']}) | "
                 f"{result['value']:.2f} |")
    lines.append(f"| fine-tuning machine, date | {result['hardware']}, {result['date']} |")
    lines += ["", "## Files", "", "| file | bytes |", "| --- | --- |", *(f"| {f} | {n} |" for f, n in sorted(files.items())), ""]
    return "\n".join(lines)


def ship(source: Path, output: Path, base_dir: Path | None = None, images: int = 500) -> Path:
    config, result = check_source(source)
    base_dir = base_dir or Path(result.get("model", ""))
    base = read_json(base_dir / "base_result.json") if (base_dir / "base_result.json").is_file() else None
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    for shard in source.glob("model-*.safetensors"):
        shutil.copy2(shard, output / shard.name)
    if base is not None:
        shutil.copy2(base_dir / "base_result.json", output / "base_result.json")
    images_command = None
    if config["model_type"] == "vit":
        import export_demo_images

        images_path = output / "demo_images.safetensors"
        export_demo_images.export(images_path, images)
        images_command = f"python examples/export_demo_images.py --count {images} --output {os.path.relpath(images_path)}"
    files = {path.name: path.stat().st_size for path in output.iterdir()}
    (output / "COMMAND.md").write_text(card(output.name, config, result, base, images_command, files))
    astra.from_pretrained(output, dtype=torch.float32)  # loads, codebooks and all (named errors otherwise)
    total = sum(path.stat().st_size for path in output.parent.rglob("*") if path.is_file())
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"{output.parent} holds {total / 2**20:.1f} MB, more than the {MAX_TOTAL_BYTES / 2**20:.0f} MB "
                         "the repository ships: train a smaller model")
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder saved by finetune_astra.py --save")
    parser.add_argument("--output", type=Path, required=True, help="e.g. checkpoints/gpt2-kjv-astra-n2")
    parser.add_argument("--base", type=Path, help="the base model folder (default: result.json's 'model')")
    parser.add_argument("--images", type=int, default=500, help="ViT: test images shipped for the demo")
    args = parser.parse_args(argv)
    output = ship(args.source, args.output, args.base, args.images)
    print(f"shipped {args.source} to {output}:")
    print((output / "COMMAND.md").read_text())


if __name__ == "__main__":
    main()
