"""SAM: the common model tests on a tiny config (64 px input, 8x8 patch grid with 3x3 windows, so windowed blocks pad
the grid to 9x9), plus SAM behaviour: every prompt kind, multimask on/off, batching over images and prompts, decoding
against cached embeddings, the cached dense positional encoding, input validation, configs and variants."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from common.model_tester import ModelTester, ModelTesterMixin
from common.tiny import TINY_SAM_IMAGE_SIZE, TINY_TRANSFORMER

from hf_vl.modeling.configuration_hf_vl_sam import (
    SAM_MEAN,
    SAM_STD,
    SAM_VARIANTS,
    HfVlSamConfig,
    HfVlSamMaskDecoderConfig,
    HfVlSamPromptEncoderConfig,
    HfVlSamVisionConfig,
    sam_variant_config,
)
from hf_vl.modeling.modeling_hf_vl_sam import HfVlSamModel, HfVlSamOutput
from hf_vl.modeling.modeling_hf_vl_sam_vision import window_partition, window_unpartition

PATCH = 8
GRID = TINY_SAM_IMAGE_SIZE // PATCH  # 8
DIM = 24  # image embedding / prompt width (distinct from the encoder's 32)
MASK = 4 * GRID  # low-resolution mask side
POINT_BATCH, NUM_POINTS = 2, 3


def tiny_sam_config(**overrides) -> HfVlSamConfig:
    vision = dict(
        **TINY_TRANSFORMER, image_size=TINY_SAM_IMAGE_SIZE, patch_size=PATCH, window_size=3, global_attn_indexes=[1],
        output_channels=DIM,
    )  # fmt: skip
    prompt = dict(hidden_size=DIM, mask_input_channels=8)
    decoder = dict(hidden_size=DIM, num_attention_heads=2, mlp_dim=37, iou_head_hidden_dim=20)
    return HfVlSamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, **overrides)


def tiny_prompts(batch_size: int, seed: int = 0) -> dict:
    """(batch, 2 prompts, 3 points) with every label kind (1, 0, -1 not-a-point, -10 padding), plus a box each."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(batch_size, POINT_BATCH, NUM_POINTS, 2, generator=generator) * TINY_SAM_IMAGE_SIZE
    labels = torch.tensor([[1, 0, -1], [1, 1, -10]]).expand(batch_size, -1, -1).clone()
    corners = torch.rand(batch_size, POINT_BATCH, 2, 2, generator=generator) * TINY_SAM_IMAGE_SIZE
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    return {"input_points": points, "input_labels": labels, "input_boxes": boxes}


def tiny_pixels(batch_size: int, seed: int = 1) -> torch.Tensor:
    size = TINY_SAM_IMAGE_SIZE
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass(frozen=True)
class SamTester(ModelTester):
    model_classes = (HfVlSamModel,)
    parameters_without_gradient = {
        r"mask_decoder\.output_hypernetworks_mlps\.0\.": "the single-mask output is dropped when multimask_output=True",
        r"prompt_encoder\.mask_embed\.": "used only with input_masks (the common inputs have none)",
    }

    def get_config(self, **overrides):
        return tiny_sam_config(**overrides)

    def prepare_inputs(self, batch_size):
        return {"pixel_values": tiny_pixels(batch_size), **tiny_prompts(batch_size)}

    def expected_shapes(self, model_class, batch_size):
        return {
            "iou_scores": (batch_size, POINT_BATCH, 3),
            "pred_masks": (batch_size, POINT_BATCH, 3, MASK, MASK),
            "image_embeddings": (batch_size, DIM, GRID, GRID),
        }

    def attention_outputs(self, model_class, config):
        return {"attentions": config.vision_config.num_hidden_layers}

    def hidden_state_outputs(self, model_class, config):
        return {"hidden_states": config.vision_config.num_hidden_layers + 1}


class TestSamCommon(ModelTesterMixin):
    tester = SamTester()


# ------------------------------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HfVlSamModel(tiny_sam_config()).eval()


@pytest.fixture(scope="module")
def embeddings(model):
    with torch.no_grad():
        return model.get_image_embeddings(tiny_pixels(2))


def run(model, **kwargs) -> HfVlSamOutput:
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "boxes", "points+boxes", "mask", "points+mask", "none"])
def test_prompt_kinds(model, embeddings, kind, multimask):
    prompts = tiny_prompts(2)
    kwargs = {"image_embeddings": embeddings, "multimask_output": multimask}
    if "points" in kind:
        kwargs.update(input_points=prompts["input_points"], input_labels=prompts["input_labels"])
    if "boxes" in kind:
        kwargs["input_boxes"] = prompts["input_boxes"]
    if "mask" in kind:
        rows = 2 * POINT_BATCH if "points" in kind else 2
        kwargs["input_masks"] = torch.randn(rows, 1, MASK, MASK)
    outputs = run(model, **kwargs)
    point_batch = POINT_BATCH if kind not in ("mask", "none") else 1
    masks = 3 if multimask else 1
    assert outputs.pred_masks.shape == (2, point_batch, masks, MASK, MASK)
    assert outputs.iou_scores.shape == (2, point_batch, masks)
    assert torch.isfinite(outputs.pred_masks).all() and torch.isfinite(outputs.iou_scores).all()


def test_single_mask_output_is_the_first_mask_token(model, embeddings):
    """multimask_output=False returns the output the multimask call drops (token 0), not one of the three."""
    prompts = tiny_prompts(2)
    single, multi = (run(model, image_embeddings=embeddings, multimask_output=m, **prompts) for m in (False, True))
    assert not any(torch.allclose(single.pred_masks[:, :, 0], multi.pred_masks[:, :, i]) for i in range(3))


def test_each_prompt_kind_changes_the_masks(model, embeddings):
    prompts = tiny_prompts(2)
    points = {k: prompts[k] for k in ("input_points", "input_labels")}
    only_points = run(model, image_embeddings=embeddings, **points).pred_masks
    with_boxes = run(model, image_embeddings=embeddings, **prompts).pred_masks
    with_mask = run(model, image_embeddings=embeddings, **points, input_masks=torch.randn(2, 1, MASK, MASK))
    assert not torch.allclose(only_points, with_boxes)
    assert not torch.allclose(only_points, with_mask.pred_masks)


def test_batch_over_images_and_prompts_equals_single_calls(model):
    """(2 images, 2 prompts) == each image with each prompt alone, from pixels, with per-prompt masks."""
    pixels, prompts = tiny_pixels(2), tiny_prompts(2)
    masks = torch.randn(2 * POINT_BATCH, 1, MASK, MASK)
    batched = run(model, pixel_values=pixels, **prompts, input_masks=masks)
    for image in range(2):
        for prompt in range(POINT_BATCH):
            one = {k: v[image : image + 1, prompt : prompt + 1] for k, v in prompts.items()}
            row = image * POINT_BATCH + prompt
            single = run(model, pixel_values=pixels[image : image + 1], **one, input_masks=masks[row : row + 1])
            torch.testing.assert_close(single.pred_masks[0, 0], batched.pred_masks[image, prompt], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(single.iou_scores[0, 0], batched.iou_scores[image, prompt], atol=1e-5, rtol=1e-5)


def test_one_mask_per_image_is_shared_by_its_prompts(model, embeddings):
    prompts = tiny_prompts(2)
    mask = torch.randn(2, 1, MASK, MASK)
    shared = run(model, image_embeddings=embeddings, **prompts, input_masks=mask)
    repeated = run(model, image_embeddings=embeddings, **prompts, input_masks=mask.repeat_interleave(POINT_BATCH, 0))
    torch.testing.assert_close(shared.pred_masks, repeated.pred_masks, atol=0, rtol=0)


def test_points_without_labels_are_foreground(model, embeddings):
    points = tiny_prompts(2)["input_points"]
    implicit = run(model, image_embeddings=embeddings, input_points=points)
    explicit = run(model, image_embeddings=embeddings, input_points=points, input_labels=torch.ones(points.shape[:3]))
    torch.testing.assert_close(implicit.pred_masks, explicit.pred_masks, atol=0, rtol=0)


def test_padding_label_ignores_the_coordinates(model, embeddings):
    """A -10 point contributes a zero token wherever it lies (SamProcessor pads with arbitrary coordinates)."""
    prompts = tiny_prompts(2)
    moved = prompts["input_points"].clone()
    moved[:, 1, 2] = 5.0  # the -10 point of prompt 1
    first = run(model, image_embeddings=embeddings, **prompts)
    second = run(model, image_embeddings=embeddings, **{**prompts, "input_points": moved})
    torch.testing.assert_close(first.pred_masks, second.pred_masks, atol=0, rtol=0)
    moved[:, 0, 0] = 5.0  # a foreground point does move the masks
    third = run(model, image_embeddings=embeddings, **{**prompts, "input_points": moved})
    assert not torch.allclose(first.pred_masks, third.pred_masks)


def test_dense_positional_encoding_is_cached_and_follows_the_weights(model):
    first = model.get_image_positional_embeddings()
    assert first.shape == (DIM, GRID, GRID)
    assert model.get_image_positional_embeddings() is first
    other = HfVlSamModel(tiny_sam_config())
    other.load_state_dict(model.state_dict())
    before = other.get_image_positional_embeddings()
    torch.testing.assert_close(before, first, atol=0, rtol=0)
    state = model.state_dict()
    key = "prompt_encoder.positional_embedding.positional_encoding_gaussian_matrix"
    other.load_state_dict({**state, key: state[key] * 2})
    after = other.get_image_positional_embeddings()
    assert not torch.allclose(after, before), "the cache kept the encoding of the old matrix"
    expected = other.prompt_encoder.positional_embedding((GRID, GRID))
    torch.testing.assert_close(after, expected, atol=0, rtol=0)
    assert other.double().get_image_positional_embeddings().dtype == torch.float64


def test_window_partition_round_trip_with_padding():
    states = torch.randn(2, 8, 7, 5)
    windows, padded = window_partition(states, 3)
    assert windows.shape == (2, 9, 9, 5) and padded == (9, 9)
    torch.testing.assert_close(window_unpartition(windows, 3, padded, (8, 7)), states, atol=0, rtol=0)


@pytest.mark.parametrize("window_size, qkv_bias", [(3, True), (4, True), (3, False), (5, False)])
def test_windowed_blocks_attend_the_grid_as_the_padded_windows(monkeypatch, window_size, qkv_bias):
    """At inference the windowed blocks project q/k/v on the grid's cells and give the windows' padding cells the
    projections' biases: the same embedding as padding the normalised grid with zeros (fp32: exactly), with and
    without padding (grid 8: windows of 3 and 5 pad, of 4 do not), with and without q/k/v biases."""
    from hf_vl.modeling.modeling_hf_vl_sam_vision import HfVlSamVisionAttention

    config = tiny_sam_config()
    config.vision_config.window_size, config.vision_config.qkv_bias = window_size, qkv_bias
    torch.manual_seed(0)
    model = HfVlSamModel(config).eval()
    with torch.no_grad():  # non-zero relative position tables and biases, so padding cells matter
        for name, param in model.vision_encoder.named_parameters():
            if "rel_pos" in name or name.endswith("proj.bias"):
                param.normal_()
    calls = []
    original = HfVlSamVisionAttention._attend_grid

    def spy(self, *args):
        calls.append(args[1])
        return original(self, *args)

    monkeypatch.setattr(HfVlSamVisionAttention, "_attend_grid", spy)
    pixels = tiny_pixels(2)
    for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 0.05)):
        model.to(dtype)
        with torch.no_grad():
            grid = model.get_image_embeddings(pixels)
            assert calls == [window_size], "the windowed block did not take the grid path"
            with monkeypatch.context() as patch:
                patch.setattr(HfVlSamVisionAttention, "can_attend_grid", lambda self, grid, residual: False)
                padded = model.get_image_embeddings(pixels)
        torch.testing.assert_close(grid.float(), padded.float(), atol=tolerance, rtol=tolerance)
        calls.clear()
    with torch.enable_grad():  # under autograd the windows are partitioned as in the original
        model.float().get_image_embeddings(pixels).sum().backward()
    assert calls == []


# ----------------------------------------------------------------------------------------------- bad input
def test_exactly_one_of_pixels_and_embeddings(model, embeddings):
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeddings"):
        run(model)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeddings"):
        run(model, pixel_values=tiny_pixels(2), image_embeddings=embeddings)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input_labels": torch.ones(2, POINT_BATCH, NUM_POINTS + 1)}, "input_labels must have shape"),
        ({"input_points": torch.rand(2, POINT_BATCH, NUM_POINTS, 3)}, "input_points must have 4 dimensions"),
        ({"input_points": torch.rand(2, NUM_POINTS, 2)}, "input_points must have 4 dimensions"),
        ({"input_boxes": torch.rand(2, POINT_BATCH, 2)}, "input_boxes must have 3 dimensions"),
        ({"input_boxes": torch.rand(2, POINT_BATCH + 1, 4)}, "prompts per image"),
        ({"input_points": torch.rand(3, POINT_BATCH, NUM_POINTS, 2),
          "input_labels": torch.ones(3, POINT_BATCH, NUM_POINTS)}, "input_points has 3 images"),
        ({"input_masks": torch.randn(3, 1, MASK, MASK)}, "input_masks must have shape"),
        ({"input_masks": torch.randn(2, 2, MASK, MASK)}, "input_masks must have shape"),
        ({"input_masks": torch.randn(2, 1, MASK, MASK + 4)}, "input_masks must have shape"),
        ({"input_labels": [[[1, 1, 1]]]}, "input_labels must be a torch.Tensor"),
        ({"input_points": [[[[1.0, 2.0]]]]}, "input_points must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_bad_prompts_raise_clear_errors(model, embeddings, change, message):
    inputs = {"image_embeddings": embeddings, **tiny_prompts(2), **change}
    error = TypeError if "torch.Tensor" in message else ValueError
    with pytest.raises(error, match=message):
        run(model, **inputs)


def test_labels_without_points_and_bad_images(model, embeddings):
    with pytest.raises(ValueError, match="input_labels was given without input_points"):
        run(model, image_embeddings=embeddings, input_labels=torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        run(model, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image_embeddings must have shape"):
        run(model, image_embeddings=torch.randn(2, DIM + 1, GRID, GRID))
    with pytest.raises(TypeError, match="floating-point"):
        run(model, pixel_values=torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------- config, variants
# segment-anything's state dicts (checkpoints.md section 1): keys / elements; hf_vl splits each block's qkv weight
# and bias into three (+4 keys per block, same elements)
RELEASED = {"vit_b": (314, 93_735_728, 12), "vit_l": (482, 312_343_088, 24), "vit_h": (594, 641_090_864, 32)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_variants_have_the_released_sizes(name):
    keys, elements, depth = RELEASED[name]
    with torch.device("meta"):
        model = HfVlSamModel(sam_variant_config(name))
    state = model.state_dict()
    assert len(state) == keys + 4 * depth
    assert sum(t.numel() for t in state.values()) == elements
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.output_channels) == (1024, 16, 14, 256)
    decoder = model.config.mask_decoder_config
    assert (decoder.num_hidden_layers, decoder.mlp_dim, decoder.num_attention_heads) == (2, 2048, 8)
    processor = SAM_VARIANTS[name]["processor"]
    # SamImageProcessor rescales to [0, 1] first: the original's 0-255 statistics / 255
    torch.testing.assert_close(torch.tensor(processor["image_mean"]) * 255, torch.tensor(SAM_MEAN))
    torch.testing.assert_close(torch.tensor(processor["image_std"]) * 255, torch.tensor(SAM_STD))
    assert processor["size"] == {"longest_edge": 1024} and processor["pad_size"] == {"height": 1024, "width": 1024}


def test_variant_table():
    assert sam_variant_config("vit_b").vision_config.global_attn_indexes == [2, 5, 8, 11]
    assert sam_variant_config("vit_l").vision_config.global_attn_indexes == [5, 11, 17, 23]
    vit_h = sam_variant_config("vit_h", vision_config={"window_size": 7})
    assert (vit_h.vision_config.hidden_size, vit_h.vision_config.window_size) == (1280, 7)
    with pytest.raises(ValueError, match="unknown SAM variant"):
        sam_variant_config("vit_x")


def test_config_validation():
    with pytest.raises(ValueError, match="widths must be equal"):
        HfVlSamConfig(prompt_encoder_config={"hidden_size": 128})
    with pytest.raises(ValueError, match="global_attn_indexes"):
        HfVlSamVisionConfig(num_hidden_layers=4, global_attn_indexes=[4])
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        HfVlSamMaskDecoderConfig(hidden_size=256, num_attention_heads=6)
    with pytest.raises(ValueError, match="mask_input_channels"):
        HfVlSamPromptEncoderConfig(mask_input_channels=10)
    config = HfVlSamConfig()
    assert config.vision_config.grid_size == 64 and config.model_type == "hf_vl_sam"
    assert config.vision_config.model_type == "hf_vl_sam_vision"



# --------------------------------------------------------------------------------------------- decoder paths
def _conv_upscale(decoder, image_states: torch.Tensor) -> torch.Tensor:
    """The original output upscaling: transposed convolutions on (rows, hidden, h, w)."""
    side = int(image_states.shape[1] ** 0.5)
    # (rows, h*w, hidden) -> (rows, hidden, h, w)
    grid = image_states.transpose(1, 2).reshape(image_states.shape[0], -1, side, side)
    upscaled = decoder.upscale_act(decoder.upscale_layer_norm(decoder.upscale_conv1(grid)))
    return decoder.upscale_act(decoder.upscale_conv2(upscaled))


@pytest.mark.parametrize("fast", [True, False])
def test_subpixel_upscaling_equals_the_transposed_convolutions(model, fast):
    decoder = model.mask_decoder
    states = torch.randn(3, GRID * GRID, DIM, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode() if fast else torch.enable_grad():
        ours = decoder.upscale(states)  # (rows, h*w, 16, C): sub-pixels (row 1, column 1, row 2, column 2)
        expected = _conv_upscale(decoder, states)
    rows, channels = ours.shape[0], ours.shape[-1]
    # (rows, h, w, 2, 2, 2, 2, C) -> (rows, C, h, 2, 2, w, 2, 2) -> (rows, C, 4h, 4w)
    image = ours.reshape(rows, GRID, GRID, 2, 2, 2, 2, channels).permute(0, 7, 1, 3, 5, 2, 4, 6)
    torch.testing.assert_close(image.reshape(rows, channels, MASK, MASK), expected, atol=1e-5, rtol=1e-5)


def test_decoder_fast_path_equals_the_plain_path(model, embeddings):
    """The oneDNN inference path (inference mode) and the autograd path (parameters requiring grad) agree, with
    prompts sharing an image (the first layer's image-side work computed once) and with a mask per prompt."""
    prompts = tiny_prompts(2)
    for extra in ({}, {"input_masks": torch.randn(2 * POINT_BATCH, 1, MASK, MASK)}):
        with torch.inference_mode():
            fast = model(image_embeddings=embeddings, **prompts, **extra)
        with torch.enable_grad():
            plain = model(image_embeddings=embeddings, **prompts, **extra)
        assert plain.pred_masks.requires_grad  # really the autograd path
        torch.testing.assert_close(fast.pred_masks, plain.pred_masks.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.iou_scores, plain.iou_scores.detach(), atol=1e-5, rtol=1e-5)


def test_shared_image_state_equals_one_state_per_prompt(model, embeddings):
    """An expanded (shared) dense embedding takes the shared first layer; the same values materialised per prompt
    take the per-row path: same masks."""
    decoder, encoder = model.mask_decoder, model.prompt_encoder
    prompts = tiny_prompts(2)
    with torch.no_grad():
        sparse, dense = encoder(prompts["input_points"], prompts["input_labels"], None, None, 2, POINT_BATCH)
        assert dense.stride(0) == 0
        image_pe = model.get_image_positional_embeddings()
        shared = decoder.predict_masks(embeddings, image_pe, sparse, dense)
        per_row = decoder.predict_masks(embeddings, image_pe, sparse, dense.contiguous())
    for ours, expected in zip(shared, per_row):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_predict_masks_holds_every_output_and_forward_selects(model, embeddings):
    prompts = tiny_prompts(2)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(prompts["input_points"], prompts["input_labels"], None, None, 2,
                                             POINT_BATCH)  # fmt: skip
        args = (embeddings, model.get_image_positional_embeddings(), sparse, dense)
        masks, iou = model.mask_decoder.predict_masks(*args)
        assert masks.shape == (2, POINT_BATCH, 4, MASK, MASK) and iou.shape == (2, POINT_BATCH, 4)
        for multimask, selected in ((True, slice(1, None)), (False, slice(0, 1))):
            chosen_masks, chosen_iou = model.mask_decoder(*args, multimask_output=multimask)
            torch.testing.assert_close(chosen_masks, masks[:, :, selected])
            torch.testing.assert_close(chosen_iou, iou[:, :, selected])


def test_box_corner_labels_embed_like_boxes(model):
    """Labels 2 / 3 (segment-anything's ONNX box corners as points) embed exactly as input_boxes do."""
    boxes = tiny_prompts(2)["input_boxes"]
    corners = boxes.reshape(2, POINT_BATCH, 2, 2)  # (batch, P, 4) -> (batch, P, [top-left, bottom-right], xy)
    labels = torch.tensor([2, 3]).expand(2, POINT_BATCH, 2)
    encoder = model.prompt_encoder
    with torch.no_grad():
        as_points = encoder.embed_points(corners, labels, pad=False)
        torch.testing.assert_close(as_points, encoder.embed_boxes(boxes))
        swapped = encoder.embed_points(corners, labels.flip(-1), pad=False)
    assert not torch.allclose(swapped, as_points)


def test_encoder_blocks_share_one_bias_mask_buffer_without_autograd(monkeypatch):
    """All blocks write their relative-position mask into the front of one buffer per call (autograd off): the same
    embedding as with a fresh mask per block, and the buffer is really shared, windowed and global blocks alike."""
    import hf_vl.modeling.modeling_hf_vl_sam_vision as vision

    config = tiny_sam_config()
    config.vision_config.num_hidden_layers, config.vision_config.global_attn_indexes = 4, [1, 3]
    model = HfVlSamModel(config).eval()
    with torch.no_grad():  # non-zero relative position tables, so the mask matters
        for layer in model.vision_encoder.layers:
            layer.self_attn.rel_pos_h.normal_()
            layer.self_attn.rel_pos_w.normal_()
    masks, share, workspaces = [], {"on": False}, []
    original = vision.decomposed_relative_position_bias

    def spy(query, rel_pos_h, rel_pos_w, size, workspace=None):
        assert isinstance(workspace, dict)  # the encoder hands every block its call's workspace
        workspaces.append(workspace)
        bias = original(query, rel_pos_h, rel_pos_w, size, workspace if share["on"] else None)
        masks.append((tuple(bias.shape), bias.data_ptr()))
        return bias

    monkeypatch.setattr(vision, "decomposed_relative_position_bias", spy)
    pixels = tiny_pixels(2)
    with torch.no_grad():
        fresh = model.get_image_embeddings(pixels)
        share["on"] = True
        masks.clear()
        shared = model.get_image_embeddings(pixels)
    torch.testing.assert_close(shared, fresh, atol=0, rtol=0)
    # windowed (both images at once), global (one image at a time, twice), windowed, global x 2: two mask shapes ...
    assert [shape[0] for shape, _ in masks] == [2, 1, 1, 2, 1, 1] and len({shape for shape, _ in masks}) == 2
    workspace = workspaces[-1]
    assert all(w is workspace for w in workspaces[-6:]) and len(workspace) == 1  # ... one buffer (one dtype),
    (buffer,) = workspace.values()
    assert buffer.numel() == max(math.prod(shape) for shape, _ in masks)
    # replaced once by a larger one when the first global block needs it, then shared by every block
    assert [ptr for _, ptr in masks[1:]] == [buffer.data_ptr()] * 5 != [masks[0][1]] * 5


def test_encoder_keeps_a_callers_bias_mask_buffer_between_calls():
    """``rel_pos_workspace``: the caller's dict keeps the mask buffer across calls (reused, one image's for a batch,
    replaced where too small or where an inference-mode one cannot be written), the embeddings those of the default
    fresh buffer and, for a batch, of the whole batch attended at once; with autograd on it is left alone; anything
    but a dict is a TypeError."""
    config = tiny_sam_config()
    config.vision_config.num_hidden_layers, config.vision_config.global_attn_indexes = 2, [1]
    model = HfVlSamModel(config).eval()
    with torch.no_grad():
        for layer in model.vision_encoder.layers:
            layer.self_attn.rel_pos_h.normal_()
            layer.self_attn.rel_pos_w.normal_()
    pixels, workspace, key = tiny_pixels(2), {}, (torch.float32, torch.device("cpu"))
    with torch.no_grad():
        # batches of one and of two images: their products are blocked differently, so each has its own reference
        fresh = [model.get_image_embeddings(pixels[i : i + 1]) for i in (0, 1)], model.get_image_embeddings(pixels)
        assert model.get_image_embeddings(pixels[:1], rel_pos_workspace=workspace).equal(fresh[0][0])
        buffer = workspace[key]
        assert len(workspace) == 1
        assert model.get_image_embeddings(pixels[1:], rel_pos_workspace=workspace).equal(fresh[0][1])
        assert workspace[key] is buffer  # reused, not mapped again
        assert model.get_image_embeddings(pixels, rel_pos_workspace=workspace).equal(fresh[1])
        assert workspace[key] is buffer  # a batch's blocks attend image by image: one image's mask
        grown = model.get_image_embeddings(pixels, rel_pos_workspace={key: buffer[:9]})
        assert grown.equal(fresh[1])  # a buffer too small is replaced
    with torch.enable_grad():  # the whole batch at once (no workspace under autograd): the same to rounding
        torch.testing.assert_close(model.get_image_embeddings(pixels), fresh[1], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        workspace[key] = torch.empty(10**6)  # large enough, but an inference tensor ...
    with torch.no_grad():
        assert model.get_image_embeddings(pixels[:1], rel_pos_workspace=workspace).equal(fresh[0][0])
    assert not workspace[key].is_inference()  # ... so replaced
    untouched = {}
    model.get_image_embeddings(pixels[:1], rel_pos_workspace=untouched)  # autograd on: no buffer
    assert untouched == {}
    with pytest.raises(TypeError, match="rel_pos_workspace must be a dict"):
        model.get_image_embeddings(pixels[:1], rel_pos_workspace=[])


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_inference_decodes_prompts_in_chunks_with_the_same_masks(model, embeddings, monkeypatch, mask_prompt):
    """Without autograd, prompts decode ``DECODE_CHUNK_BYTES`` at a time: one prompt per chunk gives the same masks
    and scores as all prompts at once, for shared (no mask prompt) and per-prompt dense embeddings."""
    import hf_vl.modeling.modeling_hf_vl_sam_decoder as decoder_module

    prompts = tiny_prompts(2)
    points, labels = prompts["input_points"].repeat(1, 2, 1, 1), prompts["input_labels"].repeat(1, 2, 1)
    masks = torch.randn(2 * 2 * POINT_BATCH, 1, MASK, MASK) if mask_prompt else None
    calls = []
    original = decoder_module.HfVlSamMaskDecoder._predict_masks

    def spy(self, image_embeddings, image_pe, sparse, *args, **kwargs):
        calls.append(sparse.shape[1])
        return original(self, image_embeddings, image_pe, sparse, *args, **kwargs)

    monkeypatch.setattr(decoder_module.HfVlSamMaskDecoder, "_predict_masks", spy)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points, labels, None, masks, 2, 2 * POINT_BATCH)
        args = (embeddings, model.get_image_positional_embeddings(), sparse, dense)
        monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 1 << 40)
        whole = model.mask_decoder.predict_masks(*args)
        assert calls == [2 * POINT_BATCH]
        monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 1)  # one prompt per chunk
        chunked = model.mask_decoder.predict_masks(*args)
        assert calls[1:] == [1] * (2 * POINT_BATCH)
        selected = model.mask_decoder.predict_masks(*args, mask_tokens=slice(1, None))
    for ours, expected in zip(chunked, whole):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(selected[0], whole[0][:, :, 1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(selected[1], whole[1][:, :, 1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_inference_upscales_a_few_rows_at_a_time_with_the_same_masks(model, embeddings, monkeypatch, gated):
    """Without autograd the upscaling and mask product run ``UPSCALE_PIECE_BYTES`` of upscaled features at a time
    (the whole chunk's would be 32 MiB for vit_b): one row per piece gives the masks of all rows at once, with and
    without the IoU gate (which upscales only the rows it keeps)."""
    import hf_vl.modeling.modeling_hf_vl_sam_decoder as decoder_module

    prompts = tiny_prompts(2)
    points, labels = prompts["input_points"].repeat(1, 2, 1, 1), prompts["input_labels"].repeat(1, 2, 1)
    rows = []
    original = decoder_module.HfVlSamMaskDecoder.upscale

    def spy(self, image_states, first=None):
        rows.append((image_states if first is None else first).shape[0])
        return original(self, image_states, first)

    monkeypatch.setattr(decoder_module.HfVlSamMaskDecoder, "upscale", spy)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points, labels, None, None, 2, 2 * POINT_BATCH)
        args = (embeddings, model.get_image_positional_embeddings(), sparse, dense)
        # gated: a threshold between the prompts' best IoU predictions, so some prompts' masks are skipped
        best = model.mask_decoder.predict_masks(*args)[1].flatten(0, 1).max(-1).values
        gate = {"mask_iou_threshold": float(best.median()) if gated else None}
        rows.clear()
        whole = model.mask_decoder.predict_masks(*args, **gate)
        kept = int((best > gate["mask_iou_threshold"]).sum()) if gated else 2 * 2 * POINT_BATCH
        assert 0 < kept and rows == [kept]
        monkeypatch.setattr(decoder_module, "UPSCALE_PIECE_BYTES", 1)  # one row per piece
        pieces = model.mask_decoder.predict_masks(*args, **gate)
        assert rows[1:] == [1] * kept
        # under compilation (as under tracing) all rows at once: no Python loop frozen into a graph
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        rows.clear()
        compiled = model.mask_decoder.predict_masks(*args, **gate)
    assert rows == [kept]
    for ours, again, expected in zip(pieces, compiled, whole):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)


def test_final_attention_runs_only_for_the_requested_tokens(model, embeddings):
    """``output_tokens``: the same rows as the full token output (attention rows are independent), fewer of them."""
    transformer = model.mask_decoder.transformer
    torch.manual_seed(0)
    tokens = torch.randn(2 * POINT_BATCH, 8, DIM)
    image_pe = model.get_image_positional_embeddings()[None]
    with torch.no_grad():
        full, states = transformer(embeddings, image_pe, tokens)
        chosen = [0, 2, 3]
        some, same_states = transformer(embeddings, image_pe, tokens, output_tokens=chosen)
    assert full.shape[1] == 8 and some.shape[1] == 3
    torch.testing.assert_close(some, full[:, chosen], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(same_states, states, atol=0, rtol=0)


def test_chunked_inference_accepts_one_dense_embedding_per_image(model, embeddings, monkeypatch):
    """A direct predict_masks call with one dense embedding per image (not per prompt) is not split by prompt."""
    import hf_vl.modeling.modeling_hf_vl_sam_decoder as decoder_module

    prompts = tiny_prompts(2)
    with torch.no_grad():
        sparse, _ = model.prompt_encoder(prompts["input_points"], prompts["input_labels"], None, None, 2, POINT_BATCH)
        dense = model.prompt_encoder.mask_embed(torch.randn(2, 1, MASK, MASK))  # (batch, hidden, h, w)
        args = (embeddings, model.get_image_positional_embeddings(), sparse, dense)
        whole = model.mask_decoder.predict_masks(*args)
        monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 1)
        again = model.mask_decoder.predict_masks(*args)
    for ours, expected in zip(again, whole):
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)


def test_chunked_inference_looks_the_cached_image_side_up_once(model, embeddings, monkeypatch):
    """Without a mask prompt the first layer's cached image-side work is validated once per call, not per chunk, and
    the chunks' masks, written into one output, equal the whole decode."""
    import hf_vl.modeling.modeling_hf_vl_sam_decoder as decoder_module

    prompts = tiny_prompts(2)
    points, labels = prompts["input_points"].repeat(1, 2, 1, 1), prompts["input_labels"].repeat(1, 2, 1)
    lookups = []
    original = decoder_module.HfVlSamMaskDecoder._image_projections

    def spy(self, *args):
        lookups.append(1)
        return original(self, *args)

    monkeypatch.setattr(decoder_module.HfVlSamMaskDecoder, "_image_projections", spy)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points, labels, None, None, 2, 2 * POINT_BATCH)
        args = (embeddings, model.get_image_positional_embeddings(), sparse, dense)
        whole = model.mask_decoder.predict_masks(*args)
        lookups.clear()
        monkeypatch.setattr(decoder_module, "DECODE_CHUNK_BYTES", 1)  # one prompt per chunk
        chunked = model.mask_decoder.predict_masks(*args, mask_tokens=slice(1, None))
    assert len(lookups) == 1
    assert chunked[0].is_contiguous() and chunked[0].shape == whole[0][:, :, 1:].shape
    torch.testing.assert_close(chunked[0], whole[0][:, :, 1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1][:, :, 1:], atol=1e-6, rtol=1e-6)
