"""How many bits the codes really carry: empirical entropy of a trained checkpoint's codes (issue 12).

ASTRA sends every code in ceil(log2 K) bits. A trained codebook is not used uniformly, so a lossless entropy
coder (one static frequency table per layer and group, learned on training data and shipped with the
checkpoint) could send fewer bits at exactly the same accuracy. This script measures how many: it runs a
shipped checkpoint (single-process simulation, its own N) on the training split and on the test split,
records every layer's codes (`astra.capture_codes`) and reports, averaged over layers and groups:
- ``bits_per_code``: what the wire carries now, ceil(log2 K);
- ``entropy_test``: the test codes' empirical entropy (the bound of a coder fitted to the test data itself);
- ``cross_entropy_train_to_test``: test codes coded with the training split's frequencies (add-half
  smoothing): what a static table shipped with the checkpoint would achieve;
- the saving of the latter against ``bits_per_code``.

    python -m benchmarks.code_entropy --out docs/results/code_entropy.json   (needs bible-kjv-text, datasets)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def blocks(tokenizer, texts: list[str], length: int, count: int) -> torch.Tensor:
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    usable = (ids.numel() // length) * length
    out = ids[:usable].reshape(-1, length)
    if out.shape[0] < count:
        raise ValueError(f"only {out.shape[0]} blocks of {length} tokens, asked for {count}")
    step = out.shape[0] // count  # spread over the split
    return out[::step][:count]


def layer_counts(model, ids: torch.Tensor, batch: int, codebook_size: int) -> dict[int, torch.Tensor]:
    """(layer -> (G, K) counts) of the codes of every token of ``ids``."""
    import transformers_astra as astra

    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            with astra.capture_codes(model) as log:
                model(input_ids=ids[start : start + batch])
            for layer, codes in log.items():
                flat = codes.reshape(-1, codes.shape[-1]).long()  # (tokens, G)
                groups = flat.shape[1]
                one = torch.zeros(groups, codebook_size, dtype=torch.float64)
                one.scatter_add_(1, flat.T, torch.ones_like(flat.T, dtype=torch.float64))
                counts[layer] = counts.get(layer, 0) + one
    return counts


def entropies(train: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(mean empirical entropy of test, mean cross-entropy of test under smoothed train frequencies), bits per code."""
    size = train.shape[-1]
    p_test = test / test.sum(-1, keepdim=True)
    h_test = -(p_test * torch.log2(p_test.clamp_min(1e-300))).sum(-1)
    p_train = (train + 0.5) / (train.sum(-1, keepdim=True) + 0.5 * size)
    cross = -(p_test * torch.log2(p_train)).sum(-1)
    return h_test.mean().item(), cross.mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "gpt2-kjv-astra-n2"))
    parser.add_argument("--blocks", type=int, default=48, help="256-token blocks from each split")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", help="append the row to this JSON list")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    from astra_examples.data import load_kjv
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers_astra as astra  # noqa: F401  (registers the quantizer the checkpoint names)
    from transformers_astra.patch import astra_state

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    config = astra_state(model).config
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    data = load_kjv()
    counts = {}
    for split in ("train", "test"):
        ids = blocks(tokenizer, data[split]["text"], args.length, args.blocks)
        counts[split] = layer_counts(model, ids, 8, config.codebook_size)
    per_layer = []
    for layer in sorted(counts["test"]):
        h, cross = entropies(counts["train"][layer], counts["test"][layer])
        used = (counts["test"][layer] > 0).sum(-1).double().mean().item()
        per_layer.append({"layer": layer, "entropy_test": round(h, 3), "cross_entropy_train_to_test": round(cross, 3),
                          "codewords_used_test": round(used, 1)})
    bits = config.bits_per_code
    mean_h = sum(r["entropy_test"] for r in per_layer) / len(per_layer)
    mean_cross = sum(r["cross_entropy_train_to_test"] for r in per_layer) / len(per_layer)
    row = {
        "checkpoint": os.path.relpath(args.checkpoint, ROOT), "G": config.groups, "K": config.codebook_size,
        "quantize": config.quantize, "N": config.num_devices, "tokens_per_split": args.blocks * args.length,
        "bits_per_code": bits, "entropy_test": round(mean_h, 3), "cross_entropy_train_to_test": round(mean_cross, 3),
        "saving_percent": round(100 * (1 - mean_cross / bits), 1), "per_layer": per_layer,
        "machine": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.code_entropy" + (f" --out {args.out}" if args.out else ""),
    }
    print(f"{row['checkpoint']}: G={row['G']} K={row['K']} {row['quantize']}: {bits} bits a code on the wire; "
          f"test entropy {mean_h:.2f} bits, coded with training frequencies {mean_cross:.2f} bits "
          f"({row['saving_percent']:.1f} % fewer)")
    for r in per_layer:
        print(f"  layer {r['layer']}: entropy {r['entropy_test']:.2f}, cross {r['cross_entropy_train_to_test']:.2f}, "
              f"codewords used {r['codewords_used_test']:.0f} of {config.codebook_size}")
    if args.out:
        path = Path(args.out)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rows + [row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
