"""Collators turning ``datasets`` rows (PIL images + annotations) into model batches inside ``Trainer``.

Images are preprocessed per batch by the model's image processor, so the dataset stays a plain ``datasets.Dataset``
with ``Image()`` columns (set ``remove_unused_columns=False``: Trainer would otherwise drop ``image`` before the
collator sees it, ecosystem.md section 4.2).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from ..data.shapes import xywh_to_cxcywh


def _column(examples: list[dict], name: str) -> list:
    if not examples:
        raise ValueError("examples is empty; a batch needs at least one example")
    missing = [i for i, example in enumerate(examples) if name not in example]
    if missing:
        raise KeyError(
            f"column {name!r} is missing from examples {missing[:5]} (keys: {sorted(examples[missing[0]])}); "
            "set TrainingArguments(remove_unused_columns=False)"
        )
    return [example[name] for example in examples]


_FLIP_DIMS = {"horizontal": -1, "vertical": -2}


def with_array_column(dataset, source: str, target: str, compute, batch_size: int, tag: str,
                      torch_columns: list[str] | None = None):
    """Replace column ``source`` by a fixed-shape float32 ``Array3D`` column ``target`` = ``compute(batch)`` (a
    batched map, run once), formatted as torch (only ``torch_columns`` when given; the rest stay Python objects).

    ``tag`` names the result in the dataset fingerprint, so the processor or model inside ``compute`` is not hashed.
    """
    first = np.asarray(compute(dataset[:1]))[0]
    features = datasets.Features({k: v for k, v in dataset.features.items() if k != source})
    features[target] = datasets.Array3D(shape=first.shape, dtype="float32")

    def process(batch):
        values = np.asarray(compute(batch), dtype=np.float32)
        if values.shape[1:] != first.shape:
            raise ValueError(f"{target} has shape {values.shape[1:]} and {first.shape}: not a fixed size")
        return {target: values}

    processed = dataset.map(
        process, batched=True, batch_size=batch_size, remove_columns=[source], features=features,
        new_fingerprint=f"{dataset._fingerprint}-{tag}",
    )  # fmt: skip
    if torch_columns is None:
        return processed.with_format("torch")
    return processed.with_format("torch", columns=torch_columns, output_all_columns=True)


def with_pixel_values(dataset, image_processor, image_column: str = "image", batch_size: int = 256):
    """Run ``image_processor`` once over ``dataset``: ``image_column`` becomes a fixed-shape ``pixel_values``
    (``Array3D``) column and the dataset is formatted as torch.

    Decoding PNGs and resizing every epoch costs more than a small model's step; doing it once keeps the
    per-batch work to a stack. Needs a processor with a fixed output size (e.g. ``size={"height": h, "width": w}``).
    """
    if image_column not in dataset.column_names:
        raise ValueError(f"image_column={image_column!r} is not a column of the dataset ({dataset.column_names})")

    def compute(batch):
        return image_processor(batch[image_column], return_tensors="np")["pixel_values"]

    return with_array_column(dataset, image_column, "pixel_values", compute, batch_size, "pixel-values")


class ImageClassificationCollator:
    """Rows -> ``{"pixel_values": (B, 3, H, W), "labels": (B,) long}``.

    Rows carry either ``pixel_values`` (see ``with_pixel_values``), which are stacked, or a PIL ``image_column``
    run through ``image_processor`` here. random_flips: any of ``"horizontal"``, ``"vertical"``; each example is
    flipped with probability 1/2 along each (torch's global RNG, which Trainer seeds), for label-preserving
    augmentation. Use a collator without flips for evaluation.
    """

    def __init__(
        self,
        image_processor=None,
        image_column: str = "image",
        label_column: str = "label",
        random_flips: tuple[str, ...] = (),
    ):
        if image_processor is not None and not callable(image_processor):
            raise TypeError(f"image_processor must be callable, got {type(image_processor).__name__}")
        unknown = [flip for flip in random_flips if flip not in _FLIP_DIMS]
        if isinstance(random_flips, str) or unknown:
            raise ValueError(f"random_flips must be a tuple of {tuple(_FLIP_DIMS)}, got {random_flips!r}")
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.random_flips = tuple(random_flips)

    def _pixel_values(self, examples: list[dict]) -> torch.Tensor:
        if examples and "pixel_values" in examples[0]:
            return torch.stack([torch.as_tensor(pixels) for pixels in _column(examples, "pixel_values")])
        if self.image_processor is None:
            raise ValueError("examples have no pixel_values; pass an image_processor to preprocess their images")
        return self.image_processor(_column(examples, self.image_column), return_tensors="pt")["pixel_values"]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = self._pixel_values(examples)
        for flip in self.random_flips:
            flipped = torch.rand(pixel_values.shape[0]) < 0.5
            # (B,) -> (B, 1, 1, 1) to select whole images
            pixel_values = torch.where(flipped[:, None, None, None], pixel_values.flip(_FLIP_DIMS[flip]), pixel_values)
        labels = torch.tensor([int(label) for label in _column(examples, self.label_column)], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


class ShapesDetectionCollator:
    """Shapes detection rows -> ``{"pixel_values", ["pixel_mask"], "labels"}`` in the DETR convention.

    ``labels`` is a list with one dict per image: ``class_labels`` (num_objects,) long and ``boxes``
    (num_objects, 4) float, normalised ``[cx, cy, w, h]`` relative to the original image (unchanged by a resize).
    An image processor that pads should return ``pixel_mask``; it is passed through.
    """

    def __init__(self, image_processor, image_column: str = "image", objects_column: str = "objects"):
        if not callable(image_processor):
            raise TypeError(f"image_processor must be callable, got {type(image_processor).__name__}")
        self.image_processor = image_processor
        self.image_column = image_column
        self.objects_column = objects_column

    def __call__(self, examples: list[dict]) -> dict:
        images = _column(examples, self.image_column)
        batch = self.image_processor(images, return_tensors="pt")
        labels = []
        for image, objects in zip(images, _column(examples, self.objects_column)):
            boxes = xywh_to_cxcywh(objects["bbox"], image.width, image.height)
            labels.append(
                {
                    "class_labels": torch.as_tensor(objects["category"], dtype=torch.long),
                    "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                }
            )
        out = {"pixel_values": batch["pixel_values"], "labels": labels}
        if "pixel_mask" in batch:
            out["pixel_mask"] = batch["pixel_mask"]
        return out


__all__ = ["ImageClassificationCollator", "ShapesDetectionCollator", "with_pixel_values"]
