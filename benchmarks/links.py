"""What a collective costs on the link: counted bytes, the paper's simulated link, or no link at all.

`install()` wraps the collectives of ``torch.distributed`` (module attributes, so any code calling
``dist.all_gather(...)`` goes through them, the ASTRA runtime included). Three link modes:

- ``real``: the collective runs as is over the (tc-shaped) sockets; only its bytes are counted.
- ``simulated``: the paper's method. The collective runs over an unshaped link, then the rank
  sleeps ``bytes / bandwidth``: the bytes it sends, or for a point-to-point receive the bytes it
  receives (links are full duplex, so a symmetric collective costs its sent bytes).
- ``compute``: no network. Collectives return local data of the right shape at once, so a run
  times the per-rank compute alone: the ceiling that non-local work puts on the speed-up.

Bytes sent per rank follow gloo's ring algorithms: all-gather sends (N-1)·s, all-reduce
2·(N-1)/N·s, a broadcast's source (N-1)·s. The harness checks them against the interface counters.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

MODES = ("real", "simulated", "compute")


@dataclass
class LinkState:
    mode: str = "real"
    mbps: float | None = None
    bytes_sent: int = 0
    slept_s: float = 0.0

    def reset(self) -> None:
        self.bytes_sent, self.slept_s = 0, 0.0


STATE = LinkState()


def set_mode(mode: str, mbps: float | None) -> None:
    if mode not in MODES:
        raise ValueError(f"link mode must be one of {MODES}, got {mode!r}")
    if mode == "simulated" and not mbps:
        raise ValueError("the simulated link needs a bandwidth (mbps > 0)")
    STATE.mode, STATE.mbps = mode, mbps


class _DoneWork:
    """Stands for the Work handle of an async collective that ran locally."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        """A completed future, as a finished collective's work has."""
        future = torch.futures.Future()
        future.set_result(None)
        return future


class _SleepAfterWork:
    """An async collective's Work that, once complete, also spends the simulated link's transfer time."""

    def __init__(self, work, pause: float):
        self.work, self.pause = work, pause

    def wait(self, *args, **kwargs):
        result = self.work.wait(*args, **kwargs)
        if self.pause:
            _sleep(self.pause)
            self.pause = 0.0
        return result

    def is_completed(self) -> bool:
        return self.work.is_completed() and not self.pause

    def __getattr__(self, name):
        return getattr(self.work, name)


def _sleep(seconds: float) -> None:
    STATE.slept_s += seconds
    time.sleep(seconds)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_gather_sent(args, kwargs) -> int:
    tensor = args[1] if len(args) > 1 else kwargs["tensor"]
    return (_world(kwargs.get("group")) - 1) * _nbytes(tensor)


def _all_gather_into_tensor_sent(args, kwargs) -> int:
    tensor = args[1] if len(args) > 1 else kwargs["input_tensor"]
    return (_world(kwargs.get("group")) - 1) * _nbytes(tensor)


def _all_reduce_sent(args, kwargs) -> int:
    world = _world(kwargs.get("group"))
    tensor = args[0] if args else kwargs["tensor"]
    return 2 * (world - 1) * _nbytes(tensor) // world


def _broadcast_sent(args, kwargs) -> int:
    tensor = args[0] if args else kwargs["tensor"]
    src = args[1] if len(args) > 1 else kwargs.get("src", kwargs.get("group_src"))
    return (_world(kwargs.get("group")) - 1) * _nbytes(tensor) if src == dist.get_rank() else 0


def _send_sent(args, kwargs) -> int:
    return _nbytes(args[0] if args else kwargs["tensor"])


def _no_bytes(args, kwargs) -> int:
    return 0


def _local_all_gather(args, kwargs) -> None:
    outputs, tensor = (args[0], args[1]) if len(args) > 1 else (kwargs["tensor_list"], kwargs["tensor"])
    for out in outputs:
        out.copy_(tensor)


def _local_all_gather_into_tensor(args, kwargs) -> None:
    output, tensor = (args[0], args[1]) if len(args) > 1 else (kwargs["output_tensor"], kwargs["input_tensor"])
    output.view(-1, tensor.numel()).copy_(tensor.reshape(1, -1))


def _local_nothing(args, kwargs) -> None:
    return None


def _local_receive(args, kwargs) -> None:
    (args[0] if args else kwargs["tensor"]).zero_()  # defined contents: zeros decode to codeword 0


# name -> (bytes this rank sends, what the collective does without a network)
COLLECTIVES = {
    "all_gather": (_all_gather_sent, _local_all_gather),
    "all_gather_into_tensor": (_all_gather_into_tensor_sent, _local_all_gather_into_tensor),
    "all_reduce": (_all_reduce_sent, _local_nothing),
    "broadcast": (_broadcast_sent, _local_nothing),
    "send": (_send_sent, _local_nothing),
    "isend": (_send_sent, _local_nothing),
    "recv": (_no_bytes, _local_receive),
    "irecv": (_no_bytes, _local_receive),
}


def _wrap(name: str, collective):
    count_sent, run_locally = COLLECTIVES[name]

    @functools.wraps(collective)
    def wrapper(*args, **kwargs):
        sent = count_sent(args, kwargs)
        STATE.bytes_sent += sent
        # Simulated transfer time: what this rank puts on its link, or for a receive what arrives on it.
        on_link = _send_sent(args, kwargs) if name in ("recv", "irecv") else sent
        if STATE.mode == "compute":
            run_locally(args, kwargs)
            return _DoneWork() if kwargs.get("async_op") or name.startswith("i") else None
        result = collective(*args, **kwargs)
        if STATE.mode == "simulated" and on_link:
            pause = on_link * 8 / (STATE.mbps * 1e6)
            if result is not None and hasattr(result, "wait"):
                return _SleepAfterWork(result, pause)  # a gloo Work must be waited on once, by its owner
            _sleep(pause)
        return result

    wrapper.__wrapped_by_links__ = True
    return wrapper


def install() -> None:
    """Wrap the collectives of ``torch.distributed`` (idempotent). Call before importing code that uses them.

    Patched in both ``torch.distributed`` and ``distributed_c10d``, where they are defined:
    ``batch_isend_irecv`` tells sends from receives by ``op is isend`` against the latter.
    """
    for name in COLLECTIVES:
        collective = getattr(c10d, name)
        if not getattr(collective, "__wrapped_by_links__", False):
            wrapped = _wrap(name, collective)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
