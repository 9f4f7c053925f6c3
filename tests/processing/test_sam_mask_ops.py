"""hf_vl.processing.sam_mask_ops against segment-anything's ``utils/amg.py`` (the reference for every convention),
pycocotools (RLE), F.interpolate (mask post-processing), transformers' SamImageProcessor helpers, and a naive
per-component implementation of small-region removal (segment-anything's needs OpenCV, which is not installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from segment_anything.utils import amg

from hf_vl.processing import sam_mask_ops as ops


def _blobby_masks(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Boolean masks with blobs, holes and specks: smoothed noise thresholded, plus a few single pixels."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, height, width)), sigma=(0, 2, 2))
    masks = noise > 0.05
    specks = rng.random((n, height, width)) < 0.003
    return torch.from_numpy(masks ^ specks)


# ----------------------------------------------------------------------------------------------- grids and crops
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_point_grid_matches_reference(n):
    np.testing.assert_allclose(ops.build_point_grid(n), amg.build_point_grid(n), rtol=0, atol=1e-15)


def test_layer_point_grids_match_reference():
    ours = ops.build_all_layer_point_grids(16, 2, 2)
    ref = amg.build_all_layer_point_grids(16, 2, 2)
    assert [g.shape for g in ours] == [g.shape for g in ref] == [(256, 2), (64, 2), (16, 2)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 3000), w=st.integers(8, 3000), layers=st.integers(0, 3), ratio=st.floats(0.0, 0.6))
def test_crop_boxes_match_reference(h, w, layers, ratio):
    assert ops.generate_crop_boxes((h, w), layers, ratio) == amg.generate_crop_boxes((h, w), layers, ratio)


def test_preprocess_shape_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(512, 512), (400, 600), (427, 640), (1, 999), (171, 256)]:
        assert ops.preprocess_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="n_per_side"):
        ops.build_point_grid(0)
    with pytest.raises(ValueError, match="n_layers"):
        ops.generate_crop_boxes((10, 10), -1, 0.3)


# ----------------------------------------------------------------------------------------------- scores and boxes
def test_stability_score_matches_reference():
    logits = torch.randn(6, 3, 40, 50) * 3
    ours = ops.stability_score(logits, 0.0, 1.0)
    ref = amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-6)
    assert ours.shape == (6, 3) and ours.dtype == torch.float32
    # a sharper map is more stable
    assert (ops.stability_score(logits * 10, 0.0, 1.0) >= ours - 1e-6).all()


def test_masks_to_boxes_matches_reference_including_empty():
    masks = _blobby_masks(10, 37, 53) & (torch.rand(10, 1, 1) > 0.2)  # some masks empty
    masks[3] = False
    masks[4] = False
    masks[4, 5, 7] = True  # a single pixel: box [7, 5, 7, 5]
    ours = ops.masks_to_boxes(masks)
    torch.testing.assert_close(ours, amg.batched_mask_to_box(masks))
    assert ours[3].tolist() == [0, 0, 0, 0] and ours[4].tolist() == [7, 5, 7, 5]
    # leading dims kept
    assert ops.masks_to_boxes(masks.view(2, 5, 37, 53)).shape == (2, 5, 4)
    assert ops.masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_box_helpers_match_reference():
    boxes = torch.tensor([[0, 0, 10, 10], [25, 3, 60, 40], [5, 5, 99, 79], [30, 30, 31, 31]])
    crop, orig = [20, 10, 120, 90], [0, 0, 120, 90]
    near = ops.is_box_near_crop_edge(boxes, crop, orig)
    torch.testing.assert_close(near, amg.is_box_near_crop_edge(boxes, crop, orig))
    torch.testing.assert_close(ops.uncrop_boxes_xyxy(boxes, crop), amg.uncrop_boxes_xyxy(boxes, crop))
    points = torch.rand(5, 2) * 50
    torch.testing.assert_close(ops.uncrop_points(points, crop), amg.uncrop_points(points, crop).float())
    masks = torch.rand(3, 80, 100) > 0.5
    torch.testing.assert_close(ops.uncrop_masks(masks, crop, 100, 130), amg.uncrop_masks(masks, crop, 100, 130))
    xywh = ops.box_xyxy_to_xywh(boxes)
    assert xywh.tolist() == [amg.box_xyxy_to_xywh(b).tolist() for b in boxes]


def test_box_nms_orders_by_score_and_suppresses():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]])
    keep = ops.box_nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.7)
    assert keep.tolist() == [1, 2]
    assert ops.box_nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 1.0).tolist() == [1, 0, 2]
    assert ops.box_nms(torch.zeros(0, 4), torch.zeros(0), 0.7).numel() == 0


# ----------------------------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize(
    "low, pad, input_size, original",
    [
        ((64, 64), 256, (256, 171), (512, 342)),
        ((32, 32), 128, (96, 128), (75, 100)),
        ((16, 16), 64, (64, 64), (64, 64)),
    ],
)
def test_composed_upsampling_equals_two_interpolations(low, pad, input_size, original):
    logits = torch.randn(5, *low) * 4
    # SAM's post-processing: to the padded input, crop the resized image, to the original size
    ref = F.interpolate(logits[:, None], (pad, pad), mode="bilinear", align_corners=False)
    ref = ref[..., : input_size[0], : input_size[1]]
    ref = F.interpolate(ref, original, mode="bilinear", align_corners=False)[:, 0]
    rows, cols = ops.postprocess_matrices(low, pad, input_size, original)
    assert rows.shape == (original[0], low[0]) and cols.shape == (original[1], low[1])
    ours = ops.upsample_logits(logits, rows, cols)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # float32 rounding of |logits| ~ 10
    # the bands computed once and passed in (as the generator does per crop): the same products
    bands = ops.upsample_bands(rows, cols)
    torch.testing.assert_close(ops.upsample_logits(logits, rows, cols, bands), ours, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bands"):  # another size's bands would leave rows unwritten
        ops.upsample_logits(logits, rows, cols, ops.upsample_bands(rows[:-1], cols))



def test_upsample_logits_in_bfloat16():
    low, pad, input_size, original = (32, 32), 128, (128, 96), (100, 75)
    logits = torch.randn(5, *low) * 4
    rows, cols = ops.postprocess_matrices(low, pad, input_size, original)
    bands = ops.upsample_bands(rows, cols)
    exact = ops.upsample_logits(logits, rows, cols, bands)
    # the logits rounded to bf16 first, as a bf16 model returns them
    ours = ops.upsample_logits(logits.bfloat16(), rows, cols, bands, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    # bf16 rounding of the input, the weights, the column pass and the output: a few units of 2^-8 relative
    torch.testing.assert_close(ours.float(), exact, rtol=0, atol=0.05 * float(exact.abs().max()) / 4)
    assert ((ours.float() > 0) == (exact > 0)).float().mean() > 0.99
    # float32 is the default whatever the logits' dtype
    assert ops.upsample_logits(logits.bfloat16(), rows, cols, bands).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        ops.upsample_logits(logits, rows, cols, bands, dtype=torch.float64)

def test_interpolation_matrix_rows_sum_to_one():
    matrix = ops.interpolation_matrix(7, 19)
    torch.testing.assert_close(matrix.sum(1), torch.ones(19, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- RLE
def test_rle_matches_reference_and_round_trips():
    masks = _blobby_masks(9, 31, 47)
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, 0] = True  # first pixel set: counts start with 0
    masks[3] = False
    masks[3, -1, -1] = True  # last pixel only
    ours = ops.mask_to_rle(masks)
    assert ours == amg.mask_to_rle_pytorch(masks)
    assert ours[0]["counts"] == [31 * 47] and ours[1]["counts"] == [0, 31 * 47] and ours[2]["counts"][0] == 0
    for rle, mask in zip(ours, masks):
        decoded = ops.rle_to_mask(rle)
        assert decoded.dtype == bool and (decoded == mask.numpy()).all()
        assert (decoded == amg.rle_to_mask(rle)).all()
        assert ops.area_from_rle(rle) == int(mask.sum()) == amg.area_from_rle(rle)


def test_rle_matches_pycocotools():
    from pycocotools import mask as mask_utils

    masks = _blobby_masks(4, 23, 29, seed=3)
    for rle, mask in zip(ops.mask_to_rle(masks), masks):
        coco = mask_utils.frPyObjects(rle, *rle["size"])
        assert (mask_utils.decode(coco).astype(bool) == mask.numpy()).all()
        direct = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        assert coco["counts"] == direct["counts"] and mask_utils.area(direct) == ops.area_from_rle(rle)


def test_rle_errors():
    with pytest.raises(ValueError, match="masks"):
        ops.mask_to_rle(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="counts"):
        ops.rle_to_mask({"size": [2, 2], "counts": [1, 2]})
    assert ops.mask_to_rle(torch.zeros(0, 3, 3, dtype=torch.bool)) == []


# ----------------------------------------------------------------------------------------------- small regions
def _naive_remove_small_regions(mask: np.ndarray, area: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment-anything's algorithm, one mask, component by component (8-connected)."""
    holes = mode == "holes"
    labels, n = ndimage.label(mask ^ holes, structure=np.ones((3, 3)))
    sizes = [int((labels == i).sum()) for i in range(1, n + 1)]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    keep = [i for i in range(1, n + 1) if i not in small] or [int(np.argmax(sizes)) + 1]
    return np.isin(labels, keep), True


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 5, 40, 10_000])
def test_remove_small_regions_matches_naive(mode, area):
    masks = _blobby_masks(12, 40, 45, seed=area).numpy()
    masks[0] = False  # nothing at all
    masks[1] = True  # one region, no holes
    new, changed = ops.remove_small_regions(masks, area, mode)
    assert new.shape == masks.shape and changed.shape == (12,)
    for i, mask in enumerate(masks):
        ref, ref_changed = _naive_remove_small_regions(mask, area, mode)
        assert changed[i] == ref_changed, i
        assert (new[i] == ref).all(), i
    one, one_changed = ops.remove_small_regions(torch.from_numpy(masks[5]), area, mode)
    assert one.shape == (40, 45) and (one == new[5]).all() and one_changed == changed[5]


def test_remove_small_regions_keeps_largest_island_when_all_small():
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:13, 10:13] = True  # 9 px, the largest
    new, changed = ops.remove_small_regions(mask, 50, "islands")
    assert changed and new.sum() == 9 and new[10:13, 10:13].all()
    with pytest.raises(ValueError, match="mode"):
        ops.remove_small_regions(mask, 5, "specks")


# ----------------------------------------------------------------------------------------------- processor helpers
def test_filter_masks_matches_transformers():
    from transformers import SamImageProcessor

    processor = SamImageProcessor()
    torch.manual_seed(0)
    # 24 round blobs (logit 8 at the centre) of random centres and radii: some cross the crop's inner edges
    ys, xs = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    centres, radii = torch.rand(24, 2) * torch.tensor([80.0, 60.0]), 3 + torch.rand(24) * 15
    dist2 = (xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2
    masks = (8 - 8 * dist2 / radii[:, None, None] ** 2).view(2, 12, 60, 80)
    scores = torch.rand(2, 12)
    crop = [10, 0, 90, 60]
    args = ((100, 120), crop)
    kwargs = dict(pred_iou_thresh=0.3, stability_score_thresh=0.2)
    ref_rles, ref_scores, ref_boxes = processor.filter_masks(masks.clone(), scores, *args, **kwargs)
    rles, kept_scores, boxes = ops.filter_masks(masks.clone(), scores, *args, **kwargs)
    assert 3 <= len(rles) < 20 and len(rles) == len(ref_rles)
    torch.testing.assert_close(kept_scores, ref_scores)
    torch.testing.assert_close(boxes, ref_boxes)
    for ours, ref in zip(rles, ref_rles):
        assert ours["size"] == ref["size"] == [100, 120]
        assert (ops.rle_to_mask(ours) == ops.rle_to_mask(ref)).all()
    post = ops.post_process_for_mask_generation(rles, kept_scores, boxes, 0.5)
    ref_post = processor.post_process_for_mask_generation(ref_rles, ref_scores, ref_boxes, 0.5)
    assert len(post[0]) == len(ref_post[0])
    for a, b in zip(post[0], ref_post[0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(post[1], ref_post[1])
    torch.testing.assert_close(post[3], ref_post[3])



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_threshold_for_low_precision(dtype):
    # every finite value of the dtype (all 2^16 bit patterns)
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[values.isfinite()]
    for threshold in (0.95, 0.952, -0.952, 1.0, -1.0, 0.0, 1e-3, -1e-3, 0.05 + 0.9, 0.05 - 0.9, 300.3, 1e-30):
        cut = ops.exact_threshold(threshold, dtype)
        assert cut <= threshold
        assert torch.equal(values > cut, values.double() > threshold), threshold
    # a plain comparison rounds the cut-off to nearest: 0.952 up (bf16: to 0.953125), missing the values in between
    assert not torch.equal(values > 0.952, values.double() > 0.952)
    assert ops.exact_threshold(0.952, torch.float32) == 0.952


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_above_compares_like_torch_and_exactly_in_low_precision(dtype):
    """``above`` (numpy on the CPU for float32 and bf16 bit patterns) against the plain comparison in float64 for
    bf16/fp16 (every bit pattern: zeros of both signs, infinities, NaNs) and torch's own comparison otherwise."""
    if dtype in (torch.bfloat16, torch.float16):
        values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).view(8, 8192)
    else:
        values = torch.randn(8, 8192, dtype=dtype) * 3
        values[0, :6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan], dtype=dtype)
        values[1] = torch.tensor(0.952, dtype=dtype) + torch.arange(-4096, 4096, dtype=dtype) * 1e-7
    for threshold in (0.952, -0.952, 0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 300.3, -math.inf):
        ours = ops.above(values, threshold)
        assert ours.dtype == torch.bool and ours.shape == values.shape
        reference = values.double() > threshold if values.element_size() == 2 else values > threshold
        assert torch.equal(ours, reference), threshold


def test_scores_and_boxes_of_bfloat16_logits_use_exact_thresholds():
    logits = (torch.randn(4, 2, 40, 50) * 3).bfloat16()
    logits[0, 0, 0, :4] = torch.tensor([0.94921875, 0.953125, -0.8515625, -0.84765625])  # around the cut-offs
    # cut-offs (0.952 and -0.848, 0.952) no bf16 value equals: compared as the float64 values would be
    score = ops.stability_score(logits, 0.052, 0.9)
    torch.testing.assert_close(score, ops.stability_score(logits.double(), 0.052, 0.9), rtol=0, atol=0)
    flat = logits.flatten(0, 1)
    torch.testing.assert_close(ops.boxes_from_logits(flat, 0.952), ops.boxes_from_logits(flat.double(), 0.952))
    assert not torch.equal(flat > 0.952, flat.double() > 0.952)  # what the exact cut-offs are for

def test_boxes_from_logits_and_count_true():
    logits = torch.randn(6, 33, 41) - 1.5  # sparse positives; mask 2 empty
    logits[2] = -1.0
    masks = logits > 0.25
    torch.testing.assert_close(ops.boxes_from_logits(logits, 0.25), amg.batched_mask_to_box(masks))
    # float64 takes the row/column-maxima path (as off the CPU), the same boxes
    torch.testing.assert_close(ops.boxes_from_logits(logits.double(), 0.25), amg.batched_mask_to_box(masks))
    assert ops.count_true(masks).tolist() == masks.flatten(1).sum(1).tolist()
    assert ops.count_true(masks).dtype == torch.int64
