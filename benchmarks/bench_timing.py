"""Helpers every benchmark uses (``/work/shared/docs/benchmarks.md``): the timing loop (warm-up calls, then
interleaved rounds, so that a machine's drifting load hits every implementation alike and per-round ratios stay
meaningful) and the ``--cases dtype:batch,...`` argument."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


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
