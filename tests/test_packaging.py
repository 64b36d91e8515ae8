"""The installed (non-editable) package finds its configs; the README's Python example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import reference_pipeline as ref
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_configs_and_installed_package_finds_them(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("naclip-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "naclip/conf/config.yaml",
        "naclip/conf/attention/full.yaml",
        "naclip/conf/experiment/table1.yaml",
        "naclip/classnames/voc21.txt",
        "naclip/figures.py",
    } <= names
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site), "NACLIP_OUTPUT": str(tmp_path / "out")}
    where = subprocess.run(
        [sys.executable, "-c", "import naclip, naclip.config as c; print(naclip.__file__); print(c.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "naclip" / "conf")
    job = subprocess.run(
        [sys.executable, "-m", "naclip.run", "--cfg", "job", "dataset=synthetic", "attention=kk_sim"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert "name: kk_sim" in job.stdout and "layout: synthetic" in job.stdout

    # the fused launcher is a Hydra plugin in the hydra_plugins namespace package, found from the installed wheel
    assert "hydra_plugins/naclip_fused/fused_launcher.py" in names and "hydra_plugins/__init__.py" not in names
    launcher = subprocess.run(
        [sys.executable, "-m", "naclip.run", "--cfg", "hydra", "-p", "hydra.launcher", "hydra/launcher=fused"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert launcher.returncode == 0, launcher.stderr[-2000:]
    assert "_target_: hydra_plugins.naclip_fused.fused_launcher.FusedLauncher" in launcher.stdout
    found = subprocess.run(
        [sys.executable, "-c", "import hydra_plugins.naclip_fused.fused_launcher as m; print(m.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found.startswith(str(site))


def test_readme_python_example_runs(monkeypatch, tmp_path):
    """The README's API example, with random weights instead of the (unavailable here) OpenAI ones."""
    monkeypatch.setenv("NACLIP_CACHE", str(tmp_path))
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'pretrained="openai"' in block
    namespace: dict = {}
    exec(block.replace('pretrained="openai"', "pretrained=None"), namespace)
    labels = namespace["labels"]
    assert labels.shape == (1, 375, 500) and labels.dtype == torch.int64
    # the plain pipeline on the same random model: default slide 224/112, softmax at 40, synonyms maxed
    model, names = namespace["model"], namespace["segmenter"].class_names
    queries, owner = ref.query_names(names)
    rgb, _ = ref.demo_sample()
    expected = ref.predict_labels(
        model, ref.text_embeddings(model, queries), owner, ref.normalize(rgb), (375, 500), slide=(224, 112)
    )
    assert len(expected.unique()) >= 2
    assert (labels[0] == expected).float().mean().item() > 0.999


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- ci:install-and-run -->" in readme and "<!-- ci:test -->" in readme
    assert "readme_command install-and-run" in ci and "readme_command test" in ci
    out = subprocess.run(
        [
            "bash",
            "-c",
            "source <(sed -n '/^readme_command()/,/^}/p' .ci/run); readme_command install-and-run; readme_command test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ['pip install -e ".[dev]" && python -m naclip.run', "pytest -q"]
