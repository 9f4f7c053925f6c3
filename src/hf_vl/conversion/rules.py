"""Declarative state-dict conversion: anchored regex rules with strict key accounting.

A conversion is a tuple of rules, each naming source keys with a regular expression matched by ``re.fullmatch``
(so ``blocks\\.0\\.x`` never matches ``xblocks.0.x``) and target keys with ``\\1``-style back-references:

- :class:`Rename`: one source tensor -> one target tensor, optionally through a one-tensor transform.
- :class:`Split`: one source tensor -> several targets (a fused ``qkv`` -> ``q_proj``, ``k_proj``, ``v_proj``).
- :class:`Merge`: several source tensors (same back-references) -> one target.
- :class:`Drop`: a source key that is deliberately not converted, with the reason.

:func:`convert_state_dict` is order-independent and strict: every source key must match exactly one rule, no target
is produced twice, and, given the target model's keys (and shapes), nothing is missing or unexpected. Every problem
found is reported at once in one :class:`ConversionError`. Transforms live in :mod:`hf_vl.conversion.transforms`.

Example (timm ViT blocks)::

    rules = (
        Split(r"blocks\\.(\\d+)\\.attn\\.qkv\\.(weight|bias)",
              tuple(rf"encoder.layers.\\1.self_attn.{p}_proj.\\2" for p in "qkv"), split_qkv),
        Rename(r"blocks\\.(\\d+)\\.norm1\\.(weight|bias)", r"encoder.layers.\\1.layer_norm1.\\2"),
        Drop(r"pixel_(mean|std)", reason="lives in the image processor"),
    )
    converted = convert_state_dict(state_dict, rules, expected_keys=model.state_dict())
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


def _compile(pattern: str, argument: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{argument} must be a regex string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{argument}={pattern!r} is not a valid regular expression: {error}") from None


@dataclasses.dataclass(frozen=True)
class Rename:
    """``source`` (anchored regex) -> ``target`` (may use ``\\1`` back-references), through ``transform`` if given."""

    source: str
    target: str
    transform: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self):
        object.__setattr__(self, "_patterns", (_compile(self.source, "source"),))


@dataclasses.dataclass(frozen=True)
class Split:
    """One source tensor -> ``len(targets)`` tensors; ``transform(tensor)`` returns them in the order of ``targets``."""

    source: str
    targets: tuple[str, ...]
    transform: Callable[[Tensor], Sequence[Tensor]]

    def __post_init__(self):
        if isinstance(self.targets, str) or len(self.targets) < 2:
            raise ValueError(f"targets must be a tuple of at least two keys, got {self.targets!r}")
        if not callable(self.transform):
            raise TypeError("transform is required for Split and must be callable")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "_patterns", (_compile(self.source, "source"),))


@dataclasses.dataclass(frozen=True)
class Merge:
    """Several source tensors -> one target; ``transform(tensors)`` gets them in the order of ``sources``.

    Source keys belong together when their regex groups are equal (``blocks.3.q`` with ``blocks.3.k``); the target's
    back-references are those groups.
    """

    sources: tuple[str, ...]
    target: str
    transform: Callable[[Sequence[Tensor]], Tensor]

    def __post_init__(self):
        if isinstance(self.sources, str) or len(self.sources) < 2:
            raise ValueError(f"sources must be a tuple of at least two regexes, got {self.sources!r}")
        if not callable(self.transform):
            raise TypeError("transform is required for Merge and must be callable")
        patterns = tuple(_compile(source, "sources") for source in self.sources)
        if len({pattern.groups for pattern in patterns}) != 1:
            raise ValueError(f"all sources of a Merge must have the same number of groups: {self.sources!r}")
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "_patterns", patterns)


@dataclasses.dataclass(frozen=True)
class Drop:
    """A source key deliberately left out of the conversion; ``reason`` is logged and kept in the plan."""

    source: str
    reason: str

    def __post_init__(self):
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError(f"Drop({self.source!r}) needs a non-empty reason")
        object.__setattr__(self, "_patterns", (_compile(self.source, "source"),))


Rule = Rename | Split | Merge | Drop


class ConversionError(ValueError):
    """A conversion that does not account for every key. ``problems`` maps a category to all offending entries."""

    def __init__(self, problems: Mapping[str, Sequence[str]]):
        self.problems = {category: list(entries) for category, entries in problems.items() if entries}
        lines = ["state-dict conversion failed:"]
        for category, entries in self.problems.items():
            lines.append(f"  {category} ({len(entries)}):")
            lines.extend(f"    {entry}" for entry in entries)
        super().__init__("\n".join(lines))


# problem categories, in the order they are reported
UNKNOWN = "unknown source keys (no rule matches)"
AMBIGUOUS = "ambiguous source keys (several rules match)"
INCOMPLETE = "incomplete merges (a Merge source is absent)"
DUPLICATE = "target keys produced more than once"
MISSING = "missing target keys (expected, not produced)"
UNEXPECTED = "unexpected target keys (produced, not expected)"
FAILED = "failed transforms"
SHAPE = "shape mismatches (produced vs expected)"
_CATEGORIES = (UNKNOWN, AMBIGUOUS, INCOMPLETE, DUPLICATE, MISSING, UNEXPECTED, FAILED, SHAPE)


@dataclasses.dataclass(frozen=True)
class Step:
    """One rule application: ``sources`` (source keys) -> ``targets`` (target keys)."""

    rule: Rule
    sources: tuple[str, ...]
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will do, decided from key names alone (before any tensor is touched)."""

    steps: tuple[Step, ...]
    dropped: dict[str, str]  # source key -> reason

    @property
    def target_keys(self) -> list[str]:
        return [target for step in self.steps for target in step.targets]


def _check_rules(rules) -> tuple[Rule, ...]:
    rules = tuple(rules)
    for rule in rules:
        if not isinstance(rule, (Rename, Split, Merge, Drop)):
            raise TypeError(f"rules must contain Rename/Split/Merge/Drop instances, got {type(rule).__name__}")
    return rules


def _describe(rule: Rule) -> str:
    """A short rule description for error messages: patterns as written (no repr escaping), no transform reprs."""
    if isinstance(rule, Drop):
        return f"Drop({rule.source})"
    if isinstance(rule, Merge):
        return f"Merge({', '.join(rule.sources)} -> {rule.target})"
    targets = ", ".join(rule.targets) if isinstance(rule, Split) else rule.target
    return f"{type(rule).__name__}({rule.source} -> {targets})"


def _match(keys: Iterable[str], rules: tuple[Rule, ...], problems: dict) -> list[list]:
    """Per rule (by position) its source keys as ``(key, pattern index, groups)``; unknown and ambiguous keys go to
    ``problems``."""
    matches: list[list] = [[] for _ in rules]
    for key in keys:
        hits = [
            (position, index, found.groups())
            for position, rule in enumerate(rules)
            for index, pattern in enumerate(rule._patterns)
            if (found := pattern.fullmatch(key))
        ]
        if not hits:
            problems[UNKNOWN].append(key)
        elif len(hits) > 1:
            problems[AMBIGUOUS].append(f"{key}: " + ", ".join(_describe(rules[p]) for p, _, _ in hits))
        else:
            position, index, groups = hits[0]
            matches[position].append((key, index, groups))
    return matches


def _expand(pattern: re.Pattern, key: str, template: str) -> str:
    return pattern.fullmatch(key).expand(template)


def _steps_for(rule: Rule, matched: list, problems: dict) -> list[Step]:
    if isinstance(rule, Drop):
        return []
    if isinstance(rule, Rename):
        return [Step(rule, (key,), (_expand(rule._patterns[0], key, rule.target),)) for key, _, _ in matched]
    if isinstance(rule, Split):
        pattern = rule._patterns[0]
        return [Step(rule, (key,), tuple(_expand(pattern, key, t) for t in rule.targets)) for key, _, _ in matched]
    # Merge: group the matched keys by their regex groups, one slot per source pattern
    groups: dict[tuple, list] = {}
    for key, index, found in matched:
        groups.setdefault(found, [None] * len(rule.sources))[index] = key
    steps = []
    for found, keys in groups.items():
        if None in keys:
            absent = [source for source, key in zip(rule.sources, keys) if key is None]
            problems[INCOMPLETE].append(f"{[k for k in keys if k]} lack {absent} for {_describe(rule)}")
            continue
        steps.append(Step(rule, tuple(keys), (_expand(rule._patterns[0], keys[0], rule.target),)))
    return steps


def _plan(keys: Iterable[str], rules: Sequence[Rule], problems: dict) -> ConversionPlan:
    rules = _check_rules(rules)
    matches = _match(keys, rules, problems)
    steps = [step for rule, matched in zip(rules, matches) for step in _steps_for(rule, matched, problems)]
    seen: dict[str, str] = {}
    for step in steps:
        for target in step.targets:
            if target in seen:
                problems[DUPLICATE].append(f"{target}: from {seen[target]} and {', '.join(step.sources)}")
            seen[target] = ", ".join(step.sources)
    dropped = {
        key: rule.reason for rule, matched in zip(rules, matches) if isinstance(rule, Drop) for key, _, _ in matched
    }
    return ConversionPlan(steps=tuple(steps), dropped=dropped)


def _new_problems() -> dict[str, list[str]]:
    return {category: [] for category in _CATEGORIES}


def plan_conversion(keys: Iterable[str], rules: Sequence[Rule]) -> ConversionPlan:
    """Match source ``keys`` against ``rules`` without touching tensors; raises :class:`ConversionError`."""
    problems = _new_problems()
    plan = _plan(keys, rules, problems)
    if any(problems.values()):
        raise ConversionError(problems)
    return plan


def _check_targets(plan: ConversionPlan, expected_keys, problems: dict) -> dict | None:
    """Missing / unexpected target keys; returns expected shapes when ``expected_keys`` maps keys to tensors/shapes."""
    if expected_keys is None:
        return None
    expected = list(expected_keys)
    produced = set(plan.target_keys)
    problems[MISSING].extend(key for key in expected if key not in produced)
    expected_set = set(expected)
    problems[UNEXPECTED].extend(key for key in plan.target_keys if key not in expected_set)
    if not isinstance(expected_keys, Mapping):
        return None
    return {key: tuple(getattr(value, "shape", value)) for key, value in expected_keys.items()}


def _apply(step: Step, state_dict: Mapping[str, Tensor]) -> list[Tensor]:
    rule = step.rule
    if isinstance(rule, Merge):
        outputs = [rule.transform([state_dict[key] for key in step.sources])]
    elif isinstance(rule, Split):
        outputs = list(rule.transform(state_dict[step.sources[0]]))
    else:
        tensor = state_dict[step.sources[0]]
        outputs = [rule.transform(tensor) if rule.transform is not None else tensor]
    if len(outputs) != len(step.targets) or not all(isinstance(out, Tensor) for out in outputs):
        raise ValueError(f"expected {len(step.targets)} tensor(s), got {[type(out).__name__ for out in outputs]}")
    # transposes and chunks return views; saving (safetensors) and loading want contiguous tensors
    return [out.contiguous() for out in outputs]


def convert_state_dict(
    state_dict: Mapping[str, Tensor],
    rules: Sequence[Rule],
    expected_keys: Iterable[str] | Mapping | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Convert ``state_dict`` with ``rules``; every source key must match exactly one rule.

    Args:
        state_dict: source key -> tensor (not modified).
        rules: :class:`Rename` / :class:`Split` / :class:`Merge` / :class:`Drop` rules (order does not matter).
        expected_keys: the target model's keys; missing and unexpected targets are errors. A mapping of key ->
            tensor or shape (e.g. ``model.state_dict()``) also checks every produced shape.
        progress: show a tqdm bar over the conversion steps.

    Returns the converted state dict (contiguous tensors). Raises :class:`ConversionError` listing all problems.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of key -> tensor, got {type(state_dict).__name__}")
    problems = _new_problems()
    plan = _plan(state_dict.keys(), rules, problems)
    shapes = _check_targets(plan, expected_keys, problems)
    if any(problems.values()):
        raise ConversionError(problems)  # fail on names before any tensor work
    for key, reason in plan.dropped.items():
        logger.info("dropped %s: %s", key, reason)
    converted: dict[str, Tensor] = {}
    # without disable=False, tqdm's TQDM_DISABLE environment variable still applies
    bar_options = {"desc": "converting", "unit": "tensor"} if progress else {"disable": True}
    for step in tqdm(plan.steps, **bar_options):
        try:
            outputs = _apply(step, state_dict)
        except Exception as error:  # noqa: BLE001 - reported with the key, all failures at once
            problems[FAILED].append(
                f"{', '.join(step.sources)} ({_describe(step.rule)}): {type(error).__name__}: {error}"
            )
            continue
        converted.update(zip(step.targets, outputs))
    for key, tensor in converted.items():
        if shapes is not None and tuple(tensor.shape) != shapes[key]:
            problems[SHAPE].append(f"{key}: {tuple(tensor.shape)} vs {shapes[key]}")
    if any(problems.values()):
        raise ConversionError(problems)
    return converted


__all__ = [
    "ConversionError",
    "ConversionPlan",
    "Drop",
    "Merge",
    "Rename",
    "Rule",
    "Split",
    "Step",
    "convert_state_dict",
    "plan_conversion",
]
