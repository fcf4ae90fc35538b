"""The latency benchmark's methods compute what they should (gloo ranks on loopback)."""

import pytest
import torch

import transformers_astra as astra
from benchmarks.methods import loopback_outputs, make_method
from benchmarks.workloads import build

WORKLOADS = ("gpt2", "vit")
# (method, world size); the small ViT's 17 tokens make uneven shards (9 + 8) at world size 2.
CASES = [("tp", 2), ("sp-fp32", 2), ("sp-fp16", 2), ("astra", 2)]
TOLERANCE = {"tp": 1e-5, "sp-fp32": 1e-5, "sp-fp16": 5e-3, "astra": 1e-4}


@pytest.fixture(scope="module")
def predictions():
    """{(workload, method, world): the one rank's prediction}, from one process group per world size."""
    found = {}
    for world in sorted({world for _, world in CASES}):
        cases = [(workload, method) for method, w in CASES if w == world for workload in WORKLOADS]
        for (workload, method), outputs in loopback_outputs(cases, world).items():
            produced = [out for out in outputs if out is not None]
            assert len(produced) == 1, f"{method} on {workload}: exactly one rank makes the prediction"
            found[(workload, method, world)] = produced[0]
    return found


def single_device_prediction(workload: str) -> torch.Tensor:
    method = make_method("single")
    method.setup(build(workload, small=True), 0, 1)
    return method.forward()


@torch.inference_mode()
def simulated_astra_prediction(workload: str, world: int) -> torch.Tensor:
    """ASTRA's single-process simulation of ``world`` devices (what the distributed runtime must match)."""
    built = build(workload, small=True)
    astra.patch(built.model, astra.AstraConfig(num_devices=world, groups=32))
    logits = built.model(**built.inputs).logits
    return logits[:, -1] if built.causal else logits


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize(("method", "world"), CASES)
def test_method_matches_its_reference(predictions, workload, method, world):
    """Baselines compute what one device computes; ASTRA what its simulation computes."""
    tolerance = TOLERANCE[method]
    if method == "astra":
        expected = simulated_astra_prediction(workload, world)
    else:
        expected = single_device_prediction(workload)
    torch.testing.assert_close(predictions[(workload, method, world)], expected, atol=tolerance, rtol=tolerance)


def test_fp16_exchange_is_not_exact(predictions):
    # The fp16 variant really rounds what it sends (the tolerance above would let an fp32 exchange pass too).
    assert not torch.equal(predictions[("gpt2", "sp-fp16", 2)], single_device_prediction("gpt2"))


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="bogus"):
        make_method("bogus")
