"""SAM's training loss: focal + dice on the masks, MSE on the IoU predictions, minimum over the multimask outputs.

Kirillov et al. 2023, "Segment Anything", section 3 and appendix A ("Losses and training"):

- masks are supervised with a linear combination of focal loss (Lin et al. 2017) and dice loss (Milletari et al.
  2016) as in DETR, weighted 20:1 focal:dice;
- with several masks per prompt (``multimask_output``), only the mask with the lowest mask loss is back-propagated,
  so the three outputs can specialise on different valid interpretations of an ambiguous prompt;
- the IoU head is trained with a mean-square error between each predicted IoU and the IoU of its (binarised) mask
  with the ground truth, weighted 1.0.

The paper does not say which masks' IoU predictions are supervised; the official SAM 2 training code
(facebookresearch/sam2 ``training/loss_fns.py`` ``MultiStepMultiMasksAndIous``, configs with
``supervise_all_iou: true``) supervises all of them, which ``supervise_all_iou=True`` (the default) follows: the IoU
head ranks the candidates at inference, so it must score the non-selected ones as well. ``False`` supervises only
the selected mask. The per-mask focal and dice terms are the shared ``hf_vl_mask_losses`` (DETR reduces them
``/ num_boxes``). Losses are means over prompts: with the same number of prompts on every process, DDP's
gradient average equals one process on the global batch. Pure torch (no model, no distributed calls).
"""

from __future__ import annotations

import torch

from .hf_vl_mask_losses import binary_mask_iou, dice_loss_per_mask, sigmoid_focal_loss_per_mask


def _check_inputs(pred_masks, iou_scores, target_masks) -> None:
    for name, value in (("pred_masks", pred_masks), ("iou_scores", iou_scores), ("target_masks", target_masks)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if pred_masks.ndim != 5:
        raise ValueError(f"pred_masks must have shape (batch, prompts, masks, H, W), got {tuple(pred_masks.shape)}")
    if iou_scores.shape != pred_masks.shape[:3]:
        expected = tuple(pred_masks.shape[:3])
        raise ValueError(f"iou_scores {tuple(iou_scores.shape)} must have shape (batch, prompts, masks) = {expected}")
    expected = (*pred_masks.shape[:2], *pred_masks.shape[3:])
    if tuple(target_masks.shape) != expected:
        raise ValueError(
            f"target_masks {tuple(target_masks.shape)} must have shape (batch, prompts, H, W) = {expected}: "
            "resize the ground truth to the predicted (low-resolution) mask frame first"
        )
    if pred_masks.shape[0] * pred_masks.shape[1] == 0:
        raise ValueError("pred_masks holds no prompts; the loss needs at least one")


def sam_loss(
    pred_masks: torch.Tensor,
    iou_scores: torch.Tensor,
    target_masks: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    supervise_all_iou: bool = True,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SAM loss of one batch; returns ``(loss, logs)``.

    Args:
        pred_masks: (batch, prompts, masks, H, W) mask logits (SAM's low-resolution ``pred_masks``).
        iou_scores: (batch, prompts, masks) predicted IoUs.
        target_masks: (batch, prompts, H, W) binary ground truth in the same frame as ``pred_masks``.
        focal_weight, dice_weight, iou_weight: the paper's 20, 1 and 1.
        supervise_all_iou: MSE on every mask's IoU prediction (True) or only on the selected mask's (False).

    Returns:
        Scalar ``focal_weight * focal + dice_weight * dice + iou_weight * iou_mse``, each term a mean over prompts of
        the lowest-loss mask (``masks == 1``: the only one); ``logs`` holds the detached terms (``loss_focal``,
        ``loss_dice``, ``loss_iou``) and ``best_mask`` (batch, prompts), the index of the selected mask.
    """
    _check_inputs(pred_masks, iou_scores, target_masks)
    # (batch, prompts, H, W) -> (batch, prompts, 1, H, W): one target for every candidate mask
    targets = target_masks.to(pred_masks.dtype).unsqueeze(2).expand_as(pred_masks)
    focal = sigmoid_focal_loss_per_mask(pred_masks, targets, focal_alpha, focal_gamma)  # (batch, prompts, masks)
    dice = dice_loss_per_mask(pred_masks, targets)
    best = (focal_weight * focal + dice_weight * dice).argmin(dim=-1, keepdim=True)  # (batch, prompts, 1)
    # the IoU target is a measurement of the prediction, not a path for mask gradients
    true_iou = binary_mask_iou(pred_masks.detach() > 0, targets).to(iou_scores.dtype)
    iou_error = (iou_scores - true_iou) ** 2  # (batch, prompts, masks)
    if not supervise_all_iou:
        iou_error = iou_error.gather(-1, best)
    terms = {
        "loss_focal": focal.gather(-1, best).mean(),
        "loss_dice": dice.gather(-1, best).mean(),
        "loss_iou": iou_error.mean(-1).mean(),
    }
    loss = focal_weight * terms["loss_focal"] + dice_weight * terms["loss_dice"] + iou_weight * terms["loss_iou"]
    logs = {name: value.detach() for name, value in terms.items()}
    logs["best_mask"] = best.squeeze(-1)
    return loss, logs


__all__ = ["binary_mask_iou", "dice_loss_per_mask", "sam_loss", "sigmoid_focal_loss_per_mask"]
