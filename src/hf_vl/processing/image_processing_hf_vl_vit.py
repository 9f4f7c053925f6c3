"""Image processor for hf_vl ViT: resize, optional center crop, rescale to [0, 1], normalize.

The defaults are the original's evaluation preprocessing (google-research/vision_transformer
``input_pipeline.py``): a plain resize to 224x224 and scaling to [-1, 1] (mean = std = 0.5). Set
``size={"shortest_edge": 256}, do_center_crop=True, crop_size=224`` for timm-style crop evaluation.
Only transformers is imported here so the file ships inside a package-free Hub bundle.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling

_NUMPY_CHANNELS = (1, 3, 4)


def validate_images(images, argument: str = "images") -> None:
    """Raise a clear TypeError / ValueError for anything that is not an image or a (nested) list of images.

    Accepted: PIL images of any mode, numpy arrays and torch tensors of shape (H, W), (H, W, C) or (C, H, W) with
    C in {1, 3, 4}, and 4-D batches of those, (B, H, W, C) or (B, C, H, W).
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{argument} is an empty list; expected at least one image")
        for image in images:
            validate_images(image, argument)
        return
    if isinstance(images, Image.Image):
        if images.width == 0 or images.height == 0:
            raise ValueError(f"{argument} contains an empty image of size {images.size}")
        return
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError(f"{argument} is an empty batch of shape {tuple(images.shape)}")
            return validate_images(list(images), argument)
        shape = tuple(images.shape)
        ok = len(shape) == 2 or (
            len(shape) == 3 and (shape[0] in _NUMPY_CHANNELS or shape[-1] in _NUMPY_CHANNELS)
        )
        if not ok:
            raise ValueError(
                f"{argument} has an array of shape {shape}; expected (H, W), (H, W, C) or (C, H, W) with C in "
                f"{_NUMPY_CHANNELS}"
            )
        if min(shape) == 0:
            raise ValueError(f"{argument} contains an empty array of shape {shape}")
        return
    if isinstance(images, str):
        return  # a path or URL: transformers loads it
    raise TypeError(
        f"{argument} must be a PIL.Image.Image, numpy.ndarray, torch.Tensor, path, or a list of those; "
        f"got {type(images).__name__}"
    )


def to_rgb_tensor(image) -> torch.Tensor:
    """One image as a (3, H, W) tensor; PIL modes go through ``convert("RGB")``, arrays get gray expanded / alpha
    dropped (as PIL does for RGBA), so mixed lists of any modes and sizes can be batched."""
    if isinstance(image, str):
        from transformers.image_utils import load_image

        image = load_image(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(_pil_to_rgb(image))).permute(2, 0, 1)
    # numpy images are channels-last by convention, torch images channels-first: that settles (3, 1, 3)-like shapes
    channels_last = image.shape[-1] in _NUMPY_CHANNELS
    if isinstance(image, torch.Tensor):
        channels_last = channels_last and image.shape[0] not in _NUMPY_CHANNELS
    else:
        channels_last = channels_last or image.shape[0] not in _NUMPY_CHANNELS
    tensor = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image  # copy: arrays may be read-only
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif channels_last:
        tensor = tensor.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3].contiguous()


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """``convert("RGB")``, except that 16-bit grayscale using more than 8 bits is scaled to 8 bits first (PIL would
    clip it at 255); values within 0-255 are kept as they are, as PIL does when it widens L to I;16."""
    if image.mode.startswith("I") and np.asarray(image).max(initial=0) > 255:
        array = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_rgb_tensors(images):
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)  # a (B, ...) batch
    if isinstance(images, (list, tuple)):
        return [to_rgb_tensors(image) for image in images]
    return to_rgb_tensor(images)


class HfVlVitImageProcessor(TorchvisionBackend):
    r"""Preprocesses images for ``HfVlVitModel``; returns ``pixel_values`` of shape (batch, 3, height, width).

    Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) is converted to RGB; grayscale and RGBA arrays are expanded /
    composited the same way.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def preprocess(self, images, *args, **kwargs):
        validate_images(images)
        # to_rgb_tensors gives (3, H, W): say so, rather than let transformers guess on 1- or 3-pixel-wide images
        kwargs["input_data_format"] = "channels_first"
        return super().preprocess(to_rgb_tensors(images), *args, **kwargs)


__all__ = ["HfVlVitImageProcessor", "validate_images", "to_rgb_tensor"]
