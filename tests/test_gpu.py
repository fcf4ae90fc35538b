"""CUDA checks of the core (skipped without a GPU; run on the device machine before a release)."""

import pytest
import torch
from conftest import LLAMA_FAMILIES, TOL, gpt2_batch, make_pair, tiny_gpt2_config, tiny_llama, tiny_vit_config, vit_batch
from transformers import GPT2LMHeadModel, ViTForImageClassification

import transformers_astra as astra

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def to_cuda(batch: dict) -> dict:
    return {key: value.cuda() for key, value in batch.items()}


@pytest.mark.parametrize(
    "model_class, make_config, make_batch",
    [(GPT2LMHeadModel, tiny_gpt2_config, gpt2_batch), (ViTForImageClassification, tiny_vit_config, vit_batch)],
)
def test_full_precision_on_cuda_equals_unpatched(model_class, make_config, make_batch):
    model, reference = make_pair(model_class, make_config())
    model, reference = model.cuda(), reference.cuda()
    astra.patch(model, num_devices=3, groups=4, codebook_size=16, distributed_cls=False)
    batch = to_cuda(make_batch())
    with torch.no_grad(), astra.full_precision(model):
        diff = (model(**batch).logits - reference(**batch).logits).abs().max().item()
    assert diff <= 10 * TOL


def test_cuda_matches_cpu_simulation_and_calibrates_on_cuda():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    batch = gpt2_batch(batch=4, length=16)
    astra.patch(model, num_devices=4, groups=8, codebook_size=32)
    astra.calibrate(model.cuda(), [to_cuda(batch)], progress=False)
    assert all(bool(q.initialized) and q.codebook.is_cuda for q in astra.quantizers(model))
    with torch.no_grad(), astra.capture_codes(model) as cuda_codes:
        on_cuda = model(**to_cuda(batch)).logits.cpu()
        cuda_codes = {k: v.cpu() for k, v in cuda_codes.items()}
    model.cpu()
    with torch.no_grad(), astra.capture_codes(model) as cpu_codes:
        on_cpu = model(**batch).logits
    agreement = torch.cat([(cuda_codes[k] == cpu_codes[k]).flatten() for k in cpu_codes]).float().mean()
    assert agreement > 0.99  # ties between near-equidistant codewords may break differently
    if agreement == 1:
        assert (on_cuda - on_cpu).abs().max() < 1e-4


def test_bf16_forward_and_training_step():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    batch = to_cuda(gpt2_batch(batch=4, length=16))
    astra.patch(model.cuda().to(torch.bfloat16), num_devices=2, groups=4, codebook_size=16)
    assert astra.quantizers(model)[0].codebook.dtype == torch.bfloat16
    astra.calibrate(model, [batch], progress=False)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and astra.quantizers(model)[0].codebook.grad is not None


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
@pytest.mark.parametrize("quantize", ["hidden", "kv"])
def test_llama_family_on_cuda_matches_cpu(family, quantize):
    model, reference = tiny_llama(family)
    batch = gpt2_batch(batch=2, length=11, left_pad=3)
    astra.patch(model, num_devices=3, groups=4, codebook_size=16, quantize=quantize)
    astra.calibrate(model, [gpt2_batch(batch=4, length=12, seed=1)], progress=False)
    valid = batch["attention_mask"].bool()
    with torch.no_grad(), astra.capture_codes(model) as cpu_codes:
        on_cpu = model(**batch).logits
        cpu_codes = dict(cpu_codes)
    model, reference = model.cuda(), reference.cuda()
    with torch.no_grad():
        with astra.full_precision(model):
            full = model(**to_cuda(batch)).logits
        assert (full - reference(**to_cuda(batch)).logits)[valid.cuda()].abs().max() <= 10 * TOL
        with astra.capture_codes(model) as cuda_codes:
            on_cuda = model(**to_cuda(batch)).logits.cpu()
    agreement = torch.cat([(cuda_codes[k].cpu() == cpu_codes[k]).flatten() for k in cpu_codes]).float().mean()
    assert agreement > 0.99  # ties between near-equidistant codewords may break differently
    if agreement == 1:
        assert (on_cuda - on_cpu)[valid].abs().max() < 1e-4
