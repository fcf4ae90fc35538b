"""Issue 9 item 5: two machines, really — the documented `accelerate launch --num_machines 2` command in two
network namespaces joined by a veth pair, one process each, over the main machine's namespace address.

Each namespace has its own network stack (loopback and one interface named ``eth1``) and stands for one
machine: nothing but the veth link joins them. The command is the one docs/distributed.md gives under
"Several machines", with the test's address, port and small model settings. Both "machines" hold the
same shared secret (``ASTRA_SECRET``), so the trust check runs over the link too. Needs root and
iproute2 (``ip``); skipped with the reason otherwise. The namespaces are removed whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
TIMEOUT_S = 90
MAIN_ADDRESS, OTHER_ADDRESS, PORT = "10.99.0.1", "10.99.0.2", 29533  # private to the two namespaces
INTERFACE = "eth1"


def why_not_runnable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` on PATH"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def accelerate_command(machine_rank: int) -> list[str]:
    """`accelerate launch --multi_gpu --num_machines 2 --machine_rank R --num_processes 2 --main_process_ip IP
    --main_process_port P ... examples/distributed_inference.py --task gpt2 --cpu --interface eth1` (docs)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*launcher, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine_rank), "--num_processes", "2",
            "--main_process_ip", MAIN_ADDRESS, "--main_process_port", str(PORT), "--mixed_precision", "no",
            "--dynamo_backend", "no", str(REPO / "examples" / "distributed_inference.py"), "--task", "gpt2", "--cpu",
            "--interface", INTERFACE,
            # the test's small settings: the tiny random model, a short prompt, one timed forward
            "--random", "--tokens", "32", "--codebook-size", "256", "--repeats", "1", "--max-new-tokens", "3",
            "--timeout", "60"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.skipif(why_not_runnable() is not None, reason=why_not_runnable() or "")
def test_accelerate_launch_on_two_machines_in_network_namespaces(tmp_path):
    tag = uuid.uuid4().hex[:6]
    namespaces = [f"astra-mm-{tag}-{machine}" for machine in (0, 1)]
    veths = [f"amm{tag}{machine}" for machine in (0, 1)]
    processes: list[subprocess.Popen] = []
    try:
        for name in namespaces:
            ip("netns", "add", name)
        ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for name, veth, address in zip(namespaces, veths, (MAIN_ADDRESS, OTHER_ADDRESS)):
            ip("link", "set", veth, "netns", name)
            ip("-n", name, "link", "set", veth, "name", INTERFACE)
            ip("-n", name, "addr", "add", f"{address}/24", "dev", INTERFACE)
            ip("-n", name, "link", "set", INTERFACE, "up")
            ip("-n", name, "link", "set", "lo", "up")
        env = {name: value for name, value in os.environ.items() if name not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
        env.update(OMP_NUM_THREADS="1", ASTRA_SECRET=f"test secret {tag}")  # the interface comes from --interface
        result_path = tmp_path / "result.json"
        for machine, name in enumerate(namespaces):
            command = accelerate_command(machine) + (["--json", str(result_path)] if machine == 0 else [])
            processes.append(subprocess.Popen(["ip", "netns", "exec", name, *command], cwd=tmp_path, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in processes]
        for machine, (process, output) in enumerate(zip(processes, outputs)):
            assert process.returncode == 0, f"machine {machine} failed:\n{output[-4000:]}"
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for name in namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", veths[0]], capture_output=True)  # only if it never moved

    result = json.loads(result_path.read_text())
    assert result["N"] == 2 and result["backend"] == "gloo"
    assert result["prediction"]["matches_simulation"], result["prediction"]
    assert result["max_abs_diff_vs_simulation"] <= TOL
    assert result["code_bytes_sent_per_rank"] == result["expected_code_bytes"]
    assert result["code_bytes_sent_per_rank"][0] > 0
    assert f"gloo/NCCL use interface {INTERFACE} ({MAIN_ADDRESS})" in outputs[0]
    assert f"gloo/NCCL use interface {INTERFACE} ({OTHER_ADDRESS})" in outputs[1]
    for name in namespaces:
        assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
