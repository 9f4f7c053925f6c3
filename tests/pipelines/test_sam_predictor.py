"""HfVlSamPredictor on tiny SAM models (transformers' SamModel, and hf_vl's HfVlSamModel): cached embedding, agreement
with the raw model forward + post-processing, batched == single prompts, parity with segment_anything's SamPredictor
on the same weights and a real photograph, and clear errors."""

from __future__ import annotations

import functools
import importlib.util
import re

import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamPredictor
from segment_anything import modeling as sam_modeling
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from hf_vl.pipelines import HfVlSamPredictor
from hf_vl.processing.image_processing_hf_vl_sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, HfVlSamImageProcessor
from hf_vl.processing.processing_hf_vl_sam import HfVlSamProcessor

IMAGE_SIZE, PATCH, WIDTH, DIM = 64, 16, 32, 32  # checkpoints.md "HF check" sizes: 4x4 embedding, 16x16 low-res masks
LOW_RES = IMAGE_SIZE // 4
HAS_HF_VL_SAM = importlib.util.find_spec("hf_vl.modeling.modeling_hf_vl_sam") is not None
MODEL_KINDS = ["transformers"] + (["hf_vl"] if HAS_HF_VL_SAM else [])
POINTS = np.array([[100.0, 200.0], [300.0, 50.0]])  # coffee is 600 wide, 400 high
LABELS = np.array([1, 0])
BOX = np.array([10.0, 20.0, 300.0, 200.0])


# ------------------------------------------------------------------------------------------------ models
def tiny_transformers_sam() -> SamModel:
    vision = SamVisionConfig(
        hidden_size=WIDTH, output_channels=DIM, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH, window_size=2, global_attn_indexes=[1], num_pos_feats=DIM // 2,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=DIM, image_size=IMAGE_SIZE, patch_size=PATCH, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=DIM, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


TINY_HF_VL_DECODER = dict(hidden_size=DIM, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)


def tiny_hf_vl_sam():
    from hf_vl.modeling.configuration_hf_vl_sam import HfVlSamConfig
    from hf_vl.modeling.modeling_hf_vl_sam import HfVlSamModel

    vision = dict(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * WIDTH,
        image_size=IMAGE_SIZE, patch_size=PATCH, window_size=2, global_attn_indexes=[1], output_channels=DIM,
    )  # fmt: skip
    config = HfVlSamConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=DIM, mask_input_channels=4),
        mask_decoder_config=TINY_HF_VL_DECODER,
    )  # fmt: skip
    return HfVlSamModel(config)


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """O(1) random weights everywhere (default inits leave norms at 1/0 and some tables at 0)."""
    generator = torch.Generator().manual_seed(1234)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(0.1 * noise if param.ndim <= 1 else noise / (param.numel() / param.shape[0]) ** 0.5)
    return model.eval()


def build_model(kind: str):
    torch.manual_seed(0)
    return randomize_(tiny_transformers_sam() if kind == "transformers" else tiny_hf_vl_sam())


@pytest.fixture(scope="module")
def processor():
    return HfVlSamProcessor(HfVlSamImageProcessor(size=IMAGE_SIZE))


@pytest.fixture(scope="module")
def coffee():
    return skimage.data.coffee()


@pytest.fixture(scope="module", params=MODEL_KINDS)
def predictor(request, processor, coffee):
    predictor = HfVlSamPredictor(build_model(request.param), processor)
    predictor.set_image(coffee)
    return predictor


# ------------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_predict_needs_an_image(kind, processor, coffee):
    predictor = HfVlSamPredictor(build_model(kind), processor)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(points=POINTS, labels=LABELS)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.get_image_embedding()
    predictor.set_image(coffee)
    assert predictor.get_image_embedding().shape == (1, DIM, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(boxes=BOX)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_image_is_encoded_once(kind, processor, coffee):
    model = build_model(kind)
    calls = []
    original = model.get_image_embeddings
    model.get_image_embeddings = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    encoder_calls = []
    model.vision_encoder.register_forward_hook(lambda *args: encoder_calls.append(1))
    predictor = HfVlSamPredictor(model, processor)
    predictor.set_image(coffee)
    embedding = predictor.get_image_embedding()
    for _ in range(3):
        predictor.predict(points=POINTS, labels=LABELS)
        predictor.predict(boxes=np.stack([BOX, BOX / 2]))
    assert len(calls) == 1 and len(encoder_calls) == 1
    pixel_values = processor.image_processor(coffee, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(embedding, model.get_image_embeddings(pixel_values))


# ------------------------------------------------------------------------------------------------ consistency
def test_matches_model_forward_and_post_processing(predictor, processor, coffee):
    inputs = processor(coffee, input_points=[[POINTS]], input_labels=[[LABELS]], input_boxes=[[BOX]])
    with torch.no_grad():
        out = predictor.model(
            pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
            input_labels=inputs["input_labels"], input_boxes=inputs["input_boxes"], multimask_output=True,
        )  # fmt: skip
    expected = processor.post_process_masks(
        out["pred_masks"], inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][0]  # (3, 400, 600)
    logits, scores, low_res = predictor.predict(points=POINTS, labels=LABELS, boxes=BOX, return_logits=True)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(scores, out["iou_scores"][0, 0].numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(low_res, out["pred_masks"][0, 0].numpy(), atol=1e-6, rtol=1e-5)
    masks, _, _ = predictor.predict(points=POINTS, labels=LABELS, boxes=BOX)
    assert masks.dtype == bool and np.array_equal(masks, logits > 0)
    assert 0 < masks.mean() < 1  # a non-trivial mask, so the comparison means something


@pytest.mark.parametrize("multimask_output, count", [(True, 3), (False, 1)])
def test_shapes(predictor, multimask_output, count):
    masks, scores, low_res = predictor.predict(points=POINTS, labels=LABELS, multimask_output=multimask_output)
    assert masks.shape == (count, 400, 600) and scores.shape == (count,) and low_res.shape == (count, LOW_RES, LOW_RES)
    masks, scores, low_res = predictor.predict(boxes=np.stack([BOX, BOX / 2]), multimask_output=multimask_output)
    assert masks.shape == (2, count, 400, 600) and scores.shape == (2, count)
    assert low_res.shape == (2, count, LOW_RES, LOW_RES) and low_res.dtype == np.float32


def test_batched_prompts_equal_single_prompts(predictor):
    boxes = np.stack([BOX, [0, 0, 600, 400], [250, 100, 260, 130]])
    points = np.array([[[100.0, 200.0]], [[300.0, 50.0]], [[255.0, 120.0]]])
    labels = np.ones((3, 1), dtype=np.int64)
    batched = predictor.predict(points=points, labels=labels, boxes=boxes, return_logits=True)
    for i in range(3):
        single = predictor.predict(points=points[i], labels=labels[i], boxes=boxes[i], return_logits=True)
        for b, s in zip(batched, single):
            np.testing.assert_allclose(b[i], s, atol=1e-4, rtol=1e-4)


def test_mask_input_is_used(predictor):
    _, _, low_res = predictor.predict(points=POINTS, labels=LABELS)
    plain = predictor.predict(points=POINTS, labels=LABELS, return_logits=True)
    refined = predictor.predict(points=POINTS, labels=LABELS, mask_input=low_res[:1] * 5, return_logits=True)
    assert refined[0].shape == plain[0].shape and not np.allclose(refined[0], plain[0])
    per_prompt = predictor.predict(boxes=np.stack([BOX, BOX]), mask_input=np.stack([low_res[:1], -low_res[:1]]))
    assert per_prompt[0].shape == (2, 3, 400, 600)


# ------------------------------------------------------------------------------------------------ segment_anything
RENAMES = [  # segment_anything -> transformers SamModel (checkpoints.md section 10, as anchored regexes)
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.0\.", r"\1.proj_in."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.1\.", r"\1.layers.0."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.2\.", r"\1.proj_out."),
    (r"output_upscaling\.0\.", "upscale_conv1."),
    (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"pe_layer\.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    (r"^image_encoder\.", "vision_encoder."),
    (r"neck\.0\.", "neck.conv1."),
    (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."),
    (r"neck\.3\.", "neck.layer_norm2."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"\.norm", ".layer_norm"),
    (r"\.blocks\.", ".layers."),
]


def tiny_segment_anything() -> torch.nn.Module:
    encoder = sam_modeling.ImageEncoderViT(
        depth=2, embed_dim=WIDTH, img_size=IMAGE_SIZE, patch_size=PATCH, num_heads=2, window_size=2,
        global_attn_indexes=[1], out_chans=DIM, use_rel_pos=True, qkv_bias=True, mlp_ratio=4,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )  # fmt: skip
    grid = IMAGE_SIZE // PATCH
    prompt = sam_modeling.PromptEncoder(
        embed_dim=DIM, image_embedding_size=(grid, grid), input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=4
    )
    transformer = sam_modeling.TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=64, num_heads=2)
    decoder = sam_modeling.MaskDecoder(
        num_multimask_outputs=3, transformer=transformer, transformer_dim=DIM, iou_head_depth=3, iou_head_hidden_dim=32
    )
    torch.manual_seed(0)
    return randomize_(sam_modeling.Sam(encoder, prompt, decoder, pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD))


def transformers_from_segment_anything(sam) -> SamModel:
    state = {}
    for key, value in sam.state_dict().items():
        for pattern, replacement in RENAMES:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    state["shared_image_embedding.positional_embedding"] = state["prompt_encoder.shared_embedding.positional_embedding"]
    model = tiny_transformers_sam()
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_vl_from_segment_anything(sam, tmp_path):
    from hf_vl.conversion.api import convert_checkpoint

    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    overrides = {"mask_decoder_config": TINY_HF_VL_DECODER}
    return convert_checkpoint("sam", "original", tmp_path / "sam_tiny.pth", config_overrides=overrides, progress=False)


PARITY_CASES = {
    "points": dict(point_coords=POINTS, point_labels=LABELS),
    "box": dict(box=BOX),
    "point and box": dict(point_coords=POINTS[:1], point_labels=LABELS[:1], box=BOX),
}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_parity_with_segment_anything_predictor(kind, processor, coffee, tmp_path):
    """Same weights, same photograph: preprocessing differs by at most one uint8 level on a few pixels, so logits
    agree to ~1e-3 and binary masks on all but a few boundary pixels."""
    sam = tiny_segment_anything()
    if kind == "transformers":
        model = transformers_from_segment_anything(sam)
    else:
        model = hf_vl_from_segment_anything(sam, tmp_path)
    reference = SamPredictor(sam)
    reference.set_image(coffee)
    ours = HfVlSamPredictor(model, processor)
    ours.set_image(coffee)
    torch.testing.assert_close(ours.get_image_embedding(), reference.get_image_embedding(), atol=5e-3, rtol=0)
    for name, case in PARITY_CASES.items():
        for multimask_output in (True, False):
            kwargs = dict(multimask_output=multimask_output)
            expected = reference.predict(**case, return_logits=True, **kwargs)
            got = ours.predict(
                points=case.get("point_coords"), labels=case.get("point_labels"), boxes=case.get("box"),
                return_logits=True, **kwargs,
            )  # fmt: skip
            for e, g, what in zip(expected, got, ("masks", "scores", "low-res")):
                np.testing.assert_allclose(g, e, atol=2e-3, rtol=0, err_msg=f"{name} {what}")
            binary_ref = reference.predict(**case, **kwargs)[0]
            binary = ours.predict(
                points=case.get("point_coords"), labels=case.get("point_labels"), boxes=case.get("box"), **kwargs
            )[0]
            assert (binary == binary_ref).mean() > 0.999, name
    # batched boxes: segment_anything's predict_torch
    boxes = np.stack([BOX, [0, 0, 600, 400], [250, 100, 260, 130]])
    boxes_torch = torch.as_tensor(reference.transform.apply_boxes(boxes, reference.original_size), dtype=torch.float)
    expected = reference.predict_torch(None, None, boxes_torch, return_logits=True)
    got = ours.predict(boxes=boxes, return_logits=True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e.numpy(), atol=2e-3, rtol=0)
    # a mask prompt from the previous low-res output
    low_res = reference.predict(point_coords=POINTS, point_labels=LABELS)[2][:1]
    expected = reference.predict(
        point_coords=POINTS[:1], point_labels=LABELS[:1], mask_input=low_res, return_logits=True
    )
    got = ours.predict(points=POINTS[:1], labels=LABELS[:1], mask_input=low_res, return_logits=True)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ errors
BAD_CALLS = [
    (dict(), ValueError, "at least one prompt"),
    (dict(points=POINTS), ValueError, "together"),
    (dict(labels=LABELS), ValueError, "together"),
    (dict(points=POINTS[0], labels=LABELS[:1]), ValueError, "points must have 2 dims"),
    (dict(points=POINTS, labels=LABELS[:1]), ValueError, "2 points but input_labels"),
    (dict(points=POINTS[None], labels=LABELS[None], boxes=BOX), ValueError, "mix of single and batched"),
    (dict(points=np.stack([POINTS] * 2), labels=np.stack([LABELS] * 2), boxes=BOX[None]), ValueError, "same number"),
    (dict(points=[[700.0, 10.0]], labels=[1]), ValueError, "outside the image"),
    (dict(boxes=[0, 0, 601, 10]), ValueError, "outside the image"),
    (dict(boxes=BOX, mask_input=np.zeros((1, 256, 256))), ValueError, "mask_input must have shape"),
    (dict(boxes=np.stack([BOX] * 2), mask_input=np.zeros((3, 1, LOW_RES, LOW_RES))), ValueError, "mask_input"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CALLS)
def test_bad_calls_raise(predictor, kwargs, error, match):
    with pytest.raises(error, match=match):
        predictor.predict(**kwargs)


def test_bad_construction_and_images(processor, coffee):
    model = build_model("transformers")
    with pytest.raises(TypeError, match="processor"):
        HfVlSamPredictor(model, processor.image_processor)
    with pytest.raises(TypeError, match="model"):
        HfVlSamPredictor(object(), processor)
    predictor = HfVlSamPredictor(model, processor)
    with pytest.raises(ValueError, match="single image"):
        predictor.set_image([coffee, coffee])
    with pytest.raises(TypeError, match="images must be"):
        predictor.set_image(3)
