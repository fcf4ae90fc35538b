"""ASTRA fine-tuning: patch a base model, add `AstraNAQCallback` to a standard Trainer, fine-tune, evaluate, save.

    python examples/finetune_astra.py --task vit  --base outputs/vit-base  --groups 32 --quantize hidden
    python examples/finetune_astra.py --task gpt2 --base outputs/gpt2-base --groups 32 --quantize kv
    python examples/finetune_astra.py --task llama --base outputs/llama-base --groups 8 --quantize kv
    python examples/finetune_astra.py --task gpt2 --base gpt2 --dataset Salesforce/wikitext \\
        --dataset-config wikitext-103-raw-v1                                    # online, Hub checkpoint

Writes one JSON (``--result-json``, default <output-dir>/result.json) with the base model's metric, the
metric of the patched model before fine-tuning (k-means codebooks only) and after, bits per token, the
compression ratio, the fine-tuning time, the hardware and the command. ``--save`` also saves the fine-tuned
patched model with ``save_pretrained`` (codebooks included), its tokenizer (gpt2) or image processor (vit), and
the command in command.txt.

Evaluation beyond the training layout (cheap, after fine-tuning; each an entry of ``evals`` in the JSON):
``--eval-num-devices 2 3 6 8`` (the same checkpoint at other N), ``--eval-shard-sizes 1,2,3,4`` (uneven shards,
relative sizes, N = their count), ``--extra-eval english-ood`` (perplexity on other text, also of the base and
the control). ``--random-shards 2,3,4,6,8`` fine-tunes N-agnostically (`RandomShardsCallback`: N and shard
boundaries drawn per step).
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
from transformers_astra.random_shards import RandomShardsCallback, set_shards


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
    parser.add_argument("--epochs", type=float, default=None, help="default: vit 5, gpt2/llama 2")
    parser.add_argument("--batch-size", type=int, default=None, help="default: vit 256, gpt2/llama 32")
    parser.add_argument("--lr", type=float, default=None, help="default: vit 2e-4, gpt2/llama 2e-4")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="0 keeps the codebooks from decaying")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--save", action="store_true", help="save the fine-tuned patched model in --output-dir")
    parser.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the saved weights (float16 halves the checkpoint)")
    parser.add_argument("--noise-warmup-ratio", type=float, default=0.1, help="with --noise-schedule warmup")
    parser.add_argument("--eval-num-devices", type=int, nargs="*", default=[],
                        help="also evaluate the fine-tuned model at these N (even shards)")
    parser.add_argument("--shard-sizes", choices=["even", "balanced"], default="even",
                        help="shards during fine-tuning and the main evaluation: even (every recorded row of docs/results.md; "
                             "the default here, so their commands reproduce) or balanced (AstraConfig's default for causal "
                             "models since 2026-11-27; the same as even for ViT)")
    parser.add_argument("--eval-shard-sizes", nargs="*", default=[], type=shard_sizes_arg,
                        help="also evaluate with these uneven shards: comma-separated relative sizes, one per device")
    parser.add_argument("--extra-eval", nargs="*", default=[],
                        help="gpt2: also measure perplexity on these text datasets' test splits (e.g. english-ood)")
    parser.add_argument("--random-shards", type=shard_sizes_arg,
                        help="N-agnostic fine-tuning: comma-separated N values drawn per step (e.g. 2,3,4,6,8)")
    parser.add_argument("--uneven-probability", type=float, default=0.5,
                        help="with --random-shards: chance that a step's shards get random relative sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.extra_eval and not tasks.is_text(args.task):
        raise SystemExit("--extra-eval: only for the text tasks (gpt2, llama)")
    tasks.check_task_supported(args.task)
    if args.control and (args.random_shards or args.eval_num_devices or args.eval_shard_sizes):
        raise SystemExit("--control fine-tunes the unpatched model: it has no devices to vary")
    text = dict(epochs=2, batch_size=32, lr=2e-4)
    defaults = {"vit": dict(epochs=5, batch_size=256, lr=2e-4), "gpt2": text, "llama": text}
    for name, value in defaults[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dataset = args.dataset or tasks.DEFAULT_DATASETS[args.task]
    return args


def shard_sizes_arg(text: str) -> list[float]:
    """``"1,2,3"`` -> [1.0, 2.0, 3.0] (integers stay integers: ``"2,3"`` -> [2, 3])."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return [int(v) if v.is_integer() else v for v in values]


def astra_config(args) -> astra.AstraConfig:
    return astra.AstraConfig(
        num_devices=args.num_devices, codebook_size=args.codebook_size, groups=args.groups, quantize=args.quantize,
        noise_scale=args.noise_scale, commitment_weight=args.commitment_weight,
        distributed_cls=args.task == "vit" and not args.no_distributed_cls,
        shard_sizes=None if args.shard_sizes == "even" else "balanced",
    )


def build(args):
    """(base model, collator or None, train set, test set, tokenizer or None, {extra dataset: test blocks})."""
    dataset = tasks.load_task_dataset(args.task, args.dataset, args.dataset_config)
    dataset["train"] = tasks.first_rows(dataset["train"], args.max_train_samples)
    model = tasks.load_pretrained(args.task, args.base, dataset)
    if args.task == "vit":
        train, test, collator = tasks.image_datasets(dataset, model.config)
        tokenizer = None
    else:
        tokenizer = tasks.load_tokenizer(args.base)
        blocks = tasks.lm_datasets(dataset, tokenizer, tasks.context_length(model.config))
        train, test, collator = blocks["train"], blocks["test"], None
    test = tasks.first_rows(test, args.max_eval_samples)
    extra = {}
    for name in args.extra_eval:
        blocks = tasks.lm_datasets(tasks.load_task_dataset(args.task, name), tokenizer, tasks.context_length(model.config))
        extra[f"{name}:test"] = tasks.first_rows(blocks["test"], args.max_eval_samples)
    return model, collator, train, test, tokenizer, extra


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


def evaluate_layouts(trainer, model, args, test, extra: dict) -> list[dict]:
    """The fine-tuned model on the other layouts (``--eval-num-devices``, ``--eval-shard-sizes``) and datasets."""
    evals = []
    for name, dataset in extra.items():
        evals.append({"eval_dataset": name, "eval_num_devices": None if args.control else args.num_devices,
                      "eval_shard_sizes": None, "value": tasks.evaluate_task(trainer, args.task, dataset)})
    if args.control:
        return evals
    layouts = [(n, None) for n in args.eval_num_devices] + [(len(s), s) for s in args.eval_shard_sizes]
    for num_devices, sizes in layouts:
        set_shards(model, num_devices, sizes)
        try:
            value = tasks.evaluate_task(trainer, args.task, test)
        finally:
            set_shards(model, args.num_devices)
        evals.append({"eval_dataset": f"{args.dataset}:test", "eval_num_devices": num_devices,
                      "eval_shard_sizes": sizes, "value": value})
    return evals


def save_checkpoint(model, output_dir: Path, args, tokenizer, command: str) -> None:
    """save_pretrained (codebooks included) + tokenizer or image processor + the command that made it."""
    model.to(getattr(torch, args.save_dtype)).save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    else:
        tasks.image_processor(model.config).save_pretrained(output_dir)
    lines = [command]
    base_result = Path(args.base) / "base_result.json"
    if base_result.is_file():  # the base it started from, and how that was made
        lines.insert(0, f"# base ({args.base}): " + json.loads(base_result.read_text())["command"])
    (output_dir / "command.txt").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    command = shlex.join(["python", "examples/finetune_astra.py", *(argv if argv is not None else sys.argv[1:])])
    model, collator, train, test, tokenizer, extra = build(args)
    output_dir = Path(args.output_dir)
    training_args = tasks.training_arguments(
        str(output_dir / "trainer"), args.epochs, args.batch_size, args.lr, args.weight_decay, args.workers, args.seed,
        disable_tqdm=True,
    )
    callback = astra.AstraNAQCallback(
        noise_schedule=args.noise_schedule, noise_warmup_ratio=args.noise_warmup_ratio,
        reset_dead_codes=not args.no_dead_code_reset, seed=args.seed,
    )
    shards = None
    if args.random_shards:
        shards = RandomShardsCallback(num_devices=[int(n) for n in args.random_shards],
                                      uneven_probability=args.uneven_probability, seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[shards] if shards else None,
                      **tasks.task_trainer_kwargs(args.task, collator))
    if not args.control:
        callback.attach(trainer)  # ahead of the reporting callbacks, which then log its astra/* statistics
    base_value = tasks.evaluate_task(trainer, args.task, test)
    base_evals = [{"eval_dataset": name, "value": tasks.evaluate_task(trainer, args.task, dataset)}
                  for name, dataset in extra.items()]

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
    evals = evaluate_layouts(trainer, model, args, test, extra)
    if args.save:
        save_checkpoint(model, output_dir, args, tokenizer, command)
    hidden_size = model.config.hidden_size
    # Width of the vectors quantized: the hidden state, or keys and values (with GQA narrower than 2 x hidden).
    width = None if args.control else astra.quantizers(model)[0].width
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
        "random_shards": args.random_shards,
        "distributed_cls": config.distributed_cls,
        "commitment_weight": args.commitment_weight,
        "metric": tasks.metric_name(args.task),
        "seed": args.seed,
        "eval_dataset": f"{args.dataset}:test",
        "eval_num_devices": None if args.control else args.num_devices,
        "value": value,
        "value_before_finetune": before_value,
        "base_value": base_value,
        "evals": evals,
        "base_evals": base_evals,
        "bits_per_token": None if args.control else config.bits_per_token,
        "compression_ratio": None if args.control else width * 32 / config.bits_per_token,
        "hidden_size": hidden_size,
        "quantized_width": width,
        "epochs": args.epochs,
        "train_steps": trainer.state.global_step,
        "finetune_seconds": round(finetune_seconds, 1),
        "code_stats": last_code_stats(trainer.state.log_history),
        "hardware": tasks.hardware(),
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }
    result_path = Path(args.result_json or output_dir / "result.json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
