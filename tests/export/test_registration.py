"""After ``import hf_vl`` (and after an export, which registers classes for remote code temporarily), genuine
transformers configs, models and image processors still load as the built-in classes (ecosystem.md section 1.2)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    CLIPConfig,
    DetrConfig,
    SamConfig,
    ViTConfig,
)

import hf_vl
from hf_vl.export import export_bundle

BUILTIN_CONFIGS = {
    "vit": lambda: ViTConfig(),
    "clip": lambda: CLIPConfig(),
    "sam": lambda: SamConfig(),
    "detr": lambda: DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False),
}


@pytest.fixture(scope="module", autouse=True)
def after_an_export(tiny_vit_dir, tmp_path_factory):
    export_bundle(tiny_vit_dir, tmp_path_factory.mktemp("export") / "bundle")


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_configs_load_as_builtin(name, tmp_path):
    config = BUILTIN_CONFIGS[name]()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert type(loaded).__module__.startswith(f"transformers.models.{name}.")
    assert loaded.model_type == name


def test_hf_vl_types_are_namespaced():
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    for arch in hf_vl.ARCHITECTURES.values():
        assert arch.model_type.startswith("hf_vl_")
        assert mapping[arch.model_type] is arch.config_class
    assert mapping["vit"] is ViTConfig


def tiny_builtin_vit() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     image_size=32, patch_size=4, num_labels=3)


def test_builtin_vit_model_loads_as_vit_model(tmp_path):
    torch.manual_seed(0)
    original = transformers.ViTForImageClassification(tiny_builtin_vit()).eval()
    original.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    head = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(base) is transformers.ViTModel
    assert type(head) is transformers.ViTForImageClassification
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__module__.startswith("transformers.models.vit.")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(head(pixel_values).logits, original(pixel_values).logits)
    assert not list(tmp_path.glob("*.py"))  # no remote code leaked into a built-in save
