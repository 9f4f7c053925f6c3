"""ONNX export of SAM's prompt encoder + mask decoder, with the input/output signature of segment-anything's browser
demo (facebookresearch/segment-anything @dca509f, ``segment_anything/utils/onnx.py`` and
``scripts/export_onnx_model.py``), so web and ONNX Runtime clients written for that model run an hf_vl SAM unchanged.
The heavy image encoder is not part of the graph: the client computes the image embedding once (PyTorch
``HfVlSamModel.get_image_embeddings`` or a separate export) and decodes every click against it.

Graph inputs (float32 unless noted; coordinates in the model's input frame, i.e. the image resized so that its
longest side is ``vision_config.image_size`` (1024)):

- ``image_embeddings`` (1, 256, 64, 64)
- ``point_coords`` (1, N, 2) x, y pixels; N is dynamic. A box is two points (top-left, bottom-right).
- ``point_labels`` (1, N): 1 foreground, 0 background, 2 / 3 box top-left / bottom-right, -1 not-a-point (the
  client appends one (0, 0) point with label -1 when there is no box, as segment-anything's predictor does);
  -10 (transformers ``SamProcessor``'s padding) contributes nothing, as in ``HfVlSamModel``.
- ``mask_input`` (1, 1, 256, 256) low-resolution logits of an earlier prediction; ``has_mask_input`` (1) 1.0 to use
  it, 0.0 to ignore it.
- ``orig_im_size`` (2) height, width of the original image.

Outputs: ``masks`` (1, M, H, W) logits at ``orig_im_size`` (threshold at 0), ``iou_predictions`` (1, M),
``low_res_masks`` (1, M, 256, 256). M = 4 (the single-mask output first, then the three multimask outputs, in the
decoder's token order) or 1 with ``return_single_mask`` (the best multimask output for one click, the single-mask
output once there are more than two points, counting the not-a-point padding). With ``return_extra_metrics`` the
outputs are ``masks, iou_predictions, stability_scores, areas, low_res_masks``.

Exporter: the TorchScript one (``torch.onnx.export(..., dynamo=False)``) by default: it exports this tiny graph
~6x faster than the ``torch.export``-based one, needs no ``onnxscript``, writes opset 17 as segment-anything does, and
switches off hf_vl's oneDNN CPU fast path (an op ONNX cannot express) by itself (``torch.jit.is_tracing()``).
``dynamo=True`` is tested to give the same outputs (opset >= 18). The crop of the padding slices with tensors, not
``int(tensor)``: the tracer turns ``int()`` into a constant, which is why segment-anything's own file (traced on a
1500x2250 example) crops correctly only for images of that aspect ratio under torch 2.14; this graph crops at run time.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.activations import GELUActivation

from .modeling.modeling_hf_vl_sam import HfVlSamModel
from .processing.sam_mask_ops import stability_score

logger = logging.getLogger(__name__)

INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
EXTRA_OUTPUT_NAMES = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
MIN_OPSET = 14  # scaled_dot_product_attention (the decoder's SDPA attention) needs opset 14
# torch.onnx's dynamo path emits opset 18 and down-converts; to 17 its ReduceMax keeps an opset-18 attribute and
# onnxruntime refuses the file
MIN_DYNAMO_OPSET = 18


class HfVlSamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder of an :class:`HfVlSamModel`, with segment-anything's ONNX signature (module
    docstring). Shares the model's modules (no copy) unless ``gelu_approximate`` asks for a modified copy.

    Args:
        model: the SAM model.
        return_single_mask: output only the selected mask (see the module docstring).
        use_stability_score: replace the predicted IoU by the stability score of the low-resolution logits.
        return_extra_metrics: also output the stability scores and areas (pixels) of the upscaled masks.
        gelu_approximate: tanh GELU in the mask embedding and upscaling (runtimes without a fast ``Erf``).
        mask_threshold: logit threshold of a mask (SAM: 0).
        stability_score_offset: the logit offset of the stability score (segment-anything: 1).
    """

    def __init__(
        self,
        model: HfVlSamModel,
        return_single_mask: bool = False,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
        gelu_approximate: bool = False,
        mask_threshold: float = 0.0,
        stability_score_offset: float = 1.0,
    ):
        super().__init__()
        _check_sam(model, "model")
        prompt_encoder, mask_decoder = model.prompt_encoder, model.mask_decoder
        if gelu_approximate:
            prompt_encoder, mask_decoder = _with_tanh_gelu(prompt_encoder), _with_tanh_gelu(mask_decoder)
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = prompt_encoder.input_size[0]
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.mask_threshold = mask_threshold
        self.stability_score_offset = stability_score_offset

    @property
    def output_names(self) -> tuple[str, ...]:
        return EXTRA_OUTPUT_NAMES if self.return_extra_metrics else OUTPUT_NAMES

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """point_coords (B, N, 2), point_labels (B, N) float codes -> sparse embeddings (B, N, hidden), through
        ``HfVlSamPromptEncoder.embed_points`` (labels 2 / 3: box corners; no control flow on the data)."""
        # (B, N, ...) -> (B, 1, N, ...): one prompt per image; the client has appended any not-a-point already
        sparse = self.prompt_encoder.embed_points(point_coords.unsqueeze(1), point_labels.unsqueeze(1), pad=False)
        return sparse.squeeze(1)

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """mask_input (B, 1, 4h, 4w), has_mask_input (1) in {0, 1} -> dense embeddings (B, hidden, h, w); a blend
        instead of a branch so that both cases are one graph."""
        encoder = self.prompt_encoder
        has_mask = has_mask_input.reshape(-1, 1, 1, 1).to(mask_input.dtype)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * encoder.mask_embed(mask_input) + (1 - has_mask) * no_mask

    def predict_all_masks(
        self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens' outputs (single-mask first): masks (B, 1 + K, 4h, 4w), IoU (B, 1 + K), from
        ``HfVlSamMaskDecoder.predict_masks`` (``forward`` keeps either the single or the multimask outputs; the ONNX
        model returns, or selects among, all of them). Each row of ``sparse`` (B, N, hidden) is one image's prompt."""
        image_pe = self.prompt_encoder.positional_embedding(self.prompt_encoder.grid_size)
        # (B, N, hidden) -> (B, 1, N, hidden): one prompt per image
        masks, scores = self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse.unsqueeze(1), dense)
        return masks.squeeze(1), scores.squeeze(1)

    def select_mask(
        self, masks: torch.Tensor, scores: torch.Tensor, num_points: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per row: the best-scored multimask output for up to two points (one click + padding), the
        single-mask output beyond (several clicks or a box disambiguate). masks (B, 1 + K, H, W), scores (B, 1 + K)
        -> (B, 1, H, W), (B, 1)."""
        best_multimask = scores[:, 1:].argmax(dim=1) + 1
        best = torch.where(torch.as_tensor(num_points) > 2, torch.zeros_like(best_multimask), best_multimask)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), scores[rows, best].unsqueeze(1)

    def upscale_masks(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (B, M, 4h, 4w) -> (B, M, height, width) of ``orig_im_size``: to the padded input
        square, crop the padding, then to the original size (bilinear, as ``SamImageProcessor.post_process_masks``)."""
        side = self.image_size
        masks = F.interpolate(masks, size=(side, side), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        # the resized (unpadded) size, rounded half up as the image processor rounds it
        resized = torch.floor(side / size.max() * size + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """See the module docstring for shapes; returns the tensors named by :attr:`output_names`."""
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        low_res, scores = self.predict_all_masks(image_embeddings, sparse, dense)
        if self.use_stability_score:
            scores = stability_score(low_res, self.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, scores = self.select_mask(low_res, scores, point_coords.shape[1])
        masks = self.upscale_masks(low_res, orig_im_size)
        if not self.return_extra_metrics:
            return masks, scores, low_res
        stability = stability_score(masks, self.mask_threshold, self.stability_score_offset)
        areas = (masks > self.mask_threshold).flatten(-2).sum(-1)
        return masks, scores, stability, areas, low_res


def _check_sam(model, name: str) -> None:
    if not isinstance(model, HfVlSamModel):
        raise TypeError(f"{name} must be an HfVlSamModel (or a directory saved from one), got {type(model).__name__}")


def _with_tanh_gelu(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose exact GELUs are tanh approximations (segment-anything's ``--gelu-approximate``)."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, (GELUActivation, nn.GELU)):
                setattr(parent, child_name, nn.GELU(approximate="tanh"))
    return module


def load_sam(model_or_dir) -> HfVlSamModel:
    """An :class:`HfVlSamModel`, or one loaded from a ``save_pretrained`` directory. Raises TypeError for another
    object, ValueError for a directory of another model, FileNotFoundError without ``config.json``."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model_or_dir: {directory} has no config.json (not a save_pretrained directory)")
        model_type = AutoConfig.from_pretrained(directory).model_type
        if model_type != HfVlSamModel.config_class.model_type:
            raise ValueError(f"model_or_dir: {directory} holds a {model_type!r} model, not hf_vl_sam")
        return HfVlSamModel.from_pretrained(directory)
    _check_sam(model_or_dir, "model_or_dir")
    return model_or_dir


def dummy_inputs(model: HfVlSamModel, num_points: int = 5) -> dict[str, torch.Tensor]:
    """Example inputs of the exported graph (random embedding and clicks, a mask prompt, a 3:2 image)."""
    encoder = model.prompt_encoder
    generator = torch.Generator().manual_seed(0)
    side = encoder.input_size[0]
    labels = torch.randint(-1, 4, (1, num_points), generator=generator).float()
    return {
        "image_embeddings": torch.randn(1, encoder.hidden_size, *encoder.grid_size, generator=generator),
        "point_coords": torch.rand(1, num_points, 2, generator=generator) * side,
        "point_labels": labels,
        "mask_input": torch.randn(1, 1, *encoder.mask_input_size, generator=generator),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([480.0, 720.0]),
    }


def export_sam_onnx(
    model_or_dir,
    output_path,
    opset: int = 17,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
    check: bool = True,
    dynamo: bool = False,
) -> Path:
    """Write SAM's prompt encoder + mask decoder as an ONNX file with segment-anything's signature.

    Args:
        model_or_dir: an :class:`HfVlSamModel` or a directory saved by ``save_pretrained``.
        output_path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset (>= 14; segment-anything exports 17).
        return_single_mask, use_stability_score, return_extra_metrics, gelu_approximate: see
            :class:`HfVlSamOnnxDecoder`.
        check: with ``onnxruntime`` installed, run the file on example inputs and compare with PyTorch (error beyond
            1e-3 on the logits); a warning when it is not installed.
        dynamo: use ``torch.export`` + onnxscript (needs ``onnxscript`` and ``opset >= 18``; ~6x slower to
            export, same outputs) instead of the TorchScript exporter (see the module docstring).

    Returns the path written. The number of points is a dynamic axis (``num_points``); the batch is 1. The graph
    is float32 (a copy of a half-precision model is exported); the model's decoder modules are left in eval mode.
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (scaled_dot_product_attention), got {opset!r}")
    if dynamo and opset < MIN_DYNAMO_OPSET:
        raise ValueError(f"opset must be >= {MIN_DYNAMO_OPSET} with dynamo=True, got {opset}")
    _require("onnx", "torch.onnx writes the file with it")
    if dynamo:
        _require("onnxscript", "the dynamo exporter translates with it")
    model = load_sam(model_or_dir)
    if model.dtype != torch.float32:  # the graph's inputs are float32, as clients of the original send them
        model = copy.deepcopy(model).float()
    options = dict(return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                   return_extra_metrics=return_extra_metrics, gelu_approximate=gelu_approximate)  # fmt: skip
    decoder = HfVlSamOnnxDecoder(model, **options).eval()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    inputs = dummy_inputs(model)
    _torch_onnx_export(decoder, inputs, output_path, opset, dynamo)
    logger.info("SAM decoder exported to %s (opset %d)", output_path, opset)
    if check:
        check_with_onnxruntime(decoder, output_path, inputs)
    return output_path


def _require(package: str, why: str) -> None:
    try:
        __import__(package)
    except ImportError as error:
        raise ImportError(f"exporting to ONNX needs {package!r} ({why}): pip install 'hf_vl[onnx]'") from error


def _torch_onnx_export(decoder: HfVlSamOnnxDecoder, inputs: dict, path: Path, opset: int, dynamo: bool) -> None:
    names = dict(input_names=list(INPUT_NAMES), output_names=list(decoder.output_names), opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every tensor -> Python number and the legacy exporter about its deprecation
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        if not dynamo:
            torch.onnx.export(decoder, tuple(inputs.values()), str(path), dynamo=False, dynamic_axes=DYNAMIC_AXES,
                              do_constant_folding=True, **names)  # fmt: skip
            return
        num_points = torch.export.Dim("num_points")
        shapes = {name: DYNAMIC_AXES.get(name) for name in INPUT_NAMES}
        shapes = {name: None if axes is None else {axis: num_points for axis in axes} for name, axes in shapes.items()}
        program = torch.onnx.export(decoder, tuple(inputs.values()), dynamo=True, dynamic_shapes=shapes, **names)
        program.save(str(path))


def check_with_onnxruntime(decoder: HfVlSamOnnxDecoder, path, inputs: dict, atol: float = 1e-3) -> float | None:
    """Max |delta| between the ONNX file (onnxruntime, CPU) and ``decoder`` on ``inputs``; None without onnxruntime.
    Raises RuntimeError beyond ``atol`` (float outputs; integer areas must be equal up to threshold ties)."""
    try:
        import onnxruntime
    except ImportError:
        warnings.warn("onnxruntime is not installed: the exported SAM decoder was not checked", stacklevel=2)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        expected = decoder(**inputs)
    delta = 0.0
    for name, got, want in zip(decoder.output_names, ours, expected):
        if tuple(got.shape) != tuple(want.shape):
            raise RuntimeError(f"ONNX output {name} has shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
        if name != "areas":
            delta = max(delta, (torch.from_numpy(got) - want).abs().max().item())
    if delta > atol:
        raise RuntimeError(f"ONNX and PyTorch outputs differ by {delta:.3g} (> {atol})")
    logger.info("onnxruntime check passed: max |delta| %.3g", delta)
    return delta


__all__ = ["HfVlSamOnnxDecoder", "check_with_onnxruntime", "dummy_inputs", "export_sam_onnx", "load_sam"]
