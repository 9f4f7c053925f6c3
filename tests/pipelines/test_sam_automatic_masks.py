"""HfVlSamAutomaticMaskGenerator against segment-anything's SamAutomaticMaskGenerator on the same random weights.

The reference model is a tiny segment-anything ``Sam`` whose random weights are edited (``vary_masks`` in
benchmarks/bench_sam_amg.py) so grid prompts give varied, blob-like masks. The parity tests run hf_vl's generator
on that very model (through ``SegmentAnythingAsSamModel``), so they measure the generator alone;
``test_converted_model_matches_reference`` runs it on the converted model (hf_vl's HfVlSamModel when its converter
exists, else transformers' SamModel). Records are matched
by prompt point and mask: each reference record needs one of ours with mask IoU >= 0.99 and predicted IoU and
stability score within 1e-3, and the other way round, with equal counts.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from common.testing_utils import load_benchmark

from hf_vl.pipelines import sam_automatic_masks as amg
from hf_vl.pipelines.sam_automatic_masks import HfVlSamAutomaticMaskGenerator
from hf_vl.processing import sam_mask_ops as ops

# thresholds for the edited random weights: predicted IoUs lie in about [-0.01, 0.04], stability (offset 0.1) in
# [0, 0.75]; these keep roughly a third of the candidates
FILTERS = dict(pred_iou_thresh=0.01, stability_score_thresh=0.3, stability_score_offset=0.1)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sam_amg")


@pytest.fixture(scope="module")
def models(bench):
    sam = bench.vary_masks(bench.build_segment_anything(bench.TINY, seed=0))
    return dict(
        reference=sam,
        # hf_vl's generator on the reference's own model: any difference is the generator's
        same=bench.SegmentAnythingAsSamModel(sam).eval(),
        # ... and on the converted model users run (HfVlSamModel, or transformers' SamModel until it exists)
        ours=bench.build_models_from(sam, bench.TINY)["amg_model"],
    )


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(skimage.data.astronaut()[::3, ::3])  # (171, 171, 3)


@pytest.fixture(scope="module")
def wide_photo():
    return np.ascontiguousarray(skimage.data.chelsea()[::2])  # (150, 451, 3): crops are not square


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_records_match(
    reference: list[dict], ours: list[dict], mask_iou: float = 0.99, score_tol: float = 1e-3, stability_tol=None
):
    """Equal counts; every record of each side has a partner (same point, scores within ``score_tol``, best mask
    IoU >= ``mask_iou``) on the other side."""
    assert len(ours) == len(reference), (len(ours), len(reference))
    for side, other in ((reference, ours), (ours, reference)):
        for record in side:
            partners = [r for r in other if np.allclose(r["point_coords"], record["point_coords"], atol=1e-4)]
            assert partners, f"no record for point {record['point_coords']}"

            def key(r):
                close = abs(r["predicted_iou"] - record["predicted_iou"]) <= score_tol
                return (not close, -_mask_iou(r["segmentation"], record["segmentation"]))

            best = min(partners, key=key)
            assert _mask_iou(best["segmentation"], record["segmentation"]) >= mask_iou
            assert abs(best["predicted_iou"] - record["predicted_iou"]) <= score_tol
            assert abs(best["stability_score"] - record["stability_score"]) <= (stability_tol or score_tol)
            assert best["crop_box"] == record["crop_box"]
            assert np.abs(np.subtract(best["bbox"], record["bbox"])).max() <= 1
            assert abs(best["area"] - record["area"]) <= 0.01 * record["area"] + 1


def _pair(models, model="same", **kwargs):
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(models["reference"], **kwargs), HfVlSamAutomaticMaskGenerator(
        models[model], **kwargs
    )


# ----------------------------------------------------------------------------------------------- parity
def test_matches_reference_before_nms(models, photo):
    """box_nms_thresh=1 keeps every filtered candidate: a record-by-record check of decoding and all filters."""
    reference, ours = _pair(models, points_per_side=16, box_nms_thresh=1.0, **FILTERS)
    ref_records, our_records = reference.generate(photo), ours.generate(photo)
    assert 100 < len(ref_records) < 700  # the filters keep a meaningful, not total, share of 768 candidates
    assert_records_match(ref_records, our_records)
    keys = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
    assert all(set(r) == keys for r in our_records)
    sample = our_records[0]
    assert sample["segmentation"].shape == photo.shape[:2] and sample["segmentation"].dtype == bool
    assert sample["area"] == int(sample["segmentation"].sum())
    assert all(r["predicted_iou"] > 0.01 and r["stability_score"] >= 0.3 for r in our_records)


def test_converted_model_matches_reference(models, photo):
    """End to end with the converted model."""
    reference, ours = _pair(models, model="ours", points_per_side=16, box_nms_thresh=1.0, **FILTERS)
    ref_records, our_records = reference.generate(photo), ours.generate(photo)
    assert len(ref_records) > 100
    # hf_vl's HfVlSamModel reproduces segment-anything's logits to ~1e-7; transformers' SamModel (the stand-in
    # before it existed) to ~1e-4, which moves a few pixels across the stability cut-offs in flat logit regions
    stability_tol = 1e-3 if type(models["ours"]).__name__ == "HfVlSamModel" else 5e-3
    assert_records_match(ref_records, our_records, stability_tol=stability_tol)


def test_converted_model_matches_reference_factored(models, photo, monkeypatch):
    """The same with the decoder's factored path (``modeling_hf_vl_sam_factored``) forced on: the tiny model's sizes
    never take it by default, vit_b's do."""
    from hf_vl.modeling import modeling_hf_vl_sam_decoder as decoder_module
    from hf_vl.modeling import modeling_hf_vl_sam_factored as factored_module

    if type(models["ours"]).__name__ != "HfVlSamModel":
        pytest.skip("the factored path is HfVlSamModel's")
    calls, original = [], decoder_module.FactoredImage
    monkeypatch.setattr(factored_module, "FACTOR_BELOW", float("inf"))
    monkeypatch.setattr(decoder_module, "FactoredImage", lambda *args: calls.append(1) or original(*args))
    reference, ours = _pair(models, model="ours", points_per_side=16, box_nms_thresh=1.0, **FILTERS)
    ref_records, our_records = reference.generate(photo), ours.generate(photo)
    assert len(ref_records) > 100 and calls
    assert_records_match(ref_records, our_records)


def test_matches_reference_with_nms(models, photo):
    reference, ours = _pair(models, points_per_side=16, box_nms_thresh=0.7, **FILTERS)
    ref_records, our_records = reference.generate(photo), ours.generate(photo)
    assert len(ref_records) >= 5
    assert_records_match(ref_records, our_records)
    # NMS order: highest predicted IoU first
    scores = [r["predicted_iou"] for r in our_records]
    assert scores == sorted(scores, reverse=True)


def test_matches_reference_with_crops(models, wide_photo):
    kwargs = dict(points_per_side=16, crop_n_layers=1, crop_n_points_downscale_factor=2, crop_overlap_ratio=0.3,
                  box_nms_thresh=0.9, crop_nms_thresh=0.9)
    reference, ours = _pair(models, **kwargs, **FILTERS)
    ref_records, our_records = reference.generate(wide_photo), ours.generate(wide_photo)
    assert len(ref_records) >= 5
    # masks from the whole image and from a crop away from the origin (so un-cropping is exercised) survive
    assert any(r["crop_box"] == [0, 0, 451, 150] for r in ref_records)
    assert any(r["crop_box"][0] > 0 and r["crop_box"][1] > 0 for r in ref_records)
    assert_records_match(ref_records, our_records)


def test_matches_reference_with_small_region_removal(models, photo, monkeypatch):
    """segment-anything's small-region removal needs OpenCV (not installed): its cv2 step is swapped for the naive
    scipy version of tests/processing/test_sam_mask_ops.py, so the rest of its logic is still the reference."""
    import sys

    import segment_anything.automatic_mask_generator as reference_module

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "processing"))
    try:
        from test_sam_mask_ops import _naive_remove_small_regions
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(reference_module, "remove_small_regions", _naive_remove_small_regions)
    monkeypatch.setitem(sys.modules, "cv2", object())  # the reference imports cv2 only to check it is there
    kwargs = dict(points_per_side=16, box_nms_thresh=0.9, min_mask_region_area=150, **FILTERS)
    reference, ours = _pair(models, **kwargs)
    ref_records, our_records = reference.generate(photo), ours.generate(photo)
    assert_records_match(ref_records, our_records)
    # the removal changed something: some masks differ from the unprocessed ones
    plain = HfVlSamAutomaticMaskGenerator(models["same"], **dict(kwargs, min_mask_region_area=0)).generate(photo)
    changed = [r for r in our_records if not any((r["segmentation"] == p["segmentation"]).all() for p in plain)]
    assert changed
    for record in our_records:  # no hole below the area is left in any returned mask
        assert not ops.remove_small_regions(record["segmentation"], 150, "holes")[1]


# ----------------------------------------------------------------------------------------------- outputs
def test_output_modes_round_trip(models, photo):
    from pycocotools import mask as mask_utils

    kwargs = dict(points_per_side=8, **FILTERS)
    binary = HfVlSamAutomaticMaskGenerator(models["ours"], **kwargs).generate(photo)
    rle = HfVlSamAutomaticMaskGenerator(models["ours"], output_mode="uncompressed_rle", **kwargs).generate(photo)
    coco = HfVlSamAutomaticMaskGenerator(models["ours"], output_mode="coco_rle", **kwargs).generate(photo)
    assert len(binary) == len(rle) == len(coco) >= 3
    for b, r, c in zip(binary, rle, coco):
        mask = b["segmentation"]
        assert r["segmentation"]["size"] == list(mask.shape)
        assert (ops.rle_to_mask(r["segmentation"]) == mask).all()
        assert isinstance(c["segmentation"]["counts"], str)
        assert (mask_utils.decode({**c["segmentation"], "counts": c["segmentation"]["counts"].encode()}) == mask).all()
        # the same string segment-anything's coco_encode_rle would write for this mask
        from segment_anything.utils.amg import coco_encode_rle

        assert coco_encode_rle(r["segmentation"]) == c["segmentation"]
        assert b["area"] == r["area"] == c["area"] == ops.area_from_rle(r["segmentation"])


def test_list_of_images_equals_one_by_one(models, photo, wide_photo):
    generator = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, image_batch_size=3, **FILTERS)
    flipped = np.ascontiguousarray(photo[:, ::-1])
    together = generator.generate([photo, wide_photo, flipped])
    assert isinstance(together, list) and len(together) == 3
    for image, records in zip([photo, wide_photo, flipped], together):
        alone = generator.generate(image)
        assert len(alone) > 0
        assert_records_match(alone, records, mask_iou=0.999, score_tol=1e-5)
    # the mirrored photo gets mirrored-looking but not identical masks: results are not mixed up between images
    assert not all((a["segmentation"] == b["segmentation"]).all() for a, b in zip(together[0], together[2]))


def test_generator_keeps_the_encoder_mask_buffer_between_calls(models, photo, wide_photo):
    """With hf_vl's SAM the generator hands its encoder one workspace for every call: the mask buffer is mapped once
    (reused by later images and by a batch of two), and the records equal those of a generator that maps it per
    call. A SAM-like model without ``rel_pos_workspace`` gets none."""
    kept = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, image_batch_size=2, **FILTERS)
    per_call = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, image_batch_size=2, **FILTERS)
    per_call._encoder_workspace = None
    first = kept.generate(photo)
    (buffer,) = kept._encoder_workspace.values()
    assert kept.generate(wide_photo) and next(iter(kept._encoder_workspace.values())) is buffer
    both = kept.generate([photo, wide_photo])  # one encoder call for both: still one image's mask
    assert next(iter(kept._encoder_workspace.values())) is buffer
    assert_records_match(per_call.generate(photo), first, mask_iou=1.0, score_tol=0.0)
    assert_records_match(per_call.generate([photo, wide_photo])[1], both[1], mask_iou=1.0, score_tol=0.0)
    assert HfVlSamAutomaticMaskGenerator(models["same"], points_per_side=8)._encoder_workspace is None


def test_bfloat16_close_to_float32(models, photo, monkeypatch):
    kwargs = dict(points_per_side=8, box_nms_thresh=1.0, **FILTERS)
    upsampled, upsample = [], ops.upsample_logits

    def spy(*args, **kw):
        upsampled.append(kw.get("dtype"))
        return upsample(*args, **kw)

    monkeypatch.setattr(ops, "upsample_logits", spy)
    fp32 = HfVlSamAutomaticMaskGenerator(models["ours"], **kwargs).generate(photo)
    assert upsampled and set(upsampled) == {torch.float32}
    upsampled.clear()
    generator = HfVlSamAutomaticMaskGenerator(models["ours"], dtype=torch.bfloat16, **kwargs)
    bf16 = generator.generate(photo)
    assert upsampled and set(upsampled) == {torch.bfloat16}  # the candidates' upsampling in bf16 too
    assert next(models["ours"].parameters()).dtype == torch.float32  # the given model is not converted
    assert next(generator.model.parameters()).dtype == torch.bfloat16
    assert all(isinstance(r["predicted_iou"], float) for r in bf16)
    assert 0.5 * len(fp32) <= len(bf16) <= 2 * len(fp32)
    # most float32 masks have a close bf16 counterpart from the same point
    matched = 0
    for record in fp32:
        partners = [r for r in bf16 if r["point_coords"] == record["point_coords"]]
        matched += any(_mask_iou(r["segmentation"], record["segmentation"]) > 0.9 for r in partners)
    assert matched >= 0.7 * len(fp32)
    assert set(generator.last_timings) == {"encode", "decode", "filter", "output"}


def test_explicit_point_grids_equal_points_per_side(models, photo):
    by_side = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, **FILTERS).generate(photo)
    grid = [ops.build_point_grid(8)]
    by_grid = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=None, point_grids=grid, **FILTERS)
    assert_records_match(by_side, by_grid.generate(photo), score_tol=1e-6)


def test_points_per_batch_does_not_change_results(models, photo):
    small = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, points_per_batch=7, **FILTERS)
    large = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, points_per_batch=64, **FILTERS)
    assert_records_match(small.generate(photo), large.generate(photo), mask_iou=0.999, score_tol=1e-5)


def test_iou_gate_skips_upscaling_and_keeps_the_records(models, photo, monkeypatch):
    """hf_vl's model skips the upscaling of prompts whose IoU predictions all fail pred_iou_thresh: same records."""
    filters = dict(FILTERS, pred_iou_thresh=0.025)  # every prompt has a mask above FILTERS' 0.01; some fail this
    gated = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, **filters)
    plain = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, **filters)
    plain._iou_gate = False
    assert gated._iou_gate
    decoder = models["ours"].mask_decoder
    rows, original = [], decoder.upscale

    def counted(states, first=None):
        rows.append(len(first if states is None else states))
        return original(states, first)

    monkeypatch.setattr(decoder, "upscale", counted)
    expected = plain.generate(photo)
    assert sum(rows) == 64
    rows.clear()
    records = gated.generate(photo)
    assert 0 < sum(rows) < 64  # some of the 64 prompts upscaled, not all
    assert expected and len(records) == len(expected)
    assert_records_match(expected, records, mask_iou=0.999, score_tol=1e-6)
    assert not HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, pred_iou_thresh=0.0)._iou_gate
    assert not HfVlSamAutomaticMaskGenerator(models["same"], points_per_side=8, **FILTERS)._iou_gate  # no such arg


def test_decode_workers_give_the_sequential_records(models, photo, monkeypatch):
    """Point batches decoded on worker threads (one intra-op thread each): the records of one batch after another."""
    sequential = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, points_per_batch=7,
                                               decode_workers=1, **FILTERS)  # fmt: skip
    threaded = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, points_per_batch=7,
                                             decode_workers=3, **FILTERS)  # fmt: skip
    expected = sequential.generate(photo)
    callers, decode = [], HfVlSamAutomaticMaskGenerator._decode
    monkeypatch.setattr(HfVlSamAutomaticMaskGenerator, "_decode",
                        lambda self, *a: callers.append(threading.get_ident()) or decode(self, *a))  # fmt: skip
    threads = torch.get_num_threads()
    records = threaded.generate(photo)
    assert len(callers) == 22 and len(set(callers)) > 1  # 64 points, 3 at a time (7 split 3 ways), on 3 threads
    assert torch.get_num_threads() == threads  # the caller's intra-op threads as they were
    assert expected and len(records) == len(expected)
    assert_records_match(expected, records, mask_iou=0.999, score_tol=1e-5)
    assert set(threaded.last_timings) == {"encode", "decode", "filter", "output"}
    for bad, error in ((0, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError)):
        with pytest.raises(error, match="decode_workers"):
            HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, decode_workers=bad)


def test_default_decode_workers(models, monkeypatch):
    generator = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8)
    for threads, workers in ((1, 1), (2, 2), (8, amg.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(amg.torch, "get_num_threads", lambda: threads)
        assert generator._workers() == workers
    assert HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=8, decode_workers=3)._workers() == 3


def test_nothing_survives_gives_empty_list(models, photo):
    generator = HfVlSamAutomaticMaskGenerator(models["ours"], points_per_side=4, pred_iou_thresh=0.99)
    assert generator.generate(photo) == []
    assert generator.generate([photo, photo]) == [[], []]


def test_bad_arguments(models, photo):
    model = models["ours"]
    with pytest.raises(ValueError, match="points_per_side"):
        HfVlSamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="points_per_side"):
        HfVlSamAutomaticMaskGenerator(model, points_per_side=8, point_grids=[ops.build_point_grid(4)])
    with pytest.raises(ValueError, match="point_grids"):
        HfVlSamAutomaticMaskGenerator(
            model, points_per_side=None, point_grids=[ops.build_point_grid(4)], crop_n_layers=1
        )
    with pytest.raises(ValueError, match="output_mode"):
        HfVlSamAutomaticMaskGenerator(model, output_mode="polygons")
    with pytest.raises(ValueError, match="points_per_batch"):
        HfVlSamAutomaticMaskGenerator(model, points_per_batch=0)
    generator = HfVlSamAutomaticMaskGenerator(model, points_per_side=4)
    with pytest.raises(ValueError, match="images"):
        generator.generate([])
    with pytest.raises(ValueError, match="uint8"):
        generator.generate(photo.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        generator.generate(photo[..., 0])
    with pytest.raises(TypeError, match="images"):
        generator.generate("not an image")


def test_image_processor_preprocessing_is_close(models, photo):
    """An image processor (hf_vl's SAM one; transformers' before it existed) instead of the built-in PIL path:
    resizing differs by a fraction of a grey level, so the masks barely move."""
    try:
        from hf_vl.processing.image_processing_hf_vl_sam import HfVlSamImageProcessor as Processor
    except ImportError:
        from transformers import SamImageProcessor as Processor
    size = models["same"].config.vision_config.image_size
    processor = Processor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    kwargs = dict(points_per_side=8, box_nms_thresh=1.0, **FILTERS)
    default = HfVlSamAutomaticMaskGenerator(models["same"], **kwargs).generate(photo)
    processed = HfVlSamAutomaticMaskGenerator(models["same"], image_processor=processor, **kwargs).generate(photo)
    assert len(default) > 20 and abs(len(processed) - len(default)) <= 0.1 * len(default)
    close = 0
    for record in default:
        partners = [r for r in processed if r["point_coords"] == record["point_coords"]]
        close += any(_mask_iou(r["segmentation"], record["segmentation"]) > 0.95 for r in partners)
    assert close >= 0.9 * len(default)
