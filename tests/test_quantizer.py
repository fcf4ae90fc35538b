import os
import subprocess
import sys

import pytest
import torch

from transformers_astra import GroupedVQ
from transformers_astra import quantizer as quantizer_module


def test_encode_matches_brute_force_nearest_codeword(monkeypatch):
    vq = GroupedVQ(width=24, groups=4, codebook_size=16)
    x = torch.randn(3, 7, 24)
    groups = x.reshape(-1, 4, 6)
    expected = torch.stack([torch.cdist(groups[:, g], vq.codebook[g].detach()).argmin(-1) for g in range(4)], -1)
    assert torch.equal(vq.encode(x).reshape(-1, 4), expected)
    monkeypatch.setattr(quantizer_module, "_ENCODE_CHUNK_ELEMENTS", 64)  # force several chunks
    monkeypatch.setattr(quantizer_module, "_ENCODE_CHUNK_ELEMENTS_CPU", 64)
    assert torch.equal(vq.encode(x).reshape(-1, 4), expected)


def test_decode_returns_codewords():
    vq = GroupedVQ(width=8, groups=2, codebook_size=5)
    codes = torch.tensor([[[1, 4]], [[0, 2]]])
    decoded = vq.decode(codes)
    assert decoded.shape == (2, 1, 8)
    assert torch.equal(decoded[0, 0], torch.cat([vq.codebook[0, 1], vq.codebook[1, 4]]).detach())


def test_codes_are_integers_below_codebook_size():
    vq = GroupedVQ(width=16, groups=2, codebook_size=10)
    codes = vq.encode(torch.randn(50, 16))
    assert codes.dtype == torch.long and codes.shape == (50, 2) and codes.min() >= 0 and codes.max() < 10


def test_kmeans_init_fits_clustered_data():
    centres = torch.randn(4, 8) * 10
    samples = centres.repeat(50, 1) + 0.01 * torch.randn(200, 8)
    vq = GroupedVQ(width=8, groups=1, codebook_size=16)  # spare codewords: plain k-means can merge clusters
    assert not bool(vq.initialized)
    torch.manual_seed(0)
    vq.kmeans_init(samples, num_iters=20)
    assert bool(vq.initialized)
    decoded = vq.decode(vq.encode(samples))
    assert (decoded - samples).abs().max() < 0.2


def test_straight_through_gradients_reach_input_and_codebook():
    vq = GroupedVQ(width=8, groups=2, codebook_size=4).train()
    x = torch.randn(5, 8, requires_grad=True)
    out, codes, commitment = vq(x, noise_scale=0.0)
    assert torch.allclose(out, vq.decode(codes))
    (out.sum() + commitment).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_noise_only_in_training_and_scaled_by_the_residual():
    vq = GroupedVQ(width=8, groups=2, codebook_size=4)
    x = torch.randn(2000, 8)
    vq.eval()
    clean, codes, _ = vq(x, noise_scale=1.0)
    assert torch.equal(clean, vq.decode(codes))
    vq.train()
    noisy, _, _ = vq(x, noise_scale=1.0)
    added = (noisy - clean).std(0)
    residual_rms = (x - clean).pow(2).mean(0).sqrt()
    assert torch.allclose(added, residual_rms, rtol=0.15)
    per_group, _, _ = vq(x, noise_scale=1.0, noise_granularity="group")
    assert not torch.equal(per_group, clean)


# --- the fast encoder against the reference: same codes bit for bit --------------------------------------


def _reference_codes(vq: GroupedVQ, x: torch.Tensor) -> torch.Tensor:
    """Every score at once, plain argmin: (n, width) -> (n, G)."""
    codebook = vq.codebook.detach()
    points = x.reshape(-1, vq.groups, vq.group_width).to(codebook.dtype).transpose(0, 1)
    return quantizer_module.reference_nearest_codewords(points, codebook).T


def _tie_heavy_codebook(groups: int, size: int, group_width: int, generator: torch.Generator) -> torch.Tensor:
    """Codewords with exact duplicates (every odd index repeats the one before) and a repeated block."""
    codebook = torch.randn(groups, size, group_width, generator=generator)
    codebook[:, 1::2] = codebook[:, 0::2]
    codebook[:, -8:] = codebook[:, :8]
    return codebook


def _adversarial_points(codebook: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, G * d) points: codewords themselves, midpoints of two codewords (near-ties), and far points."""
    groups, size, group_width = codebook.shape
    first = torch.randint(size, (n, groups), generator=generator)
    second = torch.randint(size, (n, groups), generator=generator)
    take = lambda index: codebook[torch.arange(groups), index]  # noqa: E731  (n, G, d)
    midpoints = (take(first) + take(second)) / 2
    kind = torch.randint(3, (n, groups, 1), generator=generator)
    far = 1e3 * torch.randn(n, groups, group_width, generator=generator)
    points = torch.where(kind == 0, take(first), torch.where(kind == 1, midpoints, far))
    return points.reshape(n, groups * group_width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 8, 32])
def test_fast_encode_gives_the_reference_codes(monkeypatch, groups, dtype):
    generator = torch.Generator().manual_seed(groups)
    vq = GroupedVQ(width=256, groups=groups, codebook_size=256).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=generator))
    vq.to(dtype)
    random_points = torch.randn(203, 256, generator=generator).to(dtype)
    tie_points = _adversarial_points(vq.codebook.detach().float(), 203, generator).to(dtype)
    for chunk in (None, 3 * groups * 256):  # one step, and many steps of 3 tokens
        if chunk is not None:
            monkeypatch.setattr(quantizer_module, "_ENCODE_CHUNK_ELEMENTS_CPU", chunk)
        for points in (random_points, tie_points):
            for n in (0, 1, 2, 49, 203):  # empty, single, odd token counts
                codes = vq.encode(points[:n])
                assert codes.shape == (n, groups) and codes.dtype == torch.long
                assert torch.equal(codes, _reference_codes(vq, points[:n]))


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_duplicate_codewords_go_to_the_lowest_index(groups):
    generator = torch.Generator().manual_seed(1)
    vq = GroupedVQ(width=256, groups=groups, codebook_size=128).eval()
    with torch.no_grad():
        vq.codebook.copy_(_tie_heavy_codebook(groups, 128, 256 // groups, generator))
    points = _adversarial_points(vq.codebook.detach(), 301, generator)
    codes = vq.encode(points)
    assert torch.equal(codes, _reference_codes(vq, points))
    assert (codes % 2 == 0).all() and (codes < 120).all()  # never an odd duplicate nor the repeated tail block
    own = vq.encode(vq.codebook.detach()[:, ::2].transpose(0, 1).reshape(-1, 256))  # each even codeword itself
    expected = torch.cat([torch.arange(0, 120, 2), torch.arange(0, 8, 2)])  # the tail repeats codewords 0..7
    assert torch.equal(own, expected[:, None].expand(-1, groups))


def test_encode_codes_do_not_depend_on_the_other_tokens():
    """A token's code is the same alone, in a batch, and at any chunk position (runtime vs simulation)."""
    generator = torch.Generator().manual_seed(2)
    vq = GroupedVQ(width=768, groups=32, codebook_size=1024).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=generator))
    points = torch.cat([torch.randn(40, 768, generator=generator), _adversarial_points(vq.codebook.detach(), 40, generator)])
    together = vq.encode(points)
    assert torch.equal(together, _reference_codes(vq, points))
    assert torch.equal(torch.cat([vq.encode(point[None]) for point in points]), together)
    assert torch.equal(vq.encode(points[7:]), together[7:])


@pytest.mark.parametrize("size", [16, 48, 64, 96, 256, 1024])  # 16, 48: one pass; the others in blocks of 32
def test_exact_ties_infinities_and_nan_resolve_as_the_reference(size):
    """Small integers make many distances exactly equal, across blocks and inside them."""
    generator = torch.Generator().manual_seed(size)
    centres = torch.randint(-2, 3, (2, size, 4), generator=generator).float()
    points = torch.randint(-3, 4, (2, 300, 4), generator=generator).float()
    points[0, 0] = float("inf")
    points[0, 1, 2] = float("nan")
    points[1, 2] = float("-inf")
    points[1, 3, 0] = 1e30  # its squared norm overflows float32
    expected = quantizer_module.reference_nearest_codewords(points, centres)
    for max_elements in (1 << 20, 2 * size * 7):  # one chunk, or chunks of 7 points
        assert torch.equal(quantizer_module.nearest_codewords(points, centres, max_elements), expected)
    assert int(expected[0, 1]) == 0  # NaN distances: argmin's rule, the first one


def test_encode_follows_every_codebook_update():
    """The eval-mode norm cache is never stale: in-place edits, optimizer steps, loads, dtype moves, .data."""
    generator = torch.Generator().manual_seed(4)
    vq = GroupedVQ(width=64, groups=8, codebook_size=128).eval()
    points = torch.randn(50, 64, generator=generator)

    def check():
        assert torch.equal(vq.encode(points), _reference_codes(vq, points))

    check()
    with torch.no_grad():
        vq.codebook.mul_(-1.5)  # in place: same storage, new version
    check()
    with torch.no_grad():
        vq.codebook[:, 3] = 0.0
    check()
    optimizer = torch.optim.SGD(vq.parameters(), lr=10.0)
    vq.train()
    out, _, commitment = vq(points)
    (out.pow(2).sum() + commitment).backward()
    optimizer.step()
    vq.eval()
    check()
    vq.load_state_dict({"codebook": torch.randn(8, 128, 8, generator=generator), "initialized": torch.tensor(True)})
    check()
    vq.load_codebook(torch.randn(8, 128, 8, generator=generator))
    check()
    vq.to(torch.float64)
    check()
    vq.to(torch.float32)
    vq.codebook.data = torch.randn(8, 128, 8, generator=generator)  # a new tensor
    check()
    vq.codebook = torch.nn.Parameter(vq.codebook.data)  # a new parameter over the same storage, a fresh version counter
    with torch.no_grad():
        for _ in range(vq.codebook._version + 3):  # ... which may reach the cached version number
            vq.codebook.add_(1.0)
            check()
    vq.train()
    vq.codebook.data.mul_(-1)  # no version bump: made in training mode, where nothing is cached
    vq.eval()
    check()
    with torch.inference_mode():
        check()


def test_encode_rejects_the_wrong_width():
    vq = GroupedVQ(width=16, groups=2, codebook_size=8)
    with pytest.raises(ValueError, match="width 16"):
        vq.encode(torch.randn(3, 12))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["highest", "high"])  # "high": TF32 matmuls, a wider rounding bound
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_encode_gives_the_reference_codes(dtype, precision):
    generator = torch.Generator().manual_seed(5)
    vq = GroupedVQ(width=768, groups=32, codebook_size=1024).eval()
    with torch.no_grad():
        vq.codebook.copy_(_tie_heavy_codebook(32, 1024, 24, generator))
    vq.to(dtype)
    points = torch.cat([torch.randn(300, 768, generator=generator), _adversarial_points(vq.codebook.detach().float(), 300, generator)]).to(dtype)
    expected = _reference_codes(vq, points)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        codes = vq.cuda().encode(points.cuda())
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(codes.cpu(), expected)


def test_reduced_precision_matmul_settings_keep_the_codes_exact():
    """TF32/bf16 matmul settings (legacy and per-backend, even mixed) widen the bound; codes stay exact.

    In a subprocess: the per-backend settings cannot be fully restored afterwards."""
    script = """
import torch
from transformers_astra import GroupedVQ
from transformers_astra.quantizer import _matmul_unit_roundoff, reference_nearest_codewords
generator = torch.Generator().manual_seed(6)
vq = GroupedVQ(width=256, groups=8, codebook_size=256).eval()
x = torch.randn(200, 256, generator=generator)
expected = reference_nearest_codewords(x.reshape(-1, 8, 32).transpose(0, 1), vq.codebook.detach()).T
cpu = torch.device("cpu")
assert _matmul_unit_roundoff(torch.float32, cpu) == 2.0**-24
torch.set_float32_matmul_precision("medium")
assert _matmul_unit_roundoff(torch.float32, cpu) == 2.0**-8 and torch.equal(vq.encode(x), expected)
torch.set_float32_matmul_precision("highest")
matmul = getattr(torch.backends.mkldnn, "matmul", None)
if hasattr(matmul, "fp32_precision"):
    matmul.fp32_precision = "bf16"  # new per-backend setting, now mixed with the legacy one
    assert _matmul_unit_roundoff(torch.float32, cpu) == 2.0**-8 and torch.equal(vq.encode(x), expected)
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("groups", [1, 8, 32])
def test_fast_nearest_codewords_picks_a_nearest_codeword(groups):
    """Fine-tuning's encoder on accelerators (no recheck): every code is the reference's or as near within rounding."""
    generator = torch.Generator().manual_seed(groups)
    vq = GroupedVQ(width=256, groups=groups, codebook_size=256)
    x = torch.randn(3000, 256, generator=generator)
    with torch.no_grad():
        vq.codebook.copy_(_tie_heavy_codebook(groups, 256, 256 // groups, generator))
    expected = _reference_codes(vq, x)
    points = x.reshape(-1, groups, 256 // groups).transpose(0, 1)
    for chunk in (1 << 20, 2000):  # one chunk, and several
        codes = quantizer_module.fast_nearest_codewords(points, vq.codebook.detach(), chunk).T
        assert codes.shape == (3000, groups) and codes.dtype == torch.long
        book = vq.codebook.detach().double()
        chosen = (points.transpose(0, 1).double() - book[torch.arange(groups), codes]).square().sum(-1)
        best = (points.transpose(0, 1).double() - book[torch.arange(groups), expected]).square().sum(-1)
        assert torch.all(chosen <= best + 1e-4 * (1 + best))  # as near as the nearest, up to float32 rounding
        assert (codes == expected).float().mean() > 0.95  # the duplicates may go to either copy
    assert quantizer_module.fast_nearest_codewords(points[:, :0], vq.codebook.detach(), 100).shape == (groups, 0)


def _count_exact_calls(monkeypatch) -> list:
    calls, real = [], quantizer_module.nearest_codewords
    monkeypatch.setattr(quantizer_module, "nearest_codewords", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_training_forward_on_cpu_and_eval_forward_encode_exactly(monkeypatch):
    vq = GroupedVQ(width=64, groups=8, codebook_size=64)
    x = torch.randn(100, 64)
    calls = _count_exact_calls(monkeypatch)
    _, train_codes, _ = vq.train()(x)
    assert len(calls) == 1 and torch.equal(train_codes, _reference_codes(vq, x))
    _, eval_codes, _ = vq.eval()(x)
    assert len(calls) == 2 and torch.equal(eval_codes, train_codes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_forward_on_cuda_skips_the_exact_recheck(monkeypatch):
    vq = GroupedVQ(width=256, groups=32, codebook_size=256).cuda()
    x = torch.randn(2000, 256, device="cuda")
    calls = _count_exact_calls(monkeypatch)
    _, codes, _ = vq.train()(x)
    assert not calls
    book = vq.codebook.detach().double()
    points = x.reshape(-1, 32, 8).double()
    chosen = (points - book[torch.arange(32, device="cuda"), codes]).square().sum(-1)
    expected = _reference_codes(vq, x)
    best = (points - book[torch.arange(32, device="cuda"), expected]).square().sum(-1)
    assert torch.all(chosen <= best + 1e-4 * (1 + best))
    _, eval_codes, _ = vq.eval()(x)
    assert calls and torch.equal(eval_codes, expected)


def test_score_block_covers_every_group_and_token_in_even_steps():
    # A ViT rank's 50 tokens: one step up to 4x the budget; beyond, every token of a few groups per step.
    assert quantizer_module.score_block(64, 50, 1024, 1 << 20) == (64, 50)
    assert quantizer_module.score_block(64, 100, 1024, 1 << 20) == (10, 100)
    assert quantizer_module.score_block(32, 256, 1024, 1 << 20) == (4, 256)
    assert quantizer_module.score_block(32, 1024, 1024, 1 << 20) == (1, 1024)
    assert quantizer_module.score_block(32, 3000, 1024, 1 << 20) == (1, 1000)
    assert quantizer_module.score_block(8, 10, 16, 1 << 20) == (8, 10)  # all in one step
    assert quantizer_module.score_block(8, 10, 16, 1) == (1, 1)  # at least one group and one token
    assert quantizer_module.score_block(16, 49, 128, 3 * 49 * 128) == (3, 49)  # the test below's group steps
    # Accelerators' 16 M-entry budget is not multiplied: GPT2's 1024 tokens at G=32 in two steps of 64 MiB.
    assert quantizer_module.score_block(32, 1024, 1024, 1 << 24) == (16, 1024)


@pytest.mark.parametrize("max_elements", [1 << 20, 3 * 49 * 128, 49 * 128, 20 * 128])  # 1 step; 3 or 1 groups; token steps
def test_group_steps_give_the_reference_codes(max_elements):
    """Steps over groups (all tokens) and over tokens give the codes of the reference, ties and duplicates included."""
    generator = torch.Generator().manual_seed(3)
    centres = _tie_heavy_codebook(16, 128, 4, generator)
    points = _adversarial_points(centres, 49, generator).reshape(49, 16, 4).transpose(0, 1)
    expected = quantizer_module.reference_nearest_codewords(points, centres)
    assert torch.equal(quantizer_module.nearest_codewords(points, centres, max_elements), expected)
    assert torch.equal(quantizer_module.nearest_codewords(points.contiguous(), centres, max_elements), expected)


@pytest.mark.parametrize("length", [8, 32, 256, 300])
def test_count_and_sum_of_a_mask_by_integer_sums(length):
    """`_count_and_sum` (bytes summed as integers) against bool counts and float position sums."""
    generator = torch.Generator().manual_seed(length)
    positions = quantizer_module._positions(length, torch.device("cpu"))
    assert torch.equal(positions.long(), torch.arange(length))
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = torch.rand(3, 5, length, generator=generator) < density
        count, total = quantizer_module._count_and_sum(mask, positions)
        assert torch.equal(count.long(), mask.sum(-1))
        assert torch.equal(total.long(), (mask.double() * torch.arange(length).double()).sum(-1).long())
