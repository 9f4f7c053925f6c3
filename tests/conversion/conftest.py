"""Fixtures for converter tests: test-only rows in the variant tables, a saved converted directory's processor."""

from __future__ import annotations

import pytest

from hf_vl import VIT_VARIANTS

_INCEPTION = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
# the tiny timm ViT of the converter notes: img 32, patch 8, width 64, depth 2, 4 heads, mlp ratio 4, 10 classes
TINY_VIT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8
)


@pytest.fixture
def add_vit_variant(monkeypatch):
    """``add_vit_variant(name, **config)`` adds a row to ``VIT_VARIANTS`` for one test (removed afterwards), so tiny
    models go through exactly the ``--variant`` path that released variants use."""

    def add(name: str, **config) -> str:
        config = {**TINY_VIT, "num_labels": 10, **config}
        row = {"config": config, "processor": dict(_INCEPTION, size=config["image_size"]), "source": "tests"}
        monkeypatch.setitem(VIT_VARIANTS, name, row)
        return name

    return add


@pytest.fixture
def tiny_vit_variant(add_vit_variant) -> str:
    return add_vit_variant("vit-test-tiny")
