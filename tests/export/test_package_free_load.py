"""Loads an exported bundle in a subprocess where ``hf_vl`` cannot be imported, through the Auto classes and both
image pipelines, and compares every output with the original model run in-process (ecosystem.md section 1.3)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_vl
from hf_vl.export import export_bundle

TOLERANCE = 1e-6  # same code, same CPU, same torch: differences should be exactly zero

# two interpreter start-ups importing torch + transformers (~25 s and ~15 s on 2 cores)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_vit_dir, photos):
    folder = tmp_path_factory.mktemp("inputs")
    for index, photo in enumerate(photos):
        photo.save(folder / f"image_{index}.png")  # lossless: the subprocess sees the same pixels
    processor = hf_vl.HfVlVitImageProcessor.from_pretrained(tiny_vit_dir)
    pixel_values = processor(photos, return_tensors="pt")["pixel_values"]
    save_file({"pixel_values": pixel_values}, folder / "pixel_values.safetensors")
    return folder


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, tiny_vit_dir, inputs, run_isolated):
    root = tmp_path_factory.mktemp("isolated")
    bundle = export_bundle(tiny_vit_dir, root / "vit-tiny-bundle")
    result = run_isolated(bundle, inputs, root / "out", root / "modules")
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((root / "out" / "results.json").read_text())
    return results, load_file(root / "out" / "outputs.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_vit_dir, inputs):
    """The original models (hf_vl installed, registered classes) on the same pixel values."""
    pixel_values = load_file(inputs / "pixel_values.safetensors")["pixel_values"]
    classifier = hf_vl.HfVlVitForImageClassification.from_pretrained(tiny_vit_dir).eval()
    base = hf_vl.HfVlVitModel.from_pretrained(tiny_vit_dir).eval()
    with torch.no_grad():
        outputs = base(pixel_values)
        return {
            "pixel_values": pixel_values,
            "logits": classifier(pixel_values).logits,
            "last_hidden_state": outputs.last_hidden_state,
            "pooler_output": outputs.pooler_output,
            "id2label": classifier.config.id2label,
        }


def max_difference(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_hf_vl_was_not_importable(isolated):
    results, _ = isolated
    assert "No module named 'hf_vl'" in results["hf_vl_import_error"]
    assert results["hf_vl_modules"] == []
    # the classes came from the bundle's remote code, not from an installed package
    assert all(module.startswith("transformers_modules.") for module in results["modules"].values())


def test_auto_classes_resolve(isolated):
    results, _ = isolated
    assert results["classes"] == {
        "config": "HfVlVitConfig",
        "image_processor": "HfVlVitImageProcessor",
        "classifier": "HfVlVitForImageClassification",
        "base": "HfVlVitModel",
        "pipeline_model": "HfVlVitForImageClassification",
        "feature_pipeline_model": "HfVlVitModel",
    }


@pytest.mark.parametrize("name", ["pixel_values", "logits", "last_hidden_state", "pooler_output"])
def test_outputs_identical(isolated, reference, name):
    _, tensors = isolated
    assert max_difference(tensors[name], reference[name]) <= TOLERANCE


def test_classification_pipeline_matches(isolated, reference):
    results, _ = isolated
    probabilities = reference["logits"].softmax(-1)
    for per_image, expected in zip(results["classification"], probabilities, strict=True):
        order = expected.argsort(descending=True).tolist()
        assert [item["label"] for item in per_image] == [reference["id2label"][index] for index in order]
        assert max_difference([item["score"] for item in per_image], expected[order]) <= TOLERANCE


def test_feature_extraction_pipeline_matches(isolated, reference):
    results, _ = isolated
    assert len(results["features"]) == len(reference["last_hidden_state"])
    for features, pooled, hidden, pooler in zip(
        results["features"], results["pooled_features"], reference["last_hidden_state"], reference["pooler_output"]
    ):
        assert max_difference(features, hidden[None]) <= TOLERANCE  # (1, 1 + patches, hidden) per image
        assert max_difference(pooled, pooler[None]) <= TOLERANCE


def test_bundle_importing_hf_vl_fails_to_load(tmp_path, tiny_vit_dir, inputs, run_isolated):
    """Control: the isolation is real, so a bundle file that imports hf_vl cannot load in the subprocess."""
    bundle = export_bundle(tiny_vit_dir, tmp_path / "bundle")
    with open(bundle / "configuration_hf_vl_vit.py", "a") as file:
        file.write("\nimport hf_vl.registry  # what check_bundle refuses\n")
    result = run_isolated(bundle, inputs, tmp_path / "out", tmp_path / "modules")
    assert result.returncode != 0
    assert "requires the following packages that were not found in your environment: hf_vl" in result.stderr
