"""The CLIP benchmark still runs: ``benchmarks/bench_clip.py`` imported and run on toy-size models, one round.

No timing is asserted; the three implementations' embedding agreement is.
"""

from __future__ import annotations

import pytest
from common.testing_utils import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_clip")


def test_tiny_run_agrees_with_references(bench):
    rows = bench.run(cases=(("fp32", 2),), pairs=1, warmup=0, build=bench.build_tiny_models)
    assert rows, "no benchmark rows"
    for row in rows:
        diffs = {key: value for key, value in row.items() if key.startswith("max_diff_")}
        assert diffs and all(value < 1e-5 for value in diffs.values()), row


@pytest.mark.parametrize("padding", ["context", "longest"])
def test_both_paddings_agree_with_references(bench, padding):
    """Texts padded to the 77-token context (hf_vl's text tower stops early there) or to the longest sentence: the
    same embeddings as open_clip's and transformers' either way."""
    inputs = bench.make_inputs(2, 32, padding)
    assert (inputs["input_ids"].shape[1] == 77) == (padding == "context")
    rows = bench.run(cases=(("fp32", 2),), pairs=1, warmup=0, build=bench.build_tiny_models, padding=padding)
    for row in rows:
        diffs = {key: value for key, value in row.items() if key.startswith("max_diff_")}
        assert diffs and all(value < 1e-5 for value in diffs.values()), row
    with pytest.raises(ValueError, match="padding"):
        bench.make_inputs(2, 32, "max")
