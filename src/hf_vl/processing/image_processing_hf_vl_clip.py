"""Image processor for hf_vl CLIP: bicubic resize of the short side, center crop, CLIP mean/std.

The original preprocessing (openai/CLIP ``clip.py`` ``_transform``; open_clip ``image_transform`` at eval) is
torchvision ``Resize(n, BICUBIC)`` on a PIL image (PIL's antialiased bicubic), ``CenterCrop(n)``, RGB conversion,
``ToTensor`` and ``Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)``. Here the resize runs on uint8 tensors with
torchvision's antialiased bicubic (the same a = -0.5 kernel), which differs from PIL only by rounding: a few uint8
levels at edges (measured max and mean are in ``model_cards/clip.md`` and checked in the processor tests).
Only transformers/torch/PIL/numpy and a sibling file are imported, so the file ships in package-free Hub bundles.
"""

from __future__ import annotations

from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from .image_processing_hf_vl_vit import to_rgb_tensors, validate_images


class HfVlClipImageProcessor(TorchvisionBackend):
    r"""Preprocesses images for ``HfVlClipModel``; returns ``pixel_values`` of shape (batch, 3, crop, crop).

    Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) and any size is accepted and converted to RGB; numpy arrays and
    torch tensors of shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} too, and 4-D batches of them. Other
    inputs raise a ``TypeError``/``ValueError`` naming ``images``. Set ``size={"shortest_edge": 336}`` and
    ``crop_size={"height": 336, "width": 336}`` for ``ViT-L/14@336px``.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = list(OPENAI_CLIP_MEAN)
    image_std = list(OPENAI_CLIP_STD)
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def center_crop(self, image, size, **kwargs):
        # torchvision's CenterCrop rounds the offset (transformers floors it): a 1-pixel shift on odd margins.
        if size.height is None or size.width is None:
            raise ValueError(f"crop_size must have 'height' and 'width', got {size}")
        return tvF.center_crop(image, [size.height, size.width])

    def preprocess(self, images, *args, **kwargs):
        validate_images(images)
        # to_rgb_tensors gives (3, H, W): say so, rather than let transformers guess on 1- or 3-pixel-wide images
        kwargs["input_data_format"] = "channels_first"
        return super().preprocess(to_rgb_tensors(images), *args, **kwargs)


__all__ = ["HfVlClipImageProcessor"]
