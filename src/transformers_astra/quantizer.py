"""Grouped vector quantization: one codebook per group, integer codes on the wire.

The inference path (``encode``/``decode``) is a chunked matmul + block-wise argmin and an embedding
gather, so it stays at matmul speed on CPU and GPU; `encode` gives exactly the nearest codeword of
`reference_nearest_codewords` (float64 distances, lowest index on ties), batch-invariant. Training (``forward``) adds straight-through gradients, the
commitment term and NAQ noise. `kmeans` (Lloyd's algorithm, batched over groups) fits the codebooks to
real activations (`astra.calibrate`).

Codebooks learn by gradient, not EMA: the decoded vectors enter attention directly, so the task loss
moves every used codeword toward what helps the model (the paper found beta = 0 better than the VQ-VAE
beta = 0.25, i.e. its codebooks learn from the task, not from reconstruction). EMA only tracks the
mean of the inputs a codeword wins, which ignores the task.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Bounds the (groups, tokens, K) score tensor of one encode step: 64 MiB of fp32 on accelerators (few
# launches), 4 MiB on CPU, where scores that stay in cache make G=32 encoding about 1.8x faster with the
# same codes (`python -m benchmarks.profile_astra`, docs/benchmarks.md).
_ENCODE_CHUNK_ELEMENTS = 1 << 24
_ENCODE_CHUNK_ELEMENTS_CPU = 1 << 20
# A score block up to this many times the step's budget (at most the CPU budget's) is done in one step: a ViT
# rank's 50 tokens at G=32 kv (64 groups, 13 MiB of scores) in one step instead of four steps of 16 tokens, whose
# recheck then reuses the scores: the rank 0.147 -> 0.133 s at 2 threads, 0.198 -> 0.178 s at 1 (with the
# (groups, tokens) steps; `python -m benchmarks.per_layer_costs --case vit-kv32`, docs/benchmarks.md).
_ONE_STEP_FACTOR = 4
# The smallest score is found block by block (blocks of this many consecutive codewords): CPU argmin is
# a scalar loop, amin is vectorised (`nearest_codewords`; benchmarks/encoder_speed.py).
_ARGMIN_BLOCK = 32


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
        self._summary_cache: tuple | None = None  # eval only: (codebook tensor, its _version, summary, parameter)

    def extra_repr(self) -> str:
        return f"width={self.width}, groups={self.groups}, codebook_size={self.codebook_size}"

    @torch.no_grad()
    def encode(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """Nearest codeword per group: (..., width) -> int64 codes of shape (..., groups).

        ``x`` is first cast to the codebook's dtype. The codes are exactly those of
        `reference_nearest_codewords` (the nearest codeword by exact distance, lowest index on ties),
        whatever the number of tokens, the chunking or the device (see `nearest_codewords`).
        ``exact=False``: the codeword of the smallest matmul score, without the recheck of near-ties
        (`fast_nearest_codewords`), for fine-tuning (see `forward`).
        """
        if x.shape[-1] != self.width:
            raise ValueError(f"encode expects vectors of width {self.width}, got x of shape {tuple(x.shape)}")
        codebook = self.codebook.detach()
        points = x.detach().reshape(-1, self.groups, self.group_width).to(codebook.dtype).transpose(0, 1)
        budget = _ENCODE_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _ENCODE_CHUNK_ELEMENTS
        if exact:
            codes = nearest_codewords(points, codebook, budget, self._codebook_summary(codebook))
        else:
            codes = fast_nearest_codewords(points, codebook, budget)
        return codes.T.reshape(*x.shape[:-1], self.groups)

    def _codebook_summary(self, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`codebook_summary` of the codebook; in eval mode cached until the codebook changes.

        The cache keeps the parameter and the codebook tensor it was built from and its version
        counter, so any in-place update (``copy_``, optimizer steps, ``load_state_dict``), a new tensor
        (``.to``, ``.data = ...``), a new parameter or `train` rebuilds it. Writes through ``codebook.data`` bypass version counters: make them in
        training mode (as the dead-code broadcast of `AstraCallback` does) or on the parameter itself
        under ``torch.no_grad()``.
        """
        if self.training or codebook.is_inference():
            self._summary_cache = None
            return codebook_summary(codebook)
        cached = getattr(self, "_summary_cache", None)  # None too for modules pickled before the cache
        if (
            cached is None
            or cached[3] is not self.codebook
            or cached[0].data_ptr() != codebook.data_ptr()
            or cached[0].dtype != codebook.dtype
            or cached[0].device != codebook.device
            or cached[0].shape != codebook.shape
            or cached[1] != codebook._version
        ):
            cached = self._summary_cache = (codebook, codebook._version, codebook_summary(codebook), self.codebook)
        return cached[2]

    def train(self, mode: bool = True):
        self._summary_cache = None  # training may write the codebook through .data (no version bump)
        return super().train(mode)

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
        # Fine-tuning on an accelerator encodes without the exact recheck: nothing must agree with these codes bit
        # for bit (the runtime and the simulation agree in eval mode, which encodes exactly), and on a GPU the
        # recheck's host synchronisations and per-group loops made the quantizer's step 2-7x slower
        # (`benchmarks/train_encode_speed.py`, H200). On CPU the exact encoder's blocked minimum is as fast or
        # faster than a plain argmin over K (same benchmark, 2 cores): it stays there.
        codes = self.encode(x, exact=not self.training or x.device.type == "cpu")
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


def codebook_summary(centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `nearest_codewords` needs of (G, K, d) codewords besides themselves, in their score dtype:
    squared norms (G, 1, K) and the largest codeword norm per group (G, 1)."""
    squared_norms = centres.to(_score_dtype(centres.dtype)).pow(2).sum(-1)
    return squared_norms.unsqueeze(1), squared_norms.amax(-1, keepdim=True).sqrt()


def reference_nearest_codewords(points: torch.Tensor, centres: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """The definition of the codes, computed the obvious way: every distance, then argmin.

    ``points`` (G, n, d), ``centres`` (G, K, d) -> int64 (G, n): the index of the centre at the smallest
    squared Euclidean distance ``sum((x - c)^2)``, computed in float64 from the values as given; on equal
    distances (duplicate codewords) the lowest index (``argmin``'s rule); a NaN distance counts as the
    smallest. Chunked over the points only to bound memory (``max_elements`` float64 differences).
    """
    groups, n, dim = points.shape
    size = centres.shape[1]
    nearest = torch.empty(groups, n, dtype=torch.long, device=points.device)
    chunk = max(1, max_elements // (groups * size * max(dim, 1)))
    for start in range(0, n, chunk):
        part = points[:, start : start + chunk, None, :]  # (G, m, 1, d)
        pairs = torch.broadcast_shapes(part.shape, centres[:, None].shape)
        distances = _exact_distances(part.expand(pairs).reshape(-1, dim), centres[:, None].expand(pairs).reshape(-1, dim))
        nearest[:, start : start + chunk] = distances.view(groups, -1, size).argmin(-1)
    return nearest


def _exact_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Float64 squared distances of (p, d) points to (p, d) centres, pair by pair: (p,). Each pair's
    arithmetic is the same whatever else is in the batch (the reference and `nearest_codewords` share it)."""
    return (points.double() - centres.double()).pow(2).sum(-1)


def nearest_codewords(
    points: torch.Tensor,
    centres: torch.Tensor,
    max_elements: int,
    summary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`reference_nearest_codewords`, bit for bit, at matmul speed. (G, n, d), (G, K, d) -> int64 (G, n).

    Scores ``|c|^2 - 2 x.c`` come from one ``baddbmm`` per chunk of points (float32 for float32 and
    half-precision inputs, float64 for float64), in steps whose (groups, tokens, K) score block holds at
    most about ``max_elements`` entries (on CPU ~4 MiB: it is reread from cache; `score_block`). Where K is a multiple of
    `_ARGMIN_BLOCK`, no argmin runs over the scores: the block minima (``amin``, vectorised), the
    smallest, and the blocks and scores within `score_tolerance` of it, counted and located by small matmuls.
    Each score is within ``E = (d + 2) u (C^2 + 2 |x| C)`` of its exact value (``u``: the unit roundoff
    of the matmul, TF32 or bf16 included where a precision setting allows them, `_matmul_unit_roundoff`;
    ``C``: the largest codeword norm). A point whose best score has no rival within ``2 E`` plus twice
    the float64 reference's own error bound has exactly the reference's nearest codeword (any other
    is farther than the reference can err). The others (a few in a thousand on real activations, a
    few in a hundred at d = 768, all those at duplicate codewords) and non-finite points go to
    `_recheck` (per step, all its groups at once, from the step's scores): the reference's float64 distances
    to their candidates. So the codes depend neither on
    the chunking nor on the other points. ``summary``: `codebook_summary(centres)`, if kept.
    """
    groups, n, _ = points.shape
    size = centres.shape[1]
    if n == 0:
        return torch.empty(groups, 0, dtype=torch.long, device=points.device)
    squared_norms, radius = summary if summary is not None else codebook_summary(centres)
    score_dtype = squared_norms.dtype
    centres_t = centres.to(score_dtype).transpose(1, 2)  # (G, d, K); a view for float32 codebooks
    points = points.contiguous()  # one copy here rather than a strided read in every step's matmul and the norm
    tolerance = score_tolerance(points, radius, score_dtype)
    blocked = size % _ARGMIN_BLOCK == 0 and size > _ARGMIN_BLOCK
    if blocked:  # positions of the blocks and of the scores in a block, to sum those within the limit
        block_positions = _positions(size // _ARGMIN_BLOCK, points.device)
        offset_positions = _positions(_ARGMIN_BLOCK, points.device)
    group_step, token_step = score_block(groups, n, size, max_elements)
    nearest = torch.empty(groups, n, dtype=torch.long, device=points.device)
    for g in range(0, groups, group_step):
        gs = slice(g, g + group_step)
        for start in range(0, n, token_step):
            ts = slice(start, start + token_step)
            part = points[gs, ts]
            scores = torch.baddbmm(squared_norms[gs], part.to(score_dtype), centres_t[gs], alpha=-2.0)
            limit = tolerance[gs, ts]
            if blocked:
                # Vectorised: each block's minimum, the smallest, the blocks within the limit of it; where
                # exactly one block and one score in it are within, that score is the unique minimum.
                block_minima = scores.unflatten(-1, (-1, _ARGMIN_BLOCK)).amin(-1)  # (g, m, K / block)
                limit = block_minima.amin(-1) + limit
                blocks_in, block = _count_and_sum(block_minima <= limit[..., None], block_positions)
                block = block.long().clamp_(max=block_minima.shape[-1] - 1)  # where blocks_in > 1: any block, rechecked
                rows = torch.arange(block.numel(), device=block.device).view_as(block) * block_minima.shape[-1] + block
                within = scores.reshape(-1, _ARGMIN_BLOCK).index_select(0, rows.flatten()).view(*block.shape, -1)
                scores_in, offset = _count_and_sum(within <= limit[..., None], offset_positions)
                index, unsure = block * _ARGMIN_BLOCK + offset, (blocks_in != 1) | (scores_in != 1)
            else:
                smallest, index = scores.min(-1)
                limit = smallest + limit
                unsure = (scores <= limit[..., None]).sum(-1) != 1
            _recheck(part, centres[gs], scores, limit, unsure | ~torch.isfinite(limit), index, max_elements)
            nearest[gs, ts] = index
    return nearest


def score_tolerance(points: torch.Tensor, radius: torch.Tensor, score_dtype: torch.dtype) -> torch.Tensor:
    """(G, n): how far above the smallest score ``|c|^2 - 2 x.c`` of (G, n, d) points the score of every codeword that
    could be the reference's nearest may lie (``radius``: `codebook_summary`'s largest codeword norm per group).

    2 E for the scores' rounding, E = (d + 2) u (C^2 + 2 |x| C) (norms, dot products and their sum; u: the
    matmul's unit roundoff, C: the largest codeword norm), plus twice the float64 reference's own error bound,
    (d + 2) 2^-53 (|x| + C)^2; 1 % more for the rounding of |x| and C themselves.
    """
    norm = torch.linalg.vector_norm(points.to(score_dtype), dim=-1)
    unit = _matmul_unit_roundoff(score_dtype, points.device)
    return 2.02 * (points.shape[-1] + 2) * (unit * radius * (radius + 2 * norm) + 2.0**-53 * (norm + radius).square())


def score_block(groups: int, n: int, size: int, max_elements: int) -> tuple[int, int]:
    """(groups, tokens) of one step of `nearest_codewords`: a (groups, tokens, K) score block of about
    ``max_elements`` entries at most (at least one group and one token). All in one step where the whole block
    holds at most `_ONE_STEP_FACTOR` times the smaller of ``max_elements`` and the CPU budget (so accelerators'
    larger budget is not multiplied). Otherwise every token of as many groups as fit, where one group's scores
    fit (each group's matmul keeps all n rows); else one group at a time, in steps of tokens."""
    if groups * n * size <= _ONE_STEP_FACTOR * min(max_elements, _ENCODE_CHUNK_ELEMENTS_CPU):  # 16 MiB at most
        return groups, n
    tokens = _even_step(n, max(1, max_elements // size))
    return _even_step(groups, max(1, max_elements // (tokens * size))), tokens


def _even_step(total: int, most: int) -> int:
    """The step that covers ``total`` in as few steps of at most ``most`` as possible, all about equal."""
    steps = -(-total // most)
    return -(-total // steps)


def fast_nearest_codewords(points: torch.Tensor, centres: torch.Tensor, max_elements: int) -> torch.Tensor:
    """Nearest codeword by the scores ``|c|^2 - 2 x.c`` of one ``baddbmm`` per chunk: (G, n, d), (G, K, d) -> (G, n).

    The same scores as `nearest_codewords` without its recheck: where two codewords' scores lie within the
    matmul's rounding of each other, either may be chosen (and the choice may depend on the chunking or the
    device). For fine-tuning; codes two processes must agree on come from `nearest_codewords`.
    """
    groups, n, _ = points.shape
    if n == 0:
        return torch.empty(groups, 0, dtype=torch.long, device=points.device)
    squared_norms = codebook_summary(centres)[0]  # (G, 1, K), in the score dtype
    centres_t = centres.to(squared_norms.dtype).transpose(1, 2)
    chunk = max(1, max_elements // (groups * centres.shape[1]))
    parts = [torch.baddbmm(squared_norms, points[:, start : start + chunk].to(squared_norms.dtype), centres_t, alpha=-2.0).argmin(-1)
             for start in range(0, n, chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _recheck(points, centres, scores, limit, recheck, nearest, max_elements: int) -> None:
    """Write the reference codes of the points marked in ``recheck`` (G, m) into ``nearest`` (G, m).

    All groups at once (one ``nonzero`` for the points, one for their candidates): a marked point's
    candidates are the codewords whose ``scores`` (G, m, K) lie within its ``limit`` (G, m) (every codeword
    where that limit is not finite); the exact float64 distances to those (`_exact_distances`, as the
    reference), argmin over them (lowest index on equal distances, NaN first, as the reference).
    """
    group, token = recheck.nonzero(as_tuple=True)
    if group.numel() == 0:
        return
    marked_limit = limit[group, token, None]
    row, code = ((scores[group, token] <= marked_limit) | ~torch.isfinite(marked_limit)).nonzero(as_tuple=True)
    distances = torch.full((group.numel(), centres.shape[1]), float("inf"), dtype=torch.float64, device=scores.device)
    pairs_per_step = max(1, max_elements // max(centres.shape[2], 1))  # bounded memory even where every codeword ties
    for first in range(0, row.numel(), pairs_per_step):
        r, c = row[first : first + pairs_per_step], code[first : first + pairs_per_step]
        distances[r, c] = _exact_distances(points[group[r], token[r]], centres[group[r], c])
    nearest[group, token] = distances.argmin(-1)


@functools.lru_cache(maxsize=32)
def _positions(length: int, device: torch.device) -> torch.Tensor:
    """0, 1, ..., length - 1 in the smallest integer type that holds them (uint8 up to 256: the CPU's fastest sums)."""
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference_mode
        return torch.arange(length, dtype=torch.uint8 if length <= 256 else torch.int32, device=device)


def _count_and_sum(mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many entries of ``mask`` (..., L) are True, and the sum of their ``positions``: int32 (...) each.

    Integer sums over the mask's bytes: exact, and on CPU 2-4x faster than a bool sum or a float matmul
    (`python -m benchmarks.encoder_ab`)."""
    flags = mask.view(torch.uint8)
    return flags.sum(-1, dtype=torch.int32), (flags * positions).sum(-1, dtype=torch.int32)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Unit roundoff of a float32 matmul under each precision setting torch knows (legacy and per-backend names).
_MATMUL_ROUNDOFF = {"none": 2.0**-24, "highest": 2.0**-24, "ieee": 2.0**-24, "high": 2.0**-11, "tf32": 2.0**-11, "medium": 2.0**-8, "bf16": 2.0**-8}


def _matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The largest unit roundoff any current setting may give a ``dtype`` matmul on ``device``.

    float32 matmuls may run in TF32 or bf16 (``torch.set_float32_matmul_precision``, or the
    per-backend ``torch.backends.{cuda,mkldnn}.matmul.fp32_precision``): take the least precise of
    the settings that apply; a mix of the legacy and new settings, which torch refuses to read back,
    counts as bf16.
    """
    if dtype == torch.float64:
        return 2.0**-53
    backend = {"cuda": torch.backends.cuda, "cpu": torch.backends.mkldnn}.get(device.type)
    settings = [getattr(getattr(backend, "matmul", None), "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")]
    try:
        settings.append(torch.get_float32_matmul_precision())
    except RuntimeError:
        settings.append("medium")
    return max(_MATMUL_ROUNDOFF.get(str(setting), 2.0**-8) for setting in settings)  # unknown names: bf16


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
