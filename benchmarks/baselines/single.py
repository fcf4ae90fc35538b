"""One device: the unmodified model on the whole input."""

from __future__ import annotations

import torch

from ..workloads import Workload


class SingleDevice:
    name = "single"

    def setup(self, workload: Workload, rank: int, world: int) -> None:
        if world != 1:
            raise ValueError(f"the single-device method runs on one rank, got world size {world}")
        self.workload = workload

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:
        return last_logits(self.workload, self.workload.model(**self.workload.inputs, **logits_kwargs(self.workload)))


def logits_kwargs(workload: Workload) -> dict:
    # Prefill: only the last token's logits are needed for the first generated token.
    return {"logits_to_keep": 1, "use_cache": False} if workload.causal else {}


def last_logits(workload: Workload, output) -> torch.Tensor:
    """(1, classes): the prediction the inference exists for (next token, or image class)."""
    return output.logits[:, -1] if workload.causal else output.logits
