"""Helpers every benchmark uses (``/work/shared/docs/benchmarks.md``): the timing loop (warm-up calls, then
interleaved rounds, so that a machine's drifting load hits every implementation alike and per-round ratios stay
meaningful), the ``--cases dtype:batch,...`` argument and a line describing the host's matrix throughput."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Wall times of each call: ``warmup`` untimed calls each, then ``rounds`` rounds calling them in turn."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def parse_dtype_batch_cases(text: str) -> tuple[tuple[str, int], ...]:
    """``--cases`` of the ViT/CLIP/DETR benchmarks: ``"fp32:1,bf16:8"`` -> ``(("fp32", 1), ("bf16", 8))``."""
    try:
        return tuple((dtype, int(batch)) for dtype, batch in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected dtype:batch[,dtype:batch...], got {text!r}") from None


def gemm_tflops(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` TFLOP/s of a ``size``^3 CPU matrix product in ``dtype`` (2 FLOPs per multiply-add), with
    the current thread count: the ceiling every matmul-bound case of a benchmark runs under."""
    left, right = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    left @ right  # warm-up: oneDNN/MKL pick and cache their kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from ``cpuinfo`` (Linux's format; empty where there is no such file, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def host_line(size: int = 2048, flags: set[str] | None = None) -> str:
    """One line for a benchmark's header: fp32 and bf16 GEMM throughput and whether the CPU has AMX tiles.

    The targets in benchmarks.md were set on AMX hosts, where a bf16 GEMM runs ~7x an fp32 one; on AVX-512-bf16-only
    CPUs the factor is ~2x, so bf16 ratios against references that are themselves matmul-bound cannot reach the same
    figures there. Printing the ceiling with every run says which kind of host a table came from."""
    fp32, bf16 = gemm_tflops(torch.float32, size), gemm_tflops(torch.bfloat16, size)
    flags = cpu_flags() if flags is None else flags

    def has(flag: str) -> str:  # "unknown" where no flags could be read at all
        return "yes" if flag in flags else ("no" if flags else "unknown")

    return (f"host: {size}^3 GEMM fp32 {fp32:.2f} TFLOP/s, bf16 {bf16:.2f} TFLOP/s ({bf16 / fp32:.1f}x), "
            f"AMX {has('amx_bf16')}, AVX-512 bf16 {has('avx512_bf16')}, {torch.get_num_threads()} threads")
