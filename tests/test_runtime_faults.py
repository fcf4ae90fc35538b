"""Faults of the distributed runtime through real 2-process gloo launches (issue 11, items 2-4 and 8).

One launch walks through the liveness and mismatch cases (`runtime_fault_workers.liveness_worker`);
kill trials launch pairs in which one rank dies mid-forward; the start-up cases launch single ranks.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import runtime_fault_workers as workers
import torch
import torch.multiprocessing as mp
from test_distributed import free_port

LAUNCH_TIMEOUT_S = 120


def start_and_join(worker, args_per_rank: list[tuple], wait_for=None) -> list:
    """Spawn one process per args tuple; join ``wait_for`` (default all, each must end), kill the rest (a frozen rank)."""
    processes = [mp.get_context("spawn").Process(target=worker, args=args) for args in args_per_rank]
    for process in processes:
        process.start()
    for rank in wait_for if wait_for is not None else range(len(processes)):
        processes[rank].join(LAUNCH_TIMEOUT_S)
        if processes[rank].is_alive():
            for process in processes:
                process.kill()
            pytest.fail(f"rank {rank} did not finish within {LAUNCH_TIMEOUT_S}s")
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    return processes


def launch(worker, out_dir: Path, world_size: int = 2, wait_for=None) -> list:
    """Run ``worker`` on ``world_size`` ranks and collect each rank's outcomes, exit code and stderr."""
    port = free_port()
    processes = start_and_join(worker, [(rank, world_size, port, str(out_dir)) for rank in range(world_size)], wait_for)
    return [
        {
            "outcomes": torch.load(out_dir / f"rank{rank}.pt", weights_only=False) if (out_dir / f"rank{rank}.pt").exists() else {},
            "exitcode": process.exitcode,
            "stderr": (out_dir / f"stderr{rank}.txt").read_text(),
        }
        for rank, process in enumerate(processes)
    ]


@pytest.fixture(scope="module")
def liveness(tmp_path_factory):
    return launch(workers.liveness_worker, tmp_path_factory.mktemp("liveness"), wait_for=[1])


def outcome(results, rank, case):
    return results[rank]["outcomes"][case]


def test_a_busy_rank_is_waited_for_in_the_handshake_and_in_a_forward(liveness):
    for rank in (0, 1):
        assert outcome(liveness, rank, "handshake")[0] == "ok"
        message, diff, seconds = outcome(liveness, rank, "busy")
        assert message == "ok" and diff <= 1e-4, (rank, message)
    assert outcome(liveness, 1, "busy")[2] >= workers.BUSY_S  # rank 1 really waited longer than the timeout


def test_a_decode_longer_than_the_timeout_succeeds_on_every_rank(liveness):
    for rank in (0, 1):
        message, matches, seconds = outcome(liveness, rank, "slow decode")
        assert message == "ok" and matches, (rank, message)
        assert seconds > 2 * workers.TIMEOUT


@pytest.mark.parametrize(
    "case, expected",
    [
        ("lengths", "ValueError: ASTRA ranks disagree on 'sequence length' (ranks [1] differ from rank 0: [10, 12])"),
        ("batch sizes", "ValueError: ASTRA ranks disagree on 'batch size' (ranks [1] differ from rank 0: [2, 3])"),
        ("check_inputs on one rank only", "ValueError: ASTRA ranks disagree on 'check_inputs' (ranks [1]"),
        ("generate lengths", "ValueError: ASTRA ranks disagree on 'sequence length'"),
        ("too long", "ValueError: the sequence needs 65 positions but this gpt2 model has 64"),
    ],
)
def test_mismatched_calls_without_the_input_check_fail_by_name_on_every_rank(liveness, case, expected):
    for rank in (0, 1):
        message = outcome(liveness, rank, case)[0]
        assert message.startswith(expected), (rank, message)


def test_different_max_new_tokens_return_the_last_ranks_tokens_everywhere(liveness):
    (message0, ids0, _), (message1, ids1, _) = (outcome(liveness, rank, "max_new_tokens") for rank in (0, 1))
    assert message0 == message1 == "ok"
    assert ids0 == ids1 and len(ids0[0]) <= 10 + 4


def test_the_group_stays_usable_after_named_errors(liveness):
    for rank in (0, 1):
        assert outcome(liveness, rank, "after the errors")[:2] == ("ok", True), rank


def test_a_frozen_rank_ends_the_survivor_within_the_timeout(liveness):
    message, _, seconds = outcome(liveness, 1, "frozen")
    assert message.startswith("PeerFailureError: ASTRA rank 1/2: the code exchange with ranks [0] failed"), message
    assert "no heartbeat from rank(s) [0]" in message
    assert workers.TIMEOUT <= seconds <= workers.TIMEOUT + 2.0
    print(f"frozen rank 0: rank 1 raised after {seconds:.2f}s (timeout {workers.TIMEOUT:g}s)")
    assert liveness[1]["exitcode"] == 0, liveness[1]["stderr"][-2000:]
    assert "terminate called" not in liveness[1]["stderr"]


KILL_TRIALS = 10


def test_a_rank_killed_mid_forward_gives_a_named_error_and_no_abort(tmp_path):
    started = time.monotonic()
    ports = [free_port() for _ in range(KILL_TRIALS)]
    start_and_join(workers.kill_trials, [(rank, ports, str(tmp_path)) for rank in (0, 1)])
    statuses = [torch.load(tmp_path / f"statuses{rank}.pt") for rank in (0, 1)]
    times = []
    for trial in range(KILL_TRIALS):
        trial_dir = tmp_path / str(trial)
        message, _, seconds = torch.load(trial_dir / "rank1.pt", weights_only=False)["killed"]
        assert message.startswith("PeerFailureError: ASTRA rank 1/2: the code exchange with ranks [0] failed"), (trial, message)
        assert seconds < workers.TIMEOUT  # a closed connection is seen at once, no need to wait for silence
        times.append(seconds)
        stderr = (trial_dir / "stderr1.txt").read_text()
        assert statuses[0][trial] == 9 and statuses[1][trial] == 0, (trial, statuses, stderr[-2000:])
        assert "terminate called" not in stderr, (trial, stderr[-2000:])
    print(f"{KILL_TRIALS} kill trials in {time.monotonic() - started:.1f}s; survivor's error after {min(times):.3f}-{max(times):.3f}s")


# ------------------------------------------------------------------ start-up (rendezvous) bounded by the timeout
START_TIMEOUT = 2.0


def rendezvous_in_threads(settings: list[tuple[int, int]], port: int) -> list[tuple[str, float]]:
    """Run `init_process_group` for each (rank, WORLD_SIZE) in a thread of this process.

    Every case here fails before torch's process group exists, so threads stand in for processes.
    """
    from transformers_astra.rendezvous import init_process_group

    results: list = [None] * len(settings)

    def rank_main(index, rank, world_size):
        started = time.monotonic()
        try:
            init_process_group("gloo", timeout=START_TIMEOUT, rank=rank, world_size=world_size,
                               master_addr="127.0.0.1", master_port=port)
            results[index] = ("ok", time.monotonic() - started)
        except (ValueError, RuntimeError) as error:
            results[index] = (f"{type(error).__name__}: {error}", time.monotonic() - started)

    threads = []
    for index, (rank, world_size) in enumerate(settings):
        threads.append(threading.Thread(target=rank_main, args=(index, rank, world_size)))
        threads[-1].start()
        time.sleep(0.2)  # rank 0 first, as in the measured failures
    for thread in threads:
        thread.join(5 * START_TIMEOUT)
    return results


def test_no_rank_0_is_a_named_error_within_the_timeout():
    [(message, seconds)] = rendezvous_in_threads([(1, 2)], free_port())
    assert message.startswith("RendezvousError: rank 1: could not reach the start-up store at 127.0.0.1:"), message
    assert START_TIMEOUT <= seconds <= START_TIMEOUT + 0.5


def test_a_missing_rank_is_a_named_error_within_the_timeout():
    [(message, seconds)] = rendezvous_in_threads([(0, 2)], free_port())
    assert message == f"RendezvousError: rank 0: ranks [1] of WORLD_SIZE=2 did not arrive at 127.0.0.1:{message.split(':')[-1].split()[0]} within 2s"
    assert START_TIMEOUT <= seconds <= START_TIMEOUT + 0.5


@pytest.mark.parametrize("world_sizes", [(2, 3), (3, 2)])
def test_different_world_sizes_are_a_value_error_naming_both_on_every_rank(world_sizes):
    results = rendezvous_in_threads([(0, world_sizes[0]), (1, world_sizes[1])], free_port())
    expected = f"ValueError: ranks were started with different WORLD_SIZE: rank 0 has {world_sizes[0]}, rank 1 has {world_sizes[1]}"
    for message, seconds in results:
        assert message == expected
        assert seconds <= 1.0  # found as soon as both ranks are there, long before the timeout


def test_rendezvous_under_torchrun_uses_the_agents_store(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from transformers_astra.rendezvous import init_process_group\n"
        "init_process_group('gloo', timeout=10)\n"
        "total = torch.tensor([dist.get_rank() + 1]); dist.all_reduce(total)\n"
        f"open(r'{tmp_path}' + f'/rank{{dist.get_rank()}}.txt', 'w').write(f'total {{total.item()}} agent store {{os.environ.get(\"TORCHELASTIC_USE_AGENT_STORE\")}}')\n"
        "dist.destroy_process_group()\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "total 3 agent store True"
