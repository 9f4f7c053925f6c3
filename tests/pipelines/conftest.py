"""Fixtures for the pipeline tests: a tiny saved hf_vl ViT classifier and photographs in many PIL modes and sizes."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from common.tiny import TINY_IMAGE, TINY_TRANSFORMER
from PIL import Image

import hf_vl

LABELS = ["astronaut", "coffee", "cat", "rocket", "teapot"]


@pytest.fixture(scope="session")
def vit_classifier_dir(tmp_path_factory):
    """A seeded random ``HfVlVitForImageClassification`` (odd sizes) and its processor, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("pipeline_vit") / "model"
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    config = hf_vl.HfVlVitConfig(**TINY_TRANSFORMER, **TINY_IMAGE, **labels)  # tests/common/tiny.py sizes
    torch.manual_seed(0)
    model = hf_vl.HfVlVitForImageClassification(config)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # well-separated classes, as after training
    model.save_pretrained(directory)
    hf_vl.HfVlVitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _sixteen_bit(photo: Image.Image) -> Image.Image:
    # 8-bit values widened to mode I;16 (PIL's convention). Full-range 16-bit images differ between the two paths:
    # the stock pipelines call transformers' load_image, whose convert("RGB") clips them at 255 before the
    # processor sees them, while HfVlVitImageProcessor called directly scales them to 8 bits.
    return Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16))


@pytest.fixture(scope="session")
def mixed_images():
    """(name, image) pairs: every common PIL mode, odd and extreme sizes, three real photographs."""
    astronaut = Image.fromarray(skimage.data.astronaut())  # 512x512
    coffee = Image.fromarray(skimage.data.coffee())  # 600x400
    chelsea = Image.fromarray(skimage.data.chelsea())  # 451x300
    return [
        ("astronaut RGB", astronaut),
        ("coffee RGB", coffee),
        ("chelsea L", chelsea.convert("L")),
        ("chelsea LA", chelsea.convert("LA")),
        ("coffee RGBA", coffee.convert("RGBA")),
        ("astronaut P", astronaut.convert("P")),
        ("coffee CMYK", coffee.convert("CMYK")),
        ("chelsea 1", chelsea.convert("1")),
        ("astronaut I;16", _sixteen_bit(astronaut)),
        ("astronaut 37x23", astronaut.resize((37, 23))),
        ("coffee 5x300", coffee.resize((5, 300))),
        ("chelsea 1x1", chelsea.resize((1, 1))),
    ]
