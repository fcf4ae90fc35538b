"""`AstraNAQCallback`: ASTRA fine-tuning with any `transformers.Trainer` on a patched model.

    astra.patch(model, astra.AstraConfig(num_devices=4, groups=32))
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[astra.AstraNAQCallback()])
    trainer.train()

What it does:
- at train start, k-means codebooks (`astra.calibrate`) from a few training batches when they are not initialised;
- the NAQ lambda schedule: constant, or a linear warm-up to the config's ``noise_scale``;
- codebook usage, code perplexity and dead codes, logged through the Trainer's logs (TensorBoard, W&B, ...);
- dead-code reset: codewords unused over a logging window are re-seeded from recent inputs of that layer;
- the model's N as the one it was fine-tuned at (``fine_tuned_num_devices`` in the saved quantization config,
  written at train start; `RandomShardsCallback`, which draws N per step, replaces it by the N it draws from).

Its state (the reset generator, the code counts of the current window, the reset total, the lambda target)
goes into every Trainer checkpoint (``trainer_state.json``, transformers' `ExportableState`), and a run
resumed with ``trainer.train(resume_from_checkpoint=...)`` continues exactly as the uninterrupted run.
``callback.attach(trainer)`` puts it ahead of the Trainer's reporting callbacks so that they see its statistics.

The commitment loss needs nothing here: a patched model adds it to ``outputs.loss`` in training mode.
Under data-parallel training (``accelerate launch``, torchrun) DDP all-reduces the codebook gradients; the
callback makes the other codebook changes (k-means, resets) on rank 0 and broadcasts them, so every rank
keeps the same codebooks.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import zlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from .calibration import calibrate
from .patch import astra_state, quantizers, record_fine_tuned_num_devices, set_config

NOISE_SCHEDULES = ("constant", "warmup")
LOG_PREFIX = "astra/"

logger = logging.getLogger(__name__)


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

    def export_counts(self) -> str | None:
        """The counts of the current window as text for a checkpoint (exact float32 bytes); None when empty."""
        if not any(counts.sum() > 0 for counts in self.counts):
            return None
        raw = torch.cat([counts.detach().float().flatten().cpu() for counts in self.counts]).numpy().tobytes()
        return _to_text(raw)

    def import_counts(self, text: str) -> None:
        """Restore what `export_counts` wrote (for the same quantizer shapes)."""
        flat = torch.frombuffer(bytearray(_from_text(text)), dtype=torch.float32)
        expected = sum(counts.numel() for counts in self.counts)
        if flat.numel() != expected:
            raise ValueError(
                f"the checkpoint's AstraNAQCallback code counts hold {flat.numel()} values but this model's "
                f"codebooks have {expected} codewords: resume with the model that was trained"
            )
        for counts, saved in zip(self.counts, flat.split([c.numel() for c in self.counts])):
            counts.copy_(saved.view_as(counts))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AstraNAQCallback(TrainerCallback, ExportableState):
    """Codebook initialisation, NAQ schedule, code statistics and dead-code reset for `transformers.Trainer`.

    Add it with ``callback.attach(trainer)`` (reporters such as TensorBoard and W&B then see the
    ``astra/*`` statistics) or ``Trainer(callbacks=[callback])`` (the statistics reach
    ``trainer.state.log_history`` only, as the Trainer runs its reporters before user callbacks).

    Resuming: the state saved in each checkpoint is restored at train start, whether or not
    ``TrainingArguments.restore_callback_states_from_checkpoint`` is set (leave it False: set, the Trainer
    replaces this object by a new one, built from `state`, at the end of its callback list). The lambda
    target comes from the checkpoint too, so a resumed warm-up still ends at the original target even
    when the model's config holds a mid-warm-up lambda.

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
        self._saved_counts: str | None = None  # from a checkpoint, loaded into `usage` at train start
        self._attached = False

    # --- checkpoint state (transformers' ExportableState) ----------------------------------------------

    def state(self) -> dict:
        """What a Trainer checkpoint records: constructor arguments (JSON) and the running state."""
        return {
            "args": {
                "calibration_batches": self.calibration_batches,
                "calibration_samples": self.calibration_samples,
                "noise_scale": self.target_noise_scale,
                "noise_schedule": self.noise_schedule,
                "noise_warmup_ratio": self.noise_warmup_ratio,
                "reset_dead_codes": self.reset_dead_codes,
                "reservoir_size": self.reservoir_size,
                "seed": self.seed,
            },
            "attributes": {
                "codes_reset": self.codes_reset,
                "generator_state": self.generator_state,
                "code_counts": self.code_counts,
            },
        }

    @property
    def generator_state(self) -> str:
        """The dead-code reset generator's state as text."""
        return _to_text(self._generator.get_state().numpy().tobytes())

    @generator_state.setter
    def generator_state(self, text: str) -> None:
        self._generator.set_state(torch.frombuffer(bytearray(_from_text(text)), dtype=torch.uint8))

    @property
    def code_counts(self) -> str | None:
        """Code counts of the current logging window as text (None when empty)."""
        if self.usage is not None:
            return self.usage.export_counts()
        return self._saved_counts

    @code_counts.setter
    def code_counts(self, text: str | None) -> None:
        self._saved_counts = text

    def _restore(self, state) -> None:
        """Take the running state a resumed Trainer loaded from its checkpoint (``state.stateful_callbacks``)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if len(saved) == 1 else None
        if saved is None:
            logger.warning(
                "Resuming at step %d without a single saved AstraNAQCallback state in the checkpoint: the dead-code "
                "reset draws, code counts and lambda target start afresh, so the run will not repeat the original.",
                state.global_step,
            )
            return
        if self.target_noise_scale is None:
            self.target_noise_scale = saved["args"].get("noise_scale")
        for name, value in saved["attributes"].items():
            setattr(self, name, value)

    def attach(self, trainer) -> "AstraNAQCallback":
        """Add this callback to ``trainer`` right after its DefaultFlowCallback (moving it if already there).

        The Trainer calls callbacks in list order and puts the reporting integrations (TensorBoard, W&B,
        the progress printer) before the ``callbacks=`` it was given; here the ``astra/*`` statistics this
        callback adds to the logs are in place before any reporter runs. Uses the Trainer's public
        `pop_callback` and its callback handler's list. Returns the callback.
        """
        trainer.pop_callback(self)
        callbacks = trainer.callback_handler.callbacks
        flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        callbacks.insert(flow + 1, self)
        self._attached = True
        return self

    # --- Trainer events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("AstraNAQCallback needs the Trainer's model")
        self._model = model
        # Written at the start, once: RandomShardsCallback records its draws after every step, whatever the order
        # of the callbacks, so it has the last word in an N-agnostic run.
        record_fine_tuned_num_devices(model, [astra_state(model).config.num_devices])
        if state.global_step > 0:  # resumed from a checkpoint
            self._restore(state)
        if self.target_noise_scale is None:
            self.target_noise_scale = astra_state(model).config.noise_scale
        if not all(bool(q.initialized) for q in quantizers(model)):
            self._initialise_codebooks(model, train_dataloader)
        if not self._attached and args.report_to and args.report_to not in ("none", ["none"]):
            logger.warning(
                "AstraNAQCallback was given to Trainer(callbacks=...), so the reporting callbacks %s run before it "
                "and miss its astra/* statistics (they still reach trainer.state.log_history). Add it with "
                "`AstraNAQCallback(...).attach(trainer)` instead.",
                args.report_to,
            )
        if self.usage is not None:
            self.usage.remove()
        self.usage = CodeUsage(quantizers(model), self.reservoir_size)
        if self._saved_counts is not None and _rank() == 0:  # rank 0 saved the whole group's counts (see below)
            self.usage.import_counts(self._saved_counts)
        self._saved_counts = None
        self._apply_noise_schedule(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply_noise_schedule(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._gather_counts_before_save(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._gather_counts_before_save(control)

    def _gather_counts_before_save(self, control) -> None:
        """A checkpoint follows (DefaultFlowCallback, called before us, decided): only rank 0 writes `state`,
        so the window's counts are summed onto rank 0 and cleared elsewhere. The next log's all-reduce gives
        the same totals as without the checkpoint."""
        if control.should_save and self.usage is not None and _distributed():
            self.usage.all_reduce()
            if _rank() != 0:
                self.usage.clear()

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
        error: ValueError | None = None
        if _rank() == 0:
            try:
                calibrate(model, data, max_samples=self.calibration_samples, seed=self.seed)
            except ValueError as caught:  # e.g. NaN activations: every rank stops, none waits for codebooks
                error = caught
        if _distributed():
            failed = torch.tensor([error is not None], dtype=torch.int32, device=quantizers(model)[0].codebook.device)
            dist.broadcast(failed, src=0)
            if failed.item() and error is None:
                raise ValueError("k-means on rank 0 failed (its error names the cause); no codebook was changed")
        if error is not None:
            raise error
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


def _to_text(raw: bytes) -> str:
    """Bytes as compressed base64 text: checkpoints keep callback state in JSON (no pickle)."""
    return base64.b64encode(zlib.compress(raw)).decode("ascii")


def _from_text(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))
