"""ONNX export of SAM's prompt encoder + mask decoder (``hf_vl.onnx_export``) with segment-anything's signature.

A tiny segment-anything ``Sam`` with random weights is converted to ``HfVlSamModel`` (``convert_checkpoint``); its
decoder is exported once per option set and run with onnxruntime against (a) the PyTorch wrapper, (b) the model's
own ``forward`` plus transformers' ``SamImageProcessor.post_process_masks`` for the upscaling, and (c) the ONNX file
segment-anything's own ``SamOnnxModel`` exports from the original weights. Tolerance: max |delta| <= 1e-4 on mask
logits and IoU (measured values are printed; ``pytest -s``).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers
from torch import nn

import hf_vl
from hf_vl.conversion.api import convert_checkpoint
from hf_vl.modeling.configuration_hf_vl_sam import SAM_MEAN, SAM_STD
from hf_vl.onnx_export import HfVlSamOnnxDecoder, export_sam_onnx

sam_modeling = pytest.importorskip("segment_anything.modeling")
from segment_anything.utils.onnx import SamOnnxModel  # noqa: E402

ATOL = 1e-4
IMAGE, PATCH, WIDTH, DIM = 64, 8, 32, 24  # tiny: 8x8 embedding grid, 32x32 low-resolution masks
GRID = IMAGE // PATCH
TINY_DECODER = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, mlp_dim=37, iou_head_hidden_dim=20)
INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")


@torch.no_grad()
def randomize_(model: nn.Module) -> nn.Module:
    """Weights of a scale that keeps activations O(1) (default inits leave SAM's mask logits ~1e-4, where any
    comparison passes): matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1), vectors N(0, 0.1)."""
    generator = torch.Generator().manual_seed(1234)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator)
            if "LayerNorm" in type(module).__name__ and name == "weight":
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise if param.ndim <= 1 else noise / (param.numel() / param.shape[0]) ** 0.5)
    return model.eval()


def build_original() -> nn.Module:
    """A tiny segment-anything ``Sam`` (the sizes of tests/conversion/test_convert_sam.py)."""
    encoder = sam_modeling.ImageEncoderViT(
        depth=2, embed_dim=WIDTH, img_size=IMAGE, patch_size=PATCH, num_heads=4, window_size=3, global_attn_indexes=[1],
        out_chans=DIM, use_rel_pos=True, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    )  # fmt: skip
    prompt = sam_modeling.PromptEncoder(DIM, (GRID, GRID), (IMAGE, IMAGE), mask_in_chans=8)
    transformer = sam_modeling.TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=37, num_heads=2)
    decoder = sam_modeling.MaskDecoder(transformer_dim=DIM, transformer=transformer, iou_head_hidden_dim=20)
    return randomize_(sam_modeling.Sam(encoder, prompt, decoder, pixel_mean=SAM_MEAN, pixel_std=SAM_STD))


@pytest.fixture(scope="module")
def sams(tmp_path_factory):
    """(segment-anything Sam, the same weights as HfVlSamModel)."""
    torch.manual_seed(0)
    original = build_original()
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(original.state_dict(), path)
    model = convert_checkpoint("sam", "original", path, config_overrides={"mask_decoder_config": TINY_DECODER},
                               progress=False)  # fmt: skip
    return original, model.eval()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def session(sams, onnx_dir):
    """The default export (all four masks) of the converted model."""
    path = export_sam_onnx(sams[1], onnx_dir / "decoder.onnx")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, inputs: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(x) for x in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def delta(name: str, ours: torch.Tensor, reference: torch.Tensor, atol: float = ATOL) -> float:
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    assert reference.abs().max() > 1e-2, f"{name}: the reference is ~0, the comparison would prove nothing"
    value = (ours.double() - reference.double()).abs().max().item()
    print(f"[onnx] {name}: max |delta| = {value:.2e}")
    assert value <= atol, f"{name}: max |delta| = {value:.3e} > {atol}"
    return value


# ---------------------------------------------------------------------------------------------------- inputs
def embedding(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, DIM, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def clicks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n clicks in the input frame (n, 2) and their 0/1 labels (n,), the first one foreground."""
    generator = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    labels[0] = 1
    return torch.rand(n, 2, generator=generator) * (IMAGE - 1), labels


def onnx_inputs(coords, labels, orig=(48, 80), box=None, mask=None, seed=0) -> dict:
    """segment-anything's ONNX inputs: the clicks, then the box corners (labels 2, 3) or else the not-a-point pad."""
    if box is not None:
        coords, labels = torch.cat([coords, box.reshape(2, 2)]), torch.cat([labels, torch.tensor([2, 3])])
    else:
        coords, labels = torch.cat([coords, torch.zeros(1, 2)]), torch.cat([labels, torch.tensor([-1])])
    garbage = torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(7)) * 4
    return {
        "image_embeddings": embedding(seed),
        "point_coords": coords[None].float(),
        "point_labels": labels[None].float(),
        "mask_input": garbage if mask is None else mask,
        "has_mask_input": torch.tensor([0.0 if mask is None else 1.0]),
        "orig_im_size": torch.tensor(orig, dtype=torch.float32),
    }


def model_outputs(model, coords, labels, box=None, mask=None, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """HfVlSamModel.forward's single-mask then multimask outputs, stacked: (4, h, w) logits, (4,) IoU."""
    kwargs = dict(image_embeddings=embedding(seed), input_points=coords[None, None], input_labels=labels[None, None])
    if box is not None:
        kwargs["input_boxes"] = box[None, None]
    if mask is not None:
        kwargs["input_masks"] = mask
    with torch.no_grad():
        single, multi = model(**kwargs, multimask_output=False), model(**kwargs, multimask_output=True)
    masks = torch.cat([single.pred_masks[0, 0], multi.pred_masks[0, 0]])
    return masks, torch.cat([single.iou_scores[0, 0], multi.iou_scores[0, 0]])


def upscaled(low_res: torch.Tensor, orig: tuple[int, int]) -> torch.Tensor:
    """transformers' SamImageProcessor.post_process_masks (pad size = the input size) as the upscaling oracle."""
    scale = IMAGE / max(orig)
    reshaped = [int(orig[0] * scale + 0.5), int(orig[1] * scale + 0.5)]
    processor = transformers.SamImageProcessor(pad_size={"height": IMAGE, "width": IMAGE})
    return processor.post_process_masks([low_res[None]], [list(orig)], [reshaped], binarize=False)[0][0]


# ----------------------------------------------------------------------------------------------------- tests
CLICK_CASES = [(1, (48, 80)), (3, (100, 37)), (7, (64, 64))]


@pytest.mark.parametrize("n, orig", CLICK_CASES, ids=[f"{n}clicks-{h}x{w}" for n, (h, w) in CLICK_CASES])
def test_clicks_match_wrapper_and_model_forward(sams, session, n, orig):
    model = sams[1]
    coords, labels = clicks(n, seed=n)
    inputs = onnx_inputs(coords, labels, orig=orig, seed=n)
    masks, iou, low_res = run(session, inputs)
    assert masks.shape == (1, 4, *orig) and low_res.shape == (1, 4, 4 * GRID, 4 * GRID) and iou.shape == (1, 4)
    with torch.no_grad():
        wrapped = HfVlSamOnnxDecoder(model)(**inputs)
    delta(f"{n} clicks masks vs wrapper", masks, wrapped[0])
    delta(f"{n} clicks iou vs wrapper", iou, wrapped[1])
    expected_masks, expected_iou = model_outputs(model, coords, labels, seed=n)
    delta(f"{n} clicks low-res vs forward", low_res[0], expected_masks)
    delta(f"{n} clicks iou vs forward", iou[0], expected_iou)
    delta(f"{n} clicks masks vs post_process_masks", masks[0], upscaled(expected_masks, orig))


PROMPT_CASES = ("box", "mask", "box+mask", "pad-label")


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_boxes_masks_and_padding_match_model_forward(sams, session, case):
    model = sams[1]
    coords, labels = clicks(2, seed=11)
    box = torch.tensor([10.0, 12.0, 50.0, 41.0]) if "box" in case else None
    mask = torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(5)) * 4
    mask = mask if "mask" in case else None
    if case == "pad-label":  # transformers' padding point (-10) contributes nothing, in both
        coords, labels = torch.cat([coords, torch.tensor([[30.0, 30.0]])]), torch.cat([labels, torch.tensor([-10])])
    masks, iou, low_res = run(session, onnx_inputs(coords, labels, orig=(70, 52), box=box, mask=mask))
    expected_masks, expected_iou = model_outputs(model, coords, labels, box=box, mask=mask)
    delta(f"{case} low-res vs forward", low_res[0], expected_masks)
    delta(f"{case} iou vs forward", iou[0], expected_iou)
    delta(f"{case} masks vs post_process_masks", masks[0], upscaled(expected_masks, (70, 52)))


def test_mask_input_is_ignored_without_has_mask_input(sams, session):
    coords, labels = clicks(2, seed=3)
    inputs = onnx_inputs(coords, labels)
    other = dict(inputs, mask_input=inputs["mask_input"] * -3 + 1)
    first, second = run(session, inputs), run(session, other)
    torch.testing.assert_close(first[0], second[0], atol=0, rtol=0)
    with_mask = run(session, dict(inputs, has_mask_input=torch.tensor([1.0])))
    assert (with_mask[2] - first[2]).abs().max() > 1e-2  # and it is used when asked


def test_num_points_axis_is_dynamic(session, onnx_dir):
    graph = onnx.load(str(onnx_dir / "decoder.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["point_coords"] == [1, "num_points", 2] and dims["point_labels"] == [1, "num_points"]
    assert dims["image_embeddings"] == [1, DIM, GRID, GRID] and dims["orig_im_size"] == [2]
    assert [o.name for o in graph.output] == ["masks", "iou_predictions", "low_res_masks"]
    for n in (1, 2, 5, 11):  # the export traced 5 points; every count runs through the same file
        coords, labels = clicks(n, seed=20 + n)
        masks, iou, _ = run(session, onnx_inputs(coords, labels, orig=(33, 17)))
        assert masks.shape == (1, 4, 33, 17) and torch.isfinite(masks).all() and torch.isfinite(iou).all()


def test_single_mask_with_stability_score_and_extra_metrics(sams, onnx_dir):
    """return_single_mask + use_stability_score + return_extra_metrics, against an oracle built from the model's
    forward: the stability score of each low-res mask, the best multimask output for one click (+ pad), the single
    mask output from three points on."""
    model = sams[1]
    path = export_sam_onnx(model, onnx_dir / "single.onnx", return_single_mask=True, use_stability_score=True,
                           return_extra_metrics=True)  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in onnx.load(str(path)).graph.output]
    assert outputs == ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    for n, orig in ((1, (48, 80)), (2, (90, 60))):
        coords, labels = clicks(n, seed=30 + n)
        masks, scores, stability, areas, low_res = run(session, onnx_inputs(coords, labels, orig=orig))
        expected_masks, _ = model_outputs(model, coords, labels)
        expected_scores = (expected_masks > 1).sum((-1, -2)) / (expected_masks > -1).sum((-1, -2))
        best = 0 if n + 1 > 2 else int(expected_scores[1:].argmax()) + 1
        delta(f"single mask {n} clicks low-res", low_res[0, 0], expected_masks[best])
        torch.testing.assert_close(scores[0, 0], expected_scores[best].float(), atol=1e-6, rtol=0)
        expected_upscaled = upscaled(expected_masks[best : best + 1], orig)
        delta(f"single mask {n} clicks masks", masks[0], expected_upscaled)
        inner, outer = (masks > 1).sum((-1, -2)), (masks > -1).sum((-1, -2))
        torch.testing.assert_close(stability, inner / outer, atol=1e-6, rtol=0)
        assert torch.equal(areas, (masks > 0).sum((-1, -2)))


def export_original(sam: nn.Module, path, orig: tuple[int, int], **options) -> onnxruntime.InferenceSession:
    """segment-anything's SamOnnxModel exported as its scripts/export_onnx_model.py does (opset 17, dynamic N).

    Traced with ``orig`` as the image size: under torch 2.14's tracer its crop of the padding becomes constant
    (``int(tensor)``), so that file is right only for images of the traced aspect ratio; ours crops at run time."""
    box, mask = torch.tensor([3.0, 4.0, 40.0, 50.0]), torch.zeros(1, 1, 4 * GRID, 4 * GRID)
    inputs = onnx_inputs(*clicks(4), orig=orig, box=box, mask=mask)
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SamOnnxModel(sam, **options), tuple(inputs.values()), str(path), dynamo=False,
                          opset_version=17, input_names=list(INPUT_NAMES), dynamic_axes=axes,
                          output_names=["masks", "iou_predictions", "low_res_masks"])  # fmt: skip
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_matches_segment_anything_onnx_export(sams, session, onnx_dir):
    """The same inputs through segment-anything's own ONNX export (original weights) and ours (converted)."""
    original = export_original(sams[0], onnx_dir / "original.onnx", (57, 91), return_single_mask=False)
    box = torch.tensor([5.0, 9.0, 44.0, 60.0])
    mask = torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(9)) * 4
    cases = {"1 click": dict(n=1), "3 clicks + box": dict(n=3, box=box), "6 clicks + mask": dict(n=6, mask=mask)}
    for name, case in cases.items():
        inputs = onnx_inputs(*clicks(case.pop("n"), seed=40), orig=(57, 91), **case)
        for output, ours, theirs in zip(("masks", "iou", "low-res"), run(session, inputs), run(original, inputs)):
            delta(f"segment-anything onnx {name} {output}", ours, theirs)
    # another aspect ratio: only the outputs that segment-anything's file computes at run time
    inputs = onnx_inputs(*clicks(2, seed=41), orig=(90, 30))
    (_, iou, low_res), (_, original_iou, original_low_res) = run(session, inputs), run(original, inputs)
    delta("segment-anything onnx 90x30 iou", iou, original_iou)
    delta("segment-anything onnx 90x30 low-res", low_res, original_low_res)


def test_single_mask_options_match_segment_anything(sams, onnx_dir):
    """Mask selection, stability score and extra metrics as segment-anything's SamOnnxModel computes them (PyTorch
    on both sides: the ONNX side of our model is checked above)."""
    original = SamOnnxModel(sams[0], return_single_mask=True, use_stability_score=True, return_extra_metrics=True)
    ours = HfVlSamOnnxDecoder(sams[1], return_single_mask=True, use_stability_score=True, return_extra_metrics=True)
    for n in (1, 2, 4):
        inputs = onnx_inputs(*clicks(n, seed=50 + n), orig=(40, 64))
        with torch.no_grad():
            got, expected = ours(**inputs), original(**inputs)
        for name, a, b in zip(("masks", "scores", "stability", "areas", "low-res"), got, expected):
            if name == "areas":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"{n} clicks {name}")


def test_export_from_saved_directory_with_tanh_gelu(sams, tmp_path):
    """A save_pretrained directory exports; gelu_approximate changes the copy's GELUs only (export_sam_onnx's own
    onnxruntime check compares the file with the modified wrapper)."""
    model = sams[1]
    model.save_pretrained(tmp_path / "model")
    path = export_sam_onnx(tmp_path / "model", tmp_path / "out" / "tanh.onnx", gelu_approximate=True)
    inputs = onnx_inputs(*clicks(2))
    tanh_masks = run(onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), inputs)[2]
    with torch.no_grad():
        exact = HfVlSamOnnxDecoder(model)(**inputs)[2]
    assert 0 < (tanh_masks - exact).abs().max() < 1e-2
    assert "Erf" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert type(model.mask_decoder.upscale_act).__name__ == "GELUActivation"  # the model itself is untouched


def test_not_sam_is_a_clear_error(tmp_path, onnx_dir):
    from common.tiny import tiny_vit_config

    vit = hf_vl.HfVlVitModel(tiny_vit_config())
    with pytest.raises(TypeError, match="model_or_dir must be an HfVlSamModel.*HfVlVitModel"):
        export_sam_onnx(vit, onnx_dir / "vit.onnx")
    with pytest.raises(TypeError, match="model must be an HfVlSamModel"):
        HfVlSamOnnxDecoder(vit)
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="'hf_vl_vit' model, not hf_vl_sam"):
        export_sam_onnx(tmp_path / "vit", onnx_dir / "vit.onnx")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_sam_onnx(tmp_path / "missing", onnx_dir / "vit.onnx")
    assert not (onnx_dir / "vit.onnx").exists()


def test_bad_opset_is_a_clear_error(sams, onnx_dir):
    with pytest.raises(ValueError, match="opset must be an int >= 14"):
        export_sam_onnx(sams[1], onnx_dir / "old.onnx", opset=11)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_graph_outputs(sams, session, onnx_dir):
    with pytest.raises(ValueError, match="opset must be >= 18 with dynamo=True"):
        export_sam_onnx(sams[1], onnx_dir / "dynamo.onnx", dynamo=True)
    path = export_sam_onnx(sams[1], onnx_dir / "dynamo.onnx", dynamo=True, opset=18)
    dynamo_session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, orig in ((1, (48, 80)), (6, (31, 77))):
        inputs = onnx_inputs(*clicks(n, seed=60), orig=orig)
        for name, a, b in zip(("masks", "iou", "low-res"), run(dynamo_session, inputs), run(session, inputs)):
            delta(f"dynamo {n} clicks {name}", a, b)
