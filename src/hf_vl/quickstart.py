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


STEPS: dict[str, Callable[[Path, bool], dict]] = {"vit": vit_step, "clip": clip_step}


def run_quickstart(output_dir: str | os.PathLike = "hf_vl_quickstart", fast: bool = False) -> dict[str, dict]:
    """Run every step; returns ``{arch: summary}`` and prints one line per step."""
    _offline()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, step in STEPS.items():
        start = time.perf_counter()
        summary = step(output_dir, fast)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        summaries[name] = summary
        print(f"[{name}] " + ", ".join(f"{key}={value}" for key, value in summary.items()), flush=True)
    print(f"quickstart done: bundles under {output_dir.resolve()}", flush=True)
    return summaries
