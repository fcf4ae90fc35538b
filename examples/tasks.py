"""The two example tasks shared by train_base.py and finetune_astra.py: image classification (ViT) and causal
language modelling (GPT2). Data come from `astra_examples.data` (offline Debian sources or Hub names).

- vit: Fashion-MNIST (or a Hub image dataset such as ``uoft-cs/cifar100``), metric accuracy in percent.
- gpt2: the King James Bible (or a Hub text dataset such as ``Salesforce/wikitext``), metric perplexity on
  blocks of ``block_size`` tokens of the held-out test split.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from astra_examples.data import load_image_dataset, load_text_dataset
from astra_examples.metrics import load_accuracy, perplexity_from_loss

TASKS = ("vit", "gpt2")
DEFAULT_DATASETS = {"vit": "fashion-mnist", "gpt2": "kjv"}
EOS = "<|endoftext|>"


# --- models -----------------------------------------------------------------------------------------------


def new_vit(dataset: DatasetDict, layers: int, width: int, patch_size: int) -> ViTForImageClassification:
    """A randomly initialised ViT sized for the dataset's images (the base model we train here)."""
    image_column, label_column = image_columns(dataset["train"])
    height, width_px, channels = image_shape(dataset["train"][0][image_column])
    labels = dataset["train"].features[label_column].names
    config = ViTConfig(
        image_size=height, patch_size=patch_size, num_channels=channels, hidden_size=width,
        num_hidden_layers=layers, num_attention_heads=max(1, width // 64), intermediate_size=4 * width,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    if width_px != height:
        raise ValueError(f"expected square images, got {height}x{width_px}")
    config.image_mean, config.image_std = [0.5] * channels, [0.5] * channels
    return ViTForImageClassification(config)


def new_gpt2(vocab_size: int, layers: int, width: int, block_size: int, eos_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=width, n_layer=layers, n_head=max(1, width // 64),
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def load_pretrained(task: str, name_or_path: str, dataset: DatasetDict | None = None):
    """A checkpoint saved by train_base.py, or a Hub checkpoint (``google/vit-base-patch16-224``, ``gpt2``), in float32."""
    if task == "gpt2":
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    config = AutoConfig.from_pretrained(name_or_path)
    kwargs: dict[str, Any] = {}
    if dataset is not None:
        _, label_column = image_columns(dataset["train"])
        labels = dataset["train"].features[label_column].names
        if config.num_labels != len(labels):  # a Hub checkpoint with another head: replace the classifier
            kwargs = dict(num_labels=len(labels), ignore_mismatched_sizes=True,
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    # float32 whatever the checkpoint's storage type (transformers 5 would otherwise keep a float16 checkpoint's type).
    return AutoModelForImageClassification.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)


# --- images -----------------------------------------------------------------------------------------------


def image_columns(split) -> tuple[str, str]:
    """(image column, label column): the first ClassLabel column is the label, the other image-like one the image."""
    label = next((name for name, feature in split.features.items() if isinstance(feature, ClassLabel)), None)
    image = next((name for name in split.column_names if name in ("image", "img", "pixel_values")), None)
    if label is None or image is None:
        raise ValueError(f"cannot find the image and label columns among {split.column_names}")
    return image, label


def image_shape(image) -> tuple[int, int, int]:
    array = np.asarray(image)
    channels = array.shape[2] if array.ndim == 3 else 1
    return array.shape[0], array.shape[1], channels


class ImageTensors(torch.utils.data.Dataset):
    """An image split held in memory as one uint8 tensor (fast to index), with optional augmentation.

    Augmentation (training): random horizontal flip and a random shift of up to ``shift`` pixels.
    """

    def __init__(self, split, image_column: str, label_column: str, augment: bool, shift: int = 2):
        columns = split.with_format("torch", columns=[image_column, label_column])[:]
        images = columns[image_column].to(torch.uint8)
        self.images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
        self.labels = columns[label_column].long()
        self.augment, self.shift = augment, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            padded = F.pad(image, (self.shift,) * 4)
            dx, dy = torch.randint(0, 2 * self.shift + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[-2], dx : dx + image.shape[-1]]
        return {"image": image, "label": self.labels[index]}


class ImageCollator:
    """Rows of `ImageTensors` -> normalised (B, C, H, W) ``pixel_values`` at the model's size and ``labels``."""

    def __init__(self, model_config):
        self.size, self.channels = model_config.image_size, model_config.num_channels
        self.mean = torch.tensor(getattr(model_config, "image_mean", [0.5] * self.channels)).view(1, -1, 1, 1)
        self.std = torch.tensor(getattr(model_config, "image_std", [0.5] * self.channels)).view(1, -1, 1, 1)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([row["image"] for row in rows]).float() / 255.0
        if pixels.shape[1] != self.channels:  # grey images for an RGB model, or the reverse
            pixels = pixels.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        labels = torch.stack([row["label"] for row in rows])
        return {"pixel_values": (pixels - self.mean) / self.std, "labels": labels}


def image_datasets(dataset: DatasetDict, model_config, augment: bool = True):
    """(train, test, collator); the test split is "test" (or "validation"). Images must share one size."""
    image_column, label_column = image_columns(dataset["train"])
    test_split = "test" if "test" in dataset else "validation"
    train = ImageTensors(dataset["train"], image_column, label_column, augment)
    test = ImageTensors(dataset[test_split], image_column, label_column, augment=False)
    return train, test, ImageCollator(model_config)


def accuracy_metrics():
    """compute_metrics for the Trainer: accuracy in percent through `evaluate` (offline module)."""
    metric = load_accuracy()

    def compute(prediction) -> dict[str, float]:
        predictions = np.asarray(prediction.predictions).reshape(-1)
        return {"accuracy": 100.0 * metric.compute(predictions=predictions, references=prediction.label_ids)["accuracy"]}

    return compute


def argmax_logits(logits, labels):
    """Keep only the predicted class on the device (not the logits of the whole test set)."""
    return logits.argmax(-1)


# --- text -------------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here with `tokenizers` (used when no Hub tokenizer is reachable)."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def load_tokenizer(name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_column(split) -> str:
    return "text" if "text" in split.column_names else split.column_names[0]


def lm_datasets(dataset: DatasetDict, tokenizer, block_size: int) -> DatasetDict:
    """Every split tokenised, concatenated (one text per line) and cut into blocks of ``block_size`` tokens."""
    column = text_column(dataset["train"])

    def tokenize(batch):
        return tokenizer([text + "\n" for text in batch[column] if text], add_special_tokens=False)

    def group(batch):
        ids = [token for sequence in batch["input_ids"] for token in sequence]
        usable = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset["train"].column_names, desc="tokenize")
    tokenized = tokenized.remove_columns([c for c in tokenized["train"].column_names if c != "input_ids"])
    return tokenized.map(group, batched=True, batch_size=10_000, desc=f"blocks of {block_size}")


def perplexity_metrics(loss: float) -> float:
    return perplexity_from_loss(loss)


# --- bookkeeping ------------------------------------------------------------------------------------------


def load_task_dataset(task: str, name: str, config_name: str | None = None) -> DatasetDict:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return load_image_dataset(name) if task == "vit" else load_text_dataset(name, config_name)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()})"


def evaluate_task(trainer, task: str, test_dataset) -> float:
    """The task metric on ``test_dataset``: accuracy in percent (vit) or perplexity (gpt2)."""
    metrics = trainer.evaluate(test_dataset)
    return metrics["eval_accuracy"] if task == "vit" else perplexity_metrics(metrics["eval_loss"])


def metric_name(task: str) -> str:
    return "accuracy" if task == "vit" else "perplexity"


def is_local_checkpoint(name_or_path: str) -> bool:
    return Path(name_or_path).is_dir()


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise RuntimeError(f"training diverged: metric is {value}")
    return value


def training_arguments(output_dir: str, epochs: float, batch_size: int, lr: float, weight_decay: float, workers: int,
                       seed: int, **overrides) -> TrainingArguments:
    """The Trainer settings both scripts share: cosine schedule with 5% warm-up, bf16 on GPUs that have it."""
    values = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,
        weight_decay=weight_decay,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=workers,
        seed=seed,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def task_trainer_kwargs(task: str, collator) -> dict[str, Any]:
    """Trainer arguments that depend on the task: the image collator and accuracy metric for vit."""
    if task != "vit":
        return {}
    return dict(data_collator=collator, compute_metrics=accuracy_metrics(), preprocess_logits_for_metrics=argmax_logits)


def first_rows(dataset, rows: int | None):
    """The first ``rows`` rows (all when None) of a `datasets.Dataset` or a torch dataset."""
    if not rows or rows >= len(dataset):
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(range(rows))
    return torch.utils.data.Subset(dataset, range(rows))


class TimeLimit(TrainerCallback):
    """Stops training after ``seconds`` of wall-clock time (the run then reports the epochs it reached)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
