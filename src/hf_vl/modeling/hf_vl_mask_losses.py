"""Mask losses shared by DETR's panoptic head and SAM: sigmoid focal loss (Lin et al. 2017, "Focal Loss for Dense
Object Detection", alpha 0.25 / gamma 2 as there) and dice loss (Milletari et al. 2016, V-Net; smoothing 1 as in
facebookresearch/detr ``models/segmentation.py``), per mask, plus the IoU of binary masks. Callers reduce: DETR sums
and divides by the number of boxes, SAM picks the lowest-loss mask of each prompt.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def sigmoid_focal_loss_per_mask(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of (..., H, W) mask logits against binary targets of the same shape, mean over pixels -> (...)."""
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss ``1 - (2|p t| + s) / (|p| + |t| + s)`` of (..., H, W) logits (p = sigmoid) and targets -> (...)."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + smooth) / (denominator + smooth)


def binary_mask_iou(pred_masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (..., H, W) boolean masks; 0 where both are empty (as SAM 2's loss, union clamped at 1) -> (...)."""
    pred_masks, targets = pred_masks.bool(), targets.bool()
    intersection = (pred_masks & targets).flatten(-2).sum(-1)
    union = (pred_masks | targets).flatten(-2).sum(-1)
    return intersection.float() / union.clamp(min=1).float()


__all__ = ["binary_mask_iou", "dice_loss_per_mask", "sigmoid_focal_loss_per_mask"]
