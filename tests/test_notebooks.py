"""The notebooks: stored without outputs, and they run headless end to end (random weights, tiny image)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(name: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def _text(notebook: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in _outputs(notebook))


@pytest.mark.parametrize("name", ["demo.ipynb", "ablations.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_demo_notebook_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("NACLIP_PRETRAINED", "none")
    monkeypatch.setenv("NACLIP_MODEL", "ViT-B-32")
    monkeypatch.setenv("NACLIP_IMAGE_SIZE", "96")
    monkeypatch.setenv("NACLIP_DEVICE", "cpu")
    monkeypatch.setenv("NACLIP_CACHE", str(tmp_path / "cache"))
    notebook = _execute("demo.ipynb")
    pictures = [out for out in _outputs(notebook) if "image/png" in out.get("data", {})]
    assert len(pictures) == 2  # CLIP vs NACLIP overlays, attention maps
    assert "'full': (2, 3, 4)" in _text(notebook)  # 96x128 input, ViT-B/32 → 3x4 patch grid


def _result(folder: Path, dataset: str, sigma: float, miou: float) -> None:
    folder.mkdir(parents=True)
    choices = {"backbone": "b16", "attention": "full", "arch": "reduced", "refine": "none", "dataset": dataset}
    payload = {
        "choices": choices,
        "config": {"attention": {"name": "full", "sigma": sigma}},
        "miou": miou,
        "finished_at": "2025-01-01T00:00:00+00:00",
    }
    (folder / "result.json").write_text(json.dumps(payload), encoding="utf-8")


@pytest.mark.slow
def test_ablations_notebook_with_results(monkeypatch, tmp_path):
    _result(tmp_path / "runs" / "a", "voc21", 5.0, 41.5)
    _result(tmp_path / "runs" / "b", "voc21", 3.0, 38.0)
    monkeypatch.setenv("NACLIP_RESULTS", str(tmp_path / "runs"))
    notebook = _execute("ablations.ipynb")
    markdown = "".join(out["data"].get("text/markdown", "") for out in _outputs(notebook) if "data" in out)
    assert "| NACLIP | 41.5 |" in markdown and "| NACLIP (paper) | 58.9 |" in markdown
    assert "voc21 σ=3: 38.0, σ=5: 41.5" in _text(notebook)
    assert any("image/png" in out.get("data", {}) for out in _outputs(notebook))


@pytest.mark.slow
def test_ablations_notebook_without_results(monkeypatch, tmp_path):
    monkeypatch.setenv("NACLIP_RESULTS", str(tmp_path / "nothing_here"))
    notebook = _execute("ablations.ipynb")
    text = _text(notebook)
    assert "no result.json found" in text and "no σ-sweep results to plot" in text
    assert not any("image/png" in out.get("data", {}) for out in _outputs(notebook))
