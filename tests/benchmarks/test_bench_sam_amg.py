"""The SAM automatic-mask benchmark still runs: ``benchmarks/bench_sam_amg.py`` imported and run on its tiny config
with a 4x4 grid, one round, no warm-up. No timing is asserted (shared machines); the rows, the weight conversion and
the agreement with segment-anything's records are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common.testing_utils import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sam_amg")


@pytest.mark.slow  # ~20 s: four generators, a transformers pipeline and three model builds
def test_tiny_run_rows_and_agreement(bench):
    image = bench.photo(scale=4)
    result = bench.run(bench.TINY, grid=4, image=image, rounds=1, warmup=0, parity_grid=6)
    names = [row["name"] for row in result["rows"]]
    assert names == ["segment_anything", "transformers_pipeline", "hf_vl_fp32", "hf_vl_bf16"]
    rows = {row["name"]: row for row in result["rows"]}
    assert all(row["seconds"] > 0 for row in rows.values())
    assert rows["segment_anything"]["x_vs_hf_vl_fp32"] > 0 and rows["transformers_pipeline"]["x_vs_hf_vl_bf16"] > 0
    # same weights: hf_vl fp32 reproduces every reference record
    assert rows["hf_vl_fp32"]["n_ref"] > 0
    assert rows["hf_vl_fp32"]["matched"] == 1.0 and rows["hf_vl_fp32"]["n"] == rows["hf_vl_fp32"]["n_ref"]
    assert rows["segment_anything"]["matched"] == 1.0  # the reference against itself
    assert set(result["stages"]["hf_vl_fp32"]) == {"encode", "decode", "filter", "output"}
    assert result["image_shape"] == image.shape and result["threads"] == torch.get_num_threads()
    table = bench.format_result(result)
    assert len(table.splitlines()) == 1 + 4 + 2 + 1 and "hf_vl_bf16" in table and "box NMS off" in table
    # every candidate (box NMS off) of hf_vl fp32 equals segment-anything's from the same grid point
    parity = result["parity"]
    assert parity["grid"] == 6 and parity["n_ref"] > rows["hf_vl_fp32"]["n_ref"] and parity["n"] == parity["n_ref"]
    assert parity["matched"] == 1.0 and parity["worst_iou"] >= 0.99 and parity["max_iou_diff"] <= 1e-3


def test_candidate_parity_finds_a_changed_record(bench):
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4] = True
    record = dict(segmentation=mask, predicted_iou=0.5, stability_score=0.9, point_coords=[[1.0, 2.0]])
    assert bench.candidate_parity([record], [dict(record)])["matched"] == 1.0
    assert bench.candidate_parity([record], [dict(record, predicted_iou=0.51)])["matched"] == 0.0
    assert bench.candidate_parity([record], [dict(record, segmentation=~mask)])["worst_iou"] == 0.0
    assert bench.candidate_parity([record], [dict(record, point_coords=[[3.0, 2.0]])])["matched"] == 0.0


def test_conversions_carry_the_weights(bench):
    sam = bench.vary_masks(bench.build_segment_anything(bench.TINY))
    models = bench.build_models_from(sam, bench.TINY)
    pixels = torch.randn(1, 3, bench.TINY["image_size"], bench.TINY["image_size"])
    points, labels = torch.tensor([[[[40.0, 70.0]]]]), torch.ones(1, 1, 1, dtype=torch.long)
    with torch.no_grad():
        embedding = sam.image_encoder(pixels)
        reference = bench.SegmentAnythingAsSamModel(sam)(embedding, points, labels)
        for name in ("transformers", "amg_model"):
            ours = models[name](image_embeddings=models[name].get_image_embeddings(pixels), input_points=points,
                                input_labels=labels)
            torch.testing.assert_close(ours.iou_scores, reference.iou_scores, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours.pred_masks, reference.pred_masks, atol=2e-3, rtol=1e-3)
    # a wrong mapping (two hypernetwork heads swapped) shows up
    state = bench.segment_anything_to_transformers_state(sam.state_dict())
    a, b = (f"mask_decoder.output_hypernetworks_mlps.{i}.proj_out.weight" for i in (1, 2))
    state[a], state[b] = state[b].clone(), state[a].clone()
    models["transformers"].load_state_dict(state)
    with torch.no_grad():
        swapped = models["transformers"](image_embeddings=embedding, input_points=points, input_labels=labels)
    assert (swapped.pred_masks - reference.pred_masks).abs().max() > 1e-2


def test_match_stats_detects_differences(bench):
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 2:6] = True
    record = dict(segmentation=mask, predicted_iou=0.5, stability_score=0.9)
    assert bench.match_stats([record], [dict(record)])["matched"] == 1.0
    shifted = dict(record, segmentation=np.roll(mask, 1, axis=0))
    assert bench.match_stats([record], [shifted])["matched"] == 0.0
    assert bench.match_stats([record], [dict(record, predicted_iou=0.6)])["matched"] == 0.0


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="rounds"):
        bench.run(bench.TINY, grid=4, rounds=0)
