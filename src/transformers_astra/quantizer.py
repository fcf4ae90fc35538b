"""Grouped vector quantization: one codebook per group, integer codes on the wire.

The inference path (``encode``/``decode``) is a chunked matmul + argmin and an embedding gather, so it
stays at matmul speed on CPU and GPU. Training (``forward``) adds straight-through gradients, the
commitment term and NAQ noise. K-means initialisation comes from vector-quantize-pytorch.

Codebooks learn by gradient, not EMA: the decoded vectors enter attention directly, so the task loss
moves every used codeword toward what helps the model (the paper found beta = 0 better than the VQ-VAE
beta = 0.25, i.e. its codebooks learn from the task, not from reconstruction). EMA only tracks the
mean of the inputs a codeword wins, which ignores the task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

# Bounds the (groups, tokens, K) score tensor of one encode step: 64 MiB of fp32 on accelerators (few
# launches), 4 MiB on CPU, where scores that stay in cache make G=32 encoding about 1.8x faster with the
# same codes (`python -m benchmarks.profile_astra`, docs/benchmarks.md).
_ENCODE_CHUNK_ELEMENTS = 1 << 24
_ENCODE_CHUNK_ELEMENTS_CPU = 1 << 20


class GroupedVQ(nn.Module):
    """Cuts vectors of width ``width`` into ``groups`` groups and replaces each group by a codeword index.

    ``codebook`` has shape (groups, codebook_size, width // groups). ``initialized`` is False until
    :meth:`kmeans_init` (or ``astra.calibrate``) has fitted the codebook to real activations.
    """

    def __init__(self, width: int, groups: int, codebook_size: int):
        super().__init__()
        if width % groups:
            raise ValueError(f"groups={groups} must divide the quantized width {width}")
        self.width, self.groups, self.codebook_size = width, groups, codebook_size
        self.group_width = width // groups
        self.codebook = nn.Parameter(torch.randn(groups, codebook_size, self.group_width))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"width={self.width}, groups={self.groups}, codebook_size={self.codebook_size}"

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest codeword per group: (..., width) -> int64 codes of shape (..., groups)."""
        codebook = self.codebook.detach()
        flat = x.detach().reshape(-1, self.groups, self.group_width).to(codebook.dtype)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so argmin skips it.
        squared_norms = codebook.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
        codebook_t = codebook.transpose(1, 2)  # (G, d, K)
        codes = torch.empty(flat.shape[:2], dtype=torch.long, device=x.device)
        budget = _ENCODE_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _ENCODE_CHUNK_ELEMENTS
        chunk = max(1, budget // (self.groups * self.codebook_size))
        for start in range(0, flat.shape[0], chunk):
            groups_first = flat[start : start + chunk].transpose(0, 1)  # (G, m, d)
            scores = torch.baddbmm(squared_norms, groups_first, codebook_t, alpha=-2.0)
            codes[start : start + chunk] = scores.argmin(-1).T
        return codes.reshape(*x.shape[:-1], self.groups)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codewords of (..., groups) codes, concatenated back to (..., width). Differentiable in the codebook."""
        offsets = torch.arange(self.groups, device=codes.device) * self.codebook_size
        table = self.codebook.reshape(self.groups * self.codebook_size, self.group_width)
        vectors = F.embedding(codes + offsets, table)
        return vectors.reshape(*codes.shape[:-1], self.width)

    def forward(
        self, x: torch.Tensor, noise_scale: float = 0.0, noise_granularity: str = "dimension"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x``; returns (decoded vectors, codes, commitment term ||x - sg(x_hat)||^2 mean).

        The decoded vectors carry gradients to the codebook (task loss) and, straight-through, to ``x``.
        In training mode NAQ noise ``noise_scale * sigma * N(0, 1)`` is added, sigma being the RMS of
        the quantization residual per dimension or per group over this batch.
        """
        codes = self.encode(x)
        decoded = self.decode(codes).to(x.dtype)
        commitment = F.mse_loss(x, decoded.detach())
        if self.training and noise_scale > 0:
            decoded = decoded + noise_scale * self._residual_rms(x, decoded, noise_granularity) * torch.randn_like(decoded)
        straight_through = decoded + (x - x.detach())
        return straight_through, codes, commitment

    def _residual_rms(self, x: torch.Tensor, decoded: torch.Tensor, granularity: str) -> torch.Tensor:
        residual = (x - decoded).detach().reshape(-1, self.groups, self.group_width)
        if granularity == "group":
            return residual.pow(2).mean(dim=(0, 2)).sqrt().repeat_interleave(self.group_width)
        return residual.pow(2).mean(dim=0).sqrt().reshape(self.width)

    @torch.no_grad()
    def kmeans_init(self, samples: torch.Tensor, num_iters: int = 10) -> None:
        """Fit the codebook to ``samples`` (n, width) with k-means, one clustering per group."""
        if samples.ndim != 2 or samples.shape[1] != self.width:
            raise ValueError(f"kmeans_init expects samples of shape (n, {self.width}), got {tuple(samples.shape)}")
        # k-means in fp32 even for half-precision models: distances in bf16 misassign close points.
        per_group = samples.float().reshape(-1, self.groups, self.group_width).transpose(0, 1)
        means, _ = kmeans(per_group.contiguous(), self.codebook_size, num_iters=num_iters)
        self.codebook.copy_(means.to(self.codebook.dtype))
        self.initialized.fill_(True)
