"""ASTRA checkpoints: load a patched model back (`from_pretrained`), save it with a model card, push it.

A patched model's ``save_pretrained`` already writes everything: ``config.json`` carries the ``astra``
block (``model.config.astra``) and the safetensors weights carry every layer's codebook
(``...astra_quantizer.codebook``, ``...astra_quantizer.initialized``). Loading goes through
transformers' own ``from_pretrained`` for the base weights (dtype, device_map, sharding, tied weights),
then `astra.patch`, then loads the codebooks itself so that every mismatch is an error naming the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

try:  # transformers renames some weights on save (legacy checkpoint names); this gives the saved names
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:  # a transformers version without such renaming
    revert_weight_conversion = None

from .config import AstraConfig
from .modelcard import create_model_card
from .patch import astra_state, patch, quantizers

# Every tensor `astra.patch` adds to the state dict lives under an attention module's `astra_quantizer`.
ASTRA_KEY_MARKER = ".astra_quantizer."
ASTRA_FIELDS = frozenset(field.name for field in dataclasses.fields(AstraConfig))
# What a Hub download fetches: config (and tokenizer) JSON, weights, card; no training state or other formats.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "README.md"]
HUB_DOWNLOAD_ARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "endpoint")


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    astra_config: AstraConfig | None = None,
    *,
    model_class: type | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A patched ASTRA model from a local directory or a Hub repo id, with its codebooks loaded.

    - A checkpoint saved from a patched model (``config.json`` has an ``astra`` block) comes back with the
      same AstraConfig and codebooks: its outputs equal the saved model's.
    - A plain transformers checkpoint needs ``astra_config`` (or AstraConfig fields as keyword arguments);
      it is patched with uninitialised codebooks, and a warning says to run `astra.calibrate`.

    Keyword arguments that are AstraConfig fields (``num_devices=2``, ``noise_scale=0.0``) override the
    saved config. A different ``num_devices`` is allowed with a warning: the codebooks do not depend on N,
    but the checkpoint was fine-tuned for its own N. Fields that change the codebook shapes (``groups``,
    ``codebook_size``, ``quantize``) do not fit the saved codebooks and raise an error naming the layer.
    ``revision``, ``cache_dir``, ``token``, ``force_download``, ``local_files_only`` and ``endpoint`` go to
    the Hub download (which respects ``HF_HUB_OFFLINE``); everything else goes to transformers' ``from_pretrained``
    (``dtype``, ``device_map``, ...). ``model_class`` picks the class (a model class or an Auto class);
    by default the one named in the config's ``architectures``.
    """
    overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in ASTRA_FIELDS}
    hub_args = {name: kwargs.pop(name) for name in HUB_DOWNLOAD_ARGS if name in kwargs}
    directory = checkpoint_directory(pretrained_model_name_or_path, **hub_args)
    config = AutoConfig.from_pretrained(directory)
    saved_block = getattr(config, "astra", None)
    effective = _effective_astra_config(saved_block, astra_config, overrides, directory)
    codebook_files = _codebook_files(directory, required=saved_block is not None)

    concrete_class = _concrete_model_class(config, model_class)
    with _astra_keys_expected(concrete_class):
        model = concrete_class.from_pretrained(directory, **kwargs)
    if directory != Path(pretrained_model_name_or_path):
        model.config._name_or_path = str(pretrained_model_name_or_path)  # the repo id, as transformers keeps it
    patch(model, effective)
    _load_codebooks(model, codebook_files, directory, required=saved_block is not None)
    _warn_if_uninitialised(model)
    return model


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    processor: Any = None,
    max_shard_size: int | str = "50GB",
    **card_options: Any,
) -> Path:
    """``model.save_pretrained`` (config with its ``astra`` block, safetensors with the codebooks) plus a
    generated ``README.md`` model card (``card_options`` go to `create_model_card`) and, if given, the
    tokenizer or image processor (anything with ``save_pretrained``). Returns the directory."""
    astra_state(model)  # a clear error for a model that is not patched
    save_directory = Path(save_directory)
    model.save_pretrained(save_directory, max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(save_directory)
    create_model_card(model, **card_options).save(save_directory / "README.md")
    return save_directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
    endpoint: str | None = None,
    processor: Any = None,
    **card_options: Any,
) -> CommitInfo:
    """Upload config, safetensors weights (with the codebooks) and the ASTRA model card in one commit.

    Same arguments as transformers' ``push_to_hub`` (``tags`` are added to the card), plus ``endpoint``
    (a Hub mirror; default ``HF_ENDPOINT``), ``processor`` (a tokenizer or image processor to upload in the
    same commit) and the `create_model_card` options (``base_model``, ``datasets``, ``results``, ...).
    A patched model's own ``model.push_to_hub`` calls this.
    """
    api = HfApi(endpoint=endpoint, token=token, library_name="transformers-astra")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        save_pretrained(
            model, work_dir, processor=processor, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags, **card_options
        )
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            commit_message=commit_message or "Upload ASTRA model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def attach_push_to_hub(model: nn.Module) -> None:
    """Make ``model.push_to_hub`` upload the ASTRA model card too (called by `astra.patch`).

    transformers' ``push_to_hub`` writes its own generic README.md after ``save_pretrained``, so no save
    hook can put the card in; an instance method in front of the class's one can.
    """
    model.push_to_hub = types.MethodType(_push_patched_model, model)


def detach_push_to_hub(model: nn.Module) -> None:
    model.__dict__.pop("push_to_hub", None)


def _push_patched_model(self: nn.Module, repo_id: str, **kwargs: Any) -> CommitInfo:
    return push_to_hub(self, repo_id, **kwargs)


_push_patched_model.__doc__ = push_to_hub.__doc__


def checkpoint_directory(path_or_repo_id: str | os.PathLike, **hub_args: Any) -> Path:
    """A local directory as is; a Hub repo id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory (the one holding config.json)")
    try:
        return Path(snapshot_download(str(path_or_repo_id), allow_patterns=CHECKPOINT_PATTERNS, **hub_args))
    except HFValidationError as error:
        raise ValueError(
            f"{str(path_or_repo_id)!r} is neither a local directory nor a valid Hub repo id: {error}"
        ) from error


def _effective_astra_config(
    saved_block: dict[str, Any] | None,
    astra_config: AstraConfig | None,
    overrides: dict[str, Any],
    directory: Path,
) -> AstraConfig:
    if saved_block is None and astra_config is None and not overrides:
        raise ValueError(
            f"{directory} is a plain transformers checkpoint (its config.json has no 'astra' block): pass "
            "astra_config=AstraConfig(...) or AstraConfig fields such as num_devices=4, groups=32"
        )
    if astra_config is not None:
        base = astra_config
    elif saved_block is not None:
        try:
            base = AstraConfig.from_dict(saved_block)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{directory}/config.json has an invalid 'astra' block: {error}") from error
    else:
        base = AstraConfig()
    effective = base.replace(**overrides) if overrides else base
    saved_devices = (saved_block or {}).get("num_devices")
    if saved_devices is not None and saved_devices != effective.num_devices:
        warnings.warn(
            f"{directory} was saved with num_devices={saved_devices}; loading it with "
            f"num_devices={effective.num_devices}. The codebooks do not depend on N, so the model runs, but "
            f"fine-tuning (NAQ) adapted it to N={saved_devices}: measure its accuracy at "
            f"N={effective.num_devices}, or fine-tune again at that N.",
            stacklevel=3,
        )
    return effective


def _codebook_files(directory: Path, required: bool) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, for every ASTRA tensor; every weights file is checked to open."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif required:
        raise ValueError(
            f"{directory} has an 'astra' block in config.json but no model.safetensors (or sharded index): "
            f"ASTRA codebooks are stored in safetensors; found {sorted(p.name for p in directory.iterdir())}"
        )
    else:
        return {}  # a plain non-safetensors checkpoint: transformers loads it, there are no codebooks
    locations: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file} is listed in {index.name} but missing from {directory}")
        for key in _safetensors_keys(file):
            if ASTRA_KEY_MARKER in key:
                locations[key] = file
    return locations


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except SafetensorError as error:
        raise ValueError(
            f"{file} is truncated or corrupt ({error}); save it again, or download it again with "
            "force_download=True"
        ) from error


def _concrete_model_class(config: PretrainedConfig, model_class: type | None) -> type:
    if model_class is None:
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        model_class = model_class or AutoModel
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: pick its class for this config
    if mapping is None:
        return model_class
    try:
        resolved = mapping[type(config)]
    except KeyError as error:
        raise ValueError(f"{model_class.__name__} has no model class for model_type={config.model_type!r}") from error
    return resolved[0] if isinstance(resolved, (list, tuple)) else resolved


@contextlib.contextmanager
def _astra_keys_expected(model_class: type) -> Iterator[None]:
    """While transformers loads the base weights, the codebook tensors are not 'unexpected keys'.

    `_keys_to_ignore_on_load_unexpected` is transformers' hook for this; it is read when the model is built,
    before `astra.patch` can add the modules, so it is set on the class for the duration of the load only.
    """
    missing = object()
    own = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected", missing)
    inherited = list(model_class._keys_to_ignore_on_load_unexpected or [])
    model_class._keys_to_ignore_on_load_unexpected = [*inherited, r"\.astra_quantizer\."]
    try:
        yield
    finally:
        if own is missing:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = own


def _load_codebooks(model: nn.Module, locations: dict[str, Path], directory: Path, required: bool) -> None:
    """Copy the checkpoint's ASTRA tensors into the patched model; any mismatch names the layer.

    ``required``: the checkpoint was saved from a patched model, so every layer's codebook must be there.
    """
    if not locations and not required:
        return  # a plain checkpoint: the codebooks stay uninitialised until calibration
    expected = {name: tensor for name, tensor in model.state_dict().items() if ASTRA_KEY_MARKER in name}
    sources = {name: _checkpoint_key(model, name, tensor, locations) for name, tensor in expected.items()}
    missing = sorted(name for name, key in sources.items() if key is None)
    if missing:
        layers = sorted({_layer_name(name) for name in missing})
        raise ValueError(f"{directory} lacks the codebooks of layer(s) {layers} (missing tensors {missing})")
    strangers = sorted(set(locations) - set(sources.values()))
    if strangers:
        raise ValueError(f"{directory} holds ASTRA tensors for modules this model does not have: {strangers}")
    loaded = {}
    for name, key in sources.items():
        tensor = _read_tensor(locations[key], key)
        if tensor.shape != expected[name].shape:
            raise ValueError(_shape_error(model, name, key, tuple(tensor.shape), tuple(expected[name].shape)))
        loaded[name] = tensor
    model.load_state_dict(loaded, strict=False)


def _checkpoint_key(model: nn.Module, name: str, tensor: torch.Tensor, locations: dict[str, Path]) -> str | None:
    """The checkpoint's key for the model's tensor ``name``, or None.

    transformers may save under other names than the modules have (ViT: ``vit.layers.0`` is saved as
    ``vit.encoder.layer.0``); its save-side renaming gives that name. A checkpoint of a model with a head
    loaded into the bare model (or the other way round) differs by the base model prefix.
    """
    saved_names = [name, *revert_weight_conversion(model, {name: tensor})] if revert_weight_conversion else [name]
    prefix = f"{model.base_model_prefix}."
    for saved in saved_names:
        for candidate in (saved, prefix + saved, saved.removeprefix(prefix)):
            if candidate in locations:
                return candidate
    return None


def _layer_name(key: str) -> str:
    return key.split(ASTRA_KEY_MARKER)[0]


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    try:
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key)
    except SafetensorError as error:
        raise ValueError(f"{file} is truncated or corrupt: cannot read {key} ({error})") from error


def _shape_error(model: nn.Module, name: str, key: str, found: tuple[int, ...], needed: tuple[int, ...]) -> str:
    config = astra_state(model).config
    return (
        f"The codebook of layer {_layer_name(name)} ({key}) has shape {found} in the checkpoint, but "
        f"AstraConfig(groups={config.groups}, codebook_size={config.codebook_size}, quantize={config.quantize!r}) "
        f"needs {needed}: the checkpoint was saved with other groups/codebook_size/quantize values than its "
        "config.json 'astra' block (or the ones passed) say."
    )


def _warn_if_uninitialised(model: nn.Module) -> None:
    layers = [index for index, quantizer in enumerate(quantizers(model)) if not bool(quantizer.initialized)]
    if layers:
        warnings.warn(
            f"ASTRA codebooks of layer(s) {layers} are uninitialised (random) until calibration: run "
            "astra.calibrate(model, batches) (and fine-tune) before using the model.",
            stacklevel=3,
        )
