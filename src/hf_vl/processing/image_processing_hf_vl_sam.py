"""Image processor for hf_vl SAM (Segment Anything, Kirillov et al. 2023, arXiv:2304.02643).

Reproduces segment_anything @dca509f ``ResizeLongestSide.apply_image`` + ``Sam.preprocess``: resize so the longest side
is 1024 (bilinear with antialiasing on uint8, as torchvision/PIL do there; new side = ``int(side * scale + 0.5)``),
normalise with SAM's pixel mean/std (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) on the 0-255 scale, then
zero-pad bottom/right to 1024x1024. ``post_process_masks`` undoes it (upsample to the padded frame, crop the padding,
resize to the original size), as ``Sam.postprocess_masks`` does.

It subclasses transformers' ``SamImageProcessor`` so the stock ``pipeline("mask-generation")`` and ``SamProcessor``
conventions work unchanged (ecosystem.md section 3.1); mask-generation helpers (``generate_crop_boxes``,
``filter_masks``, ``post_process_for_mask_generation``) are inherited.

Input conversion (documented deviations from segment_anything, which takes only uint8 HWC RGB arrays):

* PIL images of any mode go through ``convert("RGB")`` (RGBA/LA drop alpha, P/CMYK/1 map to RGB), except that 16-bit
  grayscale (I;16, I) using values above 255 is scaled to 8 bits (x / 257) instead of being clipped at 255.
* numpy arrays and torch tensors of shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} (numpy is taken as
  channels-last, torch as channels-first when ambiguous); gray is repeated to RGB, a 4th (alpha) channel is dropped.
  uint8 is used as is; other integer dtypes must hold values in [0, 65535] and are scaled by 1/257 when any value
  exceeds 255 (16-bit data), else used as 8-bit values; float arrays are taken as 0-255 values (as
  ``SamPredictor.set_torch_image`` expects). bool/complex/object arrays and non-finite floats are rejected.
* Tiny images: every image of at least 1x1 pixel is accepted. The resized short side is ``max(1, ...)`` so extreme
  aspect ratios (e.g. 1x5000, where segment_anything's rounding gives a zero-size image and fails) still work; prompts
  use the same clamped shape, so coordinates stay consistent. Empty (0-pixel) images raise ValueError.

Only transformers/torch/numpy/PIL and single-dot siblings are imported, so the file ships in package-free Hub bundles.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.sam.image_processing_sam import SamImageProcessor

from .sam_mask_ops import filter_masks as fast_filter_masks
from .sam_mask_ops import post_process_for_mask_generation as fast_post_process_for_mask_generation
from .image_processing_hf_vl_vit import to_rgb_tensor, to_rgb_tensors, validate_images

# segment_anything's Sam.pixel_mean / pixel_std (0-255 scale); the processor rescales to [0, 1] first, hence / 255
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# SAM's mask decoder predicts masks at 1/4 of the input resolution (embedding stride 16, then 4x upscaling)
LOW_RES_MASK_RATIO = 4


class HfVlSamImageProcessor(SamImageProcessor):
    r"""Preprocesses images for ``HfVlSamModel``: ``pixel_values`` (batch, 3, L, L), ``original_sizes`` and
    ``reshaped_input_sizes`` (batch, 2) as (height, width), with L = ``size["longest_edge"]`` (1024 for SAM).

    Args:
        size: ``{"longest_edge": L}`` or an int L. When only ``size`` is given, ``pad_size`` becomes L x L and the
            mask frame (``mask_size``, ``mask_pad_size``) L/4, so ``HfVlSamImageProcessor(size=64)`` fits a 64-pixel
            test model.
        other arguments: as transformers' ``SamImageProcessor``.
    """

    image_mean = [m / 255.0 for m in SAM_PIXEL_MEAN]
    image_std = [s / 255.0 for s in SAM_PIXEL_STD]

    def __init__(self, **kwargs):
        _derive_sizes(kwargs)
        super().__init__(**kwargs)
        longest = self.size["longest_edge"]
        if self.do_pad and (self.pad_size["height"] < longest or self.pad_size["width"] < longest):
            raise ValueError(f"pad_size {dict(self.pad_size)} must be at least size['longest_edge'] = {longest}")

    def _get_preprocess_shape(self, old_shape, longest_edge: int):
        """(height, width) after resizing the longest side to ``longest_edge`` (segment_anything's rounding), never
        below 1 pixel. The processor's prompt transform calls this too, so images and prompts stay consistent."""
        old_h, old_w = (int(v) for v in old_shape)
        new_h, new_w = super()._get_preprocess_shape((old_h, old_w), longest_edge)
        return max(new_h, 1), max(new_w, 1)

    def preprocess(self, images, segmentation_maps=None, **kwargs):
        validate_sam_images(images)
        images = to_rgb_tensors(to_supported_dtype(images))
        # to_rgb_tensors gives (3, H, W): say so, rather than let transformers guess on 1- or 3-pixel-wide images
        kwargs["input_data_format"] = "channels_first"
        return super().preprocess(images, segmentation_maps, **kwargs)

    def generate_crop_boxes(self, image, target_size, *args, **kwargs):
        """As transformers' ``SamImageProcessor.generate_crop_boxes``, after the same input checks and RGB conversion
        as ``preprocess`` (one image)."""
        if isinstance(image, (list, tuple)):
            raise ValueError("generate_crop_boxes takes one image, not a list")
        validate_sam_images(image)
        return super().generate_crop_boxes(to_rgb_tensor(to_supported_dtype(image)), target_size, *args, **kwargs)

    def post_process_masks(
        self, masks, original_sizes, reshaped_input_sizes, mask_threshold=0.0, binarize=True, pad_size=None
    ):
        """Upsample low-res mask logits to the original image sizes (segment_anything ``Sam.postprocess_masks``).

        Args:
            masks: a (batch, ...) tensor/array or a list with one (..., h, w) tensor/array per image, e.g. the model's
                ``pred_masks`` (batch, prompts, masks, 256, 256). Leading dims other than the last two are kept.
            original_sizes, reshaped_input_sizes: (batch, 2) (height, width) from the processor.
            mask_threshold, binarize: with ``binarize`` the result is ``logits > mask_threshold`` (bool).
            pad_size: the padded input frame; defaults to ``self.pad_size``.

        Returns:
            list with one tensor per image of shape (..., original_height, original_width).
        """
        original_sizes = _sizes_list(original_sizes, "original_sizes")
        reshaped_input_sizes = _sizes_list(reshaped_input_sizes, "reshaped_input_sizes")
        masks = _masks_list(masks)
        if not len(masks) == len(original_sizes) == len(reshaped_input_sizes):
            raise ValueError(
                f"masks ({len(masks)} images), original_sizes ({len(original_sizes)}) and reshaped_input_sizes "
                f"({len(reshaped_input_sizes)}) must have one entry per image"
            )
        outputs = []
        for mask in masks:
            leading = mask.shape[:-2]
            # (..., h, w) -> (n, 1, h, w): F.interpolate wants 4-D, any number of leading dims is fine for users
            flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
            outputs.append((flat, leading))
        processed = super().post_process_masks(
            [flat for flat, _ in outputs],
            original_sizes,
            reshaped_input_sizes,
            mask_threshold=mask_threshold,
            binarize=binarize,
            pad_size=pad_size,
        )
        return [out.reshape(*leading, *out.shape[-2:]) for out, (_, leading) in zip(processed, outputs)]

    def filter_masks(
        self,
        masks,
        iou_scores,
        original_size,
        cropped_box_image,
        pred_iou_thresh=0.88,
        stability_score_thresh=0.95,
        mask_threshold=0,
        stability_score_offset=1,
        return_tensors="pt",
    ):
        """transformers' ``filter_masks`` (used by the mask-generation pipeline), computed with hf_vl's vectorised
        mask ops: the IoU filter runs first, so stability scores, boxes and RLEs are only computed on survivors."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        return fast_filter_masks(
            masks,
            iou_scores,
            original_size,
            cropped_box_image,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            mask_threshold=mask_threshold,
            stability_score_offset=stability_score_offset,
        )

    def post_process_for_mask_generation(
        self, all_masks, all_scores, all_boxes, crops_nms_thresh, return_tensors="pt"
    ):
        """Box NMS across crops (torchvision) and RLE decoding, as transformers' method of the same name."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        return fast_post_process_for_mask_generation(all_masks, all_scores, all_boxes, crops_nms_thresh)


def _derive_sizes(kwargs: dict) -> None:
    """Fill pad_size / mask_size / mask_pad_size from ``size`` when only ``size`` is given (in place)."""
    size = kwargs.get("size")
    if size is None:
        return
    if isinstance(size, int):
        size = kwargs["size"] = {"longest_edge": size}
    if not isinstance(size, dict) or "longest_edge" not in size:
        raise ValueError(f"size must be an int or {{'longest_edge': int}} for SAM, got {size!r}")
    longest = int(size["longest_edge"])
    if longest < LOW_RES_MASK_RATIO:
        raise ValueError(f"size['longest_edge'] must be at least {LOW_RES_MASK_RATIO}, got {longest}")
    low_res = longest // LOW_RES_MASK_RATIO
    kwargs.setdefault("pad_size", {"height": longest, "width": longest})
    kwargs.setdefault("mask_size", {"longest_edge": low_res})
    kwargs.setdefault("mask_pad_size", {"height": low_res, "width": low_res})


def validate_sam_images(images, argument: str = "images") -> None:
    """``validate_images`` (types, shapes, empty images) plus the dtype checks documented in the module docstring."""
    validate_images(images, argument)
    for array in _iter_arrays(images):
        dtype = str(array.dtype)
        if dtype == "bool" or "complex" in dtype or dtype == "object":
            raise TypeError(f"{argument} has an array of dtype {dtype}; expected uint8, another integer type or float")
        if isinstance(array, torch.Tensor):
            non_finite = array.is_floating_point() and not bool(torch.isfinite(array).all())
        else:
            non_finite = np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()
        if non_finite:
            raise ValueError(f"{argument} has a float array with NaN or infinite values")


def _iter_arrays(images):
    if isinstance(images, (list, tuple)):
        for image in images:
            yield from _iter_arrays(image)
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        yield images


def to_supported_dtype(images):
    """Integer dtypes other than uint8 -> uint8 (16-bit data scaled by 1/257); others unchanged. numpy stays numpy
    (its channels-last convention decides ambiguous layouts), torch stays torch."""
    if isinstance(images, (list, tuple)):
        return [to_supported_dtype(image) for image in images]
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        return images  # PIL images (converted by to_rgb_tensor) and paths
    is_numpy = isinstance(images, np.ndarray)
    tensor = torch.from_numpy(np.array(images)) if is_numpy else images  # copy: arrays may be read-only
    if tensor.is_floating_point() or tensor.dtype == torch.uint8:
        return images
    values = tensor.to(torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"images: integer pixel values must lie in [0, 65535], got [{low}, {high}]")
    if high > 255:  # 16-bit data: 65535 -> 255, as the PIL I;16 path
        values = torch.round(values.to(torch.float32) / 257.0)
    values = values.to(torch.uint8)
    return values.numpy() if is_numpy else values


def _sizes_list(sizes, argument: str) -> list[tuple[int, int]]:
    if isinstance(sizes, (torch.Tensor, np.ndarray)):
        sizes = sizes.tolist()
    if not isinstance(sizes, (list, tuple)):
        raise TypeError(f"{argument} must be a (batch, 2) tensor/array or a list of (height, width), got {type(sizes)}")
    result = []
    for size in sizes:
        size = size.tolist() if isinstance(size, (torch.Tensor, np.ndarray)) else size
        if not isinstance(size, (list, tuple, torch.Size)) or len(size) != 2:
            raise ValueError(f"{argument} must hold (height, width) pairs, got {size!r}")
        result.append((int(size[0]), int(size[1])))
    return result


def _masks_list(masks) -> list[torch.Tensor]:
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        masks = list(masks)  # (batch, ...) -> one entry per image
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks must be a tensor, an array or a list of them, got {type(masks).__name__}")
    result = []
    for mask in masks:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks must hold torch tensors or numpy arrays, got {type(mask).__name__}")
        if mask.ndim < 2:
            raise ValueError(f"each image's masks must have shape (..., height, width), got {tuple(mask.shape)}")
        result.append(mask)
    return result


__all__ = ["HfVlSamImageProcessor", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "validate_sam_images", "to_supported_dtype"]
