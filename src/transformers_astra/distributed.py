"""ASTRA over a real ``torch.distributed`` process group: one process per device, codes on the wire.

Every rank holds the whole patched model and the whole input, but runs the model on its own shard of
the tokens only. Per layer, each rank encodes its shard with the layer's codebook, packs the indices to
ceil(n * G * log2(K) / 8) bytes (`packing`), sends them, and attends with its queries to its own keys in
full precision and to the other shards' keys/values decoded from the codes it received.

    import torch.distributed as dist
    import transformers_astra as astra

    dist.init_process_group("gloo")  # or accelerate / torchrun; NCCL on GPU
    runtime = astra.DistributedRuntime(model)  # model: patched (and calibrated) identically on every rank
    out = runtime(input_ids=ids)  # this rank's logits (B, T_r, V); ids are the WHOLE batch on every rank
    ids = runtime.generate(input_ids=ids, max_new_tokens=20)  # GPT2: prefill here, decode on the last rank
    runtime.traffic  # bytes sent/received by this rank in the latest call, by kind

API
- ``DistributedRuntime(model, group=None, overlap=True, timeout=60.0, check_inputs=True, projection_table=True, secret=None)``. ``group``: the
  process group whose size must equal ``num_devices`` (default: the default group). ``overlap``: attend
  to the local keys while the codes are in flight. ``timeout``: seconds any rank waits for any exchange
  before raising (a dead or stalled rank). ``check_inputs``: compare a hash of every call's inputs
  across ranks first (one 48-byte all_gather; ValueError naming the input that differs). Construction
  runs a checksum handshake (AstraConfig, model config, weights, codebooks) and raises ValueError
  naming what differs. Inference only; ``runtime.layout`` is the `ShardLayout` of the latest call and
  ``runtime.traffic`` its bytes; ``close()`` removes the runtime's hooks.
  ``secret`` (else the ``ASTRA_SECRET`` environment variable): every rank must prove it holds the same
  secret before anything else is exchanged (`trust.verify_peers`; `trust.PeerAuthenticationError`).
  ``projection_table``: hidden mode precomputes every codeword's K/V projection (when the pair of tables
  of a layer fits in 64 MiB: G·K·D·2 values, e.g. G=1, K=1024, D=768: 6.3 MB in fp32), so a receiver
  gathers and sums instead of decoding and projecting every received token. Built at construction
  from the current codebooks and weights: build a new runtime after changing either.
- ``runtime(**inputs)``: the model's output for this rank's shard. GPT2: ``logits`` (B, T_r, V) of the
  shard's tokens with global positions; the next-token logits are ``logits[:, -1]`` on the last rank
  (``runtime.is_last``). ViT (distributed class tokens): every rank returns the same pooled CLS, so the
  same classification ``logits``; ``last_hidden_state`` is [pooled CLS, own patches].
- ``runtime.generate(input_ids, attention_mask=None, max_new_tokens=20)``: greedy decoding. The prompt is
  prefilled in parallel; the last rank then decodes alone with its mixed KV cache (its shard exact,
  earlier shards decoded from codes), and broadcasts the new tokens, so every rank returns them.
- ``runtime.traffic``: `Traffic` of the latest call: ``sent``/``received`` bytes by kind ("codes",
  "padding", "pooling", "control"), ``code_bytes_per_layer`` and ``full_precision_bytes`` (what
  full-precision sequence parallelism would have sent from this rank in the same exchanges).
- ``expected_code_bytes(config, layout, rank, batch_size, num_layers, causal)``: the formula the traffic obeys.

Exchanges (one per layer). Bidirectional models (ViT): an all_gather; shards may be uneven, so every
payload is padded to the largest one (gloo has no all_to_all) and the pad is counted as "padding".
Causal models (GPT2): rank r needs only the codes of ranks < r, so each rank sends its exact payload
point-to-point to the later ranks only; the last rank sends no codes. Byte counts are logical: a
payload sent to k peers counts k times, which is also what a ring all_gather puts on each link.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from .attention import attend, merge_heads, replace_cached_keys_values, split_heads
from .config import validate_timeout
from .models.vit import distributed_cls_layout, spread_index
from .packing import pack, packed_size, unpack
from .patch import astra_state, quantizers
from .sharding import ShardLayout
from .state import LayerState
from .trust import verify_peers

TRAFFIC_KINDS = ("codes", "padding", "pooling", "control")
# Inputs whose equality across ranks is checked by name; anything else is checked as one "other inputs".
CHECKED_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "inputs_embeds")
DEFAULT_TIMEOUT_S = 60.0
# Largest pair of K/V codeword-projection tables (one layer) the runtime precomputes in hidden mode.
PROJECTION_TABLE_MAX_BYTES = 64 * 2**20


@torch.no_grad()
def projection_tables(module: nn.Module, adapter, quantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every codeword's contribution to K and to V, (G*K, D) each, and the K/V biases, (D,) each.

    The receiver's K/V projection is affine, so projecting a decoded vector equals summing the projections
    of its G codewords (each placed in its own group's columns) plus the bias once: decode + project
    becomes a gather and a sum over groups. Built once per layer, from the current codebook and weights.
    """
    groups, size, group_width = quantizer.codebook.shape
    width = groups * group_width
    placed = quantizer.codebook.new_zeros(groups, size, width)
    for group in range(groups):  # set-up only: each group's codewords in its own columns, zeros elsewhere
        placed[group, :, group * group_width : (group + 1) * group_width] = quantizer.codebook[group]
    bias_key, bias_value = (merge_heads(t).reshape(width) for t in adapter.project_kv(module, placed[:1, :1] * 0))
    table_key, table_value = (merge_heads(t) for t in adapter.project_kv(module, placed))
    return (table_key - bias_key).reshape(groups * size, width), (table_value - bias_value).reshape(groups * size, width), bias_key, bias_value


def projected_from_codes(tables, codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V, (B, n, D) each, of (B, n, G) codes through `projection_tables`."""
    table_key, table_value, bias_key, bias_value = tables
    index = codes + torch.arange(codes.shape[-1], device=codes.device) * codebook_size
    key = torch.nn.functional.embedding(index, table_key).sum(dim=-2) + bias_key
    value = torch.nn.functional.embedding(index, table_value).sum(dim=-2) + bias_value
    return key, value


@dataclass
class Traffic:
    """Bytes one rank sent and received during one call, by kind (see `TRAFFIC_KINDS`)."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAFFIC_KINDS, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAFFIC_KINDS, 0))
    code_bytes_per_layer: list[int] = field(default_factory=list)
    full_precision_bytes: int = 0

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": dict(self.sent),
            "received": dict(self.received),
            "total_sent": self.total_sent,
            "total_received": self.total_received,
            "code_bytes_per_layer": list(self.code_bytes_per_layer),
            "full_precision_bytes": self.full_precision_bytes,
        }


def code_receivers(num_devices: int, rank: int, causal: bool) -> list[int]:
    """Ranks that need ``rank``'s codes: all others, or (causal) only the later ones."""
    return [peer for peer in range(num_devices) if peer > rank or (peer != rank and not causal)]


def code_sources(num_devices: int, rank: int, causal: bool) -> list[int]:
    """Ranks whose codes ``rank`` needs, in sequence order."""
    return [peer for peer in range(num_devices) if peer < rank or (peer != rank and not causal)]


def payload_bytes(config, layout: ShardLayout, shard: int, batch_size: int) -> int:
    """Packed bytes of one shard's codes for one layer: ceil(B * T_shard * codes per token * bits / 8)."""
    return packed_size(batch_size * layout.sizes[shard] * config.codes_per_token, config.bits_per_code)


def expected_code_bytes(config, layout: ShardLayout, rank: int, batch_size: int, num_layers: int, causal: bool) -> int:
    """Code bytes ``rank`` sends in one forward: per layer, its payload once per receiver."""
    receivers = len(code_receivers(layout.num_devices, rank, causal))
    return num_layers * receivers * payload_bytes(config, layout, rank, batch_size)


class DistributedRuntime:
    """Runs a patched model as one rank of an ASTRA group (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None = None,
        overlap: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        check_inputs: bool = True,
        projection_table: bool = True,
        secret: str | bytes | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedRuntime needs an initialised torch.distributed process group: launch with "
                "`accelerate launch` or `torchrun` and call torch.distributed.init_process_group first"
            )
        self.model, self.state = model, astra_state(model)
        self.config = self.state.config
        self.group = group if group is not None else dist.group.WORLD
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if self.world_size != self.config.num_devices:
            raise ValueError(
                f"The process group has {self.world_size} ranks but AstraConfig.num_devices="
                f"{self.config.num_devices}; launch exactly num_devices processes (--num_processes / --nproc_per_node)"
            )
        self.overlap, self.timeout, self.check_inputs = overlap, validate_timeout(timeout), check_inputs
        self.causal = self.state.adapter.model_type == "gpt2"
        self.num_layers = len(self.state.adapter.attention_modules(model))
        device = next(model.parameters()).device
        self.comm_device = device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        self.traffic = Traffic()
        self.layout: ShardLayout | None = None
        self._key_mask: torch.Tensor | None = None  # (B, T) global padding mask, True = real token
        self._layer_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._keep_cache = False
        verify_peers(self.group, secret, self.timeout)  # trust.py: header + optional shared secret, first of all
        self._hooks = self._install_hooks()
        self._handshake()
        # Hidden mode: layer index -> precomputed codeword projections, where they fit (see projection_tables).
        self._tables = self._projection_tables() if projection_table and self.config.quantize == "hidden" else {}

    # ----------------------------------------------------------------------------------------- API
    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def __call__(self, **inputs: Any):
        return self.forward(**inputs)

    @torch.no_grad()
    def forward(self, **inputs: Any):
        """The model's output for this rank's shard of ``inputs`` (the same whole inputs on every rank)."""
        if self.model.training:
            raise ValueError("DistributedRuntime runs inference only; call model.eval() first")
        if inputs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by DistributedRuntime")
        if self.state.full_precision:
            raise ValueError("DistributedRuntime always sends codes; leave the astra.full_precision context first")
        self.traffic, self._layer_masks = Traffic(), None
        if self.check_inputs:
            self._check_same_inputs(inputs)
        with self._active():
            if self.causal:
                return self._forward_causal(**inputs)
            return self._forward_vit(**inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20) -> torch.Tensor:
        """Greedy generation (GPT2): parallel prefill, then decoding on the last rank; the same ids on every rank.

        Stops early when every sequence has produced ``generation_config.eos_token_id`` (later positions
        get its ``pad_token_id``), like ``model.generate(do_sample=False)``, which the simulation matches.
        """
        if not self.causal:
            raise ValueError("generate needs a causal language model (GPT2)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Position ids as `model.generate` derives them from the padding mask.
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self._keep_cache = self.is_last
        try:
            output = self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        finally:
            self._keep_cache = False
        new_tokens = torch.full((input_ids.shape[0], max_new_tokens), -1, dtype=torch.long, device=input_ids.device)
        if self.is_last:
            new_tokens = self._decode_greedy(output, attention_mask, position_ids, max_new_tokens, new_tokens)
        new_tokens = self._broadcast_from_last(new_tokens)
        generated = new_tokens[:, (new_tokens >= 0).any(dim=0)]
        return torch.cat([input_ids, generated], dim=1)

    def close(self) -> None:
        """Remove the runtime's hooks from the model (the model stays patched)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------ model forwards
    def _forward_causal(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, **kwargs):
        batch, length = input_ids.shape
        self.layout = self.state.layout(length)
        start, end = self.layout.bounds(self.rank)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        self._key_mask = attention_mask.bool() if attention_mask is not None else None
        kwargs["use_cache"] = self._keep_cache
        if self._keep_cache:
            kwargs[_cache_argument(self.model)] = DynamicCache()  # filled with the last rank's view
        local_mask = attention_mask[:, start:end] if attention_mask is not None else None
        return self.model(
            input_ids=input_ids[:, start:end], attention_mask=local_mask, position_ids=position_ids[:, start:end], **kwargs
        )

    def _forward_vit(self, pixel_values: torch.Tensor, attention_mask=None, **kwargs):
        if not self.config.distributed_cls:
            raise ValueError("DistributedRuntime supports ViT with distributed_cls=True (each rank pools its CLS copy)")
        num_patches = self.model.base_model.embeddings.patch_embeddings.num_patches
        self.layout = distributed_cls_layout(self.state, num_patches)
        self._key_mask = None
        if attention_mask is not None:  # [CLS, patches] -> the spread order every rank's layout uses
            self._key_mask = attention_mask[:, spread_index(self.layout, attention_mask.device)].bool()
        return self.model(pixel_values=pixel_values, **kwargs)

    def _install_hooks(self) -> list:
        if self.causal:
            return []
        embeddings = self.model.base_model.embeddings
        projection = embeddings.patch_embeddings.projection
        return [
            projection.register_forward_pre_hook(self._crop_to_own_patch_rows),
            projection.register_forward_hook(self._pad_to_patch_grid),
            # Registered after `patch`'s own hook, so it sees [CLS, shard 0, CLS, shard 1, ...] and keeps this rank's part.
            embeddings.register_forward_hook(self._keep_own_tokens),
        ]

    def _own_patch_rows(self, grid_width: int) -> tuple[int, int]:
        """Rows of the patch grid that hold this rank's patches (its first and last row may be partial)."""
        start, end = self.layout.bounds(self.rank)
        first_patch, last_patch = start - self.rank, end - self.rank - 2  # minus one CLS copy per earlier shard
        return first_patch // grid_width, last_patch // grid_width + 1

    def _crop_to_own_patch_rows(self, module, args):
        """Each rank embeds only the rows of patches it holds: the patch convolution sees just those pixels."""
        if self.state.runtime is not self:
            return None
        pixel_values = args[0]
        patch = module.stride[0]
        first_row, end_row = self._own_patch_rows(pixel_values.shape[-1] // module.stride[1])
        self._patch_grid_rows = (first_row, end_row, pixel_values.shape[-2] // patch)
        return (pixel_values[..., first_row * patch : end_row * patch, :],)

    def _pad_to_patch_grid(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        # Zeros where other ranks' patches would be, so that transformers' embeddings keep their shapes;
        # `_keep_own_tokens` drops those positions right after.
        if self.state.runtime is not self:
            return None
        first_row, end_row, grid_rows = self._patch_grid_rows
        return torch.nn.functional.pad(output, (0, 0, first_row, grid_rows - end_row))

    def _keep_own_tokens(self, module, args, embeddings: torch.Tensor) -> torch.Tensor | None:
        if self.state.runtime is not self:
            return None
        if embeddings.shape[1] != self.layout.total:
            raise ValueError(f"expected {self.layout.total} tokens after the embeddings, got {embeddings.shape[1]}")
        start, end = self.layout.bounds(self.rank)
        return embeddings[:, start:end]

    @contextlib.contextmanager
    def _active(self):
        if self.state.runtime is not None:
            raise RuntimeError("this model is already running under a DistributedRuntime")
        self.state.runtime = self
        try:
            yield
        finally:
            self.state.runtime = None
            for module in self.state.adapter.attention_modules(self.model):
                module._astra_layer.pending_input = module._astra_layer.cache = None

    # --------------------------------------------------------------------------- per-layer attention
    def attention(self, module, layer: LayerState, query, key, value, scaling, want_weights=False):
        """Mixed-precision attention of this rank's queries; called by `astra_attention_forward`."""
        if want_weights:
            raise ValueError("output_attentions is not supported by DistributedRuntime")
        config = self.config
        if config.quantize == "kv":
            sent = torch.cat([merge_heads(key), merge_heads(value)], dim=-1)
        else:
            sent, layer.pending_input = layer.pending_input, None
        exchange = self._start_code_exchange(module.astra_quantizer, sent)
        if self._layer_masks is None:  # the same for every layer of one forward
            self._layer_masks = self._masks(query.device)
        local_allowed, remote_allowed = self._layer_masks
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.overlap:  # the exact part runs while the codes travel
            local = partial_attention(query, key, value, local_allowed, scale)
            remote_key, remote_value = self._remote_keys_values(module, exchange.wait(), key.shape[1])
            remote = partial_attention(query, remote_key, remote_value, remote_allowed, scale)
            output = merge_partials(local, remote).transpose(1, 2).contiguous()
        else:
            remote_key, remote_value = self._remote_keys_values(module, exchange.wait(), key.shape[1])
            allowed = torch.cat([local_allowed, remote_allowed], dim=-1)
            keys, values = torch.cat([key, remote_key], dim=2), torch.cat([value, remote_value], dim=2)
            output, _ = attend(query, keys, values, allowed, scaling, 0.0, False)
        self._store_last_rank_cache(layer, key, value, remote_key, remote_value)
        return output, None

    def _masks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B or 1, 1, T_r, keys) masks for the own shard's keys and for the received keys (sequence order)."""
        start, end = self.layout.bounds(self.rank)
        queries = torch.arange(start, end, device=device)
        sources = code_sources(self.world_size, self.rank, self.causal)
        remote = [torch.arange(*self.layout.bounds(peer), device=device) for peer in sources]
        remote = torch.cat(remote) if remote else queries[:0]
        return self._mask_for(queries, queries), self._mask_for(queries, remote)

    def _mask_for(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        allowed = torch.ones(1, 1, queries.numel(), keys.numel(), dtype=torch.bool, device=queries.device)
        if self.causal:
            allowed = allowed & (keys[None, :] <= queries[:, None])
        if self._key_mask is not None:
            allowed = allowed & self._key_mask[:, None, None, keys.to(self._key_mask.device)].to(queries.device)
        return allowed

    def _projection_tables(self) -> dict[int, tuple[torch.Tensor, ...]]:
        table_bytes = 2 * self.config.codes_per_token * self.config.codebook_size * self.state.adapter.hidden_size(self.model)
        table_bytes *= next(self.model.parameters()).element_size()
        if table_bytes > PROJECTION_TABLE_MAX_BYTES:
            return {}
        return {
            layer_idx: projection_tables(module, self.state.adapter, module.astra_quantizer)
            for layer_idx, module in enumerate(self.state.adapter.attention_modules(self.model))
        }

    def _remote_keys_values(self, module, received: list[torch.Tensor], heads: int):
        """K and V of the other shards, rebuilt from their codes as the simulation does."""
        quantizer = module.astra_quantizer
        if not received:
            width = self.state.adapter.hidden_size(self.model)
            empty = torch.zeros(self._batch, heads, 0, width // heads, device=quantizer.codebook.device, dtype=quantizer.codebook.dtype)
            return empty, empty
        codes = torch.cat(received, dim=1)
        tables = self._tables.get(module._astra_layer.layer_idx)
        if tables is not None:
            key, value = projected_from_codes(tables, codes, quantizer.codebook_size)
            return split_heads(key, heads), split_heads(value, heads)
        decoded = quantizer.decode(codes)
        if self.config.quantize == "kv":
            remote_key, remote_value = decoded.chunk(2, dim=-1)
            return split_heads(remote_key, heads), split_heads(remote_value, heads)
        return self.state.adapter.project_kv(module, decoded)

    def _store_last_rank_cache(self, layer: LayerState, key, value, remote_key, remote_value) -> None:
        """Leave the last rank's view in its KV cache: earlier shards decoded, its own shard exact."""
        cache, layer.cache = layer.cache, None
        if not self._keep_cache or cache is None:
            return
        replace_cached_keys_values(
            cache, layer.layer_idx, torch.cat([remote_key, key], dim=2), torch.cat([remote_value, value], dim=2)
        )

    # ------------------------------------------------------------------------------- code exchange
    def _start_code_exchange(self, quantizer, sent: torch.Tensor) -> "_CodeExchange":
        """Encode and send this shard's codes (if any rank needs them) and post the receives."""
        self._batch = sent.shape[0]
        sizes = [payload_bytes(self.config, self.layout, shard, self._batch) for shard in range(self.world_size)]
        receivers = code_receivers(self.world_size, self.rank, self.causal)
        sources = code_sources(self.world_size, self.rank, self.causal)
        payload = torch.empty(0, dtype=torch.uint8, device=self.comm_device)
        if receivers:  # causal: nobody needs the last shard's codes, so the last rank never encodes
            payload = pack(quantizer.encode(sent), self.config.bits_per_code).to(self.comm_device)
            if payload.numel() != sizes[self.rank]:  # the receivers size their buffers by the formula
                raise RuntimeError(f"packed {payload.numel()} code bytes, the layout promises {sizes[self.rank]}")
        if self.causal:
            exchange = _PointToPointExchange(self, payload, sizes, receivers, sources)
        else:
            exchange = _AllGatherExchange(self, payload, sizes, sources)
        self.traffic.code_bytes_per_layer.append(len(receivers) * payload.numel())
        width = self.state.adapter.quantized_width(self.model, self.config)
        element = next(self.model.parameters()).element_size()
        self.traffic.full_precision_bytes += len(receivers) * self._batch * self.layout.sizes[self.rank] * width * element
        return exchange

    def _unpack(self, payload: torch.Tensor, shard: int) -> torch.Tensor:
        shape = (self._batch, self.layout.sizes[shard], self.config.codes_per_token)
        codes = unpack(payload, self.config.bits_per_code, math.prod(shape))
        return codes.reshape(shape).to(next(self.model.parameters()).device)

    def _count(self, kind: str, sent: int, received: int) -> None:
        self.traffic.sent[kind] += sent
        self.traffic.received[kind] += received

    def wait(self, work, what: str) -> None:
        """Wait for an async collective, turning a timeout or a lost peer into an error that says so."""
        started = time.monotonic()
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as error:  # DistBackendError is a RuntimeError
            raise RuntimeError(
                f"ASTRA rank {self.rank}/{self.world_size}: {what} failed after {time.monotonic() - started:.1f}s "
                f"(timeout {self.timeout:g}s): a rank died, stalled or gave up. Cause: {error}"
            ) from error

    # ----------------------------------------------------------------------------- pooling (ViT)
    def pool_class_tokens(self, output: torch.Tensor) -> torch.Tensor:
        """Mean of every rank's CLS output (one small all_gather), followed by this rank's patch outputs."""
        own = output[:, 0].contiguous()
        gathered = [torch.empty_like(own, device=self.comm_device) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, own.to(self.comm_device), group=self.group, async_op=True)
        self.wait(work, "pooling the class tokens")
        size = own.numel() * own.element_size()
        self._count("pooling", (self.world_size - 1) * size, (self.world_size - 1) * size)
        pooled = torch.stack([g.to(output.device) for g in gathered], dim=1).mean(dim=1, keepdim=True)
        return torch.cat([pooled, output[:, 1:]], dim=1)

    # --------------------------------------------------------------------------------- generation
    def _decode_greedy(self, output, attention_mask, position_ids, max_new_tokens, new_tokens):
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=new_tokens.device)
        pad = getattr(generation_config, "pad_token_id", None)
        pad = pad if pad is not None else (int(eos[0]) if eos.numel() else 0)
        cache = _output_cache(output)
        logits, unfinished = output.logits[:, -1], torch.ones(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
        for step in range(max_new_tokens):
            token = torch.where(unfinished, logits.argmax(dim=-1), torch.full_like(unfinished, pad, dtype=torch.long))
            new_tokens[:, step] = token
            unfinished &= ~torch.isin(token, eos)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(
                input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{_cache_argument(self.model): cache},
            )
            logits, cache = out.logits[:, -1], _output_cache(out)
        return new_tokens

    def _broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        buffer = tensor.to(self.comm_device).contiguous()
        work = dist.broadcast(buffer, src=dist.get_global_rank(self.group, self.world_size - 1), group=self.group, async_op=True)
        self.wait(work, "receiving the generated tokens from the last rank")
        size = buffer.numel() * buffer.element_size()
        self._count("control", (self.world_size - 1) * size if self.is_last else 0, 0 if self.is_last else size)
        return buffer.to(tensor.device)

    # ------------------------------------------------------------------------- consistency checks
    def _handshake(self) -> None:
        """All ranks must run the same AstraConfig, model config, weights and codebooks: compare digests."""
        fields = {
            "AstraConfig": _digest(self.config.to_json_string().encode()),
            "model config": _digest(_model_config_json(self.model).encode()),
            "model weights": _digest_tensors(
                (name, tensor) for name, tensor in self.model.state_dict().items() if "astra_quantizer" not in name
            ),
            "codebooks": _digest_tensors(
                (str(i), quantizer.codebook) for i, quantizer in enumerate(quantizers(self.model))
            ),
        }
        self._compare_across_ranks(fields, "the start-up handshake", ValueError)

    def _check_same_inputs(self, inputs: dict[str, Any]) -> None:
        fields = {name: _digest_value(inputs.get(name)) for name in CHECKED_INPUTS}
        others = {name: value for name, value in inputs.items() if name not in CHECKED_INPUTS}
        fields["other inputs"] = _digest(repr(sorted(others)).encode()) ^ _digest_value(list(others.values()))
        self._compare_across_ranks(fields, "checking that every rank got the same inputs", ValueError, "inputs ")

    def _compare_across_ranks(self, fields: dict[str, int], what: str, error: type, prefix: str = "") -> None:
        mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=self.comm_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), what)
        size = mine.numel() * mine.element_size()
        self._count("control", (self.world_size - 1) * size, (self.world_size - 1) * size)
        table = torch.stack(gathered).cpu()
        mismatches = []
        for column, name in enumerate(fields):
            differing = [rank for rank in range(self.world_size) if table[rank, column] != table[0, column]]
            if differing:
                mismatches.append(f"{prefix}{name!r} (ranks {differing} differ from rank 0)")
        if mismatches:
            raise error(
                f"ASTRA ranks disagree on {', '.join(mismatches)}, found during {what}; every rank must load "
                "the same patched model and get the same inputs"
            )


class _CodeExchange:
    def wait(self) -> list[torch.Tensor]:
        """Codes of every source shard, (B, T_shard, codes per token) each, in sequence order."""
        raise NotImplementedError


class _AllGatherExchange(_CodeExchange):
    """Every rank needs every other rank's codes: one all_gather of payloads padded to the largest."""

    def __init__(self, runtime: DistributedRuntime, payload, sizes, sources):
        self.runtime, self.sizes, self.sources = runtime, sizes, sources
        largest = max(sizes)
        padded = torch.zeros(largest, dtype=torch.uint8, device=payload.device)
        padded[: payload.numel()] = payload
        self.buffers = [torch.empty_like(padded) for _ in sizes]
        self.work = dist.all_gather(self.buffers, padded, group=runtime.group, async_op=True)
        own, peers = sizes[runtime.rank], len(sources)
        runtime._count("codes", peers * own, sum(sizes[s] for s in sources))
        runtime._count("padding", peers * (largest - own), sum(largest - sizes[s] for s in sources))

    def wait(self) -> list[torch.Tensor]:
        self.runtime.wait(self.work, "the code all_gather")
        return [self.runtime._unpack(self.buffers[s][: self.sizes[s]], s) for s in self.sources]


class _PointToPointExchange(_CodeExchange):
    """Causal: a rank's codes go to the later ranks only, each payload at its exact size."""

    def __init__(self, runtime: DistributedRuntime, payload, sizes, receivers, sources):
        self.runtime, self.sources = runtime, sources
        group, global_rank = runtime.group, (lambda r: dist.get_global_rank(runtime.group, r))
        self.buffers = {s: torch.empty(sizes[s], dtype=torch.uint8, device=payload.device) for s in sources}
        ops = [dist.P2POp(dist.isend, payload, global_rank(r), group) for r in receivers]
        ops += [dist.P2POp(dist.irecv, self.buffers[s], global_rank(s), group) for s in sources]
        self.works = dist.batch_isend_irecv(ops) if ops else []
        runtime._count("codes", len(receivers) * sizes[runtime.rank], sum(sizes[s] for s in sources))

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            self.runtime.wait(work, f"the code exchange with ranks {self.sources}")
        return [self.runtime._unpack(self.buffers[s], s) for s in self.sources]


# The CPU flash kernel behind SDPA, which also returns the log-sum-exp (torch's own op, private name).
_FUSED_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def partial_attention(query, key, value, allowed, scale):
    """Attention over a subset of the keys: (output, log-sum-exp), mergeable with `merge_partials`.

    A query with no allowed key in this subset gets output 0 and log-sum-exp -inf. On CPU this is one
    fused kernel (SDPA's flash kernel, which returns the log-sum-exp too); elsewhere explicit scores.
    """
    no_key = ~allowed.any(dim=-1, keepdim=True)
    if key.shape[2] == 0:
        lse = torch.full((*query.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=query.device)
        return query.new_zeros(*query.shape[:-1], value.shape[-1]), lse
    if query.device.type == "cpu" and _FUSED_CPU_ATTENTION is not None:
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        output, lse = _FUSED_CPU_ATTENTION(query, key, value, 0.0, False, attn_mask=bias, scale=scale)
        return output, lse.unsqueeze(-1).masked_fill(no_key, float("-inf"))
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    finite_lse = lse.masked_fill(torch.isinf(lse), 0.0)
    return torch.matmul(torch.exp(scores - finite_lse), value), lse


def merge_partials(first, second):
    """Softmax over the union of two disjoint key sets from their partial outputs; rows with no key give 0."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)
    merged = out_a * torch.exp(lse_a - lse) + out_b * torch.exp(lse_b - lse)
    return merged.to(out_a.dtype)


def _cache_argument(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    """The KV cache of a model output: ``cache`` in recent transformers, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _model_config_json(model: nn.Module) -> str:
    values = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    return json.dumps(values, sort_keys=True, default=str)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _digest_tensors(named_tensors) -> int:
    hasher = hashlib.blake2b(digest_size=8)
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(hasher.digest(), "little", signed=True)


def _digest_value(value: Any) -> int:
    if value is None:
        return 0
    if torch.is_tensor(value):
        return _digest_tensors([("", value)])
    if isinstance(value, (list, tuple)):
        return _digest_tensors([(repr(type(v)), v) for v in value if torch.is_tensor(v)]) ^ _digest(
            repr([v for v in value if not torch.is_tensor(v)]).encode()
        )
    return _digest(repr(value).encode())
