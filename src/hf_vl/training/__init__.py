"""Training through ``transformers.Trainer``: collators, ``compute_metrics`` on the shipped metrics, step probes,
and recipes that train hf_vl models on the embedded shapes data (``train_vit_shapes``).

Recipe modules load lazily, so ``python -m hf_vl.training.vit_recipe`` runs the module once (no runpy warning).
"""

import importlib

from .collators import ImageClassificationCollator, ShapesDetectionCollator, with_pixel_values
from .metrics import classification_compute_metrics
from .probes import GradientCaptureCallback, LossRecordingTrainer

_LAZY = {
    "VIT_RECIPES": "vit_recipe",
    "build_vit_for_shapes": "vit_recipe",
    "one_step_gradients": "vit_recipe",
    "train_vit_shapes": "vit_recipe",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GradientCaptureCallback",
    "ImageClassificationCollator",
    "LossRecordingTrainer",
    "ShapesDetectionCollator",
    "VIT_RECIPES",
    "build_vit_for_shapes",
    "classification_compute_metrics",
    "one_step_gradients",
    "train_vit_shapes",
    "with_pixel_values",
]
