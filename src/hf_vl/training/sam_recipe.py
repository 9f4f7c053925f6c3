"""Fine-tune a SAM mask decoder on the embedded shapes instance masks with ``Trainer`` (CPU, a few minutes).

    python -m hf_vl.training.sam_recipe --output outputs/sam-shapes
    torchrun --standalone --nproc_per_node 2 -m hf_vl.training.sam_recipe --output outputs/sam-shapes

The recipe follows the SAM paper's training (Kirillov et al. 2023, section 3 and appendix A) at toy scale: the image
encoder is frozen (here random: no weights can be downloaded, so the decoder learns on top of random-but-fixed
features), its embeddings are computed once and cached in the dataset, and only the mask decoder trains. Prompts are
simulated per ground-truth mask as in the paper: a foreground point drawn uniformly from the mask, or the mask's box
with noise of 10% of its side length per coordinate (at most 20 px at 1024, scaled to the input size), optionally a
few extra random foreground/background points; one point asks for the three ambiguity-aware masks, a box or several
points for one. Loss: ``hf_vl_sam_loss.sam_loss`` (20:1 focal + dice on the lowest-loss mask, MSE on the IoUs).

The prompt kind is drawn per (micro-)batch (``multimask_output`` is one flag per forward); prompts are keyed by
``(seed, batch)`` and ``(seed, image_id, visit)``, so 1 and N processes train on the same prompts. Scoring
(``evaluate_sam_miou``): mIoU of the top-ranked mask (IoU head) against the full-resolution ground truth on the
``test`` split, one fixed point and one fixed box prompt per object, before (``untrained_*``) and after (``test_*``)
training. ``--one-step`` runs ONE optimizer step on a fixed global batch and saves the loss and gradients (the
2-process check).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments, set_seed

from ..data.shapes import instance_masks, load_shapes
from ..modeling.configuration_hf_vl_sam import HfVlSamConfig
from ..modeling.hf_vl_sam_loss import binary_mask_iou, sam_loss
from ..modeling.modeling_hf_vl_sam import HfVlSamModel
from ..processing.image_processing_hf_vl_sam import HfVlSamImageProcessor
from .collators import with_array_column
from .probes import GradientCaptureCallback, LossRecordingTrainer
from .recipe_utils import (
    add_one_step_arguments, check_positive, lookup_recipe, recipe_parser, recipe_training_arguments, run_main,
)

logger = logging.getLogger(__name__)

_INPUT = 128  # the tiny model's input side: shapes images (64-128 px) are resized so their longest side is 128
# A SAM with the paper's layout at toy size: 128x128 input, 8x8 patches (a 16x16 embedding grid, 64x64 low-resolution
# masks, i.e. SAM's 1024 / 64 / 256 divided by 8 / 4 / 4), a 2-layer ViT of width 32 and a decoder of width 32.
_TINY_SAM = {
    "vision_config": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=_INPUT,
        patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=32,
    ),
    "prompt_encoder_config": dict(hidden_size=32, mask_input_channels=4),  # geometry comes from vision_config
    "mask_decoder_config": dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
}  # fmt: skip
_SHAPES_SAM = {
    "processor": dict(size={"longest_edge": _INPUT}, pad_size={"height": _INPUT, "width": _INPUT}),
    "data": dict(image_size=(64, 128), num_train=1000, num_eval=100),
    # prompt kinds with their probabilities; box noise: 10% of the side, at most 20 px of a 1024 input (2.5 px here)
    "prompts": dict(
        prompts_per_image=4, kinds={"point": 0.5, "box": 0.5}, extra_points=2, box_noise=0.1,
        box_noise_max=20 * _INPUT / 1024,
    ),
    # the paper's loss weights (focal 20 : dice 1, IoU MSE 1); AdamW as in the paper (lr 8e-4, weight decay 0.1,
    # warmup), with a higher rate for this short run and no decay: on random encoder features the decoder leaves the
    # "all background" plateau slowly, and a cosine decay halved the gain at 600 steps (mIoU 0.11 vs 0.19)
    "loss": dict(focal_weight=20.0, dice_weight=1.0, iou_weight=1.0),
    "training": dict(
        epochs=8, batch_size=8, learning_rate=3e-3, weight_decay=0.1, warmup=0.05, max_grad_norm=1.0,
        scheduler="constant_with_warmup",
    ),
    "trainable": ("mask_decoder.",),
}  # fmt: skip
# Named recipes: HfVlSamConfig kwargs, HfVlSamImageProcessor kwargs, prompt simulation, data and training defaults.
SAM_RECIPES: dict[str, dict] = {"sam-shapes-tiny": {**_SHAPES_SAM, "config": _TINY_SAM}}
PROMPT_KINDS = ("point", "points", "box")


def get_recipe(name: str) -> dict:
    return lookup_recipe(SAM_RECIPES, name)


def freeze_except(model, trainable_prefixes: tuple[str, ...] = ("mask_decoder.",)) -> list[str]:
    """Freeze every parameter whose name does not start with one of ``trainable_prefixes``; returns the trainable
    names. SAM fine-tuning keeps the image encoder (and here the prompt encoder) fixed and trains the decoder."""
    trainable = []
    for name, parameter in model.named_parameters():
        keep = name.startswith(tuple(trainable_prefixes))
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"trainable_prefixes={trainable_prefixes!r} match no parameter of {type(model).__name__}")
    return trainable


def build_sam_for_shapes(recipe: str = "sam-shapes-tiny", seed: int = 0):
    """A freshly initialised tiny SAM, everything but the recipe's ``trainable`` prefixes frozen, and its image
    processor (longest side resized to the input size, padded to a square)."""
    entry = get_recipe(recipe)
    set_seed(seed)  # the initial (random, frozen) encoder and the initial decoder are functions of the seed
    model = HfVlSamModel(HfVlSamConfig(**entry["config"]))
    freeze_except(model, entry["trainable"])
    return model, HfVlSamImageProcessor(**entry["processor"])


def with_image_features(dataset, image_processor, model=None, batch_size: int = 32):
    """Replace the ``image`` column by the frozen encoder's ``image_embeddings`` when ``model`` is given (computed
    once: the encoder never changes, so each training step is decoder-only), else by the processor's
    ``pixel_values`` (the uncached path: the frozen encoder runs every step). Fixed-shape ``Array3D``, torch format.
    """
    key = "pixel_values" if model is None else "image_embeddings"

    def compute(batch):
        pixel_values = image_processor(batch["image"], return_tensors="pt")["pixel_values"]
        if model is None:
            return pixel_values.float().numpy()
        with torch.no_grad():
            return model.get_image_embeddings(pixel_values.to(model.dtype)).float().numpy()

    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        return with_array_column(dataset, "image", key, compute, batch_size, f"sam-{key}", torch_columns=[key])
    finally:
        if was_training:
            model.train()


def resized_size(height: int, width: int, input_size: int) -> tuple[int, int]:
    """(height, width) after resizing the longest side to ``input_size`` (SamImageProcessor's rounding)."""
    scale = input_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sample_point(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A pixel (x, y) drawn uniformly from the ``True`` pixels of an (H, W) mask (SAM's prompt encoder adds the
    half-pixel offset to reach the pixel centre itself)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask is empty; a point prompt needs at least one pixel")
    i = int(rng.integers(ys.size))
    return np.array([xs[i], ys[i]], dtype=np.float64)


def noisy_box(rng: np.random.Generator, mask: np.ndarray, scale: float, noise: float, noise_max: float,
              bounds: tuple[int, int]) -> np.ndarray:
    """The mask's box (x0, y0, x1, y1, pixel edges) in the input frame (original x ``scale``), each coordinate moved
    by Gaussian noise of std ``noise`` x the box side, clipped to +-``noise_max`` and to ``bounds`` (h, w)."""
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64) * scale
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    box = box + np.clip(rng.normal(size=4) * noise * sides, -noise_max, noise_max)
    height, width = bounds
    box = np.clip(box, 0, [width, height, width, height])
    # keep x0 <= x1 and y0 <= y1 if noise crossed them on a thin box
    return np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])


def extra_points(rng: np.random.Generator, mask: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` more clicks, each a foreground (inside ``mask``) or background point with probability 1/2."""
    points, labels = [], []
    for _ in range(count):
        foreground = bool(rng.integers(2)) or not (~mask).any()
        points.append(sample_point(rng, mask if foreground else ~mask))
        labels.append(int(foreground))
    return np.array(points).reshape(count, 2), np.array(labels, dtype=np.int64)


def low_res_targets(masks: np.ndarray, input_size: int, mask_size: int) -> torch.Tensor:
    """(P, H, W) boolean masks -> (P, mask_size, mask_size) float targets in the low-resolution mask frame.

    The frame is the padded input (longest side resized to ``input_size``, padded bottom/right) scaled to
    ``mask_size``: area-resize the mask to the resized image's footprint there, threshold at 1/2, pad with 0.
    """
    height, width = masks.shape[-2:]
    low_h, low_w = resized_size(height, width, input_size)
    low_h, low_w = round(low_h * mask_size / input_size), round(low_w * mask_size / input_size)
    resized = F.interpolate(torch.as_tensor(masks, dtype=torch.float32)[:, None], size=(low_h, low_w), mode="area")
    # (P, 1, low_h, low_w) -> (P, mask_size, mask_size), background in the padding
    return F.pad((resized[:, 0] >= 0.5).float(), (0, mask_size - low_w, 0, mask_size - low_h))


def simulate_prompts(rng: np.random.Generator, masks: np.ndarray, kind: str, input_size: int, extra: int = 2,
                     box_noise: float = 0.1, box_noise_max: float = 2.5) -> dict[str, torch.Tensor]:
    """One prompt per (P, H, W) ground-truth mask, in the input frame (x, y pixels of the resized image).

    kind: ``"point"`` one foreground point; ``"points"`` that point plus ``extra`` random clicks; ``"box"`` the
    noisy box. Returns ``input_points`` (P, N, 2) and ``input_labels`` (P, N) long, or ``input_boxes`` (P, 4).
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind={kind!r} is not a prompt kind; expected one of {PROMPT_KINDS}")
    height, width = masks.shape[-2:]
    scale = input_size / max(height, width)
    if kind == "box":
        bounds = resized_size(height, width, input_size)
        boxes = [noisy_box(rng, mask, scale, box_noise, box_noise_max, bounds) for mask in masks]
        return {"input_boxes": torch.tensor(np.stack(boxes), dtype=torch.float32)}
    points, labels = [], []
    for mask in masks:
        point, label = sample_point(rng, mask)[None], np.ones(1, dtype=np.int64)
        if kind == "points":
            more, more_labels = extra_points(rng, mask, extra)
            point, label = np.concatenate([point, more]), np.concatenate([label, more_labels])
        points.append(point * scale)
        labels.append(label)
    return {
        "input_points": torch.tensor(np.stack(points), dtype=torch.float32),
        "input_labels": torch.tensor(np.stack(labels), dtype=torch.long),
    }


def _image_key(row: dict) -> str:
    for key in ("image_embeddings", "pixel_values"):
        if key in row:
            return key
    raise KeyError(f"rows need image_embeddings or pixel_values (keys: {sorted(row)}); see with_image_features")


class SamPromptCollator:
    """Shapes rows (``image_embeddings`` or ``pixel_values``, ``instance_map``, ``objects``, ``image_id``) -> a SAM
    batch with simulated prompts and ``labels`` = (B, P, mask_size, mask_size) low-resolution target masks.

    Each image contributes ``prompts_per_image`` prompts, cycling through its objects in a random order. ``kind``
    fixes the prompt kind; otherwise each batch draws one from ``kinds`` (``{kind: probability}``). Randomness
    is keyed, not sequential: batch ``k``'s kind depends on ``(seed, k)`` and an image's prompts on ``(seed,
    image_id, visit)``, where ``visit`` counts how often this collator has seen the image (once per epoch), so the
    prompts do not depend on how batches are split over processes.
    """

    def __init__(self, input_size: int, mask_size: int, prompts_per_image: int = 4, kinds: dict | None = None,
                 kind: str | None = None, extra_points: int = 2, box_noise: float = 0.1,
                 box_noise_max: float = 2.5, seed: int = 0):
        check_positive("prompts_per_image", prompts_per_image)
        kinds = {"point": 0.5, "box": 0.5} if kinds is None else dict(kinds)
        for name in (*kinds, *([kind] if kind is not None else [])):
            if name not in PROMPT_KINDS:
                raise ValueError(f"prompt kind {name!r} is unknown; expected one of {PROMPT_KINDS}")
        if kind is None and (not kinds or min(kinds.values()) < 0 or sum(kinds.values()) <= 0):
            raise ValueError(f"kinds must map prompt kinds to non-negative probabilities, got {kinds!r}")
        self.input_size, self.mask_size, self.prompts_per_image = input_size, mask_size, prompts_per_image
        self.kinds, self.kind, self.seed = kinds, kind, seed
        self.prompt_kwargs = dict(extra=extra_points, box_noise=box_noise, box_noise_max=box_noise_max)
        self.batches_seen = 0
        self.visits: dict[int, int] = {}

    def _next_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        names = list(self.kinds)
        probabilities = np.array([self.kinds[name] for name in names], dtype=np.float64)
        rng = np.random.default_rng([self.seed, 1, self.batches_seen])
        return names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]

    def _image(self, row: dict, kind: str) -> dict[str, torch.Tensor]:
        image_id = int(row["image_id"])
        visit = self.visits.get(image_id, 0)
        self.visits[image_id] = visit + 1
        rng = np.random.default_rng([self.seed, 2, image_id, visit])
        masks = instance_masks(row)  # (num_objects, H, W)
        order = rng.permutation(len(masks))
        chosen = masks[np.resize(order, self.prompts_per_image)]  # cycle when there are fewer objects than prompts
        prompts = simulate_prompts(rng, chosen, kind, self.input_size, **self.prompt_kwargs)
        prompts["labels"] = low_res_targets(chosen, self.input_size, self.mask_size)
        return prompts

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("rows is empty; a batch needs at least one image")
        kind = self._next_kind()
        self.batches_seen += 1
        key = _image_key(rows[0])
        per_image = [self._image(row, kind) for row in rows]
        batch = {name: torch.stack([p[name] for p in per_image]) for name in per_image[0]}
        batch[key] = torch.stack([torch.as_tensor(row[key]) for row in rows])
        batch["multimask_output"] = kind == "point"  # the paper: three masks only for a single ambiguous click
        return batch


class SamDecoderTrainer(Trainer):
    """A Trainer whose loss is ``sam_loss(pred_masks, iou_scores, labels)`` (the model returns no loss).

    ``sam_loss`` is a mean over the batch's prompts, so Trainer divides it by the accumulation steps as usual.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, loss_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # the SAM forward takes **kwargs, which would make Trainer pass num_items_in_batch (ecosystem.md 4.3)
        self.model_accepts_loss_kwargs = False
        self.loss_kwargs = dict(loss_kwargs or {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise KeyError(f"the batch has no 'labels' (target masks); keys: {sorted(inputs)}")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss, _ = sam_loss(outputs.pred_masks, outputs.iou_scores, labels, **self.loss_kwargs)
        return (loss, outputs) if return_outputs else loss


class _LossRecordingSamTrainer(LossRecordingTrainer, SamDecoderTrainer):
    """``LossRecordingTrainer``'s per-micro-batch losses on top of the SAM loss (for the one-step check)."""


def upscale_masks(low_res: torch.Tensor, original_size: tuple[int, int], input_size: int) -> torch.Tensor:
    """(P, M, m, m) low-resolution logits -> (P, M, H, W) logits on the original image (SamImageProcessor's
    ``post_process_masks`` without binarising): upsample to the padded input, crop the padding, resize."""
    height, width = original_size
    upscaled = F.interpolate(low_res, size=(input_size, input_size), mode="bilinear", align_corners=False)
    resized_h, resized_w = resized_size(height, width, input_size)
    cropped = upscaled[..., :resized_h, :resized_w]
    return F.interpolate(cropped, size=(height, width), mode="bilinear", align_corners=False)


def _image_ious(model, row: dict, kind: str, input_size: int, seed: int, prompt_kwargs: dict):
    """(P, M) IoUs of every predicted mask with its object and the (P,) index of the top-scoring mask."""
    key = _image_key(row)
    masks = instance_masks(row)  # (P, H, W)
    rng = np.random.default_rng([seed, 3, PROMPT_KINDS.index(kind), int(row["image_id"])])
    prompts = simulate_prompts(rng, masks, kind, input_size, **prompt_kwargs)
    inputs = {name: value[None] for name, value in prompts.items()}  # batch of one image
    inputs[key] = torch.as_tensor(row[key])[None]
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=kind == "point")
    logits = upscale_masks(outputs.pred_masks[0].float(), masks.shape[-2:], input_size)  # (P, M, H, W)
    ious = binary_mask_iou(logits > 0, torch.as_tensor(masks)[:, None])
    return ious, outputs.iou_scores[0].argmax(-1)


def evaluate_sam_miou(model, dataset, input_size: int, seed: int = 0, kinds=("point", "box"),
                      prompt_kwargs: dict | None = None) -> dict:
    """mIoU of SAM on shapes rows (see ``SamPromptCollator``), one fixed prompt of each kind per object.

    The mask scored is the one the model ranks first (highest ``iou_scores``), against the full-resolution
    ground truth. Returns ``miou`` (all prompts), ``miou_<kind>`` per kind, ``miou_point_oracle`` (best of the
    three point masks, the paper's "oracle") and ``num_prompts``. The prompts depend only on ``(seed, kind,
    image_id)``, so an untrained and a trained model are scored on the same prompts.
    """
    prompt_kwargs = dict(prompt_kwargs or {})
    was_training = model.training
    model.eval()
    scores, metrics = [], {}
    for kind in kinds:
        chosen, oracle = [], []
        for row in dataset:
            ious, top = _image_ious(model, row, kind, input_size, seed, prompt_kwargs)
            chosen.append(ious.gather(1, top[:, None])[:, 0])
            oracle.append(ious.max(1).values)
        chosen = torch.cat(chosen)
        metrics[f"miou_{kind}"] = float(chosen.mean())
        if kind == "point":
            metrics["miou_point_oracle"] = float(torch.cat(oracle).mean())
        scores.append(chosen)
    model.train(was_training)
    metrics["miou"] = float(torch.cat(scores).mean())
    metrics["num_prompts"] = int(sum(len(s) for s in scores))
    return metrics


def training_arguments(output_dir, seed: int, **overrides) -> TrainingArguments:
    """The shared recipe settings (:func:`.recipe_utils.recipe_training_arguments`; the collator needs
    "instance_map" and "objects"), the ``labels`` column, plus ``overrides``. Every decoder parameter takes part in
    every forward (all mask tokens are decoded under autograd)."""
    return recipe_training_arguments(output_dir, seed, **{"label_names": ["labels"], **overrides})


def shapes_sam_dataset(split: str, num_images: int, model, image_processor, entry: dict, seed: int = 0,
                       cache_embeddings: bool = True):
    """Shapes images of ``split`` with their instance masks and cached ``image_embeddings`` (or ``pixel_values``)."""
    shapes = load_shapes(split, num_images=num_images, image_size=entry["data"]["image_size"], seed=seed)
    shapes = shapes.select_columns(["image_id", "image", "instance_map", "objects"])
    return with_image_features(shapes, image_processor, model if cache_embeddings else None)


def _frames(model, entry: dict) -> tuple[int, int]:
    """(input side, low-resolution mask side): SAM's decoder upscales the embedding grid 4x."""
    return entry["processor"]["size"]["longest_edge"], 4 * model.config.vision_config.grid_size


def build_collator(model, entry: dict, seed: int, kind: str | None = None) -> SamPromptCollator:
    input_size, mask_size = _frames(model, entry)
    return SamPromptCollator(input_size, mask_size, seed=seed, kind=kind, **entry["prompts"])


def _settings(recipe: str, num_train, num_eval, batch_size, epochs) -> tuple:
    """The recipe's defaults for the arguments left as None, validated."""
    data, hyper = get_recipe(recipe)["data"], get_recipe(recipe)["training"]
    values = dict(num_train=num_train, num_eval=num_eval, batch_size=batch_size, epochs=epochs)
    values = {name: {**data, **hyper}[name] if value is None else value for name, value in values.items()}
    for name in ("num_train", "num_eval", "batch_size"):
        check_positive(name, values[name])
    if not isinstance(values["epochs"], (int, float)) or isinstance(values["epochs"], bool) or values["epochs"] <= 0:
        raise ValueError(f"epochs must be a positive number, got {values['epochs']!r}")
    return tuple(values.values())


def _per_device(global_batch: int, name: str, grad_accum: int = 1) -> int:
    """Split a global batch over processes (and accumulation steps): 1 and N processes see the same batches."""
    parts = int(os.environ.get("WORLD_SIZE", "1")) * grad_accum
    if global_batch % parts:
        raise ValueError(f"{name}={global_batch} must be divisible by world_size * grad_accum = {parts}")
    return global_batch // parts


def train_sam_shapes(
    output_dir,
    num_train: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    recipe: str = "sam-shapes-tiny",
    num_eval: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_steps: int = -1,
    cache_embeddings: bool = True,
) -> tuple[dict, Path]:
    """Score the untrained decoder, fine-tune it, score it again and save; returns ``(metrics, output_dir)``.

    metrics: ``untrained_miou`` / ``test_miou`` (and ``_point``, ``_box``, ``_point_oracle``; ``test`` split,
    images never trained on, see ``evaluate_sam_miou``), ``train_runtime``, ``train_loss``, ``train_steps``,
    ``embed_runtime`` (caching the frozen encoder's embeddings), ``world_size``. ``output_dir`` receives
    ``save_pretrained`` of the model and the image processor. Per-device batch = ``batch_size / world_size``.
    """
    entry = get_recipe(recipe)
    num_train, num_eval, batch_size, epochs = _settings(recipe, num_train, num_eval, batch_size, epochs)
    hyper = entry["training"]
    output_dir = Path(output_dir)
    model, processor = build_sam_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir, seed, num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=_per_device(batch_size, "batch_size"),
        learning_rate=hyper["learning_rate"] if learning_rate is None else learning_rate,
        weight_decay=hyper["weight_decay"], max_grad_norm=hyper["max_grad_norm"], warmup_steps=hyper["warmup"],
        lr_scheduler_type=hyper["scheduler"], logging_steps=10,
    )  # fmt: skip
    start = time.time()
    train = shapes_sam_dataset("train", num_train, model, processor, entry, seed, cache_embeddings)
    test = shapes_sam_dataset("test", num_eval, model, processor, entry, seed, cache_embeddings)
    embed_runtime = time.time() - start
    collator = build_collator(model, entry, seed)
    score = dict(input_size=collator.input_size, seed=seed, prompt_kwargs=collator.prompt_kwargs)
    untrained = evaluate_sam_miou(model, test, **score)
    trainer = SamDecoderTrainer(
        model=model, args=args, train_dataset=train, data_collator=collator, processing_class=processor,
        loss_kwargs=entry["loss"],
    )  # fmt: skip
    train_output = trainer.train()
    metrics = {f"untrained_{name}": value for name, value in untrained.items()}
    metrics.update({f"test_{name}": value for name, value in evaluate_sam_miou(model, test, **score).items()})
    metrics.update(
        train_runtime=train_output.metrics["train_runtime"], train_loss=train_output.training_loss,
        train_steps=train_output.global_step, embed_runtime=round(embed_runtime, 3), world_size=args.world_size,
    )  # fmt: skip
    trainer.save_model(str(output_dir))  # model + image processor, on the main process only
    logger.info("SAM shapes recipe: %s", metrics)
    return metrics, output_dir


def sam_one_step_gradients(
    output_dir,
    global_batch: int = 8,
    grad_accum: int = 1,
    seed: int = 0,
    recipe: str = "sam-shapes-tiny",
    kind: str | None = "point",
    expected_world_size: int | None = None,
) -> dict:
    """Run ONE optimizer step of the recipe on the first ``global_batch`` training images; return its loss and the
    gradients of the trainable (decoder) parameters.

    Per-device batch = global_batch / (world_size * grad_accum); every configuration sees the same prompts (keyed
    by image, see ``SamPromptCollator``; ``kind`` fixes the prompt kind, default single points, i.e. the
    min-over-three-masks path). Returns ``{"loss": global mean loss, "gradients": {name: tensor}, "world_size",
    "grad_accum", "frozen_with_grad": names of frozen parameters that got a gradient (should be empty)}``.
    """
    check_positive("global_batch", global_batch)
    check_positive("grad_accum", grad_accum)
    per_device = _per_device(global_batch, "global_batch", grad_accum)
    entry = get_recipe(recipe)
    model, processor = build_sam_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir, seed, max_steps=1, per_device_train_batch_size=per_device, gradient_accumulation_steps=grad_accum,
        optim="sgd", learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: capture the raw averaged gradient
        logging_strategy="no",
    )  # fmt: skip
    if expected_world_size is not None and args.world_size != expected_world_size:
        raise RuntimeError(f"expected {expected_world_size} processes, Trainer sees world_size={args.world_size}")
    train = shapes_sam_dataset("train", global_batch, model, processor, entry, seed)
    capture = GradientCaptureCallback()
    trainer = _LossRecordingSamTrainer(
        model=model, args=args, train_dataset=train, data_collator=build_collator(model, entry, seed, kind),
        processing_class=processor, callbacks=[capture], loss_kwargs=entry["loss"],
    )  # fmt: skip
    trainer.train()
    # equal micro-batch sizes everywhere: the global mean loss is the mean of the per-process micro-batch means
    loss = torch.tensor(trainer.losses, dtype=torch.float64).mean()
    if args.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss /= args.world_size
    (gradients,) = capture.gradients
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return {
        "loss": float(loss), "gradients": gradients, "world_size": args.world_size, "grad_accum": grad_accum,
        "frozen_with_grad": frozen,
    }  # fmt: skip


def quickstart_sam(output_dir, fast: bool = True, recipe: str = "sam-shapes-tiny") -> dict:
    """The recipe for the quickstart: ``fast`` trains 625 steps (1000 images, 5 epochs; about 1.5 minutes on one
    free core) and scores 40 test images; otherwise the full recipe. Returns the metrics (``untrained_miou``,
    ``test_miou``, ...) with ``model_dir``."""
    budget = dict(num_train=1000, epochs=5, num_eval=40) if fast else {}
    metrics, path = train_sam_shapes(output_dir, recipe=recipe, **budget)
    return {**metrics, "model_dir": str(path)}


def build_parser() -> argparse.ArgumentParser:
    parser = recipe_parser("sam_recipe", __doc__.split("\n\n")[0], SAM_RECIPES, "sam-shapes-tiny")
    parser.add_argument("--no-cache", action="store_true", help="run the frozen encoder every step")
    add_one_step_arguments(parser, "images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if args.one_step:
        result = sam_one_step_gradients(output / "trainer", args.global_batch, args.grad_accum, args.seed,
                                        args.recipe, expected_world_size=args.expect_world_size)
        if is_main:
            output.mkdir(parents=True, exist_ok=True)
            torch.save(result, output / "one_step.pt")
        return 0
    metrics, path = train_sam_shapes(
        output, args.num_train, args.epochs, args.seed, args.recipe, args.num_eval, args.batch_size,
        args.learning_rate, args.max_steps, cache_embeddings=not args.no_cache,
    )  # fmt: skip
    if args.expect_world_size is not None and metrics["world_size"] != args.expect_world_size:
        raise RuntimeError(f"expected {args.expect_world_size} processes, Trainer saw {metrics['world_size']}")
    if is_main:
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return 0


__all__ = [
    "PROMPT_KINDS", "SAM_RECIPES", "SamDecoderTrainer", "SamPromptCollator", "build_sam_for_shapes",
    "evaluate_sam_miou", "freeze_except", "get_recipe", "low_res_targets", "quickstart_sam", "sam_one_step_gradients",
    "shapes_sam_dataset", "simulate_prompts", "train_sam_shapes", "upscale_masks", "with_image_features",
]

if __name__ == "__main__":
    sys.exit(run_main(main))
