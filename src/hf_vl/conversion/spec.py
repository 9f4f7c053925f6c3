"""What a converter declares: its checkpoint formats (:class:`Source`) and, per architecture, a :class:`ConversionSpec`.

An architecture file ``convert_hf_vl_<arch>.py`` is mostly data::

    TIMM = Source(name="timm", description="...", load=load_state_dict_file, rules=TIMM_RULES)
    VIT_CONVERSION = ConversionSpec(arch="vit", sources=(TIMM, GOOGLE, TRANSFORMERS),
                                    model_class=HfVlVitForImageClassification)

and is registered in ``hf_vl.conversion.api.CONVERSIONS``. The config comes from the architecture's ``VARIANTS``
table (``--variant``; the registry's ``Architecture.variants``), then the source's fixed ``config_overrides`` (the
numerics of the original code), then the caller's overrides. A source whose checkpoint carries its own config
(a transformers directory's ``config.json``) declares ``read_variant`` instead, and ``--variant`` becomes optional.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .loaders import StateDict
from .rules import Drop, Merge, Rename, Split

# A variant row: {"config": config kwargs, "processor": processor kwargs, "source": provenance text (optional)}.
VariantRow = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Source:
    """One original checkpoint format of an architecture (the ``--source`` name).

    Args:
        name: the ``--source`` value, e.g. ``"timm"``.
        description: one line for error messages and docs (what the file is, where it comes from).
        load: ``checkpoint path -> state dict`` (see :mod:`hf_vl.conversion.loaders`).
        rules: the conversion rules (:mod:`hf_vl.conversion.rules`).
        config_overrides: config kwargs every checkpoint of this format implies, applied over the variant's
            (the JAX ViT's tanh GELU); the caller's overrides still win.
        read_variant: ``(checkpoint path, state dict) -> variant row`` for formats that store their own config;
            ``None`` makes ``--variant`` required.
        config_rules: ``config -> extra rules`` for formats whose key names mean different tensors in different
            variants (OpenAI CLIP's ``visual.conv1.weight`` is the ViT patch embedding or the ResNet's first stem
            conv); added to ``rules`` for the model being built. ``None``: ``rules`` alone.
    """

    name: str
    description: str
    load: Callable[[Path], StateDict]
    rules: tuple
    config_overrides: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    read_variant: Callable[[Path, StateDict], VariantRow] | None = None
    config_rules: Callable[[Any], tuple] | None = None

    def rules_for(self, config) -> tuple:
        """The rules that convert into a model built from ``config``: ``rules`` plus ``config_rules(config)``."""
        return self.rules if self.config_rules is None else self.rules + tuple(self.config_rules(config))

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules or not all(isinstance(rule, (Rename, Split, Merge, Drop)) for rule in self.rules):
            raise TypeError(f"Source {self.name!r}: rules must be a non-empty sequence of Rename/Split/Merge/Drop")
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides)))


@dataclasses.dataclass(frozen=True)
class ConversionSpec:
    """The conversions of one architecture.

    Args:
        arch: the architecture's name in ``hf_vl.registry.ARCHITECTURES`` (config class, variants, processor).
        sources: the accepted checkpoint formats.
        model_class: the class the rules' target keys belong to (default: the registry's ``AutoModel`` class).
        build_processor: ``processor kwargs -> object with save_pretrained`` (default: the registry's image
            processor class; architectures with a tokenizer pass their own).
    """

    arch: str
    sources: tuple[Source, ...]
    model_class: type | None = None
    build_processor: Callable[[Mapping[str, Any]], Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"ConversionSpec {self.arch!r}: duplicate source names {names}")

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    def get_source(self, name: str) -> Source:
        for source in self.sources:
            if source.name == name:
                return source
        raise ValueError(f"unknown source {name!r} for {self.arch}; expected one of {self.source_names}")


__all__ = ["ConversionSpec", "Source", "VariantRow"]
