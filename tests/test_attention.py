"""Patched models against the unpatched Hugging Face model (the slow, obvious reference)."""

import pytest
import torch
from conftest import (
    GPT2_CLASSES,
    TOL,
    VIT_CLASSES,
    gpt2_batch,
    main_output,
    make_lossless,
    make_pair,
    tiny_gpt2_config,
    tiny_vit_config,
    vit_batch,
)
from transformers import GPT2LMHeadModel, GPT2Model, ViTModel

import transformers_astra as astra


def valid_positions(output: torch.Tensor, batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None or output.ndim < 3:
        return output
    return output[mask.bool()]


def vit_padded_batch() -> dict:
    batch = vit_batch()
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, -3:] = 0  # hide the last three patches of the second image
    return {**batch, "attention_mask": mask}


CASES = [(cls, tiny_gpt2_config, gpt2_batch) for cls in GPT2_CLASSES] + [
    (cls, tiny_vit_config, vit_batch) for cls in VIT_CLASSES
]


def assert_close_to_reference(model, reference, batch):
    with torch.no_grad():
        got, want = main_output(model(**batch)), main_output(reference(**batch))
    assert got.shape == want.shape
    diff = (valid_positions(got, batch) - valid_positions(want, batch)).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("model_class, make_config, make_batch", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_one_device_equals_unpatched(model_class, make_config, make_batch, padded):
    model, reference = make_pair(model_class, make_config())
    astra.patch(model, num_devices=1, groups=4, codebook_size=8)
    if padded:
        batch = gpt2_batch(left_pad=4) if make_batch is gpt2_batch else vit_padded_batch()
        if model_class.__name__ == "GPT2ForSequenceClassification":
            batch = {"input_ids": batch["input_ids"].flip(1), "attention_mask": batch["attention_mask"].flip(1)}
    else:
        batch = make_batch()
    assert_close_to_reference(model, reference, batch)


@pytest.mark.parametrize("num_devices, shard_sizes", [(2, None), (3, None), (4, None), (3, [1, 3, 2])])
@pytest.mark.parametrize("model_class, make_config, make_batch", CASES)
def test_full_precision_sequence_parallel_equals_unpatched(model_class, make_config, make_batch, num_devices, shard_sizes):
    model, reference = make_pair(model_class, make_config())
    astra.patch(model, num_devices=num_devices, groups=4, codebook_size=8, distributed_cls=False, shard_sizes=shard_sizes)
    batch = gpt2_batch(length=11, left_pad=3) if make_batch is gpt2_batch else make_batch()  # 11, 17 tokens: uneven
    with astra.full_precision(model):
        assert_close_to_reference(model, reference, batch)


@pytest.mark.parametrize("quantize", ["hidden", "kv"])
@pytest.mark.parametrize(
    "model_class, make_config, make_batch",
    [(GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch), (ViTModel, tiny_vit_config, vit_batch)],
)
def test_lossless_codebook_equals_unpatched(model_class, make_config, make_batch, quantize):
    model, reference = make_pair(model_class, make_config())
    astra.patch(model, num_devices=3, groups=2, codebook_size=64, quantize=quantize, distributed_cls=False)
    batch = make_batch()
    make_lossless(model, batch)
    with astra.capture_codes(model) as codes:
        assert_close_to_reference(model, reference, batch)
    assert len(codes) == 2


def calibrated(model, batches, **config):
    astra.patch(model, **config)
    astra.calibrate(model, batches, progress=False)
    return model


def test_quantized_output_differs_but_stays_close():
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    batch = gpt2_batch(batch=4, length=16)
    calibrated(model, [batch], num_devices=4, groups=8, codebook_size=16)
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
    diff = (got - want).abs().max().item()
    assert 0 < diff < want.abs().max().item()


@pytest.mark.parametrize("quantize", ["hidden", "kv"])
def test_causality_token_never_changes_earlier_outputs(quantize):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    batch = gpt2_batch(batch=1, length=12)
    calibrated(model, [gpt2_batch(batch=4, length=12, seed=1)], num_devices=3, groups=4, codebook_size=16, quantize=quantize)
    changed = batch["input_ids"].clone()
    for position in (3, 4, 8, 11):
        changed[0, position] = (changed[0, position] + 7) % 61
        with torch.no_grad():
            before, after = model(**batch).logits, model(input_ids=changed).logits
        assert torch.allclose(before[:, :position], after[:, :position], atol=1e-6)
        assert not torch.allclose(before[:, position:], after[:, position:])
        changed[0, position] = batch["input_ids"][0, position]


def test_perturbation_that_keeps_codes_changes_nothing_on_other_devices_vit():
    model, _ = make_pair(ViTModel, tiny_vit_config())
    batch = vit_batch(batch=1)
    calibrated(model, [vit_batch(batch=8, seed=1)], num_devices=2, groups=4, codebook_size=16, distributed_cls=False)
    layout = astra.ShardLayout.for_sequence(17, 2)  # shard 0: CLS + 8 patches, shard 1: 8 patches
    perturbed = batch["pixel_values"].clone()
    perturbed[0, :, -1, -1] += 1e-4  # bottom-right pixel: a patch of shard 1
    with torch.no_grad(), astra.capture_codes(model) as codes:
        before = model(**batch).last_hidden_state
        codes_before = {k: v.clone() for k, v in codes.items()}
        after = model(pixel_values=perturbed).last_hidden_state
    assert all(torch.equal(codes_before[k], codes[k]) for k in codes)
    start, end = layout.bounds(1)
    assert not torch.equal(before[:, start:end], after[:, start:end])  # its own shard sees the change...
    assert torch.equal(before[:, :end - 8], after[:, :end - 8])  # ...shard 0 only sees the unchanged codes


def test_perturbation_that_keeps_codes_changes_nothing_later_gpt2():
    model, _ = make_pair(GPT2Model, tiny_gpt2_config())
    calibrated(model, [gpt2_batch(batch=4, seed=1)], num_devices=2, groups=4, codebook_size=16)
    embeds = model.wte(gpt2_batch(batch=1)["input_ids"]).detach()
    perturbed = embeds.clone()
    perturbed[0, 2] += 1e-5  # token 2 lives on device 0; device 1 sees it through codes only
    with torch.no_grad(), astra.capture_codes(model) as codes:
        before = model(inputs_embeds=embeds).last_hidden_state
        codes_before = {k: v.clone() for k, v in codes.items()}
        after = model(inputs_embeds=perturbed).last_hidden_state
    assert all(torch.equal(codes_before[k], codes[k]) for k in codes)
    assert not torch.equal(before[:, 2], after[:, 2])
    assert torch.equal(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize(
    "model_class, make_config, make_batch",
    [(GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch), (ViTModel, tiny_vit_config, vit_batch)],
)
def test_output_attentions_returns_weights(model_class, make_config, make_batch):
    model, _ = make_pair(model_class, make_config())
    batch = make_batch()
    calibrated(model, [batch], num_devices=3, groups=4, codebook_size=8)
    with torch.no_grad():
        output = model(**batch, output_attentions=True)
        plain = model(**batch)
    tokens = main_output(plain).shape[1] if model_class is GPT2LMHeadModel else 16 + 3
    assert len(output.attentions) == 2
    weights = output.attentions[0]
    assert weights.shape == (2, 4, tokens, tokens)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(main_output(output), main_output(plain), atol=1e-5)
    if model_class is GPT2LMHeadModel:
        assert torch.all(weights.triu(1) == 0)


def test_batch_is_the_same_as_one_by_one():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    batch = gpt2_batch(batch=3, length=10)
    calibrated(model, [batch], num_devices=3, groups=4, codebook_size=16)
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(input_ids=batch["input_ids"][i : i + 1]).logits for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_distributed_class_tokens_pool_every_shard():
    model, reference = make_pair(ViTModel, tiny_vit_config())
    astra.patch(model, num_devices=4, groups=4, codebook_size=8)
    batch = vit_batch()
    with torch.no_grad(), astra.full_precision(model):
        output = model(**batch, output_hidden_states=True)
    assert output.last_hidden_state.shape == reference(**batch).last_hidden_state.shape
    assert output.hidden_states[1].shape[1] == 16 + 4  # one CLS copy per device inside the encoder
    # With one device DCT is the plain model.
    single, single_reference = make_pair(ViTModel, tiny_vit_config())
    astra.patch(single, num_devices=1)
    assert_close_to_reference(single, single_reference, batch)
