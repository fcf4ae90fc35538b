"""Where each token lives: the split of a sequence into N contiguous device shards."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def split_sizes(num_tokens: int, num_devices: int, weights: list[float] | None = None) -> list[int]:
    """Token counts per device, contiguous and in order.

    Even split by default (the first ``num_tokens % num_devices`` shards get one more token). With
    ``weights`` the tokens are split in proportion to them, largest remainder first, so that weights
    which already sum to ``num_tokens`` come back unchanged.
    """
    if num_tokens < num_devices:
        raise ValueError(
            f"Cannot split {num_tokens} tokens over num_devices={num_devices}: every device needs at least "
            f"one token. Use fewer devices or a longer input."
        )
    if weights is None:
        base, extra = divmod(num_tokens, num_devices)
        return [base + (1 if i < extra else 0) for i in range(num_devices)]
    total = float(sum(weights))
    exact = [num_tokens * w / total for w in weights]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(num_devices), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: num_tokens - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) < 1:
        raise ValueError(
            f"shard_sizes={weights} leaves a device without tokens for a sequence of {num_tokens} tokens"
        )
    return sizes


@dataclass(frozen=True)
class ShardLayout:
    """Sizes of the N contiguous shards of one sequence, as attention sees it.

    ``class_tokens_per_shard``: class tokens at the start of every shard (ViT's distributed class tokens: 1), so that
    adapters tell a layout of per-shard class tokens from one of a single class token by what it is, not by its length.
    """

    sizes: tuple[int, ...]
    class_tokens_per_shard: int = 0

    @classmethod
    def for_sequence(
        cls, seq_len: int, num_devices: int, weights: list[float] | None = None, cls_per_shard: int = 0
    ) -> "ShardLayout":
        """Layout of a sequence of ``seq_len`` tokens of which ``cls_per_shard * N`` are per-shard class tokens."""
        content = split_sizes(seq_len - cls_per_shard * num_devices, num_devices, weights)
        return cls(tuple(size + cls_per_shard for size in content), cls_per_shard)

    @property
    def num_devices(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """First token index of every shard, plus the total at the end."""
        out = [0]
        for size in self.sizes:
            out.append(out[-1] + size)
        return tuple(out)

    def bounds(self, shard: int) -> tuple[int, int]:
        return self.offsets[shard], self.offsets[shard + 1]

    def shard_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Shard index of every token, shape (total,)."""
        return torch.repeat_interleave(
            torch.arange(self.num_devices, device=device), torch.tensor(self.sizes, device=device)
        )
