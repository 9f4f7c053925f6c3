"""Embedded data and local metrics: the procedurally generated shapes dataset (``load_shapes``) that every hf_vl
architecture trains and is scored on offline, and ``load_metric`` for the ``evaluate`` metrics shipped in the
package."""

from .metrics import load_metric, metric_path
from .shapes import (
    COLOUR_NAMES,
    COLOURS,
    COMBINATIONS,
    HELDOUT_COMBINATIONS,
    SEEN_COMBINATIONS,
    SHAPES,
    SHAPES_CLASS_NAMES,
    SPLITS,
    TASKS,
    caption_and_spans,
    instance_masks,
    load_shapes,
    phrase_names,
    shapes_features,
    xywh_to_cxcywh,
)

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "COMBINATIONS",
    "HELDOUT_COMBINATIONS",
    "SEEN_COMBINATIONS",
    "SHAPES",
    "SHAPES_CLASS_NAMES",
    "SPLITS",
    "TASKS",
    "caption_and_spans",
    "instance_masks",
    "load_metric",
    "load_shapes",
    "metric_path",
    "phrase_names",
    "shapes_features",
    "xywh_to_cxcywh",
]
