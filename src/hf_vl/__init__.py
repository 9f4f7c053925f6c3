"""hf_vl: landmark vision and vision-language architectures as first-class Hugging Face transformers models.

Importing the package registers every hf_vl config, model, image processor and processor with transformers'
Auto classes (``model_type = "hf_vl_<arch>"``), so ``AutoModel.from_pretrained(dir)`` and ``pipeline(...)`` work.

Importing it also asks PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, unless set or
``HF_VL_MALLOC_TUNING=0``; see :mod:`hf_vl.modeling.hf_vl_cpu_memory`): effective when nothing has allocated CPU
tensors yet in the process.
"""

from .modeling.hf_vl_cpu_memory import request_huge_pages

request_huge_pages()

from .modeling.configuration_hf_vl_vit import VIT_VARIANTS, HfVlVitConfig, vit_variant_config
from .modeling.modeling_hf_vl_vit import HfVlVitForImageClassification, HfVlVitModel, HfVlVitPreTrainedModel
from .processing.image_processing_hf_vl_vit import HfVlVitImageProcessor
from .modeling.configuration_hf_vl_clip import (
    CLIP_VARIANTS,
    HfVlClipConfig,
    HfVlClipTextConfig,
    HfVlClipVisionConfig,
    clip_variant_config,
)
from .modeling.modeling_hf_vl_clip import (
    HfVlClipModel,
    HfVlClipPreTrainedModel,
    HfVlClipTextModel,
    HfVlClipTextModelWithProjection,
    HfVlClipVisionModel,
    HfVlClipVisionModelWithProjection,
)
from .modeling.configuration_hf_vl_detr import DETR_VARIANTS, HfVlDetrConfig, detr_variant_config
from .modeling.modeling_hf_vl_detr import HfVlDetrForObjectDetection, HfVlDetrModel, HfVlDetrPreTrainedModel
from .modeling.modeling_hf_vl_detr_panoptic import HfVlDetrForSegmentation
from .processing.image_processing_hf_vl_detr import HfVlDetrImageProcessor
from .modeling.configuration_hf_vl_sam import (
    SAM_VARIANTS,
    HfVlSamConfig,
    HfVlSamMaskDecoderConfig,
    HfVlSamPromptEncoderConfig,
    HfVlSamVisionConfig,
    sam_variant_config,
)
from .modeling.modeling_hf_vl_sam import HfVlSamModel, HfVlSamOutput, HfVlSamPreTrainedModel
from .processing.image_processing_hf_vl_sam import HfVlSamImageProcessor
from .processing.processing_hf_vl_sam import HfVlSamProcessor
from .registry import ARCHITECTURES, get_architecture, register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "ARCHITECTURES",
    "HfVlVitConfig",
    "HfVlVitForImageClassification",
    "HfVlVitImageProcessor",
    "HfVlVitModel",
    "HfVlVitPreTrainedModel",
    "VIT_VARIANTS",
    "get_architecture",
    "register_all",
    "vit_variant_config",
    "CLIP_VARIANTS",
    "HfVlClipConfig",
    "HfVlClipModel",
    "HfVlClipPreTrainedModel",
    "HfVlClipTextConfig",
    "HfVlClipTextModel",
    "HfVlClipTextModelWithProjection",
    "HfVlClipVisionConfig",
    "HfVlClipVisionModel",
    "HfVlClipVisionModelWithProjection",
    "clip_variant_config",
    "DETR_VARIANTS",
    "HfVlDetrConfig",
    "HfVlDetrForObjectDetection",
    "HfVlDetrForSegmentation",
    "HfVlDetrImageProcessor",
    "HfVlDetrModel",
    "HfVlDetrPreTrainedModel",
    "detr_variant_config",
    "SAM_VARIANTS",
    "HfVlSamConfig",
    "HfVlSamImageProcessor",
    "HfVlSamMaskDecoderConfig",
    "HfVlSamModel",
    "HfVlSamOutput",
    "HfVlSamPreTrainedModel",
    "HfVlSamProcessor",
    "HfVlSamPromptEncoderConfig",
    "HfVlSamVisionConfig",
    "sam_variant_config",
]
