"""``hf-vl quickstart``: the main job of the README, offline, on the embedded data.

For each architecture step: train a small model through ``Trainer`` on ``hf_vl.data.shapes``, export it as a
package-free Hub bundle, reload the bundle with ``pipeline(..., trust_remote_code=True)``, score it on held-out
data through the pipeline, and print the score and where the bundle is. Later architectures add a step to
``STEPS``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def _offline() -> None:
    # everything the quickstart needs ships inside the package: never reach for the Hub
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        os.environ.setdefault(name, "1")


def vit_step(output_dir: Path, fast: bool) -> dict:
    """Train a small ViT on shapes classification, export it, reload the bundle in a pipeline and score it."""
    from transformers import pipeline

    from .data.shapes import load_shapes
    from .export import export_bundle
    from .training.vit_recipe import get_recipe, train_vit_shapes

    # fast: a few steps for the tests; it exercises train -> export -> pipeline, its score is near chance
    budget = dict(num_train=600, epochs=2, num_eval=100) if fast else {}
    metrics, model_dir = train_vit_shapes(output_dir / "vit", **budget)
    bundle = export_bundle(model_dir, output_dir / "vit-bundle", overwrite=True)
    # the Hub bundle, loaded as a user without hf_vl would (hf_vl's registered classes win when it is installed)
    classifier = pipeline("image-classification", model=str(bundle), trust_remote_code=True)
    image_size = get_recipe("vit-shapes-tiny")["data"]["image_size"]
    heldout = load_shapes("heldout", num_images=100 if fast else 500, task="classification", image_size=image_size)
    names = heldout.features["label"].names
    predictions = classifier(list(heldout["image"]), top_k=1, batch_size=64)
    correct = sum(pred[0]["label"] == names[label] for pred, label in zip(predictions, heldout["label"]))
    return {
        "task": "shape classification of images with unseen colour-shape pairs",
        "trainer_heldout_accuracy": round(metrics["heldout_accuracy"], 4),
        "pipeline_heldout_accuracy": round(correct / len(heldout), 4),
        "bundle": str(bundle),
    }


def clip_step(output_dir: Path, fast: bool) -> dict:
    """Train a small CLIP from scratch on shapes captions, export it, and score zero-shot through the stock
    zero-shot-image-classification pipeline on colour-shape pairs never seen together in training."""
    from transformers import pipeline

    from .data.shapes import caption_and_spans, load_shapes, phrase_names
    from .export import export_bundle
    from .training.clip_recipe import get_recipe, train_clip_shapes

    recipe = "clip-shapes-rn"
    # fast: a few steps for the tests; it exercises train -> export -> pipeline, its score is near chance
    budget = dict(num_train=256, max_steps=8, num_eval=64) if fast else {}
    metrics, model_dir = train_clip_shapes(output_dir / "clip", recipe=recipe, **budget)
    bundle = export_bundle(model_dir, output_dir / "clip-bundle", overwrite=True)
    classifier = pipeline("zero-shot-image-classification", model=str(bundle), trust_remote_code=True)
    entry = get_recipe(recipe)
    heldout = load_shapes(
        "heldout", num_images=64 if fast else 500, task="classification", image_size=entry["data"]["image_size"]
    )
    labels = [caption_and_spans([phrase])[0] for phrase in phrase_names()]  # "a red circle", "an orange star"
    predictions = classifier(
        list(heldout["image"]), candidate_labels=labels, hypothesis_template=entry["template"], batch_size=64
    )
    correct = sum(pred[0]["label"] == caption for pred, caption in zip(predictions, heldout["caption"]))
    return {
        "task": f"zero-shot colour-shape naming among {len(labels)} prompts, unseen pairs (chance {1 / len(labels):.3f})",
        "trainer_heldout_accuracy": round(metrics["heldout_accuracy"], 4),
        "pipeline_heldout_accuracy": round(correct / len(heldout), 4),
        "bundle": str(bundle),
    }


def detr_step(output_dir: Path, fast: bool) -> dict:
    """Train a small DETR on shapes detection, export it, reload the bundle with the stock object-detection
    pipeline and score its detections on held-out images with COCO box mAP (the shipped pycocotools metric)."""
    from transformers import pipeline

    from .data.shapes import load_shapes
    from .export import export_bundle
    from .training.detr_recipe import get_recipe, train_detr_shapes
    from .training.metrics import coco_map_metric

    # fast: a few steps for the tests; it exercises train -> export -> pipeline, its mAP is near untrained
    budget = dict(num_train=64, max_steps=4, num_eval=16, pretrain_steps=2) if fast else {}
    metrics, model_dir = train_detr_shapes(output_dir / "detr", **budget)
    bundle = export_bundle(model_dir, output_dir / "detr-bundle", overwrite=True)
    detector = pipeline("object-detection", model=str(bundle), trust_remote_code=True)
    data = get_recipe("detr-shapes-tiny")["data"]
    test = load_shapes("test", num_images=metrics["test_num_images"], image_size=data["image_size"],
                       task="detection", num_objects=data["num_objects"])  # fmt: skip
    label2id = detector.model.config.label2id
    predictions, references = [], []
    for detections, example in zip(detector(list(test["image"]), threshold=0.0, batch_size=50), test):
        boxes = [[d["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")] for d in detections]
        predictions.append({"boxes": boxes, "scores": [d["score"] for d in detections],
                            "labels": [label2id[d["label"]] for d in detections]})  # fmt: skip
        # references: the dataset's xywh pixel boxes as xyxy
        references.append({"boxes": [[x, y, x + w, y + h] for x, y, w, h in example["objects"]["bbox"]],
                           "labels": example["objects"]["category"]})  # fmt: skip
    pipeline_map = coco_map_metric().compute(predictions=predictions, references=references)["map"]
    return {
        "task": f"detect and name 1-{data['num_objects'][1]} shapes per image, COCO box mAP on held-out images",
        "untrained_map": round(metrics["untrained_map"], 4),
        "trainer_test_map": round(metrics["test_map"], 4),
        "pipeline_test_map": round(pipeline_map, 4),
        "bundle": str(bundle),
    }


def _overlay(image, masks, path: Path) -> None:
    """Save the photograph with each mask tinted in its own colour (largest first, so small masks stay visible)."""
    import numpy as np
    from PIL import Image

    canvas = np.asarray(image, dtype=np.float32).copy()
    palette = np.random.default_rng(0).uniform(0, 255, size=(max(len(masks), 1), 3))
    for colour, mask in zip(palette, sorted(masks, key=lambda m: -int(np.asarray(m).sum()))):
        mask = np.asarray(mask, dtype=bool)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    Image.fromarray(canvas.astype(np.uint8)).save(path)


def sam_step(output_dir: Path, fast: bool, sam_checkpoint: str | None = None) -> dict:
    """Fine-tune a tiny SAM's mask decoder on shapes masks (frozen encoder: no pretrained weights offline), export it,
    reload the bundle with the stock mask-generation pipeline and segment the bundled photograph. With
    ``sam_checkpoint`` (segment-anything's ``sam_vit_*.pth``) the photograph is segmented by the converted original
    model instead, so the masks are meaningful."""
    from transformers import pipeline

    from .data.example_images import load_example_image
    from .export import export_bundle
    from .training.sam_recipe import quickstart_sam, train_sam_shapes

    if fast:  # a few steps for the tests: it exercises train -> export -> pipeline, its score is near untrained
        metrics, model_dir = train_sam_shapes(output_dir / "sam", num_train=32, max_steps=4, num_eval=8)
        metrics = {**metrics, "model_dir": str(model_dir)}
    else:  # 625 steps, about 1.5 minutes
        metrics = quickstart_sam(output_dir / "sam", fast=True)
    bundle = export_bundle(metrics["model_dir"], output_dir / "sam-bundle", overwrite=True)
    model = str(bundle)
    if sam_checkpoint is not None:
        from .conversion.api import convert_checkpoint

        model = str(output_dir / "sam-converted")
        convert_checkpoint("sam", "original", sam_checkpoint, output=model)
    generator = pipeline("mask-generation", model=model, trust_remote_code=True)
    photo = load_example_image("astronaut")
    # thresholds off for the tiny random-encoder model (its IoU predictions are not calibrated); SAM's defaults
    # (0.88 / 0.95) for a converted original
    thresholds = {} if sam_checkpoint else dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    outputs = generator(photo, points_per_batch=256, points_per_crop=8 if fast else 16, **thresholds)
    overlay = output_dir / "sam-astronaut-masks.png"
    _overlay(photo, outputs["masks"], overlay)
    return {
        "task": "mask decoder fine-tuned on shapes masks (tiny SAM, random frozen encoder), point and box prompts",
        "untrained_heldout_miou": round(metrics["untrained_miou"], 4),
        "trainer_heldout_miou": round(metrics["test_miou"], 4),
        "photo_masks": len(outputs["masks"]),
        "photo_overlay": str(overlay),
        "bundle": str(bundle),
    }


STEPS: dict[str, Callable[[Path, bool], dict]] = {
    "vit": vit_step, "clip": clip_step, "detr": detr_step, "sam": sam_step
}


def run_quickstart(
    output_dir: str | os.PathLike = "hf_vl_quickstart", fast: bool = False, sam_checkpoint: str | None = None
) -> dict[str, dict]:
    """Run every step; returns ``{arch: summary}`` and prints one line per step. ``sam_checkpoint``: an original
    ``sam_vit_*.pth`` to segment the bundled photograph with (see ``sam_step``)."""
    _offline()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, step in STEPS.items():
        start = time.perf_counter()
        summary = step(output_dir, fast, sam_checkpoint) if step is sam_step else step(output_dir, fast)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        summaries[name] = summary
        print(f"[{name}] " + ", ".join(f"{key}={value}" for key, value in summary.items()), flush=True)
    print(f"quickstart done: bundles under {output_dir.resolve()}", flush=True)
    return summaries
