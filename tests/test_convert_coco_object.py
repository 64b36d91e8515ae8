"""scripts/convert_coco_object.py on a tiny generated COCO-Stuff164k annotation folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_coco_object.py"


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_coco_object", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes pickle convert_file by module name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def expected_object_id(train_id: int) -> int:
    """COCO-Stuff trainIds: 0-79 things (-> 1..80), 80-170 stuff (-> background 0), 255 ignore."""
    if train_id == 255:
        return 255
    return train_id + 1 if train_id < 80 else 0


def make_folder(root: Path, count: int = 3) -> dict[str, np.ndarray]:
    folder = root / "annotations" / "val2017"
    folder.mkdir(parents=True)
    values = np.array([*range(171), 255])
    labels = {}
    for i in range(count):
        label = np.random.default_rng(i).choice(values, size=(16 + i, 13)).astype(np.uint8)
        label.flat[: len(values)] = values  # every trainId occurs
        name = f"{i:012d}"
        Image.fromarray(label).save(folder / f"{name}_labelTrainIds.png")
        labels[name] = label
    return labels


def check_outputs(root: Path, labels: dict[str, np.ndarray]) -> None:
    for name, source in labels.items():
        out = np.array(Image.open(root / "annotations" / "val2017" / f"{name}_instanceTrainIds.png"))
        expected = np.vectorize(expected_object_id)(source)
        assert out.dtype == np.uint8 and np.array_equal(out, expected)
        assert set(np.unique(out).tolist()) == {*range(81), 255}


def test_convert_split(tmp_path, convert):
    labels = make_folder(tmp_path)
    written = convert.convert_split(tmp_path, "val2017", workers=1)
    assert len(written) == 3
    check_outputs(tmp_path, labels)


def test_convert_split_with_workers(tmp_path, convert):
    labels = make_folder(tmp_path)
    assert len(convert.convert_split(tmp_path, "val2017", workers=2)) == 3
    check_outputs(tmp_path, labels)


def test_rejects_non_train_ids(tmp_path, convert):
    with pytest.raises(ValueError, match=r"\[200\]"):
        convert.to_object_ids(np.array([[0, 200]], dtype=np.uint8), "x.png")
    with pytest.raises(FileNotFoundError, match="annotations/val2017"):
        convert.convert_split(tmp_path)


def test_cli(tmp_path):
    labels = make_folder(tmp_path, count=2)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--split", "val2017"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 2" in done.stdout
    check_outputs(tmp_path, labels)
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and "nope" in missing.stderr
