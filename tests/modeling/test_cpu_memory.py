"""hf_vl's process-wide CPU memory settings (glibc mallopt), applied when the first hf_vl model is built."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import hf_vl.modeling.hf_vl_cpu_memory as cpu_memory


class FakeLibc:
    def __init__(self, result: int = 1):
        self.calls, self.result = [], result
        self.mallopt = lambda parameter, value: self._mallopt(parameter, value)  # a function: takes argtypes

    def gnu_get_libc_version(self):
        return b"2.39"

    def _mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return self.result


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    for name in list(__import__("os").environ):
        if name == "GLIBC_TUNABLES" or name.startswith("MALLOC_") or name == "HF_VL_MALLOC_TUNING":
            monkeypatch.delenv(name)
    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    libc = FakeLibc()
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    return libc


def test_settings_are_applied_once_per_process(fresh):
    assert cpu_memory.keep_freed_cpu_memory() is True
    assert fresh.calls == [(-3, 32 << 20), (-1, 128 << 20), (-2, 32 << 20)]
    assert cpu_memory.keep_freed_cpu_memory() is True
    assert len(fresh.calls) == 3


@pytest.mark.parametrize(
    "name, value",
    [("HF_VL_MALLOC_TUNING", "0"), ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0"), ("MALLOC_ARENA_MAX", "2")],
)
def test_opt_out_and_the_users_own_tuning_win(fresh, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert cpu_memory.keep_freed_cpu_memory() is False
    assert fresh.calls == []


def test_not_glibc_or_refused_means_not_applied(fresh, monkeypatch):
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: object())  # no gnu_get_libc_version: not glibc
    assert cpu_memory.keep_freed_cpu_memory() is False
    monkeypatch.setattr(cpu_memory, "_applied", None)
    refusing = FakeLibc(result=0)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: refusing)
    assert cpu_memory.keep_freed_cpu_memory() is False
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.keep_freed_cpu_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_building_a_model_applies_them_for_real():
    """In a fresh interpreter: nothing applied on import, applied (real glibc) once a model is built."""
    code = textwrap.dedent(
        """
        import hf_vl.modeling.hf_vl_cpu_memory as cpu_memory
        from hf_vl.modeling.configuration_hf_vl_vit import HfVlVitConfig
        from hf_vl.modeling.modeling_hf_vl_vit import HfVlVitModel
        assert cpu_memory._applied is None
        HfVlVitModel(HfVlVitConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                   image_size=8, patch_size=4))
        print(cpu_memory._applied)
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if not (k == "GLIBC_TUNABLES" or k.startswith("MALLOC_"))}
    env.pop("HF_VL_MALLOC_TUNING", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


# ------------------------------------------------------------------------------------------------ huge pages
@pytest.fixture
def thp_env(monkeypatch):
    for name in ("THP_MEM_ALLOC_ENABLE", "HF_VL_MALLOC_TUNING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    monkeypatch.setattr(cpu_memory, "_thp_mode", lambda: "madvise")
    return monkeypatch


@pytest.mark.parametrize("mode", ["madvise", "always"])
def test_huge_pages_are_requested_where_the_kernel_grants_them(thp_env, mode):
    thp_env.setattr(cpu_memory, "_thp_mode", lambda: mode)
    assert cpu_memory.request_huge_pages() is True
    assert __import__("os").environ["THP_MEM_ALLOC_ENABLE"] == "1"


@pytest.mark.parametrize(
    "change", ["user_set", "opted_out", "never", "unknown", "not_linux"],
)
def test_huge_pages_are_left_alone(thp_env, change):
    if change == "user_set":
        thp_env.setenv("THP_MEM_ALLOC_ENABLE", "0")
    elif change == "opted_out":
        thp_env.setenv("HF_VL_MALLOC_TUNING", "0")
    elif change in ("never", "unknown"):
        thp_env.setattr(cpu_memory, "_thp_mode", lambda: None if change == "unknown" else "never")
    else:
        thp_env.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.request_huge_pages() is False
    assert __import__("os").environ.get("THP_MEM_ALLOC_ENABLE") == ("0" if change == "user_set" else None)


def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    monkeypatch.setattr(cpu_memory, "THP_MODE_FILE", str(mode_file))
    assert cpu_memory._thp_mode() == "madvise"
    monkeypatch.setattr(cpu_memory, "THP_MODE_FILE", str(tmp_path / "missing"))
    assert cpu_memory._thp_mode() is None


@pytest.mark.skipif(cpu_memory._thp_mode() not in ("always", "madvise"), reason="the kernel grants no huge pages")
@pytest.mark.parametrize("opt_out", [False, True])
def test_importing_hf_vl_gives_large_tensors_huge_pages(opt_out):
    """In a fresh interpreter: after ``import hf_vl`` a fresh 64 MiB tensor takes far fewer page faults than its
    16384 pages of 4 KiB (huge pages: ~32), and every one of them with ``HF_VL_MALLOC_TUNING=0``."""
    code = textwrap.dedent(
        """
        import os, resource
        import hf_vl
        import torch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(os.environ.get("THP_MEM_ALLOC_ENABLE"), faults < 4096)
        """
    )
    unset = ("THP_MEM_ALLOC_ENABLE", "HF_VL_MALLOC_TUNING")
    env = {k: v for k, v in __import__("os").environ.items() if k not in unset}
    if opt_out:
        env["HF_VL_MALLOC_TUNING"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == (["None", "False"] if opt_out else ["1", "True"])
