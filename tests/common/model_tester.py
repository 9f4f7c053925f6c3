"""The common model tests every hf_vl architecture inherits (style.md section 5.6).

An architecture plugs in with a frozen-dataclass tester and a one-line test class::

    @dataclasses.dataclass(frozen=True)
    class VitTester(ModelTester):
        model_classes = (HfVlVitModel, HfVlVitForImageClassification)
        base_model_class = HfVlVitModel

        def get_config(self, **overrides): ...
        def prepare_inputs(self, batch_size): ...            # {"pixel_values": ...} or {"input_ids": ..., ...}
        def prepare_labels(self, model_class, batch_size): ...   # {} when the class takes no labels
        def expected_shapes(self, model_class, batch_size): ...  # {"logits": (3, 5), "vision_model_output.x": ...}

    class TestVitModel(ModelTesterMixin):
        tester = VitTester()

Output fields are dotted paths (``"vision_model_output.last_hidden_state"``, ``"hidden_states.0"``), so towers with
several main tensors (CLIP ``logits_per_image`` + embeddings, SAM ``pred_masks`` + ``iou_scores``, DETR ``logits``
+ ``pred_boxes``) name what is compared. Capability flags are ``True`` or a string saying why not; a test checks
that each flag agrees with the model class's own attribute, so a flag cannot hide a failure.
Gradient accumulation (GA=1 vs GA=2) is checked in the training tests, not here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from typing import ClassVar

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .testing_utils import (
    CallCounter,
    RecomputeCounter,
    assert_nested_close,
    find_auto_class_name,
    get_field,
    iter_configs,
    relative_error,
    sequential_style_keys,
    without_name_or_path,
)
from .tiny import BATCH_SIZE


# ---------------------------------------------------------------------------------------------------- tester
@dataclasses.dataclass(frozen=True)
class ModelTester:
    """What one architecture tells the common tests. Subclass as a frozen dataclass; dataclass fields (sizes)
    are per instance, the ``ClassVar`` settings below are plain class attributes.

    One tester per config class: CLIP has a text, a vision and a composite tester (as transformers does), each
    listing the model classes built from that config.
    """

    batch_size: int = BATCH_SIZE

    model_classes: ClassVar[tuple[type, ...]] = ()
    # the bare trunk inside the heads (``base_model_prefix``); None when no class embeds another
    base_model_class: ClassVar[type | None] = None
    # capability flags: True, or a string saying why not (checked against the model class's own attributes)
    has_attention: ClassVar[bool | str] = True
    supports_sdpa: ClassVar[bool | str] = True
    returns_hidden_states: ClassVar[bool | str] = True
    supports_gradient_checkpointing: ClassVar[bool | str] = True
    supports_fullgraph_compile: ClassVar[bool | str] = True
    # regex on parameter names -> why it gets no gradient from a forward + backward
    parameters_without_gradient: ClassVar[dict[str, str]] = {}
    # which class the (slow) inductor test compiles; None: the first of model_classes
    compile_model_class: ClassVar[type | None] = None
    # config overrides that switch dropout on (eval must still be deterministic); {} if the model has none
    dropout_overrides: ClassVar[dict] = {}
    # loose: bf16 keeps 8 mantissa bits; tiny random logits (std-0.02 classifier) show ~2.4e-2 on ViT
    bf16_relative_tolerance: ClassVar[float] = 5e-2

    # ---- required
    def get_config(self, **overrides):
        """A tiny config; ``overrides`` are config kwargs the tests pass: ``attn_implementation``,
        ``return_dict``, ``output_hidden_states`` and ``dropout_overrides``."""
        raise NotImplementedError

    def prepare_inputs(self, batch_size: int) -> dict:
        raise NotImplementedError

    def expected_shapes(self, model_class: type, batch_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    # ---- optional
    def prepare_labels(self, model_class: type, batch_size: int) -> dict:
        """Label kwargs that make ``model_class`` return a loss; {} if it takes none."""
        return {}

    def compare_fields(self, model_class: type) -> tuple[str, ...]:
        """Output fields compared between two runs (eager/SDPA, save/load, bf16, compile)."""
        return tuple(self.expected_shapes(model_class, self.batch_size))

    def batched_fields(self, model_class: type) -> tuple[str, ...]:
        """Fields whose row i depends only on example i (not CLIP's (images, texts) similarity matrix)."""
        return self.compare_fields(model_class)

    def attention_outputs(self, model_class: type, config) -> dict[str, int]:
        """Attention output fields -> number of layers they hold."""
        return {"attentions": config.num_hidden_layers}

    def hidden_state_outputs(self, model_class: type, config) -> dict[str, int]:
        """Hidden-state output fields -> number of tensors (embeddings + one per layer)."""
        return {"hidden_states": config.num_hidden_layers + 1}

    def slice_inputs(self, inputs: dict, index: int, batch_size: int) -> dict:
        """Example ``index`` of a batch, still batched (leading dimension 1)."""
        sliced = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
                sliced[name] = value[index : index + 1]
            elif isinstance(value, list) and len(value) == batch_size:
                sliced[name] = value[index : index + 1]
            else:
                sliced[name] = value
        return sliced

    def cast_inputs(self, inputs: dict, dtype: torch.dtype) -> dict:
        """Floating-point inputs in ``dtype`` (bf16 test); integer ids and masks unchanged."""
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def _flag(tester: ModelTester, name: str) -> bool:
    """True if the capability is there; skips the test with the flag's reason otherwise."""
    value = getattr(tester, name)
    if value is True:
        return True
    if isinstance(value, str) and value.strip():
        pytest.skip(f"{type(tester).__name__}.{name}: {value}")
    raise AssertionError(f"{type(tester).__name__}.{name} must be True or a non-empty reason string, got {value!r}")


# ----------------------------------------------------------------------------------------------------- mixin
class ModelTesterMixin:
    """Common checks; a test class sets ``tester`` and inherits. Tests taking ``model_class`` run once per class."""

    tester: ClassVar[ModelTester]

    def pytest_generate_tests(self, metafunc):
        if "model_class" in metafunc.fixturenames:
            classes = self.tester.model_classes
            metafunc.parametrize("model_class", classes, ids=[c.__name__ for c in classes])
        if "head_class" in metafunc.fixturenames:
            base = self.tester.base_model_class
            heads = [c for c in self.tester.model_classes if base is not None and c is not base]
            metafunc.parametrize("head_class", heads, ids=[c.__name__ for c in heads])

    # ---- helpers
    def build(self, model_class, config=None, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = config if config is not None else self.tester.get_config(**overrides)
        return model_class(config).eval()

    def inputs(self, model_class, batch_size: int | None = None, labels: bool = False) -> dict:
        batch_size = batch_size or self.tester.batch_size
        inputs = self.tester.prepare_inputs(batch_size)
        if labels:
            inputs.update(self.tester.prepare_labels(model_class, batch_size))
        return inputs

    def assert_fields_close(self, model_class, actual, expected, atol=1e-5, rtol=1e-5, what="", fields=None):
        for field in fields or self.tester.compare_fields(model_class):
            assert_nested_close(get_field(actual, field), get_field(expected, field), atol, rtol, f"{what} {field}")

    def scalar_loss(self, model_class, outputs) -> torch.Tensor:
        """The model's loss if it returned one, else a fixed random projection of the compared fields (a plain sum
        would give zero gradients below a LayerNorm, whose output always sums to the bias)."""
        loss = getattr(outputs, "loss", None)
        if loss is not None:
            return loss
        generator = torch.Generator().manual_seed(1234)
        total = 0.0
        for field in self.tester.compare_fields(model_class):
            value = get_field(outputs, field)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                weight = torch.randn(value.shape, generator=generator, dtype=torch.float32)
                total = total + (value.float() * weight).sum()
        return total

    # ---- flags and names
    def test_capability_flags_match_model_class(self, model_class):
        tester = self.tester
        pairs = {
            "supports_sdpa": bool(model_class._supports_sdpa),
            "supports_gradient_checkpointing": bool(model_class.supports_gradient_checkpointing),
            "supports_fullgraph_compile": bool(model_class._can_compile_fullgraph),
        }
        for flag in (*pairs, "has_attention", "returns_hidden_states"):
            value = getattr(tester, flag)
            assert value is True or (isinstance(value, str) and value.strip()), f"{flag}={value!r}: True or a reason"
        for flag, model_says in pairs.items():
            value = getattr(tester, flag)
            assert (value is True) == model_says, f"tester.{flag}={value!r}; {model_class.__name__} says {model_says}"
        if tester.supports_sdpa is True:
            assert tester.has_attention is True, "supports_sdpa without has_attention"

    def test_names_and_model_types(self, model_class):
        config = self.tester.get_config()
        assert model_class.__name__.startswith("HfVl"), model_class.__name__
        assert type(config).__name__.startswith("HfVl"), type(config).__name__
        assert model_class.config_class is type(config)
        for sub in iter_configs(config):
            assert sub.model_type.startswith("hf_vl_"), f"{type(sub).__name__}.model_type={sub.model_type!r}"
            assert type(sub).__name__.startswith("HfVl"), type(sub).__name__
        model = self.build(model_class, config)
        ours = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("hf_vl")}
        assert not [n for n in ours if not n.startswith("HfVl")], f"hf_vl modules without the HfVl prefix: {ours}"
        with torch.no_grad():
            outputs = model(**self.inputs(model_class))
        if type(outputs).__module__.startswith("hf_vl"):
            assert type(outputs).__name__.startswith("HfVl"), type(outputs).__name__

    def test_state_dict_keys_have_no_sequential_indices(self, model_class):
        model = self.build(model_class)
        sequentials = [n for n, m in model.named_modules() if isinstance(m, nn.Sequential) and len(m) > 0]
        assert not sequentials, f"nn.Sequential modules (their keys are bare indices): {sequentials}"
        assert not sequential_style_keys(model), sequential_style_keys(model)

    # ---- config
    def test_config_round_trip(self, model_class, tmp_path):
        config = self.tester.get_config()
        config_class = type(config)
        as_dict = without_name_or_path(config.to_dict())
        assert without_name_or_path(config_class.from_dict(as_dict).to_dict()) == as_dict
        assert json.loads(config.to_json_string())["model_type"] == config.model_type
        config.to_json_file(tmp_path / "c.json")
        assert without_name_or_path(config_class.from_json_file(tmp_path / "c.json").to_dict()) == as_dict
        config.save_pretrained(tmp_path)
        loaded = transformers.AutoConfig.from_pretrained(tmp_path)
        assert type(loaded) is config_class
        assert without_name_or_path(loaded.to_dict()) == as_dict
        # a model built from the round-tripped config has the same parameters
        shapes = {k: v.shape for k, v in self.build(model_class, config).state_dict().items()}
        assert {k: v.shape for k, v in self.build(model_class, loaded).state_dict().items()} == shapes

    # ---- forward
    def test_output_shapes(self, model_class):
        model = self.build(model_class)
        with torch.no_grad():
            outputs = model(**self.inputs(model_class))
        for field, shape in self.tester.expected_shapes(model_class, self.tester.batch_size).items():
            value = get_field(outputs, field)
            assert tuple(value.shape) == tuple(shape), f"{field}: {tuple(value.shape)} != {tuple(shape)}"
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{field} has non-finite values"

    def test_return_dict_false(self, model_class):
        model = self.build(model_class)
        inputs = self.inputs(model_class, labels=True)
        with torch.no_grad():
            as_dict = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
        assert type(as_tuple) is tuple, f"return_dict=False gave {type(as_tuple).__name__}"
        assert_nested_close(as_tuple, as_dict.to_tuple(), msg="return_dict=False")

    def test_return_dict_false_in_config(self, model_class):
        """``config.return_dict=False`` (as some pipelines and exports set it) gives the same tuple; heads must
        not read attributes off their trunk's output when the trunk returns a tuple."""
        reference = self.build(model_class)
        model = self.build(model_class, return_dict=False)
        model.load_state_dict(reference.state_dict())
        inputs = self.inputs(model_class, labels=True)
        with torch.no_grad():
            as_tuple, as_dict = model(**inputs), reference(**inputs)
        assert type(as_tuple) is tuple, f"config.return_dict=False gave {type(as_tuple).__name__}"
        assert_nested_close(as_tuple, as_dict.to_tuple(), msg="config.return_dict=False")

    def test_batched_equals_single(self, model_class):
        model = self.build(model_class)
        batch = self.tester.batch_size
        inputs = self.inputs(model_class)
        with torch.no_grad():
            batched = model(**inputs)
            singles = [model(**self.tester.slice_inputs(inputs, i, batch)) for i in range(batch)]
        for field in self.tester.batched_fields(model_class):
            stacked = torch.cat([get_field(s, field) for s in singles])
            torch.testing.assert_close(stacked, get_field(batched, field), atol=1e-5, rtol=1e-5, msg=field)

    def test_eval_is_deterministic(self, model_class):
        model = self.build(model_class, **self.tester.dropout_overrides)
        inputs = self.inputs(model_class)
        with torch.no_grad():
            first, second = model(**inputs), model(**inputs)
        self.assert_fields_close(model_class, second, first, atol=0, rtol=0, what="eval run 2 vs 1")
        if self.tester.dropout_overrides:  # dropout is wired: train mode must differ, or eval proved nothing
            model.train()
            with torch.no_grad():
                trained = model(**inputs)
            field = self.tester.compare_fields(model_class)[0]
            assert not torch.equal(get_field(trained, field), get_field(first, field)), "dropout has no effect"

    # ---- attention
    def test_eager_matches_sdpa(self, model_class):
        _flag(self.tester, "supports_sdpa")
        sdpa = self.build(model_class)
        assert sdpa.config._attn_implementation == "sdpa", "SDPA must be the default"
        eager = self.build(model_class, attn_implementation="eager")
        assert eager.config._attn_implementation == "eager"
        eager.load_state_dict(sdpa.state_dict())
        inputs = self.inputs(model_class)
        kernel = torch.nn.functional.scaled_dot_product_attention
        # count kernel calls, so the comparison cannot pass by running eager twice
        with torch.no_grad():
            with CallCounter(kernel) as counter:
                out_sdpa = sdpa(**inputs)
            assert counter.calls > 0, "the default model never called scaled_dot_product_attention"
            with CallCounter(kernel) as counter:
                out_eager = eager(**inputs)
                sdpa.set_attn_implementation("eager")
                out_switched = sdpa(**inputs)
            assert counter.calls == 0, "attn_implementation='eager' still called scaled_dot_product_attention"
        self.assert_fields_close(model_class, out_eager, out_sdpa, atol=1e-5, rtol=1e-5, what="eager vs sdpa")
        self.assert_fields_close(model_class, out_switched, out_eager, atol=0, rtol=0, what="set_attn_implementation")

    def test_output_attentions(self, model_class):
        _flag(self.tester, "has_attention")
        model = self.build(model_class, attn_implementation="eager")
        inputs = self.inputs(model_class)
        with torch.no_grad():
            plain = model(**inputs)
            outputs = model(**inputs, output_attentions=True)
        self.assert_fields_close(model_class, outputs, plain, atol=0, rtol=0, what="output_attentions=True")
        expected = self.tester.attention_outputs(model_class, model.config)
        assert expected, "has_attention=True but attention_outputs() names no field"
        for field, num_layers in expected.items():
            attentions = get_field(outputs, field)
            assert attentions is not None and len(attentions) == num_layers, f"{field}: want {num_layers} tensors"
            for weights in attentions:
                assert weights.ndim == 4 and weights.shape[0] == self.tester.batch_size, tuple(weights.shape)
                torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), msg=field)

    def test_output_hidden_states(self, model_class):
        _flag(self.tester, "returns_hidden_states")
        model = self.build(model_class)
        inputs = self.inputs(model_class)
        with torch.no_grad():
            plain = model(**inputs)
            outputs = model(**inputs, output_hidden_states=True)
        self.assert_fields_close(model_class, outputs, plain, atol=0, rtol=0, what="output_hidden_states=True")
        for field, count in self.tester.hidden_state_outputs(model_class, model.config).items():
            hidden_states = get_field(outputs, field)
            assert hidden_states is not None and len(hidden_states) == count, f"{field}: want {count} tensors"
            for state in hidden_states:
                assert state.shape[0] == self.tester.batch_size and torch.isfinite(state).all()
            assert not torch.equal(hidden_states[0], hidden_states[-1]), f"{field}: layers changed nothing"
        # the config switch works too (set on every sub-config: composite configs do not pass it down, as in
        # transformers' own CLIP)
        config = self.tester.get_config()
        for sub in iter_configs(config):
            sub.output_hidden_states = True
        from_config = self.build(model_class, config)
        from_config.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert_nested_close(from_config(**inputs), outputs, msg="config.output_hidden_states=True")

    # ---- weights
    def test_init_covers_every_parameter(self, model_class):
        """Built the way ``from_pretrained`` builds (meta device, then ``_init_weights`` on what is missing): any
        parameter or buffer that ``_init_weights`` forgets stays as the NaN it was filled with."""
        config = self.tester.get_config()
        with torch.device("meta"):
            model = model_class(config)
        model.to_empty(device="cpu")
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for tensor in tensors.values():
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        model.initialize_weights()
        missed = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not missed, f"_init_weights leaves these uninitialised: {missed}"
        built = self.build(model_class, config)
        assert all(torch.isfinite(t).all() for t in built.state_dict().values() if t.is_floating_point())

    def test_init_reaches_every_module(self, model_class, monkeypatch):
        """``_init_weights`` is called for every module, including containers without parameters of their own
        (``HfVlAttention``, ``HfVlMlp``, a ResNet body), which transformers skips for out-of-tree models unless
        ``HfVlPreTrainedModel`` says otherwise; a skipped one silently keeps the generic normal(0.02) init."""
        from hf_vl.modeling.hf_vl_pretrained import HfVlPreTrainedModel

        reached = set()
        generic = transformers.PreTrainedModel._init_weights

        def spy(model, module):
            reached.add(id(module))
            generic(model, module)

        monkeypatch.setattr(HfVlPreTrainedModel, "_init_weights", spy, raising=False)
        model = self.build(model_class)
        missed = sorted({type(m).__name__ for m in model.modules() if id(m) not in reached})
        assert not missed, f"_init_weights never sees these modules: {missed}"

    def test_init_is_deterministic_under_seed(self, model_class):
        config = self.tester.get_config()
        first = self.build(model_class, config, seed=123).state_dict()
        again = self.build(model_class, config, seed=123).state_dict()
        other = self.build(model_class, config, seed=124).state_dict()
        assert_nested_close(again, first, msg="same seed")
        assert any(not torch.equal(first[k], other[k]) for k in first), "a different seed gave identical weights"

    def test_save_load_round_trip(self, model_class, tmp_path):
        model = self.build(model_class)
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["model_type"] == model.config.model_type
        assert saved["architectures"] == [model_class.__name__]
        loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"loading report: {problems}"
        assert_nested_close(loaded.state_dict(), model.state_dict(), msg="state dict")
        inputs = self.inputs(model_class)
        with torch.no_grad():
            self.assert_fields_close(model_class, loaded(**inputs), model(**inputs), atol=0, rtol=0, what="reload")

    def test_auto_class_round_trip(self, model_class, tmp_path):
        import hf_vl  # noqa: F401  (registers the Auto classes)

        auto_name = find_auto_class_name(model_class)
        assert auto_name, f"{model_class.__name__} is not registered in hf_vl.registry.ARCHITECTURES"
        model = self.build(model_class)
        model.save_pretrained(tmp_path)
        loaded = getattr(transformers, auto_name).from_pretrained(tmp_path)
        assert type(loaded) is model_class, f"{auto_name} built {type(loaded).__name__}"
        assert type(transformers.AutoModel.from_config(model.config)).__name__.startswith("HfVl")
        inputs = self.inputs(model_class)
        with torch.no_grad():
            self.assert_fields_close(model_class, loaded(**inputs), model(**inputs), atol=0, rtol=0, what=auto_name)

    def test_base_and_head_checkpoints_load_into_each_other(self, head_class, tmp_path):
        base_class = self.tester.base_model_class
        head = self.build(head_class)
        prefix = head.base_model_prefix
        trunk = getattr(head, prefix)
        assert isinstance(trunk, base_class), f"{head_class.__name__}.{prefix} is not a {base_class.__name__}"
        head.save_pretrained(tmp_path / "head")
        base, info = base_class.from_pretrained(tmp_path / "head", output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        assert_nested_close(base.state_dict(), trunk.state_dict(), msg="head -> base")
        trunk.save_pretrained(tmp_path / "base")
        loaded, info = head_class.from_pretrained(tmp_path / "base", output_loading_info=True)
        assert not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert all(not k.startswith(f"{prefix}.") for k in info["missing_keys"]), info["missing_keys"]
        assert_nested_close(getattr(loaded, prefix).state_dict(), trunk.state_dict(), msg="base -> head")

    # ---- training
    def test_every_trainable_parameter_gets_a_gradient(self, model_class):
        model = self.build(model_class).train()
        outputs = model(**self.inputs(model_class, labels=True))
        if self.tester.prepare_labels(model_class, self.tester.batch_size):
            assert outputs.loss is not None and outputs.loss.ndim == 0, "labels given but no scalar loss"
        loss = self.scalar_loss(model_class, outputs)
        assert torch.isfinite(loss), loss
        loss.backward()
        exempt = [re.compile(p) for p in self.tester.parameters_without_gradient]
        missing, bad = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad or any(p.search(name) for p in exempt):
                continue
            if param.grad is None or not param.grad.abs().sum() > 0:
                missing.append(name)
            elif not torch.isfinite(param.grad).all():
                bad.append(name)
        assert not missing, f"no gradient for {missing}"
        assert not bad, f"non-finite gradient for {bad}"

    def test_gradient_checkpointing_matches(self, model_class):
        _flag(self.tester, "supports_gradient_checkpointing")
        inputs = self.inputs(model_class, labels=True)
        reference = self.build(model_class).train()
        checkpointed = self.build(model_class).train()
        checkpointed.load_state_dict(reference.state_dict())
        counter = RecomputeCounter()
        checkpointed.activation_checkpointing_enable({"use_reentrant": False, "context_fn": counter})
        assert checkpointed.is_activation_checkpointing
        losses = []
        for model in (reference, checkpointed):
            loss = self.scalar_loss(model_class, model(**inputs))
            loss.backward()
            losses.append(loss)
        assert counter.recomputations > 0, "activation checkpointing was enabled but nothing was recomputed"
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
        grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert_nested_close({n: p.grad for n, p in checkpointed.named_parameters() if n in grads}, grads, 1e-6, 1e-5)
        # the deprecated name still works (FutureWarning in transformers 5)
        legacy = self.build(model_class)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            legacy.gradient_checkpointing_enable()
        assert legacy.is_activation_checkpointing
        assert any(m.gradient_checkpointing for m in legacy.modules() if isinstance(m, GradientCheckpointingLayer))

    # ---- dtype and compile
    def test_bf16_forward(self, model_class):
        model = self.build(model_class)
        inputs = self.inputs(model_class, labels=True)
        with torch.no_grad():
            reference = model(**inputs)
            model.to(torch.bfloat16)
            outputs = model(**self.tester.cast_inputs(inputs, torch.bfloat16))
        for field in self.tester.compare_fields(model_class):
            value, expected = get_field(outputs, field), get_field(reference, field)
            if not expected.is_floating_point():
                continue
            assert value.dtype == torch.bfloat16, f"{field} is {value.dtype} in a bf16 model"
            error = relative_error(value, expected)
            assert error < self.tester.bf16_relative_tolerance, f"{field}: bf16 relative error {error:.3g}"
        if getattr(outputs, "loss", None) is not None:
            assert torch.isfinite(outputs.loss)

    def test_fullgraph_capture(self, model_class):
        """Dynamo captures the whole forward without graph breaks (``backend="eager"``: no code generation)."""
        _flag(self.tester, "supports_fullgraph_compile")
        model = self.build(model_class)
        inputs = self.inputs(model_class)
        torch.compiler.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            self.assert_fields_close(model_class, compiled(**inputs), model(**inputs), what="fullgraph eager")

    @pytest.mark.slow
    def test_torch_compile_inductor(self):
        """The real ``torch.compile(fullgraph=True)`` (inductor) matches eager; one class per architecture."""
        _flag(self.tester, "supports_fullgraph_compile")
        model_class = self.tester.compile_model_class or self.tester.model_classes[0]
        model = self.build(model_class)
        inputs = self.inputs(model_class)
        torch.compiler.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            expected = model(**inputs)
            self.assert_fields_close(model_class, compiled(**inputs), expected, atol=1e-5, rtol=1e-4, what="inductor")
            self.assert_fields_close(model_class, compiled(**inputs), expected, atol=1e-5, rtol=1e-4, what="call 2")
