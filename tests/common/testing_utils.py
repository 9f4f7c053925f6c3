"""Test helpers shared by hf_vl's tests: dotted output-field access, nested tensor comparison, state-dict key
lint, Auto-class lookup, a counter proving that activation checkpointing recomputed something, the two-process
(torchrun) runs of the distributed tests, and the loader of the scripts under ``benchmarks/``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


# A numeric key segment is only allowed under a ModuleList with a plural name (``layers.0``, ``blocks.3``);
# ``neck.0.weight`` (an nn.Sequential) is what style.md section 5.7 forbids.
_PLURAL = re.compile(r"[a-z0-9_]*s$")


def get_field(output: Any, path: str) -> Any:
    """``get_field(out, "vision_model_output.hidden_states.0")``: attribute / key / index access by dotted path."""
    value = output
    for part in path.split("."):
        if part.isdigit():
            value = value[int(part)]
        elif isinstance(value, Mapping):
            value = value[part]
        else:
            value = getattr(value, part)
    return value


def assert_nested_close(actual, expected, atol: float = 0.0, rtol: float = 0.0, msg: str = "") -> None:
    """Compare tensors inside (nested) tuples / lists / dicts / ModelOutputs."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{msg}: expected a tensor, got {type(actual).__name__}"
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
    elif isinstance(expected, Mapping):
        assert list(actual.keys()) == list(expected.keys()), f"{msg}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_nested_close(actual[key], expected[key], atol, rtol, f"{msg}.{key}")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{msg}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_nested_close(a, e, atol, rtol, f"{msg}[{i}]")
    else:
        assert actual == expected, f"{msg}: {actual!r} != {expected!r}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-6))


def sequential_style_keys(model: nn.Module) -> list[str]:
    """State-dict keys whose numeric index is not under a plural-named ``nn.ModuleList`` (``neck.0.weight``)."""
    modules = dict(model.named_modules())
    bad = []
    for key in model.state_dict():
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not part.isdigit():
                continue
            parent = modules.get(".".join(parts[:i]))
            is_list = isinstance(parent, (nn.ModuleList, nn.ParameterList)) and not isinstance(parent, nn.Sequential)
            if not (is_list and i > 0 and _PLURAL.fullmatch(parts[i - 1])):
                bad.append(f"{key} ({type(parent).__name__} {'.'.join(parts[:i])!r})")
                break
    return bad


def iter_configs(config):
    """The config and, recursively, its sub-configs (CLIP ``text_config``/``vision_config``, ...)."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            yield from iter_configs(sub)


def without_name_or_path(config_dict: dict) -> dict:
    """``_name_or_path`` records where a config was loaded from, so it legitimately differs after a reload."""
    return {k: v for k, v in config_dict.items() if k != "_name_or_path"}


def find_auto_class_name(model_class: type) -> str | None:
    from hf_vl.registry import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        for auto_name, cls in arch.models.items():
            if cls is model_class:
                return auto_name
    return None


class RecomputeCounter:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: counts backward recomputations, proving that
    checkpointing really ran (not just that a flag was set)."""

    def __init__(self):
        self.recomputations = 0

    def __call__(self):
        @contextlib.contextmanager
        def recompute():
            self.recomputations += 1
            yield

        return contextlib.nullcontext(), recompute()


class CallCounter(TorchFunctionMode):
    """Counts calls of one torch function however it is referenced (``F.scaled_dot_product_attention`` or an
    imported alias): ``with CallCounter(F.scaled_dot_product_attention) as counter: ...; counter.calls``."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is self.target:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def run_torchrun(arguments: Sequence[Any], nproc: int = 2, timeout: int = 600) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc *arguments`` offline, one thread per
    process (the CPU has 2 cores); fails with the tail of its output when a process fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *map(str, arguments)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def recipe_step_in_two_processes(module: str, output_dir: Path, global_batch: int = 8) -> dict:
    """A recipe's ``--one-step`` run (``python -m module``) in two processes: its saved loss, gradients, world size."""
    run_torchrun(["-m", module, "--one-step", "--global-batch", global_batch, "--expect-world-size", 2,
                  "--output", output_dir])  # fmt: skip
    return torch.load(Path(output_dir) / "one_step.pt")


def assert_same_step(two: dict, one: dict, atol: float = 1e-5) -> None:
    """The two-process step (``two``) equals the one-process step on the same global batch (``one``): loss and every
    parameter's gradient within ``atol``."""
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert abs(two["loss"] - one["loss"]) <= atol, (two["loss"], one["loss"])
    assert two["gradients"].keys() == one["gradients"].keys()
    worst = max(float((two["gradients"][k] - one["gradients"][k]).abs().max()) for k in one["gradients"])
    assert worst < atol, worst


BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package; each puts its own folder on
    ``sys.path`` for its siblings, e.g. ``bench_timing``)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
