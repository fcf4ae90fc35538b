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
