"""Every method of the latency benchmark by name, and a loopback runner that checks them against one device."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import links
from .baselines.sequence_parallel import SequenceParallel
from .baselines.single import SingleDevice
from .baselines.tensor_parallel import TensorParallel
from .workloads import build

METHODS = ("single", "astra", "sp-fp32", "sp-fp16", "tp")


def make_method(name: str, settings=None):
    """The method called ``name``; ``settings`` (an `AstraSettings`) only for ``astra`` (default: its defaults)."""
    if name == "single":
        return SingleDevice()
    if name == "sp-fp32":
        return SequenceParallel(torch.float32)
    if name == "sp-fp16":
        return SequenceParallel(torch.float16)
    if name == "tp":
        return TensorParallel()
    if name == "astra":
        from .astra_method import AstraMethod

        return AstraMethod(settings)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_rank(rank: int, world: int, port: int, cases: list[tuple[str, str]], results, builder) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    links.install()  # as in the benchmark: the collectives go through the byte-counting wrappers
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for workload, method in cases:
            runner = make_method(method)
            runner.setup(builder(workload, small=True), rank, world)
            output = runner.forward()
            results[(workload, method, rank)] = None if output is None else output.clone()
    finally:
        dist.destroy_process_group()


def loopback_outputs(
    cases: list[tuple[str, str]], world: int, builder=build
) -> dict[tuple[str, str], list[torch.Tensor | None]]:
    """Run each (workload, method) on the small workload over ``world`` processes on 127.0.0.1.

    ``builder(name, small=True)`` makes the workload (default `workloads.build`; a module-level function,
    so that the spawned processes can import it).

    Returns every case's per-rank predictions (None on ranks that make none). One process group serves
    all cases, so the processes start once.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _loopback_rank, args=(world, free_port(), cases, results, builder), nprocs=world, start_method="spawn"
        )
        return {case: [results.get((*case, rank)) for rank in range(world)] for case in cases}
