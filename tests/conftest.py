"""Shared test setup: offline Hugging Face libraries, a private remote-code module cache, seeded torch, and a real
photograph. Kept minimal on purpose; helpers live in ``tests/common/`` (importable as ``common`` because this
directory is put on ``sys.path`` by pytest's default import mode)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before anything imports transformers/datasets/evaluate: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
# One fresh remote-code cache per test process (and per xdist worker): a shared ~/.cache one would race and go stale
# (ecosystem.md section 1.3).
_MODULES_CACHE = tempfile.mkdtemp(prefix="hf_vl_modules_")
os.environ["HF_MODULES_CACHE"] = _MODULES_CACHE
# atexit, not only fixture teardown: an xdist controller imports this file but runs no fixtures
atexit.register(shutil.rmtree, _MODULES_CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# Helper modules assert too: show values on failure as in test files.
pytest.register_assert_rewrite("common")


@pytest.fixture(scope="session")
def hf_modules_cache():
    """This test process's HF_MODULES_CACHE directory (removed at exit)."""
    return _MODULES_CACHE


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture
def photo(_astronaut):
    """scikit-image's astronaut (512x512 RGB) as a PIL image."""
    from PIL import Image

    return Image.fromarray(_astronaut)
