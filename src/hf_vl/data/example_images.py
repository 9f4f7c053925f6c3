"""Photographs shipped inside the package (see ``data/images/README.md`` for their sources and licences), so the
quickstart and examples run offline."""

from __future__ import annotations

from importlib import resources

from PIL import Image

EXAMPLE_IMAGES = ("astronaut", "coffee")


def load_example_image(name: str = "astronaut") -> Image.Image:
    """An RGB PIL image by name (one of ``EXAMPLE_IMAGES``)."""
    if name not in EXAMPLE_IMAGES:
        raise ValueError(f"name must be one of {EXAMPLE_IMAGES}, got {name!r}")
    with resources.files("hf_vl.data").joinpath("images", f"{name}.jpg").open("rb") as handle:
        image = Image.open(handle)
        image.load()
    return image.convert("RGB")
