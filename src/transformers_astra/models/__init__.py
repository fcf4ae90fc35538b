"""Per-model-family adapters (`base.ModelAdapter`): everything family-specific, one file per family."""

from __future__ import annotations

from .base import ModelAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from .vit import ViTAdapter

ADAPTERS: dict[str, ModelAdapter] = {
    adapter.model_type: adapter
    for adapter in (GPT2Adapter(), ViTAdapter(), LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter())
}


def adapter_for(model) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"ASTRA does not support model_type={model_type!r} ({type(model).__name__}); "
            f"supported model types: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
