"""`hf-vl quickstart` end to end (the README's main job), in its fast mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_vl.cli import build_parser
from hf_vl.quickstart import run_quickstart


@pytest.mark.slow
def test_quickstart_fast(tmp_path, capsys):
    summaries = run_quickstart(tmp_path, fast=True)
    summary = summaries["vit"]
    out = capsys.readouterr().out
    assert "[vit]" in out and "[clip]" in out and "quickstart done" in out
    bundle = Path(summary["bundle"])
    assert (bundle / "config.json").is_file() and (bundle / "model.safetensors").is_file()
    assert any(path.name.startswith("modeling_hf_vl_vit") for path in bundle.glob("*.py"))
    # the bundle reloaded through pipeline() must classify the held-out images as the trained model did
    assert abs(summary["pipeline_heldout_accuracy"] - summary["trainer_heldout_accuracy"]) <= 0.02
    clip = summaries["clip"]
    assert (Path(clip["bundle"]) / "config.json").is_file()
    assert 0.0 <= clip["pipeline_heldout_accuracy"] <= 1.0
    detr = summaries["detr"]
    assert "[detr]" in out and (Path(detr["bundle"]) / "config.json").is_file()
    assert any(path.name.startswith("modeling_hf_vl_detr") for path in Path(detr["bundle"]).glob("*.py"))
    # the stock object-detection pipeline on the reloaded bundle scores as the trained model did in Trainer
    assert abs(detr["pipeline_test_map"] - detr["trainer_test_map"]) <= 0.01
    sam = summaries["sam"]
    assert "[sam]" in out and (Path(sam["bundle"]) / "config.json").is_file()
    assert sam["photo_masks"] > 0 and Path(sam["photo_overlay"]).is_file()


def test_quickstart_cli_arguments():
    args = build_parser().parse_args(["quickstart", "--output", "somewhere", "--fast"])
    assert args.output == "somewhere" and args.fast and args.func.__name__ == "_quickstart"
    assert build_parser().parse_args(["quickstart"]).output == "hf_vl_quickstart"
    assert build_parser().parse_args(["quickstart", "--sam-checkpoint", "sam.pth"]).sam_checkpoint == "sam.pth"
