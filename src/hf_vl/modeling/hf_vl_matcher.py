"""Hungarian matching of set predictions to ground truth (Carion et al. 2020, "End-to-End Object Detection with
Transformers", section 3.1; facebookresearch/detr ``models/matcher.py``).

The cost of assigning prediction i to target j is ``class_cost * (-p_i(c_j)) + bbox_cost * L1(b_i, b_j) +
giou_cost * (-GIoU(b_i, b_j))``; scipy's ``linear_sum_assignment`` finds the assignment of least total cost. As in
the original, costs for the whole batch are computed in one matrix (predictions of all images against targets of all
images, then split per image), which is cheaper than one small matrix per image and gives the same assignment.

scipy is imported lazily inside a ``try`` so that package-free Hub bundles (which copy this file for the loss) load
without it; only matching needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf_vl_box_ops import box_cxcywh_to_xyxy, generalized_box_iou

try:
    from scipy.optimize import linear_sum_assignment
except ImportError:  # pragma: no cover - scipy is a dependency of hf_vl; only Hub bundles may lack it
    linear_sum_assignment = None


class HfVlHungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, per image.

    Args:
        class_cost: weight of the classification cost (minus the predicted probability of the target class).
        bbox_cost: weight of the L1 distance between normalised cxcywh boxes.
        giou_cost: weight of minus the generalized IoU.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("class_cost, bbox_cost and giou_cost can't all be 0")
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match predictions to targets (no gradients: the assignment is a discrete choice).

        Args:
            logits: (batch, num_queries, num_classes + 1) classification logits.
            pred_boxes: (batch, num_queries, 4) normalised cxcywh boxes.
            targets: one dict per image with ``class_labels`` (num_boxes,) int64 and ``boxes`` (num_boxes, 4)
                normalised cxcywh.

        Returns:
            One ``(prediction_indices, target_indices)`` pair of int64 tensors per image, each of length
            ``min(num_queries, num_boxes)``; prediction indices are sorted.
        """
        if linear_sum_assignment is None:
            raise ImportError("HfVlHungarianMatcher needs scipy: pip install scipy")
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"targets has {len(targets)} entries for a batch of {batch} predictions")
        sizes = [len(target["boxes"]) for target in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]

        probabilities = logits.flatten(0, 1).float().softmax(-1)  # (batch * num_queries, num_classes + 1)
        boxes = pred_boxes.flatten(0, 1).float()  # (batch * num_queries, 4)
        target_ids = torch.cat([target["class_labels"] for target in targets])
        target_boxes = torch.cat([target["boxes"] for target in targets]).to(boxes.dtype)

        # 1 - p(class) approximates the NLL; the constant 1 does not change the assignment
        cost_class = -probabilities[:, target_ids]
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.bbox_cost * cost_bbox + self.class_cost * cost_class + self.giou_cost * cost_giou
        # (batch * num_queries, total_boxes) -> (batch, num_queries, total_boxes); image i matches its own columns
        cost = cost.view(batch, num_queries, -1).cpu()

        indices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[image].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


__all__ = ["HfVlHungarianMatcher"]
