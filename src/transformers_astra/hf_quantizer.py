"""ASTRA in transformers' quantization registry: Auto classes, ``pipeline`` and ``from_pretrained`` load ASTRA models.

`import transformers_astra` registers ``quant_method="astra"`` (`AstraQuantizationConfig`) and its quantizer
`AstraHfQuantizer`. ``from_pretrained`` of a checkpoint whose ``config.json`` carries that quantization config
then builds the model skeleton, lets the quantizer patch it (`astra.patch` adds every layer's codebook module),
and loads all weights, codebooks included, with transformers' own loader (sharded files, ``dtype``,
``device_map``). Before the weights load the quantizer checks the checkpoint files (inside the checkpoint
folder, readable safetensors, codebook shapes that fit the settings); after, every codebook (present,
floating point, equal to the digest recorded at save time). Each failure is a ValueError naming the file or layer.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .patch import astra_state, patch, quantizers, unpatch
from .quantization_config import QUANT_METHOD, AstraQuantizationConfig

# Digests are recorded for the codebook as saved and as it reads after a cast to each of these.
DIGEST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AstraHfQuantizer(HfQuantizer):
    """Patches the model skeleton before transformers loads the weights; checks the codebooks after.

    Trainable (NAQ fine-tuning with `AstraNAQCallback` is quantization-aware training) and serializable
    (``save_pretrained`` writes the codebooks and records their digests in the quantization config).
    """

    requires_calibration = False  # a plain checkpoint may be patched on load; its codebooks then need calibrating

    def __init__(self, quantization_config: AstraQuantizationConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs):
        files = [os.fspath(file) for file in checkpoint_files or []]
        check_checkpoint_files(files, getattr(model.config, "name_or_path", None))
        patch(model, self.quantization_config.astra_config)
        if self.pre_quantized:
            check_codebook_shapes(model, self.quantization_config)
        self._skeleton_dtypes = {name: tensor.dtype for name, tensor in _named_tensors(model) if tensor.is_floating_point()}
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
        layers = _layer_names(model)
        if self.pre_quantized:
            missing = [
                name for name, quantizer in layers.items()
                if not (_was_loaded(quantizer.codebook) and _was_loaded(quantizer.initialized))
            ]
            if missing:
                raise ValueError(
                    f"{model.config.name_or_path} lacks the codebooks of layer(s) {missing}: the checkpoint has a "
                    "quantization_config with quant_method='astra' but no codebook tensor for them. Save the model "
                    "again from a patched model (model.save_pretrained)."
                )
        for name, quantizer in layers.items():
            if not quantizer.codebook.is_floating_point():
                raise ValueError(
                    f"The codebook of layer {name} is stored as {quantizer.codebook.dtype} in "
                    f"{model.config.name_or_path}; codebooks must be floating point (the checkpoint was altered)."
                )
        _cast_to_skeleton_dtypes(model, getattr(self, "_skeleton_dtypes", {}))
        if self.pre_quantized:
            check_codebook_digests(model, self.quantization_config)
        else:
            _reset_unloaded_codebooks(layers)
        _warn_if_uninitialised(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        """Called by ``save_pretrained`` before it writes config.json: record the codebooks being saved."""
        self.quantization_config.codebooks = codebook_records(model)
        return None, {}

    def dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: back to the plain model (`astra.unpatch`), which also drops this quantizer."""
        return unpatch(model)

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method="astra"`` known to transformers (done on `import transformers_astra`; idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not AstraQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # an older copy of this module (importlib.reload)
        register_quantization_config(QUANT_METHOD)(AstraQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not AstraHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(AstraHfQuantizer)


# ------------------------------------------------------------------------------------------ checks


def check_checkpoint_files(files: list[str], name_or_path: str | None) -> None:
    """Every weights file sits in the checkpoint folder and, if safetensors, opens.

    A shard named ``../x.safetensors`` or ``/abs/x.safetensors`` in ``model.safetensors.index.json`` is refused
    before anything touches it, with the same message whether that file exists or not.
    """
    if not files:
        return
    folder = os.path.normpath(os.path.abspath(name_or_path)) if name_or_path and os.path.isdir(name_or_path) else None
    folder = folder or os.path.dirname(os.path.normpath(os.path.abspath(files[0])))
    for file in files:
        if os.path.dirname(os.path.normpath(os.path.abspath(file))) != folder:
            raise ValueError(
                f"The checkpoint in {folder} lists a weights file outside its folder ({os.path.basename(file)!r} "
                "resolves elsewhere; see model.safetensors.index.json): refused. Shard names must be plain file names."
            )
    for file in files:
        if file.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise ValueError(
                    f"{file} is truncated or corrupt ({error}); save it again, or download it again with "
                    "force_download=True"
                ) from error


def check_codebook_shapes(model: nn.Module, quantization_config: AstraQuantizationConfig) -> None:
    """The settings give each layer a codebook shape; the saved record says which shape was written."""
    records = quantization_config.codebooks
    if not records:
        return
    layers = _layer_names(model)
    if len(records) != len(layers):
        raise ValueError(
            f"{model.config.name_or_path} records codebooks for {len(records)} layers, but the model has "
            f"{len(layers)} ({list(layers)[:3]}...): its config.json was altered or belongs to another model."
        )
    config = quantization_config.astra_config
    for (name, quantizer), record in zip(layers.items(), records):
        found, needed = tuple(record["shape"]), tuple(quantizer.codebook.shape)
        if found != needed:
            raise ValueError(
                f"The codebook of layer {name} has shape {found} in the checkpoint, but AstraConfig(groups="
                f"{config.groups}, codebook_size={config.codebook_size}, quantize={config.quantize!r}) needs "
                f"{needed}: the settings in its config.json quantization_config (or the ones passed) are not the "
                "ones it was saved with."
            )


def check_codebook_digests(model: nn.Module, quantization_config: AstraQuantizationConfig) -> None:
    """Each loaded codebook equals, bit for bit, the one saved (as cast to the dtype it was loaded in)."""
    records = quantization_config.codebooks
    if not records:
        return
    for (name, quantizer), record in zip(_layer_names(model).items(), records):
        codebook = quantizer.codebook.detach()
        if codebook.device.type == "meta":
            continue  # offloaded to disk by device_map: transformers loads it on use
        dtype_name = _dtype_name(codebook.dtype)
        saved_dtype = getattr(torch, record["dtype"])
        if dtype_name in record["blake2b"]:
            expected, actual = record["blake2b"][dtype_name], codebook_digest(codebook)
        elif codebook.dtype.itemsize >= saved_dtype.itemsize:  # a wider dtype holds the saved values exactly
            expected, actual = record["blake2b"][record["dtype"]], codebook_digest(codebook.to(saved_dtype))
        else:
            continue
        if expected != actual:
            raise ValueError(
                f"The codebook of layer {name} in {model.config.name_or_path} does not match the blake2b digest "
                "recorded when it was saved: the weights file was altered or damaged. Download it again with "
                "force_download=True, or save it again from the original model."
            )


# ----------------------------------------------------------------------------------------- digests


def codebook_digest(codebook: torch.Tensor) -> str:
    data = codebook.detach().to("cpu").contiguous()
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def codebook_records(model: nn.Module) -> list[dict[str, Any]]:
    """One record per layer: module name, codebook shape, dtype and digests (as saved and as cast)."""
    records = []
    for name, quantizer in _layer_names(model).items():
        codebook = quantizer.codebook.detach()
        dtypes = dict.fromkeys([codebook.dtype, *DIGEST_DTYPES])
        records.append(
            {
                "layer": name,
                "shape": list(codebook.shape),
                "dtype": _dtype_name(codebook.dtype),
                "blake2b": {_dtype_name(dtype): codebook_digest(codebook.to(dtype)) for dtype in dtypes},
            }
        )
    return records


# ----------------------------------------------------------------------------------------- helpers


def _layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Attention module name (``transformer.h.0.attn``) -> its GroupedVQ, in layer order."""
    names = {id(module): name for name, module in model.named_modules()}
    state = astra_state(model)
    return {names[id(module)]: module.astra_quantizer for module in state.adapter.attention_modules(model)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _was_loaded(tensor: torch.Tensor) -> bool:
    # transformers' loader marks every tensor it filled from the checkpoint (so that weight init skips it).
    return bool(getattr(tensor, "_is_hf_initialized", False))


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _cast_to_skeleton_dtypes(model: nn.Module, skeleton_dtypes: dict[str, torch.dtype]) -> None:
    """Give every loaded floating tensor the dtype ``from_pretrained(dtype=...)`` built the model in.

    transformers 5.9 keeps the checkpoint's dtype for renamed keys of a pre-quantized checkpoint (it takes them
    for serialized quantized weights): under ``dtype=torch.float16`` a ViT's layers stayed fp32 beside fp16
    embeddings. 5.24 casts them itself, so there this changes nothing. Modules transformers keeps in fp32 on
    purpose (``_keep_in_fp32_modules``) are left alone.
    """
    keep = [*(model._keep_in_fp32_modules or []), *(model._keep_in_fp32_modules_strict or [])]
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            wanted = skeleton_dtypes.get(name)
            if (
                wanted is not None
                and tensor.is_floating_point()
                and tensor.dtype != wanted
                and tensor.device.type != "meta"
                and not any(pattern in name for pattern in keep)
            ):
                tensor.data = tensor.data.to(wanted)


def _reset_unloaded_codebooks(layers: dict[str, nn.Module]) -> None:
    """A plain checkpoint patched on load: codebooks it does not hold start random and uninitialised."""
    with torch.no_grad():
        for quantizer in layers.values():
            if not _was_loaded(quantizer.codebook):
                quantizer.codebook.normal_()
            if not (_was_loaded(quantizer.codebook) and _was_loaded(quantizer.initialized)):
                quantizer.initialized.fill_(False)


def _warn_if_uninitialised(model: nn.Module) -> None:
    layers = [index for index, quantizer in enumerate(quantizers(model)) if not bool(quantizer.initialized)]
    if layers:
        warnings.warn(
            f"ASTRA codebooks of layer(s) {layers} are uninitialised (random) until calibration: run "
            "astra.calibrate(model, batches) (and fine-tune) before using the model.",
            stacklevel=2,
        )
