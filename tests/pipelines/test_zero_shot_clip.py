"""The stock ``zero-shot-image-classification`` pipeline on a tiny random hf_vl CLIP saved with its processor."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer, pipeline

import hf_vl
from hf_vl.processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
from hf_vl.processing.processing_hf_vl_clip import HfVlClipProcessor
from hf_vl.processing.tokenization_hf_vl_clip import HfVlClipTokenizer, load_clip_tokenizer

LABELS = ["astronaut", "cup of coffee", "cat", "rocket", "red circle"]
TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def tiny_clip_config(**overrides) -> hf_vl.HfVlClipConfig:
    """Tiny towers, the real 49,408-token vocabulary and 77-token context (the real tokenizer feeds it)."""
    return hf_vl.HfVlClipConfig(
        projection_dim=16,
        text_config=dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(TINY_TOWER, image_size=32, patch_size=4),
        **overrides,
    )


def tiny_clip_processor() -> HfVlClipProcessor:
    image_processor = HfVlClipImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return HfVlClipProcessor(image_processor, load_clip_tokenizer())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero_shot_clip") / "model"
    torch.manual_seed(0)
    model = hf_vl.HfVlClipModel(tiny_clip_config()).eval()
    model.save_pretrained(directory)
    tiny_clip_processor().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee()),
            Image.fromarray(skimage.data.chelsea()).convert("L")]


@pytest.fixture(scope="module")
def by_hand(clip_dir):
    """The saved model and processor, loaded directly (no pipeline, no Auto classes)."""
    model = hf_vl.HfVlClipModel.from_pretrained(clip_dir).eval()
    processor = HfVlClipProcessor(HfVlClipImageProcessor.from_pretrained(clip_dir),
                                  HfVlClipTokenizer.from_pretrained(clip_dir))
    return model, processor


def expected_scores(by_hand, image, labels, template="This is a photo of {}."):
    """Softmax over the model's logits_per_image, computed by hand with the processor."""
    model, processor = by_hand
    inputs = processor(images=image, text=[template.format(label) for label in labels], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # (1, n_labels)
    return dict(zip(labels, logits.softmax(dim=-1)[0].tolist()))


def as_dict(result):
    return {entry["label"]: entry["score"] for entry in result}


@pytest.fixture(scope="module")
def classifier(clip_dir):
    return pipeline("zero-shot-image-classification", model=str(clip_dir))


def test_pipeline_loads_hf_vl_components(classifier):
    assert type(classifier.model).__name__ == "HfVlClipModel"
    assert isinstance(classifier.tokenizer, HfVlClipTokenizer)
    assert isinstance(classifier.image_processor, HfVlClipImageProcessor)


def test_single_image_scores_equal_softmax_of_logits(classifier, by_hand, images):
    result = classifier(images[0], candidate_labels=LABELS)
    assert [entry["label"] for entry in result] == sorted(LABELS, key=lambda label: -as_dict(result)[label])
    expected = expected_scores(by_hand, images[0], LABELS)
    got = as_dict(result)
    assert got.keys() == expected.keys()
    for label in LABELS:
        assert got[label] == pytest.approx(expected[label], abs=1e-6)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(got.values()) - min(got.values()) > 1e-4  # the random model is not uniform: the check is real


def test_batched_images_equal_single_calls(classifier, by_hand, images):
    batched = classifier(images, candidate_labels=LABELS, batch_size=2)
    assert len(batched) == len(images)
    for image, result in zip(images, batched):
        expected = expected_scores(by_hand, image, LABELS)
        for label, score in as_dict(result).items():
            assert score == pytest.approx(expected[label], abs=1e-6)


def test_custom_hypothesis_template(classifier, by_hand, images):
    template = "a blurry photo of a {}, seen from far away"
    result = as_dict(classifier(images[1], candidate_labels=LABELS, hypothesis_template=template))
    expected = expected_scores(by_hand, images[1], LABELS, template)
    for label in LABELS:
        assert result[label] == pytest.approx(expected[label], abs=1e-6)
    default = as_dict(classifier(images[1], candidate_labels=LABELS))
    assert any(abs(default[label] - result[label]) > 1e-6 for label in LABELS)  # the template reached the model


def test_long_labels_are_truncated_to_the_context(classifier, by_hand, images):
    labels = ["cat", "an extremely long description of a scene " * 20]
    result = as_dict(classifier(images[2], candidate_labels=labels))
    expected = expected_scores(by_hand, images[2], labels)
    for label in labels:
        assert result[label] == pytest.approx(expected[label], abs=1e-6)


def test_empty_label_list_raises(classifier, images):
    with pytest.raises(ValueError, match="empty list"):
        classifier(images[0], candidate_labels=[])


def test_auto_classes_reload(clip_dir):
    assert type(AutoModel.from_pretrained(clip_dir)).__name__ == "HfVlClipModel"
    assert isinstance(AutoTokenizer.from_pretrained(clip_dir), HfVlClipTokenizer)
    processor = AutoProcessor.from_pretrained(clip_dir)
    assert isinstance(processor, HfVlClipProcessor)
    assert processor(text="a cat", return_tensors="pt")["input_ids"].shape == (1, 77)


ISOLATED_SCRIPT = '''
import importlib.abc, json, os, sys


class BlockHfVl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_vl" or name.startswith("hf_vl."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


sys.meta_path.insert(0, BlockHfVl())
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "hf_vl"))]
try:
    import hf_vl  # noqa: F401
    sys.exit("isolation failed: hf_vl was importable")
except ImportError:
    pass
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

bundle, inputs, out = sys.argv[1:4]
spec = json.load(open(os.path.join(inputs, "spec.json")))
images = [Image.open(os.path.join(inputs, name)) for name in spec["images"]]
classifier = pipeline("zero-shot-image-classification", model=bundle, trust_remote_code=True)
results = classifier(images, candidate_labels=spec["labels"], hypothesis_template=spec["template"])
processor = AutoProcessor.from_pretrained(bundle, trust_remote_code=True)
model = AutoModel.from_pretrained(bundle, trust_remote_code=True).eval()
encoded = processor(images=images, text=spec["texts"], return_tensors="pt")
with torch.no_grad():
    logits = model(**encoded).logits_per_image
json.dump({
    "pipeline": results,
    "input_ids": encoded["input_ids"].tolist(),
    "logits_per_image": logits.tolist(),
    "classes": [type(x).__name__
                for x in (classifier.model, classifier.tokenizer, classifier.image_processor, processor)],
    "modules": [type(x).__module__ for x in (classifier.model, classifier.tokenizer, processor)],
}, open(os.path.join(out, "results.json"), "w"))
'''


@pytest.mark.slow
def test_exported_bundle_runs_without_hf_vl(clip_dir, by_hand, images, tmp_path):
    """hf_vl.export bundle -> a fresh interpreter without hf_vl: pipeline, AutoProcessor and AutoModel agree with
    the in-package model (remote code from the bundle, ecosystem.md section 1.3)."""
    import json
    import os
    import subprocess
    import sys

    from hf_vl.export import export_bundle

    bundle = export_bundle(clip_dir, tmp_path / "bundle")
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    names = []
    for index, image in enumerate(images):
        names.append(f"image_{index}.png")
        image.save(inputs / names[-1])
    texts = ["a photo of an astronaut", "“Coffee” &amp; cake!", "a cat " * 40]
    template = "a photo of a {}."
    spec = {"images": names, "labels": LABELS, "template": template, "texts": texts}
    (inputs / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "isolated.py").write_text(ISOLATED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, "-I", str(tmp_path / "isolated.py"), str(bundle), str(inputs), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())

    assert results["classes"] == ["HfVlClipModel", "HfVlClipTokenizer", "HfVlClipImageProcessor", "HfVlClipProcessor"]
    assert all(module.startswith("transformers_modules.") for module in results["modules"])
    model, processor = by_hand
    reloaded = [Image.open(inputs / name) for name in names]
    encoded = processor(images=reloaded, text=texts, return_tensors="pt")
    assert results["input_ids"] == encoded["input_ids"].tolist()
    with torch.no_grad():
        logits = model(**encoded).logits_per_image
    torch.testing.assert_close(torch.tensor(results["logits_per_image"]), logits, atol=1e-5, rtol=1e-5)
    for image, got in zip(reloaded, results["pipeline"]):
        expected = expected_scores(by_hand, image, LABELS, template)
        for label, score in as_dict(got).items():
            assert score == pytest.approx(expected[label], abs=1e-6)
