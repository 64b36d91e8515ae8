"""Tests for naclip.tables: paper tables, σ sweep plot, result sources and the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from naclip.tables import (
    LocalSource,
    WandbSource,
    build_tables,
    load_source,
    main,
    methods_table,
    plot_sigma,
    select_results,
    setting_note,
    sigma_figure,
    sigma_sweep,
)

REPO = Path(__file__).resolve().parents[1]
DATASETS = ["voc21", "pc60", "coco_object", "voc20", "cityscapes", "pc59", "ade", "coco_stuff"]
HEADERS = ["V21", "PC60", "C-Obj", "V20", "City", "PC59", "ADE", "C-Stf", "Avg"]
_counter = itertools.count()


def fake_result(
    *,
    dataset: str = "voc21",
    miou: float = 50.0,
    backbone: str = "b16",
    attention: str = "full",
    arch: str = "reduced",
    refine: str = "none",
    sigma: float | None = 5.0,
    finished_at: str = "2026-01-01T00:00:00+00:00",
) -> dict:
    """A TEST fixture in result.json form for the given choices (σ omitted from config when None)."""
    attention_cfg: dict = {"name": attention}
    if sigma is not None:
        attention_cfg["sigma"] = sigma
    choices = {
        "backbone": backbone,
        "attention": attention,
        "arch": arch,
        "refine": refine,
        "dataset": dataset,
        "logger": "local",
    }
    return {
        "miou": miou,
        "per_class_iou": {"aeroplane": miou, "bag": None},
        "pixel_acc": 80.0,
        "num_images": 4,
        "seconds_eval": 1.0,
        "images_per_sec": 4.0,
        "peak_memory_mb": 10.0,
        "choices": choices,
        "overrides": [f"{k}={v}" for k, v in choices.items()],
        "config": {
            "backbone": {"name": backbone},
            "attention": attention_cfg,
            "arch": {"name": arch},
            "refine": {"name": refine},
            "dataset": {"name": dataset},
        },
        "versions": {},
        "git_commit": None,
        "finished_at": finished_at,
    }


def write_json(root: Path, result: dict) -> dict:
    """Write ``result`` as result.json in its own nested output dir below ``root``."""
    folder = root / f"run{next(_counter):04d}" / "seed0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    return result


def write_result(root: Path, **kwargs) -> dict:
    """Write one fake result.json for the given choices/σ/mIoU."""
    return write_json(root, fake_result(**kwargs))


# Every (table row choices) -> a distinct base value so each cell can be traced back to its result.
ROW_CHOICES = {
    "t1_none": {"backbone": "b16", "attention": "full", "arch": "reduced", "refine": "none"},
    "t1_pamr": {"backbone": "b16", "attention": "full", "arch": "reduced", "refine": "pamr"},
    "t3_vanilla": {"backbone": "b16", "attention": "vanilla", "arch": "vanilla", "refine": "none"},
    "t3_n_only": {"backbone": "b16", "attention": "n_only", "arch": "vanilla", "refine": "none"},
    "t3_kk_sim": {"backbone": "b16", "attention": "kk_sim", "arch": "vanilla", "refine": "none"},
    "t3_full": {"backbone": "b16", "attention": "full", "arch": "vanilla", "refine": "none"},
    "t4_reduced": {"backbone": "b16", "attention": "vanilla", "arch": "reduced", "refine": "none"},
    "t2_b32": {"backbone": "b32", "attention": "full", "arch": "reduced", "refine": "pamr"},
    "t2_l14": {"backbone": "l14", "attention": "full", "arch": "reduced", "refine": "pamr"},
}


def cell_value(row_index: int, dataset_index: int) -> float:
    return 10.0 * row_index + dataset_index + 0.25


def full_results() -> list[dict]:
    """One σ = 5 result for every cell of every table (Table 2's backbones only on V21/PC59)."""
    out = []
    for r, choices in enumerate(ROW_CHOICES.values()):
        datasets = ["voc21", "pc59"] if choices["backbone"] != "b16" else DATASETS
        for dataset in datasets:
            out.append(fake_result(dataset=dataset, miou=cell_value(r, DATASETS.index(dataset)), **choices))
    return out


def expected_row(row_key: str) -> list[float]:
    r = list(ROW_CHOICES).index(row_key)
    values = [cell_value(r, d) for d in range(8)]
    return [*values, sum(values) / 8]


def row(table, label: str) -> list:
    return [table.value(label, column) for column in table.columns]


# --------------------------------------------------------------------------------------------- tables
def test_table_columns_and_row_order():
    tables = build_tables(full_results())
    assert list(tables) == ["backbones", "table1", "table2", "table3", "table4"]
    for name in ("table1", "table3", "table4"):
        assert tables[name].columns == HEADERS
    assert tables["table2"].columns == [
        "B/16 V21", "B/16 PC59", "B/16 Avg",
        "B/32 V21", "B/32 PC59", "B/32 Avg",
        "L/14 V21", "L/14 PC59", "L/14 Avg",
    ]  # fmt: skip
    labels = {name: [label for label, _ in t.rows] for name, t in tables.items()}
    assert labels["table1"] == ["NACLIP", "NACLIP (paper)", "NACLIP + PAMR", "NACLIP + PAMR (paper)"]
    assert labels["table2"] == ["NACLIP + PAMR", "NACLIP + PAMR (paper)"]
    assert labels["table3"] == [
        "CLIP (vanilla)", "CLIP (vanilla) (paper)",
        "Neighbourhood only (n_only)", "Neighbourhood only (n_only) (paper)",
        "Key-key similarity (kk_sim)", "Key-key similarity (kk_sim) (paper)",
        "Full NACLIP attention (full)", "Full NACLIP attention (full) (paper)",
    ]  # fmt: skip
    assert labels["table4"] == [
        "Vanilla architecture", "Vanilla architecture (paper)",
        "Reduced architecture", "Reduced architecture (paper)",
    ]  # fmt: skip


def test_every_measured_cell_comes_from_its_result():
    tables = build_tables(full_results())
    assert row(tables["table1"], "NACLIP") == pytest.approx(expected_row("t1_none"))
    assert row(tables["table1"], "NACLIP + PAMR") == pytest.approx(expected_row("t1_pamr"))
    assert row(tables["table3"], "CLIP (vanilla)") == pytest.approx(expected_row("t3_vanilla"))
    assert row(tables["table3"], "Neighbourhood only (n_only)") == pytest.approx(expected_row("t3_n_only"))
    assert row(tables["table3"], "Key-key similarity (kk_sim)") == pytest.approx(expected_row("t3_kk_sim"))
    assert row(tables["table3"], "Full NACLIP attention (full)") == pytest.approx(expected_row("t3_full"))
    assert row(tables["table4"], "Vanilla architecture") == pytest.approx(expected_row("t3_vanilla"))
    assert row(tables["table4"], "Reduced architecture") == pytest.approx(expected_row("t4_reduced"))

    v21, pc59 = DATASETS.index("voc21"), DATASETS.index("pc59")
    expected_t2 = []
    for key in ("t1_pamr", "t2_b32", "t2_l14"):
        r = list(ROW_CHOICES).index(key)
        a, b = cell_value(r, v21), cell_value(r, pc59)
        expected_t2 += [a, b, (a + b) / 2]
    assert row(tables["table2"], "NACLIP + PAMR") == pytest.approx(expected_t2)


def test_paper_rows_hold_published_numbers_and_averages():
    tables = build_tables([])
    published = {
        ("table1", "NACLIP (paper)"): "58.9 32.2 33.2 79.7 35.5 35.2 17.4 23.3 39.4",
        ("table1", "NACLIP + PAMR (paper)"): "64.1 35.0 36.2 83.0 38.3 38.4 19.1 25.7 42.5",
        ("table3", "CLIP (vanilla) (paper)"): "18.6 7.8 6.5 49.1 6.7 11.2 3.2 5.7 13.6",
        ("table3", "Neighbourhood only (n_only) (paper)"): "38.0 17.0 16.1 65.9 21.4 23.9 10.2 14.6 25.9",
        ("table3", "Key-key similarity (kk_sim) (paper)"): "36.0 15.6 10.9 64.9 24.8 26.2 9.6 15.1 25.4",
        ("table3", "Full NACLIP attention (full) (paper)"): "40.2 17.4 13.9 68.2 28.1 27.9 11.2 16.5 27.9",
        ("table4", "Vanilla architecture (paper)"): "18.6 7.8 6.5 49.1 6.7 11.2 3.2 5.7 13.6",
        ("table4", "Reduced architecture (paper)"): "37.5 22.3 23.2 81.4 20.2 24.9 11.6 16.7 29.7",
    }
    for (name, label), text in published.items():
        shown = dict((r[0], r[1:]) for r in tables[name].formatted_rows())[label]
        assert " ".join(shown) == text, label
    t2 = tables["table2"]
    assert row(t2, "NACLIP + PAMR (paper)") == pytest.approx(
        [64.1, 38.4, (64.1 + 38.4) / 2, 54.8, 34.9, (54.8 + 34.9) / 2, 57.9, 36.4, (57.9 + 36.4) / 2]
    )


def test_missing_cells_and_avg_needs_all_eight():
    seven = [fake_result(dataset=d, miou=40.0 + i) for i, d in enumerate(DATASETS[:-1])]
    tables = build_tables(seven)
    t1 = tables["table1"]
    assert t1.value("NACLIP", "ADE") == 46.0
    assert t1.value("NACLIP", "C-Stf") is None
    assert t1.value("NACLIP", "Avg") is None
    assert all(v is None for v in row(t1, "NACLIP + PAMR"))
    shown = dict((r[0], r[1:]) for r in t1.formatted_rows())
    assert shown["NACLIP"] == ["40.0", "41.0", "42.0", "43.0", "44.0", "45.0", "46.0", "–", "–"]
    assert shown["NACLIP + PAMR"] == ["–"] * 9
    # Table 2 Avg per backbone needs both V21 and PC59.
    t2 = build_tables([fake_result(dataset="voc21", miou=60.0, refine="pamr")])["table2"]
    assert t2.value("NACLIP + PAMR", "B/16 V21") == 60.0
    assert t2.value("NACLIP + PAMR", "B/16 Avg") is None


def test_backbones_table_rows_per_family_and_refine():
    results = [
        fake_result(backbone="siglip_b16", dataset="voc21", miou=30.0),
        fake_result(backbone="siglip_b16", dataset="pc59", miou=20.0),
        fake_result(backbone="eva02_b16", dataset="voc21", miou=50.0, refine="pamr"),
        fake_result(backbone="eva02_b16", dataset="voc21", miou=99.0, attention="vanilla"),  # not NACLIP: ignored
    ]
    table = build_tables(results)["backbones"]
    assert table.value("SigLIP B/16", "V21") == 30.0 and table.value("SigLIP B/16", "Avg") == 25.0
    assert table.value("SigLIP B/16 + PAMR", "V21") is None
    assert table.value("EVA02-CLIP B/16 + PAMR", "V21") == 50.0 and table.value("EVA02-CLIP B/16", "V21") is None
    assert len(table.rows) == 18


def test_newest_result_wins_regardless_of_order():
    results = [
        fake_result(miou=61.0, finished_at="2026-03-01T12:00:00+00:00"),
        fake_result(miou=70.0, finished_at="2026-03-02T03:00:00Z"),
        fake_result(miou=55.0, finished_at="2026-02-01T00:00:00+00:00"),
        fake_result(miou=99.0, finished_at="2026-03-01T23:00:00-05:00"),  # 04:00 UTC on 03-02: newest
    ]
    assert build_tables(results)["table1"].value("NACLIP", "V21") == 99.0
    assert build_tables(results[:3])["table1"].value("NACLIP", "V21") == 70.0
    assert build_tables(results[:3][::-1])["table1"].value("NACLIP", "V21") == 70.0


def test_only_sigma_five_enters_tables_and_missing_sigma_means_default():
    results = [
        fake_result(miou=40.0, sigma=3.0, finished_at="2026-05-01T00:00:00+00:00"),
        fake_result(miou=45.0, sigma=5.0, finished_at="2026-01-01T00:00:00+00:00"),
        fake_result(dataset="pc60", miou=30.0, sigma=None),
    ]
    t1 = build_tables(results)["table1"]
    assert t1.value("NACLIP", "V21") == 45.0
    assert t1.value("NACLIP", "PC60") == 30.0


def test_markdown_layout():
    md = build_tables(full_results())["table1"].to_markdown().splitlines()
    assert md[0] == "| Method | " + " | ".join(HEADERS) + " |"
    assert md[1] == "|---|" + "---:|" * 9
    assert md[2].startswith("| NACLIP | 0.2 | 1.2 | 2.2 |")  # 0.25 shown with one decimal
    assert md[3] == "| NACLIP (paper) | 58.9 | 32.2 | 33.2 | 79.7 | 35.5 | 35.2 | 17.4 | 23.3 | 39.4 |"
    assert len(md) == 6
    empty = build_tables([])["table4"].to_markdown().splitlines()
    assert empty[2] == "| Vanilla architecture |" + " – |" * 9


def test_csv_content(tmp_path):
    table = build_tables([fake_result(miou=12.34)])["table1"]
    path = table.to_csv(tmp_path / "t1.csv")
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Method", *HEADERS]
    assert rows[1] == ["NACLIP", "12.3", *[""] * 8]  # missing cells empty, so pandas reads numeric columns
    assert rows[2] == ["NACLIP (paper)", "58.9", "32.2", "33.2", "79.7", "35.5", "35.2", "17.4", "23.3", "39.4"]
    assert [r[0] for r in rows[3:]] == ["NACLIP + PAMR", "NACLIP + PAMR (paper)"]


# ------------------------------------------------------------------------------------------------ σ sweep
def test_sigma_sweep_curves_and_plot(tmp_path):
    results = [
        fake_result(dataset="pc59", miou=30.0, sigma=7.0),
        fake_result(dataset="voc21", miou=50.0, sigma=7.0),
        fake_result(dataset="voc21", miou=55.0, sigma=3.0),
        fake_result(dataset="voc21", miou=58.0, sigma=5.0, finished_at="2026-01-01T00:00:00+00:00"),
        fake_result(dataset="voc21", miou=59.0, sigma=5.0, finished_at="2026-06-01T00:00:00+00:00"),
        fake_result(dataset="voc21", miou=11.0, sigma=3.0, refine="pamr"),  # not the swept config
        fake_result(dataset="voc21", miou=12.0, sigma=3.0, backbone="b32"),  # another backbone: its own line
        fake_result(dataset="voc21", miou=13.0, sigma=3.0, arch="vanilla"),  # not the swept config
    ]
    assert sigma_sweep(results) == {
        ("b16", "voc21"): [(3.0, 55.0), (5.0, 59.0), (7.0, 50.0)],
        ("b16", "pc59"): [(7.0, 30.0)],
        ("b32", "voc21"): [(3.0, 12.0)],
    }
    path = plot_sigma(results, tmp_path / "sweep.png")
    assert path == tmp_path / "sweep.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_sigma_skips_without_sweep_results(tmp_path, capsys):
    only_pamr = [fake_result(refine="pamr")]
    assert plot_sigma(only_pamr, tmp_path / "sweep.png") is None
    assert not (tmp_path / "sweep.png").exists()
    assert "no σ-sweep results" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sources
def test_local_source_recursive_and_skips_broken_files(tmp_path, capsys):
    good = write_result(tmp_path, miou=42.0)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "result.json").write_text('{"miou": 41.0, "choices": {')
    (tmp_path / "nochoices").mkdir()
    (tmp_path / "nochoices" / "result.json").write_text('{"miou": 41.0}')
    (tmp_path / "other.json").write_text("{}")
    results = LocalSource(tmp_path).results()
    assert results == [good]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert any("partial" in line and "JSONDecodeError" in line for line in err)
    assert any("nochoices" in line for line in err)


def test_load_source_kinds_and_bad_input(tmp_path):
    assert isinstance(load_source("local", str(tmp_path)), LocalSource)
    assert isinstance(load_source("wandb", "me/naclip"), WandbSource)
    with pytest.raises(ValueError, match="unknown source 'csv'; valid sources: local, wandb"):
        load_source("csv", str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_source("local", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="ENTITY/PROJECT"):
        load_source("wandb", "just-a-project")


class FakeRun:
    def __init__(self, result: dict, state: str = "finished", name: str = "run") -> None:
        self.name = name
        self.state = state
        self.config = {"choices": result["choices"], "config": result["config"], "overrides": result["overrides"]}
        self.summary = {
            "miou": result["miou"],
            "pixel_acc": result["pixel_acc"],
            "num_images": result["num_images"],
            "images_per_sec": result["images_per_sec"],
            "seconds_eval": result["seconds_eval"],
            "finished_at": result["finished_at"],
            **{f"iou/{k}": v for k, v in result["per_class_iou"].items()},
            "_runtime": 3.0,
        }


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs = runs
        self.paths: list[str] = []

    def runs(self, path: str, filters: dict | None = None) -> list[FakeRun]:
        self.paths.append(path)
        return self._runs  # ignores filters, so client-side state filtering is exercised


def test_wandb_source_matches_local_source(tmp_path):
    written = [write_json(tmp_path, r) for r in full_results()]
    crashed = fake_result(miou=1.0, finished_at="2030-01-01T00:00:00+00:00")  # newest, but not finished
    runs = [FakeRun(r, name=f"r{i}") for i, r in enumerate(written)] + [FakeRun(crashed, state="crashed")]
    api = FakeApi(runs)
    source = WandbSource("me/naclip", api=api)
    from_wandb = source.results()
    assert api.paths == ["me/naclip"]
    assert len(from_wandb) == len(written)
    assert from_wandb[0]["per_class_iou"] == {"aeroplane": written[0]["miou"], "bag": None}
    local_tables = build_tables(LocalSource(tmp_path).results())
    wandb_tables = build_tables(from_wandb)
    for name in local_tables:
        assert wandb_tables[name].to_markdown() == local_tables[name].to_markdown()
    assert wandb_tables["table1"].value("NACLIP", "V21") == pytest.approx(expected_row("t1_none")[0])


def test_wandb_source_api_failure_is_one_line_value_error():
    class BrokenApi:
        def runs(self, path: str, filters: dict | None = None):
            raise RuntimeError("project not found\nsecond line of detail")

    with pytest.raises(ValueError) as info:
        WandbSource("me/missing", api=BrokenApi()).results()
    assert str(info.value) == "could not list W&B runs of 'me/missing': project not found"


# ---------------------------------------------------------------------------------------------------- CLI
def populate(root: Path) -> None:
    for result in full_results():
        write_json(root, result)
    write_result(root, dataset="voc21", miou=50.0, sigma=2.0)


def test_main_writes_tables_and_plot(tmp_path, capsys):
    runs, out = tmp_path / "outputs", tmp_path / "tables_out"
    populate(runs)
    assert main(["--source", "local", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for n in range(1, 5):
        assert f"### Table {n} —" in printed
        assert (out / f"table{n}.csv").read_text(encoding="utf-8").startswith("Method,")
    assert "| NACLIP (paper) | 58.9 |" in printed
    assert (out / "sigma_sweep.png").stat().st_size > 1000
    written = "backbones.csv, table1.csv, table2.csv, table3.csv, table4.csv, methods.csv, sigma_sweep.png"
    assert f"wrote {written} to {out}" in printed


def test_main_default_out_dir_is_tables_under_cwd(tmp_path, monkeypatch, capsys):
    populate(tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    assert main(["--source", "local", "outputs"]) == 0
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "backbones.csv", "methods.csv", "sigma_sweep.png", "table1.csv", "table2.csv", "table3.csv", "table4.csv",
    ]  # fmt: skip
    assert "to tables" in capsys.readouterr().out


def test_main_without_sweep_results_writes_no_png(tmp_path, capsys):
    write_result(tmp_path / "outputs", miou=60.0, refine="pamr")
    out = tmp_path / "out"
    assert main(["--source", "local", str(tmp_path / "outputs"), "--out", str(out)]) == 0
    assert not (out / "sigma_sweep.png").exists()
    captured = capsys.readouterr()
    assert "wrote backbones.csv, table1.csv, table2.csv, table3.csv, table4.csv, methods.csv to" in captured.out
    assert "no σ-sweep results" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "local", "{tmp}/missing"], "does not exist"),
        (["--source", "local", "{tmp}/empty"], "no usable results"),
        (["--source", "s3", "{tmp}/empty"], "unknown source 's3'"),
        (["--source", "wandb", "no-slash"], "ENTITY/PROJECT"),
        (["--source", "local"], "--source"),
        ([], "--source"),
    ],
)
def test_main_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no results here")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("naclip.tables: error:") and message in lines[0]
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.slow
def test_module_runs_as_script(tmp_path):
    populate(tmp_path / "outputs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "naclip.tables", "--source", "local", str(tmp_path / "outputs")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "### Table 2 —" in done.stdout and "Traceback" not in done.stderr
    assert (tmp_path / "tables" / "table2.csv").exists() and (tmp_path / "tables" / "sigma_sweep.png").exists()


# ------------------------------------------------------------------------------------------- provenance
def caveated(result: dict, *, random_weights: bool = False, partial: bool = False) -> dict:
    """A result as run.py writes it for a smoke run: random weights and/or a partial split."""
    result["provenance"] = {
        "random_weights": random_weights,
        "partial": partial,
        "partial_reasons": ["max_images=2 of 1449 images"] if partial else [],
    }
    return result


def test_tables_leave_out_random_and_partial_results_with_one_line(tmp_path, capsys):
    runs, out = tmp_path / "outputs", tmp_path / "tables_out"
    write_result(runs, dataset="voc21", miou=61.0)
    write_json(runs, caveated(fake_result(dataset="pc60", miou=33.0), random_weights=True))
    write_json(runs, caveated(fake_result(dataset="ade", miou=12.0), partial=True))
    write_json(runs, caveated(fake_result(dataset="ade", miou=13.0, refine="pamr"), random_weights=True, partial=True))
    assert main(["--source", "local", str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "left out" in line]
    assert notes == [
        "naclip.tables: left out 3 of 4 results (2 with random weights and 1 on a partial split); "
        "--include-partial shows them"
    ]
    assert "| NACLIP | 61.0 | – | – | – | – | – | – | – | – |" in captured.out
    assert "†" not in captured.out
    with (out / "table1.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Method", *HEADERS] and rows[1] == ["NACLIP", "61.0", *[""] * 8]


def test_include_partial_marks_each_caveated_cell(tmp_path, capsys):
    runs, out = tmp_path / "outputs", tmp_path / "tables_out"
    write_result(runs, dataset="voc21", miou=61.0)
    write_json(runs, caveated(fake_result(dataset="pc60", miou=33.0), random_weights=True))
    write_json(runs, caveated(fake_result(dataset="ade", miou=12.0), partial=True))
    assert main(["--source", "local", str(runs), "--out", str(out), "--include-partial"]) == 0
    captured = capsys.readouterr()
    assert "| NACLIP | 61.0 | 33.0† | – | – | – | – | 12.0† | – | – |" in captured.out
    assert "† not a full measurement" in captured.out
    assert "included 2 results" in captured.err
    with (out / "table1.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Method", *HEADERS, "Note"]
    assert rows[1] == ["NACLIP", "61.0", "33.0", "", "", "", "", "12.0", "", "", "PC60 †; ADE †"]


def test_full_measurement_beats_a_newer_partial_one_and_avg_is_marked():
    results = [fake_result(dataset=d, miou=40.0) for d in DATASETS]
    newer = caveated(fake_result(dataset="voc21", miou=90.0, finished_at="2027-01-01T00:00:00+00:00"), partial=True)
    table = build_tables([*results, newer])["table1"]
    assert table.value("NACLIP", "V21") == 40.0 and not table.marked
    only_partial = build_tables([*results[1:], newer])["table1"]
    assert only_partial.value("NACLIP", "V21") == 90.0
    assert only_partial.marked == {("NACLIP", "V21"), ("NACLIP", "Avg")}
    assert only_partial.value("NACLIP", "Avg") == pytest.approx((90.0 + 7 * 40.0) / 8)


def test_results_without_provenance_are_judged_from_their_config():
    random_run = fake_result(miou=20.0)
    random_run["config"]["backbone"]["pretrained"] = None
    smoke = fake_result(dataset="pc60", miou=21.0)
    smoke["config"]["max_images"] = 5
    kept, note = select_results([random_run, smoke, fake_result(dataset="ade", miou=22.0)])
    assert [r["miou"] for r in kept] == [22.0]
    assert note.startswith("left out 2 of 3 results (1 with random weights and 1 on a partial split)")


def test_wandb_source_reads_provenance_and_tags(tmp_path, capsys):
    real = FakeRun(fake_result(dataset="voc21", miou=61.0), name="real")
    summarised = FakeRun(fake_result(dataset="pc60", miou=33.0), name="summary")
    summarised.summary["provenance"] = {"random_weights": True, "partial": False}
    tagged = FakeRun(fake_result(dataset="ade", miou=12.0), name="tags")
    tagged.tags = ["partial", "dataset:ade"]
    results = WandbSource("me/naclip", api=FakeApi([real, summarised, tagged])).results()
    kept, note = select_results(results)
    assert [r["miou"] for r in kept] == [61.0]
    assert "1 with random weights and 1 on a partial split" in note


def test_sigma_plot_follows_the_same_rule(tmp_path, capsys):
    runs, out = tmp_path / "outputs", tmp_path / "out"
    for sigma in (2.0, 6.0):
        write_json(
            runs,
            caveated(fake_result(dataset="synthetic", backbone="b32", miou=sigma, sigma=sigma), random_weights=True),
        )
    assert main(["--source", "local", str(runs), "--out", str(out)]) == 0
    assert not (out / "sigma_sweep.png").exists()
    assert main(["--source", "local", str(runs), "--out", str(out), "--include-partial"]) == 0
    assert (out / "sigma_sweep.png").stat().st_size > 1000


def test_a_run_without_sweep_results_removes_the_earlier_plot_and_says_so(tmp_path, capsys):
    """The plot of a run with --include-partial must not stay beside the tables of a later run that draws none."""
    runs, out = tmp_path / "outputs", tmp_path / "out"
    for sigma in (2.0, 6.0):
        write_json(
            runs,
            caveated(fake_result(dataset="synthetic", backbone="b32", miou=sigma, sigma=sigma), random_weights=True),
        )
    (out / "notes.png").parent.mkdir(parents=True)
    (out / "notes.png").write_bytes(b"a user's file")
    assert main(["--source", "local", str(runs), "--out", str(out), "--include-partial"]) == 0
    assert (out / "sigma_sweep.png").is_file()
    capsys.readouterr()
    assert main(["--source", "local", str(runs), "--out", str(out)]) == 0
    assert not (out / "sigma_sweep.png").exists()
    assert (out / "notes.png").read_bytes() == b"a user's file"  # only what this run would write
    assert f"removed the earlier sigma_sweep.png from {out}" in capsys.readouterr().err


def sweep_with_single_points() -> list[dict]:
    """Two σ curves, a single-σ run on another dataset and one random-weight single point (a † footnote)."""
    results = [
        fake_result(dataset=d, sigma=float(s), miou=m + s)
        for d, m in (("voc21", 50.0), ("ade", 10.0))
        for s in range(1, 11)
    ]
    results.append(fake_result(dataset="pc59", backbone="b32", sigma=5.0, miou=33.0))
    results.append(
        caveated(fake_result(dataset="synthetic", backbone="b32", sigma=5.0, miou=20.0), random_weights=True)
    )
    return results


def test_sigma_figure_draws_single_sigma_runs_as_points_and_keeps_the_legend_off_the_data():
    fig = sigma_figure(sweep_with_single_points())
    ax = fig.axes[0]
    styles = {line.get_label(): (line.get_linestyle(), len(line.get_xdata())) for line in ax.get_lines()}
    assert styles == {
        "B/16 V21": ("-", 10),
        "B/16 ADE": ("-", 10),
        "B/32 PC59": ("None", 1),
        "B/32 synthetic†": ("None", 1),
    }
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    for line in ax.get_lines():
        for x, y in ax.transData.transform(line.get_xydata()):
            assert not (legend.x0 <= x <= legend.x1 and legend.y0 <= y <= legend.y1), (line.get_label(), x, y)


def test_sigma_plot_png_is_not_clipped_and_shows_the_footnote(tmp_path):
    """Every edge of the saved image is background: no title, footnote or legend runs off the picture."""
    path = plot_sigma(sweep_with_single_points(), tmp_path / "sweep.png")
    pixels = np.asarray(Image.open(path).convert("L"))
    edges = np.concatenate([pixels[:3].ravel(), pixels[-3:].ravel(), pixels[:, :3].ravel(), pixels[:, -3:].ravel()])
    assert edges.min() == 255
    bottom = pixels[int(pixels.shape[0] * 0.9) :]  # the footnote's dark text under the x-axis label
    assert (bottom < 128).sum() > 50


def test_export_lists_every_result_config_to_miou(tmp_path, capsys):
    """Plug-in attentions, other σ and random-weight runs are in no paper table; the export has each of them."""
    runs = tmp_path / "outputs"
    write_result(runs, dataset="voc21", miou=61.25)
    write_result(runs, dataset="synthetic", backbone="b32", attention="qq_gauss", sigma=3.0, miou=12.5)
    write_json(runs, caveated(fake_result(dataset="ade", refine="pamr", sigma=None, miou=7.0), random_weights=True))
    export = tmp_path / "all.csv"
    assert main(["--source", "local", str(runs), "--out", str(tmp_path / "t"), "--export", str(export)]) == 0
    assert f"exported 3 results to {export}" in capsys.readouterr().err
    with export.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    picked = [
        (r["dataset"], r["backbone"], r["attention"], r["sigma"], r["refine"], r["miou"], r["caveats"]) for r in rows
    ]
    assert picked == [
        ("ade", "b16", "full", "", "pamr", "7.00", "random-weights"),
        ("synthetic", "b32", "qq_gauss", "3.0", "none", "12.50", ""),
        ("voc21", "b16", "full", "5.0", "none", "61.25", ""),
    ]
    assert rows[1]["overrides"] == (
        "backbone=b32 attention=qq_gauss arch=reduced refine=none dataset=synthetic logger=local"
    )
    assert rows[2]["num_images"] == "4" and rows[2]["protocol"] == "dataset"


# ------------------------------------------------------------------------------------------- methods table
def method_result(method: str, dataset: str, miou: float, *, refine: str, proxy: str, protocol: str) -> dict:
    """A TEST fixture: a registered method's run as result.json (its attention/arch are the schema defaults)."""
    refine_cfg = {"name": "pamr", "steps": 10, "dilations": [8, 16]} if refine == "pamr" else {"name": "none"}
    choices = {
        "backbone": "b16",
        "method": method,
        "attention": "full",
        "arch": "reduced",
        "refine": refine,
        "proxy": proxy,
        "dataset": dataset,
    }
    return {
        "choices": choices,
        "miou": miou,
        "finished_at": "2026-01-01T00:00:00+00:00",
        "config": {"dataset": {"protocol": protocol}, "refine": refine_cfg, "attention": {"sigma": None}},
    }


def preset_choice(method: str, group: str) -> str | None:
    """The option a method's preset file overrides for ``group`` (read from the YAML here, not through naclip)."""
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml"))
    for entry in preset.get("defaults", []):
        if isinstance(entry, dict) and f"override /{group}" in entry:
            return entry[f"override /{group}"]
    return None


def test_methods_table_takes_each_method_under_its_own_refine_and_proxy():
    """A method's rows take only runs with the refine and proxy its preset chooses (CASS: its PAMR choice and DINO
    ViT-B/8; ProxyCLIP: DINO ViT-B/8, no PAMR; NACLIP: no PAMR); a run with another says why it fills no cell."""
    cass_refine = preset_choice("cass", "refine") or "none"
    other_refine = "none" if cass_refine == "pamr" else "pamr"
    assert preset_choice("cass", "proxy") == preset_choice("proxyclip", "proxy") == "dino_b8"
    assert preset_choice("proxyclip", "refine") is None and preset_choice("naclip", "refine") is None
    cass = [
        method_result("cass", d, 40.0 + i, refine=cass_refine, proxy="dino_b8", protocol="cass")
        for i, d in enumerate(DATASETS)
    ]
    others = [
        method_result("cass", "voc21", 1.0, refine=other_refine, proxy="dino_b8", protocol="cass"),
        method_result("cass", "pc60", 2.0, refine=cass_refine, proxy="dinov3_b16", protocol="cass"),
        method_result("cass", "voc21", 3.0, refine=cass_refine, proxy="dino_b8", protocol="dataset"),  # shared
        method_result("proxyclip", "voc21", 4.0, refine="none", proxy="dino_b8", protocol="proxyclip"),
        method_result("proxyclip", "pc60", 5.0, refine="pamr", proxy="dino_b8", protocol="proxyclip"),
        method_result("proxyclip", "coco_object", 6.0, refine="none", proxy="dino_b16", protocol="proxyclip"),
    ]
    naclip = [fake_result(dataset="voc21", miou=7.0), fake_result(dataset="pc60", miou=8.0, refine="pamr")]
    for result in naclip:
        result["choices"]["method"] = "naclip"
    table = methods_table([*cass, *others, *naclip])
    assert row(table, "CASS [fp32]") == [40.0, 41.0, 42.0, 43.0, 44.0, 45.0, 46.0, 47.0, 43.5]
    assert row(table, "CASS (shared protocol) [fp32]")[:2] == [3.0, None]
    assert row(table, "ProxyCLIP [fp32]")[:3] == [4.0, None, None]
    assert row(table, "NACLIP [fp32]")[:2] == [7.0, None]
    assert ("PAMR for CASS only" if cass_refine == "pamr" else "no PAMR") in table.title
    note = setting_note([*cass, *others])
    assert note is not None and note.startswith("left out 4 results")  # the CASS runs of its own protocol fill cells
    assert f"method=cass but refine={other_refine} (its own: {cass_refine})" in note
    assert "method=cass but proxy=dinov3_b16 (its own: dino_b8)" in note
    assert "method=proxyclip but refine=pamr (its own: none)" in note
    assert "method=proxyclip but proxy=dino_b16 (its own: dino_b8)" in note


# Published rows as their sources print them, keyed by column header (the sources order their columns differently).
PUBLISHED = {
    # CASS project page, static/images/miou.png (columns V21 PC60 C-Obj V20 PC59 C-Stf City ADE, stated Avg. 44.4)
    "CASS": (
        {"V21": 65.8, "PC60": 36.7, "C-Obj": 37.8, "V20": 87.8, "PC59": 40.2, "C-Stf": 26.7, "City": 39.4, "ADE": 20.4},
        44.4,
    ),
    # SC-CLIP repository, figs/scclip.jpg (radar: VOC21, COCO Stuff, ADE, Context59, CityScapes, VOC20, COCO Object,
    # Context60)
    "SC-CLIP": (
        {"V21": 64.6, "C-Stf": 26.6, "ADE": 20.1, "PC59": 40.1, "City": 41.0, "V20": 84.3, "C-Obj": 37.7, "PC60": 36.8},
        43.9,
    ),
    # ResCLIP repository, figs/main_results_w.png and main_results_wo.png (+ResCLIP on NACLIP, ViT-B/16)
    "ResCLIP": (
        {"V21": 61.1, "PC60": 33.5, "C-Obj": 35.0, "V20": 86.0, "PC59": 36.8, "C-Stf": 24.7, "City": 35.9, "ADE": 18.0},
        41.4,
    ),
    # CLIP Surgery repository, figs/fig6.jpg (PASCAL Context 29.3 of unstated class count, COCO Stuff, Cityscapes)
    "CLIP Surgery": ({"C-Stf": 21.9, "City": 31.4}, None),
    "GEM": ({}, None),
    "ProxyCLIP": ({}, None),
}


def test_published_rows_hold_each_source_number_in_its_column():
    """Every published cell is the source's number under the same benchmark, `–` where the source prints none, and
    the average is the source's stated one when all eight are printed."""
    table = methods_table([])
    labels = {label.split(" (published, ")[0]: label for label, _ in table.rows if " (published, " in label}
    for method, (cells, average) in PUBLISHED.items():
        got = dict(zip(table.columns, dict(table.rows)[labels[method]], strict=True))
        for column in HEADERS[:-1]:
            assert got[column] == cells.get(column), (method, column)
        if average is None:
            assert got["Avg"] is None, method
        else:
            assert got["Avg"] == average, method  # CASS: the exact mean 44.35 is printed 44.4
    assert "CASS project page" in labels["CASS"] and "figs/scclip.jpg" in labels["SC-CLIP"]
    assert "figs/fig6.jpg" in labels["CLIP Surgery"] and "none in the authors' repository" in labels["GEM"]


def composed_result(overrides: list[str], miou: float) -> dict:
    """A TEST fixture: the result.json naclip.run would write for these overrides (composed config and choices)."""
    from composing import compose_config
    from omegaconf import open_dict

    cfg = compose_config(["backbone=b16", *overrides], hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and k != "schema" and v}
    with open_dict(cfg):
        del cfg["hydra"]
    config = OmegaConf.to_container(cfg, resolve=True)
    return {"choices": choices, "miou": miou, "finished_at": "2026-01-01T00:00:00+00:00", "config": config}


# a registered method, a dataset, and one option of its own that its published setting fixes
OWN_OPTION_CHANGES = [
    ("proxyclip", "voc21", "proxyclip.beta=1.0", "proxyclip.beta=1.0 (paper setting: 1.2)"),
    ("proxyclip", "ade", "proxy.model=vit_small_patch16_224.dino", "proxy.model='vit_small_patch16_224.dino'"),
    ("cass", "voc21", "cass.h_threshold=0.2", "cass.h_threshold=0.2 (paper setting: 0.1)"),
    ("resclip", "ade", "resclip.temp_thd=0.3", "resclip.temp_thd=0.3"),
    ("scclip", "pc59", "scclip.res_cls=0.5", "scclip.res_cls=0.5 (paper setting: 0.3)"),
    ("gem", "voc21", "gem.depth=5", "gem.depth=5 (paper setting: 7)"),
    ("clip_surgery", "ade", "clip_surgery.depth=5", "clip_surgery.depth=5 (paper setting: 7)"),
]


@pytest.mark.parametrize(("method", "dataset", "change", "why"), OWN_OPTION_CHANGES, ids=lambda v: str(v)[:24])
def test_methods_table_takes_only_runs_with_the_methods_own_published_options(method, dataset, change, why):
    """A run of a method's preset and published protocol, as composed, fills its cell; the same run with one of the
    method's own options (or its proxy's model) changed fills none and the note says which value left it out."""
    column = HEADERS[DATASETS.index(dataset)]
    label = {"proxyclip": "ProxyCLIP", "cass": "CASS", "resclip": "ResCLIP", "scclip": "SC-CLIP", "gem": "GEM"}
    label["clip_surgery"] = "CLIP Surgery"
    own = composed_result([f"method={method}", f"dataset={dataset}"], 41.0)
    changed = composed_result([f"method={method}", f"dataset={dataset}", change], 42.0)
    table = methods_table([own])
    name = f"{label[method]} [fp32]"
    assert row(table, name)[table.columns.index(column)] == 41.0
    assert setting_note([own]) is None
    assert set(row(methods_table([changed]), label[method])) == {None}  # no measured cell: no precision in the label
    note = setting_note([changed])
    assert note is not None and why in note
    assert row(methods_table([own, changed]), name)[table.columns.index(column)] == 41.0  # the newer one is not used


def test_a_random_proxy_is_a_random_weights_result():
    """Real CLIP weights with a random proxy measure no trained method: the result is caveated as random weights."""
    from naclip.results import caveats, provenance

    result = composed_result(["method=proxyclip", "dataset=voc21", "proxy.pretrained=null"], 40.0)
    assert result["config"]["backbone"]["pretrained"] == "openai"
    assert caveats(result) == ["random-weights"]  # judged from the config (no provenance block)
    assert provenance(result["config"], 1449, 0)["random_weights"] is True
    real = composed_result(["method=proxyclip", "dataset=voc21", "proxy.pretrained=/w/dino.safetensors"], 40.0)
    assert caveats(real) == [] and provenance(real["config"], 1449, 0)["random_weights"] is False
    kept, _ = select_results([result, real])
    assert kept == [real]
