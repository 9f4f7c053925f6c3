"""Processor for hf_vl CLIP: ``HfVlClipImageProcessor`` + ``HfVlClipTokenizer`` behind one call.

``processor(images=..., text=...)`` returns ``pixel_values`` and ``input_ids``/``attention_mask`` padded and
truncated to CLIP's 77-token context like ``open_clip.tokenize``. The zero-shot pipeline uses the two parts
directly (transformers ``ZeroShotImageClassificationPipeline``), which is why the tokenizer itself carries the
fixed-length defaults. Only transformers and single-dot siblings are imported, so the file ships in Hub bundles.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

from .image_processing_hf_vl_clip import HfVlClipImageProcessor  # noqa: F401  (resolved by name on load)
from .image_processing_hf_vl_vit import validate_images
from .tokenization_hf_vl_clip import HfVlClipTokenizer  # noqa: F401


class HfVlClipProcessor(ProcessorMixin):
    r"""Pairs ``HfVlClipImageProcessor`` with ``HfVlClipTokenizer``.

    Args:
        image_processor: an ``HfVlClipImageProcessor`` (or any CLIP-style image processor).
        tokenizer: an ``HfVlClipTokenizer`` (``build_clip_tokenizer()`` / ``load_clip_tokenizer()``).
    """

    # lowest-priority defaults (ProcessorMixin._merge_kwargs step 7): the original always pads to the context
    text_kwargs = {"padding": "max_length", "truncation": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if image_processor is None:
            raise ValueError("image_processor is required (an HfVlClipImageProcessor)")
        if tokenizer is None:
            raise ValueError("tokenizer is required (an HfVlClipTokenizer, e.g. hf_vl's load_clip_tokenizer())")
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            _check_text(text)
        if images is not None:
            validate_images(images)
        return super().__call__(images=images, text=text, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def _check_text(text) -> None:
    if isinstance(text, str):
        return
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if len(text) == 0:
        raise ValueError("text is an empty list; pass at least one string (e.g. one prompt per class label)")
    for item in text:
        if not isinstance(item, str):
            raise TypeError(
                f"text must be a string or a list of strings; found an element of type {type(item).__name__}"
            )


__all__ = ["HfVlClipProcessor"]
