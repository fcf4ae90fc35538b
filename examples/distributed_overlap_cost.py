"""Compute cost of the runtime's overlapped attention against one fused SDPA, on one process.

With overlap, a rank attends to its own keys while the codes travel and to the received keys after,
then merges both by log-sum-exp (`partial_attention`, `merge_partials`); without, it runs one SDPA
over [own | received] keys (`attention.attend`). This times both on the same causal shapes as the last
of N = 2 GPT2 ranks, with no network at all, so that any latency gain of overlap is not eaten by compute.

    python examples/distributed_overlap_cost.py --json docs/distributed/overlap_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from transformers_astra.attention import attend
from transformers_astra.distributed import merge_partials, partial_attention


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--own-tokens", type=int, default=512, help="queries = own keys (the last rank's shard)")
    parser.add_argument("--received-tokens", type=int, default=512, help="keys decoded from earlier ranks' codes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    own, received = args.own_tokens, args.received_tokens
    query, own_key, own_value = (torch.randn(1, args.heads, own, args.head_dim, generator=generator) for _ in range(3))
    key, value = (torch.randn(1, args.heads, received, args.head_dim, generator=generator) for _ in range(2))
    own_allowed = torch.ones(own, own, dtype=torch.bool).tril()[None, None]  # causal within the shard
    received_allowed = torch.ones(1, 1, own, received, dtype=torch.bool)  # earlier shards: all visible
    scale = args.head_dim**-0.5

    def overlapped():
        local = partial_attention(query, own_key, own_value, own_allowed, scale)
        return merge_partials(local, partial_attention(query, key, value, received_allowed, scale))

    def fused():
        keys, values = torch.cat([own_key, key], dim=2), torch.cat([own_value, value], dim=2)
        return attend(query, keys, values, torch.cat([own_allowed, received_allowed], dim=-1), scale, 0.0, False)

    difference = (overlapped().transpose(1, 2) - fused()[0]).abs().max().item()
    result = {
        "heads": args.heads, "head_dim": args.head_dim, "own_tokens": own, "received_tokens": received,
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "overlapped_ms": median_ms(overlapped, args.repeats), "fused_sdpa_ms": median_ms(fused, args.repeats),
        "max_abs_diff": difference,
    }
    print(f"overlapped (two partial attentions + merge): {result['overlapped_ms']:.2f} ms; "
          f"one SDPA: {result['fused_sdpa_ms']:.2f} ms; max abs diff {difference:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
