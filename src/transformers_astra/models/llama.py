"""The Llama family: Llama, Qwen2, Qwen3, Mistral (rotary positions, grouped-query attention, RMSNorm).

What the family changes against GPT2, declared here and nowhere else:

- Rotary positions (RoPE) are applied to the keys inside the attention module, after the projection.
  A receiver therefore rebuilds another shard's keys unrotated and rotates them with the SENDER's
  global positions: in the simulation those are the positions the module got for every token; in the
  distributed runtime `position_table` computes cos/sin of the whole sequence once per forward with
  the model's own rotary embedding (so every rope type the config allows, including the ones whose
  frequencies depend on the sequence length, gives what the unpatched model gives) and `rank_hooks`
  hands each rank its slice. The rotation is the family's own `apply_rotary_pos_emb`.
- kv mode quantizes keys BEFORE rotation (codebooks do not depend on position) and values as they are.
  The attention function only sees rotated keys, so a forward hook on the module that produces the
  unrotated keys (``k_proj``, or Qwen3's ``k_norm``) keeps them for it.
- Grouped-query attention: K/V have ``num_key_value_heads`` heads; kv mode sends 2 * kv_heads * head_dim
  values per token.
- Qwen2: biases on the K/V projections (``project_kv`` uses the module's own Linear layers).
  Qwen3: ``k_norm`` on the projected keys (hidden mode: the receiver applies it; kv mode: sent after it).
  Mistral, Qwen2, Qwen3: sliding-window layers (``sliding_window``), masked by transformers in the
  simulation and by the same rule (key > query - window) in the runtime; a sliding-window KV cache keeps
  its last window - 1 tokens of the last device's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from ..config import AstraConfig
from ..exchange import split_heads
from ..sharding import ShardLayout
from .base import ModelAdapter, RankView, TensorParallelPlan


class LlamaAdapter(ModelAdapter):
    model_type = "llama"
    causal = True
    # The family's modeling module: its `apply_rotary_pos_emb` rotates the rebuilt keys.
    modeling = modeling_llama
    # Name of the attention submodule whose output is the key before rotation (kv mode sends it).
    unrotated_key_module = "k_proj"

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in model.base_model.layers]

    def key_value_width(self, model: nn.Module) -> int:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_key_value_heads * head_dim

    def key_value_heads(self, module: nn.Module) -> int:
        return module.config.num_key_value_heads

    def validate(self, model: nn.Module, config: AstraConfig) -> None:
        super().validate(model, config)
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None:
            raise ValueError(f"{type(model).__name__} has no rotary_emb module; ASTRA's {self.model_type} adapter needs it")

    # ------------------------------------------------------------------------- simulation-side hooks
    def install(self, model: nn.Module, state) -> list:
        if state.config.quantize != "kv":
            return []
        handles = []
        for module in self.attention_modules(model):
            source = getattr(module, self.unrotated_key_module)
            handles.append(source.register_forward_hook(_keep_unrotated_keys(module._astra_layer)))
        return handles

    def remember(self, layer, args: tuple, kwargs: dict) -> None:
        super().remember(layer, args, kwargs)
        layer.positions = kwargs.get("position_embeddings")  # (cos, sin) of every token this module sees

    # ------------------------------------------------------------------ what is sent, how it is rebuilt
    def unpositioned_key(self, layer, key: torch.Tensor) -> torch.Tensor:
        if layer.pending_key is None:
            raise RuntimeError("ASTRA kv mode ran without the unrotated keys; was the model patched twice?")
        return layer.pending_key

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.key_value_heads(module)
        return split_heads(module.k_proj(hidden), heads), split_heads(module.v_proj(hidden), heads)

    def position_key(self, module: nn.Module, key: torch.Tensor, positions: Any) -> torch.Tensor:
        if positions is None:
            raise RuntimeError("ASTRA needs the rotary positions of the rebuilt keys; none were given")
        cos, sin = positions
        _, rotated = self.modeling.apply_rotary_pos_emb(key, key, cos, sin)
        return rotated

    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        """Heads and K/V heads split alike (query head h keeps its K/V head h // groups on the same rank)."""
        config = model.config
        return TensorParallelPlan(
            blocks=list(model.base_model.layers),
            column=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
            row=("self_attn.o_proj", "mlp.down_proj"),
            divisible={
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "intermediate_size": config.intermediate_size,
            },
        )

    # ------------------------------------------------------------------ the runtime: one rank's inputs
    def position_table(self, model: nn.Module, inputs: Mapping[str, Any], layout: ShardLayout) -> Any:
        """(cos, sin) of all T tokens at their global positions, from the model's own rotary embedding."""
        position_ids = self.global_position_ids(inputs, layout)
        like = torch.empty(0, dtype=model.get_input_embeddings().weight.dtype, device=position_ids.device)
        return model.base_model.rotary_emb(like, position_ids)

    def rank_hooks(self, model: nn.Module, view: RankView) -> list:
        start, end = view.bounds
        own = self.select_positions(view.positions, torch.arange(start, end))

        def own_positions(module, args, output):
            return tuple(part.to(output[0].device) for part in own)

        return [model.base_model.rotary_emb.register_forward_hook(own_positions)]


class MistralAdapter(LlamaAdapter):
    """Mistral: Llama with a sliding window on every layer when ``config.sliding_window`` is set."""

    model_type = "mistral"
    modeling = modeling_mistral

    def sliding_window(self, module: nn.Module) -> int | None:
        return getattr(module.config, "sliding_window", None)


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: biases on Q/K/V (taken care of by the module's Linear layers); per-layer sliding windows."""

    model_type = "qwen2"
    modeling = modeling_qwen2

    def sliding_window(self, module: nn.Module) -> int | None:
        return getattr(module, "sliding_window", None)  # set on the layers whose layer_type is sliding_attention


class Qwen3Adapter(Qwen2Adapter):
    """Qwen3: RMSNorm on every projected key head (``k_norm``) before rotation."""

    model_type = "qwen3"
    modeling = modeling_qwen3
    unrotated_key_module = "k_norm"

    def normalize_key(self, module: nn.Module, key: torch.Tensor) -> torch.Tensor:
        return module.k_norm(key)  # a norm over the head dimension: the same on (B, H, T, d) as on (B, T, H, d)


def _keep_unrotated_keys(layer):
    def hook(module, args, output: torch.Tensor) -> None:
        layer.pending_key = output.reshape(*output.shape[:2], -1)  # (B, T, kv_heads * head_dim)

    return hook
