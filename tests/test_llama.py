"""The Llama family (Llama, Qwen2, Qwen3, Mistral) against the unpatched Hugging Face model.

Tiny configs with grouped-query attention and each family's feature (conftest.LLAMA_FEATURES): dynamic
RoPE (Llama), Q/K/V biases and a sliding-window layer (Qwen2), k_norm and a sliding-window layer (Qwen3),
sliding windows everywhere (Mistral). The multi-process runs are in test_distributed.py.
"""

import pytest
import torch
from conftest import LLAMA_FAMILIES, TOL, gpt2_batch, make_lossless, tiny_llama
from transformers import Trainer, TrainingArguments

import transformers_astra as astra
from transformers_astra.exchange import split_heads
from transformers_astra.kernels import projected_from_codes, projection_tables

FAMILIES = pytest.mark.parametrize("family", LLAMA_FAMILIES)
MODES = pytest.mark.parametrize("quantize", ["hidden", "kv"])


def batch_of(length: int = 11, left_pad: int = 3, batch: int = 2, seed: int = 0) -> dict:
    return gpt2_batch(batch=batch, length=length, left_pad=left_pad, seed=seed)  # ids in [3, 61), left padding


def max_diff(model, reference, batch) -> float:
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
    valid = batch["attention_mask"].bool()
    return (got - want)[valid].abs().max().item()


@FAMILIES
@pytest.mark.parametrize("left_pad", [0, 3])
def test_one_device_equals_unpatched(family, left_pad):
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=1, groups=4, codebook_size=8)
    assert max_diff(model, reference, batch_of(left_pad=left_pad)) <= TOL


@FAMILIES
@pytest.mark.parametrize("num_devices, shard_sizes", [(2, None), (3, None), (4, None), (3, [1, 3, 2])])
def test_full_precision_sequence_parallel_equals_unpatched(family, num_devices, shard_sizes):
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=num_devices, groups=4, codebook_size=8, shard_sizes=shard_sizes)
    with astra.full_precision(model):
        assert max_diff(model, reference, batch_of()) <= TOL


@FAMILIES
@MODES
def test_lossless_codebook_equals_unpatched(family, quantize):
    # Keys are rebuilt from what was sent (projected, normed, rotated with the sender's positions): any
    # slip (a key rotated twice, at the receiver's positions, without k_norm) breaks the equality.
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=3, groups=2, codebook_size=64, quantize=quantize)
    batch = batch_of()
    make_lossless(model, batch)
    with astra.capture_codes(model) as codes:
        assert max_diff(model, reference, batch) <= TOL
    assert len(codes) == 2


@FAMILIES
def test_quantized_width_follows_the_mode(family):
    model, _ = tiny_llama(family)
    astra.patch(model, num_devices=2, groups=4, codebook_size=8, quantize="kv")
    assert astra.quantizers(model)[0].width == 2 * 2 * 8  # keys and values of 2 K/V heads of width 8
    assert astra.quantizers(model)[0].codebook.shape == (8, 8, 4)
    astra.unpatch(model)
    astra.patch(model, num_devices=2, groups=4, codebook_size=8)
    assert astra.quantizers(model)[0].width == 48


def test_groups_must_divide_the_key_value_width_in_kv_mode():
    model, _ = tiny_llama("llama")
    with pytest.raises(ValueError, match="groups=3 must divide the key/value width 16"):
        astra.patch(model, groups=3, quantize="kv")
    astra.patch(model, groups=3)  # divides the hidden width 48


def calibrated(family, quantize, **config):
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=3, groups=4, codebook_size=16, quantize=quantize, **config)
    astra.calibrate(model, [batch_of(batch=4, length=12, left_pad=0, seed=1)], progress=False)
    return model, reference


@FAMILIES
@MODES
def test_causality_token_never_changes_earlier_outputs(family, quantize):
    model, reference = calibrated(family, quantize)
    batch = batch_of(batch=1, length=12, left_pad=0)
    changed = batch["input_ids"].clone()
    with torch.no_grad():
        assert (model(**batch).logits - reference(**batch).logits).abs().max() > 10 * TOL  # codes are used
    for position in (3, 4, 8, 11):
        changed[0, position] = (changed[0, position] + 7) % 58 + 3
        with torch.no_grad():
            before, after = model(**batch).logits, model(input_ids=changed).logits
        assert torch.allclose(before[:, :position], after[:, :position], atol=1e-6)
        assert not torch.allclose(before[:, position:], after[:, position:])
        changed[0, position] = batch["input_ids"][0, position]


@FAMILIES
@MODES
def test_remote_keys_use_the_senders_global_positions(family, quantize):
    # A query on shard 1 sees shard 0's tokens through codes only; with a lossless codebook, its output
    # equals the unpatched one only if the rebuilt keys carry the sender's positions (not 0.. on the receiver).
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=2, groups=2, codebook_size=64, quantize=quantize)
    batch = batch_of(batch=1, length=10, left_pad=0)
    make_lossless(model, batch)
    position_ids = torch.arange(5, 15)[None]  # a prompt that starts later: positions need not start at 0
    with torch.no_grad():
        got = model(**batch, position_ids=position_ids).logits
        want = reference(**batch, position_ids=position_ids).logits
    # Rounding only (larger rotation angles, different matmul shapes): keys at the receiver's positions are off by ~0.1.
    assert (got - want).abs().max() <= 1e-4


@FAMILIES
@MODES
def test_projection_tables_equal_decode_then_project(family, quantize):
    model, _ = tiny_llama(family)
    astra.patch(model, num_devices=2, groups=4, codebook_size=16)
    state = model._astra_state
    module = state.adapter.attention_modules(model)[1]
    quantizer = module.astra_quantizer
    codes = torch.randint(0, 16, (3, 5, 4))
    with torch.no_grad():
        want_key, want_value = state.adapter.project_kv(module, quantizer.decode(codes))
        key, value = projected_from_codes(projection_tables(module, state.adapter, quantizer), codes, 16)
    assert torch.allclose(split_heads(key, 2), want_key, atol=1e-5)
    assert torch.allclose(split_heads(value, 2), want_value, atol=1e-5)


@FAMILIES
def test_full_precision_generation_matches_unpatched(family):
    model, reference = tiny_llama(family)
    astra.patch(model, num_devices=3, groups=4, codebook_size=8)
    batch = batch_of(length=9, left_pad=2)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with astra.full_precision(model):
        assert torch.equal(model.generate(**batch, **settings), reference.generate(**batch, **settings))


@FAMILIES
@MODES
def test_quantized_generation_continues_from_the_last_device_view(family, quantize):
    model, _ = calibrated(family, quantize)
    batch = batch_of(batch=1, length=9, left_pad=0)
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        cache = prefill.past_key_values if hasattr(prefill, "past_key_values") else prefill.cache
        full = model(input_ids=torch.cat([batch["input_ids"], prefill.logits[:, -1:].argmax(-1)], dim=1)).logits
    layout = astra.ShardLayout.for_sequence(9, 3)
    keys = cache.layers[0].keys
    kept = keys.shape[2]
    # The last device's own shard is exact; earlier shards are rebuilt from codes.
    with torch.no_grad(), astra.full_precision(model):
        exact = model(**batch, use_cache=True)
    exact_cache = exact.past_key_values if hasattr(exact, "past_key_values") else exact.cache
    exact_keys = exact_cache.layers[0].keys
    own = layout.offsets[-2] - (9 - kept)  # index of the last shard's first token in the (maybe windowed) cache
    assert torch.allclose(keys[:, :, max(own, 0) :], exact_keys[:, :, max(own, 0) :], atol=1e-5)
    if own > 0:
        assert not torch.allclose(keys[:, :, :own], exact_keys[:, :, :own], atol=1e-3)
    generated = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert generated[0, -1] == prefill.logits[0, -1].argmax()
    assert torch.isfinite(full).all()


@FAMILIES
def test_output_attentions_returns_weights(family):
    model, _ = calibrated(family, "hidden")
    batch = batch_of()
    with torch.no_grad():
        output = model(**batch, output_attentions=True)
        plain = model(**batch)
    weights = output.attentions[0]
    assert weights.shape == (2, 6, 11, 11)
    assert torch.allclose(main_rows(weights, batch).sum(-1), torch.ones(()), atol=1e-5)
    assert torch.all(weights.triu(1) == 0)
    assert torch.allclose(output.logits, plain.logits, atol=1e-5)


def main_rows(weights, batch):
    return weights.transpose(1, 2)[batch["attention_mask"].bool()]


class CountingBlocks(torch.utils.data.Dataset):
    def __init__(self, rows: int = 32, length: int = 12):
        starts = torch.randint(3, 61, (rows, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % 58 + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@MODES
def test_trainer_with_the_naq_callback_runs_and_reaches_the_codebooks(tmp_path, quantize):
    model, _ = tiny_llama("qwen3")
    astra.patch(model, num_devices=3, groups=4, codebook_size=16, quantize=quantize)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=4, logging_steps=2,
        report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    before = astra.quantizers(model)[0].codebook.detach().clone()
    trainer = Trainer(model=model.train(), args=args, train_dataset=CountingBlocks(),
                      callbacks=[astra.AstraNAQCallback(calibration_batches=2)])
    trainer.train()
    assert all(bool(q.initialized) for q in astra.quantizers(model))
    assert not torch.equal(before, astra.quantizers(model)[0].codebook.detach())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("astra/code_perplexity" in entry for entry in trainer.state.log_history)


def test_model_card_names_the_family_and_its_settings():
    model, _ = calibrated("qwen2", "kv")
    card = astra.create_model_card(model)
    text = str(card)
    assert "qwen2" in text and "Qwen2ForCausalLM" in text
    assert "runtime.generate" in text  # a causal LM: the usage shows generation
    assert "width 32" in text  # kv mode with GQA: 2 K/V heads of 8, keys and values


@MODES
def test_checkpoint_round_trip_through_the_auto_classes(tmp_path, quantize):
    from transformers import AutoModelForCausalLM

    model, _ = calibrated("qwen3", quantize)
    model.save_pretrained(tmp_path)
    batch = batch_of()
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path), astra.from_pretrained(tmp_path)):
        assert type(reloaded).__name__ == "Qwen3ForCausalLM" and astra.is_patched(reloaded)
        assert reloaded._astra_state.config == model._astra_state.config
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("family, auto_class", [("llama", "AutoModel"), ("qwen2", "AutoModelForSequenceClassification")])
def test_base_model_and_heads(family, auto_class):
    import copy

    import transformers
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(tiny_llama_config(family, num_labels=3)).eval()
    reference = copy.deepcopy(model)
    astra.patch(model, num_devices=3, groups=2, codebook_size=64, quantize="kv")
    batch = batch_of(left_pad=0)
    make_lossless(model, batch)
    with torch.no_grad():
        got, want = model(**batch), reference(**batch)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    want = want.logits if hasattr(want, "logits") else want.last_hidden_state
    assert (got - want).abs().max() <= TOL
