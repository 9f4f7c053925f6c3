"""The conversion registry and the declarations (Source / ConversionSpec) every architecture file provides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_vl.conversion import ConversionSpec, Rename, Source
from hf_vl.conversion.api import CONVERSIONS, get_conversion, register_conversion
from hf_vl.conversion.loaders import load_npz, load_state_dict_file
from hf_vl.registry import ARCHITECTURES


@pytest.mark.parametrize("arch", sorted(CONVERSIONS))
def test_every_conversion_is_complete(arch):
    spec = CONVERSIONS[arch]
    architecture = ARCHITECTURES[spec.arch]
    assert spec.arch == arch and architecture.variants, "conversions build configs from the variant table"
    for name, row in architecture.variants.items():
        assert {"config", "processor"} <= set(row), name
    for source in spec.sources:
        assert source.rules and source.description and callable(source.load)


def test_register_conversion_guards_duplicates_and_unknown_architectures(monkeypatch):
    monkeypatch.setattr("hf_vl.conversion.api.CONVERSIONS", dict(CONVERSIONS))
    spec = ConversionSpec(arch="vit", sources=(get_conversion("vit").get_source("timm"),))
    with pytest.raises(ValueError, match="already registered"):
        register_conversion(spec)
    register_conversion(spec, exist_ok=True)
    assert get_conversion("vit").source_names == ["timm"]
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        register_conversion(ConversionSpec(arch="nope", sources=spec.sources))
    with pytest.raises(TypeError, match="ConversionSpec"):
        register_conversion({"arch": "vit"})


def test_declarations_are_validated():
    with pytest.raises(TypeError, match="rules"):
        Source(name="x", description="x", load=load_npz, rules=())
    source = Source(name="x", description="x", load=load_npz, rules=[Rename("a", "b")])
    assert isinstance(source.rules, tuple)
    with pytest.raises(ValueError, match="duplicate source names"):
        ConversionSpec(arch="vit", sources=(source, source))


def test_loaders_read_each_format(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    torch.save(tensors, tmp_path / "w.pt")
    np.savez(tmp_path / "w.npz", **{key: value.numpy() for key, value in tensors.items()})
    for path in (tmp_path / "w.pt", tmp_path / "w.npz"):
        loaded = load_state_dict_file(path)
        assert loaded.keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(loaded[key], tensors[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be a file"):
        load_state_dict_file(tmp_path)
