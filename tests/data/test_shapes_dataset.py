"""The embedded shapes dataset: determinism, features, masks vs boxes vs pixels, captions and spans, splits."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_vl.data import (
    COLOUR_NAMES,
    COLOURS,
    COMBINATIONS,
    HELDOUT_COMBINATIONS,
    SEEN_COMBINATIONS,
    SHAPES,
    SHAPES_CLASS_NAMES,
    caption_and_spans,
    instance_masks,
    load_shapes,
    shapes_features,
    xywh_to_cxcywh,
)


@pytest.fixture(scope="module")
def detection():
    return load_shapes("validation", num_images=60, seed=3, task="detection")


@pytest.fixture(scope="module")
def heldout_detection():
    return load_shapes("heldout", num_images=60, seed=3, task="detection")


def _combos(example) -> list[tuple[str, str]]:
    objects = example["objects"]
    return [(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(objects["colour"], objects["category"])]


@pytest.mark.parametrize("task", ["detection", "classification"])
def test_same_seed_same_bytes_other_seed_other_bytes(task):
    first = load_shapes("train", num_images=12, seed=7, task=task)
    again = load_shapes("train", num_images=12, seed=7, task=task)
    other = load_shapes("train", num_images=12, seed=8, task=task)
    assert first.data.table.equals(again.data.table)
    assert first[0]["image"].tobytes() == again[0]["image"].tobytes()
    assert not first.data.table.equals(other.data.table)
    # image i depends only on (seed, split, task, i), not on how many images were asked for
    prefix = load_shapes("train", num_images=5, seed=7, task=task)
    assert prefix.data.table.equals(first.select(range(5)).flatten_indices().data.table)


def test_splits_differ():
    train = load_shapes("train", num_images=4, task="classification")
    test = load_shapes("test", num_images=4, task="classification")
    assert train[0]["image"].tobytes() != test[0]["image"].tobytes()
    assert str(train.split) == "train"


@pytest.mark.parametrize("task", ["detection", "classification"])
def test_features(task):
    ds = load_shapes("test", num_images=3, task=task)
    assert ds.features == shapes_features(task)
    assert isinstance(ds.features["image"], datasets.Image)
    if task == "classification":
        assert ds.features["label"].names == SHAPES_CLASS_NAMES
        assert set(ds.column_names) == {"image", "label", "colour", "caption"}
    else:
        # a Sequence of dicts is stored column-wise: one List per field, as in transformers' detection examples
        objects = ds.features["objects"]
        assert all(isinstance(feature, datasets.List) for feature in objects.values())
        assert objects["category"].feature.names == SHAPES_CLASS_NAMES
        assert objects["colour"].feature.names == list(COLOUR_NAMES)
        assert objects["bbox"].length == -1 and objects["bbox"].feature.length == 4
        assert isinstance(ds.features["instance_map"], datasets.Image)
    assert len(SHAPES) >= 5 and len(COLOURS) >= 5


def test_images_sizes_and_object_counts(detection):
    for example in detection:
        image, instance_map = example["image"], example["instance_map"]
        assert image.mode == "RGB" and instance_map.mode == "L"
        assert image.size == instance_map.size == (example["width"], example["height"])
        assert 64 <= example["width"] <= 128 and 64 <= example["height"] <= 128
        assert 1 <= len(example["objects"]["id"]) <= 6
    counts = {len(example["objects"]["id"]) for example in detection}
    assert len(counts) >= 4, counts  # the number of objects varies


def test_masks_match_boxes_areas_and_pixels(detection):
    for example in detection:
        masks = instance_masks(example)
        image = np.asarray(example["image"], dtype=np.int64)
        objects = example["objects"]
        assert masks.shape == (len(objects["id"]), example["height"], example["width"])
        assert masks.sum(0).max() <= 1  # occlusion resolved: one owner per pixel
        for k, mask in enumerate(masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            expected = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            assert objects["bbox"][k] == pytest.approx(expected)
            assert objects["area"][k] == mask.sum() >= 12
            # the visible pixels are painted in the object's colour (+- jitter and noise)
            colour = np.asarray(COLOURS[COLOUR_NAMES[objects["colour"][k]]])
            assert np.abs(image[mask].mean(0) - colour).max() <= 30
        background = image[~masks.any(0)]
        if len(background):
            assert background.max() < 60 + 8 + 1


def test_occlusion_happens_and_keeps_objects_visible():
    ds = load_shapes("train", num_images=80, seed=1, num_objects=(5, 6))
    occluded = 0
    for example in ds:
        areas = np.asarray(example["objects"]["area"])
        boxes = np.asarray(example["objects"]["bbox"])
        # a fully visible object fills a good part of its box; a clearly occluded one much less
        occluded += int((areas < 0.3 * boxes[:, 2] * boxes[:, 3]).sum())
    assert occluded > 0


def test_captions_and_spans(detection):
    for example in detection:
        caption, objects = example["caption"], example["objects"]
        previous_end = 0
        for (colour, shape), phrase, (start, end) in zip(_combos(example), objects["phrase"], objects["span"]):
            assert phrase == f"{colour} {shape}"
            assert caption[start:end] == phrase
            assert start >= previous_end
            previous_end = end
        assert caption.startswith(("a ", "an "))


def test_caption_examples():
    assert caption_and_spans(["red circle"]) == ("a red circle", [(2, 12)])
    caption, spans = caption_and_spans(["red circle", "orange star", "blue square"])
    assert caption == "a red circle, an orange star and a blue square"
    assert [caption[s:e] for s, e in spans] == ["red circle", "orange star", "blue square"]


@given(st.lists(st.sampled_from([f"{c} {s}" for c, s in COMBINATIONS]), min_size=1, max_size=6))
def test_spans_recover_phrases(phrases):
    caption, spans = caption_and_spans(phrases)
    assert [caption[s:e] for s, e in spans] == phrases


def test_heldout_combinations_never_in_training_splits():
    assert set(HELDOUT_COMBINATIONS).isdisjoint(SEEN_COMBINATIONS)
    assert {s for _, s in HELDOUT_COMBINATIONS} == set(SHAPES)  # every shape still has seen colours
    for split in ("train", "validation", "test"):
        detection = load_shapes(split, num_images=80, seed=2)
        for example in detection:
            assert set(_combos(example)).isdisjoint(HELDOUT_COMBINATIONS)
            assert not any(example["objects"]["heldout"])
        classification = load_shapes(split, num_images=150, seed=2, task="classification")
        combos = {(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(classification["colour"], classification["label"])}
        assert combos.isdisjoint(HELDOUT_COMBINATIONS)


def test_heldout_split_contains_unseen_combinations(heldout_detection):
    for example in heldout_detection:
        combos = _combos(example)
        assert combos[0] in HELDOUT_COMBINATIONS
        assert example["objects"]["heldout"] == [combo in HELDOUT_COMBINATIONS for combo in combos]
    classification = load_shapes("heldout", num_images=60, task="classification")
    combos = [(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(classification["colour"], classification["label"])]
    assert set(combos) <= set(HELDOUT_COMBINATIONS)
    assert len(set(combos)) == len(HELDOUT_COMBINATIONS)


def test_classification_view():
    ds = load_shapes("train", num_images=120, seed=4, task="classification", image_size=(40, 48))
    assert set(ds["label"]) == set(range(len(SHAPES)))
    for example in ds.select(range(20)):
        assert example["image"].width == example["image"].height  # square: a plain resize keeps circles round
        assert 40 <= example["image"].width <= 48
        name = f"{COLOUR_NAMES[example['colour']]} {SHAPES[example['label']]}"
        assert example["caption"] in (f"a {name}", f"an {name}")


def test_xywh_to_cxcywh():
    boxes = np.array([[10, 20, 30, 40], [0, 0, 100, 50]])
    out = xywh_to_cxcywh(boxes, width=100, height=50)
    np.testing.assert_allclose(out, [[0.25, 0.8, 0.3, 0.8], [0.5, 0.5, 1.0, 1.0]])
    assert xywh_to_cxcywh([], 10, 10).shape == (0, 4)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"split": "dev"}, "split"),
        ({"task": "segmentation"}, "task"),
        ({"num_images": -1}, "num_images"),
        ({"seed": -2}, "seed"),
        ({"image_size": (64, 32)}, "image_size"),
        ({"image_size": 32}, "image_size"),
        ({"num_objects": (0, 3)}, "num_objects"),
        ({"num_objects": (1, 7)}, "num_objects"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        load_shapes(**kwargs)


def test_zero_images_gives_an_empty_dataset_with_features():
    ds = load_shapes("train", num_images=0)
    assert len(ds) == 0 and ds.features == shapes_features("detection")
