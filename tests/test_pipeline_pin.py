"""End-to-end numeric pin: the runner's per-class IoUs equal an independent, plainly written pipeline's.

With a fixed seed and random weights no accuracy can tell a broken pipeline from a working one, but the exact
numbers can: any change to decoding, resizing, normalization, the encoder, the text classifier, the logits,
upsampling, PAMR, softmax, synonyms, threshold or the metric shows up here as a different IoU. The reference
(tests/reference_pipeline.py) uses OpenCV, torch primitives and open_clip's own blocks, never naclip.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import reference_pipeline as ref
import torch
from composing import compose_config, job_config
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from naclip.data.synthetic import make_sample  # the data, not the pipeline: generated scenes

# seed 3 draws random ViT-B/32 weights that predict two of the four synthetic classes with partial overlaps
# (random weights never separate them all), so the IoUs are non-trivial numbers that any change moves
SYNTHETIC = [
    "dataset=synthetic",
    "backbone=b32",
    "backbone.pretrained=null",
    "num_workers=0",
    "seed=3",
    "dataset.num_images=2",
]


def evaluate_in_process(overrides: list[str], out: Path) -> dict[str, Any]:
    """The runner's evaluate on a composed config, as the Hydra app calls it."""
    from naclip.run import evaluate

    cfg = job_config(overrides)
    try:
        return evaluate(cfg, out)
    finally:
        GlobalHydra.instance().clear()


@functools.lru_cache(maxsize=2)
def reference_model(model_name: str, seed: int, queries: tuple[str, ...]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The random model a run with this seed builds, and its query embeddings (80 OpenAI templates)."""
    torch.manual_seed(seed)  # the runner seeds before it builds the random model
    model = open_clip.create_model(model_name, pretrained=None).eval()
    return model, ref.text_embeddings(model, queries)


def reference_ious(cfg: Any, samples: list[tuple[np.ndarray, np.ndarray]], names: list[list[str]]) -> list:
    """Per-class IoU (%) of the plain pipeline for a run config, on (RGB image, label) pairs."""
    queries, owner = ref.query_names(names)
    model, classifier = reference_model(cfg.backbone.model, cfg.seed, tuple(queries))
    data = cfg.dataset
    slide = (data.slide_crop, data.slide_stride) if data.slide_crop > 0 else None
    refine = (cfg.refine.steps, list(cfg.refine.dilations)) if cfg.refine.name == "pamr" else None
    method = {"attention": cfg.attention.name, "arch": cfg.arch.name, "sigma": cfg.attention.sigma}
    preds = []
    for rgb, label in samples:
        x = ref.normalize(ref.resize(rgb, data.short_side, data.max_long_side))
        labels = ref.predict_labels(
            model,
            classifier,
            owner,
            x,
            label.shape,
            slide=slide,
            logit_scale=data.logit_scale,
            prob_thd=data.prob_thd,
            refine=refine,
            **method,
        )
        preds.append(labels.numpy())
    return ref.iou_percent(preds, [label for _, label in samples], len(names), data.ignore_index)


def synthetic_samples(cfg: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    height, width = cfg.dataset.image_size
    return [make_sample(cfg.dataset.seed, i, height, width) for i in range(cfg.dataset.num_images)]


def assert_pinned(
    result: dict[str, Any], expected: list, names: list[list[str]], background: int | None = None
) -> None:
    """Per-class IoUs equal the reference's; classes are reported by their first name, a background class
    (``background``: its index, whose names are prompt words only) as "background"."""
    display = [n[0] for n in names]
    if background is not None:
        display[background] = "background"
    assert list(result["per_class_iou"]) == display
    got = list(result["per_class_iou"].values())
    assert [v is None for v in got] == [v is None for v in expected], (got, expected)
    assert [v for v in got if v is not None] == pytest.approx([v for v in expected if v is not None], abs=1e-6)
    present = [v for v in expected if v is not None]
    assert result["miou"] == pytest.approx(sum(present) / len(present), abs=1e-6)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs and one text cache for the module's runs."""
    return tmp_path_factory.mktemp("pin")


@pytest.mark.parametrize(
    "extra",
    [[], ["refine=pamr"]],
    ids=["slide", "slide-pamr"],
)
def test_synthetic_slide_run_equals_plain_pipeline(work: Path, extra: list[str], monkeypatch) -> None:
    """Sliding windows (64/32 on 96x128 scenes), ViT-B/32, one name per class to keep the text tower short."""
    names = [[n[0]] for n in ref.class_names("synthetic")]
    names_file = work / "synthetic_names.txt"
    names_file.write_text("".join(f"{n[0]}\n" for n in names), encoding="utf-8")
    overrides = [*SYNTHETIC, *extra, f"dataset.class_names={names_file}", f"text_cache_dir={work / 'cache'}"]
    monkeypatch.setenv("NACLIP_OUTPUT", str(work / "outputs"))
    cfg = compose_config(overrides)
    expected = reference_ious(cfg, synthetic_samples(cfg), names)
    assert sum(v is not None and v > 0 for v in expected) >= 2, expected  # several classes predicted: informative
    result = evaluate_in_process(overrides, work / ("pamr" if extra else "slide"))
    assert result["num_images"] == cfg.dataset.num_images
    assert_pinned(result, expected, names)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["refine=pamr"]], ids=["whole", "whole-pamr"])
def test_demo_cli_run_equals_plain_pipeline(work: Path, extra: list[str]) -> None:
    """`python -m naclip.run dataset=demo backbone.pretrained=null` (ViT-B/16, 21 VOC classes, 46 queries)."""
    out = work / ("demo-pamr" if extra else "demo")
    args = ["dataset=demo", "backbone.pretrained=null", *extra, f"text_cache_dir={work / 'cache'}"]
    env = {**os.environ, "NACLIP_OUTPUT": str(work / "outputs"), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "naclip.run", *args, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    cfg = OmegaConf.create(result["config"])
    names = ref.class_names("voc21")
    expected = reference_ious(cfg, [ref.demo_sample()], names)
    # seed 0 labels the whole image background (the threshold wins): a coarse pin, the synthetic ones are finer
    assert sum(v is not None and v > 0 for v in expected) >= 1, expected
    assert_pinned(result, expected, names, background=0)  # VOC21's class 0 lists background stuff words
