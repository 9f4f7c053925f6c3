"""Train a small hf_vl CLIP from scratch on the embedded shapes captions with ``Trainer`` (CPU, a few minutes).

    python -m hf_vl.training.clip_recipe --output outputs/clip-shapes
    torchrun --standalone --nproc_per_node 2 -m hf_vl.training.clip_recipe --output outputs/clip-shapes

Image-text pairs are ``load_shapes(task="classification")`` images (one coloured shape each) with their caption
("a red circle") in the template "a photo of {}". Training uses only the seen colour-shape pairs. The model is then
scored zero-shot on the ``heldout`` split, whose pairs (``HELDOUT_COMBINATIONS``, e.g. "blue circle") never occur
in training: each image is classified among the prompts of all 48 colour-shape pairs ("a photo of a blue
circle", ...), so chance is 1/48. The loss is CLIP's symmetric contrastive loss over the global batch (the model's
``return_loss=True`` path, ``hf_vl_contrastive_loss``): under torchrun every process scores its images against
the texts of all processes. ``--one-step`` runs ONE optimizer step on a fixed global batch and saves the loss and
gradients, used to check that 2 processes give the same step as 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments, set_seed

from ..data.shapes import COLOUR_NAMES, COMBINATIONS, SHAPES_CLASS_NAMES, caption_and_spans, load_shapes
from ..modeling.configuration_hf_vl_clip import HfVlClipConfig
from ..modeling.modeling_hf_vl_clip import HfVlClipModel
from ..processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
from ..processing.processing_hf_vl_clip import HfVlClipProcessor
from ..processing.tokenization_hf_vl_clip import load_clip_tokenizer
from .recipe_utils import (
    add_one_step_arguments, check_positive, lookup_recipe, recipe_parser, recipe_training_arguments, run_main,
)
from .probes import GradientCaptureCallback, LossRecordingTrainer

logger = logging.getLogger(__name__)

_TINY_TOWER = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256)
# Named recipes: HfVlClipConfig kwargs, HfVlClipImageProcessor kwargs, data and training defaults. Both use a text
# tower of 2 layers, width 64, joint space 64, the real CLIP tokenizer (49,408 tokens) and 77-token context.
# "clip-shapes-vit": ViT tower on 32x32 inputs with 4x4 patches (64 tokens), 4 layers, width 64. No BatchNorm, so
# N processes reproduce 1 process exactly (the one-step equivalence check uses it).
CLIP_RECIPES: dict[str, dict] = {
    "clip-shapes-vit": {
        "config": dict(
            projection_dim=64,
            text_config=dict(_TINY_TOWER, num_hidden_layers=2),
            vision_config=dict(_TINY_TOWER, num_hidden_layers=4, image_size=32, patch_size=4),
        ),
        "processor": dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "data": dict(image_size=(32, 64), num_train=4000, num_eval=500),
        "training": dict(epochs=8, batch_size=128, learning_rate=2e-3, weight_decay=0.1, warmup=0.1),
        "template": "a photo of {}",
    },
    # The default. OpenAI's modified ResNet as the image tower (one Bottleneck per stage, stem width 8, 64x64
    # input): cheaper per step than the ViT above and far better at shapes from scratch on this little data (held-out
    # zero-shot 82% vs 35%). Its BatchNorm uses per-process batch statistics under torchrun (no SyncBatchNorm, as
    # open_clip without --use-bn-sync), so multi-process runs are close to, not identical with, one process.
    "clip-shapes-rn": {
        "config": dict(
            projection_dim=64,
            text_config=dict(_TINY_TOWER, num_hidden_layers=2),
            vision_config=dict(vision_type="resnet", resnet_depths=[1, 1, 1, 1], resnet_width=8,
                               num_attention_heads=4, image_size=64),
        ),
        "processor": dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        "data": dict(image_size=(32, 64), num_train=4000, num_eval=500),
        "training": dict(epochs=8, batch_size=128, learning_rate=2e-3, weight_decay=0.1, warmup=0.1),
        "template": "a photo of {}",
    },
}


def get_recipe(name: str) -> dict:
    return lookup_recipe(CLIP_RECIPES, name)


def build_clip_for_shapes(recipe: str = "clip-shapes-rn", seed: int = 0) -> tuple[HfVlClipModel, HfVlClipProcessor]:
    """A freshly initialised ``HfVlClipModel`` (a function of ``seed``) and its processor (real CLIP tokenizer)."""
    entry = get_recipe(recipe)
    set_seed(seed)
    model = HfVlClipModel(HfVlClipConfig(**entry["config"]))
    processor = HfVlClipProcessor(HfVlClipImageProcessor(**entry["processor"]), load_clip_tokenizer())
    return model, processor


class ContrastiveCollator:
    """``[{"image": PIL, "caption": str}, ...]`` -> CLIP inputs with ``return_loss=True``.

    ``return_loss`` in the batch makes label-free models return (and Trainer evaluate) their loss
    (ecosystem.md section 4.1). Texts are padded to the longest in the batch, not to 77: with the causal text
    tower and end-of-text pooling the embeddings are the same and the text tower runs ~10x faster.
    """

    def __init__(self, processor, template: str = "{}", image_column: str = "image", text_column: str = "caption"):
        if not callable(processor) or not hasattr(processor, "tokenizer"):
            raise TypeError(
                f"processor must be a CLIP processor (image processor + tokenizer), got {type(processor).__name__}"
            )
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the caption, got {template!r}")
        self.processor = processor
        self.template = template
        self.image_column = image_column
        self.text_column = text_column

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("examples is empty; a batch needs at least one image-text pair")
        for name in (self.image_column, self.text_column):
            if name not in examples[0]:
                raise KeyError(
                    f"column {name!r} is missing (keys: {sorted(examples[0])}); "
                    "set TrainingArguments(remove_unused_columns=False)"
                )
        texts = [self.template.format(example[self.text_column]) for example in examples]
        batch = self.processor(
            images=[example[self.image_column] for example in examples], text=texts, padding="longest",
            return_tensors="pt",
        )
        return {**batch, "return_loss": True}


def shapes_prompts(template: str = "a photo of {}", combos=COMBINATIONS) -> list[str]:
    """One prompt per colour-shape pair, worded like the training captions ("a photo of an orange star")."""
    return [template.format(caption_and_spans([f"{colour} {shape}"])[0]) for colour, shape in combos]


@torch.no_grad()
def zero_shot_logits(model, processor, images, prompts, batch_size: int = 256) -> torch.Tensor:
    """(n_images, n_prompts) scaled cosine similarities, as ``logits_per_image``; texts are embedded once.
    Runs in eval mode (BatchNorm running statistics) and restores the model's mode afterwards."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty; zero-shot classification needs at least one class prompt")
    was_training = model.training
    model.eval()
    text = processor(text=list(prompts), return_tensors="pt")
    text_embeds = F.normalize(model.get_text_features(text["input_ids"], text["attention_mask"]), dim=-1)
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=list(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
        image_embeds = F.normalize(model.get_image_features(pixels), dim=-1)
        rows.append(model.get_logit_scale() * image_embeds @ text_embeds.t())
    model.train(was_training)
    return torch.cat(rows)


def shapes_zero_shot_accuracy(model, processor, dataset, template: str = "a photo of {}") -> dict:
    """Zero-shot accuracy over all colour-shape prompts on a ``task="classification"`` shapes split.

    Returns ``accuracy`` (colour and shape right, chance 1/48), ``shape_accuracy`` and ``colour_accuracy`` (of
    the predicted pair), ``chance`` and ``num_images``.
    """
    logits = zero_shot_logits(model, processor, dataset["image"], shapes_prompts(template))
    predicted = [COMBINATIONS[i] for i in logits.argmax(-1).tolist()]
    truth = [(COLOUR_NAMES[c], SHAPES_CLASS_NAMES[s]) for c, s in zip(dataset["colour"], dataset["label"])]
    n = len(truth)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, truth)) / n,
        "shape_accuracy": sum(p[1] == t[1] for p, t in zip(predicted, truth)) / n,
        "colour_accuracy": sum(p[0] == t[0] for p, t in zip(predicted, truth)) / n,
        "chance": 1 / len(COMBINATIONS),
        "num_images": n,
    }


def training_arguments(output_dir, seed: int, **overrides) -> TrainingArguments:
    """The shared recipe settings (:func:`.recipe_utils.recipe_training_arguments`; the collator needs "image" and
    "caption") plus ``overrides``. Label-free: the loss comes from return_loss=True in every batch. Evaluation
    reports the contrastive loss only: gathering the (batch, batch) logits and nested tower outputs of every step
    would cost memory and nothing uses them (zero-shot scoring is separate)."""
    settings = dict(label_names=[], prediction_loss_only=True)
    return recipe_training_arguments(output_dir, seed, **{**settings, **overrides})


def _shapes(split: str, num_images: int, seed: int, recipe: dict):
    return load_shapes(split, num_images=num_images, task="classification", seed=seed,
                       image_size=recipe["data"]["image_size"])


def _evaluate(trainer: Trainer, processor, entry: dict, num_eval: int, seed: int) -> dict:
    """Contrastive loss on the test split, zero-shot accuracies on the test (seen pairs) and heldout splits."""
    test = _shapes("test", num_eval, seed, entry)
    metrics = trainer.evaluate(test, metric_key_prefix="eval")
    model = trainer.accelerator.unwrap_model(trainer.model)
    for split, dataset in (("test", test), ("heldout", _shapes("heldout", num_eval, seed, entry))):
        scores = shapes_zero_shot_accuracy(model, processor, dataset, entry["template"])
        metrics.update({f"{split}_{key}": value for key, value in scores.items()})
    return metrics


def train_clip_shapes(
    output_dir,
    num_train: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    recipe: str = "clip-shapes-rn",
    num_eval: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_steps: int = -1,
) -> tuple[dict, Path]:
    """Train, score zero-shot and save the recipe's CLIP; returns ``(metrics, output_dir)``.

    metrics: ``heldout_*`` (unseen colour-shape pairs; see ``shapes_zero_shot_accuracy``), ``test_*`` (seen pairs,
    new images), ``eval_loss`` (contrastive loss on the test split), ``train_runtime``, ``train_loss``,
    ``world_size``. ``output_dir`` receives the model and processor (reload with ``AutoModel``/``AutoProcessor`` or
    ``pipeline("zero-shot-image-classification", model=output_dir)``). Per-device batch = batch_size / world_size,
    so 1 and N processes contrast the same global batches.
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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
    output_dir = Path(output_dir)
    model, processor = build_clip_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir, seed, num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size // world_size, per_device_eval_batch_size=batch_size // world_size,
        learning_rate=hyper["learning_rate"] if learning_rate is None else learning_rate,
        weight_decay=hyper["weight_decay"], warmup_steps=hyper["warmup"], lr_scheduler_type="cosine",
        logging_steps=25,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_shapes("train", num_train, seed, entry),
        data_collator=ContrastiveCollator(processor, entry["template"]), processing_class=processor,
    )
    train_output = trainer.train()
    metrics = {"train_runtime": train_output.metrics["train_runtime"], "train_loss": train_output.training_loss,
               "world_size": args.world_size, **_evaluate(trainer, processor, entry, num_eval, seed)}
    trainer.save_model(str(output_dir))  # model + processor (processing_class), on the main process only
    logger.info("CLIP shapes recipe: %s", metrics)
    return metrics, output_dir


def clip_one_step_gradients(
    output_dir, global_batch: int = 8, seed: int = 0, recipe: str = "clip-shapes-vit",
    expected_world_size: int | None = None,
) -> dict:
    """Run ONE optimizer step of the recipe on a fixed global batch; return its loss and gradients.

    The global batch is the first ``global_batch`` training pairs, split over processes. The contrastive loss of a
    batch depends on all its pairs (the negatives), so gradient accumulation is NOT equivalent to a larger batch
    and is not offered here; more processes are, thanks to the gathered loss. Returns ``{"loss": mean of the
    per-process losses (= the global-batch loss), "gradients": {name: tensor}, "world_size": int}``.
    """
    check_positive("global_batch", global_batch)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world_size}")
    entry = get_recipe(recipe)
    model, processor = build_clip_for_shapes(recipe, seed)
    args = training_arguments(
        output_dir, seed, max_steps=1, per_device_train_batch_size=global_batch // world_size, optim="sgd",
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: capture the raw averaged gradient
        logging_strategy="no",
    )
    if expected_world_size is not None and args.world_size != expected_world_size:
        raise RuntimeError(f"expected {expected_world_size} processes, Trainer sees world_size={args.world_size}")
    capture = GradientCaptureCallback()
    trainer = LossRecordingTrainer(
        model=model, args=args, train_dataset=_shapes("train", global_batch, seed, entry),
        data_collator=ContrastiveCollator(processor, entry["template"]), processing_class=processor,
        callbacks=[capture],
    )
    trainer.train()
    loss = torch.tensor(trainer.losses, dtype=torch.float64).mean()
    if args.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss /= args.world_size
    (gradients,) = capture.gradients
    return {"loss": float(loss), "gradients": gradients, "world_size": args.world_size}


def build_parser() -> argparse.ArgumentParser:
    parser = recipe_parser("clip_recipe", __doc__.split("\n\n")[0], CLIP_RECIPES, None, epochs_type=int,
                           learning_rate=False,
                           recipe_help="default: clip-shapes-rn (training), clip-shapes-vit (--one-step)")  # fmt: skip
    add_one_step_arguments(parser, "pairs", grad_accum=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if args.one_step:
        result = clip_one_step_gradients(output / "trainer", args.global_batch, args.seed,
                                         args.recipe or "clip-shapes-vit", args.expect_world_size)
        if is_main:
            output.mkdir(parents=True, exist_ok=True)
            torch.save(result, output / "one_step.pt")
        return 0
    metrics, path = train_clip_shapes(output, args.num_train, args.epochs, args.seed, args.recipe or "clip-shapes-rn",
                                      args.num_eval, args.batch_size, max_steps=args.max_steps)
    if args.expect_world_size is not None and metrics["world_size"] != args.expect_world_size:
        raise RuntimeError(f"expected {args.expect_world_size} processes, Trainer saw {metrics['world_size']}")
    if is_main:
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return 0


__all__ = [
    "CLIP_RECIPES",
    "ContrastiveCollator",
    "build_clip_for_shapes",
    "clip_one_step_gradients",
    "shapes_prompts",
    "shapes_zero_shot_accuracy",
    "train_clip_shapes",
    "zero_shot_logits",
]

if __name__ == "__main__":
    sys.exit(run_main(main))
