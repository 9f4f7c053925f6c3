"""Keep freed CPU memory mapped for reuse (glibc ``mallopt``), so repeated inference does not page-fault.

glibc returns freed memory to the kernel eagerly: chunks above the mmap threshold are unmapped on ``free``, and the
top of the heap is trimmed once more than the trim threshold (2x the mmap threshold, which adapts up to 32 MiB) lies
free. A model whose intermediates are a few MiB each (SAM's mask decoder: 4 MiB image states per prompt) then gets
fresh pages for most of them on every call, and the kernel's zero-fill of each page costs more than the arithmetic
of the element-wise operations using it: SAM's one-prompt decode on this project's 2-core CPU took 27.7 ms with 10 MB
of page faults per call, 20.2 ms with the settings below and none (``benchmarks/bench_sam.py``). The settings: heap
allocations up to 32 MiB (larger ones are still mapped and unmapped on demand, e.g. SAM's 400 MiB attention masks),
up to 128 MiB of free heap kept, 32 MiB extra requested on growth. They are process-wide, like
``torch.set_num_threads``: applied once, when the first hf_vl model is built, only with glibc on Linux, not when the
user has tuned malloc (``GLIBC_TUNABLES`` or ``MALLOC_*`` in the environment), and not with ``HF_VL_MALLOC_TUNING=0``.

Huge pages: :func:`request_huge_pages` sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (CPU allocations of 2 MiB and more
aligned to 2 MiB and advised ``MADV_HUGEPAGE``) when hf_vl is imported. Where the kernel grants transparent huge
pages only on request (``madvise``, a common default), the multi-MB tensors of SAM's encoder and decoder otherwise
take one page fault and one TLB entry per 4 KiB: the automatic mask generator (vit_b, bf16, 32x32 grid) page-faulted
~1 GB per image and took 14.2 s (median of 6 runs, alternating processes) against 13.6 s with huge pages, peak
memory unchanged (4.3 / 4.1 GB). PyTorch reads the variable once, at its first CPU allocation: set after that it
does nothing, and it is left alone when already set or with ``HF_VL_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 128 << 20), (M_TOP_PAD, 32 << 20))

_applied: bool | None = None  # None: not tried yet in this process


def _tuning_off() -> bool:
    """Whether hf_vl leaves the process's memory settings alone: opted out (``HF_VL_MALLOC_TUNING=0``) or not Linux."""
    return os.environ.get("HF_VL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux")


def _user_tuned_malloc() -> bool:
    return "GLIBC_TUNABLES" in os.environ or any(name.startswith("MALLOC_") for name in os.environ)


def keep_freed_cpu_memory() -> bool:
    """Apply :data:`MALLOC_SETTINGS` once per process (see the module docstring); whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _tuning_off() or _user_tuned_malloc():
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl has no such mallopt parameters)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS)
    return _applied


THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``; None: unknown)."""
    try:
        with open(THP_MODE_FILE) as file:
            text = file.read()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def request_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for PyTorch's CPU allocator (see the module docstring) unless it is set
    already, the user opted out (``HF_VL_MALLOC_TUNING=0``), or the kernel does not grant huge pages on request
    (not Linux, ``never``, or unknown). Whether it was set; effective only before PyTorch's first CPU allocation."""
    if THP_VARIABLE in os.environ or _tuning_off() or _thp_mode() not in ("always", "madvise"):
        return False
    os.environ[THP_VARIABLE] = "1"
    return True


__all__ = ["MALLOC_SETTINGS", "THP_VARIABLE", "keep_freed_cpu_memory", "request_huge_pages"]
