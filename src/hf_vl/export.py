"""Package-free Hugging Face Hub bundles of saved hf_vl models (remote code, ``trust_remote_code=True``).

A bundle is a folder that ``huggingface_hub.upload_folder`` (or ``push_to_hub``) publishes as is: safetensors weights
in hf_vl layout, ``config.json`` with a complete ``auto_map``, the image processor / processor files, the
``modeling/`` and ``processing/`` source files the classes reach (copied flat, single-dot imports) and a model card
(README.md) rendered from ``model_cards/<arch>.md``. Users load it without installing hf_vl::

    AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)

Why the extra work beyond ``save_pretrained`` (ecosystem.md sections 1.3, 1.4, 2.7):
- only classes marked with ``register_for_auto_class`` are copied, and only the saved class enters ``auto_map``, so
  ``AutoModel`` fails on a saved ``...ForImageClassification`` unless the full map is written by hand;
- ``register_for_auto_class`` sets ``_auto_class`` on the global class, which would make every later ordinary
  ``save_pretrained`` copy code too: :func:`prepare_for_hub` restores it on exit;
- saving reverses registered checkpoint conversions unless ``save_original_format=False``;
- a file that imports ``hf_vl`` saves fine but fails to load without the package: :func:`check_bundle` refuses it.

Everything is driven by ``hf_vl.registry.ARCHITECTURES``, so new architectures export without changes here.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers.dynamic_module_utils import get_relative_import_files

from .registry import ARCHITECTURES, Architecture

logger = logging.getLogger(__name__)

# Template search path: packaged copy first (if the cards are ever shipped as package data), then the source tree.
MODEL_CARD_DIRS = (Path(__file__).parent / "model_cards", Path(__file__).resolve().parents[2] / "model_cards")

# Hub pipeline tag of the saved model class, by the Auto class it is registered under.
PIPELINE_TAGS = {
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForObjectDetection": "object-detection",
    "AutoModelForImageSegmentation": "image-segmentation",
    "AutoModelForZeroShotObjectDetection": "zero-shot-object-detection",
    "AutoModelForZeroShotImageClassification": "zero-shot-image-classification",
    "AutoModelForMaskGeneration": "mask-generation",
    "AutoModelForSeq2SeqLM": "translation",
    "AutoModel": "image-feature-extraction",
}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_FALLBACK_CARD = """---
library_name: transformers
pipeline_tag: {pipeline_tag}
tags:
- hf_vl
- custom_code
- {model_type}
---

# {repo_id}

`{model_class}` exported with hf_vl {hf_vl_version} (transformers {transformers_version}); load it with
`trust_remote_code=True`, no hf_vl install needed.

{auto_map_table}
"""


# --------------------------------------------------------------------------------------------------- auto_map


def is_builtin_class(cls: type) -> bool:
    """Classes of transformers itself resolve without remote code; every other class (hf_vl's) is shipped."""
    return cls.__module__ == "transformers" or cls.__module__.startswith("transformers.")


def find_architecture(config) -> Architecture:
    """The registry row of an hf_vl config instance (or class)."""
    config_class = config if isinstance(config, type) else type(config)
    for arch in ARCHITECTURES.values():
        if arch.config_class is config_class:
            return arch
    raise ValueError(
        f"config of type {config_class.__name__} is not an hf_vl architecture; expected one of "
        f"{[arch.config_class.__name__ for arch in ARCHITECTURES.values()]}"
    )


def code_classes(arch: Architecture, image_processor=None, processor=None) -> dict[str, type]:
    """Auto class name -> class, for every (non-transformers) class a bundle of ``arch`` ships.

    The registry's processor classes are the defaults; processors actually being saved win, and a built-in one
    (e.g. a stock tokenizer) drops its entry, since transformers resolves it by its saved type.
    """
    classes = {"AutoConfig": arch.config_class, **arch.models}
    defaults = {
        "AutoImageProcessor": arch.image_processor_class,
        "AutoProcessor": arch.processor_class,
        "AutoTokenizer": arch.tokenizer_class,
    }
    given = {
        "AutoImageProcessor": image_processor,
        "AutoProcessor": processor,
        "AutoTokenizer": getattr(processor, "tokenizer", None),
    }
    for auto_name, default in defaults.items():
        cls = type(given[auto_name]) if given[auto_name] is not None else default
        if cls is not None:
            classes[auto_name] = cls
    return {name: cls for name, cls in classes.items() if not is_builtin_class(cls)}


def _class_reference(cls: type) -> str:
    # remote code resolves "<file stem>.<class>" inside the repo (files are flattened by basename)
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def build_auto_map(arch: Architecture, image_processor=None, processor=None) -> dict:
    """The full ``auto_map`` (AutoConfig, every registered AutoModel*, processors) of an architecture."""
    auto_map = {}
    for auto_name, cls in code_classes(arch, image_processor, processor).items():
        reference = _class_reference(cls)
        if auto_name == "AutoTokenizer":
            # tokenizers take a (slow, fast) pair, as custom_object_save writes it
            reference = [None, reference] if cls.__name__.endswith("Fast") else [reference, None]
        auto_map[auto_name] = reference
    return auto_map


def _model_auto_class(arch: Architecture, model) -> str:
    """The Auto class ``model`` is registered under; a task class (CLIP's zero-shot entry) wins over ``AutoModel``."""
    matches = [auto_name for auto_name, cls in arch.models.items() if cls is type(model)]
    if matches:
        return next((name for name in matches if name != "AutoModel"), matches[0])
    raise ValueError(
        f"model of type {type(model).__name__} is not one of the {arch.name!r} models "
        f"{[cls.__name__ for cls in arch.models.values()]}"
    )


# ------------------------------------------------------------------------------------------- prepare_for_hub


def _registrations(arch: Architecture, model, image_processor, processor) -> list[tuple[type, str]]:
    """(class, auto class name) pairs to mark with ``register_for_auto_class`` so ``save_pretrained`` copies code."""
    pairs = [(arch.config_class, "AutoConfig"), (type(model), _model_auto_class(arch, model))]
    if image_processor is not None:
        pairs.append((type(image_processor), "AutoImageProcessor"))
    if processor is not None:
        pairs.append((type(processor), "AutoProcessor"))
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            pairs.append((type(tokenizer), "AutoTokenizer"))
    return [(cls, name) for cls, name in pairs if not is_builtin_class(cls)]


def _check_components(model, image_processor, processor) -> Architecture:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    arch = find_architecture(model.config)
    for argument, value, base in (
        ("image_processor", image_processor, transformers.image_processing_base.ImageProcessingMixin),
        ("processor", processor, transformers.ProcessorMixin),
    ):
        if value is not None and not isinstance(value, base):
            raise TypeError(f"{argument} must be a {base.__name__}, got {type(value).__name__}")
    return arch


@contextlib.contextmanager
def prepare_for_hub(model, image_processor=None, processor=None) -> Iterator[dict]:
    """Temporarily make ``model`` (and its processors) save as a package-free remote-code bundle.

    Inside the ``with`` block the hf_vl classes are registered for their Auto classes and ``model.config.auto_map``
    holds the full map (yielded), so ``model.save_pretrained(dir, save_original_format=False)`` and
    ``(processor or image_processor).save_pretrained(dir)`` copy the code and write the map. On exit every class
    attribute and ``auto_map`` is restored, so later ordinary saves stay plain.

    Prefer :func:`save_bundle` + ``huggingface_hub.upload_folder``: it also copies the files of model classes other
    than the saved one, writes the model card and refuses files that import hf_vl. ``model.push_to_hub`` inside the
    block works too, but saves with transformers' default ``save_original_format=True``.
    """
    arch = _check_components(model, image_processor, processor)
    if processor is not None and image_processor is None:
        image_processor = getattr(processor, "image_processor", None)
    auto_map = build_auto_map(arch, image_processor, processor)
    pairs = _registrations(arch, model, image_processor, processor)
    owners = [model.config, image_processor, processor, getattr(processor, "tokenizer", None)]
    saved_classes = [(cls, cls.__dict__.get("_auto_class", _MISSING)) for cls, _ in pairs]
    saved_maps = [(obj, obj.__dict__.get("auto_map", _MISSING)) for obj in owners if obj is not None]
    try:
        for cls, auto_name in pairs:
            cls.register_for_auto_class(auto_name)
        model.config.auto_map = dict(auto_map)
        yield dict(auto_map)
    finally:
        for cls, previous in saved_classes:
            _restore_attribute(cls, "_auto_class", previous)
        for obj, previous in saved_maps:
            _restore_attribute(obj, "auto_map", previous)


_MISSING = object()


def _restore_attribute(obj, name: str, previous) -> None:
    if previous is _MISSING:
        if name in obj.__dict__:
            delattr(obj, name)
    else:
        setattr(obj, name, previous)


# ------------------------------------------------------------------------------------------------ saving


def _copy_code_files(classes, folder: Path) -> None:
    """Copy each class's file and its single-dot imports, flattened, as ``custom_object_save`` does.

    ``save_pretrained`` copies only the saved class's file; ``AutoModel`` may live in another one (later archs).
    """
    for cls in classes:
        source = Path(sys.modules[cls.__module__].__file__)
        for path in [source, *map(Path, get_relative_import_files(str(source)))]:
            target = folder / path.name
            if target.exists() and target.read_bytes() != path.read_bytes():
                raise ValueError(f"two shipped files are both named {path.name}; basenames must be unique")
            shutil.copyfile(path, target)


def _prepare_output(output, overwrite: bool) -> Path:
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"output {output} exists and is not empty; pass overwrite=True to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def save_bundle(
    model,
    output,
    image_processor=None,
    processor=None,
    model_card=None,
    *,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a package-free Hub bundle of in-memory hf_vl objects into ``output``; returns its path.

    The bundle is assembled in a temporary sibling folder, checked (:func:`check_bundle`) and only then moved into
    place, so a failed export leaves no half-written bundle. ``model_card``: template path or text (default
    ``model_cards/<arch>.md``); ``repo_id`` is the Hub id shown in the card (default: the folder name).
    """
    arch = _check_components(model, image_processor, processor)
    if processor is not None and image_processor is None:
        image_processor = getattr(processor, "image_processor", None)
    output = _prepare_output(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with prepare_for_hub(model, image_processor, processor) as auto_map:
            model.save_pretrained(staging, save_original_format=False)
            preprocessor = processor if processor is not None else image_processor
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
        _copy_code_files(code_classes(arch, image_processor, processor).values(), staging)
        card = render_model_card(model, model_card, auto_map=auto_map, repo_id=repo_id or output.name)
        (staging / "README.md").write_text(card, encoding="utf-8")
        check_bundle(staging)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("package-free bundle of %s written to %s", type(model).__name__, output)
    return output


def _load_components(model_dir: Path, arch: Architecture):
    """(image_processor, processor) saved in ``model_dir``, loaded with the registry's classes (None if absent)."""
    files = {path.name for path in model_dir.iterdir()}
    processor = image_processor = None
    if arch.processor_class is not None and "processor_config.json" in files:
        processor = arch.processor_class.from_pretrained(model_dir)
        image_processor = getattr(processor, "image_processor", None)
    elif arch.image_processor_class is not None and "preprocessor_config.json" in files:
        image_processor = arch.image_processor_class.from_pretrained(model_dir)
    if processor is None and image_processor is None and arch.image_processor_class is not None:
        logger.warning("%s has no image processor files: the bundle will not work with pipelines", model_dir)
    return image_processor, processor


def _model_class(arch: Architecture, config):
    """The saved class (``config.architectures``) among the architecture's models; ``AutoModel``'s otherwise."""
    by_name = {cls.__name__: cls for cls in arch.models.values()}
    for name in getattr(config, "architectures", None) or []:
        if name in by_name:
            return by_name[name]
    return arch.models["AutoModel"]


def export_bundle(model_dir, output, model_card=None, *, repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Turn a saved hf_vl model directory into a package-free Hub bundle at ``output``; returns the bundle path.

    Args:
        model_dir: a ``save_pretrained`` directory of an hf_vl model (plus its image processor / processor).
        output: the bundle folder to create (must be absent or empty unless ``overwrite``).
        model_card: model card template path or text; default ``model_cards/<arch>.md``.
        repo_id: Hub id used in the card's usage snippets (default: the folder name).

    Publish with ``huggingface_hub.upload_folder(repo_id=..., folder_path=output)``.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {model_dir} has no config.json (expected a save_pretrained directory)")
    if Path(output).resolve() == model_dir.resolve():
        raise ValueError("output must differ from model_dir")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = find_architecture(config)
    # dtype="auto" keeps the saved dtype (the default would upcast a bf16 checkpoint to float32)
    model = _model_class(arch, config).from_pretrained(model_dir, dtype="auto")
    image_processor, processor = _load_components(model_dir, arch)
    return save_bundle(
        model, output, image_processor, processor, model_card, repo_id=repo_id, overwrite=overwrite
    )


# ------------------------------------------------------------------------------------------------ checking


def _import_problems(path: Path, shipped: set[str]) -> list[str]:
    """Imports in one shipped file that a package-free interpreter cannot satisfy (ecosystem.md section 1.4)."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module, node.level)]
        else:
            continue
        for module, level in modules:
            where = f"{path.name}:{node.lineno}"
            if level == 0 and module.split(".")[0] == "hf_vl":
                problems.append(f"{where} imports {module} (hf_vl is not installed where the bundle is loaded)")
            elif level > 1 or (level == 1 and (module is None or "." in module)):
                problems.append(f"{where} uses a relative import other than 'from .<sibling> import X'")
            elif level == 1 and module not in shipped:
                problems.append(f"{where} imports .{module}, which is not in the bundle")
    return problems


def _auto_map_problems(folder: Path, classes: dict[str, set[str]]) -> list[str]:
    """``auto_map`` entries (in every JSON file) that point at missing files or classes."""
    problems = []
    for json_path in sorted(folder.glob("*.json")):
        auto_map = json.loads(json_path.read_text(encoding="utf-8")).get("auto_map") or {}
        for auto_name, references in auto_map.items():
            for reference in references if isinstance(references, (list, tuple)) else [references]:
                if reference is None:
                    continue
                module, _, class_name = reference.partition(".")
                if class_name not in classes.get(module, set()):
                    problems.append(f"{json_path.name}: auto_map[{auto_name!r}] = {reference!r} is not in the bundle")
    return problems


def check_bundle(folder) -> None:
    """Raise ValueError if the bundle's Python files import hf_vl (or anything not shipped), or if an ``auto_map``
    entry names a file or class that is missing."""
    folder = Path(folder)
    sources = sorted(folder.glob("*.py"))
    shipped = {path.stem for path in sources}
    classes = {}
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes[path.stem] = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    problems = [problem for path in sources for problem in _import_problems(path, shipped)]
    problems += _auto_map_problems(folder, classes)
    if not (folder / "config.json").is_file():
        problems.append("config.json is missing")
    if problems:
        raise ValueError(f"bundle {folder} is not package-free:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------ model card


def _hf_vl_version() -> str:
    from . import __version__  # late: hf_vl/__init__ may import this module before defining __version__

    return __version__


def _load_card_template(arch: Architecture, model_card) -> str:
    if model_card is not None:
        if isinstance(model_card, str) and "\n" in model_card:
            return model_card
        path = Path(model_card)
        if not path.is_file():
            raise FileNotFoundError(f"model_card template {path} does not exist")
        return path.read_text(encoding="utf-8")
    for directory in MODEL_CARD_DIRS:
        if (directory / f"{arch.name}.md").is_file():
            return (directory / f"{arch.name}.md").read_text(encoding="utf-8")
    logger.warning("no model_cards/%s.md found; writing a minimal model card", arch.name)
    return _FALLBACK_CARD


def _markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def variants_table(arch: Architecture) -> str:
    """Markdown table of the released variants: one column per scalar config field, plus the weights' source."""
    columns = []
    for entry in arch.variants.values():
        for key, value in entry.get("config", {}).items():
            if key not in columns and (value is None or isinstance(value, (int, float, str, bool))):
                columns.append(key)
    rows = [
        [f"`{name}`", *(entry.get("config", {}).get(key, "") for key in columns), entry.get("source", "")]
        for name, entry in arch.variants.items()
    ]
    return _markdown_table(["variant", *columns, "source"], rows) if rows else "(no released variants)"


def _card_values(model, auto_map: dict, repo_id: str) -> dict[str, str]:
    arch = find_architecture(model.config)
    auto_name = _model_auto_class(arch, model)
    values = {
        "hf_vl_version": _hf_vl_version(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "arch": arch.name,
        "model_type": arch.model_type,
        "model_class": type(model).__name__,
        "config_class": arch.config_class.__name__,
        "auto_class": auto_name,
        "pipeline_tag": PIPELINE_TAGS.get(auto_name, "image-feature-extraction"),
        "repo_id": repo_id,
        "num_parameters": f"{model.num_parameters():,}",
        "dtype": str(model.dtype).removeprefix("torch."),
        "variants_table": variants_table(arch),
        "auto_map_table": _markdown_table(
            ["Auto class", "class"], [[f"`{name}`", f"`{ref}`"] for name, ref in auto_map.items()]
        ),
    }
    for key, value in model.config.to_dict().items():
        if value is None or isinstance(value, (int, float, str, bool)):
            values[f"config.{key}"] = str(value)
    return values


def render_model_card(model, model_card=None, *, auto_map: dict | None = None, repo_id: str = "model") -> str:
    """Fill a model card template's ``{placeholder}`` fields (see model_cards/README.md); other braces stay."""
    arch = find_architecture(model.config)
    template = _load_card_template(arch, model_card)
    values = _card_values(model, auto_map if auto_map is not None else build_auto_map(arch), repo_id)
    card = _PLACEHOLDER.sub(lambda match: values.get(match.group(1), match.group(0)), template)
    if not card.startswith("---\n"):
        raise ValueError("model card template must start with YAML front matter ('---')")
    return card
