"""The SAM model benchmark still runs: ``benchmarks/bench_sam.py`` imported and run on its tiny config, one round
per case. No timing is asserted (the suite runs on shared machines); the rows, the weight conversion and the
agreement of the three implementations are."""

from __future__ import annotations

import pytest
import torch
from common.testing_utils import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_sam")


@pytest.fixture(scope="module")
def models(bench):
    pytest.importorskip("segment_anything")
    return bench.build_models(bench.TINY)


def test_quick_run_rows_and_agreement(bench, models):
    rows = bench.run(bench.TINY, rounds=1, encoder_rounds=1, warmup=0, models=models)
    assert [row["case"] for row in rows] == [f"{kind} {dtype}" for kind in bench.KINDS for dtype in ("fp32", "bf16")]
    rows = {row["case"]: row for row in rows}
    for row in rows.values():
        assert row["hf_vl_s"] > 0 and row["transformers_s"] > 0 and row["ratio_transformers"] > 0
        assert row["threads"] == torch.get_num_threads()
    # same weights, same photograph: fp32 agrees to rounding, bf16 to bf16 precision
    for case in ("enc fp32", "dec1 fp32", "dec64 fp32"):
        assert rows[case]["max_diff_transformers"] < 1e-4 and rows[case]["max_diff_segment_anything"] < 1e-4
    for case in ("enc bf16", "dec1 bf16", "dec64 bf16"):
        assert rows[case]["max_diff_transformers"] < 0.1
    # segment-anything's prompt encoder cannot run in bf16: no reference column there
    assert "segment_anything_s" in rows["enc bf16"] and "segment_anything_s" not in rows["dec64 bf16"]
    table = bench.format_rows(list(rows.values()))
    assert len(table.splitlines()) == 7 and "dec64 bf16" in table


def test_the_decoders_see_the_same_prompts(bench, models):
    """A wrong weight mapping must show as a difference: swap two hypernetwork heads in the transformers model."""
    embedding = torch.randn(1, bench.TINY["prompt_dim"], 8, 8, generator=torch.Generator().manual_seed(0))
    calls = bench.decoder_calls(models, embedding, prompts=4)
    with torch.no_grad():
        outputs = {name: call() for name, call in calls.items()}
        assert bench._max_diff(outputs["transformers"], outputs["hf_vl"]) < 1e-4
        heads = models["transformers"].mask_decoder.output_hypernetworks_mlps
        saved = heads[1].proj_out.weight.clone()
        heads[1].proj_out.weight.copy_(heads[2].proj_out.weight)
        try:
            assert bench._max_diff(calls["transformers"](), outputs["hf_vl"]) > 1e-4
        finally:
            heads[1].proj_out.weight.copy_(saved)


def test_grid_points_and_bad_arguments(bench):
    points, labels = bench.grid_points(64, 1024)
    assert points.shape == (1, 64, 1, 2) and labels.shape == (1, 64, 1) and (labels == 1).all()
    assert points.min() == 64 and points.max() == 1024 - 64 and len(torch.unique(points[..., 0])) == 8
    with pytest.raises(ValueError, match="rounds"):
        bench.run(bench.TINY, rounds=0)
    with pytest.raises(ValueError, match="bad case"):
        bench.run(bench.TINY, cases=(("enc", "fp16"),))
