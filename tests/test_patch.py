import inspect

import pytest
import torch
from conftest import gpt2_batch, main_output, make_pair, tiny_gpt2_config, tiny_vit_config, vit_batch
from transformers import AutoConfig, BertConfig, BertModel, GPT2LMHeadModel, ViTForImageClassification

import transformers_astra as astra


def test_patch_returns_model_and_records_config():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    config = astra.AstraConfig(num_devices=4, groups=8)
    assert astra.patch(model, config) is model
    assert model.config.quantization_config.astra_config == config
    assert astra.is_patched(model)
    assert len(astra.quantizers(model)) == 2
    assert astra.quantizers(model)[0].codebook.shape == (8, 1024, 4)


def test_overrides_update_the_config():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, astra.AstraConfig(num_devices=4), groups=2, quantize="kv")
    assert model.config.quantization_config.groups == 2 and model.config.quantization_config.num_devices == 4
    assert astra.quantizers(model)[0].codebook.shape == (4, 1024, 16)  # K and V: 2 x 2 groups of 16


def test_quantization_config_survives_save_pretrained(tmp_path):
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=3, groups=4, shard_sizes=[2, 1, 1])
    model.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path).quantization_config
    assert astra.AstraQuantizationConfig.from_dict(saved).astra_config == model._astra_state.config


def test_unpatch_restores_the_original_model():
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    before = set(model.state_dict())
    astra.patch(model, num_devices=3, groups=4, codebook_size=8)
    assert any("astra_quantizer" in name for name in model.state_dict())
    astra.unpatch(model)
    assert set(model.state_dict()) == before and not hasattr(model.config, "astra")
    batch = gpt2_batch()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-6)
    astra.patch(model, num_devices=2)  # and it can be patched again
    assert astra.is_patched(model)


def test_unsupported_model_lists_the_supported_types():
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match=r"bert.*\['gpt2', 'vit'\]"):
        astra.patch(model)


def test_groups_must_divide_the_width():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    with pytest.raises(ValueError, match="groups=5 must divide the model width 32"):
        astra.patch(model, groups=5)
    assert not astra.is_patched(model)


def test_codebook_size_below_two_is_rejected():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    with pytest.raises(ValueError, match="codebook_size"):
        astra.patch(model, codebook_size=1)


def test_more_devices_than_tokens_is_a_clear_error():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=4, groups=4, codebook_size=8)
    with pytest.raises(ValueError, match="Cannot split 3 tokens over num_devices=4"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_patching_twice_same_config_is_a_no_op_other_config_an_error():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=2, groups=4)
    hooks = len(model._astra_state.hooks)
    astra.patch(model, num_devices=2, groups=4)
    assert len(model._astra_state.hooks) == hooks
    with pytest.raises(ValueError, match="already patched"):
        astra.patch(model, num_devices=3, groups=4)


def test_not_patched_model_is_a_clear_error():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    with pytest.raises(ValueError, match="not patched"):
        astra.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        with astra.full_precision(model):
            pass


def train_step_model(model_class, make_config, batch, **config):
    model, _ = make_pair(model_class, make_config())
    astra.patch(model, **config)
    astra.calibrate(model, [batch], progress=False)
    return model.train()


@pytest.mark.parametrize("quantize", ["hidden", "kv"])
def test_gradients_reach_weights_and_codebooks(quantize):
    batch = gpt2_batch(batch=4)
    model = train_step_model(GPT2LMHeadModel, tiny_gpt2_config, batch, num_devices=3, groups=4, codebook_size=16, quantize=quantize)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for layer in model.transformer.h:
        assert layer.attn.c_attn.weight.grad.abs().sum() > 0
        assert layer.attn.astra_quantizer.codebook.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_commitment_loss_in_training_mode_only():
    batch = gpt2_batch(batch=4)
    model = train_step_model(
        GPT2LMHeadModel, tiny_gpt2_config, batch, num_devices=2, groups=4, codebook_size=16, noise_scale=0.0,
        commitment_weight=0.5,
    )
    labels = batch["input_ids"]
    output = model(**batch, labels=labels)
    extra = astra.auxiliary_loss(model)
    assert extra is not None and extra.item() > 0
    task = model.loss_function(output.logits, labels, vocab_size=model.config.vocab_size)
    assert torch.allclose(output.loss, task + extra, atol=1e-6)
    model.eval()
    with torch.no_grad():
        output = model(**batch, labels=labels)
    assert astra.auxiliary_loss(model) is None
    task = model.loss_function(output.logits, labels, vocab_size=model.config.vocab_size)
    assert torch.allclose(output.loss, task, atol=1e-6)


def test_naq_noise_only_in_training_mode():
    batch = vit_batch(batch=4)
    noisy = train_step_model(ViTForImageClassification, tiny_vit_config, batch, num_devices=2, groups=4, codebook_size=16)
    first, second = noisy(**batch).logits, noisy(**batch).logits
    assert not torch.allclose(first, second)
    noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(**batch).logits, noisy(**batch).logits)
    clean = train_step_model(
        ViTForImageClassification, tiny_vit_config, batch, num_devices=2, groups=4, codebook_size=16, noise_scale=0.0
    )
    assert torch.equal(clean(**batch).logits, clean(**batch).logits)


def test_full_precision_generation_matches_unpatched():
    model, reference = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    astra.patch(model, num_devices=3, groups=4, codebook_size=8)
    batch = gpt2_batch(batch=2, length=9, left_pad=2)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with astra.full_precision(model):
        assert torch.equal(model.generate(**batch, **settings), reference.generate(**batch, **settings))


def test_quantized_generation_continues_from_the_last_device_view():
    batch = gpt2_batch(batch=1, length=9)
    model = train_step_model(GPT2LMHeadModel, tiny_gpt2_config, batch, num_devices=3, groups=4, codebook_size=4).eval()  # K < 9 tokens: lossy
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        cache = prefill.past_key_values if hasattr(prefill, "past_key_values") else prefill.cache
        next_token = prefill.logits[:, -1:].argmax(-1)
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(input_ids=next_token, use_cache=True, **{cache_argument: cache}).logits[:, -1]
        # The reference for the step: the new token on the last device, with earlier shards decoded.
        keys = cache.layers[0].keys
    layout = astra.ShardLayout.for_sequence(9, 3)
    assert keys.shape[2] == 10
    with torch.no_grad():
        exact_keys = model.transformer.h[0].attn.c_attn(model.transformer.h[0].ln_1(model.transformer.wte(batch["input_ids"]) + model.transformer.wpe(torch.arange(9))))
    exact_keys = exact_keys[..., 32:64].reshape(1, 9, 4, 8).transpose(1, 2)
    last = layout.offsets[-2]
    assert torch.allclose(keys[:, :, last:9], exact_keys[:, :, last:], atol=1e-5)  # own shard: exact
    assert not torch.allclose(keys[:, :, :last], exact_keys[:, :, :last], atol=1e-3)  # earlier shards: decoded
    generated = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert generated[0, -1] == next_token[0, 0]
    assert torch.isfinite(step).all()
    assert main_output(prefill).shape[1] == 9


def test_training_after_an_inference_mode_forward():
    # Masks and indices cached during an inference-mode forward must not poison later training steps.
    from transformers_astra.attention import same_shard
    from transformers_astra.models.vit import spread_index

    model, _ = make_pair(ViTForImageClassification, tiny_vit_config())
    astra.patch(model, num_devices=3, groups=4, codebook_size=8)
    same_shard.cache_clear()
    spread_index.cache_clear()
    batch = vit_batch(batch=2)
    with torch.inference_mode():
        model.eval()(**batch)
    model.train()(**batch).logits.sum().backward()
    assert astra.quantizers(model)[0].codebook.grad is not None


def test_patch_refuses_a_model_quantized_otherwise_and_accepts_a_config_read_from_an_astra_checkpoint():
    model, _ = make_pair(GPT2LMHeadModel, tiny_gpt2_config())
    model.config.quantization_config = {"quant_method": "bitsandbytes_4bit"}
    with pytest.raises(ValueError, match="already quantized .*bitsandbytes_4bit"):
        astra.patch(model, num_devices=2, groups=4)
    assert not astra.is_patched(model)
    # A model built from the config.json of an ASTRA checkpoint (AutoConfig gives the block as a dict).
    model.config.quantization_config = {"quant_method": "astra", "groups": 4}
    astra.patch(model, num_devices=2, groups=4)
    assert isinstance(model.config.quantization_config, astra.AstraQuantizationConfig)
