"""In-process checks of ``hf_vl.export``: bundle layout, auto_map, weights, import scan, restored global state."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from common.tiny import tiny_vit_config
from safetensors.torch import load_file

import hf_vl
from hf_vl import registry
from hf_vl.export import (
    _copy_code_files,
    _model_auto_class,
    build_auto_map,
    check_bundle,
    code_classes,
    export_bundle,
    prepare_for_hub,
    render_model_card,
)

SRC = Path(hf_vl.__file__).parent
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_hf_vl_vit.HfVlVitConfig",
    "AutoModel": "modeling_hf_vl_vit.HfVlVitModel",
    "AutoModelForImageClassification": "modeling_hf_vl_vit.HfVlVitForImageClassification",
    "AutoImageProcessor": "image_processing_hf_vl_vit.HfVlVitImageProcessor",
}
SHIPPED = {
    "configuration_hf_vl_vit.py", "modeling_hf_vl_vit.py", "hf_vl_attention.py", "hf_vl_embeddings.py",
    "hf_vl_mlp.py", "hf_vl_pretrained.py", "hf_vl_cpu_memory.py", "hf_vl_transformer_layers.py",
    "image_processing_hf_vl_vit.py",
}
CODE_CLASSES = (hf_vl.HfVlVitConfig, hf_vl.HfVlVitModel, hf_vl.HfVlVitForImageClassification,
                hf_vl.HfVlVitImageProcessor, hf_vl.HfVlVitPreTrainedModel)


@pytest.fixture(scope="module")
def bundle(tiny_vit_dir, tmp_path_factory):
    return export_bundle(tiny_vit_dir, tmp_path_factory.mktemp("export") / "vit-tiny-bundle")


def _json(path):
    return json.loads(Path(path).read_text())


def test_bundle_files(bundle):
    names = {path.name for path in bundle.iterdir()}
    assert names == SHIPPED | {"config.json", "preprocessor_config.json", "model.safetensors", "README.md"}
    for name in SHIPPED:  # verbatim copies of the package sources
        source = next(SRC.rglob(name))
        assert (bundle / name).read_bytes() == source.read_bytes()


def test_auto_map_is_complete(bundle):
    auto_map = _json(bundle / "config.json")["auto_map"]
    assert auto_map == EXPECTED_AUTO_MAP
    # every Auto class of the registry row is mapped (what lets later architectures export unchanged)
    assert set(registry.ARCHITECTURES["vit"].models) <= set(auto_map)
    preprocessor = _json(bundle / "preprocessor_config.json")
    assert preprocessor["auto_map"]["AutoImageProcessor"] == EXPECTED_AUTO_MAP["AutoImageProcessor"]
    assert preprocessor["image_processor_type"] == "HfVlVitImageProcessor"


def test_config_and_weights_unchanged(bundle, tiny_vit_dir):
    original, exported = _json(tiny_vit_dir / "config.json"), _json(bundle / "config.json")
    assert {k: v for k, v in exported.items() if k != "auto_map"} == original
    before, after = load_file(tiny_vit_dir / "model.safetensors"), load_file(bundle / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(key.startswith("vit.encoder.layers.1.self_attn.q_proj") for key in after)  # hf_vl layout kept
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_shipped_files_import_no_hf_vl(bundle):
    shipped = {path.stem for path in bundle.glob("*.py")}
    for path in bundle.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(alias.name.split(".")[0] == "hf_vl" for alias in node.names), path.name
            elif isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), path.name
                if node.level == 0:
                    assert node.module.split(".")[0] != "hf_vl", path.name
                else:
                    assert node.module in shipped, (path.name, node.module)


def test_global_state_restored_after_export(bundle, tmp_path, make_tiny_vit):
    for cls in CODE_CLASSES:
        assert "_auto_class" not in cls.__dict__, cls.__name__
        assert cls._auto_class is None
    # an ordinary save after an export stays plain: no code files, no auto_map
    make_tiny_vit(tmp_path)
    assert not list(tmp_path.glob("*.py"))
    assert "auto_map" not in _json(tmp_path / "config.json")
    assert "auto_map" not in _json(tmp_path / "preprocessor_config.json")


def test_prepare_for_hub_registers_then_restores(tiny_vit_dir):
    model = hf_vl.HfVlVitForImageClassification.from_pretrained(tiny_vit_dir)
    processor = hf_vl.HfVlVitImageProcessor.from_pretrained(tiny_vit_dir)
    with pytest.raises(RuntimeError, match="boom"):
        with prepare_for_hub(model, processor) as auto_map:
            assert auto_map == EXPECTED_AUTO_MAP
            assert model.config.auto_map == EXPECTED_AUTO_MAP
            assert hf_vl.HfVlVitForImageClassification._auto_class == "AutoModelForImageClassification"
            assert hf_vl.HfVlVitConfig._auto_class == "AutoConfig"
            assert hf_vl.HfVlVitImageProcessor._auto_class == "AutoImageProcessor"
            raise RuntimeError("boom")
    assert all(cls._auto_class is None for cls in CODE_CLASSES)
    assert getattr(model.config, "auto_map", None) is None
    assert "auto_map" not in processor.__dict__


def test_prepare_for_hub_rejects_bad_arguments(tiny_vit_dir):
    model = hf_vl.HfVlVitForImageClassification.from_pretrained(tiny_vit_dir)
    with pytest.raises(TypeError, match="model"):
        with prepare_for_hub(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match="image_processor"):
        with prepare_for_hub(model, image_processor="not a processor"):
            pass


@pytest.mark.parametrize(
    "line, message",
    [
        ("import hf_vl", "imports hf_vl"),
        ("def f():\n    from hf_vl.registry import ARCHITECTURES\n", "imports hf_vl.registry"),
        ("try:\n    from hf_vl.modeling.hf_vl_mlp import HfVlMlp\nexcept ImportError:\n    pass\n", "imports hf_vl"),
        ("from . import hf_vl_mlp", "relative import"),
        ("from ..modeling import hf_vl_mlp", "relative import"),
        ("from .hf_vl_missing import X", "not in the bundle"),
    ],
)
def test_check_bundle_rejects_bad_imports(bundle, tmp_path, line, message):
    broken = shutil.copytree(bundle, tmp_path / "broken")
    check_bundle(broken)  # the copy itself is fine
    with open(broken / "hf_vl_mlp.py", "a") as file:
        file.write("\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        check_bundle(broken)


def test_check_bundle_rejects_dangling_auto_map(bundle, tmp_path):
    broken = shutil.copytree(bundle, tmp_path / "broken")
    config = _json(broken / "config.json")
    config["auto_map"]["AutoModel"] = "modeling_hf_vl_vit.HfVlVitMissing"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="HfVlVitMissing"):
        check_bundle(broken)


def test_export_errors(tiny_vit_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_dir"):
        export_bundle(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="differ"):
        export_bundle(tiny_vit_dir, tiny_vit_dir)
    builtin = tmp_path / "builtin"
    from transformers import ViTConfig

    ViTConfig().save_pretrained(builtin)
    with pytest.raises(ValueError, match="not an hf_vl architecture"):
        export_bundle(builtin, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_bundle(tiny_vit_dir, tmp_path / "full")
    assert export_bundle(tiny_vit_dir, tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert not (tmp_path / "full" / "keep.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["builtin", "full"]  # no staging leftovers


def test_export_base_model_and_bf16(tmp_path, make_tiny_vit):
    model_dir = make_tiny_vit(tmp_path / "base", model_class=hf_vl.HfVlVitModel, dtype=torch.bfloat16)
    bundle = export_bundle(model_dir, tmp_path / "bundle")
    config = _json(bundle / "config.json")
    assert config["architectures"] == ["HfVlVitModel"]
    assert config["auto_map"] == EXPECTED_AUTO_MAP  # heads stay loadable from a base checkpoint
    assert all(t.dtype == torch.bfloat16 for t in load_file(bundle / "model.safetensors").values())
    front_matter = yaml.safe_load((bundle / "README.md").read_text().split("---")[1])
    assert front_matter["pipeline_tag"] == "image-feature-extraction"


def test_model_card(bundle):
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\n")
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    assert front_matter["license"] == "apache-2.0"
    assert front_matter["pipeline_tag"] == "image-classification"
    assert {"hf_vl", "hf_vl_vit", "custom_code"} <= set(front_matter["tags"])
    assert f"hf_vl {hf_vl.__version__}" in card
    assert "# vit-tiny-bundle" in card and "2010.11929" in card
    assert "hidden_act=gelu" in card and "gelu_pytorch_tanh" in card
    for variant in hf_vl.VIT_VARIANTS:
        assert f"`{variant}`" in card
    for reference in EXPECTED_AUTO_MAP.values():
        assert f"`{reference}`" in card
    # every placeholder was filled (BibTeX and code braces are not identifiers)
    assert re.findall(r"\{[A-Za-z_][A-Za-z0-9_.]*\}", card) == []


def test_custom_model_card(tiny_vit_dir, tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\nlicense: mit\n---\n{model_class} {config.num_hidden_layers} {unknown} {x: 1}\n")
    bundle = export_bundle(tiny_vit_dir, tmp_path / "bundle", model_card=template)
    assert (bundle / "README.md").read_text().endswith("HfVlVitForImageClassification 2 {unknown} {x: 1}\n")
    model = hf_vl.HfVlVitForImageClassification.from_pretrained(tiny_vit_dir)
    with pytest.raises(ValueError, match="front matter"):
        render_model_card(model, "# no front matter\n")
    with pytest.raises(FileNotFoundError):
        render_model_card(model, tmp_path / "missing.md")


def test_model_card_templates_are_hub_cards():
    """Every template belongs to a registered architecture and carries the Hub metadata export relies on."""
    folder = Path(__file__).resolve().parents[2] / "model_cards"
    templates = sorted(path for path in folder.glob("*.md") if path.name != "README.md")
    assert "vit.md" in {path.name for path in templates}
    for path in templates:
        assert path.stem in registry.ARCHITECTURES, f"{path.name}: no architecture {path.stem!r} in the registry"
        text = path.read_text()
        assert text.startswith("---\n"), path.name
        front_matter = yaml.safe_load(text.split("---")[1])
        assert front_matter["library_name"] == "transformers", path.name
        assert front_matter.get("license"), path.name
        assert {"pipeline_tag", "tags"} <= set(front_matter), path.name
        assert "{hf_vl_version}" in text and "{model_type}" in text, path.name


@pytest.mark.parametrize("name", sorted(registry.ARCHITECTURES))
def test_every_registered_architecture_ships_package_free_code(name, tmp_path):
    """For each registry row (CLIP, DETR, ... as they are added): the full auto_map names every Auto class of the row,
    and the files those classes reach import nothing from hf_vl and define every mapped class."""
    arch = registry.ARCHITECTURES[name]
    auto_map = build_auto_map(arch)
    assert set(arch.models) | {"AutoConfig"} <= set(auto_map)
    for auto_name, cls in (("AutoImageProcessor", arch.image_processor_class), ("AutoProcessor", arch.processor_class)):
        assert (auto_name in auto_map) == (cls is not None)
    _copy_code_files(code_classes(arch).values(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": arch.model_type, "auto_map": auto_map}))
    check_bundle(tmp_path)


def test_task_auto_class_wins_over_auto_model(monkeypatch):
    """A class listed under AutoModel and a task Auto class (CLIP) is saved under the task: the card's pipeline_tag."""
    arch = registry.ARCHITECTURES["vit"]
    models = {"AutoModel": hf_vl.HfVlVitModel, "AutoModelForImageClassification": hf_vl.HfVlVitModel}
    monkeypatch.setitem(registry.ARCHITECTURES, "vit", dataclasses.replace(arch, models=models))
    assert _model_auto_class(registry.ARCHITECTURES["vit"], hf_vl.HfVlVitModel(tiny_vit_config())) == (
        "AutoModelForImageClassification"
    )
