"""ASTRA mixed-precision attention, registered in transformers' attention and mask interfaces.

The attention function hands every layer to the model's `Exchange` (`exchange.py`): by default the
single-process simulation of N devices below (every key/value exists twice, exactly (what the key's own
device holds) and decoded from its codes (what every other device receives); a query attends to the
exact copy of the keys in its own shard and to the decoded copy of all others, in one SDPA call over
the 2T keys with a boolean mask, no loop over shards or tokens); inside `DistributedRuntime`, a real
rank's exchange.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # transformers >= 5.9 records `output_attentions` through hooks and this context variable
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older layouts pass output_attentions as a kwarg
    _active_collector = None

from .exchange import rebuild_keys_values, sent_vectors
from .sharding import ShardLayout
from .state import AstraState, LayerState

ATTENTION_NAME = "astra"


def astra_mask(*args, **kwargs):
    """transformers' SDPA boolean mask, never skipped: ASTRA always needs the explicit (B, 1, Tq, Tk) mask."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make ``attn_implementation="astra"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, astra_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, astra_mask)


def astra_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function transformers calls with (B, H, T, d) query and (B, H_kv, T, d) key/value."""
    layer: LayerState | None = getattr(module, "_astra_layer", None)
    want_weights = attention_weights_requested(kwargs)
    allowed = boolean_mask(attention_mask, query.shape[2], key.shape[2], getattr(module, "is_causal", False), query.device)
    decoding_with_cache = query.shape[2] != key.shape[2]
    if layer is None or decoding_with_cache or layer.model_state.config.num_devices == 1:
        # New tokens after the prefill belong to the last device, whose cache already holds its view.
        if layer is not None:
            layer.forget()
        return attend(query, key, value, allowed, scaling, dropout, want_weights)
    # The simulation, or a real rank's exchange installed by `DistributedRuntime` for one forward.
    return layer.model_state.exchange.attention(module, layer, query, key, value, allowed, scaling, dropout, want_weights)


class SimulatedExchange:
    """All N shards in one process (the `Exchange` of a patched model outside `DistributedRuntime`).

    Every key exists twice: exact (what its own shard holds) and rebuilt from its decoded codes (what
    every other shard holds). A query attends to the exact keys of its own shard and the rebuilt keys of
    all others, in one SDPA call over the 2T keys with a boolean mask.
    """

    def __init__(self, state: AstraState):
        self.state = state

    def attention(self, module, layer, query, key, value, allowed, scaling, dropout, want_weights):
        state = self.state
        layout = state.layout(query.shape[2])
        remote_key, remote_value = self.remote_keys_values(module, layer, key, value)
        local = same_shard(layout, query.device)
        mixed = torch.cat([allowed & local, allowed & ~local], dim=-1)
        keys, values = torch.cat([key, remote_key], dim=2), torch.cat([value, remote_value], dim=2)
        output, weights = attend(query, keys, values, mixed, scaling, dropout, want_weights)
        if weights is not None:
            # Each key is seen either exactly or decoded, never both: fold the two halves back to T keys.
            weights = weights[..., : key.shape[2]] + weights[..., key.shape[2] :]
        store_last_device_view(layer, layout, key, value, remote_key, remote_value)
        return output, weights

    def layer_input(self, module, layer: LayerState) -> None:
        """Nothing to start early: the simulation quantizes in the attention function, all shards at once."""

    def remote_keys_values(self, module, layer: LayerState, key, value) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of every token as the other devices rebuild them from its codes."""
        state, config = self.state, self.state.config
        sent = sent_vectors(state.adapter, layer, key, value, config.quantize)
        positions, layer.positions = layer.positions, None
        if state.collector is not None:
            state.collector(layer.layer_idx, sent)
        if state.full_precision:
            return key, value
        decoded, codes, commitment = module.astra_quantizer(sent, config.noise_scale, config.noise_granularity)
        if state.code_log is not None:
            state.code_log[layer.layer_idx] = codes
        if module.training:
            state.aux_losses.append(config.commitment_weight * commitment)
        # The simulation holds every token: each key is rebuilt with its own (the sender's) global position.
        return rebuild_keys_values(state.adapter, module, config.quantize, positions, decoded=decoded)

    def shard_starts(self, num_tokens: int) -> list[int]:
        return list(self.state.layout(num_tokens).offsets[:-1])

    def mean_across_shards(self, copies: torch.Tensor) -> torch.Tensor:
        return copies.mean(dim=1, keepdim=True)

    def with_first_token(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # every shard is here, the first token first


def attention_weights_requested(kwargs) -> bool:
    """True when the caller asked for attention weights (SDPA cannot return them, so we compute them)."""
    if kwargs.get("output_attentions"):
        return True
    collected = _active_collector.get() if _active_collector is not None else None
    return bool(collected) and "attentions" in collected


def boolean_mask(attention_mask, q_len: int, k_len: int, is_causal: bool, device) -> torch.Tensor:
    """(B or 1, 1, Tq, Tk) boolean mask, True where a query may attend a key."""
    if attention_mask is None:
        if is_causal and q_len > 1:
            return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0  # additive float mask: 0 where allowed


@functools.lru_cache(maxsize=64)
def same_shard(layout: ShardLayout, device: torch.device) -> torch.Tensor:
    """(T, T) boolean: query and key on the same device. Cached: the layout repeats in every layer.

    Built outside inference mode even when first asked for inside it: an inference tensor in the cache
    would break every later forward that autograd records.
    """
    with torch.inference_mode(False):
        ids = layout.shard_ids(device)
        return ids[:, None] == ids[None, :]


def attend(query, keys, values, allowed, scaling, dropout, want_weights):
    """Masked attention; a query with no allowed key outputs zeros (a defined value on every runtime).

    ``keys``/``values`` may have fewer heads than ``query`` (grouped-query attention).
    """
    keys, values = repeat_key_value_heads(keys, query.shape[1]), repeat_key_value_heads(values, query.shape[1])
    no_key = ~allowed.any(dim=-1, keepdim=True)
    has_empty_rows = bool(no_key.any())
    if has_empty_rows:
        allowed = allowed | no_key
    weights = None
    if want_weights:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if has_empty_rows:
            weights = weights.masked_fill(no_key, 0.0)
        output = torch.matmul(F.dropout(weights, p=dropout, training=dropout > 0), values)
    else:
        output = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=allowed, dropout_p=dropout, scale=scaling
        )
    if has_empty_rows:
        output = output.masked_fill(no_key, 0.0)
    return output.transpose(1, 2).contiguous(), weights


def repeat_key_value_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, heads, T, d): each K/V head serves heads / H_kv query heads (GQA)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def store_last_device_view(layer: LayerState, layout: ShardLayout, key, value, remote_key, remote_value) -> None:
    """After a prefill, leave in the KV cache what the last device holds: its own shard exact, earlier shards decoded.

    Generation then continues on the last device (distributed runtime) with no further traffic, and the
    simulation decodes with exactly the same cache.
    """
    cache, layer.cache = layer.cache, None
    if cache is None or layer.model_state.full_precision:
        return
    start = layout.offsets[-2]
    replace_cached_keys_values(
        cache,
        layer.layer_idx,
        torch.cat([remote_key[:, :, :start], key[:, :, start:]], dim=2),
        torch.cat([remote_value[:, :, :start], value[:, :, start:]], dim=2),
    )


def replace_cached_keys_values(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put the (B, H, T, d) keys/values of all T prompt tokens in place of what a KV cache holds for one layer.

    A sliding-window layer (transformers' DynamicSlidingWindowLayer) keeps the last window - 1 tokens and
    counts all T, as its own ``update`` does after a prefill of T tokens.
    """
    cache_layer = getattr(cache, "self_attention_cache", cache).layers[layer_idx]
    window = getattr(cache_layer, "sliding_window", None)
    if window is not None:
        cache_layer.cumulative_length = keys.shape[2]
        keys, values = keys[:, :, -window + 1 :], values[:, :, -window + 1 :]
    cache_layer.keys, cache_layer.values = keys, values
