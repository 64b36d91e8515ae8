"""Faults found by fault injection (issue 18): each case ends with one clear line, never a user's file lost or a
wrong number reported."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from composing import compose_config
from hydra import compose, initialize_config_dir
from PIL import Image

from naclip import config


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


# ------------------------------------------------------------------- 3, 6: tables take only the paper's setting
def paper_result(overrides: list[str], miou: float, finished_at: str = "2026-01-01T00:00:00+00:00") -> dict:
    """A result.json dict as a run of these overrides writes it: resolved config, Hydra choices, a full split."""
    from omegaconf import OmegaConf

    cfg = compose_config(["dataset=voc21", *overrides], hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    resolved = OmegaConf.to_container(cfg, resolve=False)
    del resolved["hydra"]
    resolved = OmegaConf.to_container(OmegaConf.create(resolved), resolve=True)
    return {
        "miou": miou,
        "choices": choices,
        "config": resolved,
        "finished_at": finished_at,
        "provenance": {"random_weights": False, "partial": False, "partial_reasons": []},
    }


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("backbone.model=ViT-B-32", "backbone.model='ViT-B-32'"),
        ("backbone.pretrained=laion2b_s34b_b88k", "backbone.pretrained='laion2b_s34b_b88k'"),
        ("dataset.logit_scale=100", "dataset.logit_scale=100.0"),
        ("method=sclip attention=full arch=reduced", "method=sclip but attention=full arch=reduced"),
    ],
)
def test_a_paper_cell_takes_only_the_papers_setting(override, why):
    from naclip.tables import build_tables, setting_note

    paper = paper_result([], 58.0)
    other = paper_result(override.split(), 70.0, finished_at="2026-06-01T00:00:00+00:00")  # newer
    assert other["choices"]["backbone"] == "b16" and other["choices"]["dataset"] == "voc21"
    table1 = build_tables([paper, other])["table1"]
    assert table1.value("NACLIP", "V21") == 58.0
    assert build_tables([other])["table1"].value("NACLIP", "V21") is None
    note = setting_note([paper, other])
    assert note.startswith("left out 1 results not run in the paper's setting") and why in note
    assert setting_note([paper]) is None


def test_a_nan_miou_never_fills_a_cell():
    from naclip.tables import build_tables

    nan = paper_result([], float("nan"), finished_at="2026-06-01T00:00:00+00:00")
    assert build_tables([paper_result([], 58.0), nan])["table1"].value("NACLIP", "V21") == 58.0


def test_sclip_under_its_own_protocol_still_fills_its_methods_row():
    from naclip.tables import methods_table, setting_note

    sclip = paper_result(["method=sclip"], 59.0)
    assert methods_table([sclip]).value("SCLIP [fp32]", "V21") == 59.0
    assert setting_note([sclip]) is None


@pytest.mark.parametrize(
    "damage",
    [
        {"miou": float("nan")},
        {"miou": None},
        {"config": "x"},
        {"choices": {"dataset": ["voc21"]}},
        {"config": {"attention": {"name": "full", "sigma": "abc"}}},
    ],
    ids=["nan", "null", "string-config", "list-choice", "string-sigma"],
)
def test_tables_skip_a_broken_result_with_a_warning(tmp_path, capsys, damage):
    import json

    from naclip.tables import main

    good = paper_result([], 58.0)
    for i, result in enumerate([good, {**good, **damage, "finished_at": "2026-06-01T00:00:00+00:00"}]):
        (tmp_path / "results" / str(i)).mkdir(parents=True)
        (tmp_path / "results" / str(i) / "result.json").write_text(json.dumps(result))
    assert main(["--source", "local", str(tmp_path / "results"), "--out", str(tmp_path / "tables")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("naclip.tables: warning: skipping") == 1
    assert "| NACLIP | 58.0 |" in captured.out


# --------------------------------------------------- 2, 4, 7, 11, 16: plug-ins and fused sweeps, one line per job
SMOKE = ["dataset=synthetic", "backbone=b32", "backbone.pretrained=null", "num_workers=0", "dataset.num_images=2"]


@pytest.fixture
def plugin_attentions():
    """Plug-in attentions that go wrong: NaN output, an exception, the wrong shape (unregistered afterwards)."""
    import torch

    from naclip.attention import ATTENTIONS, register_attention

    def boom(q, k, v, prior):
        raise RuntimeError("plug-in bug")

    register_attention("i18_nan", lambda q, k, v, prior: v * float("nan"), uses_sigma=False)
    register_attention("i18_inf", lambda q, k, v, prior: v.clone().fill_(float("inf")), uses_sigma=False)
    register_attention("i18_boom", boom, uses_sigma=False)
    register_attention("i18_shape", lambda q, k, v, prior: torch.cat([v, v], dim=-1), uses_sigma=False)
    yield
    for name in ("i18_nan", "i18_inf", "i18_boom", "i18_shape"):
        ATTENTIONS.pop(name, None)


@pytest.fixture
def run_env(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("NACLIP_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("NACLIP_CACHE", str(cache))
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def _task_cfg(overrides: list[str]):
    """(task config, its config with the hydra node), HydraConfig set as naclip.run's job sees it."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    full = compose_config(overrides, hydra_config=True)
    HydraConfig.instance().set_config(full)
    cfg = copy.deepcopy(full)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, full


@pytest.mark.parametrize("name", ["i18_nan", "i18_inf"])
def test_non_finite_logits_stop_the_job_naming_the_attention(tmp_path, run_env, plugin_attentions, name):
    from naclip.run import NonFiniteLogitsError, evaluate

    cfg, _ = _task_cfg([*SMOKE, f"attention.name={name}"])
    with pytest.raises(NonFiniteLogitsError, match=rf"attention '{name}' produced non-finite logits"):
        evaluate(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "result.json").exists()


def test_non_finite_logits_of_a_registered_method_name_the_method(tmp_path, run_env, monkeypatch):
    from naclip import methods
    from naclip.methods import Method
    from naclip.run import NonFiniteLogitsError, evaluate

    class NaNMethod(Method):
        def features(self, state):
            feats = self.encoder.head(state.x, state.grid)
            return feats * float("nan")

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    methods.register_method("i18_nan_method", NaNMethod)
    cfg, _ = _task_cfg(SMOKE)
    cfg.method = "i18_nan_method"
    with pytest.raises(NonFiniteLogitsError, match=r"method 'i18_nan_method' produced non-finite logits"):
        evaluate(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "result.json").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("i18_boom", r"attention 'i18_boom' raised RuntimeError: plug-in bug"),
        ("i18_shape", r"attention 'i18_shape' returned shape \(\d+, 12, \d+, 128\); expected \(\d+, 12, \d+, 64\)"),
    ],
)
def test_a_failing_plugin_attention_is_a_one_line_error(tmp_path, run_env, plugin_attentions, name, message):
    from naclip.run import KNOWN_ERRORS, evaluate

    cfg, _ = _task_cfg([*SMOKE, f"attention.name={name}"])
    with pytest.raises(KNOWN_ERRORS, match=message):
        evaluate(cfg, tmp_path / "job")


def test_a_shared_pass_failing_in_one_head_is_not_blamed_on_the_others(run_env, plugin_attentions):
    from naclip.sweep import HeadError, evaluate_group

    cfgs = [_task_cfg([*SMOKE, "attention=full"])[0], _task_cfg([*SMOKE, "attention.name=i18_nan"])[0]]
    with pytest.raises(HeadError, match="i18_nan"):  # the launcher then runs each job alone
        evaluate_group(cfgs)


@pytest.mark.parametrize("bug", ["raise SyntaxErr or", "undefined_name + 1"], ids=["syntax", "name"])
def test_a_plugin_module_that_fails_at_import_is_one_line(tmp_path, monkeypatch, bug):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"i18_plugin_{len(bug)}.py").write_text(f"x = 1\n{bug}\n")
    with pytest.raises(
        ValueError, match=rf"plugins: importing 'i18_plugin_{len(bug)}' failed \((SyntaxError|NameError)"
    ):
        config.load_plugins([f"i18_plugin_{len(bug)}"])


def test_a_fused_job_whose_result_write_fails_is_recorded_like_naclip_run(tmp_path, run_env, capsys):
    import json

    from naclip.sweep import _finish, _Job, evaluate_group

    cfg, full = _task_cfg([*SMOKE, "attention.sigma=2"])
    group = evaluate_group([cfg])
    folder = tmp_path / "job"
    (folder / "result.json").mkdir(parents=True)  # a folder where the result file goes
    assert _finish(_Job(0, full, cfg, folder, True), group, group.outcomes[0])(cfg) is None
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and "could not write" in status["error"]
    assert "naclip.run: error: could not write" in capsys.readouterr().err


def test_fused_ctrl_c_records_every_interrupted_job(tmp_path, run_env, monkeypatch):
    import json

    from naclip import sweep

    def interrupted(group):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_evaluate", interrupted)
    configs = [
        _task_cfg([*SMOKE, f"attention.sigma={s}", f"hydra.sweep.dir={tmp_path}", f"hydra.sweep.subdir=j{s}"])[1]
        for s in (2, 6)
    ]
    with pytest.raises(SystemExit) as stop:
        sweep.launch_fused(configs, None, lambda cfg: None, None)
    assert stop.value.code == 130
    for s in (2, 6):
        status = json.loads((tmp_path / f"j{s}" / "status.json").read_text())
        assert status == {**status, "status": "failed", "error": "interrupted, no result written"}


@pytest.mark.slow
def test_fused_and_basic_launchers_agree_on_a_plugin_that_raises(tmp_path, cache):
    import json
    import subprocess
    import sys

    (tmp_path / "i18_boom_plugin.py").write_text(
        "import naclip\n\n\ndef boom(q, k, v, prior):\n    raise RuntimeError('plug-in bug')\n\n\n"
        "naclip.register_attention('boom', boom, uses_sigma=False)\n"
    )
    env = {
        **os.environ,
        "NACLIP_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    statuses = {}
    for launcher in ("basic", "fused"):
        args = [*SMOKE, "plugins=[i18_boom_plugin]", "attention.name=full,boom", "hydra.sweep.subdir=${attention.name}"]
        if launcher == "fused":
            args.append("hydra/launcher=fused")
        proc = subprocess.run(
            [sys.executable, "-m", "naclip.run", "-m", *args],
            capture_output=True,
            text=True,
            env={**env, "NACLIP_OUTPUT": str(tmp_path / launcher)},
            check=False,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "sweep summary: 1 finished, 0 skipped, 1 failed" in proc.stdout
        folder = tmp_path / launcher / "sweeps" / "default"
        statuses[launcher] = {
            job: {
                k: v
                for k, v in json.loads((folder / job / "status.json").read_text()).items()
                if k in ("status", "error")
            }
            for job in ("full", "boom")
        }
    assert statuses["fused"] == statuses["basic"]
    assert statuses["basic"]["full"]["status"] == "finished"
    assert statuses["basic"]["boom"] == {
        "status": "failed",
        "error": "attention 'boom' raised RuntimeError: plug-in bug",
    }


# ------------------------------------------------------------------------------ 5: an unwritable text cache
def test_an_unwritable_text_cache_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog, b32):
    import torch

    from naclip import text

    def full_disk(*args, **kwargs):  # what torch.save raises on a full or read-only disk
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(text.torch, "save", full_disk)
    first = text.text_classifier(b32, ["cat", "dog"], ("a photo of a {}.",), cache_dir=tmp_path / "ro")
    second = text.text_classifier(b32, ["cow"], ("a photo of a {}.",), cache_dir=tmp_path / "ro")
    assert first.shape == (2, 512) and second.shape == (1, 512) and torch.isfinite(first).all()
    warnings = [r.getMessage() for r in caplog.records if "text-classifier cache" in r.getMessage()]
    assert len(warnings) == 1 and "going on without it" in warnings[0]
    assert not list((tmp_path / "ro").glob("*.tmp"))


# ------------------------------------------------------------------------ 6: hand-edited result.json files
@pytest.mark.parametrize(
    "damage",
    [{"miou": None}, {"miou": "abc"}, {"miou": float("nan")}, {"miou": True}, {"config": "x"}, {"config": None}],
    ids=["null", "string", "nan", "bool", "string-config", "null-config"],
)
def test_a_hand_edited_result_is_not_finished(tmp_path, run_env, damage):
    import json

    from omegaconf import OmegaConf

    from naclip.results import read_finished_result
    from naclip.run import finished_result

    cfg, _ = _task_cfg(SMOKE)
    result = {"miou": 50.0, "config": OmegaConf.to_container(cfg, resolve=True), **damage}
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert read_finished_result(tmp_path) is None
    assert finished_result(cfg, tmp_path) is None  # the job runs again


# ----------------------------------------------------------------------- 12, 13: numbers that lose a result
@pytest.mark.parametrize("override", ["dataset.logit_scale=nan", "dataset.prob_thd=inf", "dataset.logit_scale=-inf"])
def test_a_non_finite_protocol_number_is_refused_up_front(run_env, override):
    cfg, _ = _task_cfg([*SMOKE, override])
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key} must be a finite number"):
        config.validate(cfg)


def test_a_split_with_every_label_ignored_is_one_line_and_no_result(tmp_path, run_env):
    from naclip.run import NoLabelledPixelsError, evaluate

    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    _image(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.full((64, 80), 255, dtype=np.uint8)).save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    (tmp_path / "names.txt").write_text("sky\ntree\n")
    overrides = [
        "dataset=voc21",
        f"dataset.root={root}",
        f"dataset.class_names={tmp_path / 'names.txt'}",
        "dataset.short_side=64",
        "backbone=b32",
        "backbone.pretrained=null",
        "num_workers=0",
    ]
    cfg, _ = _task_cfg(overrides)
    with pytest.raises(NoLabelledPixelsError, match="every label pixel of the 1 evaluated images is ignore_index 255"):
        evaluate(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists()


# ----------------------------------------------------------------- 8, 9: file names that are not UTF-8
def test_predict_names_a_non_utf8_file_printably_and_does_every_image(tmp_path, monkeypatch, b32, cache):
    from naclip.predict import run

    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    images = tmp_path / "in"
    images.mkdir()
    _image(images / "a.png")
    _image(images / os.fsdecode(b"b\xff.png"), seed=1)
    _image(images / "c.png", seed=2)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    written = run(_predict_cfg(cache, f"image={images}"), tmp_path / "out")
    assert len(written) == 6
    printed = stdout.buffer.getvalue().decode("utf-8").split()
    assert sorted(Path(p).name for p in printed) == sorted(
        ["a_labels.png", "a_overlay.png", "b\\xff_labels.png", "b\\xff_overlay.png", "c_labels.png", "c_overlay.png"]
    )


def _ade(root: Path, names: list[bytes]) -> dict:
    for name in names:
        (root / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
        _image(root / "images" / "validation" / os.fsdecode(name + b".jpg"))
        label = np.zeros((64, 80), dtype=np.uint8)
        Image.fromarray(label).save(root / "annotations" / "validation" / os.fsdecode(name + b".png"))
    return {
        "name": "ade",
        "layout": "ade",
        "root": str(root),
        "split": "validation",
        "class_names": "ade",
        "short_side": 64,
        "max_long_side": 2048,
        "reduce_zero_label": True,
    }


def test_a_dataset_file_name_that_is_not_utf8_is_a_named_sample_error(tmp_path):
    from naclip.data import build_dataset

    dataset = build_dataset(_ade(tmp_path, [b"a", b"b\xfe"]), on_error="skip")
    assert len(dataset) == 2
    assert dataset[0]["error"] is None and dataset[0]["image"] is not None
    assert dataset[1]["image"] is None
    assert "b\\xfe.jpg' is not valid UTF-8; rename it" in dataset[1]["error"]
    dataset[1]["error"].encode("utf-8")  # printable


def test_a_split_file_listing_a_non_utf8_id_names_that_file(tmp_path):
    from naclip.data import build_dataset

    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_bytes(b"a\nb\xfe\n")
    for name in (b"a", b"b\xfe"):
        _image(root / "JPEGImages" / os.fsdecode(name + b".jpg"))
        Image.fromarray(np.zeros((64, 80), dtype=np.uint8)).save(
            root / "SegmentationClass" / os.fsdecode(name + b".png")
        )
    cfg = {
        "name": "voc21",
        "layout": "voc",
        "root": str(root),
        "split": "val",
        "class_names": "voc21",
        "short_side": 64,
        "max_long_side": 2048,
    }
    dataset = build_dataset(cfg, on_error="skip")
    assert dataset[0]["error"] is None and "b\\xfe.jpg' is not valid UTF-8" in dataset[1]["error"]


# --------------------------------------------------------------------------- 10, 14, 15: where output goes
def test_a_full_output_disk_is_refused_up_front_naming_the_folder(tmp_path, monkeypatch, capsys):
    from naclip import jobs

    monkeypatch.setattr(jobs.tempfile, "TemporaryFile", lambda dir: open("/dev/full", "wb"))  # noqa: SIM115
    assert "No space left on device" in jobs.check_writable(tmp_path)
    with pytest.raises(SystemExit) as stop:
        jobs.JobSummary()._require_writable(str(tmp_path))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"naclip.run: error: cannot write the output folder {tmp_path}")


def test_tables_out_an_existing_file_is_one_line_exit_2(tmp_path, capsys):
    import json

    from naclip.tables import main

    (tmp_path / "results" / "0").mkdir(parents=True)
    (tmp_path / "results" / "0" / "result.json").write_text(json.dumps(paper_result([], 58.0)))
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--source", "local", str(tmp_path / "results"), "--out", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"naclip.tables: error: --out '{tmp_path / 'notes.txt'}' is a file, not a folder; pass a folder "
        f"for the CSVs and the plot"
    ]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_data_root_that_is_a_file_says_so(tmp_path):
    from naclip.data import DatasetError, build_dataset

    (tmp_path / "root").write_text("not a folder")
    cfg = {**_ade(tmp_path / "unused", []), "root": str(tmp_path / "root")}
    with pytest.raises(DatasetError, match=r"dataset root '.*root' is a file, not a folder"):
        build_dataset(cfg)
