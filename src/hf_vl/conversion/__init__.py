"""Checkpoint conversion into hf_vl layouts (not shipped in Hub bundles).

- :mod:`.rules`: the rule types (``Rename``, ``Split``, ``Merge``, ``Drop``) and ``convert_state_dict``;
- :mod:`.transforms`: pure tensor transforms (``split_qkv``, ``transpose``, ``conv_hwio_to_oihw``, ...);
- :mod:`.loaders`: original files -> state dicts;
- :mod:`.spec`: ``Source`` / ``ConversionSpec``, what an architecture's ``convert_hf_vl_<arch>.py`` declares;
- :mod:`.api`: ``convert_checkpoint`` (the ``hf-vl convert`` command) and the ``CONVERSIONS`` registry.

``convert_checkpoint`` is imported lazily (``from hf_vl.conversion.api import convert_checkpoint``) so that the rule
engine stays importable without building every architecture's rule tables.
"""

from .rules import ConversionError, ConversionPlan, Drop, Merge, Rename, Split, convert_state_dict, plan_conversion
from .spec import ConversionSpec, Source

__all__ = [
    "ConversionError",
    "ConversionPlan",
    "ConversionSpec",
    "Drop",
    "Merge",
    "Rename",
    "Source",
    "Split",
    "convert_state_dict",
    "plan_conversion",
]
