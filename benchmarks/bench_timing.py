"""The timing loop every benchmark uses (``/work/shared/docs/benchmarks.md``): warm-up calls, then interleaved rounds,
so that a machine's drifting load hits every implementation alike and per-round ratios stay meaningful."""

from __future__ import annotations

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
