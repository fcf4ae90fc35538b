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
    ids = runtime.generate(ids, max_new_tokens=20, do_sample=True)  # causal LMs: prefill here, HF generate on the last rank
    runtime.traffic  # bytes sent/received by this rank in the latest call, by kind
    runtime.timings  # seconds of the latest forward: its wall time, and how long this rank waited for peers

API
- ``DistributedRuntime(model, group=None, overlap=True, timeout=60.0, check_inputs=True, projection_table=True, secret=None)``. ``group``: the
  process group whose size must equal ``num_devices`` (default: the default group). ``overlap``: attend
  to the local keys while the codes are in flight; in hidden mode the codes also leave earlier, from the
  attention module's forward pre-hook (`Exchange.layer_input`), before this rank's own Q/K/V projections,
  so the ranks that wait for them at that layer wait that much less (the same codes: hidden mode sends
  the attention's input; kv mode sends K/V and starts in the attention function). Causal models on
  gloo with overlap also post every receive of the forward when it starts (one tag per layer: gloo
  sends a message only once its receive is posted), wait at a layer for that layer's receives only, and
  wait for their own sends once, at the end, so a sender is not held to its receivers' pace
  (`transport.PostedAhead`; NCCL keeps the layer-by-layer exchange). ``overlap=False``:
  encode, send, wait, then one attention over all keys (the sequential path, to compare against). A
  forward that raises first waits for the codes it started and never waited for, so none is left to
  meet the next call's (a failure to deliver them is a note on the raised error); posted ahead, it
  first sends a flagged filler for every layer it did not reach, and a receiver that gets one raises
  `PeerFailureError` naming the rank that gave up. ``timeout``: seconds of silence from a peer before an
  exchange fails (`liveness.PeerFailureError`): a peer that is alive and busy (its heartbeat advances)
  is waited for, up to the process group's own operation timeout; a dead or frozen one ends every
  wait within ``timeout``. Every call starts with one fixed-size all_gather of the batch size, the
  sequence layout and (``check_inputs``) digests of the inputs: ValueError on every rank naming what
  differs; every later exchange has sizes derived from that agreed layout. Construction
  runs a checksum handshake (AstraConfig, model config, weights, codebooks) and raises ValueError
  naming what differs. Inference only; ``runtime.layout`` is the `ShardLayout` of the latest call and
  ``runtime.traffic`` its bytes. The runtime's hooks live for one call only (``close()`` has nothing
  left to remove and is kept for compatibility).
  ``secret`` (else the ``ASTRA_SECRET`` environment variable): every rank must prove it holds the same
  secret before anything else is exchanged (`trust.verify_peers`; `trust.PeerAuthenticationError`).
  ``projection_table``: hidden mode precomputes every codeword's K/V projection (when the pair of tables
  of a layer fits in 64 MiB: G·K·D·2 values, e.g. G=1, K=1024, D=768: 6.3 MB in fp32; G=32, K=256: 50 MB;
  G=32, K=1024: 201 MB, i.e. 2.4 GB for GPT2-small's 12 layers, left out unless ``projection_table`` is
  a larger number of bytes per layer; False: never), so a receiver
  gathers and sums instead of decoding and projecting every received token. Built at construction
  from the current codebooks and weights: build a new runtime after changing either.
- ``DistributedRuntime(model, transport=LoopbackTransport(rank, N, config))``: rank ``rank`` of N with no
  process group and no network (`transport.LoopbackTransport`): the same forward, every exchange
  returning at once with stand-in codes, no handshake, secret or heartbeat (there are no peers). For
  timing one rank's own work (`planner.loopback_rank_forward`); its outputs are not a real rank's.
- ``runtime(**inputs)``: the model's output for this rank's shard. Causal LMs (GPT2, Llama family): ``logits`` (B, T_r, V) of the
  shard's tokens with global positions; the next-token logits are ``logits[:, -1]`` on the last rank
  (``runtime.is_last``). ViT (distributed class tokens): every rank returns the same pooled CLS, so the
  same classification ``logits``; ``last_hidden_state`` is [pooled CLS, own patches]. ViT with one class token
  (``distributed_cls=False``): rank 0's final CLS is shared, so the same holds with [CLS, own patches].
- ``runtime.generate(input_ids, attention_mask=None, **generate_kwargs)``: transformers' ``generate``
  (any ``model.generate`` argument). The prompt is prefilled in parallel; the last rank then runs
  ``model.generate`` from its mixed KV cache (its shard exact, earlier shards decoded from codes) and
  broadcasts the new tokens, so every rank returns them (`generation`); ``runtime.generation_stats``.
- ``runtime.traffic``: `Traffic` of the latest call: ``sent``/``received`` bytes by kind ("codes",
  "padding", "pooling", "control"), ``code_bytes_per_layer`` and ``full_precision_bytes`` (what
  full-precision sequence parallelism would have sent from this rank in the same exchanges).
- ``runtime.timings``: `Timings` of the latest forward (generate's: its prefill): ``total_s`` (wall time),
  ``waited`` (seconds blocked waiting for peers, by kind: "codes", "sends", "pooling", "control"),
  ``codes_per_layer`` and ``compute_s`` = ``total_s`` - ``waited_s``: link-bound or compute-bound.
- ``expected_code_bytes(config, layout, rank, batch_size, num_layers, causal)``: the formula the traffic obeys.

What is family-specific (how inputs, padding and positions are sharded, how K/V are rebuilt, how
outputs are pooled) comes from the model's adapter (`models/base.py`); this module is the runtime,
`transport.py` the codes on the wire and their bytes, `kernels.py` the receiver's kernels,
`handshake.py` the consistency checks, `exchange.py` the path from what is sent to K/V that the
single-process simulation shares.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from .attention import attend, replace_cached_keys_values
from .config import validate_timeout
from .exchange import rebuild_keys_values, sent_vectors, split_heads
from . import generation, liveness
from .handshake import CHECKED_INPUTS, batch_size, check_same_call, check_same_model
from .liveness import PeerFailureError
from .kernels import (
    PROJECTION_TABLE_MAX_BYTES,
    FusedTables,
    KeyMask,
    fused_tables,
    merge_partials,
    partial_attention,
    projected_from_codes,
    projected_from_fused,
    projection_tables,
    table_limit,
)
from .models.base import RankView
from .patch import astra_state, quantizers
from .sharding import ShardLayout
from .state import LayerState
from .trust import verify_peers
from .transport import (
    TRAFFIC_KINDS,
    WAIT_KINDS,
    CodeTransport,
    LoopbackTransport,
    PostedAhead,
    Timings,
    Traffic,
    code_receivers,
    code_sources,
    expected_code_bytes,
    payload_bytes,
)

__all__ = [
    "CHECKED_INPUTS",
    "DEFAULT_TIMEOUT_S",
    "PROJECTION_TABLE_MAX_BYTES",
    "TRAFFIC_KINDS",
    "WAIT_KINDS",
    "DistributedRuntime",
    "LoopbackTransport",
    "PeerFailureError",
    "RankExchange",
    "Timings",
    "Traffic",
    "code_receivers",
    "code_sources",
    "expected_code_bytes",
    "merge_partials",
    "partial_attention",
    "payload_bytes",
    "projected_from_codes",
    "projection_tables",
]

DEFAULT_TIMEOUT_S = 60.0


class DistributedRuntime:
    """Runs a patched model as one rank of an ASTRA group (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None = None,
        overlap: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        check_inputs: bool = True,
        projection_table: bool | int = True,
        secret: str | bytes | None = None,
        transport: LoopbackTransport | None = None,
    ):
        if transport is None and (not dist.is_available() or not dist.is_initialized()):
            raise RuntimeError(
                "DistributedRuntime needs an initialised torch.distributed process group: launch with "
                "`accelerate launch` or `torchrun` and call torch.distributed.init_process_group first"
            )
        if transport is not None:  # no peers: nothing to authenticate, no handshake, no heartbeat
            if not isinstance(transport, LoopbackTransport) or group is not None or secret is not None:
                raise ValueError("transport must be a LoopbackTransport (a rank with no peers), given without group or secret; "
                                 "a process group's runtime builds its own transport")  # fmt: skip
        self.model, self.state = model, astra_state(model)
        self.config, self.adapter = self.state.config, self.state.adapter
        self.group = group if group is not None or transport is not None else dist.group.WORLD
        if transport is not None:
            self.world_size, self.rank = transport.world_size, transport.rank
        else:
            self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if self.world_size != self.config.num_devices:
            raise ValueError(
                f"The process group has {self.world_size} ranks but AstraConfig.num_devices="
                f"{self.config.num_devices}; launch exactly num_devices processes (--num_processes / --nproc_per_node)"
            )
        self.overlap, self.timeout, self.check_inputs = overlap, validate_timeout(timeout), check_inputs
        self.table_limit = table_limit(projection_table)  # bytes per layer; ValueError on a bad value
        self.causal = self.adapter.causal
        self.num_layers = len(self.adapter.attention_modules(model))
        device = next(model.parameters()).device
        self.element_size = next(model.parameters()).element_size()  # of the full-precision bytes counted
        self.layout: ShardLayout | None = None
        self._keep_cache = False  # generate's prefill: the last rank keeps its KV cache (all tokens but the last)
        self.generation_stats: generation.GenerationStats | None = None  # of the latest generate call
        if transport is not None:
            self.comm_device, self.transport = transport.comm_device, transport
        else:
            self.comm_device = device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
            liveness.start_heartbeat(self.timeout)  # peers waiting on this rank see it alive while it works
            verify_peers(self.group, secret, self.timeout)  # trust.py: header + optional shared secret, first of all
            self.transport = CodeTransport(self.group, self.config, self.timeout, self.comm_device, device)
            check_same_model(self.transport, model, self.config, quantizers(model))
        self.transport.timings = Timings()  # of forwards only, not of the handshake
        # Hidden mode: layer index -> precomputed codeword projections, where they fit (see projection_tables).
        self._tables = self._projection_tables() if self.config.quantize == "hidden" else {}

    # ----------------------------------------------------------------------------------------- API
    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def traffic(self) -> Traffic:
        """Bytes of the latest call (see `transport.Traffic`)."""
        return self.transport.traffic

    @property
    def timings(self) -> Timings:
        """Seconds of the latest forward: wall time and waits for peers (see `transport.Timings`)."""
        return self.transport.timings

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
        started = time.perf_counter()
        self.transport.traffic, self.transport.timings = Traffic(), Timings.of_layers(self.num_layers)
        try:
            return self._forward(inputs)
        finally:
            self.transport.timings.total_s = time.perf_counter() - started

    def _forward(self, inputs: dict[str, Any]):
        layout = self.adapter.rank_layout(self.model, self.state, inputs)
        # The first exchange, fixed-size, always: every rank agrees on the sizes of all later exchanges.
        check_same_call(self.transport, inputs, layout, self.check_inputs)
        self.adapter.check_sequence_length(self.model, layout.total)  # the same error on every rank
        # The whole sequence's padding and positions, computed before any rank hook is in place.
        view = RankView(
            layout, self.rank, self.adapter.key_padding(inputs, layout), self.adapter.position_table(self.model, inputs, layout)
        )
        self.layout = layout
        model_inputs = self.adapter.rank_inputs(inputs, view)
        if self.causal:
            model_inputs["use_cache"] = self._keep_cache
            if self._keep_cache:  # filled with the last rank's view
                model_inputs[generation.cache_argument(self.model)] = DynamicCache(config=self.model.config)
        with self._active(RankExchange(self, view, batch_size(inputs)), self.adapter.rank_hooks(self.model, view)):
            return self.model(**model_inputs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs: Any):
        """transformers' ``generate`` (causal LMs) after a parallel prefill: the same ids on every rank (see `generation`).

        ``generate_kwargs`` are what ``model.generate`` takes; they are used on the last rank only.
        """
        if self.group is None:
            raise ValueError("generate needs a process group: a LoopbackTransport rank times forwards only")
        return generation.generate(self, input_ids, attention_mask, **generate_kwargs)

    def close(self) -> None:
        """Nothing to undo since the runtime's hooks live for one forward only (kept for the API)."""

    def wait(self, work, what: str) -> None:
        """Wait for an async collective, turning a timeout or a lost peer into an error that says so."""
        self.transport.wait(work, what)

    def _count(self, kind: str, sent: int, received: int) -> None:
        self.transport.count(kind, sent, received)

    @contextlib.contextmanager
    def _active(self, exchange: "RankExchange", hooks: list):
        if isinstance(self.state.exchange, RankExchange):
            for handle in hooks:
                handle.remove()
            raise RuntimeError("this model is already running under a DistributedRuntime")
        previous, self.state.exchange = self.state.exchange, exchange
        layers = [module._astra_layer for module in self.adapter.attention_modules(self.model)]
        try:
            exchange.begin()  # causal, gloo, overlap: every receive of the forward, posted now
            yield
        except Exception as error:
            exchange.settle(layers, error)  # no send or receive of this call is left for the next one to meet
            raise
        else:
            exchange.finish()  # the sends not waited for at their layers
        finally:
            self.state.exchange = previous
            for handle in hooks:
                handle.remove()
            for layer in layers:
                layer.forget()

    def _projection_tables(self) -> dict[int, FusedTables]:
        table_bytes = self.config.projection_table_bytes(self.adapter.key_value_width(self.model), self.element_size)
        if not self.table_limit or table_bytes > self.table_limit:
            return {}
        return {  # one gather for K and V per received token (`kernels.fused_tables`)
            layer_idx: fused_tables(projection_tables(module, self.adapter, module.astra_quantizer), module.astra_quantizer.groups)
            for layer_idx, module in enumerate(self.adapter.attention_modules(self.model))
        }


class RankExchange:
    """The `exchange.Exchange` of one rank during one forward: its own shard exact, the others from codes."""

    def __init__(self, runtime: DistributedRuntime, view: RankView, batch_size: int):
        self.runtime, self.view, self.batch_size = runtime, view, batch_size
        layout, rank = view.layout, view.rank
        self.sources = code_sources(layout.num_devices, rank, runtime.causal)
        remote = [torch.arange(*layout.bounds(peer)) for peer in self.sources]
        self.remote_tokens = torch.cat(remote) if remote else torch.zeros(0, dtype=torch.long)
        self._masks: dict[tuple, tuple[KeyMask, KeyMask]] = {}  # by sliding window and dtype
        self._remote_positions = None
        # Hidden mode sends the attention's input: with overlap its codes leave from the module's pre-hook,
        # before this rank's own Q/K/V projections (`layer_input`). kv mode sends K/V, known only here.
        self.send_early = runtime.overlap and runtime.config.quantize == "hidden" and layout.num_devices > 1
        # Causal models on gloo with overlap: every receive of the forward is posted by `begin`, a layer
        # waits for its own receives only and the sends are waited for at the end (`transport.PostedAhead`).
        self.post_ahead = runtime.overlap and runtime.causal and runtime.transport.posts_ahead and layout.num_devices > 1
        self.posted: PostedAhead | None = None

    def begin(self) -> None:
        """Before the model runs: post the forward's receives (causal, gloo, overlap)."""
        if self.post_ahead:
            self.posted = self.runtime.transport.post_ahead(self.view.layout, self.batch_size, self.runtime.num_layers)

    def finish(self) -> None:
        """After a forward that returned: wait for the sends it did not wait for (`PostedAhead.finish`)."""
        if self.posted is not None:
            self.posted.finish()

    def layer_input(self, module, layer: LayerState) -> None:
        """The attention module's pre-hook: in hidden mode with overlap, encode and start sending this shard's codes."""
        if self.send_early:
            layer.transfer = self.start(module, layer)

    def start(self, module, layer: LayerState, key=None, value=None):
        """Encode and send what ``layer`` quantizes (`exchange.sent_vectors`), post the receives; the transfer."""
        runtime = self.runtime
        sent = sent_vectors(runtime.adapter, layer, key, value, runtime.config.quantize)
        return runtime.transport.start(
            module.astra_quantizer, sent, self.view.layout, runtime.causal, runtime.element_size, self.posted, layer.layer_idx
        )

    def received(self, layer: LayerState) -> list[torch.Tensor]:
        """Wait for the codes ``layer`` started (`CodeTransfer.wait`); from then on nothing of it is in flight."""
        transfer, layer.transfer = layer.transfer, None
        return transfer.wait()

    def settle(self, layers: list[LayerState], error: Exception) -> None:
        """After ``error`` ended a forward: wait for the codes it started and never waited for.

        Layer by layer (NCCL, ``overlap=False``, ViT): at most one layer's, whose sends and receives every
        rank posts as it reaches the layer, so they complete unless a peer failed too. Posted ahead
        (causal, gloo, overlap): `PostedAhead.finish` sends a filler for every layer not sent and waits
        for every send and receive of the forward, in one wait that does not wait again for a peer
        already silent for ``timeout``. A wait that fails (`liveness`: a dead peer within ``timeout``, a
        busy one within the process group's timeout) is noted on ``error``, which the caller raises.
        """
        if self.posted is not None:
            for layer in layers:
                layer.transfer = None
            try:
                self.posted.finish(drained=True)
            except Exception as failure:  # noqa: BLE001 - ``error`` is what the caller raises
                error.add_note(f"ASTRA: the codes of this forward, in flight when it was raised, were not all delivered: {failure}")
            return
        for layer in layers:
            if layer.transfer is None:
                continue
            try:
                self.received(layer)
            except Exception as failure:  # noqa: BLE001 - ``error`` is what the caller raises
                error.add_note(f"ASTRA: the codes of layer {layer.layer_idx}, in flight when it was raised, were not delivered: {failure}")

    def attention(self, module, layer: LayerState, query, key, value, allowed, scaling, dropout, want_weights):
        """Mixed-precision attention of this rank's queries (``allowed``, the local model's mask, is not used)."""
        if want_weights:
            raise ValueError("output_attentions is not supported by DistributedRuntime")
        runtime, adapter = self.runtime, self.runtime.adapter
        if layer.transfer is None:  # not started by `layer_input`: start it now
            layer.transfer = self.start(module, layer, key, value)
        layer.positions = None
        local_mask, remote_mask = self.masks(adapter.sliding_window(module), query.device, query.dtype)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if runtime.overlap:  # the exact part runs while the codes travel
            local = partial_attention(query, key, value, local_mask, scale)
            remote_key, remote_value = self.remote_keys_values(module, self.received(layer), key, value)
            remote = partial_attention(query, remote_key, remote_value, remote_mask, scale)
            output = merge_partials(local, remote).transpose(1, 2).contiguous()
        else:
            remote_key, remote_value = self.remote_keys_values(module, self.received(layer), key, value)
            allowed = torch.cat([local_mask.allowed, remote_mask.allowed], dim=-1)
            keys, values = torch.cat([key, remote_key], dim=2), torch.cat([value, remote_value], dim=2)
            output, _ = attend(query, keys, values, allowed, scaling, 0.0, False)
        self._store_last_rank_cache(layer, key, value, remote_key, remote_value)
        return output, None

    def remote_keys_values(self, module, received: list[torch.Tensor], key, value):
        """K and V of the other shards, rebuilt from their codes as the simulation does (`exchange.py`)."""
        if not received:
            return key[:, :, :0], value[:, :, :0]
        runtime, adapter = self.runtime, self.runtime.adapter
        quantizer = module.astra_quantizer
        codes = torch.cat(received, dim=1)
        if self._remote_positions is None:  # the same for every layer: the senders' global positions
            self._remote_positions = adapter.select_positions(self.view.positions, self.tokens_on(codes.device))
        positions = self._remote_positions
        tables = runtime._tables.get(module._astra_layer.layer_idx)
        if tables is not None:
            heads = adapter.key_value_heads(module)
            projected = tuple(split_heads(t, heads) for t in projected_from_fused(tables, codes, quantizer.codebook_size))
            return rebuild_keys_values(adapter, module, runtime.config.quantize, positions, projected=projected)
        return rebuild_keys_values(adapter, module, runtime.config.quantize, positions, decoded=quantizer.decode(codes))

    def tokens_on(self, device) -> torch.Tensor:
        """Global indices of the received tokens (sequence order), on ``device`` (copied once per forward)."""
        if self.remote_tokens.device != torch.device(device):
            self.remote_tokens = self.remote_tokens.to(device)
        return self.remote_tokens

    def masks(self, window: int | None, device, dtype: torch.dtype = torch.float32) -> tuple[KeyMask, KeyMask]:
        """(B or 1, 1, T_r, keys) masks for the own shard's keys and for the received keys (sequence order).

        Made once per forward (and window, and dtype): every layer with this window reuses them.
        """
        if (window, dtype) not in self._masks:
            queries = torch.arange(*self.view.bounds, device=device)
            self._masks[window, dtype] = (
                KeyMask.of(self._mask_for(queries, queries, window), dtype),
                KeyMask.of(self._mask_for(queries, self.tokens_on(device), window), dtype),
            )
        return self._masks[window, dtype]

    def _mask_for(self, queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
        allowed = torch.ones(1, 1, queries.numel(), keys.numel(), dtype=torch.bool, device=queries.device)
        if self.runtime.causal:
            allowed = allowed & (keys[None, :] <= queries[:, None])
        if window is not None:
            allowed = allowed & (keys[None, :] > queries[:, None] - window)
        padding = self.view.key_padding
        if padding is not None:
            allowed = allowed & padding[:, None, None, keys.to(padding.device)].to(queries.device)
        return allowed

    def _store_last_rank_cache(self, layer: LayerState, key, value, remote_key, remote_value) -> None:
        """Leave the last rank's view in its KV cache (for `generation`): earlier shards decoded, its own shard exact.

        Every token but the last: generate's first forward recomputes that one (see `generation`). Left out
        here rather than cropped afterwards, which a sliding-window layer past its window cannot undo.
        """
        cache, layer.cache = layer.cache, None
        if not self.runtime._keep_cache or cache is None:
            return
        keys, values = torch.cat([remote_key, key], dim=2), torch.cat([remote_value, value], dim=2)
        replace_cached_keys_values(cache, layer.layer_idx, keys[:, :, :-1], values[:, :, :-1])

    def shard_starts(self, num_tokens: int) -> list[int]:
        return [0]  # a rank holds one shard

    def mean_across_shards(self, copies: torch.Tensor) -> torch.Tensor:
        """Mean of every rank's vector (one small all_gather)."""
        gathered = self.runtime.transport.all_gather(copies[:, 0], "pooling the class tokens", "pooling")
        return torch.stack(gathered, dim=1).mean(dim=1, keepdim=True)

    def with_first_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rank 0's first token in front of this rank's tokens (rank 0: as they are; one small all_gather)."""
        gathered = self.runtime.transport.all_gather(hidden[:, 0], "sharing the class token", "pooling")
        return hidden if self.view.rank == 0 else torch.cat([gathered[0][:, None].to(hidden.dtype), hidden], dim=1)
