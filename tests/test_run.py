"""The Hydra runner: every config composes, jobs write/skip/force results, W&B offline, bad input exits cleanly."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import reference_pipeline as ref
import torch
import torch.nn.functional as F
from composing import compose_config, evaluate_job
from omegaconf import OmegaConf
from PIL import Image

from naclip import config
from naclip.data import list_layouts

CONF = Path(config.config_dir())
GROUPS = ["backbone", "attention", "arch", "refine", "dataset", "logger"]
SMOKE = ["dataset=synthetic", "backbone=b32", "backbone.pretrained=null", "num_workers=0", "dataset.num_images=3"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("isolated_cached")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}"])
    config.validate(cfg)
    assert cfg[group].name == option
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_hold_sweeps(experiment):
    cfg = compose_config([f"+experiment={experiment}"], hydra_config=True)
    assert cfg.experiment_name == experiment
    params = cfg.hydra.sweeper.params
    assert params and all(isinstance(v, str) and "," in v for v in params.values())
    for group, values in params.items():
        for value in values.split(","):
            if "." not in group:
                assert value in options(group), (group, value)


def test_expected_options_exist():
    assert options("attention") == ["csa", "full", "kk_sim", "n_only", "qq", "value", "vanilla"]
    assert options("arch") == ["reduced", "vanilla"]
    assert options("backbone") == [
        "b16",
        "b16_datacomp",
        "b16_dfn",
        "b16_laion",
        "b16_metaclip",
        "b32",
        "eva02_b16",
        "l14",
        "l14_laion",
        "siglip2_b16",
        "siglip_b16",
    ]
    assert set(options("dataset")) >= {
        "voc21",
        "voc20",
        "pc60",
        "pc59",
        "coco_object",
        "coco_stuff",
        "cityscapes",
        "ade",
        "demo",
        "synthetic",
    }
    assert set(list_layouts()) >= {"voc", "context", "ade", "cityscapes", "coco_stuff", "coco_object", "hf"}


def test_defaults_are_the_paper_method():
    cfg = compose_config([])
    assert (cfg.backbone.model, cfg.backbone.pretrained) == ("ViT-B-16", "openai")
    assert (cfg.attention.name, cfg.attention.sigma, cfg.arch.name, cfg.refine.name) == ("full", 5.0, "reduced", "none")
    assert cfg.dataset.name == "demo" and cfg.logger.name == "local"


@pytest.mark.parametrize(
    ("dataset", "prob_thd", "slide_crop", "short"),
    [
        ("voc21", 0.1, 0, 336),
        ("voc20", 0.0, 0, 336),
        ("pc60", 0.1, 224, 336),
        ("coco_object", 0.1, 224, 336),
        ("ade", 0.0, 224, 336),
        ("cityscapes", 0.0, 224, 560),
    ],
)
def test_protocol_values(dataset, prob_thd, slide_crop, short):
    cfg = compose_config([f"dataset={dataset}"])
    assert (cfg.dataset.prob_thd, cfg.dataset.slide_crop, cfg.dataset.short_side) == (prob_thd, slide_crop, short)
    assert cfg.dataset.logit_scale == 40.0 and cfg.dataset.ignore_index == 255


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["attention.sigma=abc"], "sigma"),
        (["attention.sigmaa=3"], "sigmaa"),
        (["attention=zz_unknown"], "zz_unknown"),
        (["batch_size=x"], "batch_size"),
    ],
)
def test_schema_fails_early(overrides, match):
    with pytest.raises(Exception, match=match):
        compose_config(overrides)


@pytest.mark.parametrize("override", ["attention.sigma=0", "attention.sigma=-2", "on_error=maybe", "batch_size=0"])
def test_validate_rejects(override):
    with pytest.raises(ValueError):
        config.validate(compose_config([override]))


def test_run_writes_result_then_skips_then_force(tmp_path, capsys):
    out = tmp_path / "job"
    result = evaluate_job(SMOKE, out)
    saved = json.loads((out / "result.json").read_text())
    for key in (
        "miou",
        "per_class_iou",
        "pixel_acc",
        "num_images",
        "seconds_eval",
        "seconds_model_load",
        "seconds_text_classifier",
        "images_per_sec",
        "peak_memory_mb",
        "provenance",
        "choices",
        "overrides",
        "config",
        "versions",
        "git_commit",
        "finished_at",
    ):
        assert key in saved, key
    assert saved["num_images"] == 3
    present = [iou for iou in saved["per_class_iou"].values() if iou is not None]
    assert saved["miou"] == pytest.approx(sum(present) / len(present), abs=1e-9)  # values: test_pipeline_pin.py
    assert saved["choices"]["dataset"] == "synthetic" and saved["choices"]["backbone"] == "b32"
    assert list(saved["per_class_iou"]) == ["black background", "red circle", "green square", "blue triangle"]
    assert saved["config"]["attention"]["sigma"] == 5.0
    assert result["miou"] == saved["miou"]
    assert "mIoU" in capsys.readouterr().out

    again = evaluate_job(SMOKE, out)
    assert again["finished_at"] == saved["finished_at"]
    assert "skipped" in capsys.readouterr().out

    time.sleep(1.1)
    forced = evaluate_job([*SMOKE, "force=true"], out)
    assert forced["finished_at"] != saved["finished_at"]
    assert forced["miou"] == pytest.approx(saved["miou"])


def test_changed_config_is_not_skipped(tmp_path):
    """A finished folder is re-run when any value changes, a plain key (sigma) as well as a group choice."""
    out = tmp_path / "job"

    def stored() -> dict:
        return json.loads((out / "result.json").read_text())

    one = [*SMOKE, "max_images=1"]
    evaluate_job(one, out)
    assert stored()["config"]["attention"] == {"name": "full", "sigma": 5.0}
    second = evaluate_job([*one, "attention.sigma=2"], out)
    assert second["config"]["attention"]["sigma"] == 2.0
    assert stored()["config"]["attention"] == {"name": "full", "sigma": 2.0}
    third = evaluate_job([*one, "attention=kk_sim"], out)
    assert third["config"]["attention"]["name"] == "kk_sim"
    assert stored()["config"]["attention"]["name"] == "kk_sim" and stored()["choices"]["attention"] == "kk_sim"


def test_failed_result_write_keeps_the_previous_result(tmp_path, monkeypatch):
    """A result write that fails halfway (a real EFBIG: the file-size limit is lowered below the result's size for
    the write alone, so the evaluation and pytest's own output are untouched) leaves the finished result.json
    byte for byte and no temporary file beside it; the new result is whole in the fallback file the error names,
    and the same write without the limit replaces result.json."""
    from naclip import results

    out = tmp_path / "job"
    out.mkdir()
    previous = {"miou": 12.5, "per_class_iou": {f"class {i}": 12.5 for i in range(20)}, "config": {}}
    (out / "result.json").write_text(json.dumps(previous, indent=2))
    before = (out / "result.json").read_bytes()
    files = sorted(p.name for p in out.iterdir())
    (tmp_path / "fallback").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "fallback"))  # where the fallback file goes
    limit = 256  # bytes: below both the previous and the new result
    assert len(before) > limit
    write = results.write_json_atomic
    attempts: list[tuple[Path, str]] = []

    def write_under_limit(path: Path, payload: dict) -> Path:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return write(path, payload)
        except OSError as err:
            attempts.append((path, os.strerror(err.errno or 0)))
            raise
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(results, "write_json_atomic", write_under_limit)
    overrides = [*SMOKE, "max_images=1", "force=true"]
    with pytest.raises(results.ResultWriteError, match=r"result\.json") as failed:
        evaluate_job(overrides, out)
    assert attempts == [(out / "result.json", os.strerror(errno.EFBIG))]  # the write itself hit the limit
    assert (out / "result.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == files
    (fallback,) = (tmp_path / "fallback").glob("naclip-result-*.json")
    assert str(fallback) in str(failed.value) and json.loads(fallback.read_text())["num_images"] == 1

    monkeypatch.setattr(results, "write_json_atomic", write)
    result = evaluate_job(overrides, out)
    assert json.loads((out / "result.json").read_text())["finished_at"] == result["finished_at"]
    assert sorted(p.name for p in out.iterdir()) == files


# A 3×4 scene of class probabilities (background, A, B, C) per pixel; argmax areas: bg 3, A 6, B 1, C 2.
WEAK_A, B_TOP = (0.2, 0.31, 0.25, 0.24), (0.05, 0.15, 0.5, 0.3)
BG, A, C = (0.5, 0.2, 0.15, 0.15), (0.2, 0.5, 0.1, 0.2), (0.2, 0.3, 0.0, 0.5)
SCENE = [[BG, BG, A, A], [WEAK_A, A, A, B_TOP], [C, C, BG, A]]


def test_protocol_values_reach_the_runners_segmenter(b32):
    """Each dataset-group protocol value reaches the segmenter the runner builds, each with its own value: the
    slide windows in its logits (against the plain slide formulation), logit_scale, area_thd and prob_thd in its
    labels (against the hand-worked scene)."""
    protocol = {"slide_crop": 64, "slide_stride": 40, "logit_scale": 25.0, "area_thd": 0.15, "prob_thd": 0.32,
                "pad_crops": True}  # fmt: skip
    cfg = compose_config([*SMOKE, *(f"dataset.{key}={value}" for key, value in protocol.items())])
    seg = config.build_segmenter(cfg, [["background"], ["cat"], ["dog"], ["bird"]], cfg.dataset, "cpu", model=b32)[0]
    x = torch.randn(1, 3, 50, 112, generator=torch.Generator().manual_seed(0))  # 50 rows: padded to 64 (B/32)
    want = ref.padded_slide_logits(b32, seg.classifier, x[0], 64, 40, 32)  # full attention, σ 5, reduced: SMOKE's
    torch.testing.assert_close(seg.logits(x)[0], want, atol=1e-5, rtol=1e-4)

    # logits whose softmax at logit_scale 25 is the scene. area_thd 0.15 × 9 foreground pixels = 1.35: B (1 pixel)
    # is suppressed, its pixel falls to C (0.3), below prob_thd 0.32 → background; so does the weak A pixel (0.31).
    # (area_thd 0.32 would also suppress C; logit_scale 40 would lift the weak A pixel to 0.35.)
    probs = torch.tensor(SCENE).permute(2, 0, 1)  # (4, 3, 4)
    seg.logits_list = lambda images: [torch.log(probs.clamp_min(1e-12)) / 25.0]
    labels = seg.predict_list([torch.zeros(3, 3, 4)])[0]
    assert labels.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0], [3, 3, 0, 1]]


def test_refine_pamr_reaches_the_segmenter():
    """refine=pamr with its steps and dilations refines the logits the runner's segmenter predicts from."""
    classes = [["sky"], ["tree", "bush"], ["car"]]

    def build(*overrides: str):
        cfg = compose_config([*SMOKE, *overrides])
        torch.manual_seed(0)  # the same random weights for both
        return config.build_segmenter(cfg, classes, cfg.dataset, "cpu")[0]

    plain = build("refine=none")
    refined = build("refine=pamr", "refine.steps=3", "refine.dilations=[1,2]")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    size = (40, 60)
    logits = F.interpolate(plain.logits(x), size=size, mode="bilinear", align_corners=False)[0]
    guide = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(40.0 * ref.pamr(guide, logits, 3, [1, 2]), dim=0)  # (Q, H, W)
    want = torch.stack([probs[0], probs[1:3].max(dim=0).values, probs[3]])  # synonyms: best of tree, bush
    got = refined.probs(x, size)[0]
    assert (got - plain.probs(x, size)[0]).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def wandb_offline_records(run_dir: Path) -> tuple[dict, list[str]]:
    """Summary and tags W&B stored for a finished offline run, read after its writer process has exited.

    Offline W&B 0.31 writes no files/wandb-summary.json (wandb/wandb#9646), so unless that file exists this reads
    the run's record log with W&B's own record schema (wandb.proto): a 7-byte header, then LevelDB-style chunks
    (crc32 u32, length u16, type u8; 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks.
    """
    import struct

    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # waits for the W&B service, so the record log is complete
    data = next(run_dir.glob("*.wandb")).read_bytes()
    summary: dict = {}
    tags: list[str] = []
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if pos % block + 7 > block:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
            elif record.WhichOneof("record_type") == "run":
                tags = list(record.run.tags)
    documented = run_dir / "files" / "wandb-summary.json"
    if documented.is_file():
        summary = json.loads(documented.read_text())
    return summary, tags


def test_wandb_offline_writes_files(tmp_path):
    out = tmp_path / "job"
    result = evaluate_job([*SMOKE, "logger=wandb", "logger.log_images=2"], out)
    assert (out / "result.json").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary, tags = wandb_offline_records(runs[0])
    assert summary["miou"] == pytest.approx(result["miou"])
    assert summary["iou/red circle"] == pytest.approx(result["per_class_iou"]["red circle"])
    assert summary["provenance"]["random_weights"] is True
    assert {"random-weights", "attention:full", "arch:reduced", "backbone:b32", "dataset:synthetic"} <= set(tags)
    assert len(list(runs[0].rglob("predictions_*.png"))) == 2
    table = json.loads(next(runs[0].rglob("per_class_iou*.table.json")).read_text())
    assert [row[0] for row in table["data"]] == ["black background", "red circle", "green square", "blue triangle"]


def _voc_folder(root: Path, corrupt: bool = False) -> None:
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = ["2007_000001", "2007_000002"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, 21, (40, 56), dtype=np.uint8)
        label[0] = 255
        Image.fromarray(label, mode="L").save(root / "SegmentationClass" / f"{name}.png")
    if corrupt:
        (root / "JPEGImages" / f"{names[1]}.jpg").write_bytes(b"not a jpeg")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")


def test_local_voc_layout_and_on_error_skip(tmp_path):
    root = tmp_path / "voc"
    _voc_folder(root, corrupt=True)
    common = ["dataset=voc21", f"dataset.root={root}", "backbone=b32", "backbone.pretrained=null", "num_workers=0"]
    from naclip.data import DatasetError

    with pytest.raises(DatasetError, match="2007_000002"):
        evaluate_job(common, tmp_path / "a")
    assert not (tmp_path / "a" / "result.json").exists()
    result = evaluate_job([*common, "on_error=skip"], tmp_path / "b")
    assert result["num_images"] == 1
    assert [s["path"] for s in result["skipped"]] == [str(root / "JPEGImages" / "2007_000002.jpg")]
    assert len(result["per_class_iou"]) == 21


def test_batched_images_equal_single(tmp_path):
    one = evaluate_job([*SMOKE, "batch_size=1"], tmp_path / "one")
    three = evaluate_job([*SMOKE, "batch_size=3"], tmp_path / "three")
    assert one["miou"] == pytest.approx(three["miou"], abs=1e-9)
    assert one["per_class_iou"] == pytest.approx(three["per_class_iou"])


def cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "NACLIP_OUTPUT": str(tmp_path / "outputs"),
        "NACLIP_CACHE": str(tmp_path / "cache"),
        "NACLIP_DATA": str(tmp_path / "data"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "naclip.run", *args], capture_output=True, text=True, env=environ, check=False
    )


@pytest.mark.slow
def test_cli_smoke_run_and_tables(tmp_path):
    proc = cli(SMOKE, tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = list((tmp_path / "outputs").rglob("result.json"))
    assert len(results) == 1
    assert "mIoU" in proc.stdout
    tables = subprocess.run(
        [
            sys.executable,
            "-m",
            "naclip.tables",
            "--source",
            "local",
            str(tmp_path / "outputs"),
            "--out",
            str(tmp_path / "tables"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert tables.returncode == 0, tables.stderr
    assert (tmp_path / "tables" / "table1.csv").is_file()


@pytest.mark.slow
def test_cli_sigma_sweep_with_multirun(tmp_path):
    proc = cli(["-m", *SMOKE, "attention.sigma=2,6"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = sorted((tmp_path / "outputs" / "sweeps").rglob("result.json"))
    sigmas = sorted(json.loads(p.read_text())["config"]["attention"]["sigma"] for p in results)
    assert sigmas == [2.0, 6.0]
    # the README's next line: random weights reach the σ plot only with --include-partial
    tables = [sys.executable, "-m", "naclip.tables", "--source", "local", str(tmp_path / "outputs"), "--out"]
    plain = subprocess.run([*tables, str(tmp_path / "plain")], capture_output=True, text=True, check=False)
    assert plain.returncode == 0 and "left out 2 of 2 results (2 with random weights)" in plain.stderr
    assert not (tmp_path / "plain" / "sigma_sweep.png").exists()
    marked = subprocess.run(
        [*tables, str(tmp_path / "marked"), "--include-partial"], capture_output=True, text=True, check=False
    )
    assert marked.returncode == 0, marked.stderr
    assert (tmp_path / "marked" / "sigma_sweep.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "match"),
    [
        (["dataset=ade", "backbone.pretrained=null"], {}, "NACLIP_DATA"),
        (
            ["dataset=synthetic"],
            {"HF_ENDPOINT": "https://unreachable.invalid", "HF_HOME": "/nonexistent-hf"},
            "backbone.pretrained",
        ),
        (["dataset=synthetic", "backbone.pretrained=null", "attention.sigma=-1"], {}, "sigma"),
    ],
    ids=["missing-root", "weights-offline", "bad-sigma"],
)
def test_cli_bad_input_one_line_nothing_written(tmp_path, args, env, match):
    proc = cli(args, tmp_path, **env)  # failing fast offline is checked by its mechanism below, not by a clock
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and lines[0].startswith("naclip.run: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    written = {p.name for p in (tmp_path / "outputs").rglob("*") if p.is_file()}
    assert written <= {"run.log", "status.json", "config.yaml", "hydra.yaml", "overrides.yaml"}  # no result


def test_offline_weights_fail_after_one_connection_attempt(monkeypatch):
    """Fail fast offline: one refused connection to the weights host ends the load, no retries, no download."""
    import socket

    from naclip import clip

    attempts: list[object] = []

    def refuse(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(clip, "_cached_hf_file", lambda hf_hub: None)  # as on a machine without cached weights
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(clip.WeightsUnavailableError, match=r"backbone\.pretrained=null"):
        clip.load_clip("ViT-B-32", "openai")
    assert len(attempts) == 1


@pytest.mark.slow
def test_cli_unknown_option_lists_choices(tmp_path):
    proc = cli(["attention=zz_unknown"], tmp_path)
    assert proc.returncode != 0
    assert "full" in proc.stderr and "kk_sim" in proc.stderr
