"""The ViT benchmark still runs: ``benchmarks/bench_vit.py`` imported and run on a tiny config, one round per case.

No timing is asserted (the suite runs on shared machines); the weight conversion and the logit agreement are.
"""

from __future__ import annotations

import pytest
import torch
from common.testing_utils import load_benchmark

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
    num_labels=10,
)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_vit")


def test_tiny_run_rows_and_agreement(bench):
    cases = (("fp32", 1), ("bf16", 2))
    rows = bench.run(TINY, cases=cases, pairs=1, warmup=1)
    assert [row["case"] for row in rows] == ["fp32 b1", "bf16 b2"]
    for row in rows:
        for name in ("transformers", "hf_vl", "timm"):
            assert row[f"{name}_s"] > 0
        assert row["ratio_transformers"] > 0 and row["ratio_timm"] > 0
        assert row["threads"] == torch.get_num_threads()
    # same weights, same photographs: fp32 logits agree to rounding, bf16 ones to bf16 precision
    assert rows[0]["max_diff_transformers"] < 1e-4 and rows[0]["max_diff_timm"] < 1e-4
    assert rows[1]["max_diff_transformers"] < 0.1 and rows[1]["max_diff_timm"] < 0.1
    assert set(rows[1]["err_vs_fp32"]) == {"transformers", "hf_vl", "timm"}
    table = bench.format_rows(rows)
    assert "fp32 b1" in table and "bf16 b2" in table and len(table.splitlines()) == 3


def test_weight_conversion_is_exact(bench):
    models = bench.build_models(TINY, with_timm=True)
    pixels = bench.photo_batch(2, TINY["image_size"])
    with torch.no_grad():
        logits = {name: model(pixels) for name, model in models.items()}
    reference = logits["transformers"].logits
    torch.testing.assert_close(logits["hf_vl"].logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["timm"], reference, atol=1e-5, rtol=1e-5)
    # a wrong mapping (q and k swapped) must show up as a logit difference
    state = models["hf_vl"].state_dict()
    q, k = "vit.encoder.layers.0.self_attn.q_proj.weight", "vit.encoder.layers.0.self_attn.k_proj.weight"
    state[q], state[k] = state[k].clone(), state[q].clone()
    models["hf_vl"].load_state_dict(state)
    with torch.no_grad():
        assert (models["hf_vl"](pixels).logits - reference).abs().max() > 1e-4


def test_photo_batch_is_normalised_photographs(bench):
    pixels = bench.photo_batch(4, 48)
    assert pixels.shape == (4, 3, 48, 48) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0
    # image 3 is image 0 mirrored
    torch.testing.assert_close(pixels[3], pixels[0].flip(-1), atol=0.05, rtol=0)


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="pairs"):
        bench.run(TINY, pairs=0)
    with pytest.raises(ValueError, match="bad case"):
        bench.run(TINY, cases=(("fp16", 1),), pairs=1)
