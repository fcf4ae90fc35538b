"""Issue 11 item 1: no peer can run code on another rank, and a shared secret keeps strangers out.

One launch of 2 gloo processes walks through the scenarios of `trust_workers` (a wrong or missing
secret, and an attacker sending a malicious pickle, with a positive control that shows the same pickle
does run a command when a rank unpickles it). The grep test keeps ``*_object`` collectives out of the
library, the examples, the benchmarks and the test workers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trust_workers
from test_distributed import TOL, launch

from transformers_astra import trust

REPO = Path(__file__).resolve().parents[1]
# torch.distributed's collectives that pickle Python objects (and unpickle what peers send).
OBJECT_COLLECTIVES = re.compile(r"\b(broadcast_object_list|all_gather_object|gather_object|scatter_object_list|"
                                r"send_object_list|recv_object_list)\b")


def test_no_pickled_collectives_in_code_that_talks_to_peers():
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "examples").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
             REPO / "tests" / "distributed_workers.py"]
    assert len(files) > 20
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in files
                 for number, line in enumerate(path.read_text().splitlines(), 1) if OBJECT_COLLECTIVES.search(line)]
    assert not offenders, "pickled collectives unpickle what a peer sends:\n" + "\n".join(offenders)


def test_the_grep_finds_what_it_looks_for():
    assert OBJECT_COLLECTIVES.search("    dist.all_gather_object(everyone, mine)")
    assert OBJECT_COLLECTIVES.search("dist.broadcast_object_list(state, src=0)")
    assert not OBJECT_COLLECTIVES.search("dist.all_gather(gathered, mine)")


def test_secret_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(trust.SECRET_ENV, raising=False)
    assert trust.resolve_secret(None) is None
    assert trust.resolve_secret("abc") == b"abc" == trust.resolve_secret(b"abc")
    monkeypatch.setenv(trust.SECRET_ENV, "from env")
    assert trust.resolve_secret(None) == b"from env"
    assert trust.resolve_secret("argument wins") == b"argument wins"
    with pytest.raises(ValueError, match="secret must not be empty"):
        trust.resolve_secret("")
    with pytest.raises(ValueError, match="secret must be a str or bytes, got int"):
        trust.resolve_secret(1234)


def test_answers_are_bound_to_secret_rank_world_size_and_transcript():
    transcript = bytes(range(64))
    tag = trust.rank_tag(b"k", transcript, 1, 2)
    assert len(tag) == trust.TAG_BYTES
    assert tag != trust.rank_tag(b"K", transcript, 1, 2)
    assert tag != trust.rank_tag(b"k", transcript, 0, 2)
    assert tag != trust.rank_tag(b"k", transcript, 1, 3)
    assert tag != trust.rank_tag(b"k", transcript[::-1], 1, 2)
    assert trust.leader_proof(b"k", transcript, 2, b"\x01\x01") != trust.leader_proof(b"k", transcript, 2, b"\x01\x00")
    assert len(trust.header(True)) == len(trust.header(False)) == trust.HEADER_BYTES


def test_bind_interface_sets_gloo_and_nccl_and_returns_the_address(monkeypatch):
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # set first, so that monkeypatch restores them
        monkeypatch.setenv(variable, "unset by the test")
        monkeypatch.delenv(variable)
    assert trust.bind_interface("lo") == "127.0.0.1"
    assert trust.bind_interface("lo") == "127.0.0.1"  # idempotent
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    with pytest.raises(ValueError, match="interface 'no-such-if0' does not exist"):
        trust.bind_interface("no-such-if0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    with pytest.raises(ValueError, match="differs from GLOO_SOCKET_IFNAME='eth9'"):
        trust.bind_interface("lo")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return launch(trust_workers.trust_worker, 2, tmp_path_factory.mktemp("trust"))


def test_every_scenario_ran(outcomes):
    assert all(set(per_rank) == set(trust_workers.SCENARIOS) for per_rank in outcomes)


def test_same_secret_from_the_environment_runs_normally(outcomes):
    for rank in (0, 1):
        outcome = outcomes[rank]["same secret"]["outcome"]
        assert outcome.startswith("ok, diff"), outcome
        assert float(outcome.split()[-1]) <= TOL


def test_a_wrong_secret_fails_by_name_on_both_ranks(outcomes):
    for rank in (0, 1):
        outcome = outcomes[rank]["wrong secret"]["outcome"]
        assert outcome.startswith(f"PeerAuthenticationError: ASTRA rank {rank}/2: the shared-secret check failed"), outcome
        assert "rank 0 rejected ranks [1]" in outcome
        assert "nothing else was exchanged" in outcome
        assert outcomes[rank]["wrong secret"]["seconds"] < trust_workers.TIMEOUT_S  # not a timeout
    assert "rank 0's proof does not match" in outcomes[1]["wrong secret"]["outcome"]  # rank 1 cannot trust rank 0
    assert "rank 0's proof does not match" not in outcomes[0]["wrong secret"]["outcome"]


def test_a_missing_secret_fails_by_name_on_both_ranks(outcomes):
    for rank in (0, 1):
        outcome = outcomes[rank]["missing secret"]["outcome"]
        assert outcome.startswith(f"PeerAuthenticationError: ASTRA rank {rank}/2: ranks [0] hold a shared secret but ranks [1] do not")


def test_the_malicious_pickle_runs_a_command_when_unpickled(outcomes):
    # Positive control: what the example's all_gather_object used to do lets rank 1 run a command on rank 0.
    control = outcomes[0]["pickle control"]
    assert control["outcome"] == "ok" and control["unpickled"] >= 1 and control["marker"]


@pytest.mark.parametrize("scenario", ["pickle attack with secret", "pickle attack without secret"])
def test_a_pickle_sent_as_an_object_collective_is_refused_and_never_unpickled(outcomes, scenario):
    result = outcomes[0][scenario]
    assert result["outcome"].startswith("PeerAuthenticationError: ASTRA rank 0/2: ranks [1] sent no ASTRA start-up header")
    assert result["unpickled"] == 0 and not result["marker"]


def test_a_pickle_inside_the_secret_check_is_refused_and_never_unpickled(outcomes):
    result = outcomes[0]["pickle in the secret check"]
    assert result["outcome"].startswith("PeerAuthenticationError: ASTRA rank 0/2: the shared-secret check failed: rank 0 rejected ranks [1]")
    assert result["unpickled"] == 0 and not result["marker"]
    assert outcomes[1]["pickle in the secret check"]["outcome"] == "attacker got verdict [1, 0]"
