"""Reading original checkpoints into flat state dicts (key -> CPU tensor).

- ``.pth`` / ``.pt`` / ``.bin``: ``torch.load(map_location="cpu", weights_only=True)``, which refuses pickled code
  (a file that needs ``weights_only=False`` must be opened by a trusted, source-specific loader);
- ``.safetensors``: ``safetensors.torch.load_file``;
- ``.npz`` (JAX/Flax ``np.savez`` of the ``/``-flattened parameter tree): numpy arrays as tensors;
- a transformers ``save_pretrained`` directory: ``model.safetensors`` (single or sharded) or ``pytorch_model.bin``.

Nothing here unwraps nested dicts or guesses a format from key names: a wrapped file (``{"model": {...}}``) is an
error naming its top-level keys, and the source-specific loader of the architecture decides what to do with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
FILE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".npz")


def _existing(path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {kind} {str(path)!r} does not exist")
    if kind == "file" and not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} must be a file, got a directory")
    if kind == "directory" and not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} must be a directory (save_pretrained layout), got a file")
    return path


def as_state_dict(obj, path) -> StateDict:
    """Check that ``obj`` is a flat mapping of str -> tensor; a clear error otherwise."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (key -> tensor) but a {type(obj).__name__}")
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a flat state dict: entries {not_tensors[:10]} are not tensors (a training checkpoint "
            "wrapping the weights, e.g. under 'model' or 'state_dict'? save the weights themselves)"
        )
    return dict(obj)


def load_npz(path) -> StateDict:
    """A ``.npz`` archive as tensors (keys unchanged, e.g. ``Transformer/encoderblock_0/LayerNorm_0/scale``)."""
    path = _existing(path, "file")
    state_dict = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            array = np.asarray(archive[key])
            if array.dtype.kind not in "fiub":
                raise ValueError(f"{path}: array {key!r} has unsupported dtype {array.dtype} (bfloat16 npz?)")
            state_dict[key] = torch.from_numpy(np.array(array))  # a writable copy: torch refuses read-only arrays
    return state_dict


def load_state_dict_file(path) -> StateDict:
    """Load a ``.pth``/``.pt``/``.bin``, ``.safetensors`` or ``.npz`` file as a state dict, chosen by suffix."""
    path = _existing(path, "file")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return as_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    if suffix == ".safetensors":
        return load_file(path, device="cpu")
    if suffix == ".npz":
        return load_npz(path)
    raise ValueError(f"checkpoint {str(path)!r} has an unsupported suffix {suffix!r}; expected one of {FILE_SUFFIXES}")


def load_transformers_directory(path) -> StateDict:
    """The weights of a transformers ``save_pretrained`` directory (single or sharded safetensors, or a .bin)."""
    path = _existing(path, "directory")
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors", device="cpu")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in load_file(path / shard, device="cpu").items()}
    if (path / "pytorch_model.bin").is_file():
        return load_state_dict_file(path / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{str(path)!r} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


__all__ = ["StateDict", "as_state_dict", "load_npz", "load_state_dict_file", "load_transformers_directory"]
