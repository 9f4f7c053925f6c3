"""The benchmarks' shared helpers (``benchmarks/bench_timing.py``): the interleaved timing loop, the ``--cases``
argument and the host line every benchmark prints (GEMM ceiling, AMX or not). No speed is asserted."""

from __future__ import annotations

import argparse

import pytest
import torch
from common.testing_utils import load_benchmark


@pytest.fixture(scope="module")
def timing():
    return load_benchmark("bench_timing")


def test_interleaved_times_warms_up_then_alternates(timing):
    calls = []
    times = timing.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 2)
    assert calls == ["a", "b"] * 5
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    assert all(value >= 0 for values in times.values() for value in values)


def test_parse_cases(timing):
    assert timing.parse_dtype_batch_cases("fp32:1,bf16:8") == (("fp32", 1), ("bf16", 8))
    with pytest.raises(argparse.ArgumentTypeError, match="dtype:batch"):
        timing.parse_dtype_batch_cases("fp32")


def test_gemm_tflops_positive(timing):
    assert timing.gemm_tflops(torch.float32, size=64, repeats=1) > 0
    assert timing.gemm_tflops(torch.bfloat16, size=64, repeats=1) > 0


def test_cpu_flags_parses_cpuinfo(timing, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\nbugs\t\t: spectre\n")
    assert timing.cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "avx512_bf16"}
    assert timing.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    "flags, amx, avx512_bf16",
    [({"amx_bf16", "avx512_bf16"}, "yes", "yes"), ({"avx512_bf16"}, "no", "yes"), ({"sse2"}, "no", "no"),
     (set(), "unknown", "unknown")],
)
def test_host_line_names_the_bf16_units(timing, flags, amx, avx512_bf16):
    line = timing.host_line(size=64, flags=flags)
    assert line.startswith("host: 64^3 GEMM fp32 ")
    assert f"AMX {amx}, AVX-512 bf16 {avx512_bf16}, {torch.get_num_threads()} threads" in line
    assert "bf16" in line and "TFLOP/s" in line
