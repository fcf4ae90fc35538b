"""`astra.patch` / `astra.unpatch` and the context managers that change a patched model's behaviour."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.quantizers import AutoHfQuantizer

from . import attention
from .balance import ShardCosts
from .config import AstraConfig
from .kernels import PROJECTION_TABLE_MAX_BYTES
from .models import adapter_for
from .quantization_config import QUANT_METHOD, AstraQuantizationConfig, checked_fine_tuned_num_devices
from .quantizer import GroupedVQ
from .state import AstraState, LayerState

# Tags `model.push_to_hub` puts on the Hub model card of a patched model (transformers' `add_model_tags`).
ASTRA_TAGS = ["astra", "vector-quantization", "sequence-parallel"]


def patch(model: nn.Module, config: AstraConfig | None = None, **overrides: Any) -> nn.Module:
    """Give ``model`` ASTRA mixed-precision attention, in place; returns the model.

    ``overrides`` are AstraConfig fields (``patch(model, num_devices=4, groups=32)``). Patching an
    already-patched model with the same config is a no-op; with another config it is an error.
    """
    config = config or AstraConfig()
    if overrides:
        config = config.replace(**overrides)
    adapter = adapter_for(model)
    existing: AstraState | None = getattr(model, "_astra_state", None)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            "This model is already patched with a different AstraConfig "
            f"({existing.config.to_dict()}); call astra.unpatch(model) first."
        )
    adapter.validate(model, config)
    recorded = getattr(model.config, "quantization_config", None)
    ours = isinstance(recorded, AstraQuantizationConfig) or (
        isinstance(recorded, dict) and recorded.get("quant_method") == QUANT_METHOD
    )
    if recorded is not None and not ours:
        raise ValueError(f"This model is already quantized ({recorded!r:.120}); ASTRA patches full-precision models only.")
    attention.register()

    state = AstraState(config, adapter, original_attn_implementation=model.config._attn_implementation)
    state.exchange = attention.SimulatedExchange(state)
    state.shard_costs = _shard_costs(model, adapter, config)
    width = adapter.quantized_width(model, config)
    for layer_idx, module in enumerate(adapter.attention_modules(model)):
        # The attention's own device and dtype (a model's first parameter may be kept in fp32 while loading
        # in fp16). A new module starts in training mode; follow the model's, or an eval model gets NAQ noise.
        reference = next(module.parameters())
        module.astra_quantizer = GroupedVQ(width, config.codes_per_token, config.codebook_size).to(
            device=reference.device, dtype=reference.dtype
        ).train(model.training)
        module._astra_layer = LayerState(state, layer_idx)
        state.hooks.append(module.register_forward_pre_hook(_remember_layer_input, with_kwargs=True))
    state.hooks += adapter.install(model, state)
    state.hooks.append(model.register_forward_pre_hook(_start_forward(state)))
    state.hooks.append(model.register_forward_hook(_add_commitment_loss(state)))

    model.set_attn_implementation(attention.ATTENTION_NAME)
    model._astra_state = state
    _record_quantization(model, config)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original attention, no hooks, no codebooks. Returns the model."""
    state = astra_state(model)
    for handle in state.hooks:
        handle.remove()
    for module in state.adapter.attention_modules(model):
        del module.astra_quantizer
        del module._astra_layer
    model.set_attn_implementation(state.original_attn_implementation or "sdpa")
    del model._astra_state
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # config.quantization_config and the quantizer go
    if model.model_tags:
        model.model_tags = [tag for tag in model.model_tags if tag not in ASTRA_TAGS]
    return model


def set_config(model: nn.Module, config: AstraConfig) -> None:
    """Replace a patched model's AstraConfig (e.g. NAQ's lambda during fine-tuning); the saved config follows."""
    state = astra_state(model)
    state.config, state.shard_costs = config, _shard_costs(model, state.adapter, config)
    model.config.quantization_config.set_astra_config(config)


def fine_tuned_num_devices(model: nn.Module) -> list[int] | None:
    """The device counts a patched model's fine-tuning ran at (saved with it); None when not recorded."""
    astra_state(model)
    recorded = model.config.quantization_config.fine_tuned_num_devices
    return None if recorded is None else list(recorded)


def record_fine_tuned_num_devices(model: nn.Module, num_devices: Iterable[int]) -> None:
    """Record (replacing any earlier record) the device counts a patched model is fine-tuned at; `save_pretrained`
    writes them to config.json's quantization config (``fine_tuned_num_devices``). Validated, sorted."""
    astra_state(model)
    values = list(num_devices) if isinstance(num_devices, Iterable) and not isinstance(num_devices, str) else num_devices
    model.config.quantization_config.fine_tuned_num_devices = checked_fine_tuned_num_devices(values)


def _shard_costs(model: nn.Module, adapter, config: AstraConfig) -> ShardCosts:
    """The model's per-layer work for balanced shards (`balance`), from its widths and the config."""
    return ShardCosts.for_model(adapter.hidden_size(model), adapter.key_value_width(model), config, PROJECTION_TABLE_MAX_BYTES)


def _record_quantization(model: nn.Module, config: AstraConfig) -> None:
    """Describe the patch the way transformers describes a quantized model, so that ``save_pretrained`` and
    ``push_to_hub`` write ``quantization_config`` (quant_method "astra") and ``from_pretrained`` reads it back.

    When transformers loads a checkpoint it sets these itself (its quantizer then replaces the one made here).
    The quantizer comes from transformers' registry, where `import transformers_astra` put ASTRA's.
    """
    quantization_config = getattr(model.config, "quantization_config", None)
    if isinstance(quantization_config, AstraQuantizationConfig):  # transformers is loading an ASTRA checkpoint
        quantization_config.set_astra_config(config)
    else:
        quantization_config = AstraQuantizationConfig.from_astra_config(config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    model.add_model_tags(ASTRA_TAGS)


def astra_state(model: nn.Module) -> AstraState:
    state = getattr(model, "_astra_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched; call astra.patch(model, config) first")
    return state


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_astra_state", None) is not None


def quantizers(model: nn.Module) -> list[GroupedVQ]:
    """The per-layer codebooks of a patched model, in layer order."""
    state = astra_state(model)
    return [module.astra_quantizer for module in state.adapter.attention_modules(model)]


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[nn.Module]:
    """Same shard layout, no quantization: plain sequence parallelism (the reference and the baseline)."""
    state = astra_state(model)
    previous, state.full_precision = state.full_precision, True
    try:
        yield model
    finally:
        state.full_precision = previous


@contextlib.contextmanager
def capture_codes(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Record the codes every layer sends; the dict maps layer index to (B, T, codes per token) indices."""
    state = astra_state(model)
    log: dict[int, torch.Tensor] = {}
    previous, state.code_log = state.code_log, log
    try:
        yield log
    finally:
        state.code_log = previous


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The beta-weighted commitment loss of the latest training-mode forward (None in eval mode).

    It is already added to ``outputs.loss`` when the model computes a loss; use this in custom loops.
    """
    losses = astra_state(model).aux_losses
    return torch.stack(losses).sum() if losses else None


def _remember_layer_input(module, args, kwargs):
    # The attention function receives only projected Q/K/V: the adapter keeps what else it needs (the
    # module's input for hidden mode, the KV cache, the positions). Then the exchange may act on the input
    # before the module projects it (a real rank in hidden mode sends its codes from here).
    layer: LayerState = module._astra_layer
    state = layer.model_state
    state.adapter.remember(layer, args, kwargs)
    state.exchange.layer_input(module, layer)
    return None


def _start_forward(state: AstraState):
    def hook(module, args):
        state.aux_losses.clear()

    return hook


def _add_commitment_loss(state: AstraState):
    def hook(module, args, output):
        if not module.training or not state.aux_losses:
            return None
        extra = torch.stack(state.aux_losses).sum()
        if isinstance(output, dict) and output.get("loss") is not None:
            output["loss"] = output["loss"] + extra
        elif isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].ndim == 0:
            output = (output[0] + extra, *output[1:])
        return output

    return hook
