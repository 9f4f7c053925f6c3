"""The one table of hf_vl architectures and their registration with transformers' Auto classes.

Each architecture adds one ``Architecture`` row; ``register_all`` (run on ``import hf_vl``) registers configs,
models, image processors and processors under ``model_type = "hf_vl_<arch>"`` and never touches built-in types.
The same table drives the Hub export's ``auto_map`` (``hf_vl.export``) and the registry completeness test.
"""

from __future__ import annotations

import dataclasses

import transformers

from .modeling.configuration_hf_vl_vit import VIT_VARIANTS, HfVlVitConfig
from .modeling.modeling_hf_vl_vit import HfVlVitForImageClassification, HfVlVitModel
from .processing.image_processing_hf_vl_vit import HfVlVitImageProcessor
from .modeling.configuration_hf_vl_clip import (
    CLIP_VARIANTS,
    HfVlClipConfig,
    HfVlClipTextConfig,
    HfVlClipVisionConfig,
)
from .modeling.modeling_hf_vl_clip import HfVlClipModel, HfVlClipTextModel, HfVlClipVisionModel
from .processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
from .processing.processing_hf_vl_clip import HfVlClipProcessor
from .processing.tokenization_hf_vl_clip import HfVlClipTokenizer
from .modeling.configuration_hf_vl_detr import DETR_VARIANTS, HfVlDetrConfig
from .modeling.modeling_hf_vl_detr import HfVlDetrForObjectDetection, HfVlDetrModel
from .modeling.modeling_hf_vl_detr_panoptic import HfVlDetrForSegmentation
from .processing.image_processing_hf_vl_detr import HfVlDetrImageProcessor
from .modeling.configuration_hf_vl_sam import SAM_VARIANTS, HfVlSamConfig
from .modeling.modeling_hf_vl_sam import HfVlSamModel
from .processing.image_processing_hf_vl_sam import HfVlSamImageProcessor
from .processing.processing_hf_vl_sam import HfVlSamProcessor


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One hf_vl architecture.

    models: Auto class name -> model class (``"AutoModel"`` must be present).
    variants: the released-variants table (used by conversion, model cards and recipes).
    """

    name: str
    config_class: type
    models: dict
    image_processor_class: type | None = None
    processor_class: type | None = None
    tokenizer_class: type | None = None
    variants: dict = dataclasses.field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type


ARCHITECTURES: dict[str, Architecture] = {
    "vit": Architecture(
        name="vit",
        config_class=HfVlVitConfig,
        models={
            "AutoModel": HfVlVitModel,
            "AutoModelForImageClassification": HfVlVitForImageClassification,
        },
        image_processor_class=HfVlVitImageProcessor,
        variants=VIT_VARIANTS,
    ),
    "clip": Architecture(
        name="clip",
        config_class=HfVlClipConfig,
        models={
            "AutoModel": HfVlClipModel,
            "AutoModelForZeroShotImageClassification": HfVlClipModel,
        },
        image_processor_class=HfVlClipImageProcessor,
        processor_class=HfVlClipProcessor,
        tokenizer_class=HfVlClipTokenizer,
        variants=CLIP_VARIANTS,
    ),
    # CLIP's towers on their own (HfVlClipTextModel / HfVlClipVisionModel save their sub-config's model_type)
    "clip_text": Architecture(
        name="clip_text",
        config_class=HfVlClipTextConfig,
        models={"AutoModel": HfVlClipTextModel},
        tokenizer_class=HfVlClipTokenizer,
    ),
    "clip_vision": Architecture(
        name="clip_vision",
        config_class=HfVlClipVisionConfig,
        models={"AutoModel": HfVlClipVisionModel},
        image_processor_class=HfVlClipImageProcessor,
    ),
    "detr": Architecture(
        name="detr",
        config_class=HfVlDetrConfig,
        models={
            "AutoModel": HfVlDetrModel,
            "AutoModelForObjectDetection": HfVlDetrForObjectDetection,
            "AutoModelForImageSegmentation": HfVlDetrForSegmentation,
        },
        image_processor_class=HfVlDetrImageProcessor,
        variants=DETR_VARIANTS,
    ),
    "sam": Architecture(
        name="sam",
        config_class=HfVlSamConfig,
        models={"AutoModel": HfVlSamModel, "AutoModelForMaskGeneration": HfVlSamModel},
        image_processor_class=HfVlSamImageProcessor,
        processor_class=HfVlSamProcessor,
        variants=SAM_VARIANTS,
    ),
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _register(arch: Architecture) -> None:
    config_class = arch.config_class
    if not config_class.model_type.startswith("hf_vl_"):
        raise ValueError(f"{config_class.__name__}.model_type must start with 'hf_vl_'")
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_name, model_class in arch.models.items():
        getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
    if arch.image_processor_class is not None:
        transformers.AutoImageProcessor.register(
            config_class, image_processor_classes={"torchvision": arch.image_processor_class}, exist_ok=True
        )
    if arch.tokenizer_class is not None:
        transformers.AutoTokenizer.register(config_class, tokenizer_class=arch.tokenizer_class, exist_ok=True)
    if arch.processor_class is not None:
        transformers.AutoProcessor.register(config_class, arch.processor_class, exist_ok=True)


def register_all() -> None:
    """Register every architecture (idempotent). ``exist_ok`` only re-registers our own ``hf_vl_*`` types."""
    for arch in ARCHITECTURES.values():
        _register(arch)
