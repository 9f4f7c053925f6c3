"""Collators, ``with_pixel_values`` and ``compute_metrics`` used by the Trainer recipes."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_vl import HfVlVitImageProcessor
from hf_vl.data import load_shapes
from hf_vl.training import (
    ImageClassificationCollator,
    ShapesDetectionCollator,
    classification_compute_metrics,
    with_pixel_values,
)


@pytest.fixture(scope="module")
def processor():
    return HfVlVitImageProcessor(size={"height": 24, "width": 24})


@pytest.fixture(scope="module")
def rows():
    return list(load_shapes("train", num_images=5, task="classification", image_size=(30, 50)))


def test_classification_collator_runs_the_processor(processor, rows):
    batch = ImageClassificationCollator(processor)(rows)
    assert batch["pixel_values"].shape == (5, 3, 24, 24)
    torch.testing.assert_close(
        batch["pixel_values"], processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]
    )
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [row["label"] for row in rows]


def test_with_pixel_values_matches_the_processor(processor, rows):
    ds = load_shapes("train", num_images=5, task="classification", image_size=(30, 50))
    processed = with_pixel_values(ds, processor)
    assert "image" not in processed.column_names
    assert isinstance(processed.features["pixel_values"], datasets.Array3D)
    assert processed.features["label"] == ds.features["label"]
    direct = ImageClassificationCollator(processor)(rows)
    stacked = ImageClassificationCollator()(list(processed))
    torch.testing.assert_close(stacked["pixel_values"], direct["pixel_values"])
    assert torch.equal(stacked["labels"], direct["labels"])


def test_random_flips_flip_whole_images(processor, rows):
    plain = ImageClassificationCollator(processor)(rows)["pixel_values"]
    torch.manual_seed(1)
    flipped = ImageClassificationCollator(processor, random_flips=("horizontal", "vertical"))(rows)["pixel_values"]
    seen = set()
    for image, original in zip(flipped, plain):
        candidates = {
            "none": original,
            "horizontal": original.flip(-1),
            "vertical": original.flip(-2),
            "both": original.flip(-1).flip(-2),
        }
        matches = [name for name, candidate in candidates.items() if torch.equal(image, candidate)]
        assert matches, "an example is not a flip of its original"
        seen.add(matches[0])
    assert len(seen) > 1


def test_collator_errors(processor, rows):
    with pytest.raises(ValueError, match="random_flips"):
        ImageClassificationCollator(processor, random_flips=("diagonal",))
    with pytest.raises(ValueError, match="random_flips"):
        ImageClassificationCollator(processor, random_flips="horizontal")
    with pytest.raises(TypeError, match="image_processor"):
        ImageClassificationCollator(image_processor=3)
    with pytest.raises(KeyError, match="remove_unused_columns"):
        ImageClassificationCollator(processor)([{"label": 1}])
    with pytest.raises(ValueError, match="image_processor"):
        ImageClassificationCollator()(rows)
    with pytest.raises(ValueError, match="empty"):
        ImageClassificationCollator(processor)([])


def test_detection_collator_builds_detr_targets(processor):
    ds = load_shapes("train", num_images=3, task="detection")
    batch = ShapesDetectionCollator(processor)(list(ds))
    assert batch["pixel_values"].shape == (3, 3, 24, 24)
    for target, example in zip(batch["labels"], ds):
        objects = example["objects"]
        assert target["class_labels"].tolist() == objects["category"]
        boxes = target["boxes"]
        assert boxes.shape == (len(objects["id"]), 4) and boxes.dtype == torch.float32
        assert (boxes >= 0).all() and (boxes <= 1).all()
        x, y, w, h = objects["bbox"][0]
        expected = [(x + w / 2) / example["width"], (y + h / 2) / example["height"], w / example["width"]]
        np.testing.assert_allclose(boxes[0, :3].numpy(), expected, rtol=1e-6)


def test_classification_compute_metrics():
    compute_metrics = classification_compute_metrics()
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    hidden = np.zeros((4, 3, 2))
    # a model that also returns hidden states hands Trainer a tuple; the logits come first
    result = compute_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=np.array([1, 0, 0, 0])))
    assert result == {"accuracy": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(EvalPrediction(predictions=np.zeros(4), label_ids=np.zeros(4)))
