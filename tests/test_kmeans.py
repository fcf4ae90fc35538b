"""`kmeans` (quantizer.py) against a plain-loop Lloyd iteration, and its edge cases."""

import warnings

import pytest
import torch

from transformers_astra.quantizer import GroupedVQ, kmeans


def lloyd_reference(points: list[list[list[float]]], centres: list[list[list[float]]], iters: int):
    """Lloyd's algorithm in plain Python loops, group by group: nearest centre (first on ties), then means."""
    result = []
    for group_points, group_centres in zip(points, centres):
        current = [list(c) for c in group_centres]
        for _ in range(iters):
            sums = [[0.0] * len(current[0]) for _ in current]
            counts = [0] * len(current)
            for point in group_points:
                distances = [sum((p - c) ** 2 for p, c in zip(point, centre)) for centre in current]
                best = distances.index(min(distances))
                counts[best] += 1
                sums[best] = [s + p for s, p in zip(sums[best], point)]
            current = [[s / n for s in total] if n else old for total, n, old in zip(sums, counts, current)]
        result.append(current)
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("max_elements", [1 << 20, 8])  # one distance chunk, or many
def test_kmeans_equals_plain_loop_lloyd(max_elements):
    generator = torch.Generator().manual_seed(3)
    samples = torch.randn(3, 40, 2, dtype=torch.float64, generator=generator)
    samples[1] *= 5
    init = samples[:, :5].clone()
    got = kmeans(samples, 5, num_iters=6, init=init, max_elements=max_elements)
    want = lloyd_reference(samples.tolist(), init.tolist(), iters=6)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, init)  # it did move


def test_kmeans_start_is_seeded_distinct_samples_and_ignores_global_rng():
    samples = torch.randn(4, 30, 3)
    torch.manual_seed(0)
    first = kmeans(samples, 8, num_iters=0, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(99)
    again = kmeans(samples, 8, num_iters=0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, kmeans(samples, 8, num_iters=0, generator=torch.Generator().manual_seed(6)))
    for group in range(4):  # every start centre is a sample of its own group, no sample twice
        matches = (first[group][:, None] == samples[group][None]).all(-1)
        assert matches.sum(1).eq(1).all() and matches.sum(0).le(1).all()


def test_fewer_samples_than_codewords_warns_and_keeps_every_sample():
    samples = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="3 samples for 8 codewords: 5 codewords per group repeat"):
        centres = kmeans(samples, 8, num_iters=5)
    for group in range(2):  # every sample is a centre (an exact fit); the other centres repeat samples
        assert all((centres[group] == s).all(-1).any() for s in samples[group])
        assert all((samples[group] == c).all(-1).any() for c in centres[group])
    vq = GroupedVQ(width=8, groups=2, codebook_size=8)
    with pytest.warns(UserWarning):
        vq.kmeans_init(samples.transpose(0, 1).reshape(3, 8))
    decoded = vq.decode(vq.encode(samples.transpose(0, 1).reshape(3, 8)))
    assert torch.equal(decoded, samples.transpose(0, 1).reshape(3, 8))


def test_enough_samples_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kmeans(torch.randn(1, 16, 2), 16, num_iters=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples_are_refused(bad):
    samples = torch.randn(2, 50, 3)
    samples[1, 7, 2] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite value"):
        kmeans(samples, 4)


def test_overflowing_samples_are_refused():
    samples = torch.randn(1, 50, 3)
    samples[0, 0] = 3e38  # finite in fp32, but its squared norm is not
    with pytest.raises(ValueError, match="too large"):
        kmeans(samples, 4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="groups, n, dim"):
        kmeans(torch.randn(10, 3), 2)
    with pytest.raises(ValueError, match="no samples"):
        kmeans(torch.randn(2, 0, 3), 2)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(torch.randn(2, 10, 3), 2, init=torch.randn(2, 3, 3))


def test_failed_kmeans_init_leaves_the_codebook_untouched():
    vq = GroupedVQ(width=4, groups=2, codebook_size=4)
    before = vq.codebook.detach().clone()
    samples = torch.randn(20, 4)
    samples[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vq.kmeans_init(samples)
    assert torch.equal(vq.codebook.detach(), before) and not bool(vq.initialized)
