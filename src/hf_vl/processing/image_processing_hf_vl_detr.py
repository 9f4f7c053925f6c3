"""Image processor for hf_vl DETR: transformers' ``DetrImageProcessor`` with the original's defaults and input checks.

Subclassing the built-in keeps every stock path working unchanged: ``pipeline("object-detection")`` and
``pipeline("image-segmentation")`` call ``post_process_object_detection`` / ``post_process_*_segmentation`` on the
outputs of ``HfVlDetrForObjectDetection`` (same ``logits``, ``pred_boxes``, ``pred_masks`` fields), and COCO
detection / panoptic annotations become training targets (``labels``: ``class_labels``, normalised cxcywh ``boxes``,
and ``masks``) exactly as for transformers' DETR.

Defaults are the original's evaluation preprocessing (facebookresearch/detr ``datasets/coco.py``
``make_coco_transforms("val")``): resize the shortest side to 800 with the longest at most 1333, ImageNet
mean/std, and padding to the largest image of the batch with a ``pixel_mask`` (1 on real pixels).
``shortest_edge_choices`` adds the original's multi-scale training resize (``RandomResize`` over shortest sides
480..800, longest 1333), one random choice per call; it is off by default (evaluation).

Only transformers/torch/numpy/PIL and sibling files are imported, so this file ships inside Hub bundles.
"""

from __future__ import annotations

import random

from transformers.models.detr.image_processing_detr import DetrImageProcessor

from .image_processing_hf_vl_vit import to_rgb_tensors, validate_images

# the original's training scales (datasets/coco.py make_coco_transforms("train"))
DETR_TRAIN_SHORTEST_EDGES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


class HfVlDetrImageProcessor(DetrImageProcessor):
    r"""Preprocesses images (and COCO annotations) for ``HfVlDetrForObjectDetection``.

    Returns ``pixel_values`` (batch, 3, H, W), ``pixel_mask`` (batch, H, W) and, with ``annotations``, ``labels``.
    Any PIL mode (L, RGBA, P, ...) and grayscale / RGBA arrays are converted to RGB first.

    Args:
        shortest_edge_choices: optional shortest-side sizes to draw from at random on each call (multi-scale
            training); the longest side stays capped by ``size["longest_edge"]``.
        **kwargs: ``DetrImageProcessor`` options (``size``, ``image_mean``, ``image_std``, ``do_pad``, ``format``).
    """

    def __init__(self, shortest_edge_choices: list[int] | tuple[int, ...] | None = None, **kwargs):
        if shortest_edge_choices is not None:
            choices = list(shortest_edge_choices)
            if not choices or not all(isinstance(c, int) and c > 0 for c in choices):
                raise ValueError(f"shortest_edge_choices must be positive ints, got {shortest_edge_choices!r}")
            shortest_edge_choices = choices
        self.shortest_edge_choices = shortest_edge_choices
        super().__init__(**kwargs)

    def preprocess(self, images, annotations=None, *args, **kwargs):
        validate_images(images)
        if self.shortest_edge_choices and "size" not in kwargs:
            longest = self.size.get("longest_edge", 1333) if isinstance(self.size, dict) else self.size.longest_edge
            kwargs["size"] = {"shortest_edge": random.choice(self.shortest_edge_choices), "longest_edge": longest}
        return super().preprocess(to_rgb_tensors(images), annotations, *args, **kwargs)


__all__ = ["DETR_TRAIN_SHORTEST_EDGES", "HfVlDetrImageProcessor"]
