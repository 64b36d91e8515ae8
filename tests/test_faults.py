"""Faults found by fault injection (issue 18): each case ends with one clear line, never a user's file lost or a
wrong number reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from naclip import config


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One text-classifier cache for the module: each class list goes through the text tower once."""
    return tmp_path_factory.mktemp("cache")


def _predict_cfg(cache: Path, *overrides: str):
    config.register()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        return compose(
            "predict",
            overrides=[
                "backbone=b32",
                "backbone.pretrained=null",
                f"text_cache_dir={cache}",
                "short_side=64",
                "slide_crop=0",
                "classes=[sky, tree]",
                *overrides,
            ],
        )


def _image(path: Path, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------ 1: predict keeps user files
def test_predict_never_overwrites_a_user_file(tmp_path, monkeypatch, b32, cache):
    from naclip.predict import PredictError, run

    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    _image(tmp_path / "cat.jpg")
    _image(tmp_path / "cat_overlay.png", seed=1)  # the user's own file, named like cat.jpg's overlay
    before = (tmp_path / "cat_overlay.png").read_bytes()
    with pytest.raises(PredictError, match=r"cat_overlay\.png' already exists and was not written by naclip\.predict"):
        run(_predict_cfg(cache, f"image={tmp_path}"), tmp_path)
    assert (tmp_path / "cat_overlay.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg", "cat_overlay.png"]  # nothing written


def test_predict_rerun_into_the_input_folder_skips_its_own_outputs(tmp_path, monkeypatch, b32, cache):
    from naclip.predict import run

    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    _image(tmp_path / "dog.png")
    first = run(_predict_cfg(cache, f"image={tmp_path}"), tmp_path)
    assert sorted(p.name for p in first) == ["dog_labels.png", "dog_overlay.png"]
    # its own outputs are neither inputs nor in the way
    second = run(_predict_cfg(cache, f"image={tmp_path}"), tmp_path)
    assert second == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.png", "dog_labels.png", "dog_overlay.png"]
