"""Two processes (torchrun, gloo, CPU) take the same ViT recipe step as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_vl.training import one_step_gradients


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "hf_vl.training.vit_recipe", "--one-step", "--global-batch", "8", "--expect-world-size", "2",
        "--output", str(tmp_path / "two"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    two = torch.load(tmp_path / "two" / "one_step.pt")
    one = one_step_gradients(tmp_path / "one", global_batch=8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert two["gradients"].keys() == one["gradients"].keys()
    worst = max(float((two["gradients"][k] - one["gradients"][k]).abs().max()) for k in one["gradients"])
    assert worst < 1e-5, worst
    # the check has teeth: the gradients are far from zero, and one process on half the batch differs
    assert max(float(g.abs().max()) for g in one["gradients"].values()) > 1e-2
    half = one_step_gradients(tmp_path / "half", global_batch=4)
    assert abs(half["loss"] - one["loss"]) > 1e-3
