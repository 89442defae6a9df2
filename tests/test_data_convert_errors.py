"""The converter CLI fails with a clear message (exit 2) on bad sources, writing nothing."""

from __future__ import annotations


def test_converter_rejects_bad_sources(tmp_path, capsys):
    from backend.data.ict import main

    assert main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "vertex_indices.json").write_text('{"expressions": ["a"]}')
    assert main(["--source", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "expected 53 expressions" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
