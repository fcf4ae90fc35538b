"""Distributed generation: a parallel prefill, then transformers' own ``generate`` on the last rank.

``DistributedRuntime.generate(input_ids, attention_mask=None, **generate_kwargs)`` calls `generate` here.

1. Prefill, every rank: the runtime's forward over the whole prompt, each rank on its own shard, codes on
   the wire (`DistributedRuntime.forward`). The last rank keeps its KV cache as ASTRA leaves it: its own
   shard exact, the earlier shards decoded from the codes it received; every token but the prompt's
   last (left out as the cache is filled: a crop afterwards cannot undo a sliding-window layer).
2. Decode, last rank only: ``model.generate(input_ids, attention_mask, cache=<that cache, one token
   short>, **generate_kwargs)``. transformers' generate slices the prompt by the cache length, so its
   first forward recomputes the prompt's last token alone: one token, attending to the cache and to its
   own exact key. That is the same attention the last token had in the prefill (the last token is
   always in the last shard: own shard exact, earlier shards decoded), so the first new token comes from
   the same logits (up to float rounding) as in the simulation's ``model.generate``; every later step is
   ordinary cached decoding in both. Everything else is transformers' own code: logits processors,
   sampling, beam search, stopping criteria, streamers, eos/pad handling, ``GenerationConfig``. For
   ``num_beams`` / ``num_return_sequences`` > 1 the cache is repeated per row first: generate repeats
   the prompt, not a cache it is given.
3. Broadcast from the last rank: a fixed header of ``HEADER_FIELDS`` int64 values (status, rows, new
   tokens, output kind, error-message length, timings), then the new token ids (int64), or the error's
   UTF-8 text when the last rank's generate raised, which every other rank then raises too. No pickled
   objects. Every rank returns the same ids.

Why leave one token out and recompute it rather than hand generate the prefill's logits: generate always runs a forward on
at least one uncached token before it samples (there is no public way to give it first-step logits), and
a logits processor that overwrote the first step's scores would run that forward anyway and bypass the
model's own output. Recomputing one token costs one single-token forward on the last rank, a decode step.

``generate_kwargs`` are used on the last rank only (other ranks ignore them): a streamer streams there,
a seed set with ``torch.manual_seed`` before the call draws there. ``runtime.generation_stats`` holds
`GenerationStats` of the latest call, the same on every rank (measured on the last rank).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation import GenerateDecoderOnlyOutput

if TYPE_CHECKING:
    from .distributed import DistributedRuntime

# Inputs the runtime owns: it prefills from input_ids/attention_mask, derives the positions as
# `model.generate` does, and supplies the cache.
REFUSED_INPUTS = {
    "inputs": "pass the prompt as input_ids",
    "inputs_embeds": "the parallel prefill embeds input_ids on each rank",
    "position_ids": "they are derived from attention_mask, as model.generate does",
    "past_key_values": "the runtime supplies the cache the parallel prefill left on the last rank",
    "cache": "the runtime supplies the cache the parallel prefill left on the last rank",
}
# The fixed broadcast header: int64 values in this order.
HEADER = ("status", "rows", "new_tokens", "as_dict", "message_bytes", "prefill_ns", "first_token_ns", "decode_ns", "decode_steps")
HEADER_FIELDS = len(HEADER)
# Status codes: how the last rank's generate ended, so that every rank raises the same kind of error.
OK, VALUE_ERROR, TYPE_ERROR, OTHER_ERROR = 0, 1, 2, 3
ERRORS = {VALUE_ERROR: ValueError, TYPE_ERROR: TypeError, OTHER_ERROR: RuntimeError}
MAX_MESSAGE_BYTES = 4096


@dataclass
class GenerationStats:
    """Timings of one `DistributedRuntime.generate` call, measured on the last rank from the call's start.

    ``new_tokens``: positions generated per sequence (the returned length minus the prompt's).
    ``prefill_s``: the parallel prefill (input check, every layer's code exchange, the cache kept).
    ``time_to_first_token_s``: until the first new token exists on the last rank (prefill, then
    generate's first step). ``decode_tokens_per_s``: decoding steps after the first token, per second
    (per sequence: a batch of B makes B tokens a step); None with fewer than two steps.
    """

    new_tokens: int
    prefill_s: float
    time_to_first_token_s: float | None
    decode_tokens_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepTimes(StoppingCriteria):
    """Never stops generation; records when each decoding step has produced its tokens.

    A stopping criterion, so that every decoding method (greedy, sampling, beam search) calls it once a
    step, after the step's tokens are appended.
    """

    def __init__(self):
        self.times: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter_ns())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache of a model output: ``cache`` in recent transformers, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def check_generate_inputs(model: nn.Module, input_ids, attention_mask, generate_kwargs: dict[str, Any]) -> None:
    """ValueError naming what `generate` cannot take (the same on every rank, before any exchange)."""
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids (int64), got {_describe(input_ids)}")
    if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {_describe(attention_mask)}")
    for name, reason in REFUSED_INPUTS.items():
        if generate_kwargs.get(name) is not None:
            raise ValueError(f"DistributedRuntime.generate does not take {name}: {reason}")
    if setting("use_cache", generate_kwargs, model) is False:
        raise ValueError("DistributedRuntime.generate needs use_cache=True: decoding continues from the prefill's KV cache")
    if (chunk := setting("prefill_chunk_size", generate_kwargs, model)) is not None:
        raise ValueError(
            f"DistributedRuntime.generate does not take prefill_chunk_size={chunk!r}: the prompt is prefilled in "
            "parallel over the ranks instead"
        )


def setting(name: str, generate_kwargs: dict[str, Any], model: nn.Module | None):
    """A generation setting as generate resolves it: keyword, else the GenerationConfig passed, else the model's."""
    sources = [generate_kwargs, generate_kwargs.get("generation_config")]
    sources.append(getattr(model, "generation_config", None))
    for source in sources:
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if value is not None:
            return value
    return None


@torch.no_grad()
def generate(runtime: "DistributedRuntime", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
    """Parallel prefill, transformers' ``generate`` on the last rank, the new ids on every rank (module docstring).

    Returns what ``model.generate`` returns: the ids (prompt then new tokens), or with
    ``return_dict_in_generate=True`` the last rank's full generate output and, on the other ranks, a
    ``GenerateDecoderOnlyOutput`` holding ``sequences`` only (scores and logits exist on the last rank).
    """
    if not runtime.causal:
        raise ValueError("generate needs a causal language model (GPT2, Llama family), not a vision model")
    check_generate_inputs(runtime.model, input_ids, attention_mask, generate_kwargs)
    runtime.generation_stats = None  # until this call's tokens are here
    started = time.perf_counter_ns()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Position ids as `model.generate` derives them from the padding mask.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    prefill_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if "logits_to_keep" in inspect.signature(runtime.model.forward).parameters:
        prefill_inputs["logits_to_keep"] = 1  # only the KV cache of the prefill is used
    runtime._keep_cache = runtime.is_last
    try:
        output = runtime.forward(**prefill_inputs)
    finally:
        runtime._keep_cache = False
    prefill_ns = time.perf_counter_ns() - started
    if not runtime.is_last:
        return _receive_result(runtime, input_ids)
    try:
        # Prompt plus new tokens within the model's positions: raised here, it reaches every rank below.
        runtime.adapter.check_sequence_length(runtime.model, total_length(runtime.model, input_ids.shape[1], generate_kwargs))
        result, steps = _generate_on_last_rank(runtime, output, input_ids, attention_mask, generate_kwargs)
    except Exception as error:
        _send_error(runtime, error)
        raise
    sequences = result.sequences if not torch.is_tensor(result) else result
    header = _header(OK, sequences, input_ids.shape[1], not torch.is_tensor(result), prefill_ns, started, steps)
    _broadcast_from_last(runtime, header, "the generated tokens' header")
    new_tokens = sequences[:, input_ids.shape[1] :].contiguous()
    if new_tokens.numel():
        _broadcast_from_last(runtime, new_tokens.to(torch.long), "the generated tokens")
    runtime.generation_stats = _stats(header)
    return result


def total_length(model: nn.Module, prompt_length: int, generate_kwargs: dict[str, Any]) -> int:
    """The longest sequence generate may make: prompt plus ``max_new_tokens``, else ``max_length``, as generate resolves them."""
    max_new_tokens = setting("max_new_tokens", generate_kwargs, model)
    if max_new_tokens is not None:
        return prompt_length + int(max_new_tokens)
    return max(prompt_length, int(setting("max_length", generate_kwargs, model) or prompt_length))


def _generate_on_last_rank(runtime, output, input_ids, attention_mask, generate_kwargs):
    """transformers' generate, continuing from the prefill's cache, which lacks the prompt's last token (module docstring)."""
    model = runtime.model
    cache = output_cache(output)
    # generate repeats input_ids and the mask for beams / several return sequences, but not a cache it is given.
    expand = max(setting("num_beams", generate_kwargs, model) or 1, setting("num_return_sequences", generate_kwargs, model) or 1)
    if expand > 1:
        cache.batch_repeat_interleave(expand)
    timer = StepTimes()
    stopping = StoppingCriteriaList([*(generate_kwargs.pop("stopping_criteria", None) or []), timer])
    result = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stopping,
        **{cache_argument(model): cache}, **generate_kwargs,
    )
    return result, timer.times


def _header(status, sequences, prompt_length, as_dict, prefill_ns, started, steps) -> torch.Tensor:
    values = dict.fromkeys(HEADER, 0)
    values.update(status=status, prefill_ns=prefill_ns)
    if sequences is not None:
        values.update(rows=sequences.shape[0], new_tokens=sequences.shape[1] - prompt_length, as_dict=int(as_dict))
    if steps:
        values.update(first_token_ns=steps[0] - started, decode_ns=steps[-1] - steps[0], decode_steps=len(steps) - 1)
    return torch.tensor([values[name] for name in HEADER], dtype=torch.long)


def _stats(header: torch.Tensor) -> GenerationStats:
    values = dict(zip(HEADER, header.tolist()))
    decode_s = values["decode_ns"] / 1e9
    return GenerationStats(
        new_tokens=values["new_tokens"],
        prefill_s=values["prefill_ns"] / 1e9,
        time_to_first_token_s=values["first_token_ns"] / 1e9 if values["first_token_ns"] else None,
        decode_tokens_per_s=values["decode_steps"] / decode_s if values["decode_steps"] and decode_s > 0 else None,
    )


def _send_error(runtime, error: Exception) -> None:
    """Tell the other ranks (waiting for the tokens) that generate failed here, with its message."""
    status = VALUE_ERROR if isinstance(error, ValueError) else TYPE_ERROR if isinstance(error, TypeError) else OTHER_ERROR
    message = f"{type(error).__name__}: {error}".encode()[:MAX_MESSAGE_BYTES]
    header = _header(status, None, 0, False, 0, 0, [])
    header[HEADER.index("message_bytes")] = len(message)
    _broadcast_from_last(runtime, header, "the generated tokens' header")
    if message:
        _broadcast_from_last(runtime, torch.frombuffer(bytearray(message), dtype=torch.uint8), "the error message")


def _receive_result(runtime, input_ids: torch.Tensor):
    header = _broadcast_from_last(runtime, torch.zeros(HEADER_FIELDS, dtype=torch.long), "the generated tokens' header")
    values = dict(zip(HEADER, header.tolist()))
    if values["status"] != OK:
        message = b""
        if values["message_bytes"]:
            message = _broadcast_from_last(runtime, torch.zeros(values["message_bytes"], dtype=torch.uint8), "the error message")
            message = bytes(message.tolist())
        raise ERRORS.get(values["status"], RuntimeError)(
            f"ASTRA rank {runtime.rank}/{runtime.world_size}: generate failed on the last rank: {message.decode(errors='replace')}"
        )
    new_tokens = torch.zeros(values["rows"], values["new_tokens"], dtype=torch.long)
    if new_tokens.numel():
        new_tokens = _broadcast_from_last(runtime, new_tokens, "the generated tokens")
    prompt = input_ids.repeat_interleave(values["rows"] // input_ids.shape[0], dim=0)
    sequences = torch.cat([prompt, new_tokens.to(input_ids.device)], dim=1)
    runtime.generation_stats = _stats(header)
    return GenerateDecoderOnlyOutput(sequences=sequences) if values["as_dict"] else sequences


def _broadcast_from_last(runtime, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` of the last rank on every rank (the others pass a buffer of the same shape and dtype)."""
    buffer = tensor.to(runtime.comm_device).contiguous()
    source = dist.get_global_rank(runtime.group, runtime.world_size - 1)
    work = dist.broadcast(buffer, src=source, group=runtime.group, async_op=True)
    runtime.wait(work, f"receiving {what} from the last rank")
    size = buffer.numel() * buffer.element_size()
    runtime._count("control", (runtime.world_size - 1) * size if runtime.is_last else 0, 0 if runtime.is_last else size)
    return buffer.to(tensor.device)


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
