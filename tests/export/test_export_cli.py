"""``hf-vl export`` on the command line (``hf_vl.cli.main``)."""

from __future__ import annotations

import json

from hf_vl.cli import main


def test_cli_export_writes_bundle(tiny_vit_dir, tmp_path, capsys):
    output = tmp_path / "bundle"
    assert main(["export", str(tiny_vit_dir), "--output", str(output)]) == 0
    assert f"Hub bundle written to {output}" in capsys.readouterr().out
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_hf_vl_vit.HfVlVitModel"
    assert (output / "modeling_hf_vl_vit.py").is_file() and (output / "README.md").is_file()


def test_cli_export_errors_exit_2(tiny_vit_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "hf-vl export: error: model_dir" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(tiny_vit_dir), "--output", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
