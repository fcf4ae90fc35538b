"""Codes on the wire: who sends to whom, the collectives that carry them, and the bytes they cost.

Exchanges (one per layer). Bidirectional models (ViT): an all_gather; shards may be uneven, so every
payload is padded to the largest one (gloo has no all_to_all) and the pad is counted as "padding".
Causal models (GPT2, Llama): rank r needs only the codes of ranks < r, so each rank sends its exact
payload point-to-point to the later ranks only; the last rank sends no codes. Byte counts are logical:
a payload sent to k peers counts k times, which is also what a ring all_gather puts on each link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import liveness
from .packing import pack, packed_size, unpack
from .sharding import ShardLayout

TRAFFIC_KINDS = ("codes", "padding", "pooling", "control")


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


class CodeTransport:
    """One rank's link to the others: sends and receives codes, waits with a timeout, counts bytes."""

    def __init__(self, group, config, timeout: float, comm_device: torch.device, code_device: torch.device):
        self.group, self.config, self.timeout = group, config, float(timeout)
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.comm_device, self.code_device = comm_device, code_device
        self.traffic = Traffic()
        # What every wait needs, looked up once: the peers' global ranks, who waits, whether to slice.
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._peers = [g for r, g in enumerate(self._global) if r != self.rank]
        self._where = f"ASTRA rank {self.rank}/{self.world_size}"
        self._sliced = dist.get_backend(group) == "gloo"

    def start(self, quantizer, sent: torch.Tensor, layout: ShardLayout, causal: bool, element_size: int) -> "CodeTransfer":
        """Encode and send this shard's codes (if any rank needs them) and post the receives."""
        batch = sent.shape[0]
        sizes = [payload_bytes(self.config, layout, shard, batch) for shard in range(self.world_size)]
        receivers = code_receivers(self.world_size, self.rank, causal)
        sources = code_sources(self.world_size, self.rank, causal)
        payload = torch.empty(0, dtype=torch.uint8, device=self.comm_device)
        if receivers:  # causal: nobody needs the last shard's codes, so the last rank never encodes
            payload = pack(quantizer.encode(sent), self.config.bits_per_code).to(self.comm_device)
            if payload.numel() != sizes[self.rank]:  # the receivers size their buffers by the formula
                raise RuntimeError(f"packed {payload.numel()} code bytes, the layout promises {sizes[self.rank]}")
        shapes = {s: (batch, layout.sizes[s], self.config.codes_per_token) for s in sources}
        if causal:
            transfer = _PointToPointTransfer(self, payload, sizes, receivers, sources, shapes)
        else:
            transfer = _AllGatherTransfer(self, payload, sizes, sources, shapes)
        self.traffic.code_bytes_per_layer.append(len(receivers) * payload.numel())
        self.traffic.full_precision_bytes += len(receivers) * batch * layout.sizes[self.rank] * sent.shape[-1] * element_size
        return transfer

    def unpack(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        codes = unpack(payload, self.config.bits_per_code, math.prod(shape))
        return codes.reshape(shape).to(self.code_device)

    def count(self, kind: str, sent: int, received: int) -> None:
        self.traffic.sent[kind] += sent
        self.traffic.received[kind] += received

    def wait(self, work, what: str) -> None:
        """Wait for an async collective (or a list of works): `liveness.PeerFailureError` naming ``what`` when a peer is lost.

        A busy peer (its heartbeat advances) is waited for; one silent for ``timeout`` seconds is not.
        """
        liveness.wait(work, what, self.timeout, self._peers, self._where, sliced=self._sliced)

    def all_gather(self, tensor: torch.Tensor, what: str, kind: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), on ``tensor``'s device; counted as ``kind``."""
        own = tensor.contiguous().to(self.comm_device)
        gathered = [torch.zeros_like(own) for _ in range(self.world_size)]
        self.wait(dist.all_gather(gathered, own, group=self.group, async_op=True), what)
        size = own.numel() * own.element_size()
        self.count(kind, (self.world_size - 1) * size, (self.world_size - 1) * size)
        return [g.to(tensor.device) for g in gathered]


class CodeTransfer:
    def wait(self) -> list[torch.Tensor]:
        """Codes of every source shard, (B, T_shard, codes per token) each, in sequence order."""
        raise NotImplementedError


class _AllGatherTransfer(CodeTransfer):
    """Every rank needs every other rank's codes: one all_gather of payloads padded to the largest."""

    def __init__(self, transport: CodeTransport, payload, sizes, sources, shapes):
        self.transport, self.sizes, self.sources, self.shapes = transport, sizes, sources, shapes
        largest = max(sizes)
        padded = torch.zeros(largest, dtype=torch.uint8, device=payload.device)
        padded[: payload.numel()] = payload
        self.buffers = [torch.zeros_like(padded) for _ in sizes]
        self.work = dist.all_gather(self.buffers, padded, group=transport.group, async_op=True)
        own, peers = sizes[transport.rank], len(sources)
        transport.count("codes", peers * own, sum(sizes[s] for s in sources))
        transport.count("padding", peers * (largest - own), sum(largest - sizes[s] for s in sources))

    def wait(self) -> list[torch.Tensor]:
        self.transport.wait(self.work, "the code all_gather")
        return [self.transport.unpack(self.buffers[s][: self.sizes[s]], self.shapes[s]) for s in self.sources]


class _PointToPointTransfer(CodeTransfer):
    """Causal: a rank's codes go to the later ranks only, each payload at its exact size."""

    def __init__(self, transport: CodeTransport, payload, sizes, receivers, sources, shapes):
        self.transport, self.sources, self.shapes = transport, sources, shapes
        group, global_rank = transport.group, transport._global.__getitem__
        self.buffers = {s: torch.zeros(sizes[s], dtype=torch.uint8, device=payload.device) for s in sources}
        ops = [dist.P2POp(dist.isend, payload, global_rank(r), group) for r in receivers]
        ops += [dist.P2POp(dist.irecv, self.buffers[s], global_rank(s), group) for s in sources]
        self.works = dist.batch_isend_irecv(ops) if ops else []
        transport.count("codes", len(receivers) * sizes[transport.rank], sum(sizes[s] for s in sources))

    def wait(self) -> list[torch.Tensor]:
        self.transport.wait(self.works, f"the code exchange with ranks {self.sources}")
        return [self.transport.unpack(self.buffers[s], self.shapes[s]) for s in self.sources]
