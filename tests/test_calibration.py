"""`astra.calibrate` refuses NaN/inf activations by batch and layer and never leaves a half-written codebook."""

import pytest
import torch
from conftest import gpt2_batch, make_pair, tiny_gpt2_config, tiny_vit_config, vit_batch
from transformers import GPT2LMHeadModel, ViTForImageClassification

import transformers_astra as astra
from transformers_astra.quantizer import GroupedVQ


def gpt2_embeds(seed: int) -> dict:
    return {"inputs_embeds": torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(seed))}


def poisoned(batch: dict) -> dict:
    """The same batch with one NaN in its first tensor (one input value of one token)."""
    key = next(iter(batch))
    value = batch[key].clone()
    value.view(-1)[5] = float("nan")
    return {**batch, key: value}


CASES = {
    "gpt2": (GPT2LMHeadModel, tiny_gpt2_config, lambda seed: gpt2_embeds(seed), gpt2_batch),
    "vit": (ViTForImageClassification, tiny_vit_config, lambda seed: vit_batch(batch=8, seed=seed), vit_batch),
}


@pytest.mark.parametrize("family", CASES)
def test_nan_in_calibration_is_refused_and_codebooks_stay_usable(family):
    model_class, make_config, calibration_batch, eval_batch = CASES[family]
    model, _ = make_pair(model_class, make_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    astra.calibrate(model, [calibration_batch(1)], progress=False)
    before = [q.codebook.detach().clone() for q in astra.quantizers(model)]
    with torch.no_grad():
        good_output = model(**eval_batch()).logits
    with pytest.raises(ValueError, match=r"calibration batch 1: layer 0's activations hold \d+ NaN or infinite"):
        astra.calibrate(model, [calibration_batch(2), poisoned(calibration_batch(3))], progress=False)
    for quantizer, codebook in zip(astra.quantizers(model), before):
        assert torch.equal(quantizer.codebook.detach(), codebook) and bool(quantizer.initialized)
    with torch.no_grad():
        assert torch.equal(model(**eval_batch()).logits, good_output)  # finite, as before the bad calibration


def test_nan_refused_on_an_uncalibrated_model_leaves_it_uninitialised():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    with pytest.raises(ValueError, match="calibration batch 0: layer 0"):
        astra.calibrate(model, [poisoned(gpt2_embeds(0))], progress=False)
    assert not any(bool(q.initialized) for q in astra.quantizers(model))
    assert all(torch.isfinite(q.codebook).all() for q in astra.quantizers(model))


def test_a_failure_in_a_later_layer_changes_no_earlier_codebook(monkeypatch):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    before = [q.codebook.detach().clone() for q in astra.quantizers(model)]
    last = astra.quantizers(model)[-1]
    real_fit = GroupedVQ.fit_codebook

    def fit(self, samples, **kwargs):
        if self is last:
            samples = samples.clone()
            samples[0, 0] = 3e38  # finite activations whose k-means distances overflow
        return real_fit(self, samples, **kwargs)

    monkeypatch.setattr(GroupedVQ, "fit_codebook", fit)
    with pytest.raises(ValueError, match="calibration of layer 1: kmeans samples are too large"):
        astra.calibrate(model, [gpt2_embeds(0)], progress=False)
    for quantizer, codebook in zip(astra.quantizers(model), before):
        assert torch.equal(quantizer.codebook.detach(), codebook) and not bool(quantizer.initialized)


def test_calibration_is_seeded_and_leaves_the_global_rng_alone():
    codebooks = []
    for global_seed in (0, 1):
        model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
        astra.patch(model, num_devices=2, groups=4, codebook_size=16)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        astra.calibrate(model, [gpt2_batch(batch=4)], max_samples=20, progress=False, seed=3)
        assert torch.equal(torch.get_rng_state(), state)
        codebooks.append(torch.cat([q.codebook.detach().flatten() for q in astra.quantizers(model)]))
    assert torch.equal(codebooks[0], codebooks[1])
