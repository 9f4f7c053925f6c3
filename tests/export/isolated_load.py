"""Loads an exported bundle in an interpreter where ``hf_vl`` cannot be imported; run as a script by the tests.

Usage: python -I isolated_load.py BUNDLE INPUTS OUT
  INPUTS holds image_*.png and pixel_values.safetensors (the original processor's output for the images), plus
  texts.json when the bundle has a processor (processor_config.json);
  OUT receives outputs.safetensors (tensors) and results.json (pipeline outputs, class names, checks).

Nothing here imports hf_vl (the blocker below would make that fail); the tests compare OUT with the original model.
"""

import importlib.abc
import json
import os
import sys
from pathlib import Path


class _BlockHfVl(importlib.abc.MetaPathFinder):
    """Refuses ``hf_vl`` before the editable install's path entry or finder can supply it."""

    def find_spec(self, name, path=None, target=None):
        if name == "hf_vl" or name.startswith("hf_vl."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: package-free load test)", name=name)
        return None


def _isolate() -> dict:
    sys.meta_path.insert(0, _BlockHfVl())
    # drop the editable install's src/ entry too, so not even a namespace lookup can reach the sources
    sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry or ".", "hf_vl"))]
    try:
        import hf_vl  # noqa: F401
    except ImportError as error:
        return {"hf_vl_import_error": repr(error)}
    return {"hf_vl_import_error": None}


def main(bundle: str, inputs: str, out: str) -> None:
    results = _isolate()
    if results["hf_vl_import_error"] is None:
        sys.exit("isolation failed: hf_vl was importable")
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        pipeline,
    )

    images = [Image.open(path) for path in sorted(Path(inputs).glob("image_*.png"))]
    pixel_values = load_file(os.path.join(inputs, "pixel_values.safetensors"))["pixel_values"]
    config = AutoConfig.from_pretrained(bundle, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(bundle, trust_remote_code=True)
    classifier = AutoModelForImageClassification.from_pretrained(bundle, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(bundle, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = classifier(pixel_values=pixel_values).logits
        base_outputs = base(pixel_values=pixel_values)
    tensors = {
        "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
        "logits": logits,
        "last_hidden_state": base_outputs.last_hidden_state,
        "pooler_output": base_outputs.pooler_output,
    }
    classify = pipeline("image-classification", model=bundle, trust_remote_code=True)
    extract = pipeline("image-feature-extraction", model=bundle, trust_remote_code=True)
    results.update(
        classes={
            "config": type(config).__name__,
            "image_processor": type(processor).__name__,
            "classifier": type(classifier).__name__,
            "base": type(base).__name__,
            "pipeline_model": type(classify.model).__name__,
            "feature_pipeline_model": type(extract.model).__name__,
        },
        modules={"classifier": type(classifier).__module__, "base": type(base).__module__},
        classification=classify(images, top_k=config.num_labels),
        features=extract(images),
        pooled_features=extract(images, pool=True),
        hf_vl_modules=sorted(name for name in sys.modules if name == "hf_vl" or name.startswith("hf_vl.")),
    )
    if os.path.exists(os.path.join(bundle, "processor_config.json")):
        _check_processor(bundle, inputs, images, tensors, results)
    save_file({key: value.contiguous() for key, value in tensors.items()}, os.path.join(out, "outputs.safetensors"))
    with open(os.path.join(out, "results.json"), "w") as file:
        json.dump(results, file)


def _check_processor(bundle: str, inputs: str, images: list, tensors: dict, results: dict) -> None:
    """AutoProcessor / AutoTokenizer of a bundle that ships a processor (image processor + tokenizer)."""
    from transformers import AutoProcessor, AutoTokenizer

    with open(os.path.join(inputs, "texts.json")) as file:
        texts = json.load(file)
    processor = AutoProcessor.from_pretrained(bundle, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(bundle, trust_remote_code=True)
    encoded = processor(images=images, text=texts, padding=True, return_tensors="pt")
    tensors.update(processor_pixel_values=encoded["pixel_values"], input_ids=encoded["input_ids"])
    results["classes"].update(
        processor=type(processor).__name__,
        processor_image_processor=type(processor.image_processor).__name__,
        tokenizer=type(tokenizer).__name__,
    )
    results["modules"]["processor"] = type(processor).__module__


if __name__ == "__main__":
    main(*sys.argv[1:4])
