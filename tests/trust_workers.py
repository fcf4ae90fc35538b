"""What each rank of the trust tests runs (imported by spawned processes, so not a test module).

Rank 0 is an honest ASTRA rank; rank 1 is honest with another secret, or an attacker that sends a
malicious pickle (one that runs ``touch MARKER`` when unpickled) the way torch's ``*_object`` collectives
send objects. Every scenario runs in a process group of its own, so an exchange an attacker leaves
unmatched cannot spill into the next one. Rank 0 records every unpickling attempt (a tripwire around
``pickle``'s loaders and torch's object-collective unpickler) and each outcome as error text or "ok".
"""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from conftest import gpt2_batch
from distributed_workers import build_model, init, max_abs_diff

from transformers_astra.distributed import DistributedRuntime
from transformers_astra.trust import SECRET_ENV, header

TIMEOUT_S = 5.0
SCENARIOS = ("same secret", "wrong secret", "missing secret", "pickle control", "pickle attack with secret",
             "pickle attack without secret", "pickle in the secret check")


class RunsCommand:
    """Unpickling this runs a shell command (what a hostile peer would send)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def marker(out_dir: str, scenario: str) -> str:
    return os.path.join(out_dir, scenario.replace(" ", "-") + ".marker")


class Tripwire:
    """Counts calls of every unpickling entry point in this process (then lets them run)."""

    def __init__(self):
        self.calls = 0
        tripwire = self

        class CountingUnpickler(pickle.Unpickler):
            def load(self):
                tripwire.calls += 1
                return super().load()

        def counted(function):
            def wrapper(*args, **kwargs):
                tripwire.calls += 1
                return function(*args, **kwargs)
            return wrapper

        pickle.Unpickler, c10d._unpickler = CountingUnpickler, CountingUnpickler
        pickle.loads, pickle.load = counted(pickle.loads), counted(pickle.load)


def send_like_object_collective(payload, group) -> None:
    """What ``dist.all_gather_object`` sends: the pickle's size (int64), then the padded pickle bytes.

    The second all_gather is left pending: the honest rank has stopped after the first one.
    """
    data, size = c10d._object_to_tensor(payload, torch.device("cpu"), group)
    sizes = [torch.zeros_like(size) for _ in range(2)]
    dist.all_gather(sizes, size, group=group)
    largest = int(max(s.item() for s in sizes))
    padded = torch.zeros(max(largest, data.numel()), dtype=torch.uint8)
    padded[: data.numel()] = data
    dist.all_gather([torch.empty_like(padded) for _ in range(2)], padded, group=group, async_op=True)


def trust_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init(rank, world_size, port)
    groups = {name: dist.new_group(list(range(world_size)), timeout=timedelta(seconds=30)) for name in SCENARIOS}
    tripwire = Tripwire() if rank == 0 else None
    outcomes, batch = {}, gpt2_batch(batch=1, length=8)

    def attempt(name, action):
        os.environ.pop(SECRET_ENV, None)
        model = build_model("gpt2", 2)
        dist.barrier()
        calls_before, started = (tripwire.calls if tripwire else 0), time.monotonic()
        try:
            outcome = action(model, groups[name])
        except (ValueError, RuntimeError) as error:
            outcome = f"{type(error).__name__}: {error}"
        outcomes[name] = {
            "outcome": outcome, "seconds": time.monotonic() - started,
            "unpickled": (tripwire.calls - calls_before) if tripwire else None,
        }

    def honest(secret):
        def action(model, group):
            runtime = DistributedRuntime(model, group=group, timeout=TIMEOUT_S, secret=secret)
            with torch.no_grad():
                simulated = model(**batch).logits
            return f"ok, diff {max_abs_diff(runtime(**batch).logits, simulated, runtime, batch):.2e}"
        return action

    def same_secret_from_the_environment(model, group):
        os.environ[SECRET_ENV] = "correct horse battery staple"
        return honest(None)(model, group)

    attempt("same secret", same_secret_from_the_environment)
    attempt("wrong secret", honest("correct horse battery staple" if rank == 0 else "a guess"))
    attempt("missing secret", honest("correct horse battery staple" if rank == 0 else None))

    evil = {name: RunsCommand(f"touch {marker(out_dir, name)}") for name in SCENARIOS}

    def control(model, group):  # the pattern the example used to have: rank 0 unpickles a peer's object
        gathered = [None] * world_size
        dist.all_gather_object(gathered, None if rank == 0 else evil["pickle control"], group=group)
        return "ok"

    attempt("pickle control", control)

    def attack(name, secret):
        def action(model, group):
            if rank == 0:
                return honest(secret)(model, group)
            send_like_object_collective(evil[name], group)
            return "attacker done"
        return action

    attempt("pickle attack with secret", attack("pickle attack with secret", "correct horse battery staple"))
    attempt("pickle attack without secret", attack("pickle attack without secret", None))

    def pickle_in_the_secret_check(model, group):
        if rank == 0:
            return honest("correct horse battery staple")(model, group)
        # An attacker that knows the protocol: a valid header, then the pickle where the nonce and the answer go.
        evil_bytes = pickle.dumps(evil["pickle in the secret check"])
        slot = lambda: torch.frombuffer(bytearray(evil_bytes[:32].ljust(32, b".")), dtype=torch.uint8)  # noqa: E731
        for mine in (torch.frombuffer(bytearray(header(True)), dtype=torch.uint8), slot(), slot()):
            dist.all_gather([torch.empty_like(mine) for _ in range(2)], mine, group=group)
        verdict = torch.empty(world_size + 32, dtype=torch.uint8)
        dist.broadcast(verdict, src=0, group=group)
        return f"attacker got verdict {verdict[:world_size].tolist()}"

    attempt("pickle in the secret check", pickle_in_the_secret_check)
    for name in SCENARIOS:
        outcomes[name]["marker"] = os.path.exists(marker(out_dir, name))
    torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)
