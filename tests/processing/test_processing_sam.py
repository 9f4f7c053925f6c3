"""HfVlSamProcessor: prompts in original image coordinates map like segment_anything's ResizeLongestSide, batches pad
with -10, mask prompts land in the low-res frame, and every kind of bad prompt raises a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import SamImageProcessor, SamProcessor

from hf_vl.processing.image_processing_hf_vl_sam import HfVlSamImageProcessor
from hf_vl.processing.processing_hf_vl_sam import HfVlSamProcessor

COFFEE = (400, 600)  # (height, width)
CHELSEA = (300, 451)


@pytest.fixture(scope="module")
def processor():
    return HfVlSamProcessor(HfVlSamImageProcessor())


@pytest.fixture(scope="module")
def small():
    return HfVlSamProcessor(HfVlSamImageProcessor(size=64))


@pytest.mark.parametrize("size", [COFFEE, CHELSEA, (512, 512), (7, 3000)])
def test_points_and_boxes_match_resize_longest_side(processor, size):
    rng = np.random.default_rng(0)
    h, w = size
    points = rng.uniform(0, 1, (3, 2)) * [w, h]
    boxes = np.sort(rng.uniform(0, 1, (3, 2, 2)) * [w, h], axis=1).reshape(3, 4)
    out = processor.process_prompts([size], input_points=[[points]], input_labels=[[[1, 0, 1]]])
    out.update(processor.process_prompts([size], input_boxes=[boxes]))
    transform = ResizeLongestSide(1024)
    np.testing.assert_allclose(out["input_points"][0, 0].numpy(), transform.apply_coords(points, size), rtol=1e-6)
    np.testing.assert_allclose(out["input_boxes"][0].numpy(), transform.apply_boxes(boxes, size), rtol=1e-6)
    assert out["input_points"].dtype == torch.float32 and out["input_labels"].dtype == torch.int64
    assert out["input_points"].shape == (1, 1, 3, 2) and out["input_boxes"].shape == (1, 3, 4)


def test_matches_stock_sam_processor(processor):
    image = skimage.data.coffee()
    prompts = dict(input_points=[[[100, 200], [300, 50]]], input_labels=[[1, 0]], input_boxes=[[[10, 20, 300, 200]]])
    ours = processor(image, **prompts)
    stock = SamProcessor(SamImageProcessor())(image, return_tensors="pt", **prompts)
    for key in ("original_sizes", "reshaped_input_sizes", "input_labels"):
        assert torch.equal(ours[key], stock[key]), key
    for key in ("pixel_values", "input_points", "input_boxes"):
        torch.testing.assert_close(ours[key], stock[key].float(), atol=1e-4, rtol=0, msg=key)


def test_batches_pad_prompts_and_points(small):
    points = [
        [[[10, 20]], [[30, 40], [50, 60]]],  # coffee: 2 prompts with 1 and 2 points
        [[[5, 6]]],  # chelsea: 1 prompt
    ]
    labels = [[[1], [1, 0]], [[0]]]
    out = small.process_prompts([COFFEE, CHELSEA], input_points=points, input_labels=labels)
    assert out["input_points"].shape == (2, 2, 2, 2) and out["input_labels"].shape == (2, 2, 2)
    assert out["input_labels"].tolist() == [[[1, -10], [1, 0]], [[0, -10], [-10, -10]]]
    pad = out["input_labels"] == -10
    assert (out["input_points"][pad] == -10).all()
    for i, size in enumerate([COFFEE, CHELSEA]):  # each real point equals the single-image transform
        for j, (prompt, prompt_labels) in enumerate(zip(points[i], labels[i])):
            single = small.process_prompts([size], input_points=[[prompt]], input_labels=[[prompt_labels]])
            torch.testing.assert_close(out["input_points"][i, j, : len(prompt)], single["input_points"][0, 0])


def test_three_level_nesting_is_one_prompt_per_image(small):
    three = small.process_prompts([COFFEE], input_points=[[[10, 20], [30, 40]]], input_labels=[[1, 0]])
    four = small.process_prompts([COFFEE], input_points=[[[[10, 20], [30, 40]]]], input_labels=[[[1, 0]]])
    for key in three:
        assert torch.equal(three[key], four[key])
    as_tensor = small.process_prompts([COFFEE], input_points=torch.tensor([[[10.0, 20], [30, 40]]]))
    assert torch.equal(as_tensor["input_points"], three["input_points"])


def test_labels_default_to_foreground(small):
    out = small.process_prompts([COFFEE], input_points=[[[[10, 20], [30, 40]]]])
    assert out["input_labels"].tolist() == [[[1, 1]]]


def test_prompts_only_with_original_sizes_and_numpy_output(small):
    out = small(original_sizes=[COFFEE], input_boxes=[[[0, 0, 600, 400]]], return_tensors="np")
    assert set(out) == {"input_boxes"} and isinstance(out["input_boxes"], np.ndarray)
    np.testing.assert_allclose(out["input_boxes"], [[[0, 0, 64, 400 * 43 / 400]]], rtol=1e-6)


def test_mask_prompts(small):
    frame = small.image_processor.mask_pad_size["height"]  # 16 for a 64-pixel model
    ones = np.ones(COFFEE, dtype=np.float32)
    low_res = np.random.default_rng(0).normal(size=(frame, frame)).astype(np.float32)
    out = small.process_prompts([COFFEE, COFFEE], input_masks=[ones, low_res[None]])
    assert out["input_masks"].shape == (2, 1, frame, frame)
    h, w = small.image_processor._get_preprocess_shape(COFFEE, frame)  # (11, 16)
    assert torch.allclose(out["input_masks"][0, 0, :h, :w], torch.ones(h, w))
    assert out["input_masks"][0, 0, h:].abs().sum() == 0  # zero (neutral) logits in the padding
    assert torch.equal(out["input_masks"][1, 0], torch.from_numpy(low_res))  # low-res frame: passed through


def test_processor_output_runs_a_model(small):
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
        window_size=2, global_attn_indexes=[1], num_pos_feats=16,
    )
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    images = [skimage.data.coffee(), skimage.data.chelsea()]
    inputs = small(images, input_points=[[[[10, 20]], [[30, 40], [50, 60]]], [[[5, 6]]]])
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k not in ("original_sizes", "reshaped_input_sizes")})
    assert out.pred_masks.shape == (2, 2, 3, 16, 16)
    masks = small.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert [tuple(m.shape) for m in masks] == [(2, 3, *COFFEE), (2, 3, *CHELSEA)]


def test_save_load_round_trip(tmp_path, small):
    # the image processor inside is resolved by name through AutoImageProcessor: needs hf_vl's "sam" registry row
    import hf_vl  # noqa: F401  (registers the Auto classes)
    from transformers import AutoProcessor

    small.save_pretrained(tmp_path)
    loaded = HfVlSamProcessor.from_pretrained(tmp_path)
    assert type(AutoProcessor.from_pretrained(tmp_path)) is HfVlSamProcessor
    assert isinstance(loaded.image_processor, HfVlSamImageProcessor)
    assert loaded.image_processor.to_dict() == small.image_processor.to_dict()


BAD_PROMPTS = [
    (dict(input_points=[[[601, 10]]]), ValueError, r"input_points\[0\].*outside the image"),
    (dict(input_points=[[[10, -1]]]), ValueError, "outside the image"),
    (dict(input_boxes=[[[0, 0, 601, 10]]]), ValueError, r"input_boxes\[0\].*outside the image"),
    (dict(input_boxes=[[[50, 0, 10, 10]]]), ValueError, "x2 < x1"),
    (dict(input_points=[[[1, 2], [3, 4]]], input_labels=[[1]]), ValueError, "2 points but input_labels"),
    (dict(input_points=[[[[1, 2]], [[3, 4]]]], input_labels=[[[1]]]), ValueError, "2 prompts but input_labels has 1"),
    (dict(input_points=[[[1, 2]]], input_labels=[[2]]), ValueError, "outside"),
    (dict(input_points=[[[1, 2]]], input_labels=[[0.5]]), ValueError, "outside"),
    (dict(input_points=[]), ValueError, "empty"),
    (dict(input_points=[[]]), ValueError, "empty"),
    (dict(input_points=[[[]]]), ValueError, "empty"),
    (dict(input_boxes=[[]]), ValueError, "empty"),
    (dict(input_points=[[[1, 2, 3]]]), ValueError, r"shape \(points, 2\)"),
    (dict(input_points=[[1, 2]]), ValueError, "nested as"),
    (dict(input_points=[[[1, 2]]], input_boxes=[[1, 2, 3, 4]]), ValueError, "nested as"),
    (dict(input_points=[[["a", 2]]]), TypeError, "numbers"),
    (dict(input_points="points"), ValueError, "nested as"),
    (dict(input_points=[[[float("nan"), 2]]]), ValueError, "NaN"),
    (dict(input_labels=[[1]]), ValueError, "without input_points"),
    (dict(input_points=[[[1, 2]], [[3, 4]]]), ValueError, "2 images but 1"),
    (dict(input_points=[[[[1, 2]], [[3, 4]]]], input_boxes=[[[0, 0, 5, 5]]]), ValueError, "2 point prompts but 1"),
    (dict(input_masks=[np.zeros((10, 10))]), ValueError, "original image size"),
    (dict(input_masks=[np.zeros((2, 400, 600))]), ValueError, r"\(1, H, W\)"),
]


@pytest.mark.parametrize("prompts, error, match", BAD_PROMPTS)
def test_bad_prompts_raise(small, prompts, error, match):
    with pytest.raises(error, match=match):
        small.process_prompts([COFFEE], **prompts)


def test_other_errors(small):
    with pytest.raises(ValueError, match="same number of boxes"):
        small.process_prompts([COFFEE, COFFEE], input_boxes=[[[0, 0, 5, 5]], [[0, 0, 5, 5], [1, 1, 2, 2]]])
    with pytest.raises(ValueError, match="original_sizes"):
        small(input_points=[[[1, 2]]])
    with pytest.raises(ValueError, match="image_processor"):
        HfVlSamProcessor()
    # points on the border are inside; label -1 ("not a point") and -10 (padding) points carry no position
    small.process_prompts([COFFEE], input_points=[[[600, 400], [-10, -10], [9999, 0]]], input_labels=[[1, -10, -1]])
