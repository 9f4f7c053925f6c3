"""Train a small hf_vl ViT on the embedded shapes data with ``Trainer`` (CPU, a minute or two).

    python -m hf_vl.training.vit_recipe --output outputs/vit-shapes
    torchrun --standalone --nproc_per_node 2 -m hf_vl.training.vit_recipe --output outputs/vit-shapes

The model classifies the shape of the single object in ``load_shapes(task="classification")`` images; it is scored
on the ``test`` split and on the ``heldout`` split, whose colour-shape pairs never occur in training. The same module
has a ``--one-step`` mode that runs ONE optimizer step on a fixed global batch and saves the loss and the gradients,
used to check that 2 processes (or gradient accumulation) give the same step as 1 process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..data.shapes import SHAPES_CLASS_NAMES, load_shapes
from ..modeling.configuration_hf_vl_vit import HfVlVitConfig
from ..modeling.modeling_hf_vl_vit import HfVlVitForImageClassification
from ..processing.image_processing_hf_vl_vit import HfVlVitImageProcessor
from .recipe_utils import (
    add_one_step_arguments, check_positive, lookup_recipe, recipe_parser, recipe_training_arguments, run_main,
)
from .collators import ImageClassificationCollator, with_pixel_values
from .metrics import classification_compute_metrics
from .probes import GradientCaptureCallback, LossRecordingTrainer

logger = logging.getLogger(__name__)

# Named recipes: model config (HfVlVitConfig kwargs), processor (HfVlVitImageProcessor kwargs), data and training
# defaults. "vit-shapes-tiny": 32x32 input, 8x8 patches (16 tokens), width 64, 4 layers, 0.2M parameters.
VIT_RECIPES: dict[str, dict] = {
    "vit-shapes-tiny": {
        "config": dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            pooling="mean",  # learns faster than the class token at this size
        ),
        "processor": dict(size={"height": 32, "width": 32}),
        "data": dict(image_size=(32, 64), num_train=8000, num_eval=500),
        # 8000 images x 12 epochs / 64 = 1500 steps; shape labels survive flips, so flips double the data twice
        "training": dict(
            epochs=12,
            batch_size=64,
            learning_rate=3e-3,
            weight_decay=0.05,
            warmup=0.1,
            random_flips=("horizontal", "vertical"),
        ),
    },
}


def get_recipe(name: str) -> dict:
    return lookup_recipe(VIT_RECIPES, name)


def build_vit_for_shapes(recipe: str = "vit-shapes-tiny", seed: int = 0):
    """A freshly initialised ``HfVlVitForImageClassification`` (labels = shape names) and its image processor."""
    entry = get_recipe(recipe)
    id2label = dict(enumerate(SHAPES_CLASS_NAMES))
    config = HfVlVitConfig(
        **entry["config"], id2label=id2label, label2id={name: i for i, name in id2label.items()}
    )
    set_seed(seed)  # the initial weights are a function of the seed
    model = HfVlVitForImageClassification(config)
    return model, HfVlVitImageProcessor(**entry["processor"])


def training_arguments(output_dir, seed: int, **overrides) -> TrainingArguments:
    """The shared recipe settings (:func:`.recipe_utils.recipe_training_arguments`; the collator needs "image"), the
    ``labels`` column, plus ``overrides``."""
    return recipe_training_arguments(output_dir, seed, **{"label_names": ["labels"], **overrides})


def build_trainer(
    model, image_processor, args, train_dataset, trainer_class=Trainer, callbacks=None, random_flips=()
) -> Trainer:
    """A Trainer over a dataset of images or ``with_pixel_values`` rows; its collator flips if ``random_flips``
    (``_evaluate`` swaps in one without flips)."""
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=ImageClassificationCollator(image_processor, random_flips=random_flips),
        processing_class=image_processor,
        compute_metrics=classification_compute_metrics(),
        callbacks=callbacks,
    )


def train_vit_shapes(
    output_dir,
    num_train: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    recipe: str = "vit-shapes-tiny",
    num_eval: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_steps: int = -1,
) -> tuple[dict, Path]:
    """Train, evaluate and save the recipe's ViT; returns ``(metrics, output_dir)``.

    metrics holds ``test_accuracy`` / ``test_loss`` (held-out test images), ``heldout_accuracy`` / ``heldout_loss``
    (unseen colour-shape pairs) and ``train_runtime`` / ``train_loss``. ``output_dir`` receives ``save_pretrained``
    of the model and the image processor (reload with ``AutoModelForImageClassification`` / ``pipeline``).
    Per-device batch size is ``batch_size / world_size``, so 1 and N processes see the same global batches.
    """
    entry = get_recipe(recipe)
    data, hyper = entry["data"], entry["training"]
    num_train = data["num_train"] if num_train is None else num_train
    num_eval = data["num_eval"] if num_eval is None else num_eval
    epochs = hyper["epochs"] if epochs is None else epochs
    batch_size = hyper["batch_size"] if batch_size is None else batch_size
    sizes = {"num_train": num_train, "num_eval": num_eval, "epochs": epochs, "batch_size": batch_size}
    for name, value in sizes.items():
        check_positive(name, value)
    model, processor = build_vit_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir,
        seed,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=_per_device(batch_size, "batch_size"),
        per_device_eval_batch_size=256,
        learning_rate=hyper["learning_rate"] if learning_rate is None else learning_rate,
        weight_decay=hyper["weight_decay"],
        warmup_steps=hyper["warmup"],
        lr_scheduler_type="cosine",
        logging_steps=25,
    )
    shapes = dict(task="classification", image_size=data["image_size"], seed=seed)
    train = with_pixel_values(load_shapes("train", num_images=num_train, **shapes), processor)
    trainer = build_trainer(model, processor, args, train, random_flips=hyper["random_flips"])
    train_output = trainer.train()
    metrics = {"train_runtime": train_output.metrics["train_runtime"], "train_loss": train_output.training_loss}
    metrics.update(_evaluate(trainer, processor, num_eval, shapes), world_size=args.world_size)
    trainer.save_model(str(output_dir))  # model + image processor, on the main process only
    logger.info("ViT shapes recipe: %s", metrics)
    return metrics, Path(output_dir)


def _per_device(global_batch: int, name: str, grad_accum: int = 1) -> int:
    """Split a global batch over processes (and accumulation steps): 1 and N processes see the same batches."""
    parts = int(os.environ.get("WORLD_SIZE", "1")) * grad_accum
    if global_batch % parts:
        raise ValueError(f"{name}={global_batch} must be divisible by world_size * grad_accum = {parts}")
    return global_batch // parts


def _evaluate(trainer: Trainer, processor, num_eval: int, shapes: dict) -> dict:
    """``test_*`` (seen colour-shape pairs) and ``heldout_*`` (unseen pairs) metrics, without random flips."""
    trainer.data_collator = ImageClassificationCollator(processor)
    metrics = {}
    for split in ("test", "heldout"):
        evaluation = with_pixel_values(load_shapes(split, num_images=num_eval, **shapes), processor)
        metrics.update(trainer.evaluate(evaluation, metric_key_prefix=split))
    return metrics


def one_step_gradients(
    output_dir,
    global_batch: int = 8,
    grad_accum: int = 1,
    seed: int = 0,
    recipe: str = "vit-shapes-tiny",
    expected_world_size: int | None = None,
) -> dict:
    """Run ONE optimizer step of the recipe on a fixed global batch; return its loss and gradients.

    The global batch is the first ``global_batch`` training images, split over processes and accumulation steps
    (per-device batch = global_batch / (world_size * grad_accum)), so every configuration averages the same
    per-example gradients. Returns ``{"loss": mean loss over the global batch, "gradients": {name: tensor},
    "world_size": int, "grad_accum": int}`` on every process.
    """
    check_positive("global_batch", global_batch)
    check_positive("grad_accum", grad_accum)
    per_device = _per_device(global_batch, "global_batch", grad_accum)
    model, processor = build_vit_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir,
        seed,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_accum,
        optim="sgd",
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: capture the raw averaged gradient
        logging_strategy="no",
    )
    if expected_world_size is not None and args.world_size != expected_world_size:
        raise RuntimeError(f"expected {expected_world_size} processes, Trainer sees world_size={args.world_size}")
    capture = GradientCaptureCallback()
    image_size = get_recipe(recipe)["data"]["image_size"]
    train = load_shapes("train", num_images=global_batch, task="classification", seed=seed, image_size=image_size)
    # no random flips: each configuration must see the very same pixels
    trainer = build_trainer(model, processor, args, train, trainer_class=LossRecordingTrainer, callbacks=[capture])
    trainer.train()
    # equal micro-batch sizes everywhere: the global mean loss is the mean of the per-process micro-batch means
    loss = torch.tensor(trainer.losses, dtype=torch.float64).mean()
    if args.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss /= args.world_size
    (gradients,) = capture.gradients
    return {"loss": float(loss), "gradients": gradients, "world_size": args.world_size, "grad_accum": grad_accum}


def build_parser() -> argparse.ArgumentParser:
    parser = recipe_parser("vit_recipe", __doc__.split("\n\n")[0], VIT_RECIPES, "vit-shapes-tiny", epochs_type=int,
                           batch_size=False, learning_rate=False)  # fmt: skip
    add_one_step_arguments(parser, "examples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    if args.one_step:
        result = one_step_gradients(
            output / "trainer", args.global_batch, args.grad_accum, args.seed, args.recipe, args.expect_world_size
        )
        if int(os.environ.get("RANK", "0")) == 0:
            output.mkdir(parents=True, exist_ok=True)
            torch.save(result, output / "one_step.pt")
        return 0
    metrics, path = train_vit_shapes(
        output, args.num_train, args.epochs, args.seed, args.recipe, args.num_eval, max_steps=args.max_steps
    )
    if args.expect_world_size is not None and metrics["world_size"] != args.expect_world_size:
        raise RuntimeError(f"expected {args.expect_world_size} processes, Trainer saw {metrics['world_size']}")
    if int(os.environ.get("RANK", "0")) == 0:
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return 0


__all__ = ["VIT_RECIPES", "build_vit_for_shapes", "get_recipe", "one_step_gradients", "train_vit_shapes"]

if __name__ == "__main__":
    sys.exit(run_main(main))
