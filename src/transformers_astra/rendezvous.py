"""Start-up bounded by the timeout: ``init_process_group`` that fails by name when a rank is missing or differs.

    from transformers_astra.rendezvous import init_process_group
    init_process_group("gloo", timeout=5)  # instead of torch.distributed.init_process_group

torch's own start-up waits are not bounded by the timeout it is given: a rank whose rank 0 is not there
retries the store connection with backoff (7.7-9.7 s under timeout=5 here), and ranks started with
different WORLD_SIZE values wait in gloo's full-mesh connect for about 5x the timeout before a raw
error. Here:

1. The TCPStore is made here (rank 0 hosts it; under torchrun the agent's store is used), with
   ``wait_for_workers=False``; connecting runs in a thread joined with ``timeout``.
2. Every rank writes its WORLD_SIZE under ``astra/rendezvous/world_size/<rank>``. Rank 0 waits for
   ranks 1..W-1, the others wait for rank 0, each bounded by ``timeout``. A WORLD_SIZE that differs from
   rank 0's is a ValueError naming both ranks' values, on every rank that has arrived: the rank that sees
   it writes the message in the store, the others raise it too and acknowledge, and rank 0 (whose process
   hosts the store) waits for those acknowledgements, bounded by ``timeout``, before raising.
3. Only then ``torch.distributed.init_process_group(backend, store=...)``, whose connect is quick since
   every rank is there, with ``operation_timeout`` as the process group's timeout (how long one
   collective may take, a busy peer included: see `liveness`), then this rank's heartbeat starts.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from . import liveness
from .config import validate_timeout

POLL_S = 0.02
DEFAULT_OPERATION_TIMEOUT_S = 1800.0  # torch's default process-group timeout


class RendezvousError(RuntimeError):
    """A rank did not arrive, or the store could not be reached, within the start-up timeout."""


def init_process_group(
    backend: str | None = None,
    timeout: float = 60.0,
    operation_timeout: float | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> None:
    """`torch.distributed.init_process_group` with every start-up wait bounded by ``timeout`` (module docstring).

    ``rank``, ``world_size``, ``master_addr``, ``master_port`` default to the launcher's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). ``operation_timeout``: the process group's own timeout
    for one collective (default 30 minutes, torch's); the runtime's liveness ``timeout`` is separate.
    """
    timeout = validate_timeout(timeout)
    operation_timeout = validate_timeout(operation_timeout or max(DEFAULT_OPERATION_TIMEOUT_S, timeout), "operation_timeout")
    rank = _setting(rank, "RANK")
    world_size = _setting(world_size, "WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    host = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _setting(master_port, "MASTER_PORT")
    store = connect_store(host, port, rank, timeout)
    agree_on_world_size(store, rank, world_size, timeout, where=f"{host}:{port}")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=operation_timeout))
    liveness.start_heartbeat(timeout)


def connect_store(host: str, port: int, rank: int, timeout: float) -> dist.Store:
    """The start-up TCPStore (rank 0 hosts it unless a torchrun agent does), reached within ``timeout``.

    A client first waits for the port to accept a connection (plain sockets, bounded by ``timeout``):
    TCPStore's own connect retries with a backoff that overshoots its timeout, and a connect left
    running in a thread aborts the process at exit.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    host_store = rank == 0 and not agent
    started = time.monotonic()
    if not host_store and not _port_open(host, port, started, timeout):
        raise RendezvousError(
            f"rank {rank}: could not reach the start-up store at {host}:{port} within {time.monotonic() - started:.1f}s "
            f"(timeout {timeout:g}s): is rank 0 running, with the same MASTER_ADDR/MASTER_PORT?"
        )
    left = max(timeout - (time.monotonic() - started), 1.0)
    store = dist.TCPStore(host, port, is_master=host_store, timeout=timedelta(seconds=left), wait_for_workers=False)
    prefix = f"astra/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return dist.PrefixStore(prefix, store)


def _port_open(host: str, port: int, started: float, timeout: float) -> bool:
    while time.monotonic() - started < timeout:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, timeout - (time.monotonic() - started)))):
                return True
        except OSError:
            time.sleep(POLL_S)
    return False


def agree_on_world_size(store, rank: int, world_size: int, timeout: float, where: str) -> None:
    """Every rank's WORLD_SIZE equals rank 0's, and every rank arrived, within ``timeout`` (module docstring)."""
    started = time.monotonic()
    store.set(f"world_size/{rank}", str(world_size))
    if rank != 0:
        if not _poll(lambda: _has(store, "world_size/0") or _has(store, "error"), started, timeout):
            raise RendezvousError(f"rank {rank}: rank 0 did not arrive at {where} within {timeout:g}s")
        if _has(store, "world_size/0"):
            leader = int(store.get("world_size/0"))
            if leader != world_size:
                _publish(store, f"ranks were started with different WORLD_SIZE: rank 0 has {leader}, rank {rank} has {world_size}")
                store.set(f"ack/{rank}", "1")
                raise ValueError(store.get("error").decode())
        _poll(lambda: _has(store, "ready") or _has(store, "error"), started, timeout)
        if _has(store, "error"):
            store.set(f"ack/{rank}", "1")
            raise ValueError(store.get("error").decode())
        if not _has(store, "ready"):
            raise RendezvousError(f"rank {rank}: the other ranks did not all arrive at {where} within {timeout:g}s")
        return
    peers = range(1, world_size)
    _poll(lambda: _has(store, "error") or _mismatch(store, world_size) is not None or all(_has(store, f"world_size/{r}") for r in peers),
          started, timeout)
    if not _has(store, "error") and (message := _mismatch(store, world_size)) is not None:
        _publish(store, message)
    if _has(store, "error"):
        message = store.get("error").decode()
        arrived = [r for r in range(1, world_size + 1) if _has(store, f"world_size/{r}")]
        _poll(lambda: all(_has(store, f"ack/{r}") for r in arrived), time.monotonic(), timeout)  # rank 0 hosts the store
        raise ValueError(message)
    missing = [r for r in peers if not _has(store, f"world_size/{r}")]
    if missing:
        _publish(store, f"ranks {missing} did not arrive at {where} within {timeout:g}s")
        raise RendezvousError(f"rank 0: ranks {missing} of WORLD_SIZE={world_size} did not arrive at {where} within {timeout:g}s")
    store.set("ready", "1")


def _mismatch(store, world_size: int) -> str | None:
    """Rank 0's view: a rank registered with another WORLD_SIZE, or a rank beyond its own WORLD_SIZE."""
    for r in range(1, world_size + 1):
        if _has(store, f"world_size/{r}") and (theirs := int(store.get(f"world_size/{r}"))) != world_size:
            return f"ranks were started with different WORLD_SIZE: rank 0 has {world_size}, rank {r} has {theirs}"
    return None


def _publish(store, message: str) -> None:
    if not _has(store, "error"):
        store.compare_set("error", "", message)  # the first rank to see a problem names it for all


def _has(store, key: str) -> bool:
    return store.check([key])


def _poll(condition, started: float, timeout: float) -> bool:
    while not condition():
        if time.monotonic() - started > timeout:
            return False
        time.sleep(POLL_S)
    return True


def _setting(value: int | None, variable: str) -> int:
    if value is not None:
        return int(value)
    text = os.environ.get(variable)
    if text is None or not text.strip().lstrip("-").isdigit():
        raise ValueError(f"{variable} must be set to an integer (the launcher sets it), got {text!r}")
    return int(text)
