"""``compute_metrics`` functions for ``Trainer``, backed by the local ``evaluate`` metrics in ``hf_vl.data``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from transformers import EvalPrediction

from ..data.metrics import load_metric


def _logits(predictions) -> np.ndarray:
    # models that return hidden states / attentions give a tuple; the logits come first
    while isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


def classification_compute_metrics(metric=None) -> Callable[[EvalPrediction], dict]:
    """A ``compute_metrics`` for classifiers: argmax of the logits, scored by the shipped accuracy metric.

    metric: an ``evaluate`` module with ``compute(predictions=, references=)``; default
    ``hf_vl.data.load_metric("accuracy")`` (works offline).
    """
    metric = load_metric("accuracy") if metric is None else metric

    def compute_metrics(eval_prediction: EvalPrediction) -> dict:
        logits = _logits(eval_prediction.predictions)
        if logits.ndim != 2:
            raise ValueError(f"expected logits of shape (num_samples, num_labels), got {logits.shape}")
        references = np.asarray(eval_prediction.label_ids).reshape(-1)
        return metric.compute(predictions=logits.argmax(-1), references=references)

    return compute_metrics


__all__ = ["classification_compute_metrics"]


def coco_map_metric(**kwargs):
    """The shipped COCO box mAP metric (``data/metrics/hf_vl_coco_map``, pycocotools), loaded offline and in memory.

    ``compute(predictions=[{"boxes", "scores", "labels"}], references=[{"boxes", "labels"}], box_format="xyxy")``
    per image; returns ``map``, ``map_50``, ``map_75``, ... (COCOeval's 12 summary numbers).
    """
    import evaluate

    from ..data.metrics import METRICS_DIR

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRICS_DIR / "hf_vl_coco_map"), **kwargs)

__all__ += ["coco_map_metric"]
