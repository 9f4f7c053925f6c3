"""The DETR benchmark still runs: ``benchmarks/bench_detr.py`` imported and run on a tiny config (ResNet-18 trunk,
one layer each of width 32) at a small size, one round per case. No timing is asserted (shared machines); the weight
conversion and the agreement of logits and boxes are."""

from __future__ import annotations

import pytest
from transformers import ResNetConfig
from common.testing_utils import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_detr")


def tiny_config() -> dict:
    resnet18 = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                            out_features=["stage4"])  # fmt: skip
    return dict(use_pretrained_backbone=False, backbone_config=resnet18, d_model=32, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                decoder_ffn_dim=37, num_queries=5, num_labels=3)  # fmt: skip


def test_tiny_run_rows_and_agreement(bench):
    rows = bench.run(tiny_config(), cases=(("fp32", 1), ("bf16", 2)), size=(64, 96), pairs=1, warmup=1)
    assert [row["case"] for row in rows] == ["fp32 b1", "bf16 b2"]
    for row in rows:
        assert row["transformers_s"] > 0 and row["hf_vl_s"] > 0 and row["ratio"] > 0
    assert rows[0]["max_diff"] < 1e-4  # fp32: same weights, same answer
    assert rows[1]["err_vs_fp32"]["hf_vl"] < 0.1  # bf16 stays close to the fp32 reference
    assert "fp32 b1" in bench.format_rows(rows)


def test_bad_cases_are_clear_errors(bench):
    with pytest.raises(ValueError, match="bad case"):
        bench.run(tiny_config(), cases=(("fp16", 1),))
