"""N-agnostic fine-tuning: `set_shards` against a model patched at that N, `RandomShardsCallback` in a Trainer."""

import pytest
import torch
from conftest import make_pair, tiny_gpt2_config
from test_callback import TokenBlocks, training_args
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback

import transformers_astra as astra
from transformers_astra.patch import astra_state
from transformers_astra.random_shards import RandomShardsCallback, set_shards


def patched(num_devices: int, shard_sizes=None):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    config = astra.AstraConfig(num_devices=num_devices, groups=4, codebook_size=16, shard_sizes=shard_sizes)
    astra.patch(model, config)
    torch.manual_seed(1)
    for quantizer in astra.quantizers(model):
        quantizer.codebook.data.normal_()
        quantizer.initialized.fill_(True)
    return model.eval()


@pytest.mark.parametrize("num_devices, sizes", [(2, None), (3, [1.0, 2.0, 0.5]), (1, None)])
def test_set_shards_gives_the_model_patched_at_that_layout(num_devices, sizes):
    model, reference = patched(4), patched(num_devices, sizes)
    config_before = astra_state(model).config
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    four = model(ids).logits
    set_shards(model, num_devices, sizes)
    assert astra_state(model).config is not config_before and config_before.num_devices == 4  # replaced, not mutated
    saved = model.config.quantization_config  # what save_pretrained writes follows the layout
    assert saved.to_dict()["num_devices"] == num_devices and saved.to_dict()["shard_sizes"] == sizes
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert not torch.equal(four, reference(ids).logits)  # the layout matters, so the check above is not vacuous
    set_shards(model, 4)
    torch.testing.assert_close(model(ids).logits, four, rtol=0, atol=0)


def test_set_shards_rejects_a_bad_layout():
    model = patched(2)
    with pytest.raises(ValueError, match="shard_sizes"):
        set_shards(model, 3, [1.0, 1.0])
    with pytest.raises(ValueError, match="num_devices"):
        set_shards(model, 0)
    assert astra_state(model).config.num_devices == 2  # unchanged after the errors


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(num_devices=[]), "num_devices"), (dict(num_devices=[2, 0]), "num_devices"),
     (dict(uneven_probability=1.5), "uneven_probability"), (dict(min_relative_size=0), "min_relative_size")],
)
def test_callback_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RandomShardsCallback(**kwargs)


class LayoutRecorder(TrainerCallback):
    """Records the layout every training forward ran with (a forward pre-hook on the model)."""

    def __init__(self, model):
        self.seen = []
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.training:
            config = astra_state(module).config
            self.seen.append((config.num_devices, config.shard_sizes))


def test_callback_draws_a_layout_per_step_and_restores_the_model_config(tmp_path):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, astra.AstraConfig(num_devices=4, groups=4, codebook_size=16))
    original = astra_state(model).config
    shards = RandomShardsCallback(num_devices=(2, 3, 4, 6), uneven_probability=0.5, seed=3)
    recorder = LayoutRecorder(model)
    trainer = Trainer(model=model.train(), args=training_args(tmp_path, max_steps=16, gradient_accumulation_steps=2),
                      train_dataset=TokenBlocks(rows=64, length=16),
                      callbacks=[astra.AstraNAQCallback(), shards])
    trainer.train()
    assert len(shards.history) == 16
    # Two micro-batches per optimizer step, both with that step's draw.
    assert recorder.seen == [draw for draw in shards.history for _ in range(2)]
    counts = {n for n, _ in shards.history}
    assert len(counts) >= 3 and counts <= {2, 3, 4, 6}
    uneven = [sizes for _, sizes in shards.history if sizes is not None]
    assert uneven and all(min(s) >= 0.25 * max(s) - 1e-6 for s in uneven)
    assert astra_state(model).config == original
    assert model.config.quantization_config.to_dict()["num_devices"] == original.num_devices
    # The same seed draws the same layouts.
    again = RandomShardsCallback(num_devices=(2, 3, 4, 6), uneven_probability=0.5, seed=3)
    assert [again.draw() for _ in range(16)] == shards.history
