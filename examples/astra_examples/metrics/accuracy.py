"""Accuracy as an `evaluate` metric module that loads offline: ``evaluate.load(<path of this file>)``.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub; this copy needs no network.
"""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions and references: lists of integer class labels.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
