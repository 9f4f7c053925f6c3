"""ViT from transformers save_pretrained directories (Hub/legacy and 5.24 in-memory key names): output parity."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from conversion_helpers import assert_parity, pixel_values, random_model
from safetensors.torch import save_file

import hf_vl
from hf_vl.conversion import ConversionError
from hf_vl.conversion.api import convert_checkpoint

# odd, distinct sizes: 4 heads of 12, FFN 37, 5 labels, a 4x4 grid of 8-pixel patches
TINY_HF = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)


def _hf_classifier(tmp_path, **config):
    config = transformers.ViTConfig(**{**TINY_HF, "num_labels": 5, **config})
    reference = random_model(lambda: transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "hf")
    return reference


def _hf_base_model(tmp_path, use_mask_token=False):
    config = transformers.ViTConfig(**TINY_HF)
    reference = random_model(
        lambda: transformers.ViTModel(config, add_pooling_layer=True, use_mask_token=use_mask_token)
    )
    reference.save_pretrained(tmp_path / "hf")
    return reference


def _outputs(model, output_dir, photo):
    processor = transformers.AutoImageProcessor.from_pretrained(output_dir)
    pixels = pixel_values(processor, photo)
    with torch.no_grad():
        return model(pixels), pixels


def test_tiny_classifier_parity_and_config(tmp_path, photo):
    reference = _hf_classifier(tmp_path, id2label={i: f"class {i}" for i in range(5)})
    saved_keys = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved_keys["model_type"] == "vit"
    convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out", progress=False)
    model, info = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # HF ViT numerics and labels come from config.json, not from hf_vl's defaults
    assert model.config.hidden_act == "gelu" and model.config.layer_norm_eps == 1e-12
    assert model.config.id2label == {i: f"class {i}" for i in range(5)}
    assert model.config.representation_size is None and model.config.intermediate_size == 37
    ours, pixels = _outputs(model, tmp_path / "out", photo)
    with torch.no_grad():
        assert_parity("transformers tiny ViTForImageClassification", ours.logits, reference(pixels).logits)


def test_tiny_in_memory_names(tmp_path, photo):
    """transformers 5.24's in-memory names (``vit.layers.N.attention.q_proj``), e.g. a raw ``state_dict()``."""
    reference = _hf_classifier(tmp_path)
    (tmp_path / "hf" / "model.safetensors").unlink()
    state_dict = reference.state_dict()
    assert "vit.layers.0.attention.q_proj.weight" in state_dict
    save_file(state_dict, tmp_path / "hf" / "model.safetensors")
    model = convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out", progress=False)
    ours, pixels = _outputs(model, tmp_path / "out", photo)
    with torch.no_grad():
        assert_parity("transformers tiny (in-memory names)", ours.logits, reference(pixels).logits)


def test_vit_model_with_pooler(tmp_path, photo, caplog):
    reference = _hf_base_model(tmp_path, use_mask_token=True)
    with caplog.at_level(logging.INFO, logger="hf_vl.conversion.rules"):
        model = convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out", progress=False)
    assert "dropped embeddings.mask_token: " in caplog.text
    assert model.config.representation_size == 48 and model.config.pooler_act == "tanh"
    assert model.config.num_labels == 0
    base = transformers.AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(base, hf_vl.HfVlVitModel)
    ours, pixels = _outputs(base, tmp_path / "out", photo)
    with torch.no_grad():
        expected = reference(pixels)
    assert_parity("transformers tiny ViTModel last_hidden_state", ours.last_hidden_state, expected.last_hidden_state)
    assert_parity("transformers tiny ViTModel pooler_output", ours.pooler_output, expected.pooler_output)


def test_preprocessor_config_and_variant_agreement(tmp_path, add_vit_variant):
    _hf_classifier(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(
        tmp_path / "hf"
    )
    convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out", progress=False)
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.1, 0.2, 0.3] and processor["size"] == {"height": 32, "width": 32}
    # a variant named as well must describe the same network; its processor row is then used
    variant = add_vit_variant("vit-test-hf", **TINY_HF, num_labels=5)
    convert_checkpoint("vit", "transformers", tmp_path / "hf", variant, tmp_path / "out1", progress=False)
    assert json.loads((tmp_path / "out1" / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3
    with pytest.raises(ValueError, match="does not match variant 'vit-base-patch16-224'.*hidden_size: checkpoint 48"):
        convert_checkpoint("vit", "transformers", tmp_path / "hf", "vit-base-patch16-224", tmp_path / "out2")
    variant = add_vit_variant("vit-test-hf-labels", **TINY_HF, num_labels=7)
    with pytest.raises(ValueError, match="num_labels: checkpoint 5, variant 7"):
        convert_checkpoint("vit", "transformers", tmp_path / "hf", variant, tmp_path / "out3")


def test_other_model_types_and_extra_keys_are_rejected(tmp_path):
    _hf_classifier(tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="model_type='deit'"):
        convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out")
    reference = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**TINY_HF))
    reference.save_pretrained(tmp_path / "mim")
    with pytest.raises(ConversionError, match=r"decoder\.0\.weight") as error:
        convert_checkpoint("vit", "transformers", tmp_path / "mim", None, tmp_path / "out")
    assert error.value.problems == {"unknown source keys (no rule matches)": ["decoder.0.bias", "decoder.0.weight"]}


@pytest.mark.slow
def test_base_classifier_parity(tmp_path, photo):
    config = transformers.ViTConfig(num_labels=1000)  # transformers' defaults are ViT-B/16 at 224
    reference = random_model(lambda: transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "hf")
    model = convert_checkpoint("vit", "transformers", tmp_path / "hf", None, tmp_path / "out", progress=False)
    assert model.config.hidden_size == 768 and model.config.num_labels == 1000
    ours, pixels = _outputs(model, tmp_path / "out", photo)
    with torch.no_grad():
        assert_parity("transformers ViT-B/16 ViTForImageClassification", ours.logits, reference(pixels).logits)
