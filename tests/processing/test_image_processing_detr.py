"""HfVlDetrImageProcessor: the original's resize / normalisation / padding, COCO annotations to targets,
post-processing back to image coordinates, and the stock ``object-detection`` pipeline (installed and as a
package-free Hub bundle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hf_vl  # noqa: F401  (registers the Auto classes)
from hf_vl import HfVlDetrConfig, HfVlDetrForObjectDetection, HfVlDetrForSegmentation, HfVlDetrImageProcessor
from hf_vl.processing.image_processing_hf_vl_detr import DETR_TRAIN_SHORTEST_EDGES

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def coffee():
    from skimage import data

    return Image.fromarray(data.coffee())  # 600 x 400


def test_defaults_are_the_originals_evaluation_transform(coffee, photo):
    processor = HfVlDetrImageProcessor()
    out = processor([photo, coffee], return_tensors="pt")
    # astronaut 512x512 -> 800x800, coffee 400x600 -> 800x1200, padded to 800x1200 with pixel_mask
    assert tuple(out["pixel_values"].shape) == (2, 3, 800, 1200)
    mask = out["pixel_mask"]
    assert mask[0, :, :800].all() and not mask[0, :, 800:].any() and mask[1].all()
    assert (out["pixel_values"][0, :, :, 800:] == 0).all()
    # normalisation: ImageNet statistics of bilinearly resized pixels
    resized = torch.from_numpy(np.array(coffee.resize((1200, 800), Image.BILINEAR))).permute(2, 0, 1) / 255
    expected = (resized - MEAN[:, None, None]) / STD[:, None, None]
    assert (out["pixel_values"][1] - expected).abs().mean() < 0.02


def test_longest_edge_is_capped():
    out = HfVlDetrImageProcessor()(Image.new("RGB", (1000, 100)), return_tensors="pt")
    height, width = out["pixel_values"].shape[-2:]
    assert width == 1333 and height == 133


def test_any_image_mode_and_clear_errors():
    gray = Image.new("L", (40, 30))
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    out = HfVlDetrImageProcessor(size={"shortest_edge": 60, "longest_edge": 100})([gray, rgba], return_tensors="pt")
    assert out["pixel_values"].shape[:2] == (2, 3)
    with pytest.raises(TypeError, match="images"):
        HfVlDetrImageProcessor()(images=42)


def test_coco_annotations_become_normalised_cxcywh_targets(coffee):
    annotations = {"image_id": 7, "annotations": [
        {"bbox": [60, 40, 120, 80], "category_id": 3, "area": 9600, "iscrowd": 0},
        {"bbox": [300, 200, 30, 100], "category_id": 17, "area": 3000, "iscrowd": 0},
    ]}  # fmt: skip
    out = HfVlDetrImageProcessor()(coffee, annotations=annotations, return_tensors="pt")
    target = out["labels"][0]
    assert target["class_labels"].tolist() == [3, 17]
    # xywh in a 600x400 image -> cx, cy, w, h relative to the image (resizing keeps relative coordinates)
    expected = torch.tensor([[120 / 600, 80 / 400, 120 / 600, 80 / 400], [315 / 600, 250 / 400, 30 / 600, 100 / 400]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["orig_size"].tolist() == [400, 600]


def test_post_process_returns_boxes_in_original_pixels():
    processor = HfVlDetrImageProcessor()
    logits = torch.full((1, 3, 6), -10.0)
    logits[0, 0, 2] = 10.0  # query 0: class 2, confident
    logits[0, 1:, 5] = 10.0  # others: "no object"
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.1], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    outputs = transformers.utils.ModelOutput(logits=logits, pred_boxes=boxes)
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(400, 600)])[0]
    assert result["labels"].tolist() == [2]
    torch.testing.assert_close(result["boxes"], torch.tensor([[240.0, 80.0, 360.0, 120.0]]))


def test_multi_scale_training_resize_and_save_round_trip(tmp_path, coffee):
    processor = HfVlDetrImageProcessor(shortest_edge_choices=DETR_TRAIN_SHORTEST_EDGES[:3])
    shortest = {int(processor(coffee, return_tensors="pt")["pixel_values"].shape[-2]) for _ in range(20)}
    assert shortest <= set(DETR_TRAIN_SHORTEST_EDGES[:3]) and len(shortest) > 1
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "HfVlDetrImageProcessor"
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is HfVlDetrImageProcessor and loaded.shortest_edge_choices == [480, 512, 544]
    with pytest.raises(ValueError, match="shortest_edge_choices"):
        HfVlDetrImageProcessor(shortest_edge_choices=[0])


# ---------------------------------------------------------------------------------------------- pipelines
LABELS = ["N/A", "cup", "saucer", "spoon", "table"]


@pytest.fixture(scope="module")
def tiny_detr_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_detr") / "model"
    torch.manual_seed(0)
    config = HfVlDetrConfig(
        backbone_depth=18, hidden_size=32, num_attention_heads=4, intermediate_size=37,
        encoder_layers=1, decoder_layers=2, num_queries=5, id2label=dict(enumerate(LABELS)),
    )  # fmt: skip
    model = HfVlDetrForObjectDetection(config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # spread scores away from ties
    model.save_pretrained(directory)
    HfVlDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(directory)
    return directory


def test_object_detection_pipeline(tiny_detr_dir, coffee):
    detector = transformers.pipeline("object-detection", model=str(tiny_detr_dir))
    assert type(detector.model) is HfVlDetrForObjectDetection
    results = detector(coffee, threshold=0.0)
    assert len(results) == 5
    for result in results:
        assert result["label"] in LABELS and 0 <= result["score"] <= 1
        box = result["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 600 and 0 <= box["ymin"] <= box["ymax"] <= 400
    # the pipeline's numbers are the processor's post-processing of the model's outputs
    processor = HfVlDetrImageProcessor.from_pretrained(tiny_detr_dir)
    with torch.no_grad():
        outputs = detector.model(**processor(coffee, return_tensors="pt"))
    expected = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(400, 600)])[0]
    assert sorted(r["score"] for r in results) == pytest.approx(sorted(expected["scores"].tolist()), abs=1e-6)


def test_object_detection_pipeline_batches(tiny_detr_dir, coffee):
    """batch_size > 1 (the pipeline splits the model's batched outputs per image): the same detections as one by
    one. With 2 decoder layers this broke while the model returned its per-layer auxiliary outputs at inference."""
    detector = transformers.pipeline("object-detection", model=str(tiny_detr_dir))
    images = [coffee, coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batched = detector(images, threshold=0.0, batch_size=2)
    for image, detections in zip(images, batched):
        single = detector(image, threshold=0.0)
        assert [d["label"] for d in detections] == [d["label"] for d in single]
        assert [d["score"] for d in detections] == pytest.approx([d["score"] for d in single], abs=1e-5)


@pytest.fixture(scope="module")
def tiny_panoptic_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_detr_panoptic") / "model"
    torch.manual_seed(0)
    config = HfVlDetrConfig(
        backbone_depth=18, hidden_size=32, num_attention_heads=8, intermediate_size=37,
        encoder_layers=1, decoder_layers=1, num_queries=5, id2label=dict(enumerate(LABELS)),
    )  # fmt: skip
    model = HfVlDetrForSegmentation(config).eval()
    with torch.no_grad():  # confident, object-class logits and sharp masks, so segments survive post-processing
        model.classifier.weight.normal_(std=1.0)
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 5.0, 5.0, 5.0, -5.0]))
        model.mask_head.output.bias.fill_(2.0)
    model.save_pretrained(directory)
    HfVlDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(directory)
    return directory


def test_image_segmentation_pipeline_panoptic(tiny_panoptic_dir, coffee):
    segmenter = transformers.pipeline("image-segmentation", model=str(tiny_panoptic_dir))
    assert type(segmenter.model) is HfVlDetrForSegmentation
    results = segmenter(coffee, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.0)
    assert results, "no segment survived post-processing"
    for result in results:
        assert result["label"] in LABELS and result["mask"].size == coffee.size
    # the same segments as the processor's post-processing of the model's outputs
    processor = HfVlDetrImageProcessor.from_pretrained(tiny_panoptic_dir)
    with torch.no_grad():
        outputs = segmenter.model(**processor(coffee, return_tensors="pt"))
    expected = processor.post_process_panoptic_segmentation(
        outputs, threshold=0.0, overlap_mask_area_threshold=0.0, target_sizes=[(400, 600)]
    )[0]
    assert len(results) == len(expected["segments_info"])
    assert segmenter(coffee, subtask="instance", threshold=0.0)  # post_process_instance_segmentation


_ISOLATED = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_vl" or name.startswith("hf_vl."):
                raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, Block())
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "hf_vl"))]
    from PIL import Image
    from transformers import pipeline

    image = Image.open(sys.argv[3])
    detector = pipeline("object-detection", model=sys.argv[1], trust_remote_code=True)
    segmenter = pipeline("image-segmentation", model=sys.argv[2], trust_remote_code=True)
    segments = segmenter(image, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.0)
    json.dump({
        "classes": [type(detector.model).__name__, type(segmenter.model).__name__],
        "detections": detector(image, threshold=0.0),
        "segments": [{"label": s["label"], "score": s["score"], "area": sum(1 for p in s["mask"].getdata() if p)}
                     for s in segments],
    }, open(sys.argv[4], "w"))
    """
)


@pytest.mark.slow
def test_pipelines_from_package_free_bundles(tiny_detr_dir, tiny_panoptic_dir, coffee, tmp_path):
    """Both stock pipelines on exported bundles in an interpreter where hf_vl cannot be imported."""
    from hf_vl.export import export_bundle

    bundle = export_bundle(tiny_detr_dir, tmp_path / "bundle")
    panoptic_bundle = export_bundle(tiny_panoptic_dir, tmp_path / "panoptic_bundle")
    coffee.save(tmp_path / "coffee.png")  # lossless: both runs see the same pixels
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    image, result = tmp_path / "coffee.png", tmp_path / "o.json"
    command = [sys.executable, "-I", "-c", _ISOLATED, str(bundle), str(panoptic_bundle), str(image), str(result)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    isolated = json.loads(result.read_text())
    assert isolated["classes"] == ["HfVlDetrForObjectDetection", "HfVlDetrForSegmentation"]
    installed = transformers.pipeline("object-detection", model=str(tiny_detr_dir))(coffee, threshold=0.0)
    assert [r["label"] for r in isolated["detections"]] == [r["label"] for r in installed]
    assert [r["box"] for r in isolated["detections"]] == [r["box"] for r in installed]
    assert [r["score"] for r in isolated["detections"]] == pytest.approx([r["score"] for r in installed], abs=1e-6)
    segmenter = transformers.pipeline("image-segmentation", model=str(tiny_panoptic_dir))
    segments = segmenter(coffee, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.0)
    assert isolated["segments"] and [s["label"] for s in isolated["segments"]] == [s["label"] for s in segments]
    assert [s["area"] for s in isolated["segments"]] == [int(np.count_nonzero(np.array(s["mask"]))) for s in segments]
