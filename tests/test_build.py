"""build.py: the zip's layout, what it leaves out, Blender's own validator, and that the packaged copy runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import textwrap
import zipfile
from pathlib import Path



def blender_ext() -> Path:
    spec = importlib.util.find_spec("bpy")  # locates the package without importing Blender
    assert spec is not None and spec.submodule_search_locations, "bpy is not installed (run scripts/setup.sh)"
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob(
        "*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    assert found, "blender_ext.py not found inside the bpy package"
    return found[-1]


def validate(venv_python: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([venv_python, str(blender_ext()), "validate", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_blender_validator_accepts_the_zip(built_zip, venv_python):
    proc = validate(venv_python, built_zip)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout


def test_blender_validator_catches_a_bad_manifest(built_zip, venv_python, tmp_path):
    """Control for the test above: the same zip with a tagline ending in punctuation must fail."""
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(built_zip) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "blender_manifest.toml":
                data = data.replace(b'heads"', b'heads."')
            dst.writestr(item, data)
    proc = validate(venv_python, bad)
    assert proc.returncode != 0 and "tagline" in proc.stdout + proc.stderr


def test_zip_layout(built_zip, repo_root, venv_python):
    with zipfile.ZipFile(built_zip) as zf:
        names = set(zf.namelist())
        info = json.loads(zf.read("build_info.json"))
    assert built_zip.name == "imhead-0.1.0.zip"
    for required in ("blender_manifest.toml", "__init__.py", "client.py", "build_info.json", "backend/__init__.py",
                     "backend/__main__.py", "backend/wire.py", "backend/payloads.py", "backend/replies.py",
                     "backend/server.py", "backend/commands/serve.py"):
        assert required in names, required
    assert not any(n.startswith(("imhead_blender/", "backend/train/")) or "/train/" in n for n in names)
    assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) for n in names)
    assert not any(n.startswith("tests/") or Path(n).name.startswith("test_") for n in names)
    shipped = {f"weights/{p.name}" for p in (repo_root / "weights").glob("*")
               if p.suffix in (".safetensors", ".sha256") or p.name in ("MODEL_CARD.md", "identity_directions.json")}
    assert {n for n in names if n.startswith("weights/")} == shipped
    addon_dir = repo_root / "imhead_blender"
    addon = {p.relative_to(addon_dir).as_posix() for p in addon_dir.rglob("*.py") if "__pycache__" not in p.parts}
    assert addon <= names, addon - names
    backend = {p.relative_to(repo_root).as_posix() for p in (repo_root / "backend").rglob("*.py")
               if "__pycache__" not in p.parts and "train" not in p.relative_to(repo_root / "backend").parts}
    assert "backend/engine/cell_kernel.py" in backend
    assert backend <= names, f"runtime backend modules missing from the zip: {sorted(backend - names)}"
    assert info["version"] == "0.1.0" and info["python"] == venv_python


def test_python_override_and_bad_python(repo_root, venv_python, tmp_path):
    out = tmp_path / "out"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("")
    ok = subprocess.run([venv_python, "build.py", "--out", str(out), "--python", str(fake)], cwd=repo_root,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    with zipfile.ZipFile(out / "imhead-0.1.0.zip") as zf:
        assert json.loads(zf.read("build_info.json"))["python"] == str(fake)
    bad = subprocess.run([venv_python, "build.py", "--out", str(out), "--python", str(tmp_path / "nope")],
                         cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a file" in bad.stderr


def test_build_is_reproducible(built_zip, repo_root, venv_python, tmp_path):
    subprocess.run([venv_python, "build.py", "--out", str(tmp_path)], cwd=repo_root, check=True,
                   capture_output=True, timeout=300)
    assert (tmp_path / built_zip.name).read_bytes() == built_zip.read_bytes()


def test_packaged_client_talks_to_the_packaged_backend(built_zip, venv_python, tmp_path):
    """Unzip as Blender would (a package folder), import the add-on's client from it — which must use the
    bundled backend/wire.py and backend/payloads.py, without torch — and run the bundled `python -m backend
    serve` with the bundled weights."""
    pkg = tmp_path / "imhead"
    with zipfile.ZipFile(built_zip) as zf:
        zf.extractall(pkg)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from imhead import client
        assert client.wire.__name__ == "imhead.backend.wire", client.wire.__name__
        assert client.payloads.__name__ == "imhead.backend.payloads", client.payloads.__name__
        assert "torch" not in sys.modules  # the shared payload modules are numpy-only
        c = client.BackendClient({venv_python!r}, {str(pkg)!r}, startup_timeout=120)
        c.start()
        params, arrays = c.wait(c.submit("echo", {{"x": 1}}, {{"a": client.np.arange(3)}}), 120)
        assert params == {{"x": 1}} and arrays["a"].tolist() == [0, 1, 2]
        assert c.handshake is not None, c.last_error
        print("MODEL", c.handshake.model_name, c.handshake.trained)
        print("LOG", *c._stderr_tail, sep="\\n")
        c.shutdown()
    """)
    proc = subprocess.run([venv_python, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODEL" in proc.stdout
    assert f"imhead backend 0.1.0 ({pkg / 'backend'})" in proc.stdout  # the unzipped copy ran, not the repo


def test_test_command_fails_when_no_tests_are_collected(repo_root):
    """pytest's exit status 5 (nothing collected) must fail scripts/test.sh, and so CI."""
    proc = subprocess.run(["bash", "scripts/test.sh", "-p", "no:cacheprovider", "-k", "no_test_has_this_name_zz"],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "collected no tests" in proc.stderr
    assert "setup: dependencies already satisfied" in proc.stdout  # set up already: no pip run


def test_ci_runs_exactly_the_readme_test_command(repo_root):
    ci = (repo_root / ".ci" / "run").read_text().splitlines()
    assert ci[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in ci
    commands = [line for line in ci[1:] if line.strip() and not line.startswith("#")]
    assert commands[-1] == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (repo_root / "README.md").read_text()


INSTALL_SCRIPT = """
import sys, bpy
assert bpy.ops.extensions.package_install_files(
    filepath=sys.argv[1], repo="user_default", enable_on_install=False, overwrite=True) == {"FINISHED"}
print("INSTALLED", bpy.utils.user_resource("EXTENSIONS", path="user_default/imhead"))
"""


def test_installed_extension_generates_a_head(built_zip, venv_python, tmp_path):
    """Install the zip with Blender's own installer, then run the backend from the installed extension folder
    (as the add-on does) and generate a head: on the GPU where there is one, else on the CPU."""
    user = tmp_path / "blender_user"
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user))
    for kind in ("CONFIG", "SCRIPTS", "EXTENSIONS", "DATAFILES"):
        (user / kind.lower()).mkdir(parents=True, exist_ok=True)
        env[f"BLENDER_USER_{kind}"] = str(user / kind.lower())
    proc = subprocess.run([venv_python, "-c", INSTALL_SCRIPT, str(built_zip)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    installed = Path(next(line for line in proc.stdout.splitlines() if line.startswith("INSTALLED ")).split(" ", 1)[1])
    assert (installed / "backend" / "engine" / "cell_kernel.py").is_file()
    probe = ("import sys, torch, backend; print('FROM', backend.__file__); "
             "print('CUDA', torch.cuda.is_available())")
    where = subprocess.run([venv_python, "-c", probe], cwd=installed, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert f"FROM {installed / 'backend' / '__init__.py'}" in where.stdout
    device = "cuda" if "CUDA True" in where.stdout else "cpu"
    out = tmp_path / "head.ply"
    gen = subprocess.run([venv_python, "-m", "backend", "generate", "--seed", "1", "--resolution", "64",
                          "--device", device, "-o", str(out)], cwd=installed, capture_output=True, text=True,
                         timeout=600)
    assert gen.returncode == 0, gen.stdout[-2000:] + gen.stderr[-4000:]
    assert out.stat().st_size > 10_000 and "vertices" in gen.stdout
