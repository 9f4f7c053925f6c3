"""The stock transformers ``pipeline("mask-generation")`` driven by HfVlSamImageProcessor on tiny SAM models
(transformers' SamModel and hf_vl's HfVlSamModel): runs end to end without "not supported" warnings, its masks and
scores are exactly the predictor's for the grid points, batching the points does not change the result, crops work,
and a saved model directory loads by task name."""

from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import pipeline

import hf_vl  # noqa: F401  (registers HfVlSamModel for AutoModelForMaskGeneration)
from hf_vl.pipelines import HfVlSamPredictor
from hf_vl.processing.image_processing_hf_vl_sam import HfVlSamImageProcessor
from hf_vl.processing.processing_hf_vl_sam import HfVlSamProcessor

IMAGE_SIZE = 64
HAS_HF_VL_SAM = importlib.util.find_spec("hf_vl.modeling.modeling_hf_vl_sam") is not None
MODEL_KINDS = ["transformers"] + (["hf_vl"] if HAS_HF_VL_SAM else [])
POINTS_PER_SIDE = 4  # a 4x4 grid: 16 point prompts
# random weights: keep every mask (no IoU/stability filtering; NMS at IoU 1.0 drops nothing)
KEEP_ALL = dict(pred_iou_thresh=-100.0, stability_score_thresh=0.0, crops_nms_thresh=1.0)


def build_model(kind: str):
    """The predictor tests' tiny models (64-pixel input, 16x16 low-res masks), seeded random O(1) weights."""
    from test_sam_predictor import build_model as build

    return build(kind)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(skimage.data.coffee()).resize((48, 32))  # (height, width) = (32, 48)


@pytest.fixture(scope="module", params=MODEL_KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def generator(kind):
    return pipeline("mask-generation", model=build_model(kind), image_processor=HfVlSamImageProcessor(size=IMAGE_SIZE))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_runs_without_unsupported_model_warnings(kind, image):
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generator = pipeline(
                "mask-generation", model=build_model(kind), image_processor=HfVlSamImageProcessor(size=IMAGE_SIZE)
            )
            out = generator(image, points_per_batch=8, points_per_crop=POINTS_PER_SIDE, **KEEP_ALL)
    finally:
        logger.removeHandler(records)
    messages = records.messages + [str(w.message) for w in caught]
    assert not [m for m in messages if "not supported" in m], messages
    assert set(out) == {"masks", "scores"} and len(out["masks"]) == len(out["scores"]) >= 1
    assert all(mask.shape == (32, 48) and mask.dtype == torch.bool for mask in out["masks"])
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])  # NMS returns them best first


def grid_points(height: int, width: int) -> np.ndarray:
    """segment_anything's ``build_point_grid`` in original pixels: (n*n, 2) cell centres, x fastest."""
    centres = (np.arange(POINTS_PER_SIDE) + 0.5) / POINTS_PER_SIDE
    xs, ys = np.meshgrid(centres * width, centres * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def test_masks_are_the_predictors_masks_for_the_grid(kind, generator, image):
    out = generator(image, points_per_batch=16, points_per_crop=POINTS_PER_SIDE, **KEEP_ALL)
    predictor = HfVlSamPredictor(generator.model, HfVlSamProcessor(generator.image_processor))
    predictor.set_image(image)
    points = grid_points(32, 48)[:, None]  # (16, 1, 2): one point per prompt, as the pipeline
    masks, scores, _ = predictor.predict(points=points, labels=np.ones((16, 1), dtype=np.int64))
    candidates = torch.from_numpy(masks.reshape(-1, 32, 48))  # (48, H, W): 16 prompts x 3 masks
    candidate_scores = torch.from_numpy(scores.reshape(-1))
    assert len(out["masks"]) == len(candidates)  # nothing filtered: every mask comes back
    torch.testing.assert_close(out["scores"], candidate_scores.sort(descending=True).values, atol=1e-4, rtol=0)
    for mask, score in zip(out["masks"], out["scores"]):
        # the same prompt decoded in a (1, P) or a (P, 1) batch: equal up to float rounding
        union = (mask | candidates).sum((1, 2))
        iou = torch.where(union > 0, (mask & candidates).sum((1, 2)) / union.clamp(min=1), 1.0)
        close = (iou > 0.99) & ((candidate_scores - score).abs() < 1e-4)
        assert close.any(), f"pipeline mask with score {score:.5f} is none of the predictor's"


def test_points_per_batch_does_not_change_results(generator, image):
    one = generator(image, points_per_batch=16, points_per_crop=POINTS_PER_SIDE, **KEEP_ALL)
    many = generator(image, points_per_batch=3, points_per_crop=POINTS_PER_SIDE, **KEEP_ALL)
    torch.testing.assert_close(many["scores"], one["scores"], atol=1e-5, rtol=0)
    for a, b in zip(many["masks"], one["masks"]):
        assert (a == b).float().mean() > 0.999


def test_crops_and_rle_output(generator, image):
    out = generator(
        image, points_per_batch=16, points_per_crop=2, crops_n_layers=1, output_rle_mask=True, output_bboxes_mask=True,
        **KEEP_ALL,
    )  # fmt: skip
    assert len(out["masks"]) == len(out["rle_mask"]) == len(out["bounding_boxes"]) >= 1
    for mask, rle, box in zip(out["masks"], out["rle_mask"], out["bounding_boxes"]):
        assert mask.shape == (32, 48) and rle["size"] == [32, 48] and sum(rle["counts"]) == 32 * 48
        if mask.any():
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]


def test_saved_directory_loads_by_task(tmp_path, image):
    """Needs the "sam" registry row with image_processor_class=HfVlSamImageProcessor (resolved by name on load)."""
    model = build_model("hf_vl" if HAS_HF_VL_SAM else "transformers")
    model.save_pretrained(tmp_path)
    HfVlSamImageProcessor(size=IMAGE_SIZE).save_pretrained(tmp_path)
    generator = pipeline("mask-generation", model=str(tmp_path))
    assert type(generator.image_processor) is HfVlSamImageProcessor and type(generator.model) is type(model)
    out = generator(image, points_per_batch=16, points_per_crop=2, **KEEP_ALL)
    assert len(out["masks"]) >= 1


@pytest.mark.parametrize("filters", ["none", "iou", "stability", "nms"])
def test_fast_mask_filtering_equals_transformers_image_processor(kind, image, filters):
    """HfVlSamImageProcessor's filter_masks / post_process_for_mask_generation (hf_vl's vectorised mask ops) give the
    stock pipeline the same masks, scores and boxes as transformers' own SamImageProcessor, each filter on and off."""
    from transformers import SamImageProcessor

    model = build_model(kind)
    reference_processor = SamImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        mask_size={"longest_edge": IMAGE_SIZE // 4}, mask_pad_size={"height": IMAGE_SIZE // 4, "width": IMAGE_SIZE // 4},
    )  # fmt: skip
    ours = pipeline("mask-generation", model=model, image_processor=HfVlSamImageProcessor(size=IMAGE_SIZE))
    reference = pipeline("mask-generation", model=model, image_processor=reference_processor)
    kwargs = dict(points_per_crop=POINTS_PER_SIDE, points_per_batch=16, output_rle_mask=True, output_bboxes_mask=True)
    everything = reference(image, **kwargs, **KEEP_ALL)
    thresholds = dict(KEEP_ALL)
    if filters == "iou":
        thresholds.update(pred_iou_thresh=float(np.median(everything["scores"])))
    elif filters == "stability":  # random weights give logits near 0: a small offset makes the filter bite
        thresholds.update(stability_score_thresh=0.95, stability_score_offset=1e-3)
    elif filters == "nms":
        thresholds.update(crops_nms_thresh=0.7)
    got, expected = ours(image, **kwargs, **thresholds), reference(image, **kwargs, **thresholds)
    assert len(got["masks"]) == len(expected["masks"]) > 0
    assert (filters == "none") == (len(expected["masks"]) == len(everything["masks"]))  # the filters did bite
    order_got, order_expected = np.argsort(-np.asarray(got["scores"])), np.argsort(-np.asarray(expected["scores"]))
    np.testing.assert_allclose(np.asarray(got["scores"])[order_got], np.asarray(expected["scores"])[order_expected],
                               atol=1e-6)  # fmt: skip
    for i, j in zip(order_got, order_expected):
        np.testing.assert_array_equal(np.asarray(got["masks"][i]), np.asarray(expected["masks"][j]))
        np.testing.assert_array_equal(np.asarray(got["bounding_boxes"][i]), np.asarray(expected["bounding_boxes"][j]))
