"""`run_latency --loaded-baseline` end to end: the host load runs in the benchmark's own network namespaces, on
other ranks' cores, while the one device is timed, and stops before the method's run."""

import os

import pytest
from test_multi_machine import why_not_runnable

from benchmarks import netns
from benchmarks.run_latency import HostLoad, Ranks, Variant, measure_row


@pytest.mark.slow
@pytest.mark.skipif(why_not_runnable() is not None, reason=why_not_runnable() or "")
def test_the_one_device_is_timed_alone_and_with_the_loads_running_and_the_loads_stop_before_the_method():
    with netns.Topology(3), Ranks(Variant("single"), "gpt2", 1, 1, 29641, tokens=12) as method, \
            Ranks(Variant("single"), "gpt2", 1, 1, 29642, tokens=12) as single, \
            HostLoad("gpt2", 3, 1, 29650, 0, 12) as load:  # fmt: skip
        assert load.tokens == 4  # a rank's share: 12 tokens over 3
        cores = [r.ready[0]["cores"] for r in load.loads]
        assert cores == [[1 % os.cpu_count()], [2 % os.cpu_count()]]  # ranks 1 and 2's cores (wrapped on a small machine)
        merged = measure_row(method, "compute", None, runs=2, budget_s=60, predicted_s=None, single=single, load=load)
        assert len(merged["times"]) == len(merged["single_times"]) == len(merged["single_loaded_times"]) == 2
        assert merged["load_tokens"] == 4 and len(merged["load_forward_s"]) >= 2 * 2  # each load, each run: >= 1 forward
        assert all(0 < t < 30 for t in merged["load_forward_s"] + merged["single_loaded_times"])
        # Stopped: a load answers an ordinary run again (it would not while still looping forwards).
        assert len(load.loads[0].run("compute", None, 0, 1)[0]["times"]) == 1
