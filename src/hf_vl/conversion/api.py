"""``convert_checkpoint``: an original checkpoint -> a ``save_pretrained`` directory of an hf_vl model.

Used by ``hf-vl convert <arch> --source <format> --checkpoint <path> --variant <name> --output <dir>``
(``hf_vl.cli``). Steps: load the checkpoint (``Source.load``), build the config from the variant table (never from
the file name), convert with strict key and shape accounting (:func:`~hf_vl.conversion.rules.convert_state_dict`),
``load_state_dict(strict=True)``, then save the model (safetensors) and its image processor side by side.

Architectures register a :class:`~hf_vl.conversion.spec.ConversionSpec` in :data:`CONVERSIONS` (one line below).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..registry import Architecture, get_architecture
from .convert_hf_vl_clip import CLIP_CONVERSION
from .convert_hf_vl_detr import DETR_CONVERSION
from .convert_hf_vl_sam import SAM_CONVERSION
from .convert_hf_vl_vit import VIT_CONVERSION
from .rules import convert_state_dict
from .spec import ConversionSpec, Source, VariantRow

logger = logging.getLogger(__name__)

CONVERSIONS: dict[str, ConversionSpec] = {
    spec.arch: spec for spec in (VIT_CONVERSION, CLIP_CONVERSION, DETR_CONVERSION, SAM_CONVERSION)
}


def register_conversion(spec: ConversionSpec, exist_ok: bool = False) -> None:
    """Add an architecture's conversions; its ``arch`` must be in ``hf_vl.registry.ARCHITECTURES``."""
    if not isinstance(spec, ConversionSpec):
        raise TypeError(f"spec must be a ConversionSpec, got {type(spec).__name__}")
    get_architecture(spec.arch)
    if spec.arch in CONVERSIONS and not exist_ok:
        raise ValueError(f"a conversion for {spec.arch!r} is already registered")
    CONVERSIONS[spec.arch] = spec


def get_conversion(arch: str) -> ConversionSpec:
    if arch not in CONVERSIONS:
        raise ValueError(f"unknown architecture {arch!r} for conversion; expected one of {sorted(CONVERSIONS)}")
    return CONVERSIONS[arch]


def _check_agreement(read: Mapping[str, Any], table: Mapping[str, Any], variant: str) -> None:
    """A variant named next to a self-describing checkpoint must describe the same network."""
    differences = [
        f"{key}: checkpoint {read[key]!r}, variant {value!r}"
        for key, value in table.items()
        if key in read and read[key] != value
    ]
    if differences:
        raise ValueError(f"checkpoint does not match variant {variant!r}: " + "; ".join(differences))


def _check_variant(arch: Architecture, variant: str | None) -> None:
    if variant is not None and variant not in arch.variants:
        raise ValueError(f"unknown {arch.name} variant {variant!r}; expected one of {sorted(arch.variants)}")


def resolve_variant(
    arch: Architecture, source: Source, variant: str | None, checkpoint: Path, state_dict
) -> VariantRow:
    """The variant row (``config`` and ``processor`` kwargs) a conversion builds from."""
    _check_variant(arch, variant)
    if source.read_variant is None:
        if variant is None:
            raise ValueError(
                f"source {source.name!r} needs a variant (--variant); expected one of {sorted(arch.variants)}"
            )
        return arch.variants[variant]
    row = source.read_variant(checkpoint, state_dict)
    if variant is None:
        return row
    _check_agreement(row["config"], arch.variants[variant]["config"], variant)
    return {**row, "processor": arch.variants[variant]["processor"]}


def _build_processor(spec: ConversionSpec, arch: Architecture, kwargs: Mapping[str, Any]):
    if spec.build_processor is not None:
        return spec.build_processor(kwargs)
    if arch.image_processor_class is None:
        return None
    return arch.image_processor_class(**kwargs)


def convert_checkpoint(
    arch: str,
    source: str,
    checkpoint,
    variant: str | None = None,
    output=None,
    progress: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
):
    """Convert an original checkpoint into an hf_vl model and save it.

    Args:
        arch: architecture name (``sorted(CONVERSIONS)``), e.g. ``"vit"``.
        source: checkpoint format of that architecture, e.g. ``"timm"``, ``"google"``, ``"transformers"``.
        checkpoint: path to the original file or directory.
        variant: row of the architecture's ``VARIANTS`` table giving the config and the processor; optional only for
            sources that store their config (a transformers directory).
        output: directory for ``save_pretrained`` (``model.safetensors``, ``config.json``,
            ``preprocessor_config.json``); ``None`` converts without saving.
        progress: show a progress bar over the converted tensors.
        config_overrides: config kwargs applied last, e.g. ``{"num_labels": 10}`` for a fine-tuned checkpoint.

    Returns the converted model in eval mode. Raises ``ValueError`` (``ConversionError`` for key problems) naming
    the valid choices or all offending keys.
    """
    spec = get_conversion(arch)
    architecture = get_architecture(spec.arch)
    fmt = spec.get_source(source)
    checkpoint = Path(checkpoint)
    _check_variant(architecture, variant)  # before reading a possibly large file
    state_dict = fmt.load(checkpoint)
    row = resolve_variant(architecture, fmt, variant, checkpoint, state_dict)
    config = architecture.config_class(**{**row["config"], **fmt.config_overrides, **(config_overrides or {})})
    model = _load_model(spec.model_class or architecture.models["AutoModel"], config, state_dict, fmt, progress)
    if output is not None:
        _save(model, _build_processor(spec, architecture, row["processor"]), Path(output))
    logger.info("converted %s (%s, %s) from %s", arch, source, variant or "config from checkpoint", checkpoint)
    return model


def _load_model(model_class, config, state_dict, source: Source, progress: bool):
    """Convert ``state_dict`` against the model's keys and shapes, then ``load_state_dict(strict=True)``.

    Every weight comes from the checkpoint, so the model is built on the meta device (no random init: seconds for
    ViT-B, minutes for ViT-H) and the converted tensors are assigned, cast to the model's dtype. Models with state
    outside the state dict (non-persistent buffers computed at init) or tied weights are built normally instead.
    """
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    has_buffers_outside = any(name not in expected for name, _ in model.named_buffers())
    if has_buffers_outside or getattr(model, "_tied_weights_keys", None):
        model = model_class(config)
    converted = convert_state_dict(state_dict, source.rules_for(config), expected_keys=expected, progress=progress)
    converted = {key: tensor.to(expected[key].dtype) for key, tensor in converted.items()}
    model.load_state_dict(converted, strict=True, assign=any(param.is_meta for param in model.parameters()))
    return model.eval()


def _save(model, processor, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    # write the hf_vl layout as is: by default transformers saves the reverse of any key mapping registered for a class
    model.save_pretrained(output, save_original_format=False)
    if processor is not None:
        processor.save_pretrained(output)


__all__ = ["CONVERSIONS", "convert_checkpoint", "get_conversion", "register_conversion", "resolve_variant"]
