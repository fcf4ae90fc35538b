"""Distributed generation is transformers' ``generate``: one 2-process gloo launch runs every case
(`generation_workers`) against the single-process simulation's ``model.generate``; the rest runs in this
process (the cache hand-over to ``generate``, sampling in the simulation, argument checks).
"""

from __future__ import annotations

import distributed_workers as workers
import generation_workers as cases
import pytest
import torch
from conftest import gpt2_batch, make_pair, tiny_gpt2_config
from test_distributed import launch
from transformers import DynamicCache, GPT2LMHeadModel

import transformers_astra as astra
from transformers_astra.generation import (
    REFUSED_INPUTS,
    StepTimes,
    cache_argument,
    check_generate_inputs,
    output_cache,
)

PROMPT = cases.PROMPT_LENGTH
CASE_NAMES = ("greedy", "greedy-eos-pad", "greedy-eos-early-stop", "sample-top-k", "sample-top-p-penalty", "sample-eos",
              "sample-2-sequences", "beam-search", "stopping-criteria", "generation-config", "no-attention-mask")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(cases.generation_worker, 2, tmp_path_factory.mktemp("generation"))


@pytest.mark.parametrize("model_name", ["hidden", "kv-uneven"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_generate_equals_the_simulations_generate_on_every_rank(results, model_name, case):
    for rank, per_rank in enumerate(results):
        result = per_rank[(model_name, case)]
        assert torch.equal(result["got"], result["wanted"]), (rank, result["got"], result["wanted"])
    assert torch.equal(results[0][(model_name, case)]["got"], results[1][(model_name, case)]["got"])


def test_the_cases_exercise_what_they_name(results):
    run = {name: results[1][("hidden", name)]["got"] for name in CASE_NAMES}
    assert run["greedy"].shape == (2, PROMPT + 6)
    assert torch.equal(run["greedy"][1, :3], torch.zeros(3, dtype=torch.long))  # the left padding is kept
    # eos: a finished row is padded with pad_token_id; generation stops when every row has finished
    assert run["greedy-eos-pad"].shape == (2, PROMPT + 6)
    assert torch.all(run["greedy-eos-pad"][0, PROMPT + 1 :] == 0) and torch.all(run["greedy-eos-pad"][1, PROMPT:] != 0)
    assert run["greedy-eos-early-stop"].shape == (2, PROMPT + 1)
    sample_eos = run["sample-eos"][:, PROMPT:]
    assert sample_eos.shape[1] < 8 and (sample_eos[0] == 0).any() and sample_eos[1, -1] != 0
    # sampling draws: its tokens differ from greedy decoding's
    assert not torch.equal(run["sample-top-k"][:, : PROMPT + 6], run["greedy"])
    assert run["sample-2-sequences"].shape == (4, PROMPT + 5)
    assert run["stopping-criteria"].shape == (2, PROMPT + cases.STOP_AFTER)
    assert run["generation-config"].shape == (2, PROMPT + 5)
    assert run["no-attention-mask"].shape == (1, PROMPT + 4)


def test_generation_stats_are_measured_and_the_same_on_every_rank(results):
    for key in [key for key in results[1] if key[1] in CASE_NAMES]:
        stats = results[1][key]["stats"]
        assert stats == results[0][key]["stats"], key
        assert stats["new_tokens"] == results[1][key]["got"].shape[1] - PROMPT
        assert 0 < stats["prefill_s"] < stats["time_to_first_token_s"], key
        if stats["new_tokens"] > 1:
            assert stats["decode_tokens_per_s"] > 0, key
        else:  # one step: nothing decoded after the first token
            assert stats["decode_tokens_per_s"] is None, key


CALL_HEADER_BYTES = 10 * 8


def test_only_the_new_tokens_travel_after_the_prefill(results):
    # The last rank sends a 9 x int64 header and the new ids to the other rank, nothing else in generate;
    # before them, the prefill's call header (handshake.check_same_call): batch size, sequence length, layout
    # digest, check_inputs and 6 input digests, 10 x int64.
    for rank, per_rank in enumerate(results):
        traffic, got = per_rank[("hidden", "greedy")]["traffic"], per_rank[("hidden", "greedy")]["got"]
        tokens_bytes = 8 * got.shape[0] * (got.shape[1] - PROMPT)
        if rank == 1:
            assert traffic["sent"]["codes"] == 0 and traffic["sent"]["control"] == CALL_HEADER_BYTES + 9 * 8 + tokens_bytes
        else:
            assert traffic["received"]["control"] == CALL_HEADER_BYTES + 9 * 8 + tokens_bytes


def test_a_streamer_streams_on_the_last_rank_only(results):
    last, first = results[1]["recording-streamer"], results[0]["recording-streamer"]
    assert torch.equal(last["got"], last["wanted"]) and torch.equal(first["got"], last["got"])
    assert last["ended"] and torch.equal(last["values"][0], last["got"][:, :PROMPT])  # the prompt first
    streamed = torch.cat([value.reshape(-1) for value in last["values"][1:]])
    assert torch.equal(streamed, last["got"][0, PROMPT:])
    assert first["values"] == [] and not first["ended"]


def test_a_text_streamer_prints_the_new_text_on_the_last_rank(results):
    last, first = results[1]["text-streamer"], results[0]["text-streamer"]
    assert torch.equal(last["got"], last["wanted"])
    assert last["printed"].strip() == last["decoded"].strip() and len(last["decoded"].split()) == 5
    assert first["printed"] == ""


def test_return_dict_in_generate(results):
    last, first = results[1]["dict-output"], results[0]["dict-output"]
    wanted = last["wanted"]
    assert torch.equal(last["sequences"], wanted.sequences) and torch.equal(first["sequences"], wanted.sequences)
    assert len(last["scores"]) == 4 and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(last["scores"], wanted.scores))
    assert first["type"] == "GenerateDecoderOnlyOutput" and first["scores"] is None


def test_a_failing_generate_fails_on_every_rank_and_the_runtime_recovers(results):
    for rank in (0, 1):
        message = results[rank][("error", "unknown-argument")]
        assert message.startswith("ValueError") and "not_a_generate_argument" in message, (rank, message)
        assert results[rank][("error", "position-ids")].startswith("ValueError: DistributedRuntime.generate does not take position_ids")
        assert torch.equal(results[rank][("error", "after")], results[1][("error", "after")])
        # The prompt (11 tokens) plus 64 new ones exceed the model's 64 positions: named on every rank.
        too_long = results[rank][("error", "too-long")]
        assert too_long.startswith("ValueError") and "the sequence needs 75 positions but this gpt2 model has 64" in too_long, (rank, too_long)
    assert "generate failed on the last rank" in results[0][("error", "unknown-argument")]
    assert "generate failed on the last rank" in results[0][("error", "too-long")]


# ------------------------------------------------------------------------------------- one process
def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def test_generate_continues_from_a_cache_cropped_by_one_token():
    """The hand-over the runtime uses, in the simulation: prefill, crop one token, ``model.generate`` from there."""
    model = workers.build_model("gpt2", 2)
    batch = gpt2_batch(batch=2, length=11, left_pad=3)
    wanted = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        prefill = model(**batch, position_ids=positions_of(batch["attention_mask"]), use_cache=True, **{cache_argument(model): DynamicCache()})
    cache = output_cache(prefill)
    cache.crop(-1)
    assert cache.get_seq_length() == 10
    got = model.generate(**batch, max_new_tokens=6, do_sample=False, **{cache_argument(model): cache})
    assert torch.equal(got, wanted)


def test_sampling_through_the_patched_model():
    """The simulation's own generate samples: at full precision exactly as the unpatched model; quantized, from
    the mixed-precision logits of the patched forward."""
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    batch = gpt2_batch(batch=2, length=11, left_pad=3)
    settings = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9, return_dict_in_generate=True, output_logits=True)

    def sample(generating_model):
        torch.manual_seed(3)
        return generating_model.generate(**batch, **settings)

    wanted = sample(reference)
    with astra.full_precision(model):
        exact = sample(model)
    assert torch.equal(exact.sequences, wanted.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(exact.logits, wanted.logits))
    quantized = sample(model)
    assert torch.equal(sample(model).sequences, quantized.sequences)  # the seed fixes the draw
    with torch.no_grad():  # the simulation's forward (the last device's mixed view), positions as generate derives them
        mixed = model(**batch, position_ids=positions_of(batch["attention_mask"])).logits[:, -1]
    assert torch.allclose(quantized.logits[0], mixed, atol=1e-5)
    assert (quantized.logits[0] - wanted.logits[0]).abs().max() > 1e-3  # the codes change the distribution


def test_step_times_never_stop_generation():
    timer = StepTimes()
    done = timer(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 5))
    assert done.dtype == torch.bool and done.shape == (3,) and not done.any() and len(timer.times) == 1


@pytest.mark.parametrize("name", sorted(REFUSED_INPUTS))
def test_inputs_the_runtime_owns_are_refused(name):
    model = workers.build_model("gpt2", 2)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"does not take {name}"):
        check_generate_inputs(model, ids, None, {name: ids})


def test_bad_generate_inputs_are_named():
    model = workers.build_model("gpt2", 2)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids must be"):
        check_generate_inputs(model, ids.float(), None, {})
    with pytest.raises(ValueError, match="attention_mask must be"):
        check_generate_inputs(model, ids, torch.ones(1, 5), {})
    with pytest.raises(ValueError, match="use_cache=True"):
        check_generate_inputs(model, ids, None, {"use_cache": False})
    with pytest.raises(ValueError, match="prefill_chunk_size=4"):
        check_generate_inputs(model, ids, None, {"prefill_chunk_size": 4})
    check_generate_inputs(model, ids, None, {"max_new_tokens": 3, "do_sample": True})
