"""The latency benchmark's methods compute what they should (gloo ranks on loopback)."""

import pytest
import torch
from conftest import LLAMA_FAMILIES, tiny_llama

import transformers_astra as astra
from benchmarks.baselines.tensor_parallel import TensorParallel
from benchmarks.methods import loopback_outputs, make_method
from benchmarks.workloads import Workload, build

WORKLOADS = ("gpt2", "vit", "llama")
# The tests' own Llama-family models (6 query heads sharing 2 K/V heads): llama with dynamic RoPE (its
# frequencies depend on the whole sequence's length), qwen2's biases and sliding window, qwen3's k_norm,
# mistral's sliding window. Baselines only: the ASTRA rows of these families are test_llama's.
FAMILY_WORKLOADS = tuple(f"tiny-{family}" for family in LLAMA_FAMILIES)
FAMILY_TOKENS = 21  # uneven shards at world size 2 (11 + 10), longer than every tiny sliding window
# (method, world size); the small ViT's 17 tokens make uneven shards (9 + 8) at world size 2.
CASES = [("tp", 2), ("sp-fp32", 2), ("sp-fp16", 2), ("astra", 2)]
TOLERANCE = {"tp": 1e-5, "sp-fp32": 1e-5, "sp-fp16": 5e-3, "astra": 1e-4}


def build_for_test(name: str, small: bool = True) -> Workload:
    """The benchmark's small workloads, and the tiny Llama-family models of ``FAMILY_WORKLOADS``."""
    if name not in FAMILY_WORKLOADS:
        return build(name, small=small)
    model = tiny_llama(name.removeprefix("tiny-"))[0]
    input_ids = torch.randint(3, model.config.vocab_size, (1, FAMILY_TOKENS), generator=torch.Generator().manual_seed(1))
    return Workload(name, model, {"input_ids": input_ids}, FAMILY_TOKENS, causal=True)


def workloads_of(method: str) -> tuple[str, ...]:
    return WORKLOADS + (FAMILY_WORKLOADS if method != "astra" else ())


@pytest.fixture(scope="module")
def predictions():
    """{(workload, method, world): the one rank's prediction}, from one process group per world size."""
    found = {}
    for world in sorted({world for _, world in CASES}):
        cases = [(workload, method) for method, w in CASES if w == world for workload in workloads_of(method)]
        for (workload, method), outputs in loopback_outputs(cases, world, build_for_test).items():
            produced = [out for out in outputs if out is not None]
            assert len(produced) == 1, f"{method} on {workload}: exactly one rank makes the prediction"
            found[(workload, method, world)] = produced[0]
    return found


def single_device_prediction(workload: str) -> torch.Tensor:
    method = make_method("single")
    method.setup(build_for_test(workload), 0, 1)
    return method.forward()


@torch.inference_mode()
def simulated_astra_prediction(workload: str, world: int) -> torch.Tensor:
    """ASTRA's single-process simulation of ``world`` devices (what the distributed runtime must match)."""
    built = build(workload, small=True)
    astra.patch(built.model, astra.AstraConfig(num_devices=world, groups=32))
    logits = built.model(**built.inputs).logits
    return logits[:, -1] if built.causal else logits


@pytest.mark.parametrize(
    ("workload", "method", "world"), [(workload, method, world) for method, world in CASES for workload in workloads_of(method)]
)
def test_method_matches_its_reference(predictions, workload, method, world):
    """Baselines compute what one device computes; ASTRA what its simulation computes.

    For the Llama family, sp-fp32 is exact only if the other shards' keys are rebuilt with their
    senders' rotary positions (and Qwen3's k_norm): a projection alone leaves them unrotated.
    """
    tolerance = TOLERANCE[method]
    if method == "astra":
        expected = simulated_astra_prediction(workload, world)
    else:
        expected = single_device_prediction(workload)
    torch.testing.assert_close(predictions[(workload, method, world)], expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("workload", ["gpt2", "llama"])
def test_fp16_exchange_is_not_exact(predictions, workload):
    # The fp16 variant really rounds what it sends (the tolerance above would let an fp32 exchange pass too).
    assert not torch.equal(predictions[(workload, "sp-fp16", 2)], single_device_prediction(workload))


@pytest.mark.parametrize(
    ("field", "overrides"),
    [("num_key_value_heads", {"num_key_value_heads": 3}), ("num_attention_heads", {"num_attention_heads": 3, "num_key_value_heads": 3})],
)
def test_tensor_parallel_refuses_heads_that_do_not_split(field, overrides):
    """GQA: every rank needs whole K/V heads; 3 K/V heads (or 3 query heads) cannot split over 2 ranks."""
    model = tiny_llama("llama", **overrides)[0]
    workload = Workload("tiny-llama", model, {"input_ids": torch.tensor([[3, 4, 5]])}, 3, causal=True)
    with pytest.raises(ValueError, match=f"{field}=.*N=2"):
        TensorParallel().setup(workload, 0, 2)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="bogus"):
        make_method("bogus")
