"""`AstraNAQCallback`: ASTRA fine-tuning with any `transformers.Trainer` on a patched model.

    astra.patch(model, astra.AstraConfig(num_devices=4, groups=32))
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[astra.AstraNAQCallback()])
    trainer.train()

What it does:
- at train start, k-means codebooks (`astra.calibrate`) from a few training batches when they are not initialised;
- the NAQ lambda schedule: constant, or a linear warm-up to the config's ``noise_scale``;
- codebook usage, code perplexity and dead codes, logged through the Trainer's logs (TensorBoard, W&B, ...);
- dead-code reset: codewords unused over a logging window are re-seeded from recent inputs of that layer.

The commitment loss needs nothing here: a patched model adds it to ``outputs.loss`` in training mode.
Under data-parallel training (``accelerate launch``, torchrun) DDP all-reduces the codebook gradients; the
callback makes the other codebook changes (k-means, resets) on rank 0 and broadcasts them, so every rank
keeps the same codebooks.
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from .calibration import calibrate
from .patch import astra_state, quantizers, set_config

NOISE_SCHEDULES = ("constant", "warmup")
LOG_PREFIX = "astra/"


def set_noise_scale(model: nn.Module, value: float) -> None:
    """Change NAQ's lambda of a patched model (the config is replaced, never mutated: it is validated)."""
    set_config(model, astra_state(model).config.replace(noise_scale=float(value)))


class CodeUsage:
    """Per-layer code counts and a few recent input vectors, fed by forward hooks on the quantizers."""

    def __init__(self, quantizer_modules: list[nn.Module], reservoir_size: int):
        self.quantizers = quantizer_modules
        self.reservoir_size = reservoir_size
        self.counts = [torch.zeros(q.groups, q.codebook_size, device=q.codebook.device) for q in quantizer_modules]
        self.recent_inputs: list[torch.Tensor | None] = [None] * len(quantizer_modules)
        self.handles = [q.register_forward_hook(self._hook(i)) for i, q in enumerate(quantizer_modules)]

    def _hook(self, layer_idx: int):
        def hook(module, args, output):
            if not module.training:
                return
            codes = output[1].reshape(-1, module.groups)
            offsets = torch.arange(module.groups, device=codes.device) * module.codebook_size
            flat = (codes + offsets).flatten()
            self.counts[layer_idx] += torch.bincount(flat, minlength=module.groups * module.codebook_size).view(
                module.groups, module.codebook_size
            )
            vectors = args[0].detach().reshape(-1, module.width)
            if vectors.shape[0] > self.reservoir_size:
                vectors = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[: self.reservoir_size]]
            self.recent_inputs[layer_idx] = vectors.to(module.codebook.dtype)

        return hook

    def all_reduce(self) -> None:
        if _distributed():
            for counts in self.counts:
                dist.all_reduce(counts)

    def statistics(self) -> dict[str, float]:
        """Mean fraction of codewords used, mean code perplexity (per group), total dead codes."""
        usage, perplexity, dead = [], [], 0
        for counts in self.counts:
            if counts.sum() == 0:
                continue
            probabilities = counts / counts.sum(dim=1, keepdim=True)
            entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
            perplexity.append(entropy.exp().mean().item())
            used = counts > 0
            usage.append(used.float().mean().item())
            dead += int((~used).sum().item())
        if not usage:
            return {}
        return {
            "code_usage": sum(usage) / len(usage),
            "code_perplexity": sum(perplexity) / len(perplexity),
            "dead_codes": dead,
        }

    def reset_dead_codes(self, generator: torch.Generator) -> int:
        """Re-seed every unused codeword with a random recent input of its layer (rank 0's); returns how many."""
        reset = 0
        for counts, quantizer, recent in zip(self.counts, self.quantizers, self.recent_inputs):
            if recent is None or counts.sum() == 0:
                continue
            groups_of_recent = recent.reshape(-1, quantizer.groups, quantizer.group_width)
            with torch.no_grad():
                for group, dead in enumerate((counts == 0).unbind(0)):
                    dead_codes = dead.nonzero().flatten()
                    if dead_codes.numel() == 0:
                        continue
                    picks = torch.randint(groups_of_recent.shape[0], (dead_codes.numel(),), generator=generator)
                    quantizer.codebook[group, dead_codes] = groups_of_recent[picks.to(recent.device), group]
                    reset += dead_codes.numel()
        return reset

    def clear(self) -> None:
        for counts in self.counts:
            counts.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AstraNAQCallback(TrainerCallback):
    """Codebook initialisation, NAQ schedule, code statistics and dead-code reset for `transformers.Trainer`.

    Args:
        calibration_data: batches of model inputs for k-means; default: the first ``calibration_batches``
            batches of the Trainer's training dataloader.
        calibration_batches: how many training batches feed k-means when ``calibration_data`` is None.
        calibration_samples: at most this many vectors per layer enter k-means.
        noise_scale: NAQ's target lambda; None keeps the patched config's ``noise_scale``.
        noise_schedule: "constant", or "warmup" (lambda grows linearly from 0 over ``noise_warmup_ratio``
            of the training steps).
        noise_warmup_ratio: fraction of ``max_steps`` the warm-up lasts.
        reset_dead_codes: re-seed codewords unused over a logging window from recent inputs.
        reservoir_size: recent input vectors kept per layer for the reset.
        seed: seeds k-means and the reset draws (identical on every rank).
    """

    def __init__(
        self,
        calibration_data: Iterable[Any] | None = None,
        calibration_batches: int = 8,
        calibration_samples: int = 8192,
        noise_scale: float | None = None,
        noise_schedule: str = "constant",
        noise_warmup_ratio: float = 0.1,
        reset_dead_codes: bool = True,
        reservoir_size: int = 4096,
        seed: int = 0,
    ):
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {list(NOISE_SCHEDULES)}, got {noise_schedule!r}")
        if not 0 < noise_warmup_ratio <= 1:
            raise ValueError(f"noise_warmup_ratio must be in (0, 1], got {noise_warmup_ratio!r}")
        if noise_scale is not None and (not math.isfinite(noise_scale) or noise_scale < 0):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches!r}")
        self.calibration_data = calibration_data
        self.calibration_batches = calibration_batches
        self.calibration_samples = calibration_samples
        self.target_noise_scale = noise_scale
        self.noise_schedule = noise_schedule
        self.noise_warmup_ratio = noise_warmup_ratio
        self.reset_dead_codes = reset_dead_codes
        self.reservoir_size = reservoir_size
        self.seed = seed
        self.usage: CodeUsage | None = None
        self.codes_reset = 0
        self._model: nn.Module | None = None
        self._generator = torch.Generator().manual_seed(seed)

    # --- Trainer events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("AstraNAQCallback needs the Trainer's model")
        self._model = model
        if self.target_noise_scale is None:
            self.target_noise_scale = astra_state(model).config.noise_scale
        if not all(bool(q.initialized) for q in quantizers(model)):
            self._initialise_codebooks(model, train_dataloader)
        self._run_before_reporters()
        if self.usage is not None:
            self.usage.remove()
        self.usage = CodeUsage(quantizers(model), self.reservoir_size)
        self._apply_noise_schedule(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply_noise_schedule(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Called on every rank for every log (training and evaluation); act once per window of training steps.
        if self.usage is None or logs is None or not any(counts.sum() > 0 for counts in self.usage.counts):
            return
        self.usage.all_reduce()
        stats = self.usage.statistics()
        if self.reset_dead_codes and state.global_step < state.max_steps:
            self.codes_reset += self._reset_dead_codes()
        stats["codes_reset"] = self.codes_reset
        stats["noise_scale"] = astra_state(self._model).config.noise_scale
        self.usage.clear()
        entries = {LOG_PREFIX + key: value for key, value in stats.items()}
        logs.update(entries)
        # The Trainer stored a copy of ``logs`` in its history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        if self.usage is not None:
            self.usage.remove()
            self.usage = None

    # --- pieces ---------------------------------------------------------------------------------------

    def current_noise_scale(self, step: int, max_steps: int) -> float:
        """Lambda at ``step`` of ``max_steps`` under this callback's schedule."""
        target = self.target_noise_scale or 0.0
        if self.noise_schedule == "constant" or max_steps <= 0:
            return target
        warmup_steps = max(1, round(self.noise_warmup_ratio * max_steps))
        return target * min(1.0, step / warmup_steps)

    def _apply_noise_schedule(self, state) -> None:
        value = self.current_noise_scale(state.global_step, state.max_steps)
        if astra_state(self._model).config.noise_scale != value:
            set_noise_scale(self._model, value)

    def _initialise_codebooks(self, model: nn.Module, train_dataloader) -> None:
        data = self.calibration_data
        if data is None:
            if train_dataloader is None:
                raise ValueError("codebooks are not initialised and there is no calibration_data or train_dataloader")
            # Every rank draws its batches (a distributed dataloader may synchronise on iteration); rank 0 uses them.
            data = list(itertools.islice(train_dataloader, self.calibration_batches))
        if _rank() == 0:
            calibrate(model, data, max_samples=self.calibration_samples, seed=self.seed)
        _broadcast_codebooks(model)
        for quantizer in quantizers(model):
            quantizer.initialized.fill_(True)

    def _reset_dead_codes(self) -> int:
        reset = torch.zeros(1, device=self.usage.counts[0].device)
        if _rank() == 0:
            reset += self.usage.reset_dead_codes(self._generator)
        _broadcast_codebooks(self._model)
        if _distributed():
            dist.broadcast(reset, src=0)
        return int(reset.item())

    def _run_before_reporters(self) -> None:
        """Move this callback right after DefaultFlowCallback, so that the reporting callbacks (TensorBoard,
        W&B, the progress bar) see the statistics it adds to ``logs``.

        The Trainer appends user callbacks after its reporters and passes callbacks no handle on their list,
        so the list is found as the one object that refers to this callback and holds a DefaultFlowCallback.
        Moving an element earlier while the handler iterates over the list calls nobody twice nor skips anyone.
        """
        for referrer in gc.get_referrers(self):
            if isinstance(referrer, list) and any(isinstance(cb, DefaultFlowCallback) for cb in referrer):
                referrer.remove(self)
                flow = next(i for i, cb in enumerate(referrer) if isinstance(cb, DefaultFlowCallback))
                referrer.insert(flow + 1, self)
                return


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _broadcast_codebooks(model: nn.Module) -> None:
    """Rank 0's codebooks to every rank; a no-op in one process."""
    if not _distributed():
        return
    with torch.no_grad():
        for quantizer in quantizers(model):
            dist.broadcast(quantizer.codebook.data, src=0)
