"""DETR's box ops, Hungarian matcher and set criterion: properties, naive oracles, transformers' loss as a second
reference, and a two-process ``torchrun`` run that must reproduce the one-process losses and gradients."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from common.testing_utils import run_torchrun
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_vl.modeling.hf_vl_box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
)
from hf_vl.modeling.hf_vl_detection_loss import HfVlDetrSetCriterion
from hf_vl.modeling.hf_vl_matcher import HfVlHungarianMatcher

NUM_LABELS = 5
WORKER = Path(__file__).with_name("detr_ddp_worker.py")


def random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4) valid normalised cxcywh boxes."""
    centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.02
    return torch.cat([centers, sizes], dim=1)


def random_problem(batch: int, queries: int, counts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, NUM_LABELS + 1, generator=generator)
    boxes = random_boxes(batch * queries, generator).view(batch, queries, 4)
    targets = [
        {"class_labels": torch.randint(0, NUM_LABELS, (n,), generator=generator), "boxes": random_boxes(n, generator)}
        for n in counts
    ]
    return logits, boxes, targets


# ---------------------------------------------------------------------------------------------- box ops
def test_box_format_round_trip():
    boxes = random_boxes(50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_iou_and_giou_match_torchvision():
    generator = torch.Generator().manual_seed(1)
    a, b = box_cxcywh_to_xyxy(random_boxes(7, generator)), box_cxcywh_to_xyxy(random_boxes(5, generator))
    torch.testing.assert_close(box_iou(a, b)[0], torchvision.ops.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 0.99), min_size=8, max_size=8))
def test_giou_properties(values):
    a = box_cxcywh_to_xyxy(torch.tensor([values[:2] + [v * 0.5 for v in values[2:4]]]))
    b = box_cxcywh_to_xyxy(torch.tensor([values[4:6] + [v * 0.5 for v in values[6:8]]]))
    giou = generalized_box_iou(a, b)
    assert -1 - 1e-6 <= giou.item() <= 1 + 1e-6
    torch.testing.assert_close(giou, generalized_box_iou(b, a))  # symmetric
    torch.testing.assert_close(generalized_box_iou(a, a), torch.ones(1, 1))
    assert giou.item() <= box_iou(a, b)[0].item() + 1e-6  # GIoU <= IoU


def test_giou_rejects_degenerate_boxes():
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(torch.tensor([[0.5, 0.5, 0.1, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_masks_to_boxes():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 1] = True
    torch.testing.assert_close(masks_to_boxes(masks), torch.tensor([[3.0, 2, 8, 4], [1, 7, 1, 7]]))
    assert masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------- matcher
def _pair_cost(logits, box, label, target_box, matcher) -> float:
    """The matching cost of one (prediction, target) pair, computed from scratch."""
    probability = logits.softmax(-1)[label]
    l1 = (box - target_box).abs().sum()
    giou = generalized_box_iou(box_cxcywh_to_xyxy(box[None]), box_cxcywh_to_xyxy(target_box[None]))[0, 0]
    return float(matcher.class_cost * -probability + matcher.bbox_cost * l1 + matcher.giou_cost * -giou)


def test_matcher_is_optimal_against_brute_force():
    matcher = HfVlHungarianMatcher()
    logits, boxes, targets = random_problem(1, 5, [3], seed=3)
    target = targets[0]
    cost = [[_pair_cost(logits[0, q], boxes[0, q], target["class_labels"][t], target["boxes"][t], matcher)
             for t in range(3)] for q in range(5)]  # fmt: skip
    best = min(sum(cost[q][t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    rows, cols = matcher(logits, boxes, targets)[0]
    assert len(rows) == len(cols) == 3 and rows.tolist() == sorted(rows.tolist())
    assert math.isclose(sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist())), best, rel_tol=1e-5)


def test_matcher_batched_equals_per_image():
    matcher = HfVlHungarianMatcher()
    logits, boxes, targets = random_problem(4, 20, [3, 0, 7, 1], seed=4)
    batched = matcher(logits, boxes, targets)
    for image in range(4):
        single = matcher(logits[image : image + 1], boxes[image : image + 1], targets[image : image + 1])[0]
        assert [t.tolist() for t in batched[image]] == [t.tolist() for t in single]


def test_matcher_empty_targets():
    matcher = HfVlHungarianMatcher()
    logits, boxes, targets = random_problem(2, 10, [4, 0], seed=5)
    indices = matcher(logits, boxes, targets)
    assert len(indices[0][0]) == 4 and len(indices[1][0]) == 0
    logits, boxes, targets = random_problem(2, 10, [0, 0], seed=5)
    assert all(len(rows) == len(cols) == 0 for rows, cols in matcher(logits, boxes, targets))


def test_matcher_more_targets_than_queries():
    logits, boxes, targets = random_problem(1, 3, [5], seed=6)
    rows, cols = HfVlHungarianMatcher()(logits, boxes, targets)[0]
    assert len(rows) == 3 and len(set(cols.tolist())) == 3


def test_matcher_validation():
    with pytest.raises(ValueError, match="can't all be 0"):
        HfVlHungarianMatcher(0, 0, 0)
    logits, boxes, targets = random_problem(2, 4, [1], seed=0)
    with pytest.raises(ValueError, match="targets has 1"):
        HfVlHungarianMatcher()(logits, boxes, targets)


# -------------------------------------------------------------------------------------------- criterion
def naive_losses(logits, boxes, targets, indices, eos_coefficient: float) -> dict[str, float]:
    """The paper's losses with plain Python loops over images and matched pairs (one process)."""
    num_boxes = max(sum(len(t["class_labels"]) for t in targets), 1)
    weighted_nll, weight_total, l1, giou = 0.0, 0.0, 0.0, 0.0
    for image, (rows, cols) in enumerate(indices):
        matched = dict(zip(rows.tolist(), cols.tolist()))
        for query in range(logits.shape[1]):
            target_class = NUM_LABELS if query not in matched else int(targets[image]["class_labels"][matched[query]])
            weight = eos_coefficient if target_class == NUM_LABELS else 1.0
            weighted_nll += -weight * torch.log_softmax(logits[image, query], -1)[target_class].item()
            weight_total += weight
            if query in matched:
                source, target = boxes[image, query], targets[image]["boxes"][matched[query]]
                l1 += (source - target).abs().sum().item()
                pair = generalized_box_iou(box_cxcywh_to_xyxy(source[None]), box_cxcywh_to_xyxy(target[None]))
                giou += 1 - pair.item()
    return {"loss_ce": weighted_nll / weight_total, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [0, 0], [2]])
def test_criterion_matches_naive_oracle(counts):
    logits, boxes, targets = random_problem(len(counts), 12, counts, seed=sum(counts))
    matcher = HfVlHungarianMatcher()
    criterion = HfVlDetrSetCriterion(NUM_LABELS, matcher, eos_coefficient=0.1)
    loss, logs = criterion(logits, boxes, targets)
    expected = naive_losses(logits, boxes, targets, matcher(logits, boxes, targets), 0.1)
    for key, value in expected.items():
        assert math.isclose(logs[key].item(), value, rel_tol=1e-5, abs_tol=1e-6), (key, logs[key], value)
    total = expected["loss_ce"] + 5 * expected["loss_bbox"] + 2 * expected["loss_giou"]
    assert math.isclose(loss.item(), total, rel_tol=1e-5, abs_tol=1e-6)


def test_criterion_auxiliary_losses_use_their_own_matching():
    logits, boxes, targets = random_problem(2, 8, [2, 3], seed=8)
    aux_logits, aux_boxes, _ = random_problem(2, 8, [2, 3], seed=9)
    criterion = HfVlDetrSetCriterion(NUM_LABELS, HfVlHungarianMatcher())
    loss, logs = criterion(logits, boxes, targets, [{"logits": aux_logits, "pred_boxes": aux_boxes}])
    _, aux_logs = criterion(aux_logits, aux_boxes, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(logs[f"{key}_0"], aux_logs[key])
    main, _ = criterion(logits, boxes, targets)
    torch.testing.assert_close(loss, main + aux_logs["loss_ce"] + 5 * aux_logs["loss_bbox"] + 2 * aux_logs["loss_giou"])


def test_criterion_matches_transformers_on_one_process():
    """On one process transformers' ForObjectDetectionLoss is the same loss (its bug is cross-process only)."""
    from types import SimpleNamespace

    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    logits, boxes, targets = random_problem(3, 10, [3, 0, 4], seed=10)
    aux_logits, aux_boxes, _ = random_problem(3, 10, [3, 0, 4], seed=11)
    config = SimpleNamespace(
        class_cost=1, bbox_cost=5, giou_cost=2, eos_coefficient=0.1, bbox_loss_coefficient=5,
        giou_loss_coefficient=2, auxiliary_loss=True, num_labels=NUM_LABELS, decoder_layers=2,
    )  # fmt: skip
    reference, reference_logs, _ = ForObjectDetectionLoss(
        logits, targets, "cpu", boxes, config, torch.stack([aux_logits, logits]), torch.stack([aux_boxes, boxes])
    )
    criterion = HfVlDetrSetCriterion(NUM_LABELS, HfVlHungarianMatcher())
    loss, logs = criterion(logits, boxes, targets, [{"logits": aux_logits, "pred_boxes": aux_boxes}])
    torch.testing.assert_close(loss, reference)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "loss_ce_0", "loss_giou_0"):
        torch.testing.assert_close(logs[key], reference_logs[key], msg=key)


def test_criterion_gradients_reach_logits_and_boxes_even_without_targets():
    logits, boxes, targets = random_problem(2, 6, [0, 0], seed=12)
    logits.requires_grad_(True), boxes.requires_grad_(True)
    loss, logs = HfVlDetrSetCriterion(NUM_LABELS, HfVlHungarianMatcher())(logits, boxes, targets)
    loss.backward()
    assert logs["loss_bbox"] == 0 and logs["loss_giou"] == 0
    assert logits.grad.abs().sum() > 0 and boxes.grad is not None


def test_mask_losses():
    logits, boxes, targets = random_problem(2, 6, [2, 1], seed=13)
    generator = torch.Generator().manual_seed(0)
    for target in targets:
        target["masks"] = torch.rand(len(target["boxes"]), 16, 20, generator=generator) > 0.5
    pred_masks = torch.randn(2, 6, 4, 5, generator=generator, requires_grad=True)
    criterion = HfVlDetrSetCriterion(NUM_LABELS, HfVlHungarianMatcher())
    loss, logs = criterion(logits, boxes, targets, pred_masks=pred_masks)
    loss.backward()
    assert logs["loss_mask"] > 0 and 0 < logs["loss_dice"] < 1 and pred_masks.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masks"):
        criterion(logits, boxes, [{k: v for k, v in t.items() if k != "masks"} for t in targets], pred_masks=pred_masks)


# -------------------------------------------------------------------------------------------- two processes
def _single_process(model_state, config_dict, inputs, labels):
    from hf_vl import HfVlDetrConfig, HfVlDetrForObjectDetection

    model = HfVlDetrForObjectDetection(HfVlDetrConfig(**config_dict)).train()
    model.load_state_dict(model_state)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.loss_dict, grads


@pytest.mark.slow
def test_two_processes_reproduce_the_one_process_losses_and_gradients(tmp_path):
    """``torchrun --standalone --nproc_per_node 2``: each rank sees half of a global batch of 4 images; DDP averages
    gradients. Case "equal": both ranks hold 3 boxes, so the total loss must match. Case "unequal" (1 vs 6 boxes,
    class loss weight 0): box losses normalised by the global box count must still match exactly; transformers'
    ForObjectDetectionLoss would double them here."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_modeling_detr import HEIGHT, WIDTH, tiny_detr_config

    from hf_vl import HfVlDetrForObjectDetection

    generator = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(4, 3, HEIGHT, WIDTH, generator=generator),
              "pixel_mask": torch.ones(4, HEIGHT, WIDTH, dtype=torch.long)}  # fmt: skip
    cases = {"equal": ([1, 2, 0, 3], {}), "unequal": ([1, 0, 4, 2], {"class_loss_coefficient": 0.0})}
    torch.manual_seed(0)
    base_config = tiny_detr_config().to_dict()
    model_state = HfVlDetrForObjectDetection(tiny_detr_config()).state_dict()
    payload = {"inputs": inputs, "state": model_state, "cases": {}}
    for name, (counts, overrides) in cases.items():
        labels = [{"class_labels": torch.randint(0, NUM_LABELS, (n,), generator=generator),
                   "boxes": random_boxes(n, generator)} for n in counts]  # fmt: skip
        payload["cases"][name] = {"labels": labels, "config": {**base_config, **overrides}}
    torch.save(payload, tmp_path / "payload.pt")
    run_torchrun([WORKER, tmp_path / "payload.pt", tmp_path / "result.pt"])
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    assert results["world_size"] == 2
    for name, case in payload["cases"].items():
        loss, logs, grads = _single_process(model_state, case["config"], inputs, case["labels"])
        ddp = results["cases"][name]
        torch.testing.assert_close(ddp["loss"], loss, atol=1e-5, rtol=1e-5, msg=name)
        for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
            torch.testing.assert_close(ddp["logs"][key], logs[key], atol=1e-6, rtol=1e-5, msg=f"{name} {key}")
        assert grads.keys() == ddp["grads"].keys()
        for key, grad in grads.items():
            # summation order differs between one batch of 4 and two of 2: float noise only (the world-size bug
            # of transformers' loss would be a factor of 2)
            torch.testing.assert_close(
                ddp["grads"][key], grad, atol=1e-5, rtol=1e-3, msg=lambda m, key=key: f"{name} {key}: {m}"
            )
