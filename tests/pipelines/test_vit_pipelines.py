"""Stock transformers pipelines on a saved hf_vl ViT (hf_vl installed, registered classes): image classification and
image feature extraction, single and batched, on PIL images of many modes and sizes, checked against the model run
by hand through the image processor."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import hf_vl

TOLERANCE = 1e-5  # pipeline and hand-run use the same processor and weights; batching may reorder float sums


@pytest.fixture(scope="module")
def by_hand(vit_classifier_dir, mixed_images):
    """Logits, last hidden states and pooled features computed image by image without a pipeline."""
    processor = AutoImageProcessor.from_pretrained(vit_classifier_dir)
    classifier = AutoModelForImageClassification.from_pretrained(vit_classifier_dir).eval()
    base = AutoModel.from_pretrained(vit_classifier_dir).eval()
    results = []
    with torch.no_grad():
        for _, image in mixed_images:
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            outputs = base(pixel_values)
            results.append(
                {
                    "logits": classifier(pixel_values).logits[0],
                    "hidden": outputs.last_hidden_state,
                    "pooled": outputs.pooler_output,
                }
            )
    return results


@pytest.fixture(scope="module")
def classifier_pipe(vit_classifier_dir):
    return pipeline("image-classification", model=str(vit_classifier_dir))


@pytest.fixture(scope="module")
def extractor_pipe(vit_classifier_dir):
    return pipeline("image-feature-extraction", model=str(vit_classifier_dir))


def test_pipelines_use_hf_vl_classes(classifier_pipe, extractor_pipe):
    assert type(classifier_pipe.model) is hf_vl.HfVlVitForImageClassification
    assert type(extractor_pipe.model) is hf_vl.HfVlVitModel
    assert type(classifier_pipe.image_processor) is hf_vl.HfVlVitImageProcessor


def _check_classification(predictions, expected_logits, labels):
    probabilities = expected_logits.softmax(-1)
    assert predictions[0]["label"] == labels[int(expected_logits.argmax())]
    order = probabilities.argsort(descending=True)
    assert [p["label"] for p in predictions] == [labels[int(i)] for i in order]
    scores = torch.tensor([p["score"] for p in predictions])
    torch.testing.assert_close(scores, probabilities[order], atol=TOLERANCE, rtol=0)


def test_classification_single_images(classifier_pipe, mixed_images, by_hand):
    labels = classifier_pipe.model.config.id2label
    for (name, image), expected in zip(mixed_images, by_hand, strict=True):
        predictions = classifier_pipe(image, top_k=len(labels))
        assert len(predictions) == len(labels), name
        _check_classification(predictions, expected["logits"], labels)


def test_classification_top_k_default_and_batched(classifier_pipe, mixed_images, by_hand):
    labels = classifier_pipe.model.config.id2label
    images = [image for _, image in mixed_images]
    batched = classifier_pipe(images, batch_size=4, top_k=len(labels))
    assert len(batched) == len(images)
    for predictions, expected in zip(batched, by_hand, strict=True):
        _check_classification(predictions, expected["logits"], labels)
    top1 = classifier_pipe(images[:3], top_k=1)
    assert [p[0]["label"] for p in top1] == [labels[int(e["logits"].argmax())] for e in by_hand[:3]]


def test_feature_extraction_single_and_batched(extractor_pipe, mixed_images, by_hand):
    images = [image for _, image in mixed_images]
    single = [extractor_pipe(image, return_tensors=True) for image in images]
    batched = extractor_pipe(images, batch_size=5, return_tensors=True)
    pooled = extractor_pipe(images, batch_size=5, pool=True, return_tensors=True)
    for one, many, pool, expected in zip(single, batched, pooled, by_hand, strict=True):
        assert one.shape == (1, 1 + 8 * 8, 32)  # (batch, class token + 8x8 patches, hidden)
        torch.testing.assert_close(one, expected["hidden"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(many, expected["hidden"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(pool, expected["pooled"], atol=TOLERANCE, rtol=0)


def test_feature_extraction_returns_lists(extractor_pipe, mixed_images, by_hand):
    features = extractor_pipe(mixed_images[0][1])
    assert isinstance(features, list)
    torch.testing.assert_close(torch.tensor(features), by_hand[0]["hidden"], atol=TOLERANCE, rtol=0)


def test_photographs_get_different_features(by_hand):
    """Guards the comparisons above against a degenerate model or processor (e.g. all-constant inputs)."""
    first, second = by_hand[0]["pooled"], by_hand[1]["pooled"]
    assert (first - second).abs().max() > 1e-3
