"""DETR's set-prediction loss (Carion et al. 2020, section 3.1 and appendix A.2; facebookresearch/detr
``models/detr.py`` ``SetCriterion``, ``models/segmentation.py`` ``dice_loss`` / ``sigmoid_focal_loss``).

After Hungarian matching (``HfVlHungarianMatcher``), the loss is a weighted sum of

- ``loss_ce``: cross-entropy over all queries, unmatched ones labelled "no object" (the last class), whose weight
  is down-scaled to ``eos_coefficient``;
- ``loss_bbox``: L1 between matched normalised cxcywh boxes, and ``loss_giou``: 1 - GIoU of matched boxes, both
  summed and divided by the number of target boxes;
- with masks, ``loss_mask`` (sigmoid focal) and ``loss_dice``, normalised the same way;

repeated for every decoder layer's output (auxiliary losses, keys suffixed ``_0`` .. ``_{L-2}``).

Distributed training: the number of target boxes is SUMMED over processes and divided by the world size (then
clamped at 1), as the original does, so that with DDP's gradient averaging the box losses equal those of one
process seeing the global batch. transformers' ``ForObjectDetectionLoss`` averages ``num_boxes`` and then divides
by the number of processes again, scaling box losses with the world size (ecosystem.md section 4.4); this module does
not. The classification loss is, as in the original, a weighted mean over each process's own queries.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .hf_vl_box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .hf_vl_distributed import gather_batch_sizes, world_size
from .hf_vl_mask_losses import dice_loss_per_mask, sigmoid_focal_loss_per_mask
from .hf_vl_matcher import HfVlHungarianMatcher

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def global_num_boxes(targets: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Target boxes summed over all processes, divided by the world size, at least 1 (the original's ``num_boxes``).

    ``gather_batch_sizes`` all-gathers one integer per process, which is all the all-reduce of the original needs.
    """
    local = sum(len(target["class_labels"]) for target in targets)
    total = sum(gather_batch_sizes(local, device))
    return max(total / world_size(), 1.0)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of (N, P) mask logits against (N, P) binary targets, mean over P, / num_boxes."""
    # (N, P) -> (N, 1, P): one mask of 1 x P pixels per row, for the shared per-mask loss
    return sigmoid_focal_loss_per_mask(logits.unsqueeze(-2), targets.unsqueeze(-2), alpha, gamma).sum() / num_boxes


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float) -> torch.Tensor:
    """DICE loss (Milletari et al. 2016) of (N, P) mask logits against (N, P) binary targets, / num_boxes."""
    return dice_loss_per_mask(logits.unsqueeze(-2), targets.unsqueeze(-2)).sum() / num_boxes


def _prediction_index(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of every matched prediction, for advanced indexing of (batch, queries, ...)."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


class HfVlDetrSetCriterion(nn.Module):
    """Matching plus the weighted DETR losses; ``forward`` returns ``(loss, logs)``.

    Args:
        num_labels: number of object classes (logits have ``num_labels + 1`` columns, the last one "no object").
        matcher: the Hungarian matcher.
        eos_coefficient: cross-entropy weight of the "no object" class (0.1 in the paper).
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient, mask_loss_coefficient,
            dice_loss_coefficient: weights of the loss terms (1, 5, 2, 1, 1 in the paper).
    """

    def __init__(
        self,
        num_labels: int,
        matcher: HfVlHungarianMatcher,
        eos_coefficient: float = 0.1,
        class_loss_coefficient: float = 1.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        mask_loss_coefficient: float = 1.0,
        dice_loss_coefficient: float = 1.0,
    ):
        super().__init__()
        self.num_labels = num_labels
        self.matcher = matcher
        self.weights = {
            "loss_ce": class_loss_coefficient,
            "loss_bbox": bbox_loss_coefficient,
            "loss_giou": giou_loss_coefficient,
            "loss_mask": mask_loss_coefficient,
            "loss_dice": dice_loss_coefficient,
        }
        class_weight = torch.ones(num_labels + 1)
        class_weight[-1] = eos_coefficient
        # not persistent: a hyper-parameter from the config, not a weight to save in checkpoints
        self.register_buffer("class_weight", class_weight, persistent=False)

    def loss_labels(self, logits, targets, indices: Indices) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy over all queries; logs ``class_error`` (%) of the matched ones."""
        if logits.shape[-1] != self.num_labels + 1:
            raise ValueError(f"logits have {logits.shape[-1]} classes, expected num_labels + 1 = {self.num_labels + 1}")
        idx = _prediction_index(indices)
        matched_classes = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_labels, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes.to(logits.device)
        # cross_entropy wants (batch, classes, queries)
        loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.class_weight.float())
        with torch.no_grad():
            if matched_classes.numel() == 0:
                class_error = torch.zeros((), device=logits.device)
            else:
                correct = (logits[idx].argmax(-1) == matched_classes.to(logits.device)).float().mean()
                class_error = 100 * (1 - correct)
        return {"loss_ce": loss_ce, "class_error": class_error}

    @torch.no_grad()
    def cardinality_error(self, logits, targets) -> torch.Tensor:
        """|number of non-"no object" predictions - number of targets|, mean over images (logging only)."""
        num_targets = torch.as_tensor([len(t["class_labels"]) for t in targets], device=logits.device)
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return F.l1_loss(num_predicted.float(), num_targets.float())

    def loss_boxes(self, pred_boxes, targets, indices: Indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """L1 and 1 - GIoU between matched boxes, each summed and divided by ``num_boxes``."""
        source = pred_boxes[_prediction_index(indices)].float()  # (matched, 4)
        target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(source)
        loss_bbox = F.l1_loss(source, target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(source), box_cxcywh_to_xyxy(target)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, pred_masks, targets, indices: Indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """Focal and DICE losses of matched masks upsampled to the (padded) target mask size."""
        source = pred_masks[_prediction_index(indices)]  # (matched, h, w)
        target = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(source)
        source = F.interpolate(source[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)
        source, target = source[:, 0].flatten(1), target.flatten(1)
        return {
            "loss_mask": sigmoid_focal_loss(source, target, num_boxes),
            "loss_dice": dice_loss(source, target, num_boxes),
        }

    def _layer_losses(self, logits, pred_boxes, targets, num_boxes, pred_masks=None) -> dict[str, torch.Tensor]:
        indices = self.matcher(logits, pred_boxes, targets)
        losses = self.loss_labels(logits, targets, indices)
        losses.update(self.loss_boxes(pred_boxes, targets, indices, num_boxes))
        if pred_masks is not None:
            losses.update(self.loss_masks(pred_masks, targets, indices, num_boxes))
        return losses

    def forward(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None,
        pred_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted loss and a dict of every (unweighted) term, detached, for logging.

        Args:
            logits: (batch, num_queries, num_labels + 1); pred_boxes: (batch, num_queries, 4) normalised cxcywh.
            targets: one dict per image: ``class_labels`` (num_boxes,) int64, ``boxes`` (num_boxes, 4) normalised
                cxcywh, and ``masks`` (num_boxes, H, W) when ``pred_masks`` is given.
            auxiliary_outputs: ``{"logits", "pred_boxes"}`` of the earlier decoder layers (auxiliary losses).
            pred_masks: (batch, num_queries, h, w) mask logits (panoptic head); mask losses on the last layer only.
        """
        check_targets(targets, with_masks=pred_masks is not None)
        num_boxes = global_num_boxes(targets, logits.device)
        losses = self._layer_losses(logits, pred_boxes, targets, num_boxes, pred_masks)
        total = self._weighted_sum(losses)
        losses["cardinality_error"] = self.cardinality_error(logits, targets)
        for layer, aux in enumerate(auxiliary_outputs or []):
            aux_losses = self._layer_losses(aux["logits"], aux["pred_boxes"], targets, num_boxes)
            total = total + self._weighted_sum(aux_losses)
            # class_error is logged for the last layer only, as in the original
            losses.update({f"{key}_{layer}": value for key, value in aux_losses.items() if key != "class_error"})
        return total, {key: value.detach() for key, value in losses.items()}

    def _weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[key] * value for key, value in losses.items() if key in self.weights)


def check_targets(targets, with_masks: bool = False) -> None:
    """Clear errors for malformed ``labels`` instead of index errors deep inside the matcher."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"labels must be a list of dicts (one per image), got {type(targets).__name__}")
    required = ("class_labels", "boxes", "masks") if with_masks else ("class_labels", "boxes")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or any(key not in target for key in required):
            raise ValueError(f"labels[{i}] must be a dict with keys {required}")
        boxes = target["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(target["class_labels"]):
            raise ValueError(
                f"labels[{i}]['boxes'] must have shape (num_boxes, 4) matching class_labels "
                f"({len(target['class_labels'])}), got {tuple(boxes.shape)}"
            )


__all__ = ["HfVlDetrSetCriterion", "check_targets", "dice_loss", "global_num_boxes", "sigmoid_focal_loss"]
