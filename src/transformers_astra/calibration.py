"""`astra.calibrate`: k-means codebooks from the activations of real inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .patch import astra_state, full_precision, quantizers


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_samples: int = 4096,
    kmeans_iters: int = 10,
    progress: bool = True,
) -> nn.Module:
    """Initialise every layer's codebook with k-means on the vectors that layer would send.

    ``batches`` yields model inputs: dicts of keyword arguments (``{"input_ids": ...}``,
    ``{"pixel_values": ...}``) or tensors passed positionally. The model runs in full precision (the
    activations the codebooks must represent), in eval mode; at most ``max_samples`` vectors per layer,
    chosen uniformly at random among all non-padding tokens seen, feed k-means.
    """
    state = astra_state(model)
    if state.config.num_devices == 1:
        raise ValueError("num_devices=1 sends no codes; there is nothing to calibrate")
    collected: dict[int, list[torch.Tensor]] = {}
    valid_tokens: list[torch.Tensor | None] = [None]

    def collect(layer_idx: int, vectors: torch.Tensor) -> None:
        keep = valid_tokens[0]
        flat = vectors[keep] if keep is not None and keep.shape == vectors.shape[:2] else vectors.flatten(0, -2)
        collected.setdefault(layer_idx, []).append(flat.float().cpu())

    was_training = model.training
    model.eval()
    state.collector = collect
    try:
        with full_precision(model):
            for batch in tqdm(batches, desc="ASTRA calibration", disable=not progress):
                inputs = _model_inputs(batch, model)
                mask = inputs.get("attention_mask")
                valid_tokens[0] = mask.bool() if mask is not None and mask.ndim == 2 else None
                model(**inputs)
    finally:
        state.collector = None
        model.train(was_training)
    if not collected:
        raise ValueError("calibrate got no batches; pass an iterable of model inputs")

    generator = torch.Generator().manual_seed(0)
    for layer_idx, quantizer in enumerate(tqdm(quantizers(model), desc="k-means", disable=not progress)):
        samples = torch.cat(collected.pop(layer_idx))
        if samples.shape[0] > max_samples:
            samples = samples[torch.randperm(samples.shape[0], generator=generator)[:max_samples]]
        quantizer.kmeans_init(samples.to(quantizer.codebook.device), num_iters=kmeans_iters)
    return model


def _model_inputs(batch: Any, model: nn.Module) -> dict[str, Any]:
    device = next(model.parameters()).device
    if torch.is_tensor(batch):
        batch = {model.main_input_name: batch}
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibrate expects batches of dicts or tensors, got {type(batch).__name__}")
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items() if key != "labels"}
