"""The Hub model card of an ASTRA model: YAML metadata plus N, K, G, bits, compression and measured results.

Measured numbers come only from result rows (``docs/results/accuracy.json`` of this project, or rows passed
by the caller) whose ASTRA settings equal the model's; with none, the card says that nothing was measured.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .config import AstraConfig
from .patch import ASTRA_TAGS, astra_state, fine_tuned_num_devices, quantizers
PAPER = "https://arxiv.org/abs/2505.19342"
# Result row key -> AstraConfig field; a row that names one of these must equal the model's value.
ROW_FIELDS = {
    "N": "num_devices",
    "G": "groups",
    "K": "codebook_size",
    "quantize": "quantize",
    "noise_scale": "noise_scale",
    "commitment_weight": "commitment_weight",
    "distributed_cls": "distributed_cls",
}
QUANTIZED_VECTOR = {
    "hidden": "the pre-attention norm output (the receiver projects K/V)",
    "kv": "keys (before rotary positions, if any) and values (two codes per group)",
}

Rows = list[dict[str, Any]]


def create_model_card(
    model: nn.Module,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    results: str | os.PathLike | Rows | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card of a patched model.

    Args:
        repo_id: where it goes (named in the title and the usage snippet).
        base_model: the Hub id of the model it was fine-tuned from; by default the name it was loaded under,
            when that is a Hub id and not a local path.
        datasets: datasets it was fine-tuned on (the result rows' datasets are added).
        results: a JSON file of result rows (a list, or ``{"rows": [...]}``) or the rows themselves; keys
            ``dataset``, ``metric``, ``value``, and optionally ``base_value`` (the unpatched model), ``command``,
            ``model``, ``N``, ``G``, ``K``, ``quantize``, ``noise_scale``, ``commitment_weight``,
            ``distributed_cls``. Only rows whose settings equal this model's are used.
    """
    state = astra_state(model)
    config = state.config
    base_model = base_model or _hub_id(getattr(model.config, "_name_or_path", None))
    rows = matching_results(load_results(results), config, base_model, has_class_tokens=_has_class_tokens(state))
    task = _task(model)
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        language=language,
        pipeline_tag=task,
        tags=_unique([*ASTRA_TAGS, model.config.model_type, *(tags or [])]),
        datasets=_unique([*(datasets or []), *(row["dataset"] for row in rows)]) or None,
        metrics=_unique(row["metric"] for row in rows) or None,
        model_name=repo_id or f"{model.config.model_type}-astra",
        eval_results=[_eval_result(row, task) for row in rows] or None,
    )
    body = "\n\n".join(
        [
            _title(model, repo_id, base_model),
            _settings_table(model, config),
            _results_section(rows),
            _usage_section(model, config, repo_id),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def load_results(results: str | os.PathLike | Rows | dict[str, Any] | None) -> Rows:
    """Result rows from a JSON file, a list of rows, ``{"rows": [...]}`` or one row; each needs a dataset,
    a metric and a finite numeric value."""
    if results is None:
        return []
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if not path.is_file():
            raise ValueError(f"results file {path} does not exist")
        results = json.loads(path.read_text())
    if isinstance(results, dict):
        results = results["rows"] if "rows" in results else [results]
    rows = list(results)
    for row in rows:
        value = row.get("value")
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if row.get("dataset") is None or row.get("metric") is None or not finite:
            raise ValueError(f"A result row needs a dataset, a metric and a finite numeric value; got {row!r}")
    return rows


def matching_results(rows: Rows, config: AstraConfig, base_model: str | None, has_class_tokens: bool = True) -> Rows:
    """The rows measured with this model's ASTRA settings (and base model, when a row names one), each once."""
    matching = [row for row in rows if _row_matches(row, config, base_model, has_class_tokens)]
    # The same run may come from a results table and from the checkpoint's own result file.
    by_run = {(row["dataset"], row["metric"], row["value"], row.get("command")): row for row in matching}
    return list(by_run.values())


def _row_matches(row: dict[str, Any], config: AstraConfig, base_model: str | None, has_class_tokens: bool) -> bool:
    if row.get("model") is not None and not _same_model(row["model"], base_model):
        return False
    for key, field in ROW_FIELDS.items():
        if row.get(key) is None or (field == "distributed_cls" and not has_class_tokens):
            continue  # not recorded, or meaningless for a model without class tokens
        wanted, recorded = getattr(config, field), row[key]
        same = math.isclose(wanted, recorded) if isinstance(wanted, float) else wanted == recorded
        if not same:
            return False
    return True


def _same_model(recorded: str, base_model: str | None) -> bool:
    # "gpt2" and "openai-community/gpt2" name the same model; an unknown base model matches nothing.
    return base_model is not None and recorded.split("/")[-1] == base_model.split("/")[-1]


def _has_class_tokens(state) -> bool:
    return state.adapter.cls_per_shard(state.config.replace(distributed_cls=True)) > 0


def _hub_id(name: str | None) -> str | None:
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _task(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith(("LMHeadModel", "ForCausalLM")):
        return "text-generation"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith("ForImageClassification"):
        return "image-classification"
    return "image-feature-extraction" if model.main_input_name == "pixel_values" else "feature-extraction"


def _eval_result(row: dict[str, Any], task: str) -> EvalResult:
    return EvalResult(
        task_type=task,
        dataset_type=row["dataset"],
        dataset_name=row["dataset"],
        metric_type=row["metric"],
        metric_value=row["value"],
    )


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _title(model: nn.Module, repo_id: str | None, base_model: str | None) -> str:
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its base model"
    return (
        f"# {repo_id or type(model).__name__ + ' with ASTRA'}\n\n"
        f"`{type(model).__name__}` from {origin}, patched with "
        f"transformers-astra ([ASTRA, arXiv 2505.19342]({PAPER})) for multi-device inference: the tokens "
        "of one input are split over N devices; attention among a device's own tokens is full precision, and "
        "other devices' tokens arrive as vector-quantization codes. The weights hold the per-layer codebooks."
    )


def _settings_table(model: nn.Module, config: AstraConfig) -> str:
    width = astra_state(model).adapter.quantized_width(model, config)  # kv mode: keys and values, K/V heads only
    initialised = all(bool(quantizer.initialized) for quantizer in quantizers(model))
    rows = [
        ("N (devices)", config.num_devices),
        ("K (codebook size)", f"{config.codebook_size} ({config.bits_per_code} bits per code)"),
        ("G (groups per vector)", config.groups),
        ("quantize", f"`{config.quantize}`: {QUANTIZED_VECTOR[config.quantize]}"),
        ("bits per token and layer", config.bits_per_token),
        ("compression vs fp32", f"{width * 32 / config.bits_per_token:.1f}x (width {width})"),
        ("NAQ noise λ (fine-tuning)", f"{config.noise_scale} (per {config.noise_granularity})"),
        ("commitment weight β", config.commitment_weight),
        ("shard sizes", config.shard_sizes or "even"),
        ("codebooks", "initialised" if initialised else "uninitialised: run `astra.calibrate` before use"),
    ]
    if _has_class_tokens(astra_state(model)):
        rows.insert(8, ("distributed class tokens", config.distributed_cls))
    fine_tuned = fine_tuned_num_devices(model)
    if fine_tuned is not None:
        rows.insert(1, ("fine-tuned at N", _fine_tuned_text(fine_tuned)))
    lines = ["## ASTRA settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _fine_tuned_text(fine_tuned: list[int]) -> str:
    if len(fine_tuned) == 1:
        return str(fine_tuned[0])
    return f"{', '.join(map(str, fine_tuned))} (N drawn per step: `RandomShardsCallback`)"


def _results_section(rows: Rows) -> str:
    if not rows:
        return (
            "## Results\n\nNo accuracy or perplexity measured with these settings was given for this checkpoint; "
            "see the ASTRA paper for the reference numbers."
        )
    lines = [
        "## Results",
        "",
        "Measured with the same ASTRA settings; *base* is the unpatched model.",
        "",
        "| dataset | metric | ASTRA | base | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        base = row.get("base_value")
        command = f"`{row['command']}`" if row.get("command") else ""
        lines.append(
            f"| {row['dataset']} | {row['metric']} | {row['value']:.4g} | "
            f"{'' if base is None else format(base, '.4g')} | {command} |"
        )
    return "\n".join(lines)


AUTO_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}


def _usage_section(model: nn.Module, config: AstraConfig, repo_id: str | None) -> str:
    name = repo_id or "path/to/this/checkpoint"
    n = config.num_devices
    inputs = model.main_input_name
    auto_class = AUTO_CLASSES.get(_task(model), "AutoModel")
    generate = (
        "\ntokens = runtime.generate(input_ids=input_ids, max_new_tokens=20)  # decoding runs on the last rank"
        if _task(model) == "text-generation"
        else ""
    )
    return f"""## Usage

Needs `pip install transformers-astra`, and `import transformers_astra` before loading: the import registers
ASTRA (`quant_method: "astra"` in config.json) with transformers. Without it transformers only logs
"Unknown quantization type, got astra" and returns the plain model, without the codebooks.

```python
import transformers_astra  # registers ASTRA with transformers
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{name}")  # a patched {type(model).__name__}: N={n}, G={config.groups}
```

On {n} devices, one process per device, every process given the whole input: on one GPU host
`accelerate launch --multi_gpu --num_processes {n} infer.py`; on CPUs or several hosts
`torchrun --nproc_per_node {n} infer.py` (see transformers-astra's docs/distributed.md).

```python
# infer.py
import torch.distributed as dist
import transformers_astra as astra
from transformers import {auto_class}

dist.init_process_group("gloo")
model = {auto_class}.from_pretrained("{name}")
runtime = astra.DistributedRuntime(model)  # {n} ranks; each runs the model on its own shard of the tokens
{inputs} = ...  # the whole input, the same on every rank
output = runtime({inputs}={inputs}){generate}
```

{_other_num_devices(name, n, fine_tuned_num_devices(model))}"""


def _other_num_devices(name: str, n: int, fine_tuned: list[int] | None) -> str:
    if fine_tuned is None:
        return (
            f"The checkpoint was fine-tuned for N={n}. `astra.from_pretrained(\"{name}\", num_devices=M)` also runs\n"
            f"(the codebooks do not depend on N) and warns, since accuracy was measured at N={n}."
        )
    one = len(fine_tuned) == 1
    at = f"N={fine_tuned[0]}" if one else f"N in {{{', '.join(map(str, fine_tuned))}}}"
    return (
        f"The checkpoint was fine-tuned at {at} (config.json: `fine_tuned_num_devices`). "
        f"`astra.from_pretrained(\"{name}\", num_devices=M)` loads it {'at that N' if one else 'at any of these'} "
        "without a warning; at another M it also runs (the codebooks do not depend on N) and warns, since "
        f"fine-tuning adapted it to {'that N' if one else 'those N'}."
    )
