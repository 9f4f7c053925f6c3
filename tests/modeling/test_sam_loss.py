"""SAM's training loss (``hf_vl_sam_loss``): focal and dice against hand computations, the minimum over the
multimask outputs, the IoU-prediction MSE, and gradients that reach only the decoder of a frozen-encoder SAM."""

from __future__ import annotations

import math

import pytest
import torch

from hf_vl.modeling.hf_vl_detection_loss import dice_loss, sigmoid_focal_loss
from hf_vl.modeling.hf_vl_sam_loss import (
    binary_mask_iou,
    dice_loss_per_mask,
    sam_loss,
    sigmoid_focal_loss_per_mask,
)

LOGITS = [[2.0, -1.0], [0.5, -3.0]]
TARGET = [[1.0, 0.0], [0.0, 1.0]]


def _hand_focal(logits, targets, alpha=0.25, gamma=2.0):
    total = 0.0
    for x, t in zip(sum(logits, []), sum(targets, [])):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        total += (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma
    return total / 4


def _hand_dice(logits, targets):
    probs = [1 / (1 + math.exp(-x)) for x in sum(logits, [])]
    flat = sum(targets, [])
    intersection = sum(p * t for p, t in zip(probs, flat))
    return 1 - (2 * intersection + 1) / (sum(probs) + sum(flat) + 1)


def test_focal_and_dice_match_hand_computation():
    logits, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64)
    assert float(sigmoid_focal_loss_per_mask(logits, target)) == pytest.approx(_hand_focal(LOGITS, TARGET), rel=1e-12)
    assert float(dice_loss_per_mask(logits, target)) == pytest.approx(_hand_dice(LOGITS, TARGET), rel=1e-12)
    # the other weights of the focal loss are honoured
    assert float(sigmoid_focal_loss_per_mask(logits, target, alpha=0.6, gamma=1.0)) == pytest.approx(
        _hand_focal(LOGITS, TARGET, alpha=0.6, gamma=1.0), rel=1e-12
    )


def test_per_mask_terms_equal_detr_losses_before_normalisation():
    logits, targets = torch.randn(5, 6, 7), (torch.rand(5, 6, 7) > 0.5).float()
    focal = sigmoid_focal_loss_per_mask(logits, targets)
    dice = dice_loss_per_mask(logits, targets)
    assert focal.shape == dice.shape == (5,)
    flat_logits, flat_targets = logits.flatten(1), targets.flatten(1)
    torch.testing.assert_close(focal.sum() / 2.5, sigmoid_focal_loss(flat_logits, flat_targets, 2.5))
    torch.testing.assert_close(dice.sum() / 2.5, dice_loss(flat_logits, flat_targets, 2.5))


def test_binary_mask_iou():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]]], dtype=torch.bool)
    target = torch.tensor([[[1, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]], dtype=torch.bool)
    torch.testing.assert_close(binary_mask_iou(pred, target), torch.tensor([1 / 3, 0.0, 1 / 6]))


def _three_masks(target: torch.Tensor, good: int) -> torch.Tensor:
    """(1, 1, 3, H, W) logits: mask ``good`` close to ``target``, the others its inverse or empty."""
    sign = target * 2 - 1
    candidates = [-4.0 * sign, torch.full_like(target, -4.0), -4.0 * sign]
    candidates[good] = 3.0 * sign + 0.3 * torch.randn_like(target)
    return torch.stack(candidates)[None, None]


@pytest.mark.parametrize("good", [0, 1, 2])
def test_minimum_over_masks_is_selected_and_only_it_gets_mask_gradients(good):
    target = (torch.rand(8, 8) > 0.5).float()
    pred = _three_masks(target, good).requires_grad_(True)
    iou_scores = torch.rand(1, 1, 3, requires_grad=True)
    loss, logs = sam_loss(pred, iou_scores, target[None, None], iou_weight=0.0)
    assert logs["best_mask"].tolist() == [[good]]
    alone = 20 * sigmoid_focal_loss_per_mask(pred[0, 0, good], target) + dice_loss_per_mask(pred[0, 0, good], target)
    torch.testing.assert_close(loss, alone)
    loss.backward()
    per_mask_grad = pred.grad.abs().flatten(3).sum(-1)[0, 0]  # (3,)
    assert per_mask_grad[good] > 0
    assert [float(g) for i, g in enumerate(per_mask_grad) if i != good] == [0.0, 0.0]


def test_total_is_the_weighted_sum_and_iou_term_is_mse_to_actual_iou():
    torch.manual_seed(1)
    pred, iou_scores = torch.randn(2, 3, 3, 6, 6), torch.rand(2, 3, 3)
    target = (torch.rand(2, 3, 6, 6) > 0.6).float()
    loss, logs = sam_loss(pred, iou_scores, target)
    torch.testing.assert_close(loss, 20 * logs["loss_focal"] + logs["loss_dice"] + logs["loss_iou"])
    true_iou = binary_mask_iou(pred > 0, target[:, :, None].expand_as(pred))
    torch.testing.assert_close(logs["loss_iou"], ((iou_scores - true_iou) ** 2).mean())
    # supervise_all_iou=False: only the selected mask's IoU prediction
    _, only_best = sam_loss(pred, iou_scores, target, supervise_all_iou=False)
    best = logs["best_mask"][..., None]
    expected = ((iou_scores.gather(-1, best) - true_iou.gather(-1, best)) ** 2).mean()
    torch.testing.assert_close(only_best["loss_iou"], expected)
    # other weights, on one mask per prompt (the weights also steer the selection among several)
    single, single_logs = sam_loss(pred[:, :, :1], iou_scores[:, :, :1], target, 1.0, 2.0, 3.0)
    torch.testing.assert_close(
        single, single_logs["loss_focal"] + 2 * single_logs["loss_dice"] + 3 * single_logs["loss_iou"]
    )


def test_iou_term_sends_no_gradient_to_the_masks():
    pred = torch.randn(1, 2, 3, 5, 5, requires_grad=True)
    iou_scores = torch.rand(1, 2, 3, requires_grad=True)
    loss, _ = sam_loss(pred, iou_scores, (torch.rand(1, 2, 5, 5) > 0.5).float(), focal_weight=0.0, dice_weight=0.0)
    loss.backward()
    assert pred.grad is None or float(pred.grad.abs().max()) == 0.0
    assert float(iou_scores.grad.abs().min()) > 0  # every IoU prediction is supervised by default


@pytest.mark.parametrize(
    "pred, iou, target, error, match",
    [
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3), torch.zeros(1, 4, 4), ValueError, "pred_masks"),
        (torch.zeros(1, 1, 3, 4, 4), torch.zeros(1, 3), torch.zeros(1, 1, 4, 4), ValueError, "iou_scores"),
        (torch.zeros(1, 1, 3, 4, 4), torch.zeros(1, 1, 3), torch.zeros(1, 1, 8, 8), ValueError, "target_masks"),
        (torch.zeros(1, 0, 3, 4, 4), torch.zeros(1, 0, 3), torch.zeros(1, 0, 4, 4), ValueError, "no prompts"),
        (torch.zeros(1, 1, 3, 4, 4), [0.0, 0.0, 0.0], torch.zeros(1, 1, 4, 4), TypeError, "iou_scores"),
    ],
)
def test_bad_inputs_raise(pred, iou, target, error, match):
    with pytest.raises(error, match=match):
        sam_loss(pred, iou, target)


def test_gradients_reach_only_the_decoder_of_a_frozen_encoder_sam():
    from hf_vl.training.sam_recipe import build_sam_for_shapes

    model, _ = build_sam_for_shapes(seed=0)
    pixel_values = torch.randn(2, 3, 128, 128)
    outputs = model(
        pixel_values=pixel_values,
        input_points=torch.rand(2, 3, 1, 2) * 128,
        input_labels=torch.ones(2, 3, 1, dtype=torch.long),
        multimask_output=True,
    )
    target = (torch.rand(*outputs.pred_masks.shape[:2], *outputs.pred_masks.shape[-2:]) > 0.5).float()
    loss, _ = sam_loss(outputs.pred_masks, outputs.iou_scores, target)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    decoder = [name for name in grads if name.startswith("mask_decoder.")]
    assert decoder and all(grads[name] is not None for name in decoder)
    assert sum(float(grads[name].abs().sum()) for name in decoder) > 0
    others = [name for name in grads if not name.startswith("mask_decoder.")]
    assert any(name.startswith("vision_encoder.") for name in others)
    assert [name for name in others if grads[name] is not None] == []
