"""Accuracy as a local ``evaluate`` metric: the fraction of predictions equal to their references.

Shipped inside hf_vl because ``evaluate.load("accuracy")`` needs the Hub; load it with
``hf_vl.data.load_metric("accuracy")`` (or ``evaluate.load(<this folder>)``). evaluate parses this file's imports
to find its requirements, so keep one import per line.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: (number of correct predictions) / (number of predictions), optionally sample-weighted."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): if False, return the (weighted) number of correct predictions instead of the fraction.
    sample_weight (list of float): optional per-sample weights.
Returns:
    accuracy (float): in [0, 1] if normalize, else a count.
Example:
    >>> metric = hf_vl.data.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


class HfVlAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.size == 0:
            raise ValueError("predictions is empty; accuracy needs at least one prediction")
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if weights.shape != predictions.shape:
            raise ValueError(
                f"sample_weight has shape {weights.shape}, expected {predictions.shape} (one weight per prediction)"
            )
        correct = float(np.sum(weights * (predictions == references)))
        return {"accuracy": correct / float(np.sum(weights)) if normalize else correct}
