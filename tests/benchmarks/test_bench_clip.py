"""The CLIP benchmark still runs: ``benchmarks/bench_clip.py`` imported and run on toy-size models, one round.

No timing is asserted; the three implementations' embedding agreement is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_clip.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_clip", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_agrees_with_references(bench):
    rows = bench.run(cases=(("fp32", 2),), pairs=1, warmup=0, build=bench.build_tiny_models)
    assert rows, "no benchmark rows"
    for row in rows:
        diffs = {key: value for key, value in row.items() if key.startswith("max_diff_")}
        assert diffs and all(value < 1e-5 for value in diffs.values()), row
