"""backend/__main__.py: what `python -m backend` sets up before any command imports torch."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRINT = "import os, backend.__main__; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '<unset>'))"


def _alloc_conf(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", PRINT], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_expandable_cuda_segments_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    assert _alloc_conf(env) == ("expandable_segments:True" if sys.platform.startswith("linux") else "<unset>")
    assert _alloc_conf(env | {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}) == "max_split_size_mb:64"
