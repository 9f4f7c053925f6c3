"""The accuracy metric shipped inside the package: loads offline through ``evaluate`` and computes correctly."""

from __future__ import annotations

import ast
import os

import evaluate
import numpy as np
import pytest

from hf_vl.data import load_metric, metric_path
from hf_vl.data.metrics import METRICS


def test_metric_computes_accuracy():
    assert os.environ["HF_EVALUATE_OFFLINE"] == "1"
    metric = load_metric("accuracy")
    assert isinstance(metric, evaluate.EvaluationModule)
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    result = metric.compute(predictions=predictions, references=references)
    assert result["accuracy"] == pytest.approx(float(np.mean(predictions == references)))


def test_add_batch_weights_and_counts():
    metric = load_metric("accuracy")
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[2, 2], references=[2, 2])
    assert metric.compute()["accuracy"] == pytest.approx(0.75)
    weighted = metric.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    assert metric.compute(predictions=[1, 0, 1], references=[1, 1, 1], normalize=False)["accuracy"] == 2.0


def test_bad_inputs():
    metric = load_metric("accuracy")
    with pytest.raises(ValueError, match="sample_weight"):
        metric.compute(predictions=[1, 0], references=[1, 1], sample_weight=[1.0])
    with pytest.raises(ValueError, match="name"):
        load_metric("bleu")


def test_metric_files_ship_and_import_one_module_per_line():
    """evaluate reads ``import a, b`` as a package named ``a,`` and refuses to load (ecosystem.md section 5)."""
    for name in METRICS:
        folder = metric_path(name)
        script = folder / f"{folder.name}.py"
        assert script.is_file()
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                assert len(node.names) == 1, ast.unparse(node)



def test_loads_by_path_like_any_local_metric():
    metric = evaluate.load(str(metric_path("accuracy")), keep_in_memory=True)
    assert metric.compute(predictions=[1, 2, 3], references=[1, 2, 0])["accuracy"] == pytest.approx(2 / 3)
