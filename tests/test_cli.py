"""The command line (`imhead ...` / `python -m backend ...`, backend/__main__.py, backend/commands/): the console
script works from any directory, every option has help that shows its default, and every argument is checked
before any work starts (no model is loaded, no output file is written)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.__main__ import COMMANDS, HelpFormatter, build_parser, main
from backend.engine import cli

ROOT = Path(__file__).resolve().parents[1]
IMHEAD = Path(sys.prefix) / "bin" / "imhead"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    parser, modules = build_parser(COMMANDS, prog="imhead")
    commands = subparsers(parser)
    assert set(commands) == set(COMMANDS) == set(modules)
    formatter = HelpFormatter("imhead")
    missing, no_default = [], []
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(where)
            elif action.option_strings and action.nargs != 0 and not action.required \
                    and "default" not in formatter._get_help_string(action):
                no_default.append(where)
        sub.format_help()  # every %(default)s expands
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"


def test_console_script_runs_from_any_directory(tmp_path):
    assert IMHEAD.is_file(), f"{IMHEAD} is missing: bash scripts/setup.sh installs it"
    out = subprocess.run([str(IMHEAD), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: imhead") and all(name in out.stdout for name in COMMANDS)
    for command in ([str(IMHEAD)], [sys.executable, "-m", "backend"]):
        out = subprocess.run(command + ["regions", "--json"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)) == 39


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading the model."""

    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "make_session", refuse)


def fail(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def head_json(path: Path, **expression: float) -> Path:
    path.write_text(json.dumps({"format": "imhead-head/1", "identity": [0.0] * 256, "expression": expression}))
    return path


def test_missing_weights_directory(tmp_path, capsys, no_model):
    out = tmp_path / "head.ply"
    err = fail(["generate", "-o", str(out), "--weights", str(tmp_path / "nowhere")], capsys)
    assert f"--weights {tmp_path / 'nowhere'}: no such directory" in err
    err = fail(["generate", "-o", str(out), "--weights", str(tmp_path)], capsys)
    assert "no imhead.safetensors" in err
    assert not out.exists()


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, no_model):
    err = fail(["generate", "-o", "/nonexistent/x.ply"], capsys)
    assert "-o /nonexistent/x.ply: folder /nonexistent does not exist" in err
    scan = tmp_path / "scan.obj"
    scan.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    err = fail(["fit", str(scan), "-o", "/nonexistent/x.obj"], capsys)
    assert "-o /nonexistent/x.obj: folder /nonexistent does not exist" in err
    err = fail(["fit", str(scan), "-o", str(tmp_path / "fit.ply"), "--head", str(tmp_path)], capsys)
    assert "is a directory" in err


@pytest.mark.parametrize("argv", [["generate", "-o", "{tmp}/head.xyz"], ["generate", "-o", "{tmp}/head"],
                                  ["swap", "{a}", "{a}", "--regions", "all", "-o", "{tmp}/c.json",
                                   "--mesh", "{tmp}/c.stl"]])
def test_unknown_output_format_is_refused(tmp_path, capsys, no_model, argv):
    a = head_json(tmp_path / "a.json")
    argv = [s.format(tmp=tmp_path, a=a) for s in argv]
    err = fail(argv, capsys)
    assert "the format comes from the extension: .ply, .obj, .glb" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_mesh_where_head_json_is_expected(tmp_path, capsys, no_model):
    from backend.engine.meshio import write_ply

    ply = tmp_path / "head.ply"
    write_ply(ply, np.zeros((3, 3)), np.array([[0, 1, 2]]), {})
    frames = tmp_path / "frames.json"
    frames.write_text('[{"jawOpen": 0.5}]')
    for argv in (["generate", "-o", str(tmp_path / "out.ply"), "--input-head", str(ply)],
                 ["animate", str(ply), str(frames), "-o", str(tmp_path / "frames")],
                 ["swap", str(head_json(tmp_path / "a.json")), str(ply), "--regions", "chin", "-o",
                  str(tmp_path / "c.json")]):
        err = fail(argv, capsys)
        assert "is a PLY mesh: expected head JSON written by `imhead generate --head`" in err, err
    assert not (tmp_path / "out.ply").exists() and not (tmp_path / "frames").exists()


def test_bad_expression_weights_are_refused_before_the_mesh(tmp_path, capsys, no_model):
    out = tmp_path / "out.ply"
    err = fail(["generate", "-o", str(out), "--input-head", str(head_json(tmp_path / "h.json", jawOpen=5.0))],
               capsys)
    assert "expression weight 'jawOpen' must lie in" in err
    err = fail(["generate", "-o", str(out), "--input-head", str(head_json(tmp_path / "h.json", jawOpn=0.5))],
               capsys)
    assert "unknown expression names ['jawOpn']" in err
    frames = tmp_path / "frames.json"
    frames.write_text('[{"jawOpen": 0.5}, {"jawOpen": "wide"}]')
    err = fail(["animate", str(head_json(tmp_path / "h.json")), str(frames), "-o", str(tmp_path / "frames")], capsys)
    assert "frame 1: weight of 'jawOpen' must be a finite number" in err
    assert not out.exists() and not (tmp_path / "frames").exists()


def test_other_arguments_are_checked(tmp_path, capsys, no_model):
    a = head_json(tmp_path / "a.json")
    assert "unknown region names ['nose tipp']" in fail(
        ["swap", str(a), str(a), "--regions", "nose tipp", "-o", str(tmp_path / "c.json")], capsys)
    assert "--blend must lie in [0, 1]" in fail(
        ["swap", str(a), str(a), "--regions", "all", "--blend", "2", "-o", str(tmp_path / "c.json")], capsys)
    assert "scan" in fail(["fit", str(tmp_path / "missing.obj"), "-o", str(tmp_path / "f.ply")], capsys)
    notes = tmp_path / "notes.txt"
    notes.write_text("not footage")
    assert "unsupported file type .txt" in fail(
        ["fit-image", str(notes), "--head", str(tmp_path / "h.json"), "--frames", str(tmp_path / "f.json")], capsys)
    with pytest.raises(SystemExit) as exc:  # argparse's own checks exit 2 as well
        main(["generate", "-o", str(tmp_path / "x.ply"), "--resolution", "8"])
    assert exc.value.code == 2
    assert "resolution must be between 16 and 1024" in capsys.readouterr().err


def test_generate_writes_obj_and_glb(tmp_path, capsys):
    from backend.engine.meshio import read_obj
    from test_engine_meshio import read_glb

    for suffix in ("obj", "glb"):
        assert main(["generate", "--seed", "2", "--resolution", "32", "--device", "cpu",
                     "-o", str(tmp_path / f"head.{suffix}")]) == 0
    obj = read_obj(tmp_path / "head.obj")
    _, attrs, indices = read_glb(tmp_path / "head.glb")
    assert len(obj.vertices) > 500 and set(attrs) == {"POSITION", "NORMAL", "TEXCOORD_0"}
    np.testing.assert_allclose(attrs["POSITION"], obj.vertices, atol=1e-6)
    np.testing.assert_array_equal(indices.reshape(-1, 3), obj.faces)
