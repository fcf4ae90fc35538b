"""Save or push an ASTRA fine-tuned checkpoint: safetensors weights with the codebooks, config, model card.

CHECKPOINT is any directory a patched model was saved to (``model.save_pretrained`` or a Trainer's output,
e.g. ``examples/finetune_astra.py --save``), or a Hub repo id. Its tokenizer or image processor, if saved
there, goes along. Measured results for the card (never made up): the checkpoint's own result.json (written
by finetune_astra.py for this very model) and the --results rows measured with the same ASTRA settings.

    python examples/save_checkpoint.py outputs/gpt2-astra --base-model gpt2 --output checkpoints/gpt2-astra-n4-g32
    python examples/save_checkpoint.py outputs/gpt2-astra --base-model gpt2 --push me/gpt2-astra-n4-g32
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer

import transformers_astra as astra
from transformers_astra.modelcard import load_results

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "accuracy.json"
OWN_RESULT = "result.json"  # finetune_astra.py's measurement of the checkpoint it saved
# File that marks a saved tokenizer / image processor, and the class that loads it.
PROCESSORS = {"tokenizer_config.json": AutoTokenizer, "preprocessor_config.json": AutoImageProcessor}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="directory (or Hub repo id) of a patched, fine-tuned model")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="save to this local directory")
    target.add_argument("--push", metavar="REPO_ID", help="push to this Hub repo (e.g. me/gpt2-astra-n4-g32)")
    parser.add_argument("--base-model", help="Hub id of the model the fine-tuning started from (for the card)")
    parser.add_argument("--dataset", action="append", default=[], help="fine-tuning dataset (repeatable)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON of measured result rows")
    parser.add_argument("--license", help="license for the card (e.g. mit)")
    parser.add_argument("--private", action="store_true", help="with --push: create a private repo")
    parser.add_argument("--endpoint", help="with --push: a Hub mirror instead of HF_ENDPOINT / huggingface.co")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = astra.from_pretrained(args.checkpoint)
    card_options = dict(
        base_model=args.base_model, datasets=args.dataset or None, results=result_rows(args), license=args.license
    )
    processor = load_processor(args.checkpoint)
    if args.output:
        directory = astra.save_pretrained(model, args.output, processor=processor, **card_options)
        print(f"saved {sorted(path.name for path in directory.iterdir())} to {directory}")
    else:
        commit = astra.push_to_hub(
            model, args.push, private=args.private or None, endpoint=args.endpoint, processor=processor, **card_options
        )
        print(f"pushed to {commit.commit_url}")
    measured = astra.create_model_card(model, **card_options).data.eval_results or []
    print(f"model card: {len(measured)} measured result(s) with these ASTRA settings")


def result_rows(args: argparse.Namespace) -> list[dict]:
    rows = load_results(args.results) if Path(args.results).is_file() else []
    own = Path(args.checkpoint) / OWN_RESULT
    if own.is_file():
        # It measured this checkpoint, so its "model" (the local base folder it started from) needs no match.
        rows += [{key: value for key, value in row.items() if key != "model"} for row in load_results(own)]
    return rows


def load_processor(checkpoint: str):
    """The tokenizer or image processor saved beside a local checkpoint, if any."""
    for marker, loader in PROCESSORS.items():
        if (Path(checkpoint) / marker).is_file():
            return loader.from_pretrained(checkpoint)
    return None


if __name__ == "__main__":
    main()
