"""Shared fixtures: random-weight CLIP models built once per session (no network, no weights)."""

from __future__ import annotations

import os

import pytest
import torch

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
