"""SAM mask-decoder fine-tuning through Trainer: simulated prompts, target/post-processing frames, the collator's
process-independent randomness, a short recipe run that must beat the untrained decoder, and the 2-process
(torchrun, gloo) step equal to the 1-process step on the same global batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from common.testing_utils import assert_same_step, recipe_step_in_two_processes

from hf_vl.data.shapes import instance_masks, load_shapes
from hf_vl.modeling.hf_vl_sam_loss import binary_mask_iou, sam_loss
from hf_vl.training.sam_recipe import (
    SamPromptCollator,
    build_sam_for_shapes,
    evaluate_sam_miou,
    freeze_except,
    get_recipe,
    low_res_targets,
    resized_size,
    sam_one_step_gradients,
    shapes_sam_dataset,
    simulate_prompts,
    train_sam_shapes,
    upscale_masks,
)

INPUT, MASK = 128, 64  # the tiny recipes' input side and low-resolution mask side


@pytest.fixture(scope="module")
def shapes():
    return load_shapes("test", num_images=6, image_size=(64, 128), seed=3)


@pytest.fixture(scope="module")
def model_and_rows():
    model, processor = build_sam_for_shapes(seed=0)
    rows = shapes_sam_dataset("train", 6, model, processor, get_recipe("sam-shapes-tiny"))
    return model, [rows[i] for i in range(6)]


def test_point_prompts_fall_inside_their_masks(shapes):
    rng = np.random.default_rng(0)
    for example in shapes:
        masks = instance_masks(example)
        scale = INPUT / max(masks.shape[-2:])
        prompts = simulate_prompts(rng, masks, "points", INPUT, extra=3)
        assert prompts["input_points"].shape == (len(masks), 4, 2)
        assert prompts["input_labels"][:, 0].eq(1).all()  # the first click is always on the object
        # back to original pixels: foreground clicks on the mask, background clicks off it
        pixels = (prompts["input_points"] / scale).round().long().numpy()
        for mask, points, labels in zip(masks, pixels, prompts["input_labels"].numpy()):
            assert [bool(mask[y, x]) for x, y in points] == [bool(label) for label in labels]


def test_noisy_boxes_stay_within_the_noise_bound(shapes):
    rng = np.random.default_rng(1)
    for example in shapes:
        masks = instance_masks(example)
        height, width = masks.shape[-2:]
        scale = INPUT / max(height, width)
        boxes = simulate_prompts(rng, masks, "box", INPUT, box_noise=0.1, box_noise_max=2.5)["input_boxes"]
        noiseless = simulate_prompts(rng, masks, "box", INPUT, box_noise=0.0)["input_boxes"]
        for mask, box, exact in zip(masks, boxes, noiseless):
            ys, xs = np.nonzero(mask)
            expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) * scale
            torch.testing.assert_close(exact, expected)
            assert float((box - exact).abs().max()) <= 2.5 + 1e-5
            assert box[0] <= box[2] and box[1] <= box[3]
        assert float((boxes - noiseless).abs().max()) > 0  # noise was added
    with pytest.raises(ValueError, match="kind"):
        simulate_prompts(rng, masks, "scribble", INPUT)


def test_low_res_targets_come_back_through_mask_post_processing(shapes):
    """The training targets and the evaluation's upscaling use the same frame: a perfect low-res logit map of the
    target upscales to the original mask (up to the 2x resolution loss of the 64x64 frame)."""
    ious = []
    for example in shapes:
        masks = instance_masks(example)
        targets = low_res_targets(masks, INPUT, MASK)  # (P, 64, 64)
        assert targets.shape == (len(masks), MASK, MASK)
        resized_h, resized_w = resized_size(*masks.shape[-2:], INPUT)
        assert targets[:, resized_h // 2 + 1 :].sum() == 0 and targets[:, :, resized_w // 2 + 1 :].sum() == 0
        logits = (targets * 2 - 1)[:, None] * 10
        restored = upscale_masks(logits, masks.shape[-2:], INPUT)[:, 0] > 0
        ious.append(binary_mask_iou(restored, torch.as_tensor(masks)))
    assert float(torch.cat(ious).mean()) > 0.85, torch.cat(ious)


def _collate(collator, rows):
    batch = collator(rows)
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_collator_batch_shapes(model_and_rows):
    _, rows = model_and_rows
    point = _collate(SamPromptCollator(INPUT, MASK, prompts_per_image=5, kind="point"), rows[:3])
    assert point["image_embeddings"].shape == (3, 32, 16, 16)
    assert point["input_points"].shape == (3, 5, 1, 2) and point["input_labels"].shape == (3, 5, 1)
    assert point["labels"].shape == (3, 5, MASK, MASK) and point["multimask_output"] is True
    box = _collate(SamPromptCollator(INPUT, MASK, prompts_per_image=2, kind="box"), rows[:3])
    assert box["input_boxes"].shape == (3, 2, 4) and "input_points" not in box and box["multimask_output"] is False
    points = _collate(SamPromptCollator(INPUT, MASK, kind="points", extra_points=2), rows[:2])
    assert points["input_points"].shape == (2, 4, 3, 2) and points["multimask_output"] is False


def test_collator_prompts_do_not_depend_on_the_split_over_processes(model_and_rows):
    _, rows = model_and_rows
    whole = _collate(SamPromptCollator(INPUT, MASK, kind="point", seed=4), rows[:4])
    rank0 = _collate(SamPromptCollator(INPUT, MASK, kind="point", seed=4), rows[:2])
    rank1 = _collate(SamPromptCollator(INPUT, MASK, kind="point", seed=4), rows[2:4])
    for key in ("input_points", "labels", "image_embeddings"):
        torch.testing.assert_close(whole[key], torch.cat([rank0[key], rank1[key]]))
    # the next visit of the same images (next epoch) draws new prompts
    collator = SamPromptCollator(INPUT, MASK, kind="point", seed=4)
    first, second = _collate(collator, rows[:4]), _collate(collator, rows[:4])
    assert not torch.equal(first["input_points"], second["input_points"])


def test_collator_draws_prompt_kinds_per_batch(model_and_rows):
    _, rows = model_and_rows
    collator = SamPromptCollator(INPUT, MASK, kinds={"point": 0.5, "box": 0.5}, seed=0)
    kinds = ["input_boxes" in collator(rows[:1]) for _ in range(40)]
    assert 5 < sum(kinds) < 35
    only_boxes = SamPromptCollator(INPUT, MASK, kinds={"box": 1.0, "point": 0.0})
    assert all("input_boxes" in only_boxes(rows[:1]) for _ in range(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kinds={"scribble": 1.0}), "scribble"),
        (dict(kinds={"point": -1.0, "box": 1.0}), "probabilities"),
        (dict(kind="mask"), "mask"),
        (dict(prompts_per_image=0), "prompts_per_image"),
    ],
)
def test_collator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamPromptCollator(INPUT, MASK, **kwargs)


def test_collator_rejects_rows_without_image_features():
    with pytest.raises(ValueError, match="empty"):
        SamPromptCollator(INPUT, MASK)([])
    row = dict(load_shapes("train", num_images=1)[0])
    with pytest.raises(KeyError, match="image_embeddings"):
        SamPromptCollator(INPUT, MASK)([row])


class _OracleSam(torch.nn.Module):
    """Returns the true low-res mask of each prompted object (row index encoded in the embedding): with
    ``multimask_output`` as the first of three masks, the other two empty but ranked higher by ``iou_scores``."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, image_embeddings, multimask_output, input_points=None, input_labels=None, input_boxes=None):
        masks = instance_masks(self.rows[int(image_embeddings[0, 0, 0, 0])])
        perfect = (low_res_targets(masks, INPUT, MASK) * 2 - 1) * 10  # (P, 64, 64)
        prompts = (input_points if input_boxes is None else input_boxes).shape[1]
        assert prompts == len(masks)  # one prompt per object
        if not multimask_output:
            return SimpleNamespace(pred_masks=perfect[None, :, None], iou_scores=torch.zeros(1, prompts, 1))
        empty = torch.full_like(perfect, -10.0)
        pred_masks = torch.stack([perfect, empty, empty], dim=1)[None]  # (1, P, 3, 64, 64)
        return SimpleNamespace(pred_masks=pred_masks, iou_scores=torch.tensor([0.1, 0.9, 0.2]).expand(1, prompts, 3))


def test_miou_scores_the_top_ranked_mask_against_full_resolution_masks(shapes):
    rows = [dict(shapes[i], image_embeddings=torch.full((32, 16, 16), float(i))) for i in range(len(shapes))]
    metrics = evaluate_sam_miou(_OracleSam(rows), rows, INPUT)
    assert metrics["num_prompts"] == 2 * sum(len(row["objects"]["id"]) for row in rows)
    assert metrics["miou_point"] == 0.0  # the IoU head ranks an empty mask first
    assert metrics["miou_point_oracle"] > 0.85 and metrics["miou_box"] > 0.85  # 2x resolution loss only
    assert metrics["miou"] == pytest.approx((metrics["miou_point"] + metrics["miou_box"]) / 2)


def test_freeze_except_keeps_only_the_decoder_trainable():
    model, _ = build_sam_for_shapes(seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("mask_decoder.") for name in trainable)
    assert any(name.startswith("vision_encoder.") for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="trainable_prefixes"):
        freeze_except(model, ("no_such_module.",))


def test_one_step_equals_a_manual_step_and_gradient_accumulation(tmp_path, model_and_rows):
    result = sam_one_step_gradients(tmp_path / "one", global_batch=4)
    assert result["world_size"] == 1 and result["frozen_with_grad"] == []
    model, processor = build_sam_for_shapes(seed=0)
    rows = shapes_sam_dataset("train", 4, model, processor, get_recipe("sam-shapes-tiny"))
    batch = SamPromptCollator(INPUT, MASK, kind="point", seed=0, **_prompt_settings())([rows[i] for i in range(4)])
    labels = batch.pop("labels")
    outputs = model(**batch)
    loss, _ = sam_loss(outputs.pred_masks, outputs.iou_scores, labels)
    assert result["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
    loss.backward()
    assert set(result["gradients"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(result["gradients"][name], param.grad, atol=1e-6, rtol=1e-4)
    # two micro-batches of 2 images take the same step (Trainer divides the per-batch mean by the accumulation)
    accumulated = sam_one_step_gradients(tmp_path / "ga", global_batch=4, grad_accum=2)
    assert accumulated["loss"] == pytest.approx(result["loss"], abs=1e-5)
    for name, grad in result["gradients"].items():
        torch.testing.assert_close(accumulated["gradients"][name], grad, atol=1e-6, rtol=1e-4)


def _prompt_settings() -> dict:
    settings = dict(get_recipe("sam-shapes-tiny")["prompts"])
    settings.pop("kinds")
    return settings


@pytest.mark.slow
def test_short_recipe_run_beats_the_untrained_decoder_and_reloads(tmp_path):
    from transformers import AutoModelForMaskGeneration

    # 625 steps (~80 s on a free core): measured mIoU 0.052 untrained -> 0.189 trained on these 40 test images
    metrics, path = train_sam_shapes(tmp_path / "sam", num_train=1000, epochs=5, num_eval=40)
    assert metrics["world_size"] == 1 and metrics["train_steps"] == 625
    assert 0.0 <= metrics["untrained_miou"] <= 1.0 and metrics["test_num_prompts"] > 40
    assert metrics["test_miou"] > max(metrics["untrained_miou"] + 0.08, 2 * metrics["untrained_miou"]), metrics
    assert metrics["test_miou_box"] > metrics["untrained_miou_box"] and metrics["test_miou_point"] > metrics[
        "untrained_miou_point"
    ], metrics
    reloaded = AutoModelForMaskGeneration.from_pretrained(path)
    assert type(reloaded).__name__ == "HfVlSamModel"


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    two = recipe_step_in_two_processes("hf_vl.training.sam_recipe", tmp_path / "two")
    one = sam_one_step_gradients(tmp_path / "one", global_batch=8)
    assert two["frozen_with_grad"] == [] and one["frozen_with_grad"] == []
    assert_same_step(two, one)
    # the check has teeth: the gradients are far from zero, and one process on half the batch differs
    assert max(float(g.abs().max()) for g in one["gradients"].values()) > 1e-3
    half = sam_one_step_gradients(tmp_path / "half", global_batch=4)
    assert abs(half["loss"] - one["loss"]) > 1e-3
