"""Interactive SAM prediction with a cached image embedding (segment_anything ``SamPredictor``, @dca509f).

``set_image`` runs the image encoder once; each ``predict`` only encodes prompts and runs the light mask decoder, so
clicking around an image costs milliseconds. Works with any model honouring the hf_vl SAM interface
(``get_image_embeddings(pixel_values)`` and ``forward(image_embeddings=..., input_points=..., input_labels=...,
input_boxes=..., input_masks=..., multimask_output=...)`` returning ``pred_masks``/``iou_scores``): ``HfVlSamModel``
and transformers' ``SamModel``.

Semantics follow ``SamPredictor.predict`` (numpy in, numpy out), extended to batched prompts as
``SamPredictor.predict_torch`` does: several prompts (e.g. B boxes) decode in one call, each prompt on its own
(prompts are laid out as a batch of B copies of the cached embedding, so mask prompts may differ per prompt too).
"""

from __future__ import annotations

import numpy as np
import torch


class HfVlSamPredictor:
    """Predicts masks for prompts on one image whose embedding is computed once.

    Args:
        model: a SAM model (``HfVlSamModel`` or transformers' ``SamModel``), already in eval mode; the predictor
            runs it under ``torch.inference_mode()`` and does not change its mode.
        processor: an ``HfVlSamProcessor`` (its image processor must match the model's input size).
    """

    def __init__(self, model, processor):
        for name in ("get_image_embeddings", "__call__"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a SAM model with get_image_embeddings(), got {type(model).__name__}")
        if not hasattr(processor, "process_prompts") or not hasattr(processor, "image_processor"):
            raise TypeError(f"processor must be an HfVlSamProcessor, got {type(processor).__name__}")
        self.model = model
        self.processor = processor
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features = None
        self.original_size = None
        self.input_size = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image) -> None:
        """Preprocess ``image`` (anything ``HfVlSamImageProcessor`` takes, one image) and cache its embedding."""
        if isinstance(image, (list, tuple)) or (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4):
            raise ValueError("set_image takes a single image, not a list or a batch")
        self.reset_image()
        inputs = self.processor.image_processor(image, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        pixel_values = inputs["pixel_values"].to(self.device, dtype)
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(pixel_values)
        if isinstance(embeddings, tuple):  # SAM-HQ style (embeddings, intermediate embeddings)
            raise TypeError("models returning intermediate embeddings (SAM-HQ) are not supported")
        self.features = embeddings  # (1, C, h, w)
        self.original_size = tuple(int(v) for v in inputs["original_sizes"][0])
        self.input_size = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])

    def get_image_embedding(self) -> torch.Tensor:
        """The cached image embedding, shape (1, C, h, w) (C = 256, h = w = 64 for SAM)."""
        self._require_image("get_image_embedding")
        return self.features

    def predict(
        self,
        points=None,
        labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ):
        """Masks for prompts on the current image, all coordinates in original image pixels.

        Args:
            points: (N, 2) [x, y] for one prompt, or (B, N, 2) for B prompts.
            labels: (N,) or (B, N); 1 foreground, 0 background. Required with ``points``.
            boxes: (4,) [x1, y1, x2, y2] for one prompt, or (B, 4) for B prompts.
            mask_input: low-res mask logits (1, h, w) for one prompt or (B, 1, h, w), h = w = 256 for SAM
                (typically ``low_res_logits`` of a previous call).
            multimask_output: three masks per prompt (ambiguous prompts) instead of one.
            return_logits: return mask logits instead of boolean masks.

        Returns:
            masks (C, H, W) bool (float logits with ``return_logits``) at the original size (H, W), scores (C,),
            low_res_logits (C, h, w); with batched prompts each gets a leading B dimension. numpy arrays.
        """
        self._require_image("predict")
        batched, count = _prompt_batch(points, labels, boxes, mask_input)
        prompts = self.processor.process_prompts(
            [self.original_size],
            input_points=None if points is None else _as_batch(points, batched)[None],
            input_labels=None if labels is None else _as_batch(labels, batched)[None],
            input_boxes=None if boxes is None else _as_batch(boxes, batched)[None],
            return_tensors="pt",
        )
        masks, scores, low_res = self._decode(prompts, mask_input, count, multimask_output, return_logits)
        if not batched:
            masks, scores, low_res = masks[0], scores[0], low_res[0]
        return masks.numpy(), scores.numpy(), low_res.numpy()

    def _decode(self, prompts: dict, mask_input, count: int, multimask_output: bool, return_logits: bool):
        """Run the decoder with B prompts as a batch of B images sharing the cached embedding."""
        dtype = self.features.dtype
        inputs = {}
        for key, value in prompts.items():
            # (1, B, ...) -> (B, 1, ...): one prompt per embedding copy
            value = value.transpose(0, 1)
            inputs[key] = value.to(self.device, dtype if value.is_floating_point() else value.dtype)
        if mask_input is not None:
            inputs["input_masks"] = self._mask_input(mask_input, count).to(self.device, dtype)
        embeddings = self.features.expand(count, -1, -1, -1)  # (B, C, h, w), a view
        with torch.inference_mode():
            outputs = self.model(image_embeddings=embeddings, multimask_output=multimask_output, **inputs)
        low_res = outputs["pred_masks"][:, 0].float().cpu()  # (B, 1, M, h, w) -> (B, M, h, w)
        scores = outputs["iou_scores"][:, 0].float().cpu()  # (B, M)
        masks = self.processor.image_processor.post_process_masks(
            [low_res], [self.original_size], [self.input_size], binarize=not return_logits
        )[0]
        return masks, scores, low_res

    def _mask_input(self, mask_input, count: int) -> torch.Tensor:
        ip = self.processor.image_processor
        frame = (ip.mask_pad_size["height"], ip.mask_pad_size["width"])
        mask = torch.as_tensor(np.asarray(mask_input) if not isinstance(mask_input, torch.Tensor) else mask_input)
        if mask.ndim == 3:
            mask = mask[None]  # (1, h, w) -> (1, 1, h, w)
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != frame or mask.shape[0] != count:
            raise ValueError(
                f"mask_input must have shape (1, {frame[0]}, {frame[1]}) or ({count}, 1, {frame[0]}, {frame[1]}) "
                f"(low-res logits, one per prompt), got {tuple(mask.shape)}"
            )
        if not torch.isfinite(mask).all():
            raise ValueError("mask_input contains NaN or infinite values")
        return mask.float()

    def _require_image(self, method: str) -> None:
        if not self.is_image_set:
            raise RuntimeError(f"call set_image(image) before {method}()")


def _as_batch(value, batched: bool) -> np.ndarray:
    """numpy array with a leading prompt dimension: (B, ...) as given, or (1, ...) for a single prompt."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array if batched else array[None]


def _ndim(value) -> int:
    return value.ndim if isinstance(value, (np.ndarray, torch.Tensor)) else np.asarray(value).ndim


def _prompt_batch(points, labels, boxes, mask_input) -> tuple[bool, int]:
    """Whether the prompts are batched, and how many prompts there are; ValueError on inconsistent shapes."""
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together (labels: 1 foreground, 0 background)")
    if points is None and boxes is None and mask_input is None:
        raise ValueError("give at least one prompt: points (with labels), boxes or mask_input")
    sizes, batched = {}, set()
    for name, value, single_ndim in (("points", points, 2), ("labels", labels, 1), ("boxes", boxes, 1)):
        if value is None:
            continue
        ndim = _ndim(value)
        if ndim not in (single_ndim, single_ndim + 1):
            raise ValueError(
                f"{name} must have {single_ndim} dims (one prompt) or {single_ndim + 1} (batched prompts), got {ndim}"
            )
        batched.add(ndim == single_ndim + 1)
        sizes[name] = len(value) if ndim == single_ndim + 1 else 1
    if len(batched) > 1:
        raise ValueError(f"mix of single and batched prompts: {sizes}; batch all of points, labels and boxes or none")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"points, labels and boxes must hold the same number of prompts, got {sizes}")
    if not sizes:  # mask-only prompt
        ndim = _ndim(mask_input)
        return ndim == 4, (len(mask_input) if ndim == 4 else 1)
    return batched.pop(), next(iter(sizes.values()))


__all__ = ["HfVlSamPredictor"]
