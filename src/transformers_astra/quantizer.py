"""Grouped vector quantization: one codebook per group, integer codes on the wire.

The inference path (``encode``/``decode``) is a chunked matmul + argmin and an embedding gather, so it
stays at matmul speed on CPU and GPU. Training (``forward``) adds straight-through gradients, the
commitment term and NAQ noise. `kmeans` (Lloyd's algorithm, batched over groups) fits the codebooks to
real activations (`astra.calibrate`).

Codebooks learn by gradient, not EMA: the decoded vectors enter attention directly, so the task loss
moves every used codeword toward what helps the model (the paper found beta = 0 better than the VQ-VAE
beta = 0.25, i.e. its codebooks learn from the task, not from reconstruction). EMA only tracks the
mean of the inputs a codeword wins, which ignores the task.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

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
        budget = _ENCODE_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _ENCODE_CHUNK_ELEMENTS
        codes = nearest_codewords(flat.transpose(0, 1), codebook, budget).T
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
    def fit_codebook(
        self, samples: torch.Tensor, num_iters: int = 10, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """K-means centres for ``samples`` (n, width), one clustering per group: (groups, K, width // groups).

        Computes only: the codebook is not touched (see :meth:`load_codebook`). Raises ValueError on
        non-finite samples.
        """
        if samples.ndim != 2 or samples.shape[1] != self.width:
            raise ValueError(f"kmeans_init expects samples of shape (n, {self.width}), got {tuple(samples.shape)}")
        # k-means in fp32 even for half-precision models: distances in bf16 misassign close points.
        per_group = samples.float().reshape(-1, self.groups, self.group_width).transpose(0, 1)
        return kmeans(per_group, self.codebook_size, num_iters=num_iters, generator=generator)

    @torch.no_grad()
    def load_codebook(self, centres: torch.Tensor) -> None:
        """Replace the codebook by ``centres`` (groups, K, width // groups) and mark it initialised."""
        if centres.shape != self.codebook.shape:
            raise ValueError(f"codebook of shape {tuple(self.codebook.shape)} expected, got {tuple(centres.shape)}")
        if not torch.isfinite(centres).all():
            raise ValueError("refusing a codebook with NaN or infinite entries")
        self.codebook.copy_(centres.to(self.codebook.dtype))
        self.initialized.fill_(True)

    @torch.no_grad()
    def kmeans_init(self, samples: torch.Tensor, num_iters: int = 10, generator: torch.Generator | None = None) -> None:
        """Fit the codebook to ``samples`` (n, width) with k-means; on any error the codebook is unchanged."""
        self.load_codebook(self.fit_codebook(samples, num_iters=num_iters, generator=generator))


def nearest_codewords(points: torch.Tensor, centres: torch.Tensor, max_elements: int) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean distance, first one on ties) of every point.

    ``points`` (G, n, d), ``centres`` (G, K, d) -> int64 (G, n). The (G, m, K) score tensor of one step
    holds at most about ``max_elements`` entries.
    """
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so argmin skips it.
    squared_norms = centres.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
    centres_t = centres.transpose(1, 2)  # (G, d, K)
    groups, n, _ = points.shape
    nearest = torch.empty(groups, n, dtype=torch.long, device=points.device)
    chunk = max(1, max_elements // (groups * centres.shape[1]))
    for start in range(0, n, chunk):
        scores = torch.baddbmm(squared_norms, points[:, start : start + chunk], centres_t, alpha=-2.0)
        nearest[:, start : start + chunk] = scores.argmin(-1)
    return nearest


@torch.no_grad()
def kmeans(
    samples: torch.Tensor,
    num_clusters: int,
    num_iters: int = 10,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Lloyd's k-means on G independent sets of points at once: ``samples`` (G, n, d) -> centres (G, K, d).

    Start: unless ``init`` (G, K, d) is given, each group's centres are K of its samples drawn without
    replacement with ``generator`` (a CPU ``torch.Generator``; None draws from a fresh one seeded with 0,
    so the result never depends on torch's global random state). With fewer samples than centres
    (n < K) every sample becomes a centre and the other K - n centres repeat random samples; a warning
    says so. Duplicates are never the nearest (ties go to the lowest index), so they stay unused until a
    dead-code reset moves them.

    Each iteration assigns every sample to its nearest centre and moves each centre to the mean of its
    samples; a centre that wins no sample stays where it is. Deterministic for a given generator on CPU
    (on CUDA the per-centre sums use atomic adds unless ``torch.use_deterministic_algorithms(True)``).

    Raises ValueError for NaN/inf samples, for samples whose squared norms overflow the dtype, and for
    an empty sample set. ``max_elements`` bounds the distance scores computed at once (default: as
    `GroupedVQ.encode` on that device).
    """
    if samples.ndim != 3:
        raise ValueError(f"kmeans expects samples of shape (groups, n, dim), got {tuple(samples.shape)}")
    groups, n, dim = samples.shape
    if n == 0:
        raise ValueError("kmeans got no samples")
    if num_clusters < 1 or num_iters < 0:
        raise ValueError(f"kmeans needs num_clusters >= 1 and num_iters >= 0, got {num_clusters}, {num_iters}")
    if not samples.is_floating_point():
        raise ValueError(f"kmeans needs floating-point samples, got {samples.dtype}")
    finite = torch.isfinite(samples)
    if not finite.all():
        bad = int((~finite).sum())
        raise ValueError(f"kmeans got {bad} NaN or infinite value(s) among {samples.numel()} sample values")
    if not torch.isfinite(samples.pow(2).sum(-1)).all():
        raise ValueError(
            f"kmeans samples are too large for {samples.dtype} distances (largest |value| "
            f"{samples.abs().max().item():.3g}: its squared norm overflows)"
        )
    if init is None:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        init = samples.gather(1, _initial_indices(groups, n, num_clusters, generator).to(samples.device)[..., None].expand(-1, -1, dim))
    elif init.shape != (groups, num_clusters, dim):
        raise ValueError(f"kmeans init must have shape {(groups, num_clusters, dim)}, got {tuple(init.shape)}")
    centres = init.to(samples.dtype).clone()
    if max_elements is None:
        max_elements = _ENCODE_CHUNK_ELEMENTS_CPU if samples.device.type == "cpu" else _ENCODE_CHUNK_ELEMENTS
    offsets = (torch.arange(groups, device=samples.device) * num_clusters)[:, None]
    flat_samples = samples.reshape(groups * n, dim)
    for _ in range(num_iters):
        assignment = (nearest_codewords(samples, centres, max_elements) + offsets).flatten()
        sums = torch.zeros(groups * num_clusters, dim, dtype=samples.dtype, device=samples.device)
        sums.index_add_(0, assignment, flat_samples)
        counts = torch.bincount(assignment, minlength=groups * num_clusters).view(groups, num_clusters, 1)
        means = sums.view(groups, num_clusters, dim) / counts.clamp_min(1).to(samples.dtype)
        centres = torch.where(counts > 0, means, centres)
    return centres


def _initial_indices(groups: int, n: int, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """(groups, K) sample indices: K distinct ones per group, or all n and K - n repeats when n < K."""
    order = torch.rand(groups, n, generator=generator).argsort(dim=1)
    if n >= num_clusters:
        return order[:, :num_clusters]
    warnings.warn(
        f"k-means got {n} samples for {num_clusters} codewords: {num_clusters - n} codewords per group repeat "
        "a sample and stay unused until a dead-code reset (calibrate on more tokens to use them all)",
        stacklevel=3,
    )
    repeats = torch.randint(n, (groups, num_clusters - n), generator=generator)
    return torch.cat([order, repeats], dim=1)
