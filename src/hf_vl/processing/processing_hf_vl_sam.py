"""Processor for hf_vl SAM: images plus point / box / mask prompts given in ORIGINAL image coordinates.

Prompts are mapped into the resized (longest side 1024) input frame exactly as segment_anything @dca509f
``ResizeLongestSide.apply_coords`` / ``apply_boxes`` do: x * new_w / old_w, y * new_h / old_h, with the (clamped)
resized shape of ``HfVlSamImageProcessor``. Batches over images and prompts are padded with ``point_pad_value`` (-10,
transformers' SamProcessor convention: the model zeroes those point embeddings).

Nesting (lists, numpy arrays or torch tensors):

* ``input_points``: (images, prompts, points, 2) as [x, y]; or (images, points, 2) meaning one prompt per image
  (transformers' convention). Prompt and point counts may differ between images and prompts: shorter ones are padded
  (points with label -10; whole padded prompts have only -10 labels and their outputs are to be ignored). Padded
  prompts are not bit-identical to unpadded ones: the zero pad tokens still take part in the decoder's attention.
* ``input_labels``: (images, prompts, points) or (images, points), same structure as the points; 1 foreground,
  0 background, -1 "not a point", -10 padding. Defaults to all 1 (foreground) when omitted, as in transformers.
* ``input_boxes``: (images, boxes, 4) as [x1, y1, x2, y2]; every image needs the same number of boxes (a box has no
  padding value); with points, each image needs as many boxes as point prompts (box i goes with prompt i).
* ``input_masks``: one mask prompt per image, (images, H, W) or per image (H, W) / (1, H, W) logits, either at the
  original image size (resized and zero-padded into the low-res mask frame like the image) or already in the
  low-res frame (``mask_pad_size``, e.g. 256x256 ``low_res_logits`` of a previous prediction; passed through).

Validation (ValueError/TypeError naming the argument): prompts outside the image are an ERROR, not clipped: a point
must satisfy 0 <= x <= width and 0 <= y <= height (original pixels; points with label -1/-10 are exempt), a box must
lie inside the same range with x1 <= x2 and y1 <= y2. Also rejected: empty prompt sets, mismatched point/label
counts, labels outside {1, 0, -1, -10}, non-finite values, wrong nesting/shapes/types, prompts for a different number
of images than given.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BatchFeature
from transformers.models.sam.processing_sam import SamProcessor

from .image_processing_hf_vl_sam import HfVlSamImageProcessor  # noqa: F401  (resolved by name on load)
from .image_processing_hf_vl_sam import _sizes_list

_VALID_LABELS = (1, 0, -1)


class HfVlSamProcessor(SamProcessor):
    r"""Wraps an ``HfVlSamImageProcessor`` and transforms prompts into the model's input frame.

    ``processor(images, input_points=..., input_labels=..., input_boxes=..., input_masks=...)`` returns the image
    processor's ``pixel_values``, ``original_sizes``, ``reshaped_input_sizes`` plus ``input_points`` (B, P, N, 2)
    float32, ``input_labels`` (B, P, N) int64, ``input_boxes`` (B, P, 4) float32 and ``input_masks`` (B, 1, h, w)
    float32. Without ``images``, pass ``original_sizes`` (e.g. of an image whose embedding is cached) to transform
    prompts only. See the module docstring for the accepted nesting and the validation rules.
    """

    def __init__(self, image_processor=None, **kwargs):
        if image_processor is None:
            raise ValueError("image_processor is required (an HfVlSamImageProcessor)")
        super().__init__(image_processor, **kwargs)

    def __call__(
        self,
        images=None,
        segmentation_maps=None,
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=None,
        original_sizes=None,
        point_pad_value: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if images is None and original_sizes is None:
            raise ValueError("pass images, or original_sizes (height, width) per image to transform prompts only")
        if images is not None:
            encoding = self.image_processor(
                images, segmentation_maps=segmentation_maps, return_tensors=return_tensors, **kwargs
            )
            original_sizes = encoding["original_sizes"]
        else:
            if segmentation_maps is not None:
                raise ValueError("segmentation_maps need images")
            encoding = BatchFeature({}, tensor_type=return_tensors)
        prompts = self.process_prompts(
            original_sizes,
            input_points=input_points,
            input_labels=input_labels,
            input_boxes=input_boxes,
            input_masks=input_masks,
            point_pad_value=self.point_pad_value if point_pad_value is None else point_pad_value,
            return_tensors=return_tensors,
        )
        encoding.update(prompts)
        return encoding

    def process_prompts(
        self,
        original_sizes,
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=None,
        point_pad_value: int = -10,
        return_tensors: str | None = "pt",
    ) -> dict:
        """Validate prompts given in original image coordinates and map them into the resized input frame.

        Args:
            original_sizes: (batch, 2) (height, width) per image.
            input_points, input_labels, input_boxes, input_masks: see the module docstring.
            point_pad_value: label and coordinate value of padded points.
            return_tensors: "pt" for torch tensors, anything else for numpy arrays.

        Returns:
            dict with the given prompt keys, see the class docstring for shapes.
        """
        sizes = _sizes_list(original_sizes, "original_sizes")
        if input_labels is not None and input_points is None:
            raise ValueError("input_labels were given without input_points")
        out = {}
        points = labels = None
        if input_points is not None:
            points = _split_prompts(input_points, "input_points", leaf=2, num_images=len(sizes))
            if input_labels is None:
                labels = [[np.ones(len(p), dtype=np.int64) for p in image] for image in points]
            else:
                labels = _split_prompts(input_labels, "input_labels", leaf=0, num_images=len(sizes))
                _check_labels(points, labels, point_pad_value)
            for i, size in enumerate(sizes):
                _check_points_inside(points[i], labels[i], size, point_pad_value, f"input_points[{i}]")
            points = [[self._to_input_frame(p, size) for p in image] for image, size in zip(points, sizes)]
            out["input_points"], out["input_labels"] = _pad_points(points, labels, point_pad_value)
        if input_boxes is not None:
            boxes = _split_boxes(input_boxes, len(sizes))
            for i, size in enumerate(sizes):
                _check_boxes_inside(boxes[i], size, f"input_boxes[{i}]")
                if points is not None and len(boxes[i]) != len(points[i]):
                    raise ValueError(
                        f"image {i} has {len(points[i])} point prompts but {len(boxes[i])} boxes in input_boxes; "
                        "with both, give one box per point prompt"
                    )
            frame = [self._to_input_frame(b.reshape(-1, 2), s).reshape(-1, 4) for b, s in zip(boxes, sizes)]
            out["input_boxes"] = np.stack(frame).astype(np.float32)  # (B, K, 4)
        if input_masks is not None:
            out["input_masks"] = self._masks_to_input_frame(input_masks, sizes)
        if return_tensors == "pt":
            out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in out.items()}
        return out

    def _to_input_frame(self, coords: np.ndarray, original_size) -> np.ndarray:
        """(..., 2) x, y in original pixels -> resized-frame pixels (segment_anything ``apply_coords``)."""
        old_h, old_w = original_size
        new_h, new_w = self.image_processor._get_preprocess_shape(original_size, self.target_size)
        coords = coords.astype(np.float64)  # the original computes in float64 too
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def _masks_to_input_frame(self, input_masks, sizes) -> np.ndarray:
        """One mask prompt per image -> (B, 1, h, w) float32 logits in the low-res (``mask_pad_size``) frame."""
        ip = self.image_processor
        pad_h, pad_w = ip.mask_pad_size["height"], ip.mask_pad_size["width"]
        masks = _per_image_list(input_masks, "input_masks", len(sizes))
        result = []
        for i, (mask, size) in enumerate(zip(masks, sizes)):
            mask = _as_float_array(mask, f"input_masks[{i}]")
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if mask.ndim != 2:
                raise ValueError(f"input_masks[{i}] must have shape (H, W) or (1, H, W), got {mask.shape}")
            if mask.shape == (pad_h, pad_w):
                result.append(mask)  # already in the low-res frame (e.g. a previous prediction's logits)
                continue
            if mask.shape != tuple(size):
                raise ValueError(
                    f"input_masks[{i}] has shape {mask.shape}; expected the original image size {tuple(size)} or the "
                    f"low-res mask frame {(pad_h, pad_w)}"
                )
            new_h, new_w = ip._get_preprocess_shape(size, ip.mask_size["longest_edge"])
            # (H, W) -> (1, 1, H, W) for F.interpolate; bilinear as the image, then zero (neutral logit) padding
            resized = F.interpolate(torch.from_numpy(mask)[None, None], (new_h, new_w), mode="bilinear")
            result.append(F.pad(resized, (0, pad_w - new_w, 0, pad_h - new_h))[0, 0].numpy())
        return np.stack(result)[:, None].astype(np.float32)  # (B, 1, h, w)


def _nesting_depth(value) -> int:
    """Depth of a nested list along first elements (arrays count their ndim); raises on empty prompt sets."""
    depth = 0
    while isinstance(value, (list, tuple)):
        if len(value) == 0:
            return -1  # empty: reported by the caller, which knows the argument name
        depth += 1
        value = value[0]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        depth += value.ndim
    return depth


def _as_float_array(value, argument: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise TypeError(f"{argument} must hold numbers in a rectangular nesting ({error})") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{argument} contains NaN or infinite values")
    return array


def _per_image_list(value, argument: str, num_images: int) -> list:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{argument} must be a nested list, numpy array or torch tensor, got {type(value).__name__}")
    if len(value) != num_images:
        raise ValueError(f"{argument} has prompts for {len(value)} images but {num_images} images were given")
    return list(value)


def _split_prompts(value, argument: str, leaf: int, num_images: int) -> list[list[np.ndarray]]:
    """Points (leaf=2) or labels (leaf=0) -> per image, per prompt arrays of shape (N, 2) or (N,)."""
    expected = 4 if leaf else 3
    depth = _nesting_depth(value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value)
    if depth == -1:
        raise ValueError(f"{argument} contains an empty prompt set; give at least one point per prompt and image")
    if depth == expected - 1:  # (images, points[, 2]): one prompt per image
        value = [[image] for image in _per_image_list(value, argument, num_images)]
    elif depth != expected:
        shape = "(images, prompts, points, 2) or (images, points, 2)" if leaf else "(images, prompts, points) or " \
            "(images, points)"
        raise ValueError(f"{argument} must be nested as {shape}; got a nesting depth of {depth}")
    result = []
    for i, image in enumerate(_per_image_list(value, argument, num_images)):
        prompts = []
        for j, prompt in enumerate(image):
            array = _as_float_array(prompt, f"{argument}[{i}][{j}]")
            if array.ndim != (2 if leaf else 1) or (leaf and array.shape[1] != leaf) or len(array) == 0:
                want = "(points, 2)" if leaf else "(points,)"
                raise ValueError(f"{argument}[{i}][{j}] must have shape {want} with points >= 1, got {array.shape}")
            prompts.append(array)
        result.append(prompts)
    return result


def _check_labels(points, labels, pad_value: int) -> None:
    for i, (image_points, image_labels) in enumerate(zip(points, labels)):
        if len(image_points) != len(image_labels):
            raise ValueError(
                f"image {i}: input_points has {len(image_points)} prompts but input_labels has {len(image_labels)}"
            )
        for j, (p, lab) in enumerate(zip(image_points, image_labels)):
            if len(p) != len(lab):
                raise ValueError(
                    f"input_points[{i}][{j}] has {len(p)} points but input_labels[{i}][{j}] has {len(lab)}"
                )
            allowed = (*_VALID_LABELS, pad_value)
            if not np.isin(lab, allowed).all() or (lab != np.round(lab)).any():
                raise ValueError(f"input_labels[{i}][{j}] = {lab.tolist()} holds values outside {list(allowed)}")
        for j, lab in enumerate(image_labels):
            image_labels[j] = lab.astype(np.int64)


def _check_points_inside(prompts, labels, size, pad_value: int, argument: str) -> None:
    height, width = size
    for j, (p, lab) in enumerate(zip(prompts, labels)):
        real = (lab != -1) & (lab != pad_value)  # "not a point" and padding carry no position
        bad = real & ((p[:, 0] < 0) | (p[:, 0] > width) | (p[:, 1] < 0) | (p[:, 1] > height))
        if bad.any():
            raise ValueError(
                f"{argument}[{j}] has point {p[bad][0].tolist()} outside the image (width {width}, height {height}); "
                "prompts are in original image pixels with 0 <= x <= width, 0 <= y <= height"
            )


def _split_boxes(value, num_images: int) -> list[np.ndarray]:
    depth = _nesting_depth(value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value)
    if depth == -1:
        raise ValueError("input_boxes contains an empty box list; give at least one box per image")
    if depth != 3:
        raise ValueError(f"input_boxes must be nested as (images, boxes, 4) [x1, y1, x2, y2]; got a depth of {depth}")
    per_image = _per_image_list(value, "input_boxes", num_images)
    boxes = [_as_float_array(b, f"input_boxes[{i}]") for i, b in enumerate(per_image)]
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"input_boxes[{i}] must have shape (boxes, 4), got {b.shape}")
    if len({len(b) for b in boxes}) != 1:
        counts = [len(b) for b in boxes]
        raise ValueError(f"input_boxes: every image needs the same number of boxes (no box padding), got {counts}")
    return boxes


def _check_boxes_inside(boxes: np.ndarray, size, argument: str) -> None:
    height, width = size
    x1, y1, x2, y2 = boxes.T
    if ((x2 < x1) | (y2 < y1)).any():
        raise ValueError(f"{argument} has a box with x2 < x1 or y2 < y1: {boxes[(x2 < x1) | (y2 < y1)][0].tolist()}")
    outside = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
    if outside.any():
        raise ValueError(
            f"{argument} has box {boxes[outside][0].tolist()} outside the image (width {width}, height {height}); "
            "boxes are [x1, y1, x2, y2] in original image pixels"
        )


def _pad_points(points, labels, pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per image/prompt points -> (B, P, N, 2) float32 and (B, P, N) int64 padded with ``pad_value``."""
    num_prompts = max(len(image) for image in points)
    num_points = max(len(p) for image in points for p in image)
    out_points = np.full((len(points), num_prompts, num_points, 2), pad_value, dtype=np.float32)
    out_labels = np.full((len(points), num_prompts, num_points), pad_value, dtype=np.int64)
    for i, (image_points, image_labels) in enumerate(zip(points, labels)):
        for j, (p, lab) in enumerate(zip(image_points, image_labels)):
            out_points[i, j, : len(p)] = p
            out_labels[i, j, : len(lab)] = lab
    out_points[out_labels == pad_value] = pad_value  # user-padded points too, whatever their transformed coordinates
    return out_points, out_labels


__all__ = ["HfVlSamProcessor"]
