"""Which form of the exact encoder's search is fastest on a host: the runtime's, and variants with the same codes.

On the GPU host (Xeon, torch 2.11) the exact encoder (`quantizer.nearest_codewords`) spends more time after its
score product than in it: kv G=16 K=256, 256 tokens, 2 threads: encode 3.63 ms a layer, the product 1.41 ms, the rest
2.21 ms; at 1 thread 9.31 / 2.71 / 6.60 ms; at G=32 kv 13.76 / 2.31 / 11.45 ms (`benchmarks.encoder_forms`, gpu_host.sh
step `encoder-forms`, 2026-11-28 07:13 UTC, docs/benchmarks.md). On the dev VM the rest is about the product's time.
This times, per setting and thread count, interleaved (`encoder_speed.interleaved`), on a codebook fitted to
activation-like data and held-out points (`encoder_speed.fitted_quantizer`, as the encoder benchmark):

- ``current``: `nearest_codewords` as `GroupedVQ.encode` calls it on CPU;
- ``steps of 2^19`` / ``steps of 2^18``: the same with (groups, tokens) steps of at most that many scores (no
  one-step allowance), so a step's scores stay in a smaller cache;
- ``blocks of 16`` / ``blocks of 64``: the block minima over 16 or 64 codewords instead of 32;
- ``min over K``: no blocks (``scores.min(-1)`` and a count of the scores within the limit), the encoder's path for
  a K that is not a multiple of the block;
- ``codeword-major``: the scores as (groups, K, tokens) so that the minimum over K is an elementwise minimum of
  contiguous rows, the count and the index summed the same way (implemented here);

every variant's codes are first checked equal to `reference_nearest_codewords`' (else the script stops). Then, for
``current``, torch.profiler's operator table: each operator's self time per encode.

    python -m benchmarks.encoder_variants --out docs/results/encoder_variants.json
"""

from __future__ import annotations

import contextlib

import torch

from transformers_astra import quantizer as vq

from .encoder_forms import run_settings
from .encoder_speed import fitted_quantizer, interleaved

# (label, quantized width, groups, K): goal 1's kv G=16 K=256, kv G=32 K=256, G=1 hidden K=1024, kv G=16 K=128.
SETTINGS = (("kv G=16 K=256", 1536, 32, 256), ("kv G=32 K=256", 1536, 64, 256), ("hidden G=1 K=1024", 768, 1, 1024),
            ("kv G=16 K=128", 1536, 32, 128))


@contextlib.contextmanager
def constants(**values):
    """The quantizer module's tuning constants set to ``values`` (e.g. ``_ARGMIN_BLOCK=16``) for the block only."""
    saved = {name: getattr(vq, name) for name in values}
    try:
        for name, value in values.items():
            setattr(vq, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(vq, name, value)


def with_constants(function, **values):
    def call():
        with constants(**values):
            return function()

    return call


def codeword_major(points: torch.Tensor, centres: torch.Tensor, summary, max_elements: int) -> torch.Tensor:
    """`nearest_codewords`' codes from (G, K, n) scores: the minimum over K and the count and index of the scores
    within the limit are reductions over the middle dimension (elementwise over contiguous rows of tokens). The
    tolerance and the recheck are the encoder's own. Steps over groups keep a step's scores at most the
    encoder's one-step size."""
    groups, n, _ = points.shape
    size = centres.shape[1]
    squared_norms, radius = summary  # (G, 1, K), (G, 1)
    points = points.contiguous()
    tolerance = vq.score_tolerance(points, radius, squared_norms.dtype)
    positions = vq._positions(size, points.device)[:, None]  # (K, 1)
    step = max(1, vq._ONE_STEP_FACTOR * min(max_elements, vq._ENCODE_CHUNK_ELEMENTS_CPU) // (n * size))
    nearest = torch.empty(groups, n, dtype=torch.long)
    for g in range(0, groups, step):
        gs = slice(g, g + step)
        scores = torch.baddbmm(squared_norms[gs].transpose(1, 2), centres[gs], points[gs].transpose(1, 2), alpha=-2.0)
        limit = scores.amin(1) + tolerance[gs]  # (g, n)
        flags = (scores <= limit[:, None, :]).view(torch.uint8)
        count = flags.sum(1, dtype=torch.int32)
        index = (flags * positions).sum(1, dtype=torch.int32).long()
        unsure = (count != 1) | ~torch.isfinite(limit)
        vq._recheck(points[gs], centres[gs], scores.transpose(1, 2), limit, unsure, index, max_elements)
        nearest[gs] = index
    return nearest


def variants(points: torch.Tensor, centres: torch.Tensor, summary) -> dict:
    budget = vq._ENCODE_CHUNK_ELEMENTS_CPU
    size = centres.shape[1]

    def current():
        return vq.nearest_codewords(points, centres, budget, summary)

    def steps(elements):
        return with_constants(lambda: vq.nearest_codewords(points, centres, elements, summary), _ONE_STEP_FACTOR=1)

    forms = {"current": current, "steps of 2^19": steps(1 << 19), "steps of 2^18": steps(1 << 18)}
    for block in (16, 64):
        if size % block == 0 and size > block:
            forms[f"blocks of {block}"] = with_constants(current, _ARGMIN_BLOCK=block)
    forms["min over K"] = with_constants(current, _ARGMIN_BLOCK=size + 1)
    forms["codeword-major"] = lambda: codeword_major(points, centres, summary, budget)
    return forms


def operator_profile(function, calls: int) -> list[dict]:
    """torch.profiler's operators of ``calls`` calls, by self CPU time: ms and calls per call of ``function``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            function()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"operator": e.key, "self_ms_per_encode": e.self_cpu_time_total / 1e3 / calls, "calls_per_encode": e.count / calls}
            for e in events[:15]]  # fmt: skip


def setting_row(label: str, width: int, groups: int, size: int, tokens: int, threads: int, reps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    quantizer, data = fitted_quantizer(width, groups, size, generator)
    data = data[:tokens] if tokens <= data.shape[0] else data.repeat(-(-tokens // data.shape[0]), 1)[:tokens]
    centres = quantizer.codebook.detach()
    points = data.reshape(-1, groups, width // groups).transpose(0, 1)  # as `GroupedVQ.encode` hands them on
    summary = vq.codebook_summary(centres)
    forms = variants(points, centres, summary)
    reference = vq.reference_nearest_codewords(points, centres)
    for name, form in forms.items():
        if not torch.equal(form(), reference):
            raise AssertionError(f"{name} gives other codes than the reference ({label})")
    torch.set_num_threads(threads)
    for form in forms.values():  # warm-ups beyond `interleaved`'s one
        form(), form()
    timings = interleaved(forms, reps)
    return {"setting": label, "width": width, "groups": groups, "codebook_size": size, "tokens": tokens, "threads": threads,
            "timings": timings, "profile_current": operator_profile(forms["current"], max(3, reps // 3))}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(name for row in rows for name in row["timings"]))
    lines = ["| setting | threads | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row['timings'][n]['median_ms']:.2f}" if n in row["timings"] else "" for n in names]
        lines.append(f"| {row['setting']} | {row['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    rows = run_settings("encoder_variants", __doc__.split("\n")[0], SETTINGS, setting_row, markdown, argv)
    for row in rows:
        top = ", ".join(f"{p['operator']} {p['self_ms_per_encode']:.2f}" for p in row["profile_current"][:6])
        print(f"{row['setting']}, {row['threads']} thread(s), current, ms per encode: {top}")


if __name__ == "__main__":
    main()
