"""Scaling out naclip.run: rank sharding, torchrun (gloo, CPU), submitit sweeps, the SLURM preset, batching.

The end-to-end tests start real processes (`python -m naclip.run`, `torch.distributed.run`, submitit's local
executor) on the synthetic dataset with random ViT-B/32 weights, so they are marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from composing import job_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from processes import run_python

from naclip import config
from naclip.run import setup_distributed, shard_indices

# seed=3 draws random weights that predict all four synthetic classes on these scenes, so every per-class IoU
# is informative (seed 0 paints everything "green square", which would hide a shard counted twice or lost).
SMOKE = ["dataset=synthetic", "backbone=b32", "backbone.pretrained=null", "num_workers=0", "seed=3"]
ODD = [*SMOKE, "dataset.num_images=5"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _result(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "result.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's runs, so the text cache is shared between them."""
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(work: Path) -> dict[str, Any]:
    """One process, one image per step: the reference the other runs must reproduce."""
    run_python(["-m", "naclip.run", *ODD, "batch_size=1", f"hydra.run.dir={work / 'b'}"], work)
    result = _result(work / "b")
    assert sum(iou > 0 for iou in result["per_class_iou"].values()) == 4, result["per_class_iou"]
    return result


# -- shard_indices and setup_distributed (fast) ---------------------------------------------------------------


@pytest.mark.parametrize("num_items", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shards_are_disjoint_complete_and_unpadded(num_items: int, world: int) -> None:
    shards = [shard_indices(num_items, rank, world) for rank in range(world)]
    flat = [i for shard in shards for i in shard]
    assert len(flat) == num_items  # no padding, no drops
    assert sorted(flat) == list(range(num_items))  # each item exactly once
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced: no rank waits on a much larger shard
    assert all(shard == sorted(shard) for shard in shards)


def test_shard_of_rank_is_round_robin() -> None:
    assert shard_indices(5, 0, 2) == [0, 2, 4]
    assert shard_indices(5, 1, 2) == [1, 3]
    assert shard_indices(2, 2, 3) == []


def test_without_torchrun_is_rank_zero_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed("cpu") == (0, 1)


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """One rank of a gloo group running the runner's evaluate, with the variables torchrun would export."""
    torch.set_num_threads(1)  # forked from a process that used OpenMP: stay single-threaded
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from naclip.run import evaluate

    cfg = job_config(overrides)
    try:
        evaluate(cfg, Path(out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_count_every_image(tmp_path: Path) -> None:
    """Two forked ranks (gloo) split 3 images 2 + 1: the result counts all 3, whichever rank writes it."""
    out = tmp_path / "job"
    overrides = [*SMOKE, "dataset.num_images=3", f"text_cache_dir={tmp_path / 'cache'}"]
    mp.start_processes(_rank, args=(2, _free_port(), overrides, str(out)), nprocs=2, join=True, start_method="fork")
    result = _result(out)
    assert (result["world_size"], result["num_images"]) == (2, 3)
    seconds = result["seconds_eval"]  # rounded to the millisecond; images_per_sec comes from the unrounded time
    assert 3 / (seconds + 0.0005) - 1e-4 <= result["images_per_sec"] <= 3 / (seconds - 0.0005) + 1e-4


# -- SLURM launcher preset (in-process compose, fast) ---------------------------------------------------------


def _hydra_launcher(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher


def test_slurm_preset_composes_with_its_defaults() -> None:
    launcher = _hydra_launcher(["hydra/launcher=slurm"])
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition is None
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (1, 1, 8)
    assert (launcher.timeout_min, launcher.array_parallelism, launcher.mem_gb) == (240, 64, 32)


def test_slurm_preset_keys_are_overridable() -> None:
    launcher = _hydra_launcher(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.array_parallelism=8",
            "+hydra.launcher.additional_parameters.account=lab",
        ]
    )
    assert launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.timeout_min, launcher.array_parallelism) == (4, 30, 8)
    assert launcher.additional_parameters == {"account": "lab"}


def test_slurm_preset_rejects_a_misspelt_key() -> None:
    with pytest.raises(ConfigCompositionException):
        _hydra_launcher(["hydra/launcher=slurm", "hydra.launcher.partiton=gpu"])


def test_slurm_launcher_without_slurm_is_one_line_before_the_sweep(tmp_path, monkeypatch, capsys) -> None:
    from naclip.jobs import JobSummary

    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            return_hydra_config=True,
        )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no srun here
    with pytest.raises(SystemExit) as exc:
        JobSummary().on_multirun_start(cfg)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "naclip.run: error: hydra/launcher=slurm needs a SLURM cluster ('srun' is not on PATH); on "
        "this machine use hydra/launcher=submitit_local to try the launcher, or hydra/launcher=fused"
    ]
    assert not (tmp_path / "sweep").exists()

    srun = tmp_path / "bin" / "srun"  # on a cluster the sweep starts
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    JobSummary().on_multirun_start(cfg)
    assert (tmp_path / "sweep").is_dir() and capsys.readouterr().err == ""


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_a_known_error_under_torchrun_is_printed_once(tmp_path, monkeypatch, capsys, rank, printed) -> None:
    """Every rank meets the same bad input; only rank 0 prints its line (each rank's log keeps it)."""
    from naclip.run import report_failure

    monkeypatch.setenv("RANK", rank)
    report_failure(tmp_path, ValueError("dataset root /nope does not exist"))
    expected = ["naclip.run: error: dataset root /nope does not exist"] if printed else []
    assert capsys.readouterr().err.splitlines() == expected


def _cli(monkeypatch: pytest.MonkeyPatch, rank: str, overrides: list[str]) -> None:
    """`python -m naclip.run <overrides>` in this process, as the rank torchrun would start."""
    from naclip import run

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["naclip.run", *overrides])
    GlobalHydra.instance().clear()
    run.main()


@pytest.mark.parametrize(("rank", "printed"), [("0", 1), ("1", 0), ("3", 0)])
def test_a_composition_error_under_torchrun_is_printed_by_rank_zero_only(monkeypatch, capsys, rank, printed) -> None:
    """Hydra composes the config on every rank before any naclip code runs: its message must not repeat per rank."""
    before = sys.stderr
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, rank, ["dataset=nope"])
    assert exc.value.code != 0  # every rank still fails, so torchrun stops
    assert sys.stderr is before  # the held-back stream is given back
    assert capsys.readouterr().err.count("Could not find 'dataset/nope'") == printed


def test_a_rank_gets_its_stderr_back_once_its_job_starts(tmp_path, monkeypatch, capsys) -> None:
    """Held back only during composition: what a rank's job writes to stderr (an unexpected crash) is shown."""
    from naclip import run

    def evaluate(cfg: Any, out_dir: Path) -> dict[str, float]:
        print("rank 1 job says", file=sys.stderr)
        return {"miou": 1.0}

    monkeypatch.setattr(run, "evaluate", evaluate)
    _cli(monkeypatch, "1", [*SMOKE, f"hydra.run.dir={tmp_path}"])
    assert capsys.readouterr().err.count("rank 1 job says") == 1


# -- end to end (slow) ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_on_odd_count(work: Path, single: dict[str, Any]) -> None:
    port = _free_port()
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    # force: the reference run in the sibling folder b holds a finished result for this same config
    run = [*args, "-m", "naclip.run", *ODD, "batch_size=1", "force=true", f"hydra.run.dir={work / 'a'}"]
    proc = run_python(run, work)
    ranked = _result(work / "a")

    assert (ranked["world_size"], single["world_size"]) == (2, 1)
    assert ranked["num_images"] == single["num_images"] == 5
    assert ranked["per_class_iou"] == single["per_class_iou"]
    assert ranked["miou"] == single["miou"]
    assert ranked["pixel_acc"] == single["pixel_acc"]
    assert ranked["config"] == {**single["config"], "force": True}
    # rank 0 alone writes and reports: both ranks log to the run folder's log, only one of them wrote the result
    log = (work / "a" / "run.log").read_text()
    assert log.count("No pretrained weights loaded") == 2
    assert log.count("result written to") == 1
    assert proc.stdout.count("mIoU ") == 1
    assert not list((work / "outputs").rglob("result.json"))  # nothing in the default outputs root either


@pytest.mark.slow
def test_batched_images_match_one_at_a_time(work: Path, single: dict[str, Any]) -> None:
    # 5 images in batches of 3 and 2: crops of several images share encoder forwards, and a short last batch
    # force: batch size is not part of the result config, so b's finished result would be reused instead
    run_python(["-m", "naclip.run", *ODD, "batch_size=3", "force=true", f"hydra.run.dir={work / 'c'}"], work)
    batched = _result(work / "c")
    assert batched["num_images"] == 5
    assert batched["per_class_iou"] == single["per_class_iou"]
    assert batched["miou"] == single["miou"]
    assert batched["pixel_acc"] == single["pixel_acc"]


@pytest.mark.slow
def test_submitit_local_sweep_finishes_then_skips_then_forces(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        "-m",
        "naclip.run",
        "-m",
        "hydra/launcher=submitit_local",
        *SMOKE,
        "dataset.num_images=2",
        "attention=full,kk_sim",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.tasks_per_node=1",
    ]

    def results() -> dict[str, dict[str, Any]]:
        found = {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/result.json")}
        assert len(list(sweep.rglob("result.json"))) == len(found)  # nothing written outside the job folders
        return found

    run_python(command, tmp_path)
    first = results()
    assert sorted(r["config"]["attention"]["name"] for r in first.values()) == ["full", "kk_sim"]
    for folder, result in first.items():
        assert f"attention={result['config']['attention']['name']}" in folder
        assert result["num_images"] == 2 and result["world_size"] == 1
    full, kk_sim = sorted(first.values(), key=lambda r: r["config"]["attention"]["name"])
    assert full["per_class_iou"] != kk_sim["per_class_iou"]  # the swept value reached each job

    run_python(command, tmp_path)
    assert results() == first  # both skipped: files untouched, finished_at unchanged

    run_python([*command, "force=true"], tmp_path)
    forced = results()
    assert forced.keys() == first.keys()  # force is left out of the folder name: same jobs, same folders
    for folder, result in forced.items():
        assert result["finished_at"] > first[folder]["finished_at"]
        assert result["per_class_iou"] == first[folder]["per_class_iou"]


@pytest.mark.slow
def test_submitit_job_with_two_tasks_is_one_distributed_evaluation(work: Path, single: dict[str, Any]) -> None:
    sweep = work / "tasks"
    run_python(
        [
            "-m",
            "naclip.run",
            "-m",
            "hydra/launcher=submitit_local",
            *ODD,
            "batch_size=1",
            f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.tasks_per_node=2",
        ],
        work,
    )
    (path,) = sweep.rglob("result.json")
    result = json.loads(path.read_text())
    assert result["world_size"] == 2 and result["num_images"] == 5
    assert result["per_class_iou"] == single["per_class_iou"]
