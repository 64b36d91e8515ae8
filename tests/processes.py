"""Python processes started by the end-to-end tests, with caches and default outputs kept in the test's folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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


def readme_blocks(marker: str) -> dict[str, str]:
    """The README's code blocks that follow a `<!-- marker:name -->` line, by name, as a user would copy them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(rf"<!-- {re.escape(marker)}:(\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))


def run_readme_example(blocks: dict[str, str], root: Path) -> dict[str, Any]:
    """Writes the README's files (every block but `run`) into `root`, runs its `run` command there as it stands
    and returns the one job's result.json: the example works from a fresh folder without touching naclip."""
    files = dict(blocks)
    argv = shlex.split(files.pop("run").replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "naclip.run"], argv
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body)
    run_python(argv[1:], root)
    (result_file,) = (root / "outputs").rglob("result.json")
    return json.loads(result_file.read_text())


# A two-image sweep job on random weights; prob_thd near the median best-class probability of random weights, so σ,
# attention and PAMR change the labels.
SWEEP_SMOKE = [
    "dataset=synthetic",
    "backbone=b32",
    "backbone.pretrained=null",
    "num_workers=0",
    "dataset.num_images=2",
    "dataset.prob_thd=0.215",
]
# result.json keys that differ between two runs of the same job: clocks and memory.
TIMING = {
    "seconds_eval",
    "seconds_model_load",
    "seconds_text_classifier",
    "images_per_sec",
    "peak_memory_mb",
    "finished_at",
}


def sweep_cli(args: list[str], out: Path, cache: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """`python -m naclip.run -m <args>` with outputs under `out` and the text cache in `cache`; any exit code."""
    env = {**os.environ, "NACLIP_OUTPUT": str(out), "NACLIP_CACHE": str(cache), "WANDB_MODE": "offline", **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "naclip.run", "-m", *args], capture_output=True, text=True, env=env, check=False
    )


def sweep_results(out: Path) -> dict[str, dict]:
    """The result.json of each job of the sweeps under `out`, by job folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "sweeps").rglob("result.json")}


def comparable(result: dict) -> dict:
    """A result without its timing fields and output root (each launcher wrote under its own root)."""
    out = {k: v for k, v in result.items() if k not in TIMING}
    out["config"] = {k: v for k, v in result["config"].items() if k != "output_root"}
    return out
