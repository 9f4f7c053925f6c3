"""Fixtures for the Hub-export tests: a tiny saved ``HfVlVitForImageClassification``, real photographs, and a runner
for isolated_load.py (a subprocess in which hf_vl cannot be imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import torch
from common.tiny import TINY_IMAGE, TINY_TRANSFORMER
from PIL import Image

import hf_vl

ISOLATED_LOAD = Path(__file__).with_name("isolated_load.py")
LABELS = ["astronaut", "coffee", "cat", "rocket", "teapot"]


def tiny_vit_config(**overrides) -> hf_vl.HfVlVitConfig:
    """The house tiny sizes (tests/common/tiny.py) with named labels, so pipelines print real class names."""
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={label: index for index, label in enumerate(LABELS)})
    return hf_vl.HfVlVitConfig(**{**TINY_TRANSFORMER, **TINY_IMAGE, **labels, **overrides})


def save_tiny_vit(directory, model_class=hf_vl.HfVlVitForImageClassification, dtype=torch.float32, **overrides):
    """A random tiny model (seeded) plus its image processor, saved with ``save_pretrained``."""
    torch.manual_seed(0)
    model = model_class(tiny_vit_config(**overrides)).eval()
    if hasattr(model, "classifier"):
        # a wide classifier so the top-1 class is far from ties, as in a trained model
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
    model.to(dtype).save_pretrained(directory)
    hf_vl.HfVlVitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def make_tiny_vit():
    """``make_tiny_vit(directory, model_class=..., dtype=..., **config_overrides)`` saves a tiny model there."""
    return save_tiny_vit


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit") / "model")


@pytest.fixture(scope="session")
def photos():
    arrays = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())
    return [Image.fromarray(array) for array in arrays]


def run_isolated_load(bundle: Path, inputs: Path, out: Path, modules_cache: Path) -> subprocess.CompletedProcess:
    """Run isolated_load.py on ``bundle`` with a fresh ``HF_MODULES_CACHE``, offline."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_MODULES_CACHE=str(modules_cache),  # fresh: no remote code cached from earlier runs
        HF_HOME=str(modules_cache.parent / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    # -I: no PYTHONPATH, no cwd, no user site on sys.path; the script also blocks hf_vl's editable path entry
    command = [sys.executable, "-I", str(ISOLATED_LOAD), str(bundle), str(inputs), str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def run_isolated():
    """``run_isolated(bundle, inputs, out, modules_cache)`` runs isolated_load.py where hf_vl cannot be imported."""
    return run_isolated_load
