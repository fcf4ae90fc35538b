"""What each rank of the distributed-generation test runs (imported by spawned processes, not a test module).

One launch of 2 processes runs every case through ``DistributedRuntime.generate`` and, on every rank,
the single-process simulation's ``model.generate`` with the same arguments (and the same seed), and
saves a result file per rank for the parent test to check.
"""

from __future__ import annotations

import contextlib
import io
import os

import torch
import torch.distributed as dist
from conftest import gpt2_batch
from distributed_workers import build_model, init
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GenerationConfig, PreTrainedTokenizerFast, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation import BaseStreamer

from transformers_astra.distributed import DistributedRuntime

PROMPT_LENGTH = 11  # the batch of `gpt2_batch(batch=2, length=11, left_pad=3)`: the second row is left-padded
STOP_AFTER = 3  # the custom stopping criterion's number of new tokens
SAMPLE_EOS_SEED = 7


class RecordingStreamer(BaseStreamer):
    """Every value generate puts, in order, and whether it ended."""

    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ended = True


class StopAfter(StoppingCriteria):
    """Stops every sequence once it has ``new`` tokens beyond the prompt."""

    def __init__(self, prompt_length: int, new: int):
        self.length = prompt_length + new

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's vocabulary ("w0" .. "w60"), built offline."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", pad_token="w0", eos_token="w2")


def cases(model, batch: dict) -> dict:
    """name -> (inputs, generate keyword arguments, seed); eos ids are picked from outputs so that they occur."""
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, PROMPT_LENGTH:]
    torch.manual_seed(SAMPLE_EOS_SEED)
    sampled = model.generate(**batch, max_new_tokens=8, do_sample=True)[:, PROMPT_LENGTH:]
    listed = {
        # The first row reaches eos at once and is padded; the second never does.
        "greedy-eos-pad": dict(max_new_tokens=6, do_sample=False, eos_token_id=int(greedy[0, 0]), pad_token_id=0),
        "greedy-eos-early-stop": dict(max_new_tokens=6, do_sample=False, eos_token_id=greedy[:, 0].tolist()),
        "greedy": dict(max_new_tokens=6, do_sample=False),
        "sample-top-k": dict(max_new_tokens=8, do_sample=True, top_k=10, temperature=0.7),
        "sample-top-p-penalty": dict(max_new_tokens=8, do_sample=True, top_p=0.9, repetition_penalty=1.3),
        # The rows reach an eos at different steps, before max_new_tokens.
        "sample-eos": dict(max_new_tokens=8, do_sample=True, eos_token_id=[int(sampled[0, 1]), int(sampled[1, 4])], pad_token_id=0),
        "sample-2-sequences": dict(max_new_tokens=5, do_sample=True, num_return_sequences=2),
        "beam-search": dict(max_new_tokens=5, num_beams=3, do_sample=False),
        "stopping-criteria": dict(max_new_tokens=8, stopping_criteria=StoppingCriteriaList([StopAfter(PROMPT_LENGTH, STOP_AFTER)])),
        "generation-config": dict(generation_config=GenerationConfig(max_new_tokens=5, do_sample=False, repetition_penalty=1.5)),
    }
    named = {name: (batch, kwargs, SAMPLE_EOS_SEED if name == "sample-eos" else 100 + i) for i, (name, kwargs) in enumerate(listed.items())}
    named["no-attention-mask"] = ({"input_ids": batch["input_ids"][:1]}, dict(max_new_tokens=4), 0)
    return named


def generation_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init(rank, world_size, port)
    results = {}
    for model_name, settings in (("hidden", {"quantize": "hidden"}), ("kv-uneven", {"quantize": "kv", "uneven": True})):
        model = build_model("gpt2", world_size, **settings)
        runtime = DistributedRuntime(model, timeout=30)
        batch = gpt2_batch(batch=2, length=PROMPT_LENGTH, left_pad=3)
        for name, (inputs, kwargs, seed) in cases(model, batch).items():
            torch.manual_seed(seed)  # every rank: only the last rank draws
            got = runtime.generate(**inputs, **kwargs)
            stats = runtime.generation_stats.to_dict()
            torch.manual_seed(seed)
            wanted = model.generate(**inputs, **kwargs)
            results[(model_name, name)] = {"got": got, "wanted": wanted, "stats": stats, "traffic": runtime.traffic.to_dict()}
        if model_name == "hidden":
            results.update(streamer_cases(runtime, model, batch))
            results.update(error_cases(runtime, batch))
        runtime.close()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def streamer_cases(runtime: DistributedRuntime, model, batch: dict) -> dict:
    """A recording streamer and transformers' TextStreamer, passed on every rank; only the last rank's streams."""
    results = {}
    prompt = {name: tensor[:1] for name, tensor in batch.items()}  # TextStreamer streams one sequence
    recorder = RecordingStreamer()
    got = runtime.generate(**prompt, max_new_tokens=5, streamer=recorder)
    wanted = model.generate(**prompt, max_new_tokens=5)
    results["recording-streamer"] = {"got": got, "wanted": wanted, "values": recorder.values, "ended": recorder.ended}
    tokenizer = word_tokenizer(model.config.vocab_size)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        got = runtime.generate(**prompt, max_new_tokens=5, streamer=TextStreamer(tokenizer, skip_prompt=True))
    results["text-streamer"] = {
        "got": got, "wanted": wanted, "printed": printed.getvalue(), "decoded": tokenizer.decode(got[0, PROMPT_LENGTH:]),
    }
    got = runtime.generate(**batch, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    results["dict-output"] = {
        "type": type(got).__name__, "sequences": got.sequences, "scores": got.scores,
        "wanted": model.generate(**batch, max_new_tokens=4, return_dict_in_generate=True, output_scores=True),
    }
    return results


def error_cases(runtime: DistributedRuntime, batch: dict) -> dict:
    """An argument transformers' generate refuses (on the last rank), one the runtime refuses (everywhere), and
    more new tokens than the model has positions for (checked on the last rank before its model.generate)."""
    results = {}
    failing = {
        "unknown-argument": {"not_a_generate_argument": 1},
        "position-ids": {"position_ids": batch["attention_mask"]},
        "too-long": {"max_new_tokens": runtime.model.config.n_positions},  # prompt + n_positions > n_positions
    }
    for name, kwargs in failing.items():
        try:
            runtime.generate(**batch, **{"max_new_tokens": 2, **kwargs})
            results[("error", name)] = "ok"
        except (ValueError, TypeError, RuntimeError) as error:
            results[("error", name)] = f"{type(error).__name__}: {error}"
    # After a failed call the runtime still works.
    results[("error", "after")] = runtime.generate(**batch, max_new_tokens=2)
    return results
