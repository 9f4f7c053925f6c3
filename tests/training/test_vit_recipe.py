"""The ViT shapes recipe through Trainer: a smoke run via the script entry point, gradient accumulation, and the
full recipe's accuracy (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_vl import HfVlVitForImageClassification, HfVlVitImageProcessor
from hf_vl.data import SHAPES_CLASS_NAMES, load_shapes
from hf_vl.training import one_step_gradients, train_vit_shapes
from hf_vl.training.vit_recipe import VIT_RECIPES, build_vit_for_shapes, main, training_arguments


def _grad_norm(gradients: dict) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gradients.values())))


def test_recipe_table_builds_model_and_processor():
    model, processor = build_vit_for_shapes("vit-shapes-tiny", seed=0)
    config = VIT_RECIPES["vit-shapes-tiny"]["config"]
    assert isinstance(model, HfVlVitForImageClassification) and isinstance(processor, HfVlVitImageProcessor)
    assert model.config.hidden_size == config["hidden_size"] and model.config.patch_size == config["patch_size"]
    assert [model.config.id2label[i] for i in range(len(SHAPES_CLASS_NAMES))] == SHAPES_CLASS_NAMES
    assert processor.size == {"height": config["image_size"], "width": config["image_size"]}
    again, _ = build_vit_for_shapes("vit-shapes-tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="recipe"):
        build_vit_for_shapes("vit-huge-shapes")


def test_training_arguments_avoid_the_known_traps(tmp_path):
    args = training_arguments(tmp_path, seed=0)
    assert args.use_cpu and args.report_to == [] and not args.remove_unused_columns
    assert args.ddp_find_unused_parameters is False
    assert HfVlVitForImageClassification.accepts_loss_kwargs is False


def test_script_smoke_run_saves_a_reloadable_model(tmp_path):
    output = tmp_path / "vit"
    assert main(["--output", str(output), "--num-train", "64", "--num-eval", "32", "--max-steps", "3"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("test_accuracy", "heldout_accuracy", "test_loss", "train_runtime"):
        assert key in metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["world_size"] == 1
    model = AutoModelForImageClassification.from_pretrained(output)
    processor = AutoImageProcessor.from_pretrained(output)
    assert isinstance(model, HfVlVitForImageClassification) and isinstance(processor, HfVlVitImageProcessor)
    assert model.config.id2label[0] == SHAPES_CLASS_NAMES[0]
    images = load_shapes("test", num_images=4, task="classification")["image"]
    logits = model(**processor(list(images), return_tensors="pt")).logits
    assert logits.shape == (4, len(SHAPES_CLASS_NAMES)) and torch.isfinite(logits).all()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        train_vit_shapes(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="grad_accum"):
        one_step_gradients(tmp_path, global_batch=4, grad_accum=0)
    with pytest.raises(ValueError, match="global_batch"):
        one_step_gradients(tmp_path, global_batch=6, grad_accum=4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """GA=1 x bs4 and GA=2 x bs2 apply the same gradient (ecosystem.md section 4.3)."""
    big = one_step_gradients(tmp_path / "ga1", global_batch=4, grad_accum=1)
    accumulated = one_step_gradients(tmp_path / "ga2", global_batch=4, grad_accum=2)
    assert accumulated["loss"] == pytest.approx(big["loss"], abs=1e-6)
    assert big["gradients"].keys() == accumulated["gradients"].keys()
    worst = max(float((big["gradients"][k] - accumulated["gradients"][k]).abs().max()) for k in big["gradients"])
    assert worst < 1e-5, worst
    assert _grad_norm(accumulated["gradients"]) == pytest.approx(_grad_norm(big["gradients"]), rel=1e-5)
    assert _grad_norm(big["gradients"]) > 0.1
    # the check has teeth: with accepts_loss_kwargs=True Trainer stops dividing by the accumulation steps
    monkeypatch.setattr(HfVlVitForImageClassification, "accepts_loss_kwargs", True)
    trapped = one_step_gradients(tmp_path / "trap", global_batch=4, grad_accum=2)
    assert _grad_norm(trapped["gradients"]) == pytest.approx(2 * _grad_norm(big["gradients"]), rel=1e-4)


@pytest.mark.slow
def test_full_recipe_reaches_90_percent(tmp_path):
    """The real recipe (8000 images, 12 epochs, ~1 CPU minute): >= 90% on held-out test images, and shapes in
    colour-shape pairs never seen in training are recognised far above chance (1/6)."""
    metrics, path = train_vit_shapes(tmp_path / "vit", seed=0)
    assert metrics["test_accuracy"] >= 0.90, metrics
    assert metrics["heldout_accuracy"] >= 0.75, metrics
    assert (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file()
