"""HfVlSamImageProcessor: parity with segment_anything's ResizeLongestSide + Sam.preprocess on real photographs,
every input kind, tiny images, post_process_masks against Sam.postprocess_masks, save/load, and clear errors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import SamImageProcessor

from hf_vl.processing.image_processing_hf_vl_sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, HfVlSamImageProcessor

MEAN = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
STD = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
SMALL = 64  # fast tests use a 64-pixel frame; the parity tests use SAM's 1024


def coffee_with_large_copy():
    coffee = skimage.data.coffee()
    return np.ascontiguousarray(np.repeat(np.repeat(coffee, 3, axis=0), 3, axis=1))  # 1200x1800: downscaled to 1024


PHOTOS = {
    "astronaut": skimage.data.astronaut,  # 512x512: upscaled 2x
    "coffee": skimage.data.coffee,  # 400x600: 683x1024
    "chelsea": skimage.data.chelsea,  # 300x451
    "coffee 1200x1800": coffee_with_large_copy,
}


def segment_anything_pixels(image: np.ndarray, length: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """segment_anything: ResizeLongestSide.apply_image (uint8 HWC) then Sam.preprocess (normalise, pad)."""
    resized = ResizeLongestSide(length).apply_image(image)
    x = (torch.as_tensor(resized).permute(2, 0, 1).float() - MEAN) / STD
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, length - w, 0, length - h)), (h, w)


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


@pytest.fixture
def small():
    return HfVlSamImageProcessor(size=SMALL)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(PHOTOS))
def test_matches_segment_anything_preprocessing(name):
    image = PHOTOS[name]()
    expected, reshaped = segment_anything_pixels(image)
    out = HfVlSamImageProcessor()(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 1024, 1024)
    assert out["original_sizes"].tolist() == [list(image.shape[:2])]
    assert out["reshaped_input_sizes"].tolist() == [list(reshaped)]
    levels = ((out["pixel_values"][0] - expected) * STD).abs()  # back on the 0-255 scale
    # torchvision's uint8 antialiased bilinear vs PIL's: equal up to rounding, never more than one level
    assert levels.max().item() <= 1.0 + 1e-3, levels.max().item()
    assert (levels > 0.5).float().mean().item() < 1e-3  # measured: <= 2e-4 of the values
    h, w = reshaped
    assert out["pixel_values"][0, :, h:].abs().sum() == 0 and out["pixel_values"][0, :, :, w:].abs().sum() == 0


def test_defaults_are_sams():
    processor = HfVlSamImageProcessor()
    assert processor.size["longest_edge"] == 1024
    assert dict(processor.pad_size) == {"height": 1024, "width": 1024}
    np.testing.assert_allclose(np.array(processor.image_mean) * 255, SAM_PIXEL_MEAN, rtol=1e-6)
    np.testing.assert_allclose(np.array(processor.image_std) * 255, SAM_PIXEL_STD, rtol=1e-6)
    assert isinstance(processor, SamImageProcessor)


def test_size_sets_pad_and_mask_frames():
    processor = HfVlSamImageProcessor(size=64)
    assert processor.size["longest_edge"] == 64
    assert dict(processor.pad_size) == {"height": 64, "width": 64}
    assert processor.mask_size["longest_edge"] == 16
    assert dict(processor.mask_pad_size) == {"height": 16, "width": 16}
    with pytest.raises(ValueError, match="pad_size"):
        HfVlSamImageProcessor(size=64, pad_size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="size"):
        HfVlSamImageProcessor(size={"height": 64, "width": 64})


# ------------------------------------------------------------------------------------------------ input kinds
def _sixteen_bit_full_range(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint16) * 257)  # 0..65535


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16"])
def test_pil_modes_match_documented_rgb_conversion(small, mode):
    photo = Image.fromarray(skimage.data.chelsea())
    if mode == "I;16":
        image = _sixteen_bit_full_range(np.asarray(photo.convert("L")))
        reference = photo.convert("L").convert("RGB")  # x * 257 / 257 = the 8-bit values
    else:
        image = photo.convert(mode)
        reference = image.convert("RGB")
    torch.testing.assert_close(pixels(small, image), pixels(small, np.asarray(reference)), atol=1e-6, rtol=0)


def test_array_layouts_agree(small):
    rgb = skimage.data.coffee()
    expected = pixels(small, rgb)  # numpy HWC
    torch.testing.assert_close(pixels(small, torch.from_numpy(rgb).permute(2, 0, 1)), expected)  # torch CHW
    torch.testing.assert_close(pixels(small, Image.fromarray(rgb)), expected)
    torch.testing.assert_close(pixels(small, np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], -1)), expected)
    gray = rgb[..., 0]
    torch.testing.assert_close(pixels(small, gray), pixels(small, np.stack([gray] * 3, -1)))  # HW
    torch.testing.assert_close(pixels(small, torch.from_numpy(gray)[None]), pixels(small, gray))  # torch 1HW


def test_other_dtypes(small):
    rgb = skimage.data.coffee()
    expected = pixels(small, rgb)
    torch.testing.assert_close(pixels(small, rgb.astype(np.uint16) * 257), expected)  # 16-bit data: / 257
    torch.testing.assert_close(pixels(small, rgb.astype(np.int32)), expected)  # 8-bit values in a wider type
    torch.testing.assert_close(pixels(small, rgb.astype(np.float32)), expected, atol=2e-2, rtol=0)  # 0-255 floats


def test_batch_equals_single_images(small):
    images = [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea()[..., 0]]
    batch = small(images, return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, SMALL, SMALL)
    for i, image in enumerate(images):
        single = small(image, return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"][i : i + 1], single["pixel_values"])
        assert batch["reshaped_input_sizes"][i].tolist() == single["reshaped_input_sizes"][0].tolist()


@pytest.mark.parametrize(
    "shape, reshaped",
    [((1, 1), (64, 64)), ((1, 5000), (1, 64)), ((5000, 2), (64, 1)), ((3, 2), (64, 43))],
)
def test_tiny_and_extreme_images(small, shape, reshaped):
    image = np.full((*shape, 3), 200, dtype=np.uint8)
    out = small(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, SMALL, SMALL)
    assert out["original_sizes"][0].tolist() == list(shape)
    assert out["reshaped_input_sizes"][0].tolist() == list(reshaped)  # short side clamped to >= 1 pixel


def test_stock_processor_fails_where_we_clamp():
    # documents why the short side is clamped: the stock rounding gives a 0-pixel side
    assert SamImageProcessor()._get_preprocess_shape((1, 5000), 1024) == (0, 1024)
    assert HfVlSamImageProcessor()._get_preprocess_shape((1, 5000), 1024) == (1, 1024)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((4, 4, 3), dtype=bool), TypeError, "bool"),
        (np.zeros((4, 4, 3), dtype=np.complex64), TypeError, "complex"),
        (np.zeros((5, 5, 2), dtype=np.uint8), ValueError, "shape"),
        (np.zeros((0, 4, 3), dtype=np.uint8), ValueError, "empty"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), ValueError, "NaN"),
        (np.full((4, 4, 3), -1, dtype=np.int16), ValueError, "65535"),
        (np.full((4, 4, 3), 70000, dtype=np.int32), ValueError, "65535"),
        ({"image": 1}, TypeError, "PIL"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_images_raise(small, image, error, match):
    with pytest.raises(error, match=match):
        small(image, return_tensors="pt")


# ------------------------------------------------------------------------------------------------ post-processing
def test_post_process_masks_matches_segment_anything():
    processor = HfVlSamImageProcessor()
    original, reshaped = (400, 600), (683, 1024)
    logits = torch.randn(2, 3, 256, 256)
    fake_sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))
    expected = Sam.postprocess_masks(fake_sam, logits, reshaped, original)  # (2, 3, 400, 600)
    ours = processor.post_process_masks(logits[None], [original], [reshaped], binarize=False)
    assert len(ours) == 1 and ours[0].shape == (2, 3, 400, 600)
    torch.testing.assert_close(ours[0], expected)
    binary = processor.post_process_masks([logits.numpy()], torch.tensor([original]), torch.tensor([reshaped]))
    assert binary[0].dtype == torch.bool and torch.equal(binary[0], expected > 0)


def test_post_process_masks_round_trip(small):
    """A mask pushed through the forward geometry (resize + pad into the low-res frame) comes back."""
    original = (30, 45)
    mask = torch.zeros(original)
    mask[5:20, 10:40] = 1
    h, w = small._get_preprocess_shape(original, small.mask_size["longest_edge"])
    low = torch.nn.functional.interpolate(mask[None, None], (h, w), mode="bilinear")
    low = torch.nn.functional.pad(low, (0, 16 - w, 0, 16 - h)) * 20 - 10  # logits, (1, 1, 16, 16)
    reshaped = small._get_preprocess_shape(original, SMALL)
    back = small.post_process_masks([low], [original], [reshaped])[0][0, 0]
    iou = (back & mask.bool()).sum() / (back | mask.bool()).sum()
    assert back.shape == original and iou > 0.85


def test_post_process_masks_errors(small):
    with pytest.raises(ValueError, match="one entry per image"):
        small.post_process_masks(torch.zeros(2, 1, 3, 16, 16), [(30, 40)], [(48, 64)])
    with pytest.raises(TypeError, match="masks"):
        small.post_process_masks("masks", [(30, 40)], [(48, 64)])
    with pytest.raises(ValueError, match="height, width"):
        small.post_process_masks(torch.zeros(1, 1, 3, 16, 16), [(30, 40, 3)], [(48, 64)])


def test_generate_crop_boxes_accepts_any_mode(small):
    gray = Image.fromarray(skimage.data.chelsea()).convert("L")
    boxes, points, crops, labels = small.generate_crop_boxes(gray, SMALL, points_per_crop=4)
    assert boxes.tolist() == [[0, 0, 451, 300]]
    assert points.shape == (1, 16, 1, 2) and crops[0].shape == (3, 300, 451) and labels.shape == (1, 16, 1)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path, small):
    small.save_pretrained(tmp_path)
    loaded = HfVlSamImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == small.to_dict()
    image = skimage.data.coffee()
    torch.testing.assert_close(pixels(loaded, image), pixels(small, image))
