"""Bundles of architectures with a processor (image processor + tokenizer), as CLIP, SAM, GLIP will have: the
registry row alone decides what is shipped, export.py needs no change. Uses a test-only processor class."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_vl
from hf_vl import registry
from hf_vl.export import export_bundle

PROCESSOR_SOURCE = '''
"""A test-only processor shaped like hf_vl's CLIP / GLIP processors; imports only transformers."""

from transformers import ProcessorMixin


class HfVlFakeProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
'''
TEXTS = ["a photo of a cat", "a dog", "photo"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "cat", "dog"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture
def processor_arch(tmp_path, monkeypatch):
    """The ViT registry row with a processor class, as a later architecture would declare it."""
    (tmp_path / "fake_src").mkdir()
    (tmp_path / "fake_src" / "processing_hf_vl_fake.py").write_text(textwrap.dedent(PROCESSOR_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path / "fake_src"))
    from processing_hf_vl_fake import HfVlFakeProcessor

    arch = dataclasses.replace(registry.ARCHITECTURES["vit"], processor_class=HfVlFakeProcessor)
    monkeypatch.setitem(registry.ARCHITECTURES, "vit", arch)
    return arch


@pytest.fixture
def processor_model_dir(tmp_path, make_tiny_vit, processor_arch):
    model_dir = make_tiny_vit(tmp_path / "model")
    (model_dir / "preprocessor_config.json").unlink()  # v5 processors embed it in processor_config.json
    image_processor = hf_vl.HfVlVitImageProcessor(size={"height": 32, "width": 32})
    processor_arch.processor_class(image_processor, tiny_tokenizer()).save_pretrained(model_dir)
    return model_dir


def test_processor_bundle_layout(processor_model_dir, processor_arch, tmp_path):
    bundle = export_bundle(processor_model_dir, tmp_path / "bundle")
    reference = "processing_hf_vl_fake.HfVlFakeProcessor"
    assert json.loads((bundle / "config.json").read_text())["auto_map"]["AutoProcessor"] == reference
    processor_config = json.loads((bundle / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == reference
    assert processor_config["image_processor"]["image_processor_type"] == "HfVlVitImageProcessor"
    assert {"processing_hf_vl_fake.py", "image_processing_hf_vl_vit.py", "tokenizer.json"} <= {
        path.name for path in bundle.iterdir()
    }
    assert processor_arch.processor_class._auto_class is None  # restored


@pytest.mark.slow
def test_processor_bundle_loads_without_hf_vl(processor_model_dir, processor_arch, tmp_path, photos, run_isolated):
    bundle = export_bundle(processor_model_dir, tmp_path / "bundle")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index, photo in enumerate(photos):
        photo.save(inputs / f"image_{index}.png")
    (inputs / "texts.json").write_text(json.dumps(TEXTS))
    processor = processor_arch.processor_class.from_pretrained(processor_model_dir)
    expected = processor(images=photos, text=TEXTS, padding=True, return_tensors="pt")
    save_file({"pixel_values": expected["pixel_values"]}, inputs / "pixel_values.safetensors")

    result = run_isolated(bundle, inputs, tmp_path / "out", tmp_path / "modules")
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    tensors = load_file(tmp_path / "out" / "outputs.safetensors")
    assert results["classes"]["processor"] == "HfVlFakeProcessor"
    assert results["modules"]["processor"].startswith("transformers_modules.")
    assert results["classes"]["processor_image_processor"] == "HfVlVitImageProcessor"
    assert results["classes"]["image_processor"] == "HfVlVitImageProcessor"
    assert torch.equal(tensors["input_ids"], expected["input_ids"])
    assert torch.equal(tensors["processor_pixel_values"], expected["pixel_values"])
    classifier = hf_vl.HfVlVitForImageClassification.from_pretrained(processor_model_dir).eval()
    with torch.no_grad():
        assert torch.equal(tensors["logits"], classifier(expected["pixel_values"]).logits)
