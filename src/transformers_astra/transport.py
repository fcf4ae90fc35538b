"""Codes on the wire: who sends to whom, the collectives that carry them, and the bytes they cost.

Exchanges (one per layer). Bidirectional models (ViT): an all_gather; shards may be uneven, so every
payload is padded to the largest one (gloo has no all_to_all) and the pad is counted as "padding".
Causal models (GPT2, Llama): rank r needs only the codes of ranks < r, so each rank sends its exact
payload point-to-point to the later ranks only; the last rank sends no codes. Byte counts are logical:
a payload sent to k peers counts k times, which is also what a ring all_gather puts on each link.

Causal models on gloo with overlap (`PostedAhead`): gloo's TCP pairs put a message on the wire only
once the receiver has posted its receive (the receiver's "recv ready" notification, gloo
transport/tcp/pair.cc), so every receive of a forward is posted at its start, one tag per layer, and
a layer waits only for its own receives; the sends are waited for once, at the end of the forward.
Elsewhere (NCCL, ``overlap=False``, bidirectional models) a layer's sends and receives are posted when
the layer starts and waited for together.

Every wait of a forward goes through `CodeTransport.wait`, which also times it (`Timings`): how long this
rank was blocked on its peers, by kind and per layer, against the forward's wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import time
from typing import Any

import torch
import torch.distributed as dist

from . import liveness
from .packing import pack, packed_size, unpack, unpack_rows
from .sharding import ShardLayout

TRAFFIC_KINDS = ("codes", "padding", "pooling", "control")
# What a rank waits for: a layer's codes ("codes"; the layer's own sends too where they are waited for with
# its receives), the sends `PostedAhead` waits for once at the end of the forward ("sends"), the class tokens'
# all_gather ("pooling") and the call's first exchange, the batch size and layout ("control").
WAIT_KINDS = ("codes", "sends", "pooling", "control")


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


@dataclass
class Timings:
    """Seconds of one rank's latest forward: its wall time and how long it was blocked waiting for peers.

    ``waited`` by kind (`WAIT_KINDS`), ``codes_per_layer[i]`` the part of ``waited["codes"]`` spent at
    layer ``i``. ``compute_s`` = ``total_s`` - ``waited_s``: everything this rank did itself (the model,
    encoding, packing, decoding) rather than wait. Host time: on NCCL a wait blocks the stream, not the
    host, so there the waits are near zero and ``compute_s`` includes the stream's waiting.
    """

    total_s: float = 0.0
    waited: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WAIT_KINDS, 0.0))
    codes_per_layer: list[float] = field(default_factory=list)

    @classmethod
    def of_layers(cls, num_layers: int) -> "Timings":
        return cls(codes_per_layer=[0.0] * num_layers)

    @property
    def waited_s(self) -> float:
        return sum(self.waited.values())

    @property
    def compute_s(self) -> float:
        return max(self.total_s - self.waited_s, 0.0)

    def add(self, kind: str, seconds: float, layer: int | None = None) -> None:
        """Count ``seconds`` of waiting for ``kind`` (and, for codes, at ``layer``)."""
        self.waited[kind] += seconds
        if layer is not None:
            if layer >= len(self.codes_per_layer):
                self.codes_per_layer += [0.0] * (layer + 1 - len(self.codes_per_layer))
            self.codes_per_layer[layer] += seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "waited_s": self.waited_s,
            "compute_s": self.compute_s,
            "waited": dict(self.waited),
            "codes_per_layer": list(self.codes_per_layer),
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


def _check_wait_kind(kind: str | None) -> None:
    if kind is not None and kind not in WAIT_KINDS:
        raise ValueError(f"kind must be one of {WAIT_KINDS} or None, got {kind!r}")


class CodeTransport:
    """One rank's link to the others: sends and receives codes, waits with a timeout, counts bytes."""

    def __init__(self, group, config, timeout: float, comm_device: torch.device, code_device: torch.device):
        self.group, self.config, self.timeout = group, config, float(timeout)
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.comm_device, self.code_device = comm_device, code_device
        self.traffic, self.timings = Traffic(), Timings()
        # What every wait needs, looked up once: the peers' global ranks, who waits, whether to slice.
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._peers = [g for r, g in enumerate(self._global) if r != self.rank]
        self._where = f"ASTRA rank {self.rank}/{self.world_size}"
        self._sliced = dist.get_backend(group) == "gloo"
        # gloo sends a message only once its receive is posted: post a forward's receives ahead (`PostedAhead`).
        # NCCL runs a communicator's point-to-point ops in order on one stream: receives posted ahead
        # would hold this rank's own sends behind them, so it keeps posting layer by layer.
        self.posts_ahead = self._sliced

    def plan(self, layout: ShardLayout, batch_size: int, causal: bool) -> tuple[list[int], list[int], list[int], dict]:
        """One layer's exchange for this rank: every shard's payload bytes, the ranks it sends to, the ranks it
        receives from (sequence order) and the (B, T_shard, codes per token) shape of each source's codes."""
        sizes = [payload_bytes(self.config, layout, shard, batch_size) for shard in range(self.world_size)]
        sources = code_sources(self.world_size, self.rank, causal)
        shapes = {s: (batch_size, layout.sizes[s], self.config.codes_per_token) for s in sources}
        return sizes, code_receivers(self.world_size, self.rank, causal), sources, shapes

    def post_ahead(self, layout: ShardLayout, batch_size: int, num_layers: int) -> "PostedAhead":
        """Post every receive of a causal forward now (gloo; see `PostedAhead`)."""
        return PostedAhead(self, layout, batch_size, num_layers)

    def start(self, quantizer, sent: torch.Tensor, layout: ShardLayout, causal: bool, element_size: int,
              posted: "PostedAhead | None" = None, layer_idx: int | None = None) -> "CodeTransfer":
        """Encode and send this shard's codes (if any rank needs them) and post the receives.

        ``posted``: the forward's receives, already posted (causal, gloo, overlap): this sends layer
        ``layer_idx``'s codes and returns the transfer that waits for that layer's receives only.
        """
        batch = sent.shape[0]
        sizes, receivers, sources, shapes = self.plan(layout, batch, causal)
        payload = torch.empty(0, dtype=torch.uint8, device=self.comm_device)
        if receivers:  # causal: nobody needs the last shard's codes, so the last rank never encodes
            payload = pack(quantizer.encode(sent), self.config.bits_per_code).to(self.comm_device)
            if payload.numel() != sizes[self.rank]:  # the receivers size their buffers by the formula
                raise RuntimeError(f"packed {payload.numel()} code bytes, the layout promises {sizes[self.rank]}")
        transfer = self._transfer(payload, sizes, receivers, sources, shapes, causal, posted, layer_idx)
        self.traffic.code_bytes_per_layer.append(len(receivers) * payload.numel())
        self.traffic.full_precision_bytes += len(receivers) * batch * layout.sizes[self.rank] * sent.shape[-1] * element_size
        return transfer

    def _transfer(self, payload, sizes, receivers, sources, shapes, causal: bool, posted: "PostedAhead | None",
                  layer_idx: int | None) -> "CodeTransfer":  # fmt: skip
        """Send ``payload`` to ``receivers`` and receive the ``sources``' codes: the layer's transfer."""
        if posted is not None:
            return posted.start(layer_idx, payload)
        if causal:
            return _PointToPointTransfer(self, payload, sizes, receivers, sources, shapes, layer_idx)
        return _AllGatherTransfer(self, payload, sizes, sources, shapes, layer_idx)

    def count_codes(self, sizes: list[int], receivers: list[int], sources: list[int], padded: bool) -> None:
        """Count one layer's code bytes: this rank's payload once per receiver, every source's payload received;
        ``padded`` (all_gather): every payload padded to the largest, the pad counted as "padding"."""
        own = sizes[self.rank]
        self.count("codes", len(receivers) * own, sum(sizes[s] for s in sources))
        if padded:
            largest = max(sizes)
            self.count("padding", len(receivers) * (largest - own), sum(largest - sizes[s] for s in sources))

    def unpack(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        codes = unpack(payload, self.config.bits_per_code, math.prod(shape))
        return codes.reshape(shape).to(self.code_device)

    def unpack_all(self, payloads: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """`unpack` of a layer's payloads, one per source: where all have one shape (even shards), one call for all
        (`packing.unpack_rows`, the same codes) instead of one per source."""
        if len(payloads) > 1 and all(shape == shapes[0] and p.numel() == payloads[0].numel() for p, shape in zip(payloads, shapes)):
            codes = unpack_rows(torch.stack(payloads), self.config.bits_per_code, math.prod(shapes[0]))
            return list(codes.reshape(len(payloads), *shapes[0]).to(self.code_device).unbind(0))
        return [self.unpack(payload, shape) for payload, shape in zip(payloads, shapes)]

    def count(self, kind: str, sent: int, received: int) -> None:
        self.traffic.sent[kind] += sent
        self.traffic.received[kind] += received

    def wait(self, work, what: str, since: float | None = None, kind: str | None = None, layer: int | None = None) -> None:
        """Wait for an async collective (or a list of works): `liveness.PeerFailureError` naming ``what`` when a peer is lost.

        A busy peer (its heartbeat advances) is waited for; one silent for ``timeout`` seconds is not
        (counted from ``since`` at the earliest, default now: `liveness.wait`). ``kind`` (`WAIT_KINDS`):
        the wait's seconds are added to ``timings`` (``layer``: at that layer), failed waits included.
        """
        _check_wait_kind(kind)
        started = time.perf_counter()
        try:
            liveness.wait(work, what, self.timeout, self._peers, self._where, sliced=self._sliced, since=since)
        finally:
            if kind is not None:
                self.timings.add(kind, time.perf_counter() - started, layer)

    def post(self, ops: list, what: str) -> list:
        """``dist.batch_isend_irecv(ops)``; a peer already lost is a `liveness.PeerFailureError` naming ``what``."""
        if not ops:
            return []
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as error:  # gloo: the pair to that peer is closed
            raise liveness.failure(self._where, what, time.monotonic(), self.timeout, f"a rank died or gave up. Cause: {error}") from error

    def all_gather(self, tensor: torch.Tensor, what: str, kind: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), on ``tensor``'s device; counted as ``kind``."""
        own = tensor.contiguous().to(self.comm_device)
        gathered = [torch.zeros_like(own) for _ in range(self.world_size)]
        self.wait(dist.all_gather(gathered, own, group=self.group, async_op=True), what, kind=kind)
        size = own.numel() * own.element_size()
        self.count(kind, (self.world_size - 1) * size, (self.world_size - 1) * size)
        return [g.to(tensor.device) for g in gathered]


class CodeTransfer:
    def wait(self) -> list[torch.Tensor]:
        """Codes of every source shard, (B, T_shard, codes per token) each, in sequence order."""
        raise NotImplementedError


class _AllGatherTransfer(CodeTransfer):
    """Every rank needs every other rank's codes: one all_gather of payloads padded to the largest."""

    def __init__(self, transport: CodeTransport, payload, sizes, sources, shapes, layer: int | None = None):
        self.transport, self.sizes, self.sources, self.shapes, self.layer = transport, sizes, sources, shapes, layer
        largest = max(sizes)
        padded = torch.zeros(largest, dtype=torch.uint8, device=payload.device)
        padded[: payload.numel()] = payload
        self.buffers = [torch.zeros_like(padded) for _ in sizes]
        self.work = dist.all_gather(self.buffers, padded, group=transport.group, async_op=True)
        transport.count_codes(sizes, sources, sources, padded=True)  # every other rank both sends and receives

    def wait(self) -> list[torch.Tensor]:
        self.transport.wait(self.work, "the code all_gather", kind="codes", layer=self.layer)
        return self.transport.unpack_all([self.buffers[s][: self.sizes[s]] for s in self.sources], [self.shapes[s] for s in self.sources])


class _PointToPointTransfer(CodeTransfer):
    """Causal: a rank's codes go to the later ranks only, each payload at its exact size."""

    def __init__(self, transport: CodeTransport, payload, sizes, receivers, sources, shapes, layer: int | None = None):
        self.transport, self.sources, self.shapes, self.layer = transport, sources, shapes, layer
        group, global_rank = transport.group, transport._global.__getitem__
        self.buffers = {s: torch.zeros(sizes[s], dtype=torch.uint8, device=payload.device) for s in sources}
        ops = [dist.P2POp(dist.isend, payload, global_rank(r), group) for r in receivers]
        ops += [dist.P2POp(dist.irecv, self.buffers[s], global_rank(s), group) for s in sources]
        self.works = transport.post(ops, f"the code exchange with ranks {sources}")
        transport.count_codes(sizes, receivers, sources, padded=False)

    def wait(self) -> list[torch.Tensor]:
        self.transport.wait(self.works, f"the code exchange with ranks {self.sources}", kind="codes", layer=self.layer)
        return self.transport.unpack_all([self.buffers[s] for s in self.sources], [self.shapes[s] for s in self.sources])


class PostedAhead:
    """One causal forward's point-to-point codes on gloo, with overlap: receives posted ahead, sends not held.

    gloo's TCP pair puts a message on the wire only once the receiver has posted the matching receive
    (`Pair::send` queues it until the peer's "recv ready" arrives), so a receive posted only when its
    layer is reached waits for the whole transfer however early the sender sent. Here every receive of
    the forward (each source, each layer; tag = layer index, so no message meets another layer's
    receive) is posted when the forward starts: the layout agreed by the call's first exchange fixes
    every payload's size. A layer then waits for its own receives only (`_PostedTransfer`); its sends
    are kept, with their payloads, and waited for once by `finish`, so a sender runs ahead of slower
    receivers. All layers rather than a few ahead: a forward's receive buffers are the codes the rank
    receives anyway (kilobytes per layer), and a sender never waits for a receiver to reach a layer.

    Every message a receiver posted is sent, whatever happens: a rank that leaves the forward early
    (an error) sends, for each layer it did not reach, a filler one byte longer than the payload whose
    last byte is 1. Receive buffers have that extra byte (gloo accepts a message shorter than the
    posted receive): 0 after a real payload, 1 after a filler, so a receiver that did not fail raises
    (`PeerFailureError`: the source gave up) instead of decoding filler. `finish` then waits for every
    send and every receive not yet waited for, so no message of this call is left to meet the next.
    """

    def __init__(self, transport: CodeTransport, layout: ShardLayout, batch_size: int, num_layers: int):
        self.transport, self.num_layers, self.started = transport, num_layers, time.monotonic()
        self.sizes, self.receivers, self.sources, self.shapes = transport.plan(layout, batch_size, causal=True)
        self._global = transport._global
        self.posted_at: dict[int, float] = {}  # layer -> when its receives were posted (monotonic)
        self.receives: dict[int, dict[int, tuple[torch.Tensor, Any]]] = {}  # layer -> source -> (buffer, work), not yet waited
        self.sends: dict[int, tuple[torch.Tensor, list]] = {}  # layer -> (payload, works): alive until `finish`
        self.works: list = []  # every work of the forward (tests ask whether all ended)
        if not self.sources:
            return
        # Every receive buffer of the forward is a row of one tensor (a contiguous view: one allocation, not one per
        # layer and source), so a layer's filler bytes are read in one gather (`receive`).
        widest = max(self.sizes[source] for source in self.sources) + 1
        self.buffer = torch.zeros(num_layers, len(self.sources), widest, dtype=torch.uint8, device=transport.comm_device)
        self._ends = torch.tensor([[self.sizes[source]] for source in self.sources], device=transport.comm_device)  # (S, 1)
        ops, buffers = [], {}
        for layer in range(num_layers):
            for row, source in enumerate(self.sources):
                buffer = self.buffer[layer, row, : self.sizes[source] + 1]
                buffers[layer, source] = buffer
                ops.append(dist.P2POp(dist.irecv, buffer, self._global[source], transport.group, tag=layer))
        works = transport.post(ops, f"the code exchange with ranks {self.sources}")
        now = time.monotonic()
        for (layer, source), work in zip(buffers, works):
            self.receives.setdefault(layer, {})[source] = (buffers[layer, source], work)
            self.posted_at[layer] = now
        self.works += works

    def start(self, layer: int, payload: torch.Tensor) -> "CodeTransfer":
        """Send layer ``layer``'s ``payload`` to the later ranks (not waited for here); the layer's transfer."""
        transport = self.transport
        if layer in self.sends:
            raise RuntimeError(f"layer {layer}'s codes were already sent in this forward")
        ops = [dist.P2POp(dist.isend, payload, self._global[r], transport.group, tag=layer) for r in self.receivers]
        self.sends[layer] = (payload, [])  # before posting: `finish` sends no filler for a layer that failed here
        self.sends[layer] = (payload, transport.post(ops, f"the code exchange with ranks {self.receivers}"))
        self.works += self.sends[layer][1]
        transport.count("codes", len(self.receivers) * payload.numel(), sum(self.sizes[s] for s in self.sources))
        return _PostedTransfer(self, layer)

    def receive(self, layer: int) -> list[torch.Tensor]:
        """Wait for layer ``layer``'s receives only; its codes from every source, in sequence order."""
        transport = self.transport
        pending = self.receives.pop(layer, {})
        if not self.sources:
            return []
        what = f"the code exchange with ranks {self.sources}"
        started = time.monotonic()
        transport.wait([work for _, work in pending.values()], what, kind="codes", layer=layer)
        flags = self.buffer[layer].gather(1, self._ends)  # (S, 1): each source's byte after its payload, 1 after a filler
        gave_up = [source for source, flag in zip(self.sources, flags.flatten().tolist()) if flag] if bool(flags.any()) else []
        if gave_up:
            transport.count("control", 0, sum(self.sizes[s] + 1 for s in gave_up))
            cause = f"rank(s) {gave_up} raised during this call and sent no codes for layer {layer}"
            raise liveness.failure(transport._where, what, started, transport.timeout, cause)
        return transport.unpack_all([pending[s][0][: self.sizes[s]] for s in self.sources], [self.shapes[s] for s in self.sources])

    def finish(self, drained: bool = False) -> None:
        """Send a filler for every layer not sent, then wait for every send and every receive not waited for.

        ``drained``: after an error, when a peer's silence counts from the start of the forward (one
        already silent for ``timeout`` is not waited for again). Raises `PeerFailureError` when one fails.
        """
        transport = self.transport
        if self.receivers:
            filler = torch.zeros(self.sizes[transport.rank] + 1, dtype=torch.uint8, device=transport.comm_device)
            filler[-1] = 1
            ops = [
                dist.P2POp(dist.isend, filler, self._global[r], transport.group, tag=layer)
                for layer in range(self.num_layers) if layer not in self.sends for r in self.receivers
            ]
            if ops:
                self.sends[-1] = (filler, [])  # kept alive with the works
                self.sends[-1] = (filler, transport.post(ops, f"the code exchange with ranks {self.receivers}"))
                self.works += self.sends[-1][1]
                transport.count("control", len(ops) * filler.numel(), 0)
        pending = [work for _, works in self.sends.values() for work in works]
        pending += [work for receives in self.receives.values() for _, work in receives.values()]
        peers = sorted(set(self.receivers) | set(self.sources))
        try:
            transport.wait(pending, f"the code exchange with ranks {peers}", since=self.started if drained else None, kind="sends")
        finally:
            for receives in self.receives.values():
                for source, (buffer, work) in receives.items():
                    if self._filler(source, buffer) and work.is_completed():
                        transport.count("control", 0, buffer.numel())
            self.receives.clear()

    def _filler(self, source: int, buffer: torch.Tensor) -> bool:
        return bool(buffer[self.sizes[source]] != 0)


class _PostedTransfer(CodeTransfer):
    """Layer ``layer`` of a `PostedAhead` forward: waiting for it waits for its own receives only."""

    def __init__(self, posted: PostedAhead, layer: int):
        self.posted, self.layer = posted, layer

    def wait(self) -> list[torch.Tensor]:
        return self.posted.receive(self.layer)


class LoopbackTransport(CodeTransport):
    """Rank ``rank`` of ``world_size`` with no network and no process group: a way to time one rank's own work.

    Pass it to `DistributedRuntime` (``transport=``) in place of a process group: the runtime then does
    exactly rank ``rank``'s work (its shard, its hooks, masks, partial attentions and merge; encoding and
    packing its codes when a later rank (causal) or any rank needs them; unpacking and rebuilding the K/V
    of every source shard), and every exchange returns at once. What arrives is not what peers would send:
    each source's codes are fixed valid codes (spread over the codebook, packed once per shape and kept),
    and an all_gather returns copies of this rank's own tensor. So the outputs are rank ``rank``'s only
    where it receives nothing (causal rank 0); the timing, not the values, is what this is for
    (`planner.loopback_rank_forward`, `calibrate_device(..., rank_probes=True)`).

    Bytes are counted as the real transport counts them (``traffic``), and a wait costs nothing
    (``timings`` waits stay 0). Layer by layer (``posts_ahead`` False): gloo's receives posted ahead and
    the real links' bookkeeping (posting, liveness checks) are not part of the timed work.
    """

    def __init__(self, rank: int, world_size: int, config, device: torch.device | str = "cpu"):
        for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.group, self.config, self.timeout = None, config, math.inf
        self.world_size, self.rank = world_size, rank
        self.comm_device = self.code_device = torch.device(device)
        self.traffic, self.timings = Traffic(), Timings()
        self._global = list(range(world_size))
        self._peers = [r for r in self._global if r != rank]
        self._where = f"ASTRA loopback rank {rank}/{world_size}"
        self._sliced, self.posts_ahead = False, False
        self._payloads: dict[tuple[int, int], torch.Tensor] = {}  # (bytes, codes) -> a packed payload, kept

    def _transfer(self, payload, sizes, receivers, sources, shapes, causal: bool, posted, layer_idx) -> "CodeTransfer":
        self.count_codes(sizes, receivers, sources, padded=not causal)
        return _LoopbackTransfer(self, [(self._payload(sizes[s], math.prod(shapes[s])), shapes[s]) for s in sources])

    def _payload(self, size: int, count: int) -> torch.Tensor:
        """``size`` bytes of ``count`` packed codes, spread over the codebook (made once per shape)."""
        if (size, count) not in self._payloads:
            codes = torch.arange(count, dtype=torch.long) * 7919 % self.config.codebook_size  # a prime stride: every codeword
            self._payloads[size, count] = pack(codes, self.config.bits_per_code).to(self.comm_device)
        return self._payloads[size, count]

    def post_ahead(self, layout: ShardLayout, batch_size: int, num_layers: int) -> "PostedAhead":
        raise RuntimeError("LoopbackTransport exchanges layer by layer (posts_ahead is False)")

    def wait(self, work, what: str, since: float | None = None, kind: str | None = None, layer: int | None = None) -> None:
        """Nothing is ever in flight: returns at once (``kind`` is still checked)."""
        _check_wait_kind(kind)

    def post(self, ops: list, what: str) -> list:
        raise RuntimeError("LoopbackTransport posts no point-to-point operations")

    def all_gather(self, tensor: torch.Tensor, what: str, kind: str) -> list[torch.Tensor]:
        """``world_size`` copies of ``tensor`` (as if every rank sent the same), counted as the real all_gather."""
        size = tensor.numel() * tensor.element_size()
        self.count(kind, (self.world_size - 1) * size, (self.world_size - 1) * size)
        return [tensor.clone() for _ in range(self.world_size)]


class _LoopbackTransfer(CodeTransfer):
    """A `LoopbackTransport` layer's codes: every source's kept payload, unpacked as a receiver unpacks."""

    def __init__(self, transport: LoopbackTransport, payloads: list[tuple[torch.Tensor, tuple[int, ...]]]):
        self.transport, self.payloads = transport, payloads

    def wait(self) -> list[torch.Tensor]:
        return self.transport.unpack_all([payload for payload, _ in self.payloads], [shape for _, shape in self.payloads])
