import math

import torch

from benchmarks.code_entropy import entropies


def test_uniform_codes_carry_log2_k_bits_and_a_single_code_none():
    uniform = torch.full((2, 8), 100.0, dtype=torch.float64)
    h, cross = entropies(uniform, uniform)
    assert h == math.log2(8) and abs(cross - math.log2(8)) < 1e-12
    single = torch.zeros(2, 8, dtype=torch.float64)
    single[:, 3] = 50
    h, cross = entropies(single, single)
    assert h == 0 and 0 < cross < 0.1  # add-half smoothing costs a little


def test_training_frequencies_that_miss_the_test_codes_cost_more_than_the_test_entropy():
    train = torch.tensor([[90.0, 10.0, 0.0, 0.0]], dtype=torch.float64)
    test = torch.tensor([[10.0, 90.0, 0.0, 0.0]], dtype=torch.float64)
    h, cross = entropies(train, test)
    assert cross > h > 0
