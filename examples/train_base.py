"""Train the base (unpatched) model that ASTRA fine-tuning starts from, and save it.

No pretrained weights are reachable offline, so the defaults train small models from scratch:

    python examples/train_base.py --task vit  --output-dir outputs/vit-base   # ViT, Fashion-MNIST
    python examples/train_base.py --task gpt2 --output-dir outputs/gpt2-base  # GPT2, King James Bible
    python examples/train_base.py --task gpt2 --dataset english --extra-eval english-ood kjv \
        --output-dir outputs/gpt2-english-base   # GPT2, the broader English mix (examples/astra_examples/english.py)

Online users can start from a Hub checkpoint and/or dataset instead:

    python examples/train_base.py --task vit --model google/vit-base-patch16-224 --dataset uoft-cs/cifar100
    python examples/train_base.py --task gpt2 --model gpt2 --dataset Salesforce/wikitext --dataset-config wikitext-103-raw-v1

The output folder holds the model (``save_pretrained``), its tokenizer for gpt2/llama (trained here with
`tokenizers` unless --model names a Hub tokenizer), and base_result.json with the test metric.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, set_seed

import tasks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tasks.TASKS, required=True)
    parser.add_argument("--dataset", help="fashion-mnist / kjv (offline, Debian) or a Hub dataset name")
    parser.add_argument("--dataset-config", help="Hub dataset configuration (e.g. wikitext-103-raw-v1)")
    parser.add_argument("--model", help="start from this Hub checkpoint instead of a new model")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=None, help="hidden size (default: vit 192, gpt2/llama 256)")
    parser.add_argument("--patch-size", type=int, default=4, help="vit: pixels per patch side")
    parser.add_argument("--block-size", type=int, default=256, help="gpt2/llama: tokens per training block (context)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="gpt2/llama: BPE vocabulary trained here")
    parser.add_argument("--epochs", type=float, default=None, help="default: vit 30, gpt2/llama 12")
    parser.add_argument("--batch-size", type=int, default=None, help="default: vit 256, gpt2/llama 32")
    parser.add_argument("--lr", type=float, default=None, help="default: vit 1e-3, gpt2/llama 6e-4")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--max-train-samples", type=int, help="use only this many training rows (smoke tests)")
    parser.add_argument("--max-eval-samples", type=int, help="use only this many test rows (smoke tests)")
    parser.add_argument("--workers", type=int, default=4, help="dataloader worker processes")
    parser.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the saved weights (float16 halves the checkpoint)")
    parser.add_argument("--max-minutes", type=float, help="stop training after this many minutes (wall clock)")
    parser.add_argument("--extra-eval", nargs="*", default=[],
                        help="gpt2: also measure perplexity on these text datasets' test splits (e.g. english-ood)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = dict(width=256, epochs=12, batch_size=32, lr=6e-4)
    defaults = {"vit": dict(width=192, epochs=30, batch_size=256, lr=1e-3), "gpt2": text, "llama": text}
    for name, value in defaults[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dataset = args.dataset or tasks.DEFAULT_DATASETS[args.task]
    return args


def build(args):
    """(model, tokenizer (language models) or image collator (vit), train set, evaluation set, test set)."""
    dataset = tasks.load_task_dataset(args.task, args.dataset, args.dataset_config)
    dataset["train"] = tasks.first_rows(dataset["train"], args.max_train_samples)
    if args.task == "vit":
        model = tasks.load_pretrained("vit", args.model, dataset) if args.model else tasks.new_vit(
            dataset, args.layers, args.width, args.patch_size
        )
        train, test, collator = tasks.image_datasets(dataset, model.config)
        return model, collator, train, test, test
    if args.model:
        tokenizer = tasks.load_tokenizer(args.model)
    else:
        tokenizer = tasks.train_tokenizer(dataset["train"][tasks.text_column(dataset["train"])], args.vocab_size)
    blocks = tasks.lm_datasets(dataset, tokenizer, args.block_size)
    for name in args.extra_eval:
        extra = tasks.lm_datasets(tasks.load_task_dataset(args.task, name), tokenizer, args.block_size)["test"]
        args.extra_blocks[f"{name}:test"] = tasks.first_rows(extra, args.max_eval_samples)
    if args.model:
        model = tasks.load_pretrained(args.task, args.model)
    else:
        model = tasks.new_language_model(args.task, len(tokenizer), args.layers, args.width, args.block_size,
                                         tokenizer.eos_token_id)
    return model, tokenizer, blocks["train"], blocks["validation"], blocks["test"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.extra_blocks = {}
    set_seed(args.seed)
    model, helper, train, evaluation, test = build(args)
    evaluation, test = tasks.first_rows(evaluation, args.max_eval_samples), tasks.first_rows(test, args.max_eval_samples)
    output_dir = Path(args.output_dir)
    # gpt2 keeps the epoch with the best validation loss; vit has no validation split (its eval set is test).
    selection = (
        dict(eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
             metric_for_best_model="eval_loss")
        if tasks.is_text(args.task) else {}
    )
    training_args = tasks.training_arguments(
        str(output_dir / "trainer"), args.epochs, args.batch_size, args.lr, args.weight_decay, args.workers,
        args.seed, disable_tqdm=True, **selection,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        callbacks=[tasks.TimeLimit(args.max_minutes * 60)] if args.max_minutes else None,
        **tasks.task_trainer_kwargs(args.task, helper),
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    value = tasks.finite(tasks.evaluate_task(trainer, args.task, test))
    evals = [{"eval_dataset": name, "value": tasks.evaluate_task(trainer, args.task, blocks)}
             for name, blocks in args.extra_blocks.items()]
    model.to(getattr(torch, args.save_dtype)).save_pretrained(output_dir)
    if tasks.is_text(args.task):
        helper.save_pretrained(output_dir)  # the tokenizer
    result = {
        "model": args.model or f"{args.task} {args.layers}L-{args.width} (trained here)",
        "task": args.task,
        "dataset": args.dataset,
        "metric": tasks.metric_name(args.task),
        "value": value,
        "eval_dataset": f"{args.dataset}:test",
        "evals": evals,
        "parameters": sum(p.numel() for p in model.parameters()),
        "saved_dtype": args.save_dtype,
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "epochs_done": round(trainer.state.epoch or 0.0, 2),
        "hardware": tasks.hardware(),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "examples/train_base.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (output_dir / "base_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
