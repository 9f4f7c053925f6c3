"""CLIP conversion: parity with open_clip (full-size ViT-B/32 and RN50 QuickGELU, a GELU model) and transformers
``CLIPModel`` (small and full ViT-B/32) on real photographs and sentences; OpenAI TorchScript archives read without
running them; plain OpenAI state dicts; key coverage of all nine releases; strict accounting; the CLI."""

from __future__ import annotations

import json
import pickle
import zipfile

import open_clip
import pytest
import torch
import transformers
from conversion_helpers import assert_parity, randomize_
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from torch import nn

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl import CLIP_VARIANTS, HfVlClipModel, clip_variant_config
from hf_vl.cli import main
from hf_vl.conversion import ConversionError
from hf_vl.conversion.api import convert_checkpoint
from hf_vl.conversion.convert_hf_vl_clip import CLIP_CONVERSION, read_torchscript_state_dict
from hf_vl.conversion.rules import convert_state_dict
from hf_vl.modeling.configuration_hf_vl_clip import OPENAI_RELEASES

SENTENCES = [
    "a photo of an astronaut",
    "a photo of a cup of coffee",
    "a photo of a cat",
    "a diagram of a rocket engine",
    "an empty street at night",
]
# open_clip model names of the OpenAI releases (same networks, QuickGELU)
OPEN_CLIP_NAMES = {
    "RN50": "RN50-quickgelu", "RN101": "RN101-quickgelu", "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu", "RN50x64": "RN50x64-quickgelu", "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu", "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}


@pytest.fixture(scope="module")
def photographs() -> list[Image.Image]:
    return [Image.fromarray(image) for image in (data.astronaut(), data.coffee(), data.chelsea())]


@torch.no_grad()
def randomize_clip_(model: nn.Module, full: bool = True) -> nn.Module:
    """``randomize_`` (``full``) or, for full-size models whose weight matrices are already random, only the
    tensors a default init makes constant (LayerNorm/BatchNorm weights 1, biases 0, ...): ``full=False`` costs
    milliseconds instead of seconds. BatchNorm also gets non-trivial running statistics (buffers), so a swapped or
    dropped BatchNorm tensor changes the output."""
    generator = torch.Generator().manual_seed(4321)
    if full:
        randomize_(model)
    else:
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.ndim <= 1 and not isinstance(module, nn.BatchNorm2d):
                    noise = torch.randn(param.shape, generator=generator)
                    is_norm_weight = isinstance(module, nn.LayerNorm) and name == "weight"
                    param.copy_(1 + 0.1 * noise if is_norm_weight else 0.02 * noise)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            noise = lambda: torch.randn(module.num_features, generator=generator)  # noqa: E731
            module.weight.copy_(1 + 0.1 * noise())
            module.bias.copy_(0.1 * noise())
            module.running_mean.copy_(0.1 * noise())
            module.running_var.copy_(1 + 0.2 * noise().abs())
    return model.eval()


def _row(config: dict, image_size: int) -> dict:
    processor = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return {"config": config, "processor": processor, "source": "tests"}


def _encode_reference(reference, pixels, tokens):
    with torch.no_grad():
        return reference.encode_image(pixels), reference.encode_text(tokens)


def _check_embeddings(name: str, model: HfVlClipModel, pixels, tokens, image_ref, text_ref, mask=None) -> None:
    """Raw and normalised image/text embeddings within 1e-4, and the same zero-shot ranking per image."""
    with torch.no_grad():
        image = model.get_image_features(pixels)
        text = model.get_text_features(tokens, attention_mask=mask)
    assert_parity(f"{name} image features", image, image_ref)
    assert_parity(f"{name} text features", text, text_ref)
    ours = F_normalize(image) @ F_normalize(text).T
    theirs = F_normalize(image_ref) @ F_normalize(text_ref).T
    assert_parity(f"{name} image-text cosine", ours, theirs)
    assert torch.equal(ours.argsort(dim=-1, descending=True), theirs.argsort(dim=-1, descending=True)), name


def F_normalize(x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - mirrors torch.nn.functional.normalize
    return torch.nn.functional.normalize(x, dim=-1)


def _open_clip_full_size(name: str, photographs, tmp_path):
    """A random full-size open_clip model, its own eval preprocessing of the photographs, and a checkpoint file."""
    torch.manual_seed(0)
    reference, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    randomize_clip_(reference, full=False)
    checkpoint = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, checkpoint)
    pixels = torch.stack([preprocess(image) for image in photographs])
    return reference, pixels, checkpoint


# ------------------------------------------------------------------------------------ open_clip, full size
@pytest.mark.slow
@pytest.mark.parametrize("name, variant", [("ViT-B-32-quickgelu", "ViT-B/32"), ("RN50-quickgelu", "RN50")])
def test_open_clip_full_size_parity(name, variant, photographs, tmp_path):
    reference, pixels, checkpoint = _open_clip_full_size(name, photographs, tmp_path)
    tokens = open_clip.tokenize(SENTENCES)  # (5, 77), padded with 0
    image_ref, text_ref = _encode_reference(reference, pixels, tokens)
    model = convert_checkpoint("clip", "open_clip", checkpoint, variant, progress=False)
    _check_embeddings(f"open_clip {name}", model, pixels, tokens, image_ref, text_ref)
    with torch.no_grad():  # with the padding mask (what the processor returns) the text embeddings are the same
        masked = model.get_text_features(tokens, attention_mask=(tokens != 0).long())
    assert_parity(f"open_clip {name} text features, padding mask", masked, text_ref)


def _small_open_clip(quick_gelu: bool, resnet: bool = False):
    vision = (
        dict(layers=[1, 2, 1, 1], width=32, image_size=64, head_width=64)
        if resnet
        else dict(layers=2, width=128, patch_size=8, image_size=64, head_width=64)
    )
    text = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
    torch.manual_seed(0)
    return randomize_clip_(open_clip.CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu))


def _small_row(hidden_act: str, resnet: bool = False) -> dict:
    if resnet:
        vision = dict(vision_type="resnet", resnet_depths=[1, 2, 1, 1], resnet_width=32, num_attention_heads=16)
    else:
        vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
    config = {
        "projection_dim": 48,
        "text_config": {**text, "hidden_act": hidden_act},
        "vision_config": {**vision, "image_size": 64, "hidden_act": hidden_act},
    }
    return _row(config, 64)


def _small_pixels(photographs, size: int = 64) -> torch.Tensor:
    preprocess = open_clip.image_transform(size, is_train=False)
    return torch.stack([preprocess(image) for image in photographs])


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_open_clip_gelu_model_parity(resnet, photographs, tmp_path, monkeypatch):
    """open_clip without ``-quickgelu`` uses exact GELU; the variant's ``hidden_act`` must follow, and the wrong
    activation is measurably different (so the parity check can fail)."""
    reference = _small_open_clip(quick_gelu=False, resnet=resnet)
    checkpoint = tmp_path / "gelu.pt"
    torch.save(reference.state_dict(), checkpoint)
    monkeypatch.setitem(CLIP_VARIANTS, "test-gelu", _small_row("gelu", resnet))
    monkeypatch.setitem(CLIP_VARIANTS, "test-quickgelu", _small_row("quick_gelu", resnet))
    pixels, tokens = _small_pixels(photographs), open_clip.tokenize(SENTENCES)
    image_ref, text_ref = _encode_reference(reference, pixels, tokens)
    model = convert_checkpoint("clip", "open_clip", checkpoint, "test-gelu", progress=False)
    _check_embeddings("open_clip small GELU", model, pixels, tokens, image_ref, text_ref)
    wrong = convert_checkpoint("clip", "open_clip", checkpoint, "test-quickgelu", progress=False)
    with torch.no_grad():
        assert (wrong.get_text_features(tokens) - text_ref).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- transformers
def _hf_text_inputs(vocab_size: int, eos: int):
    tokens = open_clip.tokenize(SENTENCES)
    if vocab_size < 49408:  # a small vocabulary: same lengths, ids folded into range, end token = eos
        tokens = torch.where(tokens > 0, tokens % (vocab_size - 2) + 1, tokens)
        tokens[torch.arange(len(SENTENCES)), open_clip.tokenize(SENTENCES).argmax(-1)] = eos
    return tokens, (tokens != 0).long()


def _check_transformers(name: str, hf_config, photographs, tmp_path, image_size: int, full_size: bool = False):
    """Parity of a converted random ``CLIPModel``; small models also go through the saved, reloaded directory."""
    torch.manual_seed(0)
    reference = randomize_clip_(transformers.CLIPModel(hf_config), full=not full_size)
    reference.save_pretrained(tmp_path / "hf")
    output = None if full_size else tmp_path / "out"
    model = convert_checkpoint("clip", "transformers", tmp_path / "hf", output=output, progress=False)
    assert model.config.text_config.pooling == "eos"
    assert model.config.text_config.eos_token_id == hf_config.text_config.eos_token_id
    pixels = _small_pixels(photographs, image_size)
    tokens, mask = _hf_text_inputs(hf_config.text_config.vocab_size, hf_config.text_config.eos_token_id)
    with torch.no_grad():
        image_ref = reference.get_image_features(pixel_values=pixels).pooler_output
        text_ref = reference.get_text_features(input_ids=tokens, attention_mask=mask).pooler_output
        logits_ref = reference(input_ids=tokens, pixel_values=pixels, attention_mask=mask).logits_per_image
    _check_embeddings(name, model, pixels, tokens, image_ref, text_ref, mask=mask)
    if full_size:
        return
    loaded = transformers.AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = loaded(input_ids=tokens, pixel_values=pixels, attention_mask=mask).logits_per_image
    assert_parity(f"{name} logits_per_image (reloaded)", logits, logits_ref)


def test_transformers_small_parity(photographs, tmp_path):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=98, bos_token_id=97, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    _check_transformers("transformers small", config, photographs, tmp_path, 32)


@pytest.mark.slow
def test_transformers_vit_b_32_full_size_parity(photographs, tmp_path):
    _check_transformers("transformers ViT-B/32", transformers.CLIPConfig(), photographs, tmp_path, 224, True)


def test_transformers_legacy_eos_id_keeps_argmax_pooling(tmp_path):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                eos_token_id=2, bos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    model = convert_checkpoint("clip", "transformers", tmp_path, progress=False)
    assert model.config.text_config.pooling == "argmax"


# ------------------------------------------------------------------------------ OpenAI release formats
def _tiny_open_clip(resnet: bool) -> nn.Module:
    vision = (
        dict(layers=[1, 1, 1, 1], width=32, image_size=64, head_width=64)
        if resnet
        else dict(layers=2, width=128, patch_size=8, image_size=32, head_width=64)
    )
    text = dict(context_length=8, vocab_size=100, width=64, heads=2, layers=2)
    torch.manual_seed(0)
    return randomize_clip_(open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True))


def _tiny_row(resnet: bool) -> dict:
    if resnet:
        vision = dict(vision_type="resnet", resnet_depths=[1, 1, 1, 1], resnet_width=32, num_attention_heads=16,
                      image_size=64)
    else:
        vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=8, image_size=32)
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=8, eos_token_id=99)
    return _row({"projection_dim": 32, "text_config": text, "vision_config": vision}, vision["image_size"])


def _tiny_inputs(resnet: bool):
    generator = torch.Generator().manual_seed(5)
    size = 64 if resnet else 32
    tokens = torch.randint(1, 99, (3, 8), generator=generator)
    tokens[0, 7], tokens[1, 4], tokens[2, 2] = 99, 99, 99
    tokens[1, 5:], tokens[2, 3:] = 0, 0
    return torch.randn(3, 3, size, size, generator=generator), tokens


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_torchscript_archive_is_read_without_running_it(resnet, tmp_path, monkeypatch):
    reference = _tiny_open_clip(resnet)
    pixels, tokens = _tiny_inputs(resnet)
    archive = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(reference, (pixels, tokens), check_trace=False), archive)
    expected_state = torch.jit.load(archive).state_dict()  # the reference reading (runs the archive: test only)
    read = read_torchscript_state_dict(archive)
    assert set(read) == set(expected_state)
    assert all(torch.equal(read[key], expected_state[key]) for key in read)

    def refuse(*args, **kwargs):
        raise AssertionError("the converter must not call torch.jit.load / torch.load on a TorchScript archive")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setitem(CLIP_VARIANTS, "test-tiny", _tiny_row(resnet))
    model = convert_checkpoint("clip", "openai", archive, "test-tiny", progress=False)
    image_ref, text_ref = _encode_reference(reference, pixels, tokens)
    _check_embeddings("openai TorchScript tiny", model, pixels, tokens, image_ref, text_ref)


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("archive code ran",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Exploit(), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (__builtin__|builtins)\.print"):
        read_torchscript_state_dict(path)


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_openai_plain_state_dict_fp16_with_archive_extras(resnet, tmp_path, monkeypatch):
    """A state_dict() of a release (fp16 weights, the three 0-d extras) converts to the fp32 model."""
    reference = _tiny_open_clip(resnet)
    with torch.no_grad():  # the reference computes with the same fp16-rounded values, in fp32
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in reference.state_dict().items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(8), vocab_size=torch.tensor(100))
    checkpoint = tmp_path / "release.pt"
    torch.save(state, checkpoint)
    monkeypatch.setitem(CLIP_VARIANTS, "test-tiny", _tiny_row(resnet))
    model = convert_checkpoint("clip", "openai", checkpoint, "test-tiny", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    pixels, tokens = _tiny_inputs(resnet)
    image_ref, text_ref = _encode_reference(reference, pixels, tokens)
    _check_embeddings("openai fp16 state dict tiny", model, pixels, tokens, image_ref, text_ref)


# ------------------------------------------------------------------------------------ accounting and coverage
@pytest.mark.parametrize("release", OPENAI_RELEASES)
def test_every_release_converts_key_for_key(release):
    """Full-size key and shape accounting on the meta device (no memory): open_clip's network of each release
    (OpenAI's keys) against the model built from the variant table."""
    source = CLIP_CONVERSION.get_source("openai")
    config = clip_variant_config(release)
    with torch.device("meta"):
        reference = open_clip.CLIP(**open_clip.get_model_config(OPEN_CLIP_NAMES[release]))
        model = HfVlClipModel(config)
    converted = convert_state_dict(reference.state_dict(), source.rules_for(config), expected_keys=model.state_dict())
    assert set(converted) == set(model.state_dict())


def test_strict_accounting_errors(tmp_path, monkeypatch):
    reference = _tiny_open_clip(resnet=False)
    monkeypatch.setitem(CLIP_VARIANTS, "test-tiny", _tiny_row(False))
    monkeypatch.setitem(CLIP_VARIANTS, "test-tiny-resnet", _tiny_row(True))
    state = reference.state_dict()
    torch.save({**state, "visual.extra_head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match="visual.extra_head.weight"):
        convert_checkpoint("clip", "open_clip", tmp_path / "extra.pt", "test-tiny", progress=False)
    torch.save({k: v for k, v in state.items() if k != "ln_final.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match="text_model.final_layer_norm.bias"):
        convert_checkpoint("clip", "open_clip", tmp_path / "missing.pt", "test-tiny", progress=False)
    torch.save(state, tmp_path / "vit.pt")
    # a ViT file named as a ResNet variant: the ViT keys are unknown, the ResNet's missing
    with pytest.raises(ConversionError, match=r"(?s)visual\.class_embedding.*vision_model\.stem\.bn1\.weight"):
        convert_checkpoint("clip", "open_clip", tmp_path / "vit.pt", "test-tiny-resnet", progress=False)
    with pytest.raises(ValueError, match="unknown clip variant"):
        convert_checkpoint("clip", "openai", tmp_path / "vit.pt", "ViT-B/31", progress=False)


def test_cli_writes_a_loadable_directory(tmp_path, monkeypatch, photographs):
    reference = _tiny_open_clip(resnet=False)
    torch.save(reference.state_dict(), tmp_path / "tiny.pt")
    monkeypatch.setitem(CLIP_VARIANTS, "test-tiny", _tiny_row(False))
    argv = ["convert", "clip", "--source", "open_clip", "--checkpoint", str(tmp_path / "tiny.pt"),
            "--variant", "test-tiny", "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "hf_vl_clip" and config["text_config"]["hidden_act"] == "quick_gelu"
    model = transformers.AutoModel.from_pretrained(tmp_path / "out")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "HfVlClipModel" and type(processor).__name__ == "HfVlClipProcessor"
    pixels = processor(images=photographs, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    _, tokens = _tiny_inputs(False)
    image_ref, text_ref = _encode_reference(reference, pixels, tokens)
    _check_embeddings("open_clip tiny via the CLI", model, pixels, tokens, image_ref, text_ref)
    assert main(["convert", "clip", "--source", "openai", "--checkpoint", str(tmp_path / "tiny.pt"),
                 "--variant", "nope", "--output", str(tmp_path / "x")]) == 2
