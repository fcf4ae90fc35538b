"""Balanced shards for causal models: later ranks get fewer tokens, so that every rank's layer takes as long.

With even shards a causal model's ranks do unequal work per layer: rank r attends to every key before
its shard's end, rebuilds the K/V of every earlier rank's tokens from their codes, and (all but the last)
encodes its own tokens for the later ranks. The whole forward waits for the slowest rank, so the last
ranks set the latency (dev VM, GPT2 1024 tokens, N=4, G=32 hidden, 1 thread: 0.73/0.85/0.98/0.90 s,
docs/results/astra_profile.json).

`ShardCosts` is a model of one layer's work on one rank, in multiply-accumulate equivalents (integers):

    cost(rank, start, n) = n * (block + encode if the rank sends codes) + pair * n * (start + n) + rebuild * start

``block``: the per-token block (Q/K/V and output projections, 4x MLP: 12 d^2). ``pair``: one (query,
key) pair of masked attention (2 d: scores and values; the own shard's keys are computed in full, under a
mask). ``encode``: K * (width + 35 * codes) per token: the distance to every codeword plus a per-codeword
cost that dominates at narrow groups. ``rebuild``: per received token, the gather-sum of the projection
tables (12 * codes * D_kv, hidden mode where the fp32 table fits the runtime's limit), else decoding (50 *
width) plus the K/V projection (2 d D_kv, hidden mode). The constants were fitted to the GPT2 device
profile of the dev VM (docs/results/device_profiles/, one thread, 2026-11-27: block 154 us/token, masked
attention 35 ns/pair, encode 17-87 us/token, decode + project 23 us; the tables' fused gather-sum
0.14 ns per gathered value, measured 2026-11-27 on the same VM) and reproduce
the measured per-rank times above within 6 % (docs/benchmarks.md, "Balanced shards").

`balanced_sizes` finds the sizes that minimise the largest rank's cost: a binary search over the bound,
each rank in turn taking as many tokens as the bound allows. Pure integer arithmetic on (T, N, costs), so
every rank (and the single-process simulation) computes the same sizes; the runtime's per-call header
compares them anyway (`handshake.check_same_call`). The model is relative: it needs no device profile, and
device speed cancels out. ``AstraConfig(shard_sizes="balanced")`` (opt-in; the default is even shards)
uses it for causal families; bidirectional ones (ViT) split evenly, as every rank does the same work there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .config import AstraConfig

# Fitted constants of the cost model (multiply-accumulate equivalents; see the module docstring).
ENCODE_PER_CODEWORD = 35
TABLE_PER_ELEMENT = 12
DECODE_PER_ELEMENT = 50


@dataclass(frozen=True)
class ShardCosts:
    """Per-layer work of one rank, in integer multiply-accumulate equivalents (see the module docstring)."""

    block: int  # per own token
    pair: int  # per (own query, visible key) pair
    encode: int  # per own token, on ranks that send codes
    rebuild: int  # per received token

    @classmethod
    def for_model(cls, hidden_size: int, key_value_width: int, config: AstraConfig, table_max_bytes: int) -> "ShardCosts":
        """The costs of a model of width ``hidden_size`` with K/V width ``key_value_width`` under ``config``.

        Hidden mode assumes the runtime's default projection tables where an fp32 pair of them fits
        ``table_max_bytes`` (a runtime built with ``projection_table=False`` keeps these sizes: they must
        match the simulation, which knows nothing of the runtime's options).
        """
        d, kv = hidden_size, key_value_width
        codes = config.codes_per_token
        width = d if config.quantize == "hidden" else 2 * kv
        if config.quantize == "kv":
            rebuild = DECODE_PER_ELEMENT * width
        elif config.projection_table_bytes(kv, 4) <= table_max_bytes:
            rebuild = TABLE_PER_ELEMENT * codes * kv
        else:
            rebuild = DECODE_PER_ELEMENT * width + 2 * d * kv
        encode = config.codebook_size * (width + ENCODE_PER_CODEWORD * codes)
        return cls(block=12 * d * d, pair=2 * d, encode=encode, rebuild=rebuild)

    def rank_cost(self, start: int, size: int, sends: bool) -> int:
        """One layer on a rank whose shard is tokens [start, start + size) of a causal model."""
        own = self.block + (self.encode if sends else 0)
        return size * own + self.pair * size * (start + size) + self.rebuild * start


def rank_costs(costs: ShardCosts, sizes: list[int] | tuple[int, ...]) -> list[int]:
    """The modelled cost of one layer on every rank of a causal model with these shard sizes."""
    out, start = [], 0
    for rank, size in enumerate(sizes):
        out.append(costs.rank_cost(start, size, sends=rank < len(sizes) - 1))
        start += size
    return out


@functools.lru_cache(maxsize=256)
def balanced_sizes(num_tokens: int, num_devices: int, costs: ShardCosts) -> tuple[int, ...]:
    """Causal shard sizes (each >= 1, summing to ``num_tokens``) that minimise the largest `rank_costs`.

    Deterministic integer arithmetic; cached, as the simulation asks once per layer.
    """
    if num_tokens < num_devices:
        raise ValueError(
            f"Cannot split {num_tokens} tokens over num_devices={num_devices}: every device needs at least "
            f"one token. Use fewer devices or a longer input."
        )
    base, extra = divmod(num_tokens, num_devices)
    even = tuple(base + (1 if i < extra else 0) for i in range(num_devices))
    if num_devices == 1:
        return even
    low, high = 0, max(rank_costs(costs, even))
    best = _greedy(num_tokens, num_devices, costs, high)
    if best is None:  # the bound even shards meet is not met greedily (a cost model outside its assumptions)
        return even
    while low < high:  # invariant: `high` is met; below `low` is not
        middle = (low + high) // 2
        sizes = _greedy(num_tokens, num_devices, costs, middle)
        if sizes is None:
            low = middle + 1
        else:
            high, best = middle, sizes
    return best


def _greedy(num_tokens: int, num_devices: int, costs: ShardCosts, bound: int) -> tuple[int, ...] | None:
    """Each rank in turn takes the most tokens whose cost stays within ``bound``; None if the tokens do not fit."""
    sizes, start = [], 0
    for rank in range(num_devices - 1):
        most = num_tokens - start - (num_devices - 1 - rank)  # leave one token to every later rank
        if costs.rank_cost(start, 1, sends=True) > bound:
            return None
        low, high = 1, most
        while low < high:  # the largest size within the bound (the cost grows with the size)
            middle = (low + high + 1) // 2
            if costs.rank_cost(start, middle, sends=True) <= bound:
                low = middle
            else:
                high = middle - 1
        sizes.append(low)
        start += low
    last = num_tokens - start
    if costs.rank_cost(start, last, sends=False) > bound:
        return None
    return (*sizes, last)
