"""Helpers shared by the Trainer recipes (``vit_recipe``, ``clip_recipe``, ``detr_recipe``)."""

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
