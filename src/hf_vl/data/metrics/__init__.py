"""Local ``evaluate`` metrics shipped with hf_vl (``evaluate.load("accuracy")`` needs the Hub; these do not).

Each metric is a folder ``<name>/<name>.py`` holding an ``evaluate.Metric``; the folders are package data
(``pyproject.toml``: ``data/metrics/*/*.py``).
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
# public name -> folder name
METRICS = {"accuracy": "hf_vl_accuracy", "coco_map": "hf_vl_coco_map"}


def metric_path(name: str) -> Path:
    """The folder of a shipped metric (what ``evaluate.load`` takes)."""
    if name not in METRICS:
        raise ValueError(f"metric name={name!r} is not shipped with hf_vl; expected one of {sorted(METRICS)}")
    return METRICS_DIR / METRICS[name]


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a shipped metric; works offline (``HF_EVALUATE_OFFLINE=1``).

    Keeps results in memory by default: no cache files that two ranks of a distributed run could fight over.
    """
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS", "METRICS_DIR", "load_metric", "metric_path"]
