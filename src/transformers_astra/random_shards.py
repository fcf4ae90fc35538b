"""N-agnostic fine-tuning: a new number of devices and new shard boundaries for every training step.

ASTRA's paper retrains when the number of devices changes. The codebooks and weights do not depend on N;
only the shard layout (which tokens are local, which arrive as codes) does. Fine-tuning with N and the
boundaries drawn afresh every optimizer step teaches one checkpoint every layout:

    astra.patch(model, astra.AstraConfig(num_devices=4, groups=32))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[RandomShardsCallback(num_devices=(2, 3, 4, 6, 8))])
    astra.AstraNAQCallback().attach(trainer)

Between steps (evaluation, saving) and after training the model has its own config back, and records the N
drawn from as the ones it was fine-tuned at (``fine_tuned_num_devices`` of its saved quantization config, which
`astra.from_pretrained` reads: loading at one of them does not warn).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from .patch import astra_state, record_fine_tuned_num_devices, set_config


def set_shards(model: nn.Module, num_devices: int, shard_sizes: Sequence[float] | str | None = None) -> None:
    """Change the number of devices and the shard sizes of a patched model (the config is replaced, validated).

    ``shard_sizes``: as `AstraConfig.shard_sizes` (None: even, "balanced", or one size per device).
    """
    sizes = shard_sizes if shard_sizes is None or isinstance(shard_sizes, str) else list(shard_sizes)
    set_config(model, astra_state(model).config.replace(num_devices=int(num_devices), shard_sizes=sizes))


class RandomShardsCallback(TrainerCallback):
    """Draws N from ``num_devices`` and, with probability ``uneven_probability``, uneven shard sizes, per step.

    After every step (and at train end) the model gets its own config back and records ``num_devices`` (sorted,
    without repeats) as the device counts it was fine-tuned at (`patch.fine_tuned_num_devices`).

    Args:
        num_devices: the device counts to draw from (uniformly).
        uneven_probability: chance that a step's shards get random relative sizes instead of an even split.
        min_relative_size: the smallest shard's size relative to the largest, for uneven draws (0 < x <= 1).
        seed: seeds the draws (identical on every data-parallel rank, so every rank uses the same layout).
    """

    def __init__(
        self,
        num_devices: Sequence[int] = (2, 3, 4, 6, 8),
        uneven_probability: float = 0.5,
        min_relative_size: float = 0.25,
        seed: int = 0,
    ):
        choices = list(num_devices)
        if not choices or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in choices):
            raise ValueError(f"RandomShardsCallback.num_devices must be a non-empty list of integers >= 1, got {num_devices!r}")
        if not 0.0 <= uneven_probability <= 1.0:
            raise ValueError(f"RandomShardsCallback.uneven_probability must be in [0, 1], got {uneven_probability!r}")
        if not 0.0 < min_relative_size <= 1.0:
            raise ValueError(f"RandomShardsCallback.min_relative_size must be in (0, 1], got {min_relative_size!r}")
        self.choices = choices
        self.uneven_probability = float(uneven_probability)
        self.min_relative_size = float(min_relative_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.original = None
        self.history: list[tuple[int, list[float] | None]] = []  # every step's draw

    def draw(self) -> tuple[int, list[float] | None]:
        """The next (N, shard sizes or None for even)."""
        index = int(torch.randint(len(self.choices), (1,), generator=self.generator))
        num_devices = self.choices[index]
        uneven = float(torch.rand((), generator=self.generator)) < self.uneven_probability
        if not uneven or num_devices == 1:
            return num_devices, None
        low = self.min_relative_size
        sizes = (low + (1.0 - low) * torch.rand(num_devices, generator=self.generator)).tolist()
        return num_devices, [round(size, 4) for size in sizes]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.original = astra_state(model).config

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        num_devices, sizes = self.draw()
        self.history.append((num_devices, sizes))
        set_shards(model, num_devices, sizes)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._restore(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._restore(model)

    def _restore(self, model) -> None:
        """The model's own layout back, and the N drawn from recorded: after every step, so that checkpoints saved
        during training carry it too and `AstraNAQCallback`'s record (its one N, at train start) never stays."""
        if self.original is not None:
            set_shards(model, self.original.num_devices, self.original.shard_sizes)
            record_fine_tuned_num_devices(model, self.choices)
