"""Train a small hf_vl DETR on the embedded shapes detection data with ``Trainer`` and score it with COCO mAP (CPU).

    python -m hf_vl.training.detr_recipe --output outputs/detr-shapes
    torchrun --standalone --nproc_per_node 2 -m hf_vl.training.detr_recipe --output outputs/detr-shapes

The model finds every shape in ``load_shapes(task="detection")`` images (classes = the 6 shapes) and is scored with
pycocotools' COCO box mAP (the shipped ``hf_vl_coco_map`` metric) on the ``test`` split, before and after training.
The ResNet is first pretrained on shapes classification and frozen, as DETR's trunk is ImageNet-pretrained
(``pretrain_trunk``; ``pretrain_steps=0`` trains a calibrated random trunk with the rest instead), and its features
are then computed once (``with_backbone_features``).

Evaluation is done by :class:`DetrEvaluationTrainer`, whose ``evaluate`` post-processes each batch to per-image
``{boxes, scores, labels}`` and gathers those Python objects across processes with accelerate's ``gather_object`` at
EVERY evaluation. (Trainer's own loop concatenates list-of-dict labels position-wise across ranks, and
``eval_use_gather_object`` only holds for the first evaluation, transformers#36213; ecosystem.md section 4.4.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from accelerate.utils import gather_object
from transformers import Trainer, TrainingArguments, set_seed

from ..data.shapes import SHAPES_CLASS_NAMES, load_shapes, xywh_to_cxcywh
from ..modeling.configuration_hf_vl_detr import HfVlDetrConfig
from ..modeling.hf_vl_resnet import HfVlFrozenBatchNorm2d, HfVlResNetBody
from ..modeling.modeling_hf_vl_detr import HfVlDetrForObjectDetection
from ..processing.image_processing_hf_vl_detr import HfVlDetrImageProcessor
from .recipe_utils import check_positive, lookup_recipe, recipe_parser, recipe_training_arguments, run_main
from .collators import with_array_column, with_pixel_values
from .metrics import coco_map_metric

logger = logging.getLogger(__name__)

# Named recipes: model config (HfVlDetrConfig kwargs), processor, data, trunk pretraining and training defaults.
# "detr-shapes-tiny": ResNet-18 trunk (pretrained on shapes, frozen), width 128, 2+2 layers, 12 queries, 128x128 input.
# Measured (README / model card): test mAP 0.080 (mAP@0.5 0.22) after 6000 steps, untrained 0.0; with 1000-3000 steps
# or without trunk pretraining it stays below 0.04; 10000 images / 8000 steps or 4x longer pretraining gave no gain.
DETR_RECIPES: dict[str, dict] = {
    "detr-shapes-tiny": {
        "config": dict(
            backbone_depth=18,
            hidden_size=128,
            num_attention_heads=8,
            encoder_layers=2,
            decoder_layers=2,
            intermediate_size=512,
            num_queries=12,  # at most 6 shapes per image
            # the original's transformer dropout (0.1): 16 epochs of 6000 images overfit without it
            dropout=0.1,
            activation_dropout=0.0,
            attention_dropout=0.0,
        ),
        # a fixed size (boxes are normalised, so the aspect change is harmless) lets pixels be computed once
        "processor": dict(size={"height": 128, "width": 128}),
        "data": dict(image_size=(64, 128), num_objects=(1, 6), num_train=6000, num_eval=200),
        # the analogue of DETR's ImageNet-pretrained trunk (steps=0 turns it off): the ResNet (with real batch norm)
        # learns to name the shape of single-object classification images (objects as large in pixels as in the
        # detection images at 128 px), its batch norms become the frozen ones and the whole trunk is frozen, so its
        # features are computed once (``with_backbone_features``) and a DETR step only runs the transformer
        "trunk_pretraining": dict(
            num_images=2000, image_size=(32, 64), input_size=64, steps=300, batch_size=32, learning_rate=1e-3
        ),
        # DETR's loss weights (class 1, L1 5, GIoU 2, "no object" 0.1) and gradient clipping (0.1); 3x the
        # original's learning rate (1e-4) because this run has 6000 steps (6000 images x 16 epochs / 16), not 500
        # epochs of COCO
        "training": dict(
            epochs=16, batch_size=16, learning_rate=3e-4, weight_decay=1e-4, warmup=0.05, max_grad_norm=0.1
        ),
    },
}


def get_recipe(name: str) -> dict:
    return lookup_recipe(DETR_RECIPES, name)


def build_detr_for_shapes(recipe: str = "detr-shapes-tiny", seed: int = 0, **config_overrides):
    """A freshly initialised ``HfVlDetrForObjectDetection`` (labels = shape names), all weights trainable, and its
    image processor."""
    entry = get_recipe(recipe)
    id2label = dict(enumerate(SHAPES_CLASS_NAMES))
    config = HfVlDetrConfig(
        **{**entry["config"], **config_overrides}, id2label=id2label, label2id={n: i for i, n in id2label.items()}
    )
    set_seed(seed)  # the initial weights are a function of the seed
    model = HfVlDetrForObjectDetection(config)
    # DETR freezes the stem and layer1 of an ImageNet-pretrained trunk; here the trunk is random, so train it all
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, HfVlDetrImageProcessor(**entry["processor"])


def calibrate_frozen_batch_norm(model, pixel_values: torch.Tensor) -> None:
    """Set the trunk's frozen batch-norm statistics to the per-channel mean / variance of ``pixel_values``' features.

    A from-scratch trunk has identity frozen batch norms (mean 0, variance 1), so nothing keeps its activations at
    unit scale: they drift with depth and with the data (the Kaiming-initialised ResNet-18's last map has std ~1.8
    and mean ~1.4 on shapes images). One forward in which each frozen norm is a train-mode ``nn.BatchNorm2d``
    (cumulative statistics) records what each layer needs to output normalised features; the frozen norms then
    keep those statistics (a data-dependent init, as batch norm would have given a trained trunk).
    """
    body = model.detr.backbone.body
    swaps = []
    for module in list(body.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, HfVlFrozenBatchNorm2d):
                batch_norm = nn.BatchNorm2d(child.running_mean.numel(), eps=child.eps, momentum=None)
                setattr(module, name, batch_norm)
                swaps.append((module, name, child, batch_norm))
    was_training = body.training
    body.train()
    try:
        with torch.no_grad():
            body(pixel_values.to(body.conv1.weight.dtype))
    finally:
        for module, name, frozen, batch_norm in swaps:
            frozen.running_mean.copy_(batch_norm.running_mean)
            frozen.running_var.copy_(batch_norm.running_var)
            setattr(module, name, frozen)
        body.train(was_training)


def pretrain_trunk(model, steps: int, num_images: int, image_size, input_size: int, batch_size: int,
                   learning_rate: float, seed: int = 0) -> float:
    """Pretrain the DETR trunk on shapes classification and load it into ``model``; returns the final loss.

    A from-scratch trunk is the slowest part of DETR to learn, and DETR itself assumes an ImageNet-pretrained one.
    Here a copy of the ResNet with ordinary (train-mode) batch norm plus a linear head learns to name the shape of
    single-object images (``load_shapes(task="classification")``, ``split="train"``, a seed no detection split
    uses); its weights and batch-norm statistics then replace the trunk's, the batch norms becoming the frozen
    ones. A plain loop (no Trainer): every process runs the same deterministic pretraining.
    """
    for name, value in (("steps", steps), ("num_images", num_images), ("batch_size", batch_size)):
        check_positive(name, value)
    body = model.detr.backbone.body
    processor = HfVlDetrImageProcessor(size={"height": input_size, "width": input_size})
    shapes = load_shapes("train", num_images=num_images, image_size=image_size, seed=seed + 1, task="classification")
    shapes = with_pixel_values(shapes.select_columns(["image", "label"]), processor)[:]
    pixel_values, labels = shapes["pixel_values"], torch.as_tensor(shapes["label"])
    torch.manual_seed(seed)
    trunk = HfVlResNetBody(model.config.backbone_depth, False, False, body.out_features)
    head = nn.Linear(body.channels[-1], len(SHAPES_CLASS_NAMES))
    parameters = [*trunk.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    trunk.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        # (batch, C, h, w) -> (batch, C): global average pooling, as an ImageNet classifier
        pooled = trunk(pixel_values[index])[body.out_features[-1]].mean(dim=(2, 3))
        loss = nn.functional.cross_entropy(head(pooled), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    state = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    body.load_state_dict(state, strict=True)
    return float(loss.detach())


def detection_dataset(split: str, num_images: int, processor, image_size, seed: int = 0, num_objects=(1, 6)):
    """Shapes detection images with precomputed ``pixel_values`` (torch format) and their ``objects``."""
    shapes = load_shapes(
        split, num_images=num_images, image_size=image_size, seed=seed, task="detection", num_objects=num_objects
    )
    shapes = shapes.select_columns(["image_id", "image", "width", "height", "objects"])
    return with_pixel_values(shapes, processor)


def with_backbone_features(dataset, model, batch_size: int = 64):
    """``dataset`` (from :func:`detection_dataset`) with its ``pixel_values`` replaced by the frozen trunk's
    ``backbone_features`` (``model.detr.get_backbone_features``), computed once: while the trunk is frozen its
    output never changes, and it is ~2/3 of a step's cost here. The model takes them as ``backbone_features``."""
    detr = model.detr
    if any(p.requires_grad for p in detr.backbone.parameters()):
        raise ValueError("the trunk is trainable: its features change during training and cannot be cached")
    was_training = detr.training
    detr.eval()  # frozen batch norm either way; eval lets the trunk fold it into its convolutions

    def compute(batch):
        with torch.no_grad():
            return detr.get_backbone_features(torch.as_tensor(batch["pixel_values"])).numpy()

    try:
        return with_array_column(dataset.with_format("numpy"), "pixel_values", "backbone_features", compute,
                                 batch_size, "backbone-features")  # fmt: skip
    finally:
        detr.train(was_training)


class DetrShapesCollator:
    """Rows with ``pixel_values`` (or cached ``backbone_features``) -> ``{"pixel_values" (or "backbone_features"),
    "labels"}``; each label dict holds ``class_labels``, normalised cxcywh ``boxes``, and the ``image_id`` and
    ``orig_size`` (height, width) that evaluation needs."""

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("examples is empty; a batch needs at least one example")
        labels = []
        for example in examples:
            width, height = int(example["width"]), int(example["height"])
            objects = example["objects"]
            boxes = xywh_to_cxcywh(np.asarray(objects["bbox"], dtype=np.float64), width, height)
            labels.append(
                {
                    "class_labels": torch.as_tensor(objects["category"], dtype=torch.long).reshape(-1),
                    "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "image_id": torch.tensor(int(example["image_id"])),
                    "orig_size": torch.tensor([height, width]),
                }
            )
        key = "backbone_features" if "backbone_features" in examples[0] else "pixel_values"
        return {key: torch.stack([torch.as_tensor(example[key]) for example in examples]), "labels": labels}


def _cxcywh_to_xyxy_pixels(boxes: torch.Tensor, orig_size: torch.Tensor) -> list:
    # (N, 4) normalised cxcywh -> (N, 4) absolute xyxy in the original image's pixels
    height, width = (float(v) for v in orig_size)
    centre, size = boxes[:, :2].double(), boxes[:, 2:].double()
    corners = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    return (corners * corners.new_tensor([width, height, width, height])).tolist()


def batch_records(image_processor, outputs, labels: list[dict]) -> list[dict]:
    """Per-image plain-Python predictions (all queries, xyxy pixels) and references of one evaluated batch."""
    target_sizes = torch.stack([label["orig_size"] for label in labels])
    detections = image_processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
    records = []
    for detection, label in zip(detections, labels):
        records.append(
            {
                "image_id": int(label["image_id"]),
                "prediction": {
                    "boxes": detection["boxes"].double().tolist(),
                    "scores": detection["scores"].double().tolist(),
                    "labels": detection["labels"].tolist(),
                },
                "reference": {
                    "boxes": _cxcywh_to_xyxy_pixels(label["boxes"].cpu(), label["orig_size"]),
                    "labels": label["class_labels"].tolist(),
                },
            }
        )
    return records


def unique_records(records: list[dict]) -> list[dict]:
    """Gathered records without duplicates (the padding of uneven distributed batches repeats images), sorted by
    ``image_id``, so every process and every world size scores the same list."""
    unique = {}
    for record in records:
        unique.setdefault(record["image_id"], record)
    return [unique[image_id] for image_id in sorted(unique)]


def coco_map_from_records(records: list[dict], metric=None) -> dict:
    """COCO mAP (``map``, ``map_50``, ...) of deduplicated records (see ``unique_records``)."""
    metric = coco_map_metric() if metric is None else metric
    return metric.compute(
        predictions=[r["prediction"] for r in records], references=[r["reference"] for r in records]
    )


class DetrEvaluationTrainer(Trainer):
    """A Trainer whose ``evaluate`` returns ``<prefix>_map`` (COCO) and ``<prefix>_loss`` gathered over processes.

    Each process post-processes its batches to per-image records (plain Python), which are gathered with
    accelerate's ``gather_object`` on every call; every process then scores the same deduplicated records, so all
    ranks return identical metrics (what ``load_best_model_at_end`` and callbacks need) without a broadcast.
    """

    def __init__(self, *args, coco_metric=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.coco_metric = coco_map_metric() if coco_metric is None else coco_metric
        self.last_records: list[dict] = []  # the deduplicated records of the last evaluation (same on every rank)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        start = time.time()
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        records, losses = [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad():
                outputs = model(**batch)
            losses.append((float(outputs.loss), len(batch["labels"])))
            records.extend(batch_records(self.processing_class, outputs, batch["labels"]))
        model.train(was_training)
        records = gather_object(records)
        losses = gather_object(losses)
        self.last_records = unique_records(records)
        scores = coco_map_from_records(self.last_records, self.coco_metric)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        metrics[f"{metric_key_prefix}_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        metrics[f"{metric_key_prefix}_num_images"] = len(self.last_records)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(dict(metrics))  # log() adds an "epoch" entry to the dict it gets
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def training_arguments(output_dir, seed: int, **overrides) -> TrainingArguments:
    """The shared recipe settings (:func:`.recipe_utils.recipe_training_arguments`; the collator needs "objects"),
    the ``labels`` column, evaluation batches of 50, plus ``overrides``. Auxiliary losses reach every decoder layer,
    so all parameters are used."""
    settings = dict(label_names=["labels"], per_device_eval_batch_size=50)
    return recipe_training_arguments(output_dir, seed, **{**settings, **overrides})


def build_trainer(model, image_processor, args, train_dataset=None, eval_dataset=None) -> DetrEvaluationTrainer:
    return DetrEvaluationTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DetrShapesCollator(),
        processing_class=image_processor,
    )


def _settings(recipe: str, num_train, num_eval, batch_size, epochs) -> tuple:
    """The recipe's defaults for the arguments left as None, validated; batch_size must split over processes."""
    data, hyper = get_recipe(recipe)["data"], get_recipe(recipe)["training"]
    num_train = data["num_train"] if num_train is None else num_train
    num_eval = data["num_eval"] if num_eval is None else num_eval
    batch_size = hyper["batch_size"] if batch_size is None else batch_size
    epochs = hyper["epochs"] if epochs is None else epochs
    for name, value in (("num_train", num_train), ("num_eval", num_eval), ("batch_size", batch_size)):
        check_positive(name, value)
    if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or epochs <= 0:
        raise ValueError(f"epochs must be a positive number, got {epochs!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
    return num_train, num_eval, batch_size, epochs


def prepare_trunk(model, recipe: str, pretrain_steps: int | None, train, seed: int) -> tuple:
    """Pretrain and freeze the trunk (``pretrain_steps``: the recipe's by default), or with 0 steps calibrate the
    random trunk's frozen norms on ``train`` and leave it trainable. Returns (pretraining loss, seconds) or Nones."""
    pretraining = get_recipe(recipe)["trunk_pretraining"]
    steps = pretraining["steps"] if pretrain_steps is None else pretrain_steps
    if not steps:
        calibrate_frozen_batch_norm(model, train[: min(len(train), 64)]["pixel_values"])
        return None, None
    start = time.perf_counter()
    # enough images for every step to see new ones, at most the recipe's number
    num_images = min(pretraining["num_images"], steps * pretraining["batch_size"])
    loss = pretrain_trunk(model, **{**pretraining, "steps": steps, "num_images": num_images}, seed=seed)
    # DETR trains its ImageNet trunk at a tenth of the rate; freezing it all makes each step ~3x cheaper here
    model.detr.backbone.requires_grad_(False)
    return loss, time.perf_counter() - start


def train_detr_shapes(
    output_dir,
    num_train: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    recipe: str = "detr-shapes-tiny",
    num_eval: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_steps: int = -1,
    pretrain_steps: int | None = None,
) -> tuple[dict, Path]:
    """Evaluate the untrained model, train, evaluate again and save; returns ``(metrics, output_dir)``.

    metrics holds ``untrained_map`` / ``untrained_loss`` and ``test_map``, ``test_map_50``, ... ``test_loss``
    (COCO mAP on the ``test`` split, images never trained on), ``pretrain_loss`` / ``pretrain_runtime`` (None
    without trunk pretraining), ``train_runtime``, ``train_loss`` and ``world_size``. ``pretrain_steps`` overrides
    the recipe's trunk pretraining steps (0: none, a calibrated random trunk trained with the rest). ``output_dir``
    receives ``save_pretrained`` of the model and the image processor (reload with ``AutoModelForObjectDetection`` /
    ``pipeline("object-detection")``). Per-device batch size is ``batch_size / world_size``, so 1 and N processes
    see the same global batches.
    """
    data, hyper = get_recipe(recipe)["data"], get_recipe(recipe)["training"]
    num_train, num_eval, batch_size, epochs = _settings(recipe, num_train, num_eval, batch_size, epochs)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    output_dir = Path(output_dir)
    model, processor = build_detr_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir,
        seed,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size // world_size,
        learning_rate=hyper["learning_rate"] if learning_rate is None else learning_rate,
        weight_decay=hyper["weight_decay"],
        max_grad_norm=hyper["max_grad_norm"],
        warmup_steps=hyper["warmup"],
        lr_scheduler_type="cosine",
        logging_steps=10,
    )
    train = detection_dataset("train", num_train, processor, data["image_size"], seed, data["num_objects"])
    test = detection_dataset("test", num_eval, processor, data["image_size"], seed, data["num_objects"])
    pretrain_loss, pretrain_runtime = prepare_trunk(model, recipe, pretrain_steps, train, seed)
    if pretrain_runtime is not None:  # a frozen trunk: its features are computed once, not at every step
        train, test = with_backbone_features(train, model), with_backbone_features(test, model)
    trainer = build_trainer(model, processor, args, train)
    untrained = trainer.evaluate(test, metric_key_prefix="untrained")
    train_output = trainer.train()
    metrics = {
        **{key: value for key, value in untrained.items() if not key.endswith("runtime")},
        "pretrain_loss": pretrain_loss,
        "pretrain_runtime": pretrain_runtime,
        "train_runtime": train_output.metrics["train_runtime"],
        "train_loss": train_output.training_loss,
        "train_steps": train_output.global_step,
        "world_size": args.world_size,
    }
    metrics.update(trainer.evaluate(test, metric_key_prefix="test"))
    trainer.save_model(str(output_dir))  # model + image processor, on the main process only
    logger.info("DETR shapes recipe: %s", metrics)
    return metrics, output_dir


def evaluate_detr(
    model, image_processor, dataset, output_dir, per_device_batch: int = 8, repeats: int = 1, return_records=False
) -> list:
    """``repeats`` evaluations of ``model`` on a ``detection_dataset`` through :class:`DetrEvaluationTrainer`
    (no training): a list of metrics dicts, or of ``(metrics, records)`` pairs with ``return_records``. The
    distributed test compares them with a single process."""
    args = training_arguments(output_dir, 0, per_device_eval_batch_size=per_device_batch)
    trainer = build_trainer(model, image_processor, args)
    results = []
    for _ in range(repeats):
        metrics = trainer.evaluate(dataset)
        results.append((metrics, trainer.last_records) if return_records else metrics)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = recipe_parser("detr_recipe", __doc__.split("\n\n")[0], DETR_RECIPES, "detr-shapes-tiny",
                           output_help="directory for the trained model and metrics.json")  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, default=None, help="trunk pretraining steps (0: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics, path = train_detr_shapes(
        args.output, args.num_train, args.epochs, args.seed, args.recipe, args.num_eval, args.batch_size,
        args.learning_rate, args.max_steps, args.pretrain_steps,
    )
    if args.expect_world_size is not None and metrics["world_size"] != args.expect_world_size:
        raise RuntimeError(f"expected {args.expect_world_size} processes, Trainer saw {metrics['world_size']}")
    if int(os.environ.get("RANK", "0")) == 0:
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return 0


__all__ = [
    "DETR_RECIPES",
    "DetrEvaluationTrainer",
    "DetrShapesCollator",
    "build_detr_for_shapes",
    "calibrate_frozen_batch_norm",
    "coco_map_from_records",
    "detection_dataset",
    "evaluate_detr",
    "get_recipe",
    "pretrain_trunk",
    "train_detr_shapes",
    "unique_records",
    "with_backbone_features",
]

if __name__ == "__main__":
    sys.exit(run_main(main))
