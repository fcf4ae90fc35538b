"""ASTRA checkpoints: save with a model card, push, and load with extra options.

Loading needs nothing from here: after ``import transformers_astra`` the Auto classes, ``pipeline`` and any
model class's ``from_pretrained`` load a checkpoint saved from a patched model as the patched model
(`transformers_astra.hf_quantizer`). `from_pretrained` here adds what they cannot do:

- patch a plain checkpoint while it loads, given an AstraConfig (or its fields as keyword arguments);
- override a saved checkpoint's settings, e.g. ``num_devices`` (with a warning when that N is not one its
  fine-tuning ran at, as recorded in ``fine_tuned_num_devices``; unrecorded: when it is not the saved N);
- pick the model class from the checkpoint's ``architectures`` (any task) with a named error when it is not one;
- name the one command that converts a checkpoint written by transformers-astra 0.1.0.

`save_pretrained` and `push_to_hub` write the ASTRA model card (`create_model_card`) next to the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import CommitInfo, HfApi
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .config import AstraConfig
from .modelcard import create_model_card
from .patch import astra_state
from .quantization_config import FINE_TUNED_FIELD, QUANT_METHOD, AstraQuantizationConfig, checked_fine_tuned_num_devices

ASTRA_FIELDS = frozenset(field.name for field in dataclasses.fields(AstraConfig))
# from_pretrained arguments that also locate config.json (they go to AutoConfig and to the model's loader).
CONFIG_ARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "subfolder")
CONVERT_COMMAND = "python -m transformers_astra.convert"

logger = logging.getLogger(__name__)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    astra_config: AstraConfig | None = None,
    *,
    model_class: type | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A patched ASTRA model from a local directory or a Hub repo id, through transformers' ``from_pretrained``.

    - A checkpoint saved from a patched model comes back with its settings and codebooks: its outputs equal
      the saved model's (the same as ``AutoModelFor....from_pretrained`` after ``import transformers_astra``).
    - A plain transformers checkpoint needs ``astra_config`` (or AstraConfig fields as keyword arguments); it
      is patched while it loads, with uninitialised codebooks, and a warning says to run `astra.calibrate`.

    Keyword arguments that are AstraConfig fields (``num_devices=2``, ``noise_scale=0.0``) override the
    saved settings. Any ``num_devices`` loads (the codebooks do not depend on N); one that the checkpoint's
    fine-tuning did not run at (its recorded ``fine_tuned_num_devices``; when none is recorded, any N but the
    saved one) warns, since fine-tuning adapted it to those N. Fields that change the codebook shapes (``groups``,
    ``codebook_size``, ``quantize``) do not fit the saved codebooks and raise an error naming the layer.
    Everything else goes to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ``revision``,
    ``cache_dir``, ``token``, ...). ``model_class`` picks the class (a model class or an Auto class); by
    default the one named in the config's ``architectures``.
    """
    overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in ASTRA_FIELDS}
    if Path(pretrained_model_name_or_path).is_file():
        raise ValueError(
            f"{pretrained_model_name_or_path} is a file; pass the checkpoint directory (the one holding config.json)"
        )
    config = AutoConfig.from_pretrained(
        pretrained_model_name_or_path, **{name: kwargs[name] for name in CONFIG_ARGS if name in kwargs}
    )
    _refuse_legacy_checkpoint(config, pretrained_model_name_or_path)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        if saved.get("quant_method") != QUANT_METHOD:
            raise ValueError(
                f"{pretrained_model_name_or_path} is quantized with {saved.get('quant_method')!r}; ASTRA patches "
                "full-precision models only."
            )
        if astra_config is not None or overrides:
            config.quantization_config = _overridden(saved, astra_config, overrides, pretrained_model_name_or_path)
    elif astra_config is None and not overrides:
        raise ValueError(
            f"{pretrained_model_name_or_path} is a plain transformers checkpoint (its config.json has no ASTRA "
            "quantization_config): pass astra_config=AstraConfig(...) or AstraConfig fields such as num_devices=4, "
            "groups=32"
        )
    else:
        settings = (astra_config or AstraConfig()).replace(**overrides)
        kwargs["quantization_config"] = AstraQuantizationConfig.from_astra_config(settings)
    return _model_class(config, model_class).from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)


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
    (transformers' own ``model.push_to_hub`` uploads the same weights and config, but writes its generic card,
    tagged ``astra``, or keeps the card already on the Hub: see docs/checkpoints.md.)
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


def _refuse_legacy_checkpoint(config: PretrainedConfig, name: str | os.PathLike) -> None:
    if getattr(config, "astra", None) is not None and getattr(config, "quantization_config", None) is None:
        raise ValueError(legacy_checkpoint_message(name))


def legacy_checkpoint_message(name: str | os.PathLike) -> str:
    return (
        f"{name} was saved by transformers-astra 0.1.0 (config.json has an 'astra' block and no quantization_config), "
        f"which transformers loads as a plain, unpatched model. Convert it once, in place: {CONVERT_COMMAND} {name}"
    )


def _overridden(
    saved: dict[str, Any], astra_config: AstraConfig | None, overrides: dict[str, Any], name: str | os.PathLike
) -> dict[str, Any]:
    """The saved quantization config with other settings (the codebook records stay, to check shapes)."""
    try:
        base = astra_config or AstraQuantizationConfig.from_dict(saved).astra_config
        fine_tuned = checked_fine_tuned_num_devices(saved.get(FINE_TUNED_FIELD))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}/config.json has an invalid ASTRA quantization_config: {error}") from error
    effective = base.replace(**overrides)
    _check_num_devices(name, saved.get("num_devices"), fine_tuned, effective.num_devices)
    return {**saved, **effective.to_dict()}


def _check_num_devices(name: str | os.PathLike, saved: Any, fine_tuned: list[int] | None, num_devices: int) -> None:
    """Warn when ``num_devices`` is not an N the checkpoint was fine-tuned at (unrecorded: not the saved N)."""
    if fine_tuned is None:
        if saved == num_devices:
            return
        message = (
            f"{name} was saved with num_devices={saved}; loading it with num_devices={num_devices}. The codebooks do "
            f"not depend on N, so the model runs, but fine-tuning (NAQ) adapted it to N={saved}: measure its "
            f"accuracy at N={num_devices}, or fine-tune again at that N."
        )
    elif num_devices in fine_tuned:
        logger.info("%s was fine-tuned at num_devices %s; loading it with num_devices=%d", name, fine_tuned, num_devices)
        return
    else:
        message = (
            f"{name} was fine-tuned at num_devices {fine_tuned} (saved with num_devices={saved}); loading it with "
            f"num_devices={num_devices}, which is not among them. The codebooks do not depend on N, so the model "
            f"runs, but fine-tuning (NAQ) adapted it to those N: measure its accuracy at N={num_devices}, or "
            f"fine-tune again at that N (or over several N: RandomShardsCallback)."
        )
    warnings.warn(message, stacklevel=4)


def _model_class(config: PretrainedConfig, model_class: type | None) -> type:
    """``model_class``, or the transformers class that config.json's ``architectures`` names."""
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None)
    if not architectures:
        return AutoModel
    name = architectures[0] if isinstance(architectures, (list, tuple)) else architectures
    candidate = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    is_model = isinstance(candidate, type) and issubclass(candidate, PreTrainedModel)
    if not is_model or not isinstance(config, candidate.config_class):
        raise ValueError(
            f"config.json 'architectures' is {architectures!r:.200}, which does not name a transformers model class "
            f"for model_type={config.model_type!r}: the file was altered. Pass model_class= (e.g. "
            "AutoModelForCausalLM) to choose the class yourself."
        )
    return candidate
