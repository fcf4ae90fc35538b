"""ASTRA fine-tuning: patch a base model, add `AstraNAQCallback` to a standard Trainer, fine-tune, evaluate, save.

    python examples/finetune_astra.py --task vit  --base outputs/vit-base  --groups 32 --quantize hidden
    python examples/finetune_astra.py --task gpt2 --base outputs/gpt2-base --groups 32 --quantize kv
    python examples/finetune_astra.py --task gpt2 --base gpt2 --dataset Salesforce/wikitext \\
        --dataset-config wikitext-103-raw-v1                                    # online, Hub checkpoint

Writes one JSON (``--result-json``, default <output-dir>/result.json) with the base model's metric, the
metric of the patched model before fine-tuning (k-means codebooks only) and after, bits per token, the
compression ratio, the fine-tuning time, the hardware and the command. ``--save`` also saves the fine-tuned
patched model with ``save_pretrained`` (codebooks included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, set_seed

import tasks
import transformers_astra as astra


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tasks.TASKS, required=True)
    parser.add_argument("--base", required=True, help="a folder saved by train_base.py or a Hub checkpoint name")
    parser.add_argument("--dataset", help="fashion-mnist / kjv (offline, Debian) or a Hub dataset name")
    parser.add_argument("--dataset-config")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result-json", help="default: <output-dir>/result.json")
    parser.add_argument("--num-devices", type=int, default=4)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--quantize", choices=["hidden", "kv"], default="hidden")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="NAQ lambda")
    parser.add_argument("--noise-schedule", choices=["constant", "warmup"], default="constant")
    parser.add_argument("--commitment-weight", type=float, default=1e-4, help="beta")
    parser.add_argument("--no-distributed-cls", action="store_true", help="vit: one class token (no DCT)")
    parser.add_argument("--no-dead-code-reset", action="store_true")
    parser.add_argument("--control", action="store_true",
                        help="fine-tune the unpatched model with the same recipe (the fair reference for ASTRA rows)")
    parser.add_argument("--epochs", type=float, default=None, help="default: vit 5, gpt2 2")
    parser.add_argument("--batch-size", type=int, default=None, help="default: vit 256, gpt2 32")
    parser.add_argument("--lr", type=float, default=None, help="default: vit 2e-4, gpt2 2e-4")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="0 keeps the codebooks from decaying")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--save", action="store_true", help="save the fine-tuned patched model in --output-dir")
    parser.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the saved weights (float16 halves the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = {"vit": dict(epochs=5, batch_size=256, lr=2e-4), "gpt2": dict(epochs=2, batch_size=32, lr=2e-4)}
    for name, value in defaults[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dataset = args.dataset or tasks.DEFAULT_DATASETS[args.task]
    return args


def astra_config(args) -> astra.AstraConfig:
    return astra.AstraConfig(
        num_devices=args.num_devices, codebook_size=args.codebook_size, groups=args.groups, quantize=args.quantize,
        noise_scale=args.noise_scale, commitment_weight=args.commitment_weight,
        distributed_cls=args.task == "vit" and not args.no_distributed_cls,
    )


def build(args):
    """(base model, collator or None, train set, test set, tokenizer or None)."""
    dataset = tasks.load_task_dataset(args.task, args.dataset, args.dataset_config)
    dataset["train"] = tasks.first_rows(dataset["train"], args.max_train_samples)
    model = tasks.load_pretrained(args.task, args.base, dataset)
    if args.task == "vit":
        train, test, collator = tasks.image_datasets(dataset, model.config)
        tokenizer = None
    else:
        tokenizer = tasks.load_tokenizer(args.base)
        blocks = tasks.lm_datasets(dataset, tokenizer, model.config.n_positions)
        train, test, collator = blocks["train"], blocks["test"], None
    test = tasks.first_rows(test, args.max_eval_samples)
    return model, collator, train, test, tokenizer


def calibration_batches(trainer: Trainer, count: int) -> list:
    """The first ``count`` training batches, as the Trainer feeds them (same collator, same device)."""
    return list(itertools.islice(trainer.get_train_dataloader(), count))


def last_code_stats(log_history: list[dict]) -> dict:
    """The callback's latest code statistics (``astra/...`` entries) from the Trainer's log history."""
    for entry in reversed(log_history):
        stats = {key: value for key, value in entry.items() if key.startswith("astra/")}
        if stats:
            return stats
    return {}


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    model, collator, train, test, tokenizer = build(args)
    output_dir = Path(args.output_dir)
    training_args = tasks.training_arguments(
        str(output_dir / "trainer"), args.epochs, args.batch_size, args.lr, args.weight_decay, args.workers, args.seed
    )
    callback = astra.AstraNAQCallback(
        noise_schedule=args.noise_schedule, reset_dead_codes=not args.no_dead_code_reset, seed=args.seed
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, **tasks.task_trainer_kwargs(args.task, collator))
    if not args.control:
        callback.attach(trainer)  # ahead of the reporting callbacks, which then log its astra/* statistics
    base_value = tasks.evaluate_task(trainer, args.task, test)

    config = astra_config(args)
    before_value = None
    if not args.control:
        astra.patch(model, config)
        # K-means now (the callback would do it at train start) so that the table can show ASTRA before fine-tuning.
        astra.calibrate(model, calibration_batches(trainer, args.calibration_batches), max_samples=8192, seed=args.seed)
        before_value = tasks.evaluate_task(trainer, args.task, test)

    start = time.perf_counter()
    trainer.train()
    finetune_seconds = time.perf_counter() - start
    value = tasks.finite(tasks.evaluate_task(trainer, args.task, test))
    if args.save:
        model.to(getattr(torch, args.save_dtype)).save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    hidden_size = model.config.hidden_size
    result = {
        "model": str(args.base),
        "task": args.task,
        "dataset": args.dataset,
        "N": args.num_devices,
        "G": args.groups,
        "K": args.codebook_size,
        "quantize": "none (control)" if args.control else args.quantize,
        "noise_scale": args.noise_scale,
        "noise_schedule": args.noise_schedule,
        "distributed_cls": config.distributed_cls,
        "commitment_weight": args.commitment_weight,
        "metric": tasks.metric_name(args.task),
        "value": value,
        "value_before_finetune": before_value,
        "base_value": base_value,
        "bits_per_token": None if args.control else config.bits_per_token,
        "compression_ratio": None if args.control else config.compression_ratio(hidden_size),
        "hidden_size": hidden_size,
        "epochs": args.epochs,
        "train_steps": trainer.state.global_step,
        "finetune_seconds": round(finetune_seconds, 1),
        "code_stats": last_code_stats(trainer.state.log_history),
        "hardware": tasks.hardware(),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "examples/finetune_astra.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    result_path = Path(args.result_json or output_dir / "result.json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
