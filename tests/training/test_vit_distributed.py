"""Two processes (torchrun, gloo, CPU) take the same ViT recipe step as one process on the same global batch."""

from __future__ import annotations

import pytest
from common.testing_utils import assert_same_step, recipe_step_in_two_processes

from hf_vl.training import one_step_gradients


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    two = recipe_step_in_two_processes("hf_vl.training.vit_recipe", tmp_path / "two")
    one = one_step_gradients(tmp_path / "one", global_batch=8)
    assert_same_step(two, one)
    # the check has teeth: the gradients are far from zero, and one process on half the batch differs
    assert max(float(g.abs().max()) for g in one["gradients"].values()) > 1e-2
    half = one_step_gradients(tmp_path / "half", global_batch=4)
    assert abs(half["loss"] - one["loss"]) > 1e-3
