"""The benchmark workloads, with random weights (latency does not depend on the weights' values).

- ``gpt2``: GPT2-small shape (12 layers, width 768, 12 heads), prefill of 1024 tokens; only the last
  token's logits are computed (time to first token).
- ``vit``: ViT-Base/16 at 224 px, 197 tokens (196 patches + CLS), 1000 classes.
- ``llama``: a Llama-shaped model of about 245 M parameters with grouped-query attention (16 layers,
  width 1024, 16 query heads sharing 4 key/value heads, MLP 2816, vocabulary 32000, untied head),
  prefill of 1024 tokens, last token's logits. It needs ``astra.patch`` to accept
  ``LlamaForCausalLM`` (the Llama adapter); until then `build` raises `WorkloadUnavailable` naming that.

Every rank builds the same model from the same seed; ``small=True`` gives a 2-layer model of width 64
for tests. ``tokens`` shortens a causal model's prefill (e.g. the dev VM's loss rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

WORKLOADS = ("gpt2", "vit", "llama")
CAUSAL_WORKLOADS = ("gpt2", "llama")  # take --tokens (a prefill length); ViT's length is its image's
CAUSAL_TOKENS = 1024  # default prefill of the causal workloads


class WorkloadUnavailable(RuntimeError):
    """A workload this checkout cannot run yet (the message says what is missing)."""


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    inputs: dict  # keyword arguments of the model's forward
    num_tokens: int
    causal: bool


def llama_config(small: bool = False) -> LlamaConfig:
    if small:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)  # fmt: skip
    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip


def require_astra_support(model: torch.nn.Module, name: str) -> None:
    """Raise `WorkloadUnavailable` unless ``astra.patch`` has an adapter for ``model``'s family."""
    from transformers_astra.models import adapter_for

    try:
        adapter_for(model)
    except ValueError as error:
        raise WorkloadUnavailable(
            f"the {name!r} workload needs astra.patch to accept {type(model).__name__} (the Llama-family adapter, "
            f"issue 10), which this checkout does not have yet: {error}"
        ) from None


def workload_available(name: str) -> bool:
    """Whether `build(name)` works in this checkout (checked on the small model)."""
    try:
        build(name, small=True)
    except WorkloadUnavailable:
        return False
    return True


def build(name: str, small: bool = False, seed: int = 0, tokens: int | None = None) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    if tokens is not None and (name == "vit" or tokens < 1):
        raise ValueError(f"tokens must be a positive prefill length of a causal workload ({', '.join(CAUSAL_WORKLOADS)}), got {tokens!r} for {name!r}")
    torch.manual_seed(seed)
    if name in CAUSAL_WORKLOADS:
        if name == "gpt2":
            config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=101) if small else GPT2Config()
            model = GPT2LMHeadModel(config)
        else:
            require_astra_support(LlamaForCausalLM(llama_config(small=True)), name)  # before building 245 M parameters
            config = llama_config(small)
            model = LlamaForCausalLM(config)
        length = tokens or (48 if small else CAUSAL_TOKENS)
        input_ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed + 1))
        workload = Workload(name, model, {"input_ids": input_ids}, length, causal=True)
    else:
        config = (
            ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8, num_labels=10)
            if small
            else ViTConfig(num_labels=1000)  # ViTConfig's defaults are ViT-Base/16 at 224 px
        )
        model = ViTForImageClassification(config)
        size = config.image_size
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
        workload = Workload(name, model, {"pixel_values": pixels}, (size // config.patch_size) ** 2 + 1, causal=False)
    workload.model.set_attn_implementation("sdpa")
    workload.model.eval()
    return workload
