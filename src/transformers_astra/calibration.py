"""`astra.calibrate`: k-means codebooks from the activations of real inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .patch import astra_state, full_precision, quantizers


@torch.no_grad()
def collect_activations(model: nn.Module, batches: Iterable[Any], progress: bool = True) -> dict[int, torch.Tensor]:
    """The vectors every layer would quantize, from a full-precision run: layer index -> (n, width), on CPU.

    ``batches`` yields model inputs: dicts of keyword arguments (``{"input_ids": ...}``,
    ``{"pixel_values": ...}``) or tensors passed positionally. Padding tokens (``attention_mask == 0``)
    are left out.
    """
    state = astra_state(model)
    if state.config.num_devices == 1:
        raise ValueError("num_devices=1 sends no codes; there is nothing to collect or calibrate")
    collected: dict[int, list[torch.Tensor]] = {}
    valid_tokens: list[torch.Tensor | None] = [None]
    batch_index = [0]

    def collect(layer_idx: int, vectors: torch.Tensor) -> None:
        keep = valid_tokens[0]
        flat = vectors[keep] if keep is not None and keep.shape == vectors.shape[:2] else vectors.flatten(0, -2)
        finite = torch.isfinite(flat)
        if not finite.all():
            raise ValueError(
                f"calibration batch {batch_index[0]}: layer {layer_idx}'s activations hold "
                f"{int((~finite).sum())} NaN or infinite value(s) (of {flat.numel()}); check that batch's inputs "
                "and the model's weights. No codebook was changed."
            )
        collected.setdefault(layer_idx, []).append(flat.float().cpu())

    was_training = model.training
    model.eval()
    state.collector = collect
    try:
        with full_precision(model):
            for batch_index[0], batch in enumerate(tqdm(batches, desc="ASTRA activations", disable=not progress)):
                inputs = _model_inputs(batch, model)
                mask = inputs.get("attention_mask")
                valid_tokens[0] = mask.bool() if mask is not None and mask.ndim == 2 else None
                model(**inputs)
    finally:
        state.collector = None
        model.train(was_training)
    if not collected:
        raise ValueError("got no batches; pass an iterable of model inputs")
    return {layer_idx: torch.cat(parts) for layer_idx, parts in collected.items()}


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_samples: int = 4096,
    kmeans_iters: int = 10,
    progress: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Initialise every layer's codebook with k-means on the vectors that layer would send.

    The model runs in full precision and eval mode (see `collect_activations`); at most ``max_samples``
    vectors per layer, drawn uniformly at random, feed k-means (`transformers_astra.quantizer.kmeans`).
    ``seed`` fixes the draws and k-means' starting centres; torch's global random state is not used.

    All or nothing: every layer's new codebook is computed first and written only when all are ready, so
    a NaN/inf activation (a ValueError naming the batch and layer) or any other error leaves every codebook
    and ``initialized`` flag as they were. Returns the model.
    """
    activations = collect_activations(model, batches, progress=progress)
    generator = torch.Generator().manual_seed(seed)
    modules = quantizers(model)
    codebooks = []
    for layer_idx, quantizer in enumerate(tqdm(modules, desc="k-means", disable=not progress)):
        samples = activations.pop(layer_idx)
        if samples.shape[0] > max_samples:
            samples = samples[torch.randperm(samples.shape[0], generator=generator)[:max_samples]]
        try:
            codebook = quantizer.fit_codebook(
                samples.to(quantizer.codebook.device), num_iters=kmeans_iters, generator=generator
            )
        except ValueError as error:
            raise ValueError(f"calibration of layer {layer_idx}: {error}. No codebook was changed.") from error
        if not torch.isfinite(codebook.to(quantizer.codebook.dtype)).all():
            raise ValueError(
                f"calibration of layer {layer_idx}: its k-means centres overflow the codebook dtype "
                f"{quantizer.codebook.dtype}. No codebook was changed."
            )
        codebooks.append(codebook)
    for quantizer, codebook in zip(modules, codebooks):
        quantizer.load_codebook(codebook)
    return model


def _model_inputs(batch: Any, model: nn.Module) -> dict[str, Any]:
    device = next(model.parameters()).device
    if torch.is_tensor(batch):
        batch = {model.main_input_name: batch}
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibrate expects batches of dicts or tensors, got {type(batch).__name__}")
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items() if key != "labels"}
