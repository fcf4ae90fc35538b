"""Write the first N Fashion-MNIST test images (uint8) and labels to a safetensors file for the ViT demo.

    python examples/export_demo_images.py --output checkpoints/vit-fashion-mnist-astra-n2/demo_images.safetensors

`make demo` runs before `make test` installs the Debian datasets, and the demo must run offline without root:
so the few hundred images it classifies ship next to the ViT checkpoint (500 images: 392 KB). Reads Debian's
dataset-fashion-mnist (``make data``) or the folder in ASTRA_FASHION_MNIST_DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from astra_examples.data import load_image_dataset


def export(output: Path, count: int) -> dict[str, torch.Tensor]:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    test = load_image_dataset("fashion-mnist")["test"]
    if count > len(test):
        raise ValueError(f"count {count} exceeds the {len(test)} test images")
    rows = test.select(range(count)).with_format("torch")[:]
    tensors = {"images": rows["image"].to(torch.uint8).contiguous(), "labels": rows["label"].to(torch.int64).contiguous()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, output, metadata={"source": "Debian dataset-fashion-mnist, test split", "rows": f"0..{count - 1}",
                                         "classes": ",".join(test.features["label"].names)})
    return tensors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=500, help="the first COUNT images of the test split")
    args = parser.parse_args(argv)
    tensors = export(args.output, args.count)
    print(f"wrote {len(tensors['labels'])} images {tuple(tensors['images'].shape[1:])} to {args.output} "
          f"({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
