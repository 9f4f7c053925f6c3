"""COCO box mAP as a local ``evaluate`` metric, computed by pycocotools' ``COCOeval`` (the official COCO scorer).

Shipped inside hf_vl because Hub metrics need the network; load it with
``hf_vl.training.metrics.coco_map_metric()`` (or ``evaluate.load(<this folder>)``). evaluate parses this file's
top-level imports to find its requirements, so keep one import per line; pycocotools is imported inside a ``try``
(evaluate does not see it) so that loading works without it and computing fails with a clear message.

Boxes are absolute pixel ``[x0, y0, x1, y1]`` by default, what ``post_process_object_detection`` returns;
``box_format="xywh"`` takes COCO ``[x, y, w, h]``. Each image is one example; image ids are the example positions.
"""

import contextlib
import io

import datasets
import evaluate
import numpy as np

try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError:  # reported when computing, not when loading
    COCO = None
    COCOeval = None

_DESCRIPTION = "COCO box mean average precision (AP over IoU 0.50:0.95, 101-point interpolation) via pycocotools."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of dict): one per image: ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) int.
    references (list of dict): one per image: ``boxes`` (M, 4), ``labels`` (M,) int.
    box_format (str): ``"xyxy"`` (default, absolute corners) or ``"xywh"`` (COCO), for both inputs.
Returns:
    map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100, mar_small, mar_medium,
    mar_large (float): COCOeval's 12 summary numbers; -1 where COCO leaves a number undefined (no ground truth in
    that area range). ``map`` is 0 when there are no predictions at all. Needs at least one ground-truth box.
Example:
    >>> metric = hf_vl.training.metrics.coco_map_metric()
    >>> metric.compute(
    ...     predictions=[{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [1]}],
    ...     references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}],
    ... )["map"]  # 1.0 up to float rounding
    0.9999999999999998
"""

_CITATION = """\
@inproceedings{lin2014coco,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and others},
  booktitle={ECCV},
  year={2014}
}
"""

STAT_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip
BOX_FORMATS = ("xyxy", "xywh")
_BOX = datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4))


def _xywh(boxes, box_format: str) -> np.ndarray:
    # (N, 4) in box_format -> (N, 4) COCO [x, y, w, h]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if box_format == "xyxy":
        boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    if (boxes[:, 2:] < 0).any():
        raise ValueError(f"boxes have negative width or height; are they really box_format={box_format!r}?")
    return boxes


def _check_lengths(example: dict, keys: tuple, index: int, name: str) -> None:
    lengths = {key: len(example[key]) for key in keys}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name}[{index}] has {lengths}: every key needs one entry per box")


def _ground_truth(references, box_format: str) -> dict:
    """COCO-format ground-truth dict: one image per reference, iscrowd 0, area = box area."""
    images, annotations, categories = [], [], set()
    for image_id, reference in enumerate(references):
        _check_lengths(reference, ("boxes", "labels"), image_id, "references")
        images.append({"id": image_id})
        for box, label in zip(_xywh(reference["boxes"], box_format), reference["labels"]):
            categories.add(int(label))
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO ids start at 1 (id 0 is dropped by COCOeval matching)
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": annotations, "categories": [{"id": c} for c in sorted(categories)]}


def _detections(predictions, box_format: str) -> list[dict]:
    detections = []
    for image_id, prediction in enumerate(predictions):
        _check_lengths(prediction, ("boxes", "scores", "labels"), image_id, "predictions")
        boxes = _xywh(prediction["boxes"], box_format)
        for box, score, label in zip(boxes, prediction["scores"], prediction["labels"]):
            detections.append(
                {"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
            )
    return detections


def coco_summary(ground_truth: dict, detections: list[dict]) -> dict:
    """Run COCOeval (bbox) quietly; returns the 12 summary numbers by ``STAT_NAMES``."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


class HfVlCocoMap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": _BOX,
                        "scores": datasets.Sequence(datasets.Value("float64")),
                        "labels": datasets.Sequence(datasets.Value("int64")),
                    },
                    "references": {"boxes": _BOX, "labels": datasets.Sequence(datasets.Value("int64"))},
                }
            ),
            reference_urls=["https://github.com/cocodataset/cocoapi"],
        )

    def _compute(self, predictions, references, box_format="xyxy"):
        if COCO is None:
            raise ImportError("the COCO mAP metric needs pycocotools: pip install pycocotools")
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format={box_format!r} is not supported; expected one of {BOX_FORMATS}")
        ground_truth = _ground_truth(references, box_format)
        if not ground_truth["annotations"]:
            raise ValueError("references hold no boxes; COCO mAP is undefined without ground truth")
        detections = _detections(predictions, box_format)
        if not detections:
            # loadRes rejects an empty list; nothing detected means zero precision and recall
            return {name: 0.0 for name in STAT_NAMES}
        return coco_summary(ground_truth, detections)
