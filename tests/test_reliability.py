"""Never lose a result or a user's file; one clear line for every failure (real faults, no mocks of them).

Faults used: as root a chmod'ed folder is still writable, so an unwritable folder is a path under a regular file
(NotADirectoryError, raised by the kernel for root too); Ctrl-C is a real SIGINT to a real subprocess; corrupt
files are really truncated or emptied; the decompression bomb is a real 16000x16000 PNG.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composing import compose_config, evaluate_job
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from naclip import Segmenter, config
from naclip.data import build_dataset
from naclip.jobs import JobOutcome, collect, record_failure, record_success, summarize
from naclip.results import ResultWriteError, write_json_atomic
from naclip.text import text_classifier

CONF = Path(config.config_dir())
SMOKE = ["dataset=synthetic", "backbone=b32", "backbone.pretrained=null", "num_workers=0", "dataset.num_images=2"]


pytestmark = pytest.mark.usefixtures("isolated_env")


def cli(module: str, args: list[str], tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NACLIP_OUTPUT": str(tmp_path / "outputs"),
        "NACLIP_CACHE": str(tmp_path / "cache"),
        "NACLIP_DATA": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def voc_folder(
    root: Path, ids: list[str], sizes: dict[str, tuple[int, int]] | None = None, corrupt: tuple[str, ...] = ()
) -> None:
    """A tiny VOC-layout dataset: ids (spaces allowed) with random images and labels."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ids:
        h, w = (sizes or {}).get(name, (40, 56))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8), mode="L").save(
            root / "SegmentationClass" / f"{name}.png"
        )
        if name in corrupt:
            (root / "JPEGImages" / f"{name}.jpg").write_bytes(b"not a jpeg")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("background\ncat\ndog\n")  # 3 classes keep the text tower cheap


def voc_overrides(root: Path) -> list[str]:
    return ["dataset=voc21", f"dataset.root={root}", f"dataset.class_names={root / 'classes.txt'}"]


def voc_cfg(root: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(voc_overrides(root), hydra_config=True).dataset, resolve=True)


# ------------------------------------------------------------------- 1. a failed run deletes nothing of yours
@pytest.mark.slow
@pytest.mark.parametrize("where", ["existing", "cwd"])
def test_failed_run_keeps_user_files_and_its_log(tmp_path, where):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir()
    run_dir = str(folder) if where == "existing" else "."
    proc = cli(
        "naclip.run", ["dataset=ade", "backbone.pretrained=null", f"hydra.run.dir={run_dir}"], tmp_path, cwd=folder
    )
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "NACLIP_DATA" in proc.stderr
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "sub").is_dir()
    assert not (folder / "result.json").exists()
    assert "dataset root" in (folder / "run.log").read_text()  # the log stays and says what went wrong
    assert json.loads((folder / "status.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------- 2. corrupt text cache = miss
@pytest.mark.parametrize("damage", ["truncate", "empty", "text"])
def test_corrupt_text_cache_is_a_miss_and_is_rebuilt(b32, tmp_path, caplog, damage):
    names, templates = ["cat", "dog"], ["a photo of a {}."]
    expected = text_classifier(b32, names, templates)  # no cache at all
    text_classifier(b32, names, templates, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("text-*.pt")
    raw = entry.read_bytes()
    entry.write_bytes({"truncate": raw[: len(raw) // 2], "empty": b"", "text": b"hello"}[damage])

    with caplog.at_level(logging.WARNING, logger="naclip.text"):
        rebuilt = text_classifier(b32, names, templates, cache_dir=tmp_path)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(entry) in warned[0] and "\n" not in warned[0]
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-6)
    reloaded = torch.load(entry, weights_only=True)  # replaced by a whole file
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp file left behind


# ------------------------------------------------------------------- 3. a result is never lost to a bad folder
def test_result_printed_then_kept_in_fallback_when_folder_unwritable(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the job folder's parent should be")
    with pytest.raises(ResultWriteError) as info:
        evaluate_job(SMOKE, blocker / "job")
    message = str(info.value)
    assert "\n" not in message and str(blocker / "job" / "result.json") in message
    (fallback,) = (tmp_path / "tmp").glob("naclip-result-*.json")
    assert str(fallback) in message
    saved = json.loads(fallback.read_text())
    printed = capsys.readouterr().out
    assert f"mIoU {saved['miou']:.2f}" in printed  # shown before the write was tried
    assert saved["num_images"] == 2 and set(saved["per_class_iou"]) == {
        "black background",
        "red circle",
        "green square",
        "blue triangle",
    }


# --------------------------------------------------------------- 4. an image too small for a patch is a sample
def test_image_too_small_after_resize_is_a_named_sample_error(tmp_path):
    root = tmp_path / "voc"
    voc_folder(root, ["good", "thin"], sizes={"thin": (50, 10000)})  # 10000x50 resizes to 2048x10
    dataset = build_dataset(voc_cfg(root), on_error="skip", min_side=16)
    assert dataset[0]["error"] is None and tuple(dataset[0]["image"].shape) == (3, 336, 470)
    error = dataset[1]["error"]
    assert str(root / "JPEGImages" / "thin.jpg") in error and "10x2048" in error and "16-pixel patch" in error

    common = [*voc_overrides(root), "backbone=b16", "backbone.pretrained=null", "num_workers=0"]
    result = evaluate_job([*common, "on_error=skip"], tmp_path / "skip")
    assert result["num_images"] == 1
    assert [s["path"] for s in result["skipped"]] == [str(root / "JPEGImages" / "thin.jpg")]


# ------------------------------------------------------------------------------------- 5. zero images
@pytest.mark.parametrize("value", [0, -1])
def test_max_images_below_one_rejected_before_any_model(tmp_path, monkeypatch, value):
    def no_model(*args, **kwargs):
        raise AssertionError("no model may load for a bad max_images")

    monkeypatch.setattr("naclip.clip.load_clip", no_model)
    with pytest.raises(ValueError, match=f"max_images must be >= 1.*got {value}") as info:
        evaluate_job([*SMOKE, f"max_images={value}"], tmp_path / "job")
    assert "\n" not in str(info.value)


def test_all_samples_skipped_is_one_line_and_log_keeps_the_list(tmp_path, caplog):
    root = tmp_path / "voc"
    voc_folder(root, ["a", "b"], corrupt=("a", "b"))
    overrides = [*voc_overrides(root), "backbone=b32", "backbone.pretrained=null", "num_workers=0", "on_error=skip"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics' "no samples" warning would fail here
        with caplog.at_level(logging.WARNING, logger="naclip"), pytest.raises(ValueError) as info:
            evaluate_job(overrides, tmp_path / "job")
    message = str(info.value)
    assert message.startswith("no images evaluated") and "all 2 samples were skipped" in message
    assert "\n" not in message and "nan" not in message.lower()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(root / "JPEGImages" / "a.jpg") in logged and str(root / "JPEGImages" / "b.jpg") in logged
    assert not (tmp_path / "job" / "result.json").exists()


# ------------------------------------------------------------------------------- 6. one line, not a traceback
@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_no_result(tmp_path):
    env = {
        **os.environ,
        "NACLIP_OUTPUT": str(tmp_path / "outputs"),
        "NACLIP_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        "dataset=synthetic",
        "dataset.num_images=100000",
        "backbone=b32",
        "backbone.pretrained=null",
        "num_workers=0",
        "log_every=1",
        "hydra.run.dir=" + str(tmp_path / "job"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "naclip.run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in proc.stdout:  # wait until the evaluation loop is running
            if "images," in line:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate()
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert error_lines(stderr) == ["naclip.run: interrupted, no result written"], stderr
    assert not (tmp_path / "job" / "result.json").exists()
    assert (tmp_path / "job" / "run.log").is_file()


@pytest.mark.slow
def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    proc = cli("naclip.run", [*SMOKE, f"output_root={blocker}/out"], tmp_path)
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert line.startswith("naclip.run: error: cannot write the output folder") and str(blocker) in line
    assert blocker.read_text() == "not a folder"


def test_long_dataset_root_gives_short_unique_folder_names():
    root = "/data/" + "very_long_folder_name_" * 20
    first = config._dirname(f"dataset.root={root}a,dataset=voc21")
    second = config._dirname(f"dataset.root={root}b,dataset=voc21")
    for name in (first, second):
        assert len(name.encode()) <= 255 and "/" not in name
        assert name.startswith("dataset.root=_data_very_long_folder_name_")  # readable
    assert first != second
    assert config._dirname(f"dataset.root={root}a,dataset=voc21") == first  # deterministic
    assert config._dirname("dataset=voc21") == "dataset=voc21"  # short names unchanged
    wide = config._dirname("é" * 300)  # never cut a character in two
    assert len(wide.encode()) <= 255 and wide.encode().decode() == wide


def test_long_dataset_root_folder_can_be_created(tmp_path):
    cfg = compose_config(["dataset=voc21", "dataset.root=/" + "x" * 400], hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_dir = Path(str(cfg.hydra.run.dir))
    assert len(run_dir.name.encode()) <= 255
    (tmp_path / run_dir.name).mkdir()  # the kernel accepts the name


def _bomb(path: Path) -> None:
    """A real decompression bomb: 16000x16000 pixels (above Pillow's 2x limit), a few kilobytes on disk."""
    Image.new("1", (16000, 16000)).save(path)


# --------------------------------------------------------------------------------------------- 7. predict
def _predict_cfg(*overrides: str):
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "predict",
            overrides=[
                "backbone=b32",
                "backbone.pretrained=null",
                "text_cache_dir=null",
                "short_side=64",
                "slide_crop=0",
                *overrides,
            ],
        )


def test_predict_folder_processes_every_readable_image(tmp_path, monkeypatch, b32, capsys):
    from naclip.predict import PredictError, run

    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png", "e.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / name)
    (images / "b.jpg").write_bytes(b"not a jpeg")
    (images / "d.png").write_bytes((images / "a.png").read_bytes()[:60])  # a real truncated file
    _bomb(images / "f.png")
    out = tmp_path / "out"
    with pytest.raises(PredictError) as info:
        run(_predict_cfg(f"image={images}", "classes=[car,tree]", f"out={out}"))
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    for line, bad in zip(lines, ("b.jpg", "d.png", "f.png"), strict=True):
        assert str(images / bad) in line
    assert sorted(p.name for p in out.iterdir()) == [f"{s}_{k}.png" for s in "ace" for k in ("labels", "overlay")]


@pytest.mark.slow
def test_predict_cli_lists_bad_images_one_line_each(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(images / "a.png")
    (images / "b.jpg").write_bytes(b"not a jpeg")
    _bomb(images / "c.png")
    out = tmp_path / "out"
    proc = cli(
        "naclip.predict",
        [
            f"image={images}",
            "classes=[car,tree]",
            f"out={out}",
            "backbone=b32",
            "backbone.pretrained=null",
            "text_cache_dir=null",
            "short_side=64",
        ],
        tmp_path,
    )
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 2 and all(line.startswith("naclip.predict: error: ") for line in lines), proc.stderr
    assert "b.jpg" in lines[0] and "c.png" in lines[1] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "a_overlay.png"]


@pytest.mark.parametrize("classes", [["car", "car", "tree"], ["car", "tree, Car"], ["car ", "CAR"]])
def test_duplicate_class_names_rejected(classes):
    from naclip.predict import PredictError, resolve_classes

    with pytest.raises(PredictError, match="twice") as info:
        resolve_classes(classes)
    assert "\n" not in str(info.value)
    with pytest.raises(PredictError, match="twice"):
        resolve_classes(["wall", "sky"], background=["wall"])


def test_failed_predict_leaves_no_folder(tmp_path, monkeypatch, b32):
    from naclip.predict import PredictError, run

    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "outputs" / "predict" / "new"
    with pytest.raises(PredictError, match=r"broken\.jpg"):
        run(_predict_cfg(f"image={tmp_path / 'broken.jpg'}", "classes=[car]", f"out={out}"))
    assert not (tmp_path / "outputs").exists()


def test_predict_default_output_folder(tmp_path):
    cfg = _predict_cfg("image=x.png", "classes=[a]")
    assert Path(str(cfg.out)).parent == tmp_path / "outputs" / "predict"


@pytest.mark.slow
def test_predict_cli_failure_creates_nothing(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    work = tmp_path / "work"
    work.mkdir()
    proc = cli(
        "naclip.predict",
        [
            f"image={tmp_path / 'broken.jpg'}",
            "classes=[car]",
            "backbone=b32",
            "backbone.pretrained=null",
            "text_cache_dir=null",
        ],
        tmp_path,
        cwd=work,
    )
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
    assert not (tmp_path / "outputs").exists() and list(work.iterdir()) == []


@pytest.mark.parametrize("post", ["none", "pamr", "area_thd"])
def test_label_map_in_bands_equals_one_shot(b32, post):
    """Independent formulation: upsample every query logit at once, softmax, max over synonyms, threshold."""
    torch.manual_seed(5 if post == "area_thd" else 1)  # seed 5: random weights predict all three classes
    seg = Segmenter(
        b32,
        [["sky", "air"], ["tree"], ["car", "auto", "van"]],
        slide_crop=64,
        slide_stride=32,
        pamr=post == "pamr",
        pamr_steps=2,
        templates=["a photo of a {}."],
    )
    image = torch.randn(3, 64, 96)
    size = (333, 517)
    logits = seg.logits_list([image])[0]
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    probs = (seg.logit_scale * up).softmax(dim=0)
    per_class = torch.stack([probs[[0, 1]].amax(0), probs[2], probs[[3, 4, 5]].amax(0)])
    if post == "area_thd":  # the whole map's areas decide: the smaller foreground class is zeroed everywhere
        areas = torch.bincount(per_class.argmax(0).flatten(), minlength=3).double()
        assert areas[1] > 0 and areas[2] > 0, "both foreground classes must be predicted somewhere"
        seg.area_thd = float(areas[1:].min() / areas[1:].sum())
        per_class[1 + int(areas[1:].argmin())] = 0
    best, expected = per_class.max(dim=0)
    seg.prob_thd = float(best.quantile(0.3))  # a threshold that sends some pixels to class 0
    expected[best < seg.prob_thd] = 0
    if post == "pamr":  # PAMR needs the whole map: label_map must fall back to the one-shot path
        expected = seg.predict_list([image], [size])[0]
    for band_bytes in (1, 4096, 200_000, 2**40):  # one column per band ... all at once
        got = seg.label_map(image, size, band_bytes=band_bytes)
        assert got.dtype == torch.int64 and tuple(got.shape) == size
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(expected.unique()) >= 2


# ------------------------------------------------------------------------------------ 8. text as model.pt
@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b""])
def test_text_file_as_weights_is_not_a_valid_weights_file(tmp_path, content):
    from naclip.clip import load_clip

    fake = tmp_path / "model.pt"
    fake.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid weights file") as info:
        load_clip("ViT-B-32", str(fake))
    assert "weights_only" not in str(info.value) and str(fake) in str(info.value)


# ---------------------------------------------------------------------------------- 9. VOC ids with spaces
def test_voc_id_with_space_is_the_whole_line(tmp_path):
    root = tmp_path / "voc"
    voc_folder(root, ["plain", "my photo 2"], corrupt=("my photo 2",))
    dataset = build_dataset(voc_cfg(root), on_error="skip")
    assert [dataset[i]["name"] for i in range(2)] == ["plain", "my photo 2"]
    assert dataset[1]["path"] == str(root / "JPEGImages" / "my photo 2.jpg")
    assert "my photo 2.jpg" in dataset[1]["error"]


# --------------------------------------------------------------------------------- 10. result.json mode
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_result_json_mode_follows_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "result.json", {"miou": 1.0})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text()) == {"miou": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


# ----------------------------------------------------------------------------------- sweeps (issue 12)
def test_summary_counts_and_exit_code(tmp_path):
    record_success(tmp_path / "a", 41.234)
    record_success(tmp_path / "b", 12.0, skipped=True)
    record_failure(tmp_path / "c", "voc21: dataset root 'x' does not exist;\n set NACLIP_DATA")
    outcomes = collect(tmp_path)
    assert [(o.folder.name, o.status) for o in outcomes] == [("a", "finished"), ("b", "skipped"), ("c", "failed")]
    text, code = summarize(outcomes, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "sweep summary: 1 finished, 1 skipped, 1 failed" and code != 0
    assert "a: mIoU 41.23" in lines[1] and "b: mIoU 12.00" in lines[2]
    assert lines[3].endswith("c: voc21: dataset root 'x' does not exist; set NACLIP_DATA")
    assert summarize([JobOutcome(tmp_path / "a", "finished", "mIoU 1.00")])[1] == 0


@pytest.mark.parametrize(
    ("statuses", "code"),
    [(["finished", "failed"], 1), (["failed"], 1), (["skipped", "skipped"], 0), (["finished", "skipped"], 0)],
    ids=["failed-none-skipped", "only-failed", "all-reused", "finished-and-reused"],
)
def test_sweep_exit_code_is_one_exactly_when_a_job_failed(tmp_path, statuses, code):
    outcomes = [JobOutcome(tmp_path / str(i), status, "detail") for i, status in enumerate(statuses)]
    assert summarize(outcomes, tmp_path)[1] == code


def test_collect_lists_only_the_jobs_of_one_sweep(tmp_path, monkeypatch):
    """A sweep folder reused across sweeps holds older status files: the summary of a sweep counts only its own."""
    monkeypatch.setenv("NACLIP_SWEEP_ID", "old")
    record_failure(tmp_path / "stale", "an older sweep's failure")
    monkeypatch.setenv("NACLIP_SWEEP_ID", "new")
    record_success(tmp_path / "a", 10.0)
    record_success(tmp_path / "b", 20.0, skipped=True)
    monkeypatch.delenv("NACLIP_SWEEP_ID")
    record_success(tmp_path / "plain", 30.0)  # a single run, no sweep
    assert [(o.folder.name, o.status) for o in collect(tmp_path, "new")] == [("a", "finished"), ("b", "skipped")]
    assert [o.folder.name for o in collect(tmp_path, "old")] == ["stale"]
    assert len(collect(tmp_path)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_sweep_goes_on_past_a_failed_job_and_summarizes(tmp_path, launcher):
    args = [
        "-m",
        f"hydra/launcher={launcher}",
        "dataset=ade,synthetic",
        "backbone=b32",
        "backbone.pretrained=null",
        "num_workers=0",
        "dataset.num_images=2",
    ]
    proc = cli("naclip.run", args, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "UncompletedJobError" not in proc.stderr
    sweep = tmp_path / "outputs" / "sweeps" / "default"
    (ade,) = [p for p in sweep.iterdir() if p.name.endswith("dataset=ade")]
    (synthetic,) = [p for p in sweep.iterdir() if p.name.endswith("dataset=synthetic")]
    result = json.loads((synthetic / "result.json").read_text())
    assert not (ade / "result.json").exists()
    assert "dataset root" in json.loads((ade / "status.json").read_text())["error"]
    assert "sweep summary: 1 finished, 0 skipped, 1 failed" in proc.stdout
    assert f"mIoU {result['miou']:.2f}" in proc.stdout
    assert error_lines(proc.stderr)[-1].startswith("naclip.run: error: 1 of 2 jobs failed")
