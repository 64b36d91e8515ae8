"""A result says what it is: provenance, display names, reuse across runtime-only keys, presets and typos refused."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from composing import compose_config, evaluate_job
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from naclip import config
from naclip.results import caveats, provenance, run_tags

CONF = Path(config.config_dir())
SMOKE = ["dataset=synthetic", "backbone=b32", "backbone.pretrained=null", "num_workers=0", "dataset.num_images=3"]


pytestmark = pytest.mark.usefixtures("isolated_env")


# ------------------------------------------------------------------------------------------ provenance
@pytest.mark.parametrize(
    ("overrides", "images", "skipped", "random_weights", "reasons"),
    [
        ({}, 1449, 0, False, []),
        ({"backbone": {"pretrained": None}}, 1449, 0, True, []),
        ({"max_images": 20}, 1449, 0, False, ["max_images=20 of 1449 images"]),
        ({"max_images": 5000}, 1449, 0, False, []),
        ({"max_images": 1449}, 1449, 0, False, []),
        ({}, 1449, 2, False, ["2 unreadable samples skipped"]),
        ({}, 1000, 0, False, ["split holds 1000 images, the protocol 1449"]),
        ({"dataset": {"expected_images": None}}, 7, 0, False, []),
    ],
    ids=[
        "full",
        "random",
        "max-images",
        "max-images-above-split",
        "max-images-equal-split",
        "skipped",
        "short-split",
        "no-protocol-count",
    ],
)
def test_provenance_facts(overrides, images, skipped, random_weights, reasons):
    cfg = {"backbone": {"pretrained": "openai"}, "max_images": None, "dataset": {"expected_images": 1449}}
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    facts = provenance(cfg, images, skipped)
    assert facts["random_weights"] is random_weights
    assert facts["partial_reasons"] == reasons and facts["partial"] is bool(reasons)
    assert (facts["dataset_images"], facts["num_skipped"]) == (images, skipped)


@pytest.mark.parametrize(
    ("config_part", "skipped", "expected"),
    [
        ({"backbone": {"pretrained": "openai"}, "max_images": None}, [], []),
        ({"backbone": {"pretrained": "openai"}, "max_images": None}, [{"path": "a.jpg", "error": "bad"}], ["partial"]),
        ({"backbone": {"pretrained": "openai"}, "max_images": 20}, [], ["partial"]),
        ({"backbone": {"pretrained": None}, "max_images": None}, [], ["random-weights"]),
    ],
    ids=["full", "skipped-samples", "max-images", "random"],
)
def test_caveats_of_results_written_before_provenance(config_part, skipped, expected):
    """A result.json from before the provenance block is judged from its config and its skipped list."""
    assert caveats({"miou": 1.0, "config": config_part, "skipped": skipped}) == expected


def test_run_tags_name_caveats_and_method_choices():
    result = {
        "choices": {
            "backbone": "b16",
            "attention": "kk_sim",
            "arch": "vanilla",
            "refine": "none",
            "dataset": "voc21",
            "logger": "wandb",
        },
        "provenance": {"random_weights": True, "partial": True},
    }
    assert run_tags(result) == [
        "random-weights",
        "partial",
        "attention:kk_sim",
        "arch:vanilla",
        "backbone:b16",
        "dataset:voc21",
        "refine:none",
    ]
    result["provenance"] = {"random_weights": False, "partial": False}
    assert "random-weights" not in run_tags(result) and "partial" not in run_tags(result)


def test_result_json_records_provenance_and_timings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="naclip")
    result = evaluate_job([*SMOKE, "max_images=2", "dataset.expected_images=3"], tmp_path / "job")
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["provenance"] == {
        "random_weights": True,
        "partial": True,
        "partial_reasons": ["max_images=2 of 3 images"],
        "dataset_images": 3,
        "expected_images": 3,
        "max_images": 2,
        "num_skipped": 0,
    }
    assert saved["num_images"] == 2 == result["num_images"]
    for key in ("seconds_eval", "seconds_model_load", "seconds_text_classifier"):
        assert isinstance(saved[key], float) and saved[key] >= 0, key
    assert "seconds" not in saved  # the old ambiguous key is gone
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loading CLIP ViT-B-32 (random weights") for m in messages)
    assert any(m.startswith("text classifier ready in") for m in messages)
    # log_every=50 but only 2 images: the first progress line comes after the first batch
    assert [m.split(",")[0] for m in messages if " images, " in m] == ["1/2 images"]


def _voc_folder(root: Path, names: list[str], classes: int) -> None:
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, classes, (40, 56), dtype=np.uint8), mode="L").save(
            root / "SegmentationClass" / f"{name}.png"
        )
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")


def test_voc_background_is_reported_as_background_and_short_split_is_partial(tmp_path):
    """The voc21 protocol on a one-image split, with a 3-line class file in the same format (fast on CPU)."""
    root = tmp_path / "voc"
    _voc_folder(root, ["2007_000001"], classes=3)
    names_file = tmp_path / "voc3.txt"
    names_file.write_text("sky, wall, tree\naeroplane\nbicycle\n", encoding="utf-8")
    result = evaluate_job(
        [
            "dataset=voc21",
            f"dataset.root={root}",
            f"dataset.class_names={names_file}",
            "backbone=b32",
            "backbone.pretrained=null",
            "num_workers=0",
        ],
        tmp_path / "job",
    )
    assert list(result["per_class_iou"]) == ["background", "aeroplane", "bicycle"]
    assert result["provenance"]["partial_reasons"] == ["split holds 1 images, the protocol 1449"]


@pytest.mark.parametrize(
    ("dataset", "background"),
    [
        ("voc21", "background"),
        ("pc60", "background"),
        ("coco_object", "background"),
        ("demo", "background"),
        ("voc20", "aeroplane"),
        ("pc59", "aeroplane"),
        ("ade", "wall"),
        ("cityscapes", "road"),
    ],
)
def test_class_zero_display_name_per_dataset(dataset, background):
    from naclip.data import display_names, load_class_names

    cfg = compose_config([f"dataset={dataset}"]).dataset
    names = display_names(load_class_names(cfg.class_names), cfg.background_index)
    assert names[0] == background
    assert names.count("background") == (background == "background")


@pytest.mark.parametrize(
    ("dataset", "count"),
    [
        ("voc21", 1449),
        ("voc20", 1449),
        ("pc60", 5105),
        ("pc59", 5105),
        ("ade", 2000),
        ("cityscapes", 500),
        ("coco_stuff", 5000),
        ("coco_object", 5000),
        ("demo", None),
        ("synthetic", None),
        ("hf", None),
    ],
)
def test_expected_image_counts_are_the_protocols(dataset, count):
    assert compose_config([f"dataset={dataset}"]).dataset.expected_images == count


# ----------------------------------------------------------------------------------- reuse and folders
def test_runtime_keys_reuse_a_finished_result_and_wandb_still_logs_it(tmp_path, capsys):
    from test_run import wandb_offline_records

    out = tmp_path / "job"
    first = evaluate_job(SMOKE, out)
    runtime_only = [
        "num_workers=1",
        "batch_size=2",
        "crop_batch_size=8",
        "log_every=1",
        "backbone.device=cpu",
        "experiment_name=other",
    ]
    again = evaluate_job([*SMOKE, *runtime_only, "logger=wandb"], out)
    assert again["finished_at"] == first["finished_at"]
    assert "skipped" in capsys.readouterr().out
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary, tags = wandb_offline_records(runs[0])
    assert summary["miou"] == pytest.approx(first["miou"])
    assert "random-weights" in tags and "dataset:synthetic" in tags
    changed = evaluate_job([*SMOKE, "max_images=2"], out)  # changes the result: evaluated again
    assert changed["num_images"] == 2 and changed["finished_at"] >= first["finished_at"]


def _finished(folder: Path, overrides: list[str], miou: float) -> None:
    """A finished result.json as a run of `overrides` leaves it (the resolved config is what reuse compares)."""
    cfg = compose_config(overrides)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(
        json.dumps({"miou": miou, "config": OmegaConf.to_container(cfg, resolve=True), "per_class_iou": {}})
    )


def test_defaults_written_out_reuse_the_default_runs_result(tmp_path, capsys, monkeypatch):
    """`refine=none attention=full` names another folder than the default run but computes the same numbers."""
    from naclip import run

    runs = tmp_path / "runs"
    _finished(runs / "default", SMOKE, 41.5)
    _finished(runs / "max_images=2", [*SMOKE, "max_images=2"], 7.0)  # another result config: never reused
    monkeypatch.setattr(run, "load_shard", lambda *args: pytest.fail("a finished result was evaluated again"))
    spelled_out = runs / "attention=full,refine=none"
    result = evaluate_job([*SMOKE, "refine=none", "attention=full", "arch=reduced", "num_workers=1"], spelled_out)
    assert result["miou"] == 41.5
    assert f"skipped (finished result in {runs / 'default'}): mIoU 41.50" in capsys.readouterr().out
    assert not (spelled_out / "result.json").exists()

    def evaluated(*args):
        raise RuntimeError("evaluated")

    monkeypatch.setattr(run, "load_shard", evaluated)
    for overrides in ([*SMOKE, "max_images=3"], [*SMOKE, "force=true"]):  # a new result config; force re-runs
        with pytest.raises(RuntimeError, match="evaluated"):
            evaluate_job(overrides, runs / "new")


def test_folder_name_leaves_out_exactly_the_runtime_keys():
    hydra = compose_config([], hydra_config=True).hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    runtime = set(config.RUNTIME_KEYS) - {"logger"}
    logger_keys = {"logger", *(f"logger.{k}" for k in compose_config([]).logger if k != "name")}
    assert excluded == runtime | logger_keys | {"hydra/launcher"}
    assert not {"experiment", "+experiment", "max_images", "seed", "on_error"} & excluded


def test_result_config_drops_only_runtime_keys():
    resolved = {
        "backbone": {"model": "ViT-B-16", "device": "cuda"},
        "num_workers": 4,
        "logger": {"name": "wandb"},
        "max_images": 3,
        "attention": {"sigma": 5.0},
    }
    assert config.result_config(resolved) == {
        "backbone": {"model": "ViT-B-16"},
        "max_images": 3,
        "attention": {"sigma": 5.0},
    }
    assert resolved["backbone"]["device"] == "cuda"  # the caller's config is left alone


# ------------------------------------------------------------------------------------- refused input
def test_unknown_top_level_key_is_one_line_error():
    with pytest.raises(ValueError, match=r"^unknown config key 'atention'; did you mean 'attention'\?$"):
        config.validate(compose_config(["+atention=full"]))


def test_preset_without_multirun_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "job"
    with pytest.raises(ValueError, match=r"\+experiment=table3 is a sweep; add -m"):
        evaluate_job(["+experiment=table3", *SMOKE], out, mode=RunMode.RUN)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=fused"]], ids=["basic", "fused"])
def test_cli_preset_without_multirun_exits_with_one_line(tmp_path, launcher):
    env = {**os.environ, "NACLIP_OUTPUT": str(tmp_path / "outputs"), "NACLIP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "naclip.run", "+experiment=table3", *launcher],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "naclip.run: error: +experiment=table3 is a sweep; add -m: python -m naclip.run -m +experiment=table3"
    ], proc.stderr
    assert "mIoU" not in proc.stdout
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
