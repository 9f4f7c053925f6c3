"""CLIP: the common model tests on tiny configs (ViT and ResNet image towers, the composite and both towers alone),
plus CLIP behaviour: logit-scale clamp, features == forward embeddings, the symmetric loss, end-of-text pooling
with padding, input validation, configs and the variants table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from common.model_tester import ModelTester, ModelTesterMixin
from common.tiny import BATCH_SIZE, SEQ_LENGTH, TINY_IMAGE, TINY_TRANSFORMER, VOCAB_SIZE

from hf_vl import (
    CLIP_VARIANTS,
    HfVlClipConfig,
    HfVlClipModel,
    HfVlClipTextConfig,
    HfVlClipTextModel,
    HfVlClipTextModelWithProjection,
    HfVlClipVisionConfig,
    HfVlClipVisionModel,
    HfVlClipVisionModelWithProjection,
    clip_variant_config,
)
from hf_vl.modeling.hf_vl_contrastive_loss import clip_contrastive_loss

EOT = VOCAB_SIZE - 1  # as in OpenAI's vocabulary, the end-of-text token has the largest id
CONTEXT = 9  # > SEQ_LENGTH: inputs use a prefix of the position table
PROJECTION = 13
HIDDEN = TINY_TRANSFORMER["hidden_size"]
TOKENS = 1 + (TINY_IMAGE["image_size"] // TINY_IMAGE["patch_size"]) ** 2  # 65
RESNET = dict(vision_type="resnet", resnet_depths=[1, 2, 1, 1], resnet_width=8, num_attention_heads=4, image_size=64)
RESNET_HIDDEN = 8 * 32  # resnet_width * 32


def text_config(**overrides) -> dict:
    return {
        **TINY_TRANSFORMER, "vocab_size": VOCAB_SIZE, "max_position_embeddings": CONTEXT, "eos_token_id": EOT,
        **overrides,
    }


def vision_config(resnet: bool = False, **overrides) -> dict:
    base = RESNET if resnet else {**TINY_TRANSFORMER, **TINY_IMAGE}
    return {**base, **overrides}


def clip_config(resnet: bool = False, **overrides) -> HfVlClipConfig:
    return HfVlClipConfig(
        projection_dim=PROJECTION, text_config=text_config(), vision_config=vision_config(resnet), **overrides
    )


def text_inputs(batch_size: int, seed: int = 0) -> dict:
    """Random ids, one end-of-text token per row at different positions, then right padding (id 0, mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, EOT, (batch_size, SEQ_LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        end = SEQ_LENGTH - 1 - 2 * (row % 3)  # 6, 4, 2, ...
        input_ids[row, end] = EOT
        input_ids[row, end + 1 :] = 0
        attention_mask[row, end + 1 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pixel_inputs(batch_size: int, resnet: bool = False, seed: int = 1) -> torch.Tensor:
    size = RESNET["image_size"] if resnet else TINY_IMAGE["image_size"]
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- common testers
# Zero-initialised bn3 (OpenAI, Goyal et al. 2017) multiplies each residual branch by 0 at init, so the branch's
# convolutions and first two BatchNorms get exactly zero gradient until bn3 has moved.
_RESNET_BRANCH = {r"layers\.\d+\.(conv[123]|bn[12])\.": "zero-initialised bn3 gates the residual branch at init"}


@dataclasses.dataclass(frozen=True)
class ClipTester(ModelTester):
    model_classes = (HfVlClipModel,)
    resnet: bool = False

    @property
    def parameters_without_gradient(self):
        return _RESNET_BRANCH if self.resnet else {}

    def get_config(self, **overrides):
        return clip_config(self.resnet, **overrides)

    def prepare_inputs(self, batch_size):
        return {**text_inputs(batch_size), "pixel_values": pixel_inputs(batch_size, self.resnet)}

    def prepare_labels(self, model_class, batch_size):
        return {"return_loss": True}

    def expected_shapes(self, model_class, batch_size):
        vision = (
            {"vision_model_output.last_hidden_state": (batch_size, RESNET_HIDDEN, 2, 2)}
            if self.resnet
            else {
                "vision_model_output.last_hidden_state": (batch_size, TOKENS, HIDDEN),
                "vision_model_output.pooler_output": (batch_size, HIDDEN),
            }
        )
        return {
            "logits_per_image": (batch_size, batch_size),
            "logits_per_text": (batch_size, batch_size),
            "text_embeds": (batch_size, PROJECTION),
            "image_embeds": (batch_size, PROJECTION),
            "text_model_output.last_hidden_state": (batch_size, SEQ_LENGTH, HIDDEN),
            "text_model_output.pooler_output": (batch_size, HIDDEN),
            **vision,
        }

    def batched_fields(self, model_class):
        # the similarity matrices mix examples; the embeddings must not
        return tuple(f for f in self.compare_fields(model_class) if not f.startswith("logits"))

    def attention_outputs(self, model_class, config):
        vision_layers = 1 if self.resnet else config.vision_config.num_hidden_layers  # ResNet: the attention pool
        return {
            "text_model_output.attentions": config.text_config.num_hidden_layers,
            "vision_model_output.attentions": vision_layers,
        }

    def hidden_state_outputs(self, model_class, config):
        vision_config = config.vision_config
        vision = 1 + (len(vision_config.resnet_depths) if self.resnet else vision_config.num_hidden_layers)
        return {
            "text_model_output.hidden_states": config.text_config.num_hidden_layers + 1,
            "vision_model_output.hidden_states": vision,
        }


@dataclasses.dataclass(frozen=True)
class ClipTextTester(ModelTester):
    model_classes = (HfVlClipTextModel,)

    def get_config(self, **overrides):
        return HfVlClipTextConfig(**text_config(projection_dim=PROJECTION), **overrides)

    def prepare_inputs(self, batch_size):
        return text_inputs(batch_size)

    def expected_shapes(self, model_class, batch_size):
        return {"last_hidden_state": (batch_size, SEQ_LENGTH, HIDDEN), "pooler_output": (batch_size, HIDDEN)}


@dataclasses.dataclass(frozen=True)
class ClipVisionTester(ModelTester):
    model_classes = (HfVlClipVisionModel,)
    resnet: bool = False

    @property
    def parameters_without_gradient(self):
        return _RESNET_BRANCH if self.resnet else {}

    def get_config(self, **overrides):
        return HfVlClipVisionConfig(**vision_config(self.resnet, projection_dim=PROJECTION), **overrides)

    def prepare_inputs(self, batch_size):
        return {"pixel_values": pixel_inputs(batch_size, self.resnet)}

    def expected_shapes(self, model_class, batch_size):
        if self.resnet:
            return {"last_hidden_state": (batch_size, RESNET_HIDDEN, 2, 2), "pooler_output": (batch_size, PROJECTION)}
        return {"last_hidden_state": (batch_size, TOKENS, HIDDEN), "pooler_output": (batch_size, HIDDEN)}

    def attention_outputs(self, model_class, config):
        return {"attentions": 1 if self.resnet else config.num_hidden_layers}

    def hidden_state_outputs(self, model_class, config):
        return {"hidden_states": 1 + (len(config.resnet_depths) if self.resnet else config.num_hidden_layers)}


class TestClipCommon(ModelTesterMixin):
    tester = ClipTester()


# The (slow) inductor compile runs once, on the composite ViT model above, which holds both transformer towers;
# the other testers still check full-graph capture (test_fullgraph_capture), which is what inductor needs.
class TestClipResNetCommon(ModelTesterMixin):
    tester = ClipTester(resnet=True)
    test_torch_compile_inductor = None


class TestClipTextCommon(ModelTesterMixin):
    tester = ClipTextTester()
    test_torch_compile_inductor = None


class TestClipVisionCommon(ModelTesterMixin):
    tester = ClipVisionTester()
    test_torch_compile_inductor = None


class TestClipVisionResNetCommon(ModelTesterMixin):
    tester = ClipVisionTester(resnet=True)
    test_torch_compile_inductor = None


# ------------------------------------------------------------------------------------------------ helpers
def _model(resnet: bool = False, **overrides) -> HfVlClipModel:
    torch.manual_seed(0)
    return HfVlClipModel(clip_config(resnet, **overrides)).eval()


def _inputs(batch_size: int = BATCH_SIZE, resnet: bool = False) -> dict:
    return {**text_inputs(batch_size), "pixel_values": pixel_inputs(batch_size, resnet)}


# --------------------------------------------------------------------------------------------- CLIP behaviour
@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_features_equal_forward_embeddings(resnet):
    model = _model(resnet)
    inputs = _inputs(resnet=resnet)
    with torch.no_grad():
        out = model(**inputs)
        text = model.get_text_features(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = model.get_image_features(inputs["pixel_values"])
    torch.testing.assert_close(F.normalize(text, dim=-1), out.text_embeds, atol=0, rtol=0)
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds, atol=0, rtol=0)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(BATCH_SIZE))
    # logits are exp(logit_scale) times the cosine similarities, in both orientations
    expected = math.exp(model.config.logit_scale_init_value) * out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.T)


def test_logit_scale_is_clamped_at_100():
    model = _model()
    inputs = _inputs()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        out = model(**inputs)
    cosine = out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, 100.0 * cosine)
    assert model.get_logit_scale().item() == 100.0
    # below the cap the learned value is used as is
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    torch.testing.assert_close(model.get_logit_scale(), torch.tensor(20.0))


def test_logit_scale_init_is_ln_1_over_0_07():
    assert HfVlClipConfig().logit_scale_init_value == pytest.approx(2.6592, abs=1e-4)
    assert _model().logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_return_loss_is_the_symmetric_cross_entropy():
    model = _model()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
        no_loss = model(**inputs)
    labels = torch.arange(BATCH_SIZE)
    manual = (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
    torch.testing.assert_close(out.loss, manual)
    assert no_loss.loss is None
    # symmetric in the two modalities
    scale = model.get_logit_scale()
    swapped = clip_contrastive_loss(out.text_embeds, out.image_embeds, scale)
    torch.testing.assert_close(swapped, out.loss)


def test_loss_trains_logit_scale_until_the_clamp():
    model = _model().train()
    out = model(**_inputs(), return_loss=True)
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    model.zero_grad()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    model(**_inputs(), return_loss=True).loss.backward()
    assert model.logit_scale.grad.abs() == 0, "a clamped temperature must not receive gradient (paper section 2.5)"


# ------------------------------------------------------------------------------------------ text pooling
def _text_model(**overrides) -> HfVlClipTextModel:
    torch.manual_seed(0)
    return HfVlClipTextModel(HfVlClipTextConfig(**text_config(**overrides))).eval()


def test_padded_batch_pools_like_each_sentence_alone():
    model = _text_model()
    inputs = text_inputs(BATCH_SIZE)
    with torch.no_grad():
        batched = model(**inputs).pooler_output
        for row in range(BATCH_SIZE):
            length = int(inputs["attention_mask"][row].sum())
            alone = model(inputs["input_ids"][row : row + 1, :length]).pooler_output
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-6, rtol=1e-5)


def test_padding_with_the_end_token_pools_its_first_occurrence():
    """transformers' CLIP tokenizer pads with <|endoftext|>: the first one (the real end) must be pooled."""
    model = _text_model()
    inputs = text_inputs(BATCH_SIZE)
    eot_padded = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, EOT)
    with torch.no_grad():
        expected = model(**inputs).pooler_output
        for mask in (inputs["attention_mask"], None):
            torch.testing.assert_close(model(eot_padded, attention_mask=mask).pooler_output, expected)


def test_padding_mask_with_sdpa_equals_eager():
    inputs = text_inputs(BATCH_SIZE)
    sdpa = _text_model()
    eager = _text_model(attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for mask in (inputs["attention_mask"], None):
            a = sdpa(inputs["input_ids"], attention_mask=mask).last_hidden_state
            b = eager(inputs["input_ids"], attention_mask=mask).last_hidden_state
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _padded_to_context(batch_size: int) -> dict:
    """text_inputs padded with more padding up to the whole context, as CLIP's tokenizer pads to 77."""
    inputs = text_inputs(batch_size)
    extra = CONTEXT - SEQ_LENGTH
    return {key: F.pad(value, (0, extra)) for key, value in inputs.items()}


def _embedded_lengths(model, call) -> tuple[list[int], object]:
    """The sequence lengths the text embeddings ran on during ``call()``, and its output."""
    lengths = []
    handle = model.embeddings.register_forward_hook(lambda module, args, output: lengths.append(output.shape[1]))
    try:
        with torch.no_grad():
            output = call()
    finally:
        handle.remove()
    return lengths, output


def test_text_tower_stops_after_the_last_real_token():
    """With attention_mask the tower runs only up to the batch's last real token (trailing columns are padding in
    every row): the same pooled outputs and real-token states as the whole context, zeros at padding."""
    model = _text_model()
    inputs = _padded_to_context(BATCH_SIZE)
    mask = inputs["attention_mask"]
    last_real = int(mask.sum(1).max())
    lengths, trimmed = _embedded_lengths(model, lambda: model(**inputs))
    assert lengths == [last_real] and last_real < CONTEXT
    with torch.no_grad():
        whole = model(inputs["input_ids"])  # no mask: every column computed (causal, right padding harmless)
    torch.testing.assert_close(trimmed.pooler_output, whole.pooler_output, atol=1e-6, rtol=1e-5)
    real = mask.bool()
    assert trimmed.last_hidden_state.shape == whole.last_hidden_state.shape
    torch.testing.assert_close(trimmed.last_hidden_state[real], whole.last_hidden_state[real], atol=1e-6, rtol=1e-5)
    assert not trimmed.last_hidden_state[~real].any()
    # one row alone runs to its own end and gives the same row (padding zeros do not depend on the batch)
    lengths, alone = _embedded_lengths(model, lambda: model(**{k: v[2:3] for k, v in inputs.items()}))
    assert lengths == [int(mask[2].sum())]
    torch.testing.assert_close(alone.last_hidden_state, trimmed.last_hidden_state[2:3], atol=1e-6, rtol=1e-5)


def test_text_tower_runs_every_column_when_needed():
    """Left padding (real tokens at the end), a real token after the end token, and captured hidden states or
    attentions all keep the whole length."""
    model = _text_model()
    inputs = _padded_to_context(2)
    left = {key: value.flip(-1) for key, value in inputs.items()}
    lengths, _ = _embedded_lengths(model, lambda: model(**left))
    assert lengths == [CONTEXT]
    late = {key: value.clone() for key, value in inputs.items()}
    late["attention_mask"][0, CONTEXT - 2] = 1  # a real token late in the row
    lengths, _ = _embedded_lengths(model, lambda: model(**late))
    assert lengths == [CONTEXT - 1]
    for flag in ("output_hidden_states", "output_attentions"):
        lengths, output = _embedded_lengths(model, lambda: model(**inputs, **{flag: True}))
        assert lengths == [CONTEXT], flag
        if flag == "output_hidden_states":
            assert all(states.shape[1] == CONTEXT for states in output.hidden_states)


def test_text_tower_is_causal():
    model = _text_model()
    ids = text_inputs(1)["input_ids"]
    changed = ids.clone()
    changed[0, -1] = 5  # a token after everything else
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)
    assert not torch.equal(a[:, -1], b[:, -1])


def test_eos_pooling_uses_the_configured_token():
    """pooling='eos' for tokenizers whose end token is not the largest id."""
    eos = 7
    model = _text_model(pooling="eos", eos_token_id=eos)
    ids = torch.tensor([[3, 90, eos, 50, 0], [eos, 4, 5, eos, 6]])
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, 2])
    torch.testing.assert_close(out.pooler_output[1], out.last_hidden_state[1, 0])
    argmax = _text_model()  # same weights, OpenAI's rule: the largest id (90 and 6 here)
    with torch.no_grad():
        assert not torch.allclose(argmax(ids).pooler_output[0], out.pooler_output[0])
    with pytest.raises(ValueError, match="eos_token_id=7 in every row"):
        model(torch.tensor([[3, 4, 5]]))


# ------------------------------------------------------------------------------------------------ bad input
def test_input_ids_longer_than_the_context_raise():
    model = _model()
    ids = torch.full((1, CONTEXT + 1), 3)
    with pytest.raises(ValueError, match=f"more than the context of {CONTEXT}"):
        model.get_text_features(ids)
    with pytest.raises(ValueError, match="max_length"):
        model(input_ids=ids, pixel_values=pixel_inputs(1))


@pytest.mark.parametrize("missing", ["input_ids", "pixel_values"])
def test_missing_modality_raises(missing):
    inputs = _inputs()
    inputs.pop(missing)
    if missing == "input_ids":
        inputs.pop("attention_mask")
    with pytest.raises(ValueError, match=f"{missing} is required"):
        _model()(**inputs)


def test_bad_text_inputs_raise():
    model = _text_model()
    with pytest.raises(ValueError, match="input_ids is required"):
        model()
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(batch, sequence_length\)"):
        model(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=f"lie in \\[0, {VOCAB_SIZE}\\)"):
        model(torch.tensor([[1, VOCAB_SIZE]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_bad_pixel_values_raise_and_interpolation_works(resnet):
    model = _model(resnet)
    size = RESNET["image_size"] if resnet else TINY_IMAGE["image_size"]
    with pytest.raises(ValueError, match="num_channels|shape"):
        model.get_image_features(torch.randn(1, 1, size, size))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.get_image_features(pixel_values=[[0.0]])
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(torch.randn(1, 3, 2 * size, 2 * size))
    with torch.no_grad():
        features = model.get_image_features(torch.randn(2, 3, 2 * size, 2 * size), interpolate_pos_encoding=True)
    assert features.shape == (2, PROJECTION) and torch.isfinite(features).all()


# ------------------------------------------------------------------------------------- projections / layout
@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_with_projection_towers_share_the_composite_keys(resnet):
    clip = _model(resnet)
    state = clip.state_dict()
    config = clip.config
    text = HfVlClipTextModelWithProjection(config.text_config).eval()
    text.load_state_dict({k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))})
    vision = HfVlClipVisionModelWithProjection(config.vision_config).eval()
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    inputs = _inputs(resnet=resnet)
    with torch.no_grad():
        text_out = text(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        vision_out = vision(inputs["pixel_values"])
        text_features = clip.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(text_out.text_embeds, text_features)
        torch.testing.assert_close(vision_out.image_embeds, clip.get_image_features(inputs["pixel_values"]))
        as_tuple = text(inputs["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (BATCH_SIZE, PROJECTION)


def test_key_layout():
    vit_keys = set(_model().state_dict())
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= vit_keys
    assert "vision_model.pre_layernorm.weight" in vit_keys
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in vit_keys
    resnet_keys = set(_model(resnet=True).state_dict())
    assert "visual_projection.weight" not in resnet_keys  # the attention pool's out_proj projects
    assert "vision_model.stages.1.layers.0.downsample.conv.weight" in resnet_keys
    assert "vision_model.attention_pool.out_proj.weight" in resnet_keys
    assert _model().visual_projection.bias is None and _model().text_projection.bias is None


def test_resnet_stage_geometry():
    model = HfVlClipVisionModel(HfVlClipVisionConfig(**RESNET)).eval()
    with torch.no_grad():
        out = model(pixel_inputs(2, resnet=True), output_hidden_states=True)
    shapes = [tuple(h.shape) for h in out.hidden_states]
    # stem /4 (w=8), then stages of 4w, 8w, 16w, 32w channels at /4, /8, /16, /32
    assert shapes == [(2, 8, 16, 16), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert [len(stage.layers) for stage in model.stages] == RESNET["resnet_depths"]


# --------------------------------------------------------------------------------------------- configs
def test_projection_dim_reaches_the_sub_configs():
    config = clip_config()
    assert config.text_config.projection_dim == config.vision_config.projection_dim == PROJECTION
    with pytest.raises(ValueError, match="projection_dim"):
        HfVlClipConfig(projection_dim=8, text_config=HfVlClipTextConfig(projection_dim=16))


def test_config_validation():
    with pytest.raises(ValueError, match="vision_type"):
        HfVlClipVisionConfig(vision_type="convnext")
    with pytest.raises(ValueError, match="resnet_depths"):
        HfVlClipVisionConfig(vision_type="resnet", num_attention_heads=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        HfVlClipVisionConfig(**{**RESNET, "image_size": 40})
    with pytest.raises(ValueError, match="patch_size"):
        HfVlClipVisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible"):
        HfVlClipTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="pooling"):
        HfVlClipTextConfig(pooling="mean")
    assert HfVlClipVisionConfig(**RESNET).hidden_size == RESNET_HIDDEN


def test_variants_table():
    releases = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    assert list(CLIP_VARIANTS)[:9] == releases
    for name, row in CLIP_VARIANTS.items():
        config = clip_variant_config(name)
        text, vision = config.text_config, config.vision_config
        assert text.hidden_size // text.num_attention_heads == 64 and text.max_position_embeddings == 77
        assert vision.hidden_size // vision.num_attention_heads == 64, name  # heads = width / 64 (both towers)
        size = vision.image_size
        assert row["processor"]["crop_size"] == {"height": size, "width": size}
        assert row["processor"]["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
        gelu = name.startswith("ViT-") and "/" not in name and not name.endswith("-quickgelu")
        assert text.hidden_act == vision.hidden_act == ("gelu" if gelu else "quick_gelu"), name
    assert clip_variant_config("RN50").vision_config.hidden_size == 2048
    assert clip_variant_config("RN50x64").projection_dim == 1024
    assert clip_variant_config("ViT-L/14@336px").vision_config.image_size == 336
    assert clip_variant_config("ViT-B/32", vision_config={"image_size": 256}).vision_config.patch_size == 32
    with pytest.raises(ValueError, match="unknown CLIP variant"):
        clip_variant_config("ViT-H/14")


def test_tower_checkpoint_loads_into_its_with_projection_model(tmp_path):
    tower = _text_model()
    tower.save_pretrained(tmp_path)
    loaded, info = HfVlClipTextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["text_projection.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for key, value in tower.state_dict().items():
        assert torch.equal(loaded.text_model.state_dict()[key], value), key


def test_init_follows_openai_and_spares_loaded_weights(tmp_path):
    """Block-level inits (attention, MLP, zero bn3) run although those modules own no parameters directly, and
    never overwrite loaded tensors."""
    width, layers = 256, 2
    config = clip_config(resnet=True)
    config.text_config.update(dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers))
    torch.manual_seed(0)
    model = HfVlClipModel(config)
    block = model.text_model.encoder.layers[0]
    for tensor, std in (
        (block.self_attn.q_proj.weight, width**-0.5),
        (block.self_attn.out_proj.weight, width**-0.5 * (2 * layers) ** -0.5),
        (block.mlp.fc1.weight, (2 * width) ** -0.5),
        (model.text_model.embeddings.position_embedding, 0.01),
        (model.text_projection.weight, width**-0.5),
    ):
        assert tensor.std().item() == pytest.approx(std, rel=0.1)
    bottleneck = model.vision_model.stages[0].layers[0]
    assert torch.equal(bottleneck.bn3.weight, torch.zeros_like(bottleneck.bn3.weight))
    with torch.no_grad():
        bottleneck.bn3.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = HfVlClipModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.vision_model.stages[0].layers[0].bn3.weight, bottleneck.bn3.weight)
