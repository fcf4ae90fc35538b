"""Single-process ASTRA on a tiny GPT2: bits per token and the divergence from the original model.

Runs offline on an embedded default (a seeded random GPT2 and generated token data):

    python examples/quickstart.py [--devices 4] [--groups 8] [--codebook-size 256] [--quantize hidden]
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import transformers_astra as astra


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="simulated devices N")
    parser.add_argument("--groups", type=int, default=8, help="VQ groups G per vector")
    parser.add_argument("--codebook-size", type=int, default=256, help="codewords K per codebook")
    parser.add_argument("--quantize", choices=["hidden", "kv"], default="hidden")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length")
    args = parser.parse_args()

    original = tiny_gpt2()
    model = astra.patch(
        copy.deepcopy(original), num_devices=args.devices, groups=args.groups,
        codebook_size=args.codebook_size, quantize=args.quantize,
    )
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 512, (8, args.tokens), generator=generator) for _ in range(4)]
    astra.calibrate(model, calibration)
    prompt = torch.randint(0, 512, (1, args.tokens), generator=generator)

    with torch.no_grad():
        reference = original(prompt).logits
        quantized = model(prompt).logits
        with astra.full_precision(model):
            sequence_parallel = model(prompt).logits
    config = model._astra_state.config
    width = original.config.n_embd
    probabilities = reference.softmax(-1)
    kl = (probabilities * (reference.log_softmax(-1) - quantized.log_softmax(-1))).sum(-1).mean().item()
    print(f"ASTRA N={config.num_devices} G={config.groups} K={config.codebook_size} quantize={config.quantize}")
    print(f"bits per token and layer: {config.bits_per_token} (fp32 sequence parallelism: "
          f"{(2 if config.quantize == 'kv' else 1) * width * 32}; {config.compression_ratio(width):.1f}x smaller)")
    print(f"max |logits - original|: ASTRA {(quantized - reference).abs().max().item():.4f}, "
          f"full-precision sequence parallelism {(sequence_parallel - reference).abs().max().item():.2e}")
    print(f"mean KL(original || ASTRA) of next-token distributions: {kl:.5f}")
    same = (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"top-1 next-token agreement with the original: {100 * same:.1f}%")


if __name__ == "__main__":
    main()
