"""Configuration and released variants of DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers",
https://arxiv.org/abs/2005.12872; original code facebookresearch/detr at 29901c5).

Defaults reproduce ``detr-r50`` as the original trains and runs it: torchvision ResNet-50 with frozen batch norm,
a 6+6-layer post-norm transformer of width 256 (8 heads, FFN 2048, ReLU, dropout 0.1 everywhere the original has
``nn.Dropout`` or ``nn.MultiheadAttention(dropout=0.1)``), 100 queries, 91 COCO class ids (+ "no object"),
auxiliary decoding losses, and the matcher / loss weights of the paper. ``DETR_VARIANTS`` lists the released
checkpoints (``hubconf.py``).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

# COCO 2017 category ids 0..90 (ids without a category, and 0, are "N/A"), as in the original's 91 classes.
COCO_DETECTION_LABELS = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
_BACKBONES = (18, 34, 50, 101, 152)


class HfVlDetrConfig(PreTrainedConfig):
    r"""
    Args:
        backbone_depth: torchvision ResNet depth (50 or 101 released; 18, 34 and 152 build too, as in the original).
        backbone_dilation: dilate the last ResNet stage (DC5 models: stride 16 instead of 32).
        num_channels: input image channels.
        hidden_size: transformer width (``d_model``, 256).
        num_attention_heads: heads of every attention layer.
        encoder_layers, decoder_layers: transformer depth (6 and 6).
        intermediate_size: FFN width of encoder and decoder layers (2048).
        hidden_act: FFN activation (``relu``).
        dropout: dropout on every residual branch; activation_dropout: inside the FFN; attention_dropout: on
            attention probabilities. All 0.1 in the original; ignored in ``eval()``.
        layer_norm_eps: LayerNorm epsilon (PyTorch's default 1e-5, as the original).
        num_queries: number of object queries (detection slots).
        position_embedding_temperature: temperature of the sine position encoding (10000).
        auxiliary_loss: apply the loss to every decoder layer's output (the original's ``aux_loss``); the model
            then also returns ``auxiliary_outputs`` when given ``labels``.
        class_cost, bbox_cost, giou_cost: Hungarian matching costs (1, 5, 2).
        eos_coefficient: cross-entropy weight of the "no object" class (0.1).
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient: loss weights (1, 5, 2).
        mask_loss_coefficient, dice_loss_coefficient: panoptic mask loss weights (1, 1).
        init_std: std of the normal init of the prediction heads; init_xavier_std: gain of the transformer's
            Xavier-uniform init (the original's ``_reset_parameters``).

    ``num_labels`` counts class ids (91 for COCO detection, 250 for the panoptic models): the classifier has
    ``num_labels + 1`` outputs, the last one meaning "no object".
    """

    model_type = "hf_vl_detr"
    attribute_map = {"num_hidden_layers": "encoder_layers"}

    def __init__(
        self,
        backbone_depth: int = 50,
        backbone_dilation: bool = False,
        num_channels: int = 3,
        hidden_size: int = 256,
        num_attention_heads: int = 8,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        intermediate_size: int = 2048,
        hidden_act: str = "relu",
        dropout: float = 0.1,
        activation_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        num_queries: int = 100,
        position_embedding_temperature: float = 10000.0,
        auxiliary_loss: bool = True,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        eos_coefficient: float = 0.1,
        class_loss_coefficient: float = 1.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        mask_loss_coefficient: float = 1.0,
        dice_loss_coefficient: float = 1.0,
        init_std: float = 0.02,
        init_xavier_std: float = 1.0,
        **kwargs,
    ):
        if backbone_depth not in _BACKBONES:
            raise ValueError(f"backbone_depth={backbone_depth} is not supported; expected one of {_BACKBONES}")
        if backbone_dilation and backbone_depth < 50:
            raise ValueError("backbone_dilation (DC5) needs a bottleneck ResNet (backbone_depth 50, 101 or 152)")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
            )
        if hidden_size % 2 != 0:
            raise ValueError(f"hidden_size={hidden_size} must be even (half x, half y sine position features)")
        if num_queries < 1 or encoder_layers < 0 or decoder_layers < 1:
            raise ValueError(
                f"need num_queries >= 1, encoder_layers >= 0, decoder_layers >= 1; got {num_queries}, "
                f"{encoder_layers}, {decoder_layers}"
            )
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("class_cost, bbox_cost and giou_cost can't all be 0")
        self.backbone_depth = backbone_depth
        self.backbone_dilation = backbone_dilation
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.num_queries = num_queries
        self.position_embedding_temperature = position_embedding_temperature
        self.auxiliary_loss = auxiliary_loss
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.eos_coefficient = eos_coefficient
        self.class_loss_coefficient = class_loss_coefficient
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.mask_loss_coefficient = mask_loss_coefficient
        self.dice_loss_coefficient = dice_loss_coefficient
        self.init_std = init_std
        self.init_xavier_std = init_xavier_std
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(COCO_DETECTION_LABELS))
        super().__init__(**kwargs)


_COCO_RELEASE = "https://dl.fbaipublicfiles.com/detr/"
# The original's evaluation preprocessing (datasets/coco.py ``make_coco_transforms("val")``): resize the shortest
# side to 800 (longest at most 1333), ImageNet mean/std.
_PROCESSOR = dict(
    size={"shortest_edge": 800, "longest_edge": 1333},
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
)


def _variant(depth: int, dc5: bool, panoptic: bool, filename: str, box_ap: float, pq: float | None = None) -> dict:
    config = dict(backbone_depth=depth, backbone_dilation=dc5)
    processor = dict(_PROCESSOR)
    if panoptic:
        config["num_labels"] = 250  # "large enough to hold max_obj_id + 1" (models/detr.py ``build``)
        config["architectures"] = ["HfVlDetrForSegmentation"]  # conversion builds the mask head too
        processor["format"] = "coco_panoptic"
    return {
        "config": config,
        "processor": processor,
        "panoptic": panoptic,
        "source": _COCO_RELEASE + filename,
        "coco_box_ap": box_ap,
        "coco_pq": pq,
    }


# Released checkpoints (README model zoo, hubconf.py): the one table used by conversion, model cards and recipes.
# ``config`` holds HfVlDetrConfig kwargs, ``processor`` HfVlDetrImageProcessor kwargs.
DETR_VARIANTS: dict[str, dict] = {
    "detr-r50": _variant(50, False, False, "detr-r50-e632da11.pth", 42.0),
    "detr-r50-dc5": _variant(50, True, False, "detr-r50-dc5-f0fb7ef5.pth", 43.3),
    "detr-r101": _variant(101, False, False, "detr-r101-2c7b67e5.pth", 43.5),
    "detr-r101-dc5": _variant(101, True, False, "detr-r101-dc5-a2e86def.pth", 44.9),
    "detr-r50-panoptic": _variant(50, False, True, "detr-r50-panoptic-00ce5173.pth", 38.8, 43.4),
    "detr-r50-dc5-panoptic": _variant(50, True, True, "detr-r50-dc5-panoptic-da08f1b1.pth", 40.2, 44.6),
    "detr-r101-panoptic": _variant(101, False, True, "detr-r101-panoptic-40021d53.pth", 40.1, 45.1),
}


def detr_variant_config(name: str, **overrides) -> HfVlDetrConfig:
    """Build the config of a released variant; ``overrides`` win."""
    if name not in DETR_VARIANTS:
        raise ValueError(f"unknown DETR variant {name!r}; expected one of {sorted(DETR_VARIANTS)}")
    return HfVlDetrConfig(**{**DETR_VARIANTS[name]["config"], **overrides})


__all__ = ["COCO_DETECTION_LABELS", "DETR_VARIANTS", "HfVlDetrConfig", "detr_variant_config"]
