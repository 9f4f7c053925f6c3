"""Box utilities shared by hf_vl's detectors (DETR, ViLD, GLIP): format conversion, IoU and generalized IoU.

Pure functions of tensors, after facebookresearch/detr ``util/box_ops.py`` (Rezatofighi et al. 2019, "Generalized
Intersection over Union", https://giou.stanford.edu/). Boxes are ``(..., 4)`` tensors in one of two formats:

- ``cxcywh``: centre x, centre y, width, height (DETR's prediction format, usually normalised to [0, 1]);
- ``xyxy``: x0, y0, x1, y1 with x1 >= x0 and y1 >= y0 (COCO evaluation, IoU).

Unlike the original, ``generalized_box_iou`` raises a ``ValueError`` (not ``assert``) on degenerate boxes, and
``box_area`` is computed here, so the file needs nothing but torch (it ships inside Hub bundles).
"""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height], dim=-1
    )


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy boxes -> (...) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes. Returns (iou, union), both (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area1[:, None] + area2 - inter
    return inter / union, union


def _check_xyxy(boxes: torch.Tensor, argument: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{argument} must have shape (num_boxes, 4), got {tuple(boxes.shape)}")
    # degenerate boxes give inf / nan below; the original asserts the same condition
    if not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
        raise ValueError(f"{argument} has boxes with x1 < x0 or y1 < y0; expected xyxy boxes")


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU of (N, 4) and (M, 4) xyxy boxes, in [-1, 1]. Returns (N, M)."""
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[:, :2])  # (N, M, 2): smallest enclosing box
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]  # (N, M)
    return iou - (enclosing - union) / enclosing


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) boolean masks -> (N, 4) xyxy boxes in pixel indices (zeros for an empty mask list)."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    height, width = masks.shape[-2:]
    y = torch.arange(height, dtype=torch.float, device=masks.device)
    x = torch.arange(width, dtype=torch.float, device=masks.device)
    y, x = torch.meshgrid(y, x, indexing="ij")
    masks = masks.bool()
    x_max = (masks * x).flatten(1).max(-1).values
    x_min = x.expand_as(masks).masked_fill(~masks, 1e8).flatten(1).min(-1).values
    y_max = (masks * y).flatten(1).max(-1).values
    y_min = y.expand_as(masks).masked_fill(~masks, 1e8).flatten(1).min(-1).values
    return torch.stack([x_min, y_min, x_max, y_max], dim=1)


__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "masks_to_boxes",
]
