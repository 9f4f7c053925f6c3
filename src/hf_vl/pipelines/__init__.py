"""Task helpers on top of hf_vl models (the stock transformers pipelines need nothing here): SAM's interactive
predictor and its fast automatic mask generator."""

from .sam_automatic_masks import HfVlSamAutomaticMaskGenerator
from .sam_predictor import HfVlSamPredictor

__all__ = ["HfVlSamAutomaticMaskGenerator", "HfVlSamPredictor"]
