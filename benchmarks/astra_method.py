"""ASTRA as a benchmark method: the patched model run by `transformers_astra.DistributedRuntime`.

Codebooks keep their random initialisation (every rank gets the same from the shared seed): the
latency of encode, exchange and decode does not depend on the codewords' values. The runtime's
per-call input check (one small all_gather) is off, as a deployed pipeline would not pay it per request.

``overlap=False``: on one CPU thread the runtime's overlapped path (two unfused partial attentions merged
by log-sum-exp) never made the slowest rank faster than one SDPA over [own | received] keys, and was
slower at N=2 (`benchmarks.profile_astra` measures both; docs/benchmarks.md).
"""

from __future__ import annotations

import torch

import transformers_astra as astra
from transformers_astra.distributed import DistributedRuntime

from .workloads import Workload


class AstraMethod:
    name = "astra"

    def __init__(self, groups: int = 32, quantize: str = "hidden", overlap: bool = False):
        self.config = astra.AstraConfig(groups=groups, quantize=quantize)
        self.overlap = overlap

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        self.workload, self.rank, self.world = workload, rank, world
        astra.patch(workload.model, self.config.replace(num_devices=world))
        # projection_table=False: the recorded rows were measured before the runtime had codeword-projection
        # tables; their effect is measured by benchmarks.profile_astra (rank_compute_s_table).
        self.runtime = DistributedRuntime(
            workload.model, overlap=self.overlap, check_inputs=False, timeout=1800.0, projection_table=False
        )
        # Prefill: only the last token's logits (the runtime passes extra keyword arguments to the model).
        self.extra = {"logits_to_keep": 1} if workload.causal else {}

    @torch.inference_mode()
    def forward(self) -> torch.Tensor | None:
        output = self.runtime(**self.workload.inputs, **self.extra)
        if self.workload.causal:  # the next token is predicted by the last rank
            return output.logits[:, -1] if self.runtime.is_last else None
        return output.logits if self.rank == 0 else None  # every rank holds the same pooled prediction
