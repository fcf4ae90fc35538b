"""Who may join an ASTRA group: a fixed-format start-up header and an optional shared-secret check.

Threat model (docs/distributed.md, "Faults and trust"): a process that can reach the rendezvous port can
join the group as some rank. It must not be able to run code on another rank, and, where the ranks
share a secret, it must not receive or send anything of the model before proving it knows the secret.

1. Nothing here or in the runtime unpickles what a peer sends: every exchange is a tensor of a size the
   receiver knows in advance (no ``*_object`` collectives).
2. `verify_peers` runs first in `DistributedRuntime`'s construction, before the model handshake. Every
   rank sends an 8-byte header (magic, protocol version, whether it holds a secret). With a secret
   (``DistributedRuntime(secret=...)`` or the ``ASTRA_SECRET`` environment variable) it is an HMAC
   challenge-response:

   - every rank sends a fresh 32-byte random nonce (all_gather); rank 0's nonce is the challenge, the
     others make rank 0's answer fresh for them. The transcript T is all nonces in rank order.
   - every rank r sends HMAC-SHA256(secret, "astra-trust-v1/rank" || T || r || world size) (all_gather);
   - rank 0 checks every answer and broadcasts its verdict (one byte per rank) with its own proof,
     HMAC-SHA256(secret, "astra-trust-v1/rank0" || T || world size || verdict);
   - every rank checks rank 0's proof. A rank that fails, and every rank that sees it fail, raises
     `PeerAuthenticationError` naming the ranks; nothing else has been exchanged by then.

`bind_interface` points gloo (and NCCL's bootstrap) at one network interface. torch's TCPStore, which
the launcher's rendezvous uses, listens on every interface whatever the address given: the port must
be kept off untrusted networks by a firewall (see the docs).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets as _secrets
import socket
import struct

import torch
import torch.distributed as dist

from . import liveness

SECRET_ENV = "ASTRA_SECRET"
MAGIC = b"ASTRA"
PROTOCOL_VERSION = 1
HEADER_BYTES = 8  # MAGIC (5) + version (1) + flags (1) + reserved (1)
NONCE_BYTES = 32
TAG_BYTES = 32  # SHA-256
FLAG_SECRET = 1
_RANK_LABEL = b"astra-trust-v1/rank"
_LEADER_LABEL = b"astra-trust-v1/rank0"
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class PeerAuthenticationError(RuntimeError):
    """A rank is not a compatible ASTRA rank or could not prove the shared secret."""


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """The secret as bytes: ``secret`` itself, else the ``ASTRA_SECRET`` environment variable, else None."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)):
        raise ValueError(f"secret must be a str or bytes, got {type(secret).__name__}")
    if not secret:
        raise ValueError("secret must not be empty (leave it out, and ASTRA_SECRET unset, for no secret)")
    return bytes(secret)


def header(has_secret: bool) -> bytes:
    return MAGIC + bytes([PROTOCOL_VERSION, FLAG_SECRET if has_secret else 0, 0])


def rank_tag(secret: bytes, transcript: bytes, rank: int, world_size: int) -> bytes:
    return hmac.new(secret, _RANK_LABEL + transcript + struct.pack(">II", rank, world_size), hashlib.sha256).digest()


def leader_proof(secret: bytes, transcript: bytes, world_size: int, verdict: bytes) -> bytes:
    return hmac.new(secret, _LEADER_LABEL + transcript + struct.pack(">I", world_size) + verdict, hashlib.sha256).digest()


def verify_peers(group, secret: str | bytes | None, timeout: float) -> None:
    """Check every rank of ``group`` speaks this protocol and, with a secret, proves it (module docstring).

    Raises `PeerAuthenticationError` on every rank that takes part when any rank fails.
    Sends 8 bytes without a secret, 8 + 64 (+ world size + 32 from
    rank 0) with one. ``timeout``: seconds of silence from a peer before a wait fails (`liveness.wait`).
    """
    key = resolve_secret(secret)
    group = group if group is not None else dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    where = f"ASTRA rank {rank}/{world_size}"
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")

    headers = _all_gather_bytes(header(key is not None), group, device, timeout, where, "the start-up header")
    foreign = [r for r, h in enumerate(headers) if h[: len(MAGIC)] != MAGIC or h[len(MAGIC)] != PROTOCOL_VERSION]
    if foreign:
        raise PeerAuthenticationError(
            f"{where}: ranks {foreign} sent no ASTRA start-up header (protocol version {PROTOCOL_VERSION}): "
            "a process that is not an ASTRA rank of this version joined the group; nothing else was exchanged"
        )
    with_secret = [r for r, h in enumerate(headers) if h[len(MAGIC) + 1] & FLAG_SECRET]
    if not with_secret:
        return
    if len(with_secret) != world_size:
        without = [r for r in range(world_size) if r not in with_secret]
        raise PeerAuthenticationError(
            f"{where}: ranks {with_secret} hold a shared secret but ranks {without} do not; give every rank the "
            f"same secret (DistributedRuntime(secret=...) or {SECRET_ENV}); nothing else was exchanged"
        )

    nonces = _all_gather_bytes(_secrets.token_bytes(NONCE_BYTES), group, device, timeout, where, "the secret check's nonces")
    transcript = b"".join(nonces)
    tags = _all_gather_bytes(rank_tag(key, transcript, rank, world_size), group, device, timeout, where,
                             "the secret check's answers")
    verdict = bytes(world_size + TAG_BYTES)
    if rank == 0:
        ok = bytes(int(hmac.compare_digest(tags[r], rank_tag(key, transcript, r, world_size))) for r in range(world_size))
        verdict = ok + leader_proof(key, transcript, world_size, ok)
    verdict = _broadcast_bytes(verdict, group, device, timeout, where, "the secret check's verdict")
    ok, proof = verdict[:world_size], verdict[world_size:]
    rejected = [r for r in range(world_size) if not ok[r]]
    leader_proved = hmac.compare_digest(proof, leader_proof(key, transcript, world_size, ok))
    if rejected or not leader_proved:
        problems = []
        if rejected:
            problems.append(f"rank 0 rejected ranks {rejected} (their answer does not match rank 0's secret)")
        if not leader_proved:
            problems.append("rank 0's proof does not match this rank's secret (a different secret, or not our rank 0)")
        raise PeerAuthenticationError(
            f"{where}: the shared-secret check failed: {'; '.join(problems)}. Every rank must hold the same secret "
            f"(DistributedRuntime(secret=...) or {SECRET_ENV}); nothing else was exchanged"
        )


def bind_interface(name: str) -> str:
    """Make gloo (and NCCL's bootstrap) use the network interface ``name``; returns its IPv4 address.

    Sets ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``: call it before ``init_process_group``. gloo
    then listens on that interface's address only. It cannot restrict torch's TCPStore (the rendezvous,
    served by the main process or torchrun's agent), which listens on all interfaces.
    """
    known = {interface for _, interface in socket.if_nameindex()}
    if name not in known:
        raise ValueError(f"interface {name!r} does not exist on this machine; known: {sorted(known)}")
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if os.environ.get(variable, name) != name:
            raise ValueError(f"interface {name!r} differs from {variable}={os.environ[variable]!r}; set one of them")
        os.environ[variable] = name
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as error:
            raise ValueError(f"interface {name!r} has no IPv4 address: {error}") from error
    return socket.inet_ntoa(packed[20:24])


def _all_gather_bytes(data: bytes, group, device, timeout: float, where: str, what: str) -> list[bytes]:
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(gathered, mine, group=group, async_op=True), group, timeout, where, what)
    return [bytes(t.cpu().tolist()) for t in gathered]


def _broadcast_bytes(data: bytes, group, device, timeout: float, where: str, what: str) -> bytes:
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    _wait(dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group, async_op=True), group, timeout, where, what)
    return bytes(buffer.cpu().tolist())


def _wait(work, group, timeout: float, where: str, what: str) -> None:
    """`liveness.wait`: a busy peer is waited for, a dead or frozen one ends the wait within ``timeout``."""
    rank = dist.get_rank(group)
    peers = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)) if r != rank]
    liveness.wait(work, what, timeout, peers, where, sliced=dist.get_backend(group) == "gloo")
