"""HfVlVitImageProcessor: every input kind, batching, numerics against a hand computation with PIL, center crop,
save/load through AutoImageProcessor, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from hf_vl import HfVlVitImageProcessor

SIZE = 32
# one uint8 level after normalising with std 0.5: PIL's and torchvision's antialiased bilinear resizes agree to 1 level
ONE_LEVEL = 1 / 255 / 0.5 + 1e-6


@pytest.fixture
def processor():
    return HfVlVitImageProcessor(size={"height": SIZE, "width": SIZE})


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def by_hand(image: Image.Image, size=(SIZE, SIZE), mean=0.5, std=0.5) -> torch.Tensor:
    """PIL resize (bilinear) + rescale + normalise, written out: (1, 3, h, w)."""
    array = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def close(actual, expected, atol=ONE_LEVEL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ input kinds
def _mode(photo: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":  # PIL keeps the 8-bit values when widening L to 16 bit
        return Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16))
    return photo.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_pil_modes(processor, photo, mode):
    image = _mode(photo, mode)
    assert image.mode == mode
    out = pixels(processor, image)
    assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == torch.float32
    reference = photo.convert("L") if mode in ("L", "LA", "I;16") else image
    close(out, by_hand(reference))


def test_rgba_alpha_is_dropped_like_pil(processor, photo):
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[..., 3] = 0  # fully transparent: PIL's convert("RGB") ignores alpha, arrays must match it
    from_pil = pixels(processor, Image.fromarray(rgba))
    close(from_pil, by_hand(photo))
    close(pixels(processor, rgba), from_pil)


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_arrays_uint8(processor, photo, layout, kind):
    rgb = np.asarray(photo)
    array = {"HWC": rgb, "CHW": rgb.transpose(2, 0, 1), "HW": np.asarray(photo.convert("L"))}[layout]
    image = torch.from_numpy(array.copy()) if kind == "torch" else array
    expected = by_hand(photo.convert("L") if layout == "HW" else photo)
    close(pixels(processor, image), expected)


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_arrays_float(processor, photo, layout, kind):
    rgb = np.asarray(photo).astype(np.float32)
    array = {"HWC": rgb, "CHW": rgb.transpose(2, 0, 1), "HW": np.asarray(photo.convert("L"), np.float32)}[layout]
    image = torch.from_numpy(array.copy()) if kind == "torch" else array
    uint8_result = pixels(processor, array.astype(np.uint8))
    # transformers semantics: floats are rescaled by 1/255 like uint8 unless do_rescale=False
    close(pixels(processor, image), uint8_result, atol=2 * ONE_LEVEL)
    unit = image / 255.0
    close(pixels(processor, unit, do_rescale=False), uint8_result, atol=2 * ONE_LEVEL)


@pytest.mark.parametrize("size", [(1, 1), (500, 1), (1, 500), (7, 5), (17, 600), (640, 480)])
def test_any_pil_size(processor, photo, size):
    image = photo.resize(size)
    close(pixels(processor, image), by_hand(image))


@pytest.mark.parametrize("shape", [(5, 7, 3), (300, 2, 3), (9, 640, 3), (1, 6, 6)])
def test_any_array_size(processor, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = pixels(processor, array)
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()
    if shape[-1] == 3:
        close(out, by_hand(Image.fromarray(array)))


@pytest.mark.parametrize("shape", [(1, 20, 3), (3, 17, 3), (4, 10, 3), (1, 1, 3)])
def test_short_numpy_hwc_images(processor, shape):
    # numpy arrays are channels-last when the shape is ambiguous (PIL / skimage / cv2 layout)
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    close(pixels(processor, array), pixels(processor, Image.fromarray(array)))


def test_default_size_is_224(photo):
    out = pixels(HfVlVitImageProcessor(), photo)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    close(out, by_hand(photo, size=(224, 224)))


def test_return_tensors_np(processor, photo):
    out = processor(photo, return_tensors="np")["pixel_values"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------------------------- batching
def _mixed(photo):
    rgb = np.asarray(photo)
    return [
        photo,
        rgb[100:300, 50:400],  # numpy HWC, other size
        torch.from_numpy(rgb.transpose(2, 0, 1).copy()),  # torch CHW
        np.asarray(photo.convert("L"))[:64, :90],  # numpy HW
        photo.convert("P").resize((45, 20)),
    ]


def test_mixed_list_batched_equals_single(processor, photo):
    images = _mixed(photo)
    batch = pixels(processor, images)
    assert batch.shape == (len(images), 3, SIZE, SIZE)
    singles = torch.cat([pixels(processor, image) for image in images])
    torch.testing.assert_close(batch, singles, atol=0, rtol=0)


def test_list_of_one_equals_single(processor, photo):
    torch.testing.assert_close(pixels(processor, [photo]), pixels(processor, photo), atol=0, rtol=0)


def test_images_keyword_as_pipelines_call_it(processor, photo):
    out = processor(images=[photo, photo], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, pixels(processor, [photo, photo]), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- numerics
def test_normalisation_by_hand():
    """No resize: output is exactly (x / 255 - mean) / std per channel."""
    image = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = HfVlVitImageProcessor(do_resize=False, image_mean=mean, image_std=std)
    out = pixels(processor, image)
    expected = (image.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1)[None].float(), atol=1e-6, rtol=1e-6)
    rescaled = pixels(processor, image, do_normalize=False)
    torch.testing.assert_close(rescaled, torch.from_numpy(image / 255.0).permute(2, 0, 1)[None].float())
    raw = pixels(processor, image, do_normalize=False, do_rescale=False)  # untouched pixels, dtype kept
    torch.testing.assert_close(raw, torch.from_numpy(image).permute(2, 0, 1)[None], atol=0, rtol=0)


def test_known_values_at_extremes(processor):
    """Black maps to (0 - 0.5) / 0.5 = -1, white to +1, mid-grey 128 to 128/127.5 - 1."""
    for value, expected in [(0, -1.0), (255, 1.0), (128, 128 / 127.5 - 1)]:
        out = pixels(processor, np.full((40, 30, 3), value, np.uint8))
        torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-6, rtol=0)


def test_resize_matches_pil_bilinear(processor, photo):
    close(pixels(processor, photo), by_hand(photo))


def test_center_crop_path(photo):
    image = photo.crop((0, 0, 384, 512))  # 384 wide, 512 high
    processor = HfVlVitImageProcessor(
        size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": SIZE, "width": SIZE}
    )
    out = pixels(processor, image)
    assert out.shape == (1, 3, SIZE, SIZE)
    # shortest edge 40 -> 40 x 53 (int(40 * 512 / 384)); centre crop offsets (40 - 32) / 2 = 4, round(21 / 2) = 10
    resized = image.resize((40, 53), Image.BILINEAR).crop((4, 10, 4 + SIZE, 10 + SIZE))
    array = np.asarray(resized, np.float32) / 255.0
    close(out, torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)[None])
    assert not torch.allclose(out, pixels(HfVlVitImageProcessor(size={"height": SIZE, "width": SIZE}), image))


# ------------------------------------------------------------------------------------------------ save/load
def test_save_load_round_trip(tmp_path, photo):
    processor = HfVlVitImageProcessor(
        size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": SIZE, "width": SIZE},
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "HfVlVitImageProcessor"
    expected = pixels(processor, photo)
    for loaded in (HfVlVitImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is HfVlVitImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        torch.testing.assert_close(pixels(loaded, photo), expected, atol=0, rtol=0)


def test_processor_output_runs_the_model(processor, photo):
    from common.tiny import tiny_vit_config

    from hf_vl import HfVlVitForImageClassification

    model = HfVlVitForImageClassification(tiny_vit_config()).eval()
    with torch.no_grad():
        logits = model(**processor([photo, photo.convert("L")], return_tensors="pt")).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (3, TypeError, "images must be"),
        (None, TypeError, "images must be"),
        (3.5, TypeError, "images must be"),
        ({"image": 1}, TypeError, "images must be"),
        (np.zeros((1, 2, 3, 4, 5), np.uint8), ValueError, "shape"),
        ([], ValueError, "empty"),
        (np.zeros((16, 16, 2), np.uint8), ValueError, "shape"),
        (np.zeros((2, 16, 16), np.uint8), ValueError, "shape"),
        (torch.zeros(16, 16, 2), ValueError, "shape"),
        (np.zeros((0, 16, 3), np.uint8), ValueError, "empty"),
        ([np.zeros((8, 8, 3), np.uint8), 7], TypeError, "images must be"),
        ([[]], ValueError, "empty"),
        (Image.new("RGB", (0, 5)), ValueError, "empty"),
    ],
    ids=["int", "None", "float", "dict", "5d", "empty-list", "2ch-hwc", "2ch-chw", "2ch-torch",
         "zero-height", "list-with-int", "nested-empty",
         "empty-pil"],
)
def test_bad_images_raise_clear_errors(processor, images, error, match):
    with pytest.raises(error, match=match):
        processor(images, return_tensors="pt")


def test_sixteen_bit_grayscale_is_scaled_not_clipped(processor):
    # a full-range 16-bit image must not turn white: PIL's convert("RGB") alone clips at 255
    array = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image16 = Image.fromarray(array)
    assert image16.mode == "I;16"
    image8 = Image.fromarray(np.rint(array / 257.0).astype(np.uint8))
    close(pixels(processor, image16), pixels(processor, image8))


def test_four_d_batches(processor, photo):
    array = np.asarray(photo.resize((40, 30)))
    batch_hwc = np.stack([array, array[::-1]])
    batch_chw = torch.from_numpy(batch_hwc).permute(0, 3, 1, 2)
    singles = torch.cat([pixels(processor, array), pixels(processor, np.ascontiguousarray(array[::-1]))])
    close(pixels(processor, batch_hwc), singles)
    close(pixels(processor, batch_chw), singles)
