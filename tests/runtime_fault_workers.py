"""What each rank of tests/test_runtime_faults.py runs (imported by spawned processes, so not a test module).

Each worker starts through `rendezvous.init_process_group`, writes its stderr to a file (so the parent
can look for C++ aborts), walks through its cases and records each outcome as ("ok", value, seconds)
or ("<ErrorType>: <message>", None, seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from conftest import gpt2_batch
from distributed_workers import build_model

from transformers_astra.distributed import DistributedRuntime
from transformers_astra.rendezvous import init_process_group

TIMEOUT = 2.0  # the runtime's liveness timeout in these tests
BUSY_S = 3 * TIMEOUT
DECODE_STEP_S = 0.6 * TIMEOUT
NEW_TOKENS = 6  # five decode steps of DECODE_STEP_S: 3 x TIMEOUT of decoding on the last rank


def start(rank: int, world_size: int, port: int, out_dir: str, **environment) -> None:
    stderr = open(os.path.join(out_dir, f"stderr{rank}.txt"), "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(stderr.fileno(), 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(environment)


def recorder(outcomes: dict, out_path: str):
    def attempt(name, action):
        started = time.monotonic()
        try:
            outcomes[name] = ("ok", action(), time.monotonic() - started)
        except (ValueError, RuntimeError) as error:
            outcomes[name] = (f"{type(error).__name__}: {error}", None, time.monotonic() - started)
        torch.save(outcomes, out_path)  # after every case: a frozen or killed rank leaves what it had

    return attempt


def sleep_once(seconds: float):
    """A forward pre-hook that sleeps ``seconds`` the first time it runs (a rank busy with its own work)."""
    calls = []

    def hook(module, args):
        if not calls:
            calls.append(1)
            time.sleep(seconds)

    return hook


def liveness_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Busy ranks, a long decode, mismatched calls under check_inputs=False, then rank 0 freezes."""
    start(rank, world_size, port, out_dir)
    init_process_group("gloo", timeout=TIMEOUT, operation_timeout=60)
    out_path = os.path.join(out_dir, f"rank{rank}.pt")
    outcomes: dict = {}
    attempt = recorder(outcomes, out_path)
    model = build_model("gpt2", 2)
    batch = gpt2_batch(batch=2, length=10)
    with torch.no_grad():
        simulated = model(**batch).logits
        wanted = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    first_attention = model._astra_state.adapter.attention_modules(model)[0]
    # Hooks on an attention module below go first (prepend): ASTRA's own pre-hook sends the layer's codes
    # in hidden mode with overlap, and each case means the rank to stop before it has sent them.
    # Rank 0 builds its runtime only after 3 x TIMEOUT of work: rank 1 waits in the handshake meanwhile.
    if rank == 0:
        time.sleep(BUSY_S)
    runtime = DistributedRuntime(model, timeout=TIMEOUT)
    unchecked = DistributedRuntime(model, timeout=TIMEOUT, check_inputs=False)
    outcomes["handshake"] = ("ok", None, 0.0)

    def busy_forward():
        handle = first_attention.register_forward_pre_hook(sleep_once(BUSY_S), prepend=True) if rank == 0 else None
        try:
            logits = runtime(**batch).logits
        finally:
            if handle is not None:
                handle.remove()
        start_, end = runtime.layout.bounds(rank)
        return (logits - simulated[:, start_:end]).abs().max().item()

    attempt("busy", busy_forward)

    def slow_decode():
        def slow(module, args, kwargs):
            if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
                time.sleep(DECODE_STEP_S)

        handle = model.register_forward_pre_hook(slow, with_kwargs=True) if runtime.is_last else None
        try:
            generated = runtime.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS)
        finally:
            if handle is not None:
                handle.remove()
        return bool(torch.equal(generated, wanted))

    attempt("slow decode", slow_decode)
    longer = gpt2_batch(batch=2, length=12, seed=3)
    attempt("lengths", lambda: unchecked(**(batch if rank == 0 else longer)))
    attempt("batch sizes", lambda: unchecked(**(batch if rank == 0 else gpt2_batch(batch=3, length=10))))
    attempt("check_inputs on one rank only", lambda: (runtime if rank == 0 else unchecked)(**batch))
    attempt("max_new_tokens", lambda: unchecked.generate(batch["input_ids"], max_new_tokens=2 if rank == 0 else 4).tolist())
    attempt("generate lengths", lambda: unchecked.generate(**(batch if rank == 0 else longer), max_new_tokens=2))
    too_long = gpt2_batch(batch=1, length=model.config.n_positions + 1)
    attempt("too long", lambda: unchecked(**too_long))
    attempt("after the errors", lambda: bool(torch.equal(runtime.generate(**batch, max_new_tokens=NEW_TOKENS), wanted)))

    def frozen():
        # Rank 0 freezes in its first attention layer (SIGSTOP: no heartbeat, sockets open); the parent kills it.
        handle = first_attention.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGSTOP), prepend=True) if rank == 0 else None
        try:
            runtime(**batch)
        finally:
            if handle is not None:
                handle.remove()

    attempt("frozen", frozen)
    # Rank 1 leaves through the normal interpreter exit: a C++ abort would show in its stderr and exit code.


def kill_trials(rank: int, ports: list[int], out_dir: str) -> None:
    """One process per rank builds the model once, then forks one child per trial (one per port).

    In each trial the children start a 2-rank group; rank 0's child dies in its second attention layer
    (its first layer's codes already sent), rank 1's child must raise by name and then leave through
    the normal interpreter exit (atexit, finalization, C++ destructors), where an abort would show.
    """
    torch.set_num_threads(1)
    model = build_model("gpt2", 2)
    batch = gpt2_batch(batch=2, length=10)
    statuses = {}
    for trial, port in enumerate(ports):
        trial_dir = os.path.join(out_dir, str(trial))
        os.makedirs(trial_dir, exist_ok=True)
        child = os.fork()
        if child == 0:  # the trial's rank: its SystemExit unwinds to multiprocessing's normal exit
            start(rank, 2, port, trial_dir)
            init_process_group("gloo", timeout=30, operation_timeout=60)  # the two forks may start seconds apart
            attempt = recorder({}, os.path.join(trial_dir, f"rank{rank}.pt"))
            runtime = DistributedRuntime(model, timeout=TIMEOUT)
            if rank == 0:
                second_attention = model._astra_state.adapter.attention_modules(model)[1]
                second_attention.register_forward_pre_hook(lambda *_: os._exit(9), prepend=True)  # before it sends
            attempt("killed", lambda: runtime(**batch))
            sys.exit(0)
        statuses[trial] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    torch.save(statuses, os.path.join(out_dir, f"statuses{rank}.pt"))
