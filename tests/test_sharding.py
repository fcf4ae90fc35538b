import pytest
import torch

from transformers_astra import ShardLayout, split_sizes


def test_even_and_uneven_splits():
    assert split_sizes(12, 4) == [3, 3, 3, 3]
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(5, 5) == [1, 1, 1, 1, 1]


def test_weighted_split_is_exact_when_weights_sum_to_length():
    assert split_sizes(10, 3, [5, 3, 2]) == [5, 3, 2]
    assert split_sizes(20, 3, [5, 3, 2]) == [10, 6, 4]
    assert sum(split_sizes(11, 3, [1, 1, 1])) == 11


def test_more_devices_than_tokens_is_an_error():
    with pytest.raises(ValueError, match="num_devices=4"):
        split_sizes(3, 4)


def test_layout_with_class_tokens():
    layout = ShardLayout.for_sequence(16 + 3, 3, cls_per_shard=1)
    assert layout.sizes == (7, 6, 6)
    assert layout.offsets == (0, 7, 13, 19)
    assert torch.equal(layout.shard_ids(), torch.tensor([0] * 7 + [1] * 6 + [2] * 6))
    # the layout says it has per-shard class tokens; one of the same sizes without them is another layout
    assert layout.class_tokens_per_shard == 1 and ShardLayout.for_sequence(19, 3).class_tokens_per_shard == 0
    assert layout != ShardLayout((7, 6, 6)) and layout == ShardLayout((7, 6, 6), class_tokens_per_shard=1)
