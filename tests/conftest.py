"""Shared fixtures: random-weight CLIP models built once per session (no network, no weights)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _model(name: str) -> torch.nn.Module:
    from naclip import load_clip

    torch.manual_seed(0)
    return load_clip(name, pretrained=None)


@pytest.fixture(scope="session")
def b16() -> torch.nn.Module:
    return _model("ViT-B-16")


@pytest.fixture(scope="session")
def b32() -> torch.nn.Module:
    return _model("ViT-B-32")


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Outputs, text cache and data under tmp_path, W&B offline; Hydra's global state cleared afterwards."""
    monkeypatch.setenv("NACLIP_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("NACLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NACLIP_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One text-classifier cache per test module, shared by its tests and the runs they start: each class list
    goes through the text tower once per module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def isolated_cached(isolated_env, monkeypatch, cache):
    """`isolated_env` with the module's shared text cache."""
    monkeypatch.setenv("NACLIP_CACHE", str(cache))
