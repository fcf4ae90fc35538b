"""Metrics through `evaluate` that work offline.

- accuracy: `load_accuracy` loads the metric module beside this file with ``evaluate.load(path)``; the Hub's
  ``evaluate.load("accuracy")`` would need a network.
- perplexity: evaluate's "perplexity" metric downloads a model by name, so it cannot score a local or
  patched model; `perplexity_from_loss` is exp of the mean token cross-entropy the Trainer reports, which is
  the perplexity when every evaluation block has the same number of predicted tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

ACCURACY_MODULE = Path(__file__).with_name("accuracy.py")


def load_accuracy():
    import evaluate

    return evaluate.load(str(ACCURACY_MODULE))


def perplexity_from_loss(mean_token_loss: float) -> float:
    return math.exp(mean_token_loss)
