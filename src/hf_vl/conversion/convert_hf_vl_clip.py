"""CLIP checkpoints -> hf_vl ``HfVlClipModel`` (``text_model.*``, ``vision_model.*``, projections, ``logit_scale``).

Sources (``hf-vl convert clip --source <name> --variant <name>``):

- ``openai``: the original release files of openai/CLIP (``RN50.pt`` ... ``ViT-L-14-336px.pt``), TorchScript archives
  with fp16 weights, or a plain ``state_dict()`` file with the same keys. Archives are read WITHOUT running their
  code: ``torch.jit.load`` would compile and run the TorchScript (``code/``) stored in the file, so instead
  :func:`read_torchscript_state_dict` opens the zip, unpickles ``data.pkl`` with a restricted unpickler that builds
  only tensors (``torch._utils._rebuild_tensor_v2`` over the archive's raw storages) and inert placeholders for the
  archive's module objects, and collects the tensors by attribute path (``visual.conv1.weight``). Any other global
  in the pickle is refused. Weights are converted to fp32 (the model's dtype), as ``clip.load`` does on CPU.
- ``open_clip``: a ``state_dict()`` of an open_clip ``CLIP`` model (``.pt``/``.pth``/``.bin``/``.safetensors``) of
  these architectures; its keys are OpenAI's. The variant name fixes the activation: ``ViT-B-32`` (exact GELU)
  vs ``ViT-B-32-quickgelu`` / ``ViT-B/32`` (QuickGELU), as in ``open_clip.create_model``.
- ``transformers``: a transformers ``CLIPModel`` ``save_pretrained`` directory (Hub names = in-memory names for
  CLIP); the config is read from ``config.json`` (``--variant`` optional), ``eos_token_id == 2`` (configs written
  before transformers PR #24773) keeps OpenAI's argmax pooling, any other id pools at its first occurrence.

Layout changes: fused ``in_proj_weight``/``in_proj_bias`` split into q/k/v; ``text_projection`` and ``visual.proj``
(``x @ P`` matrices) transposed into bias-free Linear weights; position embeddings and the class token get the
leading (1, ...) dimensions of hf_vl's ViT layout; ResNet ``layerS.B`` -> ``stages.{S-1}.layers.B``,
``downsample.0/1`` -> ``downsample.conv/bn``, ``attnpool.c_proj`` -> ``attention_pool.out_proj``.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from ..modeling.configuration_hf_vl_clip import CLIP_MEAN, CLIP_STD
from ..modeling.modeling_hf_vl_clip import HfVlClipModel
from .loaders import StateDict, as_state_dict, load_state_dict_file, load_transformers_directory
from .rules import Drop, Rename, Split
from .spec import ConversionSpec, Source
from .transforms import split_qkv, transpose


def add_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """A (positions, dim) position table -> hf_vl's (1, positions, dim)."""
    if tensor.ndim != 2:
        raise ValueError(f"add_batch_dim expects a (positions, dim) tensor, got shape {tuple(tensor.shape)}")
    return tensor[None]


def class_token(tensor: torch.Tensor) -> torch.Tensor:
    """A (dim,) class embedding -> hf_vl's (1, 1, dim)."""
    if tensor.ndim != 1:
        raise ValueError(f"class_token expects a (dim,) tensor, got shape {tuple(tensor.shape)}")
    return tensor[None, None]


# ------------------------------------------------------------------------------------------- openai / open_clip
def _block_rules(source: str, target: str) -> tuple:
    """One pre-LN residual block (``ln_1``, ``attn``, ``ln_2``, ``mlp``); \\1 is the block index in both."""
    return (
        Rename(source + r"ln_1\.(weight|bias)", target + r"layer_norm1.\2"),
        Split(
            source + r"attn\.in_proj_(weight|bias)", tuple(target + rf"self_attn.{p}_proj.\2" for p in "qkv"), split_qkv
        ),
        Rename(source + r"attn\.out_proj\.(weight|bias)", target + r"self_attn.out_proj.\2"),
        Rename(source + r"ln_2\.(weight|bias)", target + r"layer_norm2.\2"),
        Rename(source + r"mlp\.c_fc\.(weight|bias)", target + r"mlp.fc1.\2"),
        Rename(source + r"mlp\.c_proj\.(weight|bias)", target + r"mlp.fc2.\2"),
    )


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_VIS = "vision_model."


def _resnet_rules() -> tuple:
    stage_rules = tuple(
        rule
        for stage in range(1, 5)
        for rule in (
            Rename(
                rf"visual\.layer{stage}\.(\d+)\.(conv[123])\.weight",
                _VIS + rf"stages.{stage - 1}.layers.\1.\2.weight",
            ),
            Rename(rf"visual\.layer{stage}\.(\d+)\.(bn[123])\.{_BN}", _VIS + rf"stages.{stage - 1}.layers.\1.\2.\3"),
            Rename(
                rf"visual\.layer{stage}\.(\d+)\.downsample\.0\.weight",
                _VIS + rf"stages.{stage - 1}.layers.\1.downsample.conv.weight",
            ),
            Rename(
                rf"visual\.layer{stage}\.(\d+)\.downsample\.1\.{_BN}",
                _VIS + rf"stages.{stage - 1}.layers.\1.downsample.bn.\2",
            ),
        )
    )
    return (
        Rename(r"visual\.(conv[123])\.weight", _VIS + r"stem.\1.weight"),
        Rename(rf"visual\.(bn[123])\.{_BN}", _VIS + r"stem.\1.\2"),
        *stage_rules,
        Rename(r"visual\.attnpool\.positional_embedding", _VIS + "attention_pool.position_embedding", add_batch_dim),
        Rename(r"visual\.attnpool\.([qkv])_proj\.(weight|bias)", _VIS + r"attention_pool.\1_proj.\2"),
        Rename(r"visual\.attnpool\.c_proj\.(weight|bias)", _VIS + r"attention_pool.out_proj.\1"),
    )


OPENAI_RULES = (
    # text tower
    Rename(r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    Rename(r"positional_embedding", "text_model.embeddings.position_embedding", add_batch_dim),
    *_block_rules(r"transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1."),
    Rename(r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    Rename(r"text_projection", "text_projection.weight", transpose),
    Rename(r"logit_scale", "logit_scale"),
    # extras of the released TorchScript archives (0-d tensors that openai's build_model deletes)
    Drop(r"input_resolution", reason="image size; fixed by the variant's config (image_size)"),
    Drop(r"context_length", reason="text context; fixed by the variant's config (max_position_embeddings)"),
    Drop(r"vocab_size", reason="vocabulary size; fixed by the variant's config (vocab_size)"),
    Drop(r"attn_mask", reason="open_clip's causal-mask buffer; the model builds its causal mask"),
)
# The image tower's rules depend on the variant: ``visual.conv1.weight`` is the ViT's patch embedding or the
# ResNet's first stem convolution (openai's build_model tells them apart by the presence of ``visual.proj``).
OPENAI_VIT_RULES = (
    Rename(r"visual\.conv1\.weight", _VIS + "embeddings.patch_embedding.weight"),
    Rename(r"visual\.class_embedding", _VIS + "embeddings.class_embedding", class_token),
    Rename(r"visual\.positional_embedding", _VIS + "embeddings.position_embedding", add_batch_dim),
    Rename(r"visual\.ln_pre\.(weight|bias)", _VIS + r"pre_layernorm.\1"),
    *_block_rules(r"visual\.transformer\.resblocks\.(\d+)\.", _VIS + r"encoder.layers.\1."),
    Rename(r"visual\.ln_post\.(weight|bias)", _VIS + r"post_layernorm.\1"),
    Rename(r"visual\.proj", "visual_projection.weight", transpose),
)
OPENAI_RESNET_RULES = _resnet_rules()


def image_tower_rules(config) -> tuple:
    """``Source.config_rules`` of the openai / open_clip formats: the ViT or ModifiedResNet tower's rules."""
    return OPENAI_RESNET_RULES if config.vision_config.vision_type == "resnet" else OPENAI_VIT_RULES


# --------------------------------------------------------------------------------------- TorchScript archives
class _ScriptObject:
    """Inert stand-in for a TorchScript module object (``__torch__.*``): pickle's BUILD fills ``__dict__``."""


# legacy storage classes named in the pickle -> their dtype (the class itself is never touched)
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): dict,  # the (always empty) backward-hooks argument of _rebuild_tensor_v2
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds tensors and ``_ScriptObject`` placeholders; refuses every other global (no code runs)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a TorchScript archive")

    def persistent_load(self, saved_id):
        # ("storage", dtype (from find_class), key, location, numel): raw bytes in <prefix>/data/<key>
        kind, dtype, key, _location, _numel = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _collect_tensors(obj, prefix: str, out: dict, seen: set) -> None:
    """Tensors reachable through attributes of the module tree, keyed by their dotted attribute path."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


def is_torchscript_archive(path: Path) -> bool:
    """A TorchScript zip (``torch.jit.save``) holds ``<name>/constants.pkl`` and ``<name>/code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_torchscript_state_dict(path) -> StateDict:
    """Parameters and buffers of a TorchScript archive, without ``torch.jit.load`` (see the module docstring)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        data_pkl = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(data_pkl) != 1:
            raise ValueError(f"{path} is not a TorchScript archive: expected one <name>/data.pkl, found {data_pkl}")
        prefix = data_pkl[0].split("/")[0]
        with archive.open(data_pkl[0]) as file:
            root = _ArchiveUnpickler(file, archive, prefix).load()
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path}: data.pkl does not hold a TorchScript module, got {type(root).__name__}")
    state_dict: StateDict = {}
    _collect_tensors(root, "", state_dict, set())
    return state_dict


def load_openai_checkpoint(path) -> StateDict:
    """An OpenAI release file: a TorchScript archive (read without running it) or a plain state-dict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if is_torchscript_archive(path):
        return as_state_dict(read_torchscript_state_dict(path), path)
    return load_state_dict_file(path)


# -------------------------------------------------------------------------------------------------- transformers
_HF_BLOCK = r"(text|vision)_model\.encoder\.layers\.(\d+)\."

TRANSFORMERS_RULES = (
    Rename(r"text_model\.embeddings\.token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    Rename(
        r"(text|vision)_model\.embeddings\.position_embedding\.weight",
        r"\1_model.embeddings.position_embedding",
        add_batch_dim,
    ),
    Drop(r"(text|vision)_model\.embeddings\.position_ids", reason="arange buffer; positions are implicit"),
    Rename(r"vision_model\.embeddings\.class_embedding", _VIS + "embeddings.class_embedding", class_token),
    Rename(r"vision_model\.embeddings\.patch_embedding\.weight", _VIS + "embeddings.patch_embedding.weight"),
    Rename(r"vision_model\.pre_layrnorm\.(weight|bias)", _VIS + r"pre_layernorm.\1"),  # sic: transformers' typo
    Rename(
        _HF_BLOCK + r"(layer_norm[12]|self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.(weight|bias)",
        r"\1_model.encoder.layers.\2.\3.\4",
    ),
    Rename(r"vision_model\.post_layernorm\.(weight|bias)", _VIS + r"post_layernorm.\1"),
    Rename(r"text_model\.final_layer_norm\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    Rename(r"(text|visual)_projection\.weight", r"\1_projection.weight"),
    Rename(r"logit_scale", "logit_scale"),
)

_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout",
)
_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout",
)


def _read_processor(directory: Path, image_size: int) -> dict:
    """Size / crop / mean / std of the directory's ``preprocessor_config.json``; CLIP's defaults otherwise."""
    processor = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    path = directory / "preprocessor_config.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        processor.update({key: raw[key] for key in processor if key in raw})
    return processor


def read_transformers_variant(directory: Path, state_dict: StateDict) -> dict:
    """The variant row of a transformers CLIP directory, from its ``config.json``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (expected a save_pretrained directory)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "clip":
        raise ValueError(f"{path} has model_type={raw.get('model_type')!r}; the transformers source reads 'clip'")
    import transformers

    hf = transformers.CLIPConfig.from_dict(raw)  # fills the fields a diff-saved config.json leaves out
    text = {name: getattr(hf.text_config, name) for name in _TEXT_FIELDS}
    eos = hf.text_config.eos_token_id
    # transformers' rule: eos_token_id == 2 marks configs from before its PR #24773, which pool at argmax
    if eos == 2:
        text["pooling"] = "argmax"
    else:
        text.update(pooling="eos", eos_token_id=eos)
    vision = {"vision_type": "vit", **{name: getattr(hf.vision_config, name) for name in _VISION_FIELDS}}
    config = {
        "projection_dim": hf.projection_dim,
        "logit_scale_init_value": hf.logit_scale_init_value,
        "text_config": text,
        "vision_config": vision,
    }
    return {"config": config, "processor": _read_processor(Path(directory), vision["image_size"]), "source": str(path)}


def build_clip_processor(kwargs):
    """The converted directory's processor: ``HfVlClipImageProcessor`` + the CLIP BPE tokenizer."""
    from ..processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
    from ..processing.processing_hf_vl_clip import HfVlClipProcessor
    from ..processing.tokenization_hf_vl_clip import load_clip_tokenizer

    return HfVlClipProcessor(image_processor=HfVlClipImageProcessor(**kwargs), tokenizer=load_clip_tokenizer())


OPENAI = Source(
    name="openai",
    description="openai/CLIP release file (TorchScript archive RN50.pt ... ViT-L-14-336px.pt) or its state_dict()",
    load=load_openai_checkpoint,
    rules=OPENAI_RULES,
    config_rules=image_tower_rules,
)
OPEN_CLIP = Source(
    name="open_clip",
    description="state_dict() of an open_clip CLIP model (OpenAI key names; .pt/.pth/.bin/.safetensors)",
    load=load_state_dict_file,
    rules=OPENAI_RULES,
    config_rules=image_tower_rules,
)
TRANSFORMERS = Source(
    name="transformers",
    description="transformers CLIPModel save_pretrained directory",
    load=load_transformers_directory,
    rules=TRANSFORMERS_RULES,
    read_variant=read_transformers_variant,
)

CLIP_CONVERSION = ConversionSpec(
    arch="clip",
    sources=(OPENAI, OPEN_CLIP, TRANSFORMERS),
    model_class=HfVlClipModel,
    build_processor=build_clip_processor,
)

__all__ = [
    "CLIP_CONVERSION",
    "OPENAI_RESNET_RULES",
    "OPENAI_RULES",
    "OPENAI_VIT_RULES",
    "TRANSFORMERS_RULES",
    "load_openai_checkpoint",
    "read_torchscript_state_dict",
    "read_transformers_variant",
]
