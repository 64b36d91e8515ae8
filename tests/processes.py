"""Python processes started by the end-to-end tests, with caches and default outputs kept in the test's folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_python(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """`python <args>` in `root` (e.g. `-m naclip.run ...`); fails the test with its stderr on a non-zero exit."""
    env = {
        **os.environ,
        "NACLIP_CACHE": str(root / "cache"),
        "NACLIP_OUTPUT": str(root / "outputs"),
        "OMP_NUM_THREADS": "1",  # torchrun sets this per rank; the same kernels everywhere keep results bitwise
        "WANDB_MODE": "offline",
        "HF_DATASETS_OFFLINE": "1",
    }
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc
