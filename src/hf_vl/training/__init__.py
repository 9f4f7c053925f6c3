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
    "CLIP_RECIPES": "clip_recipe",
    "ContrastiveCollator": "clip_recipe",
    "build_clip_for_shapes": "clip_recipe",
    "clip_one_step_gradients": "clip_recipe",
    "shapes_zero_shot_accuracy": "clip_recipe",
    "train_clip_shapes": "clip_recipe",
    "DETR_RECIPES": "detr_recipe",
    "DetrEvaluationTrainer": "detr_recipe",
    "build_detr_for_shapes": "detr_recipe",
    "train_detr_shapes": "detr_recipe",
    "SAM_RECIPES": "sam_recipe",
    "SamPromptCollator": "sam_recipe",
    "evaluate_sam_miou": "sam_recipe",
    "quickstart_sam": "sam_recipe",
    "sam_one_step_gradients": "sam_recipe",
    "train_sam_shapes": "sam_recipe",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY] + [
    "GradientCaptureCallback",
    "ImageClassificationCollator",
    "LossRecordingTrainer",
    "ShapesDetectionCollator",
    "classification_compute_metrics",
    "with_pixel_values",
]
