"""The contract between one model family and ASTRA: everything family-specific, declared in one place.

In the spirit of diffusers' per-model context-parallel plan read by generic hooks, an adapter *declares*
what the generic code needs and the generic code reads it:

- the single-process simulation (`attention.py`) and the distributed runtime (`distributed.py`) send the
  same vectors and rebuild the other shards' keys/values the same way, through `exchange.py`, which
  reads ``sent`` (what a layer quantizes) and ``project_kv``/``normalize_key``/``position_key`` (how a
  receiver turns it back into K/V);
- ``causal`` says whether codes flow to later shards only;
- ``rank_layout``/``rank_inputs``/``key_padding``/``position_table``/``rank_hooks`` say how the inputs,
  the padding mask and the positions of one rank's shard are taken from the whole inputs;
- ``install`` adds the family's own hooks (ViT: distributed class tokens, pooled through the exchange);
- ``tensor_parallel_plan`` says which linear layers of a block split how, for the benchmark's
  Megatron-style tensor-parallel baseline (``benchmarks/baselines/tensor_parallel.py``).

Adding a family means one file in ``models/`` with a subclass of `ModelAdapter` (see
docs/developing.md, with the Llama adapter as the example) and its tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import AstraConfig
from ..exchange import merge_heads
from ..sharding import ShardLayout

if TYPE_CHECKING:
    from ..state import AstraState, LayerState

# Inputs of a token model that have a sequence dimension (dim 1) and are cut into shards by the runtime.
TOKEN_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


@dataclass
class RankView:
    """What one rank knows about the whole sequence during one distributed forward (built by the runtime)."""

    layout: ShardLayout
    rank: int
    # (B, T) True = real token, in the order of the layout; None: no padding.
    key_padding: torch.Tensor | None = None
    # The adapter's positions of all T tokens (`ModelAdapter.position_table`), None when keys carry none.
    positions: Any = None

    @property
    def bounds(self) -> tuple[int, int]:
        return self.layout.bounds(self.rank)


@dataclass(frozen=True)
class TensorParallelPlan:
    """What Megatron-style tensor parallelism needs of one family (in the style of gpt-fast's ``tp.py``).

    Module and attribute paths are relative to one transformer block (``blocks``). Column-parallel layers
    keep the output features (and bias) of this rank's heads / MLP units; row-parallel layers keep the
    matching input features and their partial outputs are summed by an all-reduce.
    """

    blocks: list[nn.Module]
    column: tuple[str, ...]
    row: tuple[str, ...]
    # Config fields that must divide by the number of ranks, with their values (heads, K/V heads, MLP width).
    divisible: Mapping[str, int]
    # Column-parallel layers whose output is several equal parts side by side, each split (GPT2's c_attn: Q|K|V).
    fused_parts: Mapping[str, int] = field(default_factory=dict)
    # Integer attributes holding whole-layer widths or head counts that the forward uses; divided by N.
    per_rank_counts: tuple[str, ...] = ()
    # Weights stored (in, out) (GPT2's Conv1D) rather than nn.Linear's (out, in).
    weights_in_out: bool = False


class ModelAdapter:
    """Defaults describe a text model whose keys carry no positions (GPT2); families override what differs."""

    model_type: str = ""
    # Queries attend only to earlier keys: a shard needs the codes of earlier shards only.
    causal: bool = False

    # ------------------------------------------------------------------------------- where things are
    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention modules, in layer order (each calls transformers' attention interface)."""
        raise NotImplementedError

    def hidden_size(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def key_value_width(self, model: nn.Module) -> int:
        """Width of the keys (and of the values), all K/V heads side by side."""
        return self.hidden_size(model)

    def key_value_heads(self, module: nn.Module) -> int:
        """Number of K/V heads of one attention module (fewer than query heads with grouped-query attention)."""
        raise NotImplementedError

    def quantized_width(self, model: nn.Module, config: AstraConfig) -> int:
        """Width of the vector the quantizer sees: the hidden state, or keys and values side by side."""
        return 2 * self.key_value_width(model) if config.quantize == "kv" else self.hidden_size(model)

    def validate(self, model: nn.Module, config: AstraConfig) -> None:
        """Raise ValueError for a model or config this family cannot run."""
        width = self.hidden_size(model) if config.quantize == "hidden" else self.key_value_width(model)
        what = "model width" if config.quantize == "hidden" else "key/value width"
        if width % config.groups:
            divisors = [g for g in range(1, width + 1) if width % g == 0]
            raise ValueError(f"AstraConfig.groups={config.groups} must divide the {what} {width}; allowed: {divisors}")

    # ------------------------------------------------------------------------- simulation-side hooks
    def install(self, model: nn.Module, state: "AstraState") -> list:
        """Extra hooks of this family (e.g. ViT's distributed class tokens); returns their handles."""
        return []

    def remember(self, layer: "LayerState", args: tuple, kwargs: dict) -> None:
        """Called before every attention module's forward: keep what the attention function does not get.

        Hidden mode quantizes the module's input (the pre-attention norm output); the KV cache is kept so
        that a prefill can leave the last device's view in it.
        """
        layer.pending_input = args[0] if args else kwargs.get("hidden_states")
        layer.cache = kwargs.get("cache", kwargs.get("past_key_values"))

    # ------------------------------------------------------------------ what is sent, how it is rebuilt
    def unpositioned_key(self, layer: "LayerState", key: torch.Tensor) -> torch.Tensor:
        """(B, T, width) keys as kv mode quantizes them: before any position is applied.

        ``key`` is what the attention function got, (B, H_kv, T, d); families that rotate keys return
        what they kept before the rotation.
        """
        return merge_heads(key)

    def project_kv(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine K and V projections, (B, H_kv, n, d) each, of (B, n, hidden) states (hidden mode).

        Affine, so that `kernels.projection_tables` can precompute it per codeword; what follows the
        projection goes in `normalize_key` and `position_key`.
        """
        raise NotImplementedError

    def normalize_key(self, module: nn.Module, key: torch.Tensor) -> torch.Tensor:
        """What the family applies to projected keys before positions (Qwen3: k_norm). Hidden mode only."""
        return key

    def position_key(self, module: nn.Module, key: torch.Tensor, positions: Any) -> torch.Tensor:
        """Keys (B, H_kv, n, d) with the positions of their own tokens applied (RoPE: rotated)."""
        return key

    def select_positions(self, positions: Any, index: torch.Tensor) -> Any:
        """The positions of the tokens ``index`` (global token indices) out of a `position_table`."""
        return None if positions is None else tuple(p[:, index] for p in positions)

    def sliding_window(self, module: nn.Module) -> int | None:
        """Keys a query may look back to in this layer (transformers' convention: key > query - window)."""
        return None

    # ------------------------------------------------------------- the tensor-parallel benchmark baseline
    def tensor_parallel_plan(self, model: nn.Module) -> TensorParallelPlan:
        """How tensor parallelism splits this family's blocks (`TensorParallelPlan`)."""
        raise ValueError(f"the {self.model_type or type(self).__name__} adapter declares no tensor-parallel plan")

    # ------------------------------------------------------------------ the runtime: one rank's inputs
    def cls_per_shard(self, config: AstraConfig) -> int:
        """Class tokens every shard holds in addition to its share of the sequence."""
        return 0

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest sequence the model can take (learned position embeddings); None: no hard limit."""
        return None

    def check_sequence_length(self, model: nn.Module, num_tokens: int) -> None:
        """ValueError when ``num_tokens`` positions (prompt plus new tokens) exceed `max_positions`.

        Every rank holds the whole input, so every rank raises the same error before any exchange.
        """
        limit = self.max_positions(model)
        if limit is not None and num_tokens > limit:
            raise ValueError(
                f"the sequence needs {num_tokens} positions but this {self.model_type} model has {limit} "
                f"(config.max_position_embeddings); shorten the input or generate fewer tokens"
            )

    def rank_layout(self, model: nn.Module, state: "AstraState", inputs: Mapping[str, Any]) -> ShardLayout:
        """The layout of the whole sequence, from the whole inputs."""
        tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("DistributedRuntime needs input_ids or inputs_embeds")
        return state.layout(tokens.shape[1])

    def key_padding(self, inputs: Mapping[str, Any], layout: ShardLayout) -> torch.Tensor | None:
        """(B, T) True for real tokens, in layout order; None without a padding mask."""
        mask = inputs.get("attention_mask")
        return mask.bool() if mask is not None else None

    def global_position_ids(self, inputs: Mapping[str, Any], layout: ShardLayout) -> torch.Tensor:
        """Position ids of all T tokens: the given ones, else 0..T-1 (what the unpatched model uses)."""
        position_ids = inputs.get("position_ids")
        if position_ids is not None:
            return position_ids
        tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        return torch.arange(layout.total, device=tokens.device).expand(tokens.shape[0], layout.total)

    def position_table(self, model: nn.Module, inputs: Mapping[str, Any], layout: ShardLayout) -> Any:
        """Whatever `position_key` needs for every token of the sequence; None when keys carry no positions."""
        return None

    def rank_inputs(self, inputs: Mapping[str, Any], view: RankView) -> dict[str, Any]:
        """The model inputs of this rank: its shard of every token input, global position ids."""
        start, end = view.bounds
        out = dict(inputs)
        out["position_ids"] = self.global_position_ids(inputs, view.layout)
        for name in TOKEN_INPUTS:
            if out.get(name) is not None:
                out[name] = out[name][:, start:end]
        return out

    def rank_hooks(self, model: nn.Module, view: RankView) -> list:
        """Hooks that exist during one rank's forward only (e.g. ViT: embed only this rank's pixel rows)."""
        return []
