"""Helpers shared by the Trainer recipes (``vit_recipe``, ``clip_recipe``, ``detr_recipe``, ``sam_recipe``)."""

from __future__ import annotations


def check_positive(name: str, value) -> None:
    """A clear error for a recipe argument that must be a positive integer (bools rejected)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def lookup_recipe(recipes: dict[str, dict], name: str) -> dict:
    """``recipes[name]``, or a ValueError listing the known recipe names."""
    if name not in recipes:
        raise ValueError(f"recipe={name!r} is unknown; expected one of {sorted(recipes)}")
    return recipes[name]


def run_main(main, argv=None) -> int:
    """Run a recipe's ``main`` and then tear down torch.distributed if the run (torchrun) set it up: a process that
    exits with the gloo group still alive can abort in its destructor ("terminate called without an active
    exception", exit -6) after finishing its work, which torchrun reports as a failed run."""
    import torch.distributed as dist

    try:
        return main(argv)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def recipe_parser(module: str, description: str, recipes: dict, default_recipe: str | None, *,
                  recipe_help: str | None = None, epochs_type: type = float, batch_size: bool = True,
                  learning_rate: bool = True, output_help: str = "directory for the trained model (or the one-step "
                  "dump)"):  # fmt: skip
    """The command line every recipe shares (``python -m hf_vl.training.<module>``); recipes add their own flags.
    ``batch_size`` / ``learning_rate``: offer those overrides only where the recipe honours them."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m hf_vl.training.{module}", description=description)
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--recipe", default=default_recipe, choices=sorted(recipes), help=recipe_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-eval", type=int, default=None)
    parser.add_argument("--epochs", type=epochs_type, default=None)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=None)
    if learning_rate:
        parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--expect-world-size", type=int, default=None, help="fail unless this many processes run")
    return parser


def add_one_step_arguments(parser, unit: str, grad_accum: bool = True) -> None:
    """``--one-step`` (one optimiser step on a fixed global batch, for the distributed-equivalence tests)."""
    parser.add_argument("--one-step", action="store_true", help="one step on a fixed batch; save loss + gradients")
    parser.add_argument("--global-batch", type=int, default=8, help=f"--one-step: {unit} in the global batch")
    if grad_accum:
        parser.add_argument("--grad-accum", type=int, default=1, help="--one-step: gradient accumulation steps")


def recipe_training_arguments(output_dir, seed: int, **settings):
    """``TrainingArguments`` with the settings every hf_vl recipe shares, then the recipe's ``settings`` (which win):
    CPU, no reporting, no checkpoints or scheduled evaluation (recipes evaluate once, at the end), data loading in
    the main process, ``seed`` for model init and data order, and the raw columns kept, because each recipe's
    collator builds the model inputs from them (ecosystem.md section 4.2). Every recipe's model uses all of its
    parameters in every forward, so DDP skips its search for unused ones (``ddp_find_unused_parameters=False``)."""
    from transformers import TrainingArguments

    shared = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], remove_unused_columns=False,
        ddp_find_unused_parameters=False, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        seed=seed, data_seed=seed,
    )  # fmt: skip
    return TrainingArguments(**{**shared, **settings})
