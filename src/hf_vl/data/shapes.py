"""The embedded "shapes" dataset: procedurally drawn images that every hf_vl architecture trains and is scored on
offline (classification, CLIP zero-shot, SAM masks, DETR / GLIP detection and phrase grounding).

Each image shows 1-6 coloured shapes (``SHAPES`` x ``COLOURS``) on a dark, slightly noisy background; later objects
are drawn on top of earlier ones (occlusion allowed, each object keeps >= 40% of its pixels). Everything is a pure
function of ``(seed, split, task, index)``: the same arguments give byte-identical datasets, and image ``i`` does not
depend on ``num_images``.

Columns of ``task="detection"`` (a ``datasets.Dataset``):

* ``image_id`` (int64), ``image`` (``Image()``, RGB PNG), ``width``, ``height`` (int32).
* ``caption`` (string), e.g. ``"a red circle, an orange star and a blue square"`` (objects in drawing order).
* ``instance_map`` (``Image()``, mode ``L`` PNG): pixel value ``k + 1`` where object ``k`` is visible, 0 for the
  background. One small PNG holds every mask with occlusion already resolved (no overlaps by construction); use
  ``instance_masks(example)`` for the (num_objects, H, W) boolean stack.
* ``objects``: ``Sequence`` of dicts, stored column-wise as in transformers' detection examples: ``id`` (index in
  the image), ``category`` (``ClassLabel(SHAPES)``), ``colour`` (``ClassLabel(COLOUR_NAMES)``), ``bbox`` (COCO
  ``[x, y, w, h]`` in pixels, the tight box of the *visible* mask, so a box spans pixels ``x .. x + w - 1``),
  ``area`` (visible pixels), ``phrase`` (``"red circle"``), ``span`` (``[start, end)`` of the phrase in the caption)
  and ``heldout`` (whether the colour-shape pair is in ``HELDOUT_COMBINATIONS``).

``task="classification"`` draws one object on a square image (a square image keeps circles round after a plain
resize): ``image``, ``label`` (``ClassLabel(SHAPES)``, the shape), ``colour``, ``caption``.

Splits: ``train``, ``validation`` and ``test`` never contain a ``HELDOUT_COMBINATIONS`` pair; every ``heldout`` image
contains at least one (its first object), for open-vocabulary / compositional evaluation.
"""

from __future__ import annotations

import dataclasses
import io

import datasets
import numpy as np
from PIL import Image

from .shapes_drawing import SHAPES, sample_pose, shape_mask

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES_CLASS_NAMES: list[str] = list(SHAPES)
COMBINATIONS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES)
# One unseen colour per shape, each colour at most once, so every shape and every colour still occurs in training.
HELDOUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("blue", "circle"),
    ("purple", "square"),
    ("yellow", "triangle"),
    ("red", "star"),
    ("green", "ellipse"),
    ("orange", "diamond"),
)
SEEN_COMBINATIONS: tuple[tuple[str, str], ...] = tuple(c for c in COMBINATIONS if c not in HELDOUT_COMBINATIONS)

SPLITS: tuple[str, ...] = ("train", "validation", "test", "heldout")
TASKS: tuple[str, ...] = ("classification", "detection")
DEFAULT_NUM_IMAGES = {"train": 2000, "validation": 200, "test": 500, "heldout": 500}
DEFAULT_IMAGE_SIZE = {"classification": (32, 64), "detection": (64, 128)}

_BACKGROUND_MAX = 60  # background channels stay below this, every colour has a channel >= 150
_NOISE = 8  # +- per-pixel noise over the whole image
_COLOUR_JITTER = 20
_MIN_VISIBLE_FRACTION = 0.4
_MIN_VISIBLE_PIXELS = 12
_PLACEMENT_TRIES = 10
# circumradius as a fraction of the image's shorter side
_RADIUS = {"classification": (0.25, 0.45), "detection": (0.08, 0.22)}
_MIN_RADIUS_PX = 5.0
_CENTRE_JITTER = 0.12  # classification: the centre moves at most this fraction of the image size


@dataclasses.dataclass
class _DrawnObject:
    shape: str
    colour: str
    full_area: int


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_and_spans(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """``["red circle", "orange star"]`` -> ``("a red circle and an orange star", [(2, 12), (20, 31)])``."""
    parts, spans, position = [], [], 0
    for i, phrase in enumerate(phrases):
        joiner = "" if i == 0 else (" and " if i == len(phrases) - 1 else ", ")
        prefix = joiner + _article(phrase) + " "
        spans.append((position + len(prefix), position + len(prefix) + len(phrase)))
        parts.append(prefix + phrase)
        position += len(prefix) + len(phrase)
    return "".join(parts), spans


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.integers(0, _BACKGROUND_MAX, size=3)
    return np.broadcast_to(base, (height, width, 3)).astype(np.int16)


def _sample_mask(rng, shape: str, width: int, height: int, task: str) -> np.ndarray:
    short = min(width, height)
    radius = max(_MIN_RADIUS_PX, float(rng.uniform(*_RADIUS[task])) * short)
    # keep the whole shape inside the image: boxes are never clipped by the border
    low, high = np.array([radius, radius]), np.array([width - radius, height - radius])
    if task == "classification":  # object-centric, as in ImageNet: near the centre
        centre, spread = np.array([width, height]) / 2, _CENTRE_JITTER * np.array([width, height])
        low, high = np.maximum(low, centre - spread), np.minimum(high, centre + spread)
    cx, cy = (float(v) for v in rng.uniform(low, high))
    angle, aspect = sample_pose(rng, shape)
    return shape_mask(shape, (cx, cy), radius, angle, aspect, (width, height))


def _keeps_others_visible(instance_map: np.ndarray, mask: np.ndarray, objects: list[_DrawnObject]) -> bool:
    """Whether painting ``mask`` on top leaves every earlier object enough visible pixels."""
    visible = np.bincount(instance_map[~mask], minlength=len(objects) + 1)
    return all(
        visible[k + 1] >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * obj.full_area)
        for k, obj in enumerate(objects)
    )


def _render(rng, width: int, height: int, combos: list[tuple[str, str]], task: str):
    """Paint ``combos`` back to front; returns (image uint8 (H, W, 3), instance_map uint8 (H, W), objects).

    An object that cannot be placed without hiding too much of the earlier ones is dropped (never the first).
    """
    image = _background(rng, height, width).copy()
    instance_map = np.zeros((height, width), dtype=np.uint8)
    objects: list[_DrawnObject] = []
    for colour, shape in combos:
        for _ in range(_PLACEMENT_TRIES):
            mask = _sample_mask(rng, shape, width, height, task)
            if mask.sum() >= _MIN_VISIBLE_PIXELS and _keeps_others_visible(instance_map, mask, objects):
                break
        else:
            continue
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        image[mask] = np.asarray(COLOURS[colour]) + jitter
        objects.append(_DrawnObject(shape, colour, int(mask.sum())))
        instance_map[mask] = len(objects)
    noise = rng.integers(-_NOISE, _NOISE + 1, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), instance_map, objects


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    # fixed encoder settings: identical arrays give identical bytes
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _visible_box(instance_map: np.ndarray, object_id: int) -> tuple[list[float], int]:
    mask = instance_map == object_id
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    return [float(x), float(y), float(cols[-1] - x + 1), float(rows[-1] - y + 1)], int(mask.sum())


def _pick_combos(rng, split: str, count: int) -> list[tuple[str, str]]:
    pool = COMBINATIONS if split == "heldout" else SEEN_COMBINATIONS
    picks = [pool[i] for i in rng.integers(0, len(pool), size=count)]
    if split == "heldout":
        picks[0] = HELDOUT_COMBINATIONS[int(rng.integers(0, len(HELDOUT_COMBINATIONS)))]
    return picks


def _detection_example(rng, index: int, split: str, image_size, num_objects) -> dict:
    width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    image, instance_map, drawn = _render(rng, width, height, _pick_combos(rng, split, count), "detection")
    phrases = [f"{obj.colour} {obj.shape}" for obj in drawn]
    caption, spans = caption_and_spans(phrases)
    boxes, areas = zip(*(_visible_box(instance_map, k + 1) for k in range(len(drawn))))
    objects = {
        "id": list(range(len(drawn))),
        "category": [SHAPES.index(obj.shape) for obj in drawn],
        "colour": [COLOUR_NAMES.index(obj.colour) for obj in drawn],
        "bbox": list(boxes),
        "area": list(areas),
        "phrase": phrases,
        "span": [list(span) for span in spans],
        "heldout": [(obj.colour, obj.shape) in HELDOUT_COMBINATIONS for obj in drawn],
    }
    return {
        "image_id": index,
        "image": _png(image),
        "width": width,
        "height": height,
        "caption": caption,
        "instance_map": _png(instance_map),
        "objects": objects,
    }


def _classification_example(rng, index: int, split: str, image_size) -> dict:
    side = int(rng.integers(image_size[0], image_size[1] + 1))
    image, _, drawn = _render(rng, side, side, _pick_combos(rng, split, 1), "classification")
    (obj,) = drawn
    return {
        "image": _png(image),
        "label": SHAPES.index(obj.shape),
        "colour": COLOUR_NAMES.index(obj.colour),
        "caption": caption_and_spans([f"{obj.colour} {obj.shape}"])[0],
    }


def shapes_features(task: str = "detection") -> datasets.Features:
    """The ``datasets.Features`` of ``load_shapes(task=task)``."""
    _check_choice("task", task, TASKS)
    shape_label = datasets.ClassLabel(names=SHAPES_CLASS_NAMES)
    colour_label = datasets.ClassLabel(names=list(COLOUR_NAMES))
    if task == "classification":
        return datasets.Features(
            {
                "image": datasets.Image(),
                "label": shape_label,
                "colour": colour_label,
                "caption": datasets.Value("string"),
            }
        )
    objects = {
        "id": datasets.Value("int32"),
        "category": shape_label,
        "colour": colour_label,
        "bbox": datasets.List(datasets.Value("float32"), length=4),
        "area": datasets.Value("int64"),
        "phrase": datasets.Value("string"),
        "span": datasets.List(datasets.Value("int32"), length=2),
        "heldout": datasets.Value("bool"),
    }
    return datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "caption": datasets.Value("string"),
            "instance_map": datasets.Image(),
            "objects": datasets.Sequence(objects),
        }
    )


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {tuple(choices)}")


def _check_range(name: str, value, low: int) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        or not low <= value[0] <= value[1]
    ):
        raise ValueError(f"{name} must be a (min, max) pair of integers with {low} <= min <= max, got {value!r}")
    return int(value[0]), int(value[1])


def _check_count(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def load_shapes(
    split: str = "train",
    num_images: int | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    task: str = "detection",
    num_objects: tuple[int, int] = (1, 6),
) -> datasets.Dataset:
    """Generate one split of the shapes dataset (see the module docstring for the columns).

    split: ``"train"``, ``"validation"``, ``"test"`` or ``"heldout"`` (images with unseen colour-shape pairs).
    num_images: defaults to ``DEFAULT_NUM_IMAGES[split]``. image_size: (min, max) side in pixels, drawn per image
    (``DEFAULT_IMAGE_SIZE[task]``); detection images draw width and height independently, classification images
    are square. seed: the same seed gives byte-identical data. num_objects: (min, max) objects per detection image.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("task", task, TASKS)
    num_images = _check_count("num_images", DEFAULT_NUM_IMAGES[split] if num_images is None else num_images)
    seed = _check_count("seed", seed)
    image_size = _check_range("image_size", DEFAULT_IMAGE_SIZE[task] if image_size is None else image_size, 16)
    num_objects = _check_range("num_objects", num_objects, 1)
    if num_objects[1] > 6:
        raise ValueError(f"num_objects allows at most 6 objects per image, got {num_objects!r}")
    rows = []
    for index in range(num_images):
        # one independent stream per image: image i does not depend on num_images
        rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index])
        if task == "classification":
            rows.append(_classification_example(rng, index, split, image_size))
        else:
            rows.append(_detection_example(rng, index, split, image_size, num_objects))
    features = shapes_features(task)
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(split))


def instance_masks(example: dict) -> np.ndarray:
    """The (num_objects, height, width) boolean masks of a detection example (occlusion already applied)."""
    instance_map = np.asarray(example["instance_map"])
    ids = np.asarray(example["objects"]["id"], dtype=np.int64)
    # (num_objects, 1, 1) == (1, H, W) -> (num_objects, H, W)
    return instance_map[None] == (ids + 1)[:, None, None]


def xywh_to_cxcywh(boxes, width: int, height: int) -> np.ndarray:
    """COCO ``[x, y, w, h]`` pixel boxes (N, 4) -> ``[cx, cy, w, h]`` normalised to [0, 1] (DETR's targets)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.concatenate([centre, boxes[:, 2:]], axis=1) / scale


def phrase_names(combos=COMBINATIONS) -> list[str]:
    """``"red circle"``-style names of colour-shape pairs (zero-shot / grounding prompts)."""
    return [f"{colour} {shape}" for colour, shape in combos]


__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "COMBINATIONS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_NUM_IMAGES",
    "HELDOUT_COMBINATIONS",
    "SEEN_COMBINATIONS",
    "SHAPES",
    "SHAPES_CLASS_NAMES",
    "SPLITS",
    "TASKS",
    "caption_and_spans",
    "instance_masks",
    "load_shapes",
    "phrase_names",
    "shapes_features",
    "xywh_to_cxcywh",
]
