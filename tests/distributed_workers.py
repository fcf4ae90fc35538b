"""What each rank of the multi-process tests runs (imported by spawned processes, so not a test module).

Every worker builds the same tiny patched, calibrated model as the others (seeded), runs it through
`DistributedRuntime`, compares with the single-process simulation of the same model, and saves a result
file per rank for the parent test to check.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from conftest import LLAMA_FAMILIES, gpt2_batch, tiny_gpt2_config, tiny_llama, tiny_vit_config, vit_batch
from torch import nn
from transformers import GPT2LMHeadModel, ViTForImageClassification
from transformers.pytorch_utils import Conv1D

import transformers_astra as astra
from transformers_astra.distributed import DistributedRuntime
from transformers_astra.patch import astra_state

# (name, model family, AstraConfig overrides); "uneven" cases weight the shards 1 : 2 : ... : N, the others
# use shard_sizes="balanced" (causal families: uneven sizes from `balance`; ViT: even). Even shards, the
# default, are what the other distributed tests (generation, faults, the launchers) run.
CASES = [
    ("gpt2-hidden", "gpt2", {"quantize": "hidden"}),
    ("gpt2-kv-uneven", "gpt2", {"quantize": "kv", "uneven": True}),
    ("vit-hidden-padded", "vit", {"quantize": "hidden"}),
    ("vit-kv-uneven", "vit", {"quantize": "kv", "uneven": True}),
    # One class token (the recipe of ViT's one checkpoint for any N): rank 0 holds it and shares it after the last layer.
    ("vit-hidden-one-cls", "vit", {"quantize": "hidden", "distributed_cls": False}),
    # The Llama family (conftest.LLAMA_FEATURES): dynamic RoPE, biases and sliding windows, k_norm, GQA.
    ("llama-hidden", "llama", {"quantize": "hidden"}),
    ("qwen2-kv-uneven", "qwen2", {"quantize": "kv", "uneven": True}),
    ("qwen3-hidden-uneven", "qwen3", {"quantize": "hidden", "uneven": True}),
    ("mistral-kv", "mistral", {"quantize": "kv"}),
]
GENERATED_TOKENS = 4
# Cases that also raise mid-forward and run again (`error_then_again`): point-to-point and all_gather transfers.
ERROR_CASES = ("gpt2-hidden", "vit-hidden-padded")
PEER_DELAY_S = 0.5  # rank 0 reaches the failing layer this much later than the others


def build_model(family: str, num_devices: int, quantize: str = "hidden", uneven: bool = False, **overrides):
    torch.manual_seed(0)
    if family == "gpt2":
        model, calibration = GPT2LMHeadModel(tiny_gpt2_config()), gpt2_batch(batch=4, length=12, seed=1)
    elif family in LLAMA_FAMILIES:
        model, calibration = tiny_llama(family)[0], gpt2_batch(batch=4, length=12, seed=1)
    else:
        model, calibration = ViTForImageClassification(tiny_vit_config()), vit_batch(batch=4, seed=1)
    shard_sizes = list(range(1, num_devices + 1)) if uneven else "balanced"  # even shards: every other test
    settings = dict(num_devices=num_devices, groups=4, codebook_size=16, quantize=quantize, shard_sizes=shard_sizes)
    astra.patch(model.eval(), **{**settings, **overrides})
    astra.calibrate(model, [calibration], progress=False)
    return model


def is_causal(family: str) -> bool:
    return family != "vit"


def case_batch(family: str) -> dict:
    if is_causal(family):
        return gpt2_batch(batch=2, length=11, left_pad=3)  # 11 tokens: uneven for N = 2, 3, 4
    batch = vit_batch()
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, -3:] = 0  # the second image hides its last three patches
    return {**batch, "attention_mask": mask}


def init(rank: int, world_size: int, port: int, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def equivalence_worker(rank: int, world_size: int, port: int, out_dir: str, backend: str = "gloo", names=None) -> None:
    """For N = 2 .. world_size (a subgroup of the first N ranks each), every case, overlap on and off.

    ``backend="nccl"``: one GPU per rank, the model and inputs on it. ``names``: only these cases.
    """
    init(rank, world_size, port, backend)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    groups = {n: dist.new_group(list(range(n))) for n in range(2, world_size + 1)}
    results = {}
    for num_devices, group in groups.items():
        if rank >= num_devices:
            continue
        for name, family, settings in CASES:
            if names is not None and name not in names:
                continue
            model = build_model(family, num_devices, **settings).to(device)
            batch = {key: value.to(device) for key, value in case_batch(family).items()}
            with torch.no_grad():
                simulated = model(**batch).logits
                with astra.full_precision(model):
                    unquantized = model(**batch).logits
            for overlap in (True, False):
                # The overlapped runs also use the codeword-projection tables, the others decode and project.
                runtime = DistributedRuntime(model, group=group, overlap=overlap, projection_table=overlap, timeout=30)
                with ProjectionWatch(model) as watch:
                    got = runtime(**batch).logits
                result = {"diff": max_abs_diff(got, simulated, runtime, batch), "traffic": runtime.traffic.to_dict()}
                result["timings"] = runtime.timings.to_dict()  # before generate's prefill replaces them
                result["sent_before_projections"] = watch.early_layers()
                result["received_posted_before_layer"] = watch.posted_before_layer()
                result["backend"] = dist.get_backend(group)
                result["diff_to_full_precision"] = max_abs_diff(got, unquantized, runtime, batch)
                result["layout"], result["batch_size"] = runtime.layout.sizes, case_batch(family)["attention_mask"].shape[0]
                result["quantized_width"] = astra.quantizers(model)[0].width
                if is_causal(family) and overlap:
                    generated = runtime.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=GENERATED_TOKENS)
                    with torch.no_grad():
                        wanted = model.generate(**batch, max_new_tokens=GENERATED_TOKENS, do_sample=False)
                    result["generated"], result["wanted"] = generated.cpu(), wanted.cpu()
                runtime.close()
                results[(num_devices, name, overlap)] = result
            if name in ERROR_CASES:
                results[(num_devices, name, True)]["after_error"] = error_then_again(model, group, batch, simulated)
            if name == HELD_CASE:
                results[(num_devices, name, True)]["held"] = sender_held(model, group, batch, simulated)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def projections(module: nn.Module) -> list[nn.Module]:
    """An attention module's linear projections (GPT2's Conv1D, the others' Linear), Q/K/V first."""
    return [child for child in module.children() if isinstance(child, (nn.Linear, Conv1D))]


class ProjectionWatch:
    """Per layer: were its codes already in flight (`LayerState.transfer`) when its first projection ran?
    And had this rank posted the layer's receives (`transport.PostedAhead.posted_at`) before the attention
    module ran (before ASTRA's own pre-hook)?"""

    def __init__(self, model: nn.Module):
        self.first: dict[int, bool] = {}
        self.posted: dict[int, bool] = {}
        modules = astra_state(model).adapter.attention_modules(model)
        self.handles = [
            child.register_forward_pre_hook(self._seen(module._astra_layer)) for module in modules for child in projections(module)
        ]
        self.handles += [module.register_forward_pre_hook(self._reached(module._astra_layer), prepend=True) for module in modules]

    def _reached(self, layer):
        def hook(module, args):
            reached = time.monotonic()
            posted = getattr(layer.model_state.exchange, "posted", None)
            self.posted[layer.layer_idx] = posted is not None and posted.posted_at.get(layer.layer_idx, reached) < reached

        return hook

    def posted_before_layer(self) -> int:
        return sum(self.posted.values())

    def _seen(self, layer):
        def hook(child, args):
            self.first.setdefault(layer.layer_idx, layer.transfer is not None)

        return hook

    def early_layers(self) -> int:
        return sum(self.first.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class InjectedError(ValueError):
    pass


def error_then_again(model: nn.Module, group, batch: dict, simulated: torch.Tensor) -> dict:
    """Every rank raises in layer 1's first projection, with that layer's codes in flight (hidden mode,
    overlap), rank 0 reaching it PEER_DELAY_S later than the others; then the same runtime runs again.

    Records whether the transfer that was in flight had completed when the error reached the caller
    (the others' receives need rank 0's late codes), the error's notes, and the next call's diff.
    """
    rank = dist.get_rank(group)
    runtime = DistributedRuntime(model, group=group, timeout=30)
    state = astra_state(model)
    layers = [module._astra_layer for module in state.adapter.attention_modules(model)]
    second = state.adapter.attention_modules(model)[1]
    in_flight = []

    def fail(child, args):
        in_flight.append(layers[1].transfer)
        in_flight.append(getattr(state.exchange, "posted", None))
        raise InjectedError("injected")

    handles = [projections(second)[0].register_forward_pre_hook(fail)]
    if rank == 0:  # before ASTRA's own pre-hook, i.e. before this rank sends layer 1's codes
        handles.append(second.register_forward_pre_hook(lambda *_: time.sleep(PEER_DELAY_S), prepend=True))
    started = time.monotonic()
    try:
        runtime(**batch)
        outcome = {"message": "no error", "notes": []}
    except InjectedError as error:
        outcome = {"message": str(error), "notes": list(getattr(error, "__notes__", []))}
    finally:
        for handle in handles:
            handle.remove()
    outcome["seconds"] = time.monotonic() - started
    transfer, posted = in_flight
    outcome["posted_ahead"] = posted is not None
    outcome["completed_when_raised"] = all(finished(work) for work in works_of(transfer, posted))
    outcome["left_on_layers"] = [layer.transfer is not None for layer in layers]
    got = runtime(**batch).logits
    outcome["diff"] = max_abs_diff(got, simulated, runtime, batch)
    if runtime.causal and runtime.transport.posts_ahead:  # gloo: one rank leaves early, the others are not left waiting or misled
        last = dist.get_world_size(group) - 1
        outcome["source gives up"] = one_rank_raises(runtime, model, batch, simulated, 0, second, before_sending=True)
        outcome["last rank raises"] = one_rank_raises(runtime, model, batch, simulated, last, projections(second)[0])
    return outcome


def works_of(transfer, posted) -> list:
    """Every send and receive a transfer (and, posted ahead, its whole forward) started."""
    if posted is not None:
        return posted.works
    return transfer.works if hasattr(transfer, "works") else [transfer.work]


def one_rank_raises(runtime, model, batch, simulated, failing: int, module: nn.Module, before_sending: bool = False) -> dict:
    """Rank ``failing`` alone raises in ``module``'s pre-hook (``before_sending``: ahead of ASTRA's own, so before
    this layer's codes leave); the others go on. Records each rank's outcome, whether every send and receive of
    the forward had ended when the call returned or raised, and the next call's diff."""
    rank = dist.get_rank(runtime.group)
    state = astra_state(model)
    seen = []

    def remember(module, args):
        seen.append(state.exchange.posted)

    def fail(module, args):
        raise InjectedError("injected")

    first = state.adapter.attention_modules(model)[0]
    handles = [first.register_forward_pre_hook(remember)]
    if rank == failing:
        handles.append(module.register_forward_pre_hook(fail, prepend=before_sending))
    dist.barrier(runtime.group)
    try:
        runtime(**batch)
        outcome = {"message": "ok", "notes": []}
    except (InjectedError, RuntimeError) as error:
        outcome = {"message": f"{type(error).__name__}: {error}", "notes": list(getattr(error, "__notes__", []))}
    finally:
        for handle in handles:
            handle.remove()
    [posted] = seen
    outcome["all_ended"] = all(finished(work) for work in posted.works)
    outcome["diff"] = max_abs_diff(runtime(**batch).logits, simulated, runtime, batch)
    return outcome


HELD_CASE = "gpt2-hidden"
HELD_SLEEP_S = 0.5  # the last rank sleeps this long before each layer
LATE_LAYER = 1  # in `sender_held`'s late-source run, rank 0 sleeps HELD_SLEEP_S before this layer only


def sender_held(model: nn.Module, group, batch: dict, simulated: torch.Tensor) -> dict:
    """The last rank sleeps HELD_SLEEP_S before each attention layer; every rank times its forward, overlap on
    (receives posted ahead, sends waited for at the end) and off (each layer waits for its sends), and keeps
    the runtime's own timings. Then, overlap on, rank 0 alone sleeps before layer LATE_LAYER, before its
    codes leave: the "late source" run, whose receivers wait for them at that layer."""
    rank, last = dist.get_rank(group), dist.get_world_size(group) - 1
    modules = astra_state(model).adapter.attention_modules(model)
    outcome = {"sleeps_s": HELD_SLEEP_S * len(modules) if rank == last else 0.0}
    for overlap in (True, False):
        runtime = DistributedRuntime(model, group=group, overlap=overlap, timeout=30)
        sleepers = modules if rank == last else []
        seconds, got = timed_forward(runtime, batch, sleepers)
        outcome[overlap] = {"seconds": seconds, "diff": max_abs_diff(got.logits, simulated, runtime, batch),
                            "timings": runtime.timings.to_dict()}  # fmt: skip
    runtime = DistributedRuntime(model, group=group, timeout=30)
    timed_forward(runtime, batch, [modules[LATE_LAYER]] if rank == 0 else [])
    outcome["late_source"] = runtime.timings.to_dict()
    return outcome


def timed_forward(runtime: DistributedRuntime, batch: dict, sleepers: list[nn.Module]):
    """Seconds of one forward after a barrier, this rank sleeping HELD_SLEEP_S before each of ``sleepers``; its output."""
    handles = [m.register_forward_pre_hook(lambda *_: time.sleep(HELD_SLEEP_S), prepend=True) for m in sleepers]
    dist.barrier(runtime.group)
    started = time.monotonic()
    try:
        output = runtime(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return time.monotonic() - started, output


def finished(work) -> bool:
    """Whether an async collective has ended. A gloo collective marks its future done a moment before the
    work itself (which `liveness.wait` waits on), so ask the future where there is one (send/recv have none)."""
    try:
        return work.get_future().done()
    except RuntimeError:
        return work.is_completed()


def max_abs_diff(got: torch.Tensor, simulated: torch.Tensor, runtime: DistributedRuntime, batch: dict) -> float:
    """Causal LMs: this rank's positions of the simulation, real tokens only. ViT: the pooled logits."""
    if not runtime.causal:
        return (got - simulated).abs().max().item()
    start, end = runtime.layout.bounds(runtime.rank)
    valid = batch["attention_mask"][:, start:end].bool()
    if not valid.any():
        return 0.0
    return (got - simulated[:, start:end])[valid].abs().max().item()


def fault_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Bad set-ups and failing ranks, in order; each outcome is recorded as the error text (or "ok")."""
    init(rank, world_size, port)
    timeout = 2.0
    main, stalled, dying = (dist.new_group(list(range(world_size)), timeout=timedelta(seconds=30)) for _ in range(3))
    outcomes = {}

    def attempt(name, action):
        started = time.monotonic()
        try:
            action()
            outcomes[name] = ("ok", time.monotonic() - started)
        except (ValueError, RuntimeError) as error:
            outcomes[name] = (f"{type(error).__name__}: {error}", time.monotonic() - started)

    def runtime_of(model, group):
        dist.barrier()  # start the handshake together: model building must not eat into the short timeout
        return DistributedRuntime(model, group=group, timeout=timeout)

    batch = gpt2_batch(batch=1, length=8)
    attempt("world size", lambda: runtime_of(build_model("gpt2", 3), main))
    attempt("config", lambda: runtime_of(build_model("gpt2", 2, groups=4 if rank == 0 else 8), main))

    def different_codebook():
        model = build_model("gpt2", 2)
        if rank == 1:
            with torch.no_grad():
                astra.quantizers(model)[1].codebook[0, 0, 0] += 1e-3
        runtime_of(model, main)

    attempt("codebooks", different_codebook)

    def different_inputs():
        runtime = runtime_of(build_model("gpt2", 2), main)
        runtime(**(batch if rank == 0 else gpt2_batch(batch=1, length=8, seed=5)))

    attempt("inputs", different_inputs)

    def busy_rank():
        runtime = runtime_of(build_model("gpt2", 2), stalled)
        if rank == 1:
            time.sleep(2 * timeout)  # busy for longer than the timeout, then joins: not a failure
        runtime(**batch)

    attempt("busy", busy_rank)  # a frozen rank: tests/test_runtime_faults.py

    def dead_rank():
        runtime = runtime_of(build_model("gpt2", 2), dying)
        if rank == 1:
            torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(3)  # dies between the handshake and the forward
        runtime(**batch)

    attempt("dead", dead_rank)
    torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)
