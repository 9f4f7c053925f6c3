"""SAM conversion: segment-anything's own model (``segment_anything.modeling``) and transformers' ``SamModel``, both
with random weights, converted to ``HfVlSamModel`` and compared on a real photograph (scikit-image's astronaut,
resized to the model's input size on its longest side, zero-padded, normalised with SAM's mean/std, inline here: the
processor is tested on its own) with point, box, point+box and mask prompts.

Tolerances: low-resolution mask logits max |delta| <= 1e-3, IoU predictions <= 1e-4 (measured figures are printed;
``pytest -s`` shows them). Tiny models run by default; the full ``vit_b`` size is ``slow`` (one image forward per
model, every prompt decoded against the cached embeddings).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conversion_helpers import assert_parity
from torch import nn

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl.conversion import ConversionError
from hf_vl.conversion.api import convert_checkpoint
from hf_vl.conversion.convert_hf_vl_sam import read_original_variant, read_transformers_variant
from hf_vl.modeling.configuration_hf_vl_sam import SAM_MEAN, SAM_STD, SAM_VARIANTS, sam_variant_config
from hf_vl.modeling.modeling_hf_vl_sam import HfVlSamModel

sam_modeling = pytest.importorskip("segment_anything.modeling")

MASK_ATOL, IOU_ATOL = 1e-3, 1e-4
# tiny sizes (checkpoints.md "Local build", with a padded window: 8x8 grid, window 3)
TINY_IMAGE, TINY_PATCH, TINY_WIDTH, TINY_DIM = 64, 8, 32, 24
TINY_DECODER = dict(hidden_size=TINY_DIM, num_hidden_layers=2, num_attention_heads=2, mlp_dim=37,
                    iou_head_hidden_dim=20)  # fmt: skip


@torch.no_grad()
def randomize_sam_(model: nn.Module) -> nn.Module:
    """Distinct random values of a scale that keeps signals O(1) through the network (conversion_helpers'
    ``randomize_`` uses std 0.02 everywhere, which leaves SAM's mask logits ~1e-4): matrices and kernels
    N(0, 1 / fan_in), norm weights 1 + N(0, 0.1), biases, norm shifts and vectors N(0, 0.1). Buffers (the original's
    random Fourier matrix) keep their values."""
    generator = torch.Generator().manual_seed(1234)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if "LayerNorm" in type(module).__name__ and name == "weight":
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim <= 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / (param.numel() / param.shape[0]) ** 0.5)
    return model.eval()


# --------------------------------------------------------------------------------------------- inputs
def sam_pixels(image_size: int) -> torch.Tensor:
    """The astronaut (512x512) resized so its longest side is ``image_size`` x 3/4 (so padding is exercised), padded
    to ``image_size`` square at the bottom/right, normalised with SAM's statistics: (1, 3, S, S)."""
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float()
    side = image_size * 3 // 4
    resized = F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    normalised = (resized - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]
    return F.pad(normalised, (0, image_size - side, 0, image_size - side))


def prompts(image_size: int) -> dict:
    """Two prompts per prompt kind, in the (resized) input frame."""
    scale = image_size / 1024
    points = torch.tensor([[[500.0, 375.0], [600.0, 300.0]], [[300.0, 600.0], [250.0, 100.0]]]) * scale
    labels = torch.tensor([[1, 0], [1, 1]])
    boxes = torch.tensor([[200.0, 100.0, 700.0, 760.0], [100.0, 300.0, 420.0, 740.0]]) * scale
    grid = image_size // 16 if image_size >= 1024 else image_size // TINY_PATCH
    masks = torch.randn(2, 1, 4 * grid, 4 * grid, generator=torch.Generator().manual_seed(3)) * 4
    return {"points": points, "labels": labels, "boxes": boxes, "masks": masks}


CASES = ("points", "boxes", "points+boxes", "mask", "points-single-mask")


def original_decode(sam, embeddings: torch.Tensor, case: str, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's prompt encoder + mask decoder for one image's 2 prompts: masks (2, M, h, w), iou (2, M)."""
    points = (p["points"], p["labels"]) if "points" in case else None
    boxes = p["boxes"] if "boxes" in case else None
    masks = p["masks"] if case == "mask" else None
    if case == "mask":
        points = (p["points"], p["labels"])
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, case != "points-single-mask")


def hf_vl_kwargs(case: str, p: dict) -> dict:
    """The same prompts as hf_vl / transformers inputs (batch 1, point_batch 2)."""
    kwargs = {"multimask_output": case != "points-single-mask"}
    if "points" in case or case == "mask":
        kwargs.update(input_points=p["points"][None], input_labels=p["labels"][None])
    if "boxes" in case:
        kwargs["input_boxes"] = p["boxes"][None]
    if case == "mask":
        kwargs["input_masks"] = p["masks"]
    return kwargs


def compare(name: str, ours, masks: torch.Tensor, iou: torch.Tensor) -> tuple[float, float]:
    mask_delta = assert_parity(f"{name} masks", ours.pred_masks[0], masks, atol=MASK_ATOL)
    iou_delta = assert_parity(f"{name} iou", ours.iou_scores[0], iou, atol=IOU_ATOL)
    return mask_delta, iou_delta


# ----------------------------------------------------------------------------------- segment-anything model
def build_original(tiny: bool) -> nn.Module:
    """segment-anything's ``Sam`` with random weights: tiny, or ``build_sam_vit_b``'s sizes."""
    if not tiny:
        from segment_anything import sam_model_registry

        sam = sam_model_registry["vit_b"](checkpoint=None)
    else:
        encoder = sam_modeling.ImageEncoderViT(
            depth=2, embed_dim=TINY_WIDTH, img_size=TINY_IMAGE, patch_size=TINY_PATCH, num_heads=4, window_size=3,
            global_attn_indexes=[1], out_chans=TINY_DIM, use_rel_pos=True, qkv_bias=True, mlp_ratio=4,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        )  # fmt: skip
        grid = TINY_IMAGE // TINY_PATCH
        prompt = sam_modeling.PromptEncoder(embed_dim=TINY_DIM, image_embedding_size=(grid, grid),
                                            input_image_size=(TINY_IMAGE, TINY_IMAGE), mask_in_chans=8)  # fmt: skip
        transformer = sam_modeling.TwoWayTransformer(depth=2, embedding_dim=TINY_DIM, mlp_dim=37, num_heads=2)
        decoder = sam_modeling.MaskDecoder(num_multimask_outputs=3, transformer=transformer, transformer_dim=TINY_DIM,
                                           iou_head_depth=3, iou_head_hidden_dim=20)  # fmt: skip
        sam = sam_modeling.Sam(encoder, prompt, decoder, pixel_mean=SAM_MEAN, pixel_std=SAM_STD)
    # default inits leave rel-pos tables at 0 and norms at 1/0: randomise so that swapped tensors would show
    return randomize_sam_(sam)


@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_original(tiny=True)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def convert_tiny(path) -> HfVlSamModel:
    return convert_checkpoint(
        "sam", "original", path, config_overrides={"mask_decoder_config": TINY_DECODER}, progress=False
    )


def check_original_parity(sam, model: HfVlSamModel, image_size: int, name: str) -> None:
    pixels = sam_pixels(image_size)
    p = prompts(image_size)
    with torch.no_grad():
        reference_embeddings = sam.image_encoder(pixels)
        embeddings = model.get_image_embeddings(pixels)
        assert_parity(f"{name} image embedding", embeddings, reference_embeddings, atol=MASK_ATOL)
        for case in CASES:
            masks, iou = original_decode(sam, reference_embeddings, case, p)
            compare(f"{name} {case}", model(image_embeddings=embeddings, **hf_vl_kwargs(case, p)), masks, iou)


def test_original_tiny_parity(tiny_original):
    sam, path = tiny_original
    model = convert_tiny(path)
    check_original_parity(sam, model, TINY_IMAGE, "original tiny")


def test_original_tiny_full_forward_matches_decoding_cached_embeddings(tiny_original):
    """``forward(pixel_values=...)`` == encoder once + ``forward(image_embeddings=...)`` (the predictor's path)."""
    sam, path = tiny_original
    model = convert_tiny(path)
    pixels, p = sam_pixels(TINY_IMAGE), prompts(TINY_IMAGE)
    with torch.no_grad():
        full = model(pixel_values=pixels, **hf_vl_kwargs("points+boxes", p))
        cached = model(image_embeddings=model.get_image_embeddings(pixels), **hf_vl_kwargs("points+boxes", p))
    torch.testing.assert_close(full.pred_masks, cached.pred_masks, atol=0, rtol=0)
    torch.testing.assert_close(full.image_embeddings, cached.image_embeddings, atol=0, rtol=0)


def test_converted_directory_reloads_with_auto_classes(tiny_original, tmp_path):
    _, path = tiny_original
    model = convert_checkpoint("sam", "original", path, output=tmp_path / "out", progress=False,
                               config_overrides={"mask_decoder_config": TINY_DECODER})  # fmt: skip
    loaded = transformers.AutoModelForMaskGeneration.from_pretrained(tmp_path / "out")
    assert type(loaded) is HfVlSamModel
    kwargs = hf_vl_kwargs("points+boxes", prompts(TINY_IMAGE))
    with torch.no_grad():
        expected, actual = (m(pixel_values=sam_pixels(TINY_IMAGE), **kwargs) for m in (model, loaded))
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, atol=0, rtol=0)


def test_original_variant_is_read_from_shapes(tiny_original):
    sam, path = tiny_original
    row = read_original_variant(path, sam.state_dict())
    vision = row["config"]["vision_config"]
    assert vision == dict(hidden_size=TINY_WIDTH, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=4 * TINY_WIDTH, image_size=TINY_IMAGE, patch_size=TINY_PATCH,
                          num_channels=3, window_size=3, global_attn_indexes=[1], output_channels=TINY_DIM,
                          qkv_bias=True)  # fmt: skip
    decoder = row["config"]["mask_decoder_config"]
    assert decoder == dict(hidden_size=TINY_DIM, num_hidden_layers=2, mlp_dim=37, attention_downsample_rate=2,
                           num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=20)  # fmt: skip
    assert row["config"]["prompt_encoder_config"] == dict(hidden_size=TINY_DIM, mask_input_channels=8)


def test_released_variant_is_recognised_from_shapes():
    """A vit_b-shaped state dict (shapes only: meta tensors) is the released ``vit_b`` row, and a wrong
    ``--variant`` is refused."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        state_dict = sam_model_registry["vit_b"](checkpoint=None).state_dict()
    assert read_original_variant("sam_vit_b.pth", state_dict) is SAM_VARIANTS["vit_b"]
    from hf_vl.conversion.api import resolve_variant
    from hf_vl.conversion.convert_hf_vl_sam import ORIGINAL
    from hf_vl.registry import get_architecture

    with pytest.raises(ValueError, match="does not match variant 'vit_l'"):
        resolve_variant(get_architecture("sam"), ORIGINAL, "vit_l", "sam_vit_b.pth", state_dict)


def test_transformers_config_agrees_with_the_released_variant(tmp_path):
    """facebook/sam-vit-base's config (transformers' defaults) reads as the ``vit_b`` row's encoder, so
    ``--variant vit_b`` is accepted and ``--variant vit_h`` refused."""
    from hf_vl.conversion.api import resolve_variant
    from hf_vl.conversion.convert_hf_vl_sam import TRANSFORMERS
    from hf_vl.registry import get_architecture

    transformers.SamConfig().save_pretrained(tmp_path)
    row = read_transformers_variant(tmp_path, {})
    assert row["config"]["vision_config"] == SAM_VARIANTS["vit_b"]["config"]["vision_config"]
    assert row["config"]["mask_decoder_config"]["layer_norm_eps"] == 1e-6  # transformers' block norms
    architecture = get_architecture("sam")
    assert resolve_variant(architecture, TRANSFORMERS, "vit_b", tmp_path, {})["config"] == row["config"]
    with pytest.raises(ValueError, match="does not match variant 'vit_h'"):
        resolve_variant(architecture, TRANSFORMERS, "vit_h", tmp_path, {})


def test_unknown_key_is_a_clear_error(tiny_original, tmp_path):
    sam, _ = tiny_original
    state_dict = dict(sam.state_dict())
    state_dict["image_encoder.blocks.0.attn.qkv_extra.weight"] = torch.zeros(3)
    del state_dict["prompt_encoder.no_mask_embed.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(ConversionError) as error:
        convert_tiny(path)
    message = str(error.value)
    assert "unknown source keys" in message and "image_encoder.blocks.0.attn.qkv_extra.weight" in message
    assert "missing target keys" in message and "prompt_encoder.no_mask_embed.weight" in message


def test_every_original_key_is_accounted_for(tiny_original):
    """174 keys in the tiny model (checkpoints.md); pixel_mean/std are non-persistent and absent."""
    sam, path = tiny_original
    assert len(sam.state_dict()) == 174
    model = convert_tiny(path)
    # q/k/v split (+2 per block and weight/bias) and nothing else: counts agree
    assert len(model.state_dict()) == 174 + 2 * 2 * 2


@pytest.mark.slow
def test_original_vit_b_parity(tmp_path):
    torch.manual_seed(0)
    sam = build_original(tiny=False)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    assert len(sam.state_dict()) == 314
    model = convert_checkpoint("sam", "original", path, variant="vit_b", progress=False)
    assert model.config.to_dict()["vision_config"] == sam_variant_config("vit_b").to_dict()["vision_config"]
    check_original_parity(sam, model, 1024, "original vit_b")


# -------------------------------------------------------------------------------------- transformers model
def build_transformers(tiny: bool) -> transformers.SamModel:
    if tiny:
        grid = TINY_IMAGE // TINY_PATCH
        config = transformers.SamConfig(
            vision_config=transformers.SamVisionConfig(
                hidden_size=TINY_WIDTH, output_channels=TINY_DIM, num_hidden_layers=2, num_attention_heads=4,
                image_size=TINY_IMAGE, patch_size=TINY_PATCH, window_size=3, global_attn_indexes=[1],
                num_pos_feats=TINY_DIM // 2, mlp_dim=4 * TINY_WIDTH,
            ),
            prompt_encoder_config=transformers.SamPromptEncoderConfig(
                hidden_size=TINY_DIM, image_size=TINY_IMAGE, patch_size=TINY_PATCH, mask_input_channels=8,
                image_embedding_size=grid,
            ),
            mask_decoder_config=transformers.SamMaskDecoderConfig(
                hidden_size=TINY_DIM, mlp_dim=37, num_attention_heads=2, iou_head_hidden_dim=20
            ),
        )  # fmt: skip
    else:
        config = transformers.SamConfig()  # facebook/sam-vit-base sizes
    with torch.device("meta"):
        model = transformers.SamModel(config)
    model = randomize_sam_(model.to_empty(device="cpu"))
    with torch.no_grad():  # random Fourier frequencies of SAM's scale (randomize_'s 0.02 would make them ~linear)
        matrix = torch.randn(model.shared_image_embedding.positional_embedding.shape)
        model.shared_image_embedding.positional_embedding.copy_(matrix)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(matrix)
    return model


def check_transformers_parity(reference: transformers.SamModel, tmp_path, image_size: int, name: str) -> None:
    reference.save_pretrained(tmp_path)
    model = convert_checkpoint("sam", "transformers", tmp_path, progress=False)
    pixels, p = sam_pixels(image_size), prompts(image_size)
    with torch.no_grad():
        reference_embeddings = reference.get_image_embeddings(pixels)
        embeddings = model.get_image_embeddings(pixels)
        assert_parity(f"{name} image embedding", embeddings, reference_embeddings, atol=MASK_ATOL)
        for case in CASES:
            kwargs = hf_vl_kwargs(case, p)
            if case == "mask":  # transformers takes one mask per image (shared by its prompts), not one per prompt
                kwargs["input_masks"] = p["masks"][:1]
            expected = reference(image_embeddings=reference_embeddings, **kwargs)
            compare(f"{name} {case}", model(image_embeddings=embeddings, **kwargs), expected.pred_masks[0],
                    expected.iou_scores[0])  # fmt: skip


def test_transformers_tiny_parity(tmp_path):
    check_transformers_parity(build_transformers(tiny=True), tmp_path, TINY_IMAGE, "transformers tiny")


def test_transformers_padding_label_matches(tmp_path):
    """Label -10 (SamProcessor's padding) is ignored as transformers ignores it."""
    reference = build_transformers(tiny=True)
    reference.save_pretrained(tmp_path)
    model = convert_checkpoint("sam", "transformers", tmp_path, progress=False)
    p = prompts(TINY_IMAGE)
    labels = torch.tensor([[[1, -10], [1, 0]]])
    embeddings = torch.randn(1, TINY_DIM, 8, 8)
    with torch.no_grad():
        expected = reference(image_embeddings=embeddings, input_points=p["points"][None], input_labels=labels)
        ours = model(image_embeddings=embeddings, input_points=p["points"][None], input_labels=labels)
    assert_parity("transformers pad label masks", ours.pred_masks, expected.pred_masks, atol=MASK_ATOL)


@pytest.mark.slow
def test_transformers_vit_b_parity(tmp_path):
    check_transformers_parity(build_transformers(tiny=False), tmp_path, 1024, "transformers vit_b")
