"""Fused groups as submitit jobs: ``hydra/launcher=fused_submitit_local`` (and ``fused_slurm``, the same code on SLURM).

The fast tests drive the launcher in this process with a stand-in executor, to check what it submits and how it
collects; the slow ones run real sweeps and compare them with ``hydra/launcher=fused`` on the same jobs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from hydra.utils import instantiate
from processes import SWEEP_SMOKE, comparable, sweep_cli, sweep_results
from submitit.core.utils import UncompletedJobError

from naclip import config as naclip_config
from naclip import jobs

CONF = Path(naclip_config.config_dir())
LOCAL = ["hydra/launcher=fused_submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]


pytestmark = pytest.mark.usefixtures("isolated_cached")


# ----------------------------------------------------------- the submission plan (fast: in-process, no SLURM)
@pytest.fixture
def slurm(monkeypatch, tmp_path) -> dict[str, Any]:
    """A stand-in SLURM: `sbatch` keeps the script it is given and answers job 4242; each array element's
    `results()` returns one value per member of its unit (their job numbers), or raises as a job that died does
    for the elements listed in `died`."""
    from submitit.slurm.slurm import SlurmJob

    fake = {"died": set(), "sizes": [], "script": tmp_path / "submitted.sh"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {fake["script"]}\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def results(job: SlurmJob) -> list[Any]:
        element = int(job.job_id.split("_")[1])
        if element in fake["died"]:
            message = f"Job {job.job_id} (task: 0) with path /x/r.pkl\nhas not produced any output (state: NODE_FAIL)"
            raise UncompletedJobError(message)
        members = range(fake["sizes"][element])
        return [[JobReturn(status=JobStatus.COMPLETED, _return_value=(element, k)) for k in members]]

    monkeypatch.setattr(SlurmJob, "results", results)
    return fake


def _launcher(overrides: list[str]) -> Any:
    """hydra/launcher=fused_slurm set up as Hydra sets it up for a multirun."""
    naclip_config.register()
    initialize_config_dir(config_dir=str(CONF), version_base="1.3")
    master = compose("config", overrides=["hydra/launcher=fused_slurm", *overrides], return_hydra_config=True)
    launcher = instantiate(master.hydra.launcher)
    hydra_context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks())
    launcher.setup(hydra_context=hydra_context, task_function=lambda cfg: None, config=master)
    return launcher


def test_one_array_over_the_fused_groups_with_the_slurm_settings(slurm):
    sweep = [
        [*SWEEP_SMOKE, "attention.sigma=2"],  # 0: group A
        [*SWEEP_SMOKE, "attention.sigma=6", "refine=pamr"],  # 1: group A (heads only)
        [*SWEEP_SMOKE, "backbone=b16"],  # 2: alone (another backbone)
        [*SWEEP_SMOKE, "attention.sigma=-1"],  # 3: invalid: alone, fails as under the plain launcher
        [*SWEEP_SMOKE, "attention=kk_sim", "arch=vanilla"],  # 4: group A
        [*SWEEP_SMOKE, "max_images=1", "attention.sigma=2"],  # 5: group B (other images)
        [*SWEEP_SMOKE, "max_images=1", "attention.sigma=6"],  # 6: group B
    ]
    slurm["sizes"] = [3, 1, 1, 2]  # A, job 2, job 3, B: the order of their first job
    launcher = _launcher(["hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=3"])
    returns = launcher.launch(sweep, initial_job_idx=0)

    # every job's return comes back in the sweep's order, from its unit's array element
    assert [r.return_value for r in returns] == [(0, 0), (0, 1), (1, 0), (2, 0), (0, 2), (3, 0), (3, 1)]
    script = slurm["script"].read_text().splitlines()
    for line in (
        "--array=0-3%3",
        "--partition=gpu",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--time=240",
    ):  # four jobs for seven configs; conf/hydra/launcher/slurm.yaml's settings
        assert f"#SBATCH {line}" in script, line


def test_a_dead_group_job_leaves_its_unfinished_jobs_failed_and_rerunnable(slurm, monkeypatch, tmp_path):
    sweep = [
        [*SWEEP_SMOKE, "attention.sigma=2"],
        [*SWEEP_SMOKE, "attention.sigma=6"],
        [*SWEEP_SMOKE, "attention.sigma=9"],
        [*SWEEP_SMOKE, "backbone=b16"],
    ]
    slurm["sizes"], slurm["died"] = [3, 1], {0}
    monkeypatch.setenv(jobs.SWEEP_ENV, "this-sweep")
    folders = tmp_path / "outputs" / "sweeps" / "default"
    # Hydra's folder name: the sorted overrides (num_workers is left out, conf/config.yaml)
    finished = folders / ",".join(sorted(o for o in sweep[0] if not o.startswith("num_workers")))
    jobs.record_success(finished, 12.5)  # the group's first job finished before its job died
    returns = _launcher([]).launch(sweep, initial_job_idx=0)

    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 4  # the sweep goes on to its summary
    assert [r.return_value for r in returns] == [None, None, None, (1, 0)]
    outcomes = {o.folder.name.split(",")[0]: o for o in jobs.collect(folders, "this-sweep")}
    assert set(outcomes) == {"attention.sigma=2", "attention.sigma=6", "attention.sigma=9"}
    assert outcomes["attention.sigma=2"].status == "finished"  # its own outcome is kept
    for name in ("attention.sigma=6", "attention.sigma=9"):
        assert outcomes[name].status == "failed"
        assert "submitit job 4242_0 ended before this job finished" in outcomes[name].detail
        assert "(state NODE_FAIL; log: " in outcomes[name].detail and "4242_0_0_log.err" in outcomes[name].detail
        assert not (outcomes[name].folder / "result.json").exists()


# ----------------------------------------------------------------------------------------- real sweeps (slow)
def summary(proc: subprocess.CompletedProcess) -> list[str]:
    """The summary lines, without the job id the submitit launchers put in a dead job's reason."""
    lines = proc.stdout[proc.stdout.index("naclip.run: sweep summary") :].splitlines()
    return [line for line in lines if line.startswith(("naclip.run: sweep summary", "  "))]


@pytest.mark.slow
def test_same_results_summary_and_exit_code_as_the_fused_launcher(tmp_path, cache):
    """Two groups on synthetic data and one on a dataset that is not there: the failing group leaves the others'
    results, and every job, summary line and exit code equals hydra/launcher=fused's, results bit for bit."""
    sweep = [*SWEEP_SMOKE, "attention.sigma=2,6", "refine=none,pamr", "dataset=synthetic,ade"]
    local = sweep_cli([*sweep, "hydra/launcher=fused"], tmp_path / "local", cache)
    cluster = sweep_cli([*sweep, *LOCAL], tmp_path / "cluster", cache)
    assert local.returncode == cluster.returncode == 1, cluster.stderr[-3000:]
    want, got = sweep_results(tmp_path / "local"), sweep_results(tmp_path / "cluster")
    assert len(want) == 4 and set(got) == set(want)
    assert len({r["miou"] for r in want.values()}) > 1
    for name, result in want.items():
        assert comparable(got[name]) == comparable(result), name
        folder = tmp_path / "cluster" / "sweeps" / "default" / name
        assert "evaluated in one fused pass shared by 4 jobs" in (folder / "run.log").read_text()
        assert {p.name for p in (folder / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert summary(cluster) == summary(local)
    assert summary(cluster)[0] == "naclip.run: sweep summary: 4 finished, 0 skipped, 4 failed"
    assert "Traceback" not in cluster.stderr
    jobs_submitted = list((tmp_path / "cluster" / "sweeps" / "default" / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs_submitted) == 2  # 8 configs, 2 groups: one job each


KILLER = '''
import os
import signal

from hydra.experimental.callback import Callback


class KillAt(Callback):
    """Kills the submitit job (as a node failure or the OOM killer would) as the job with this sigma starts."""

    def __init__(self, sigma):
        self.sigma = sigma

    def on_job_start(self, config, **kwargs):
        if "SUBMITIT_EXECUTOR" in os.environ and config.attention.sigma == self.sigma:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
def test_a_killed_group_job_reruns_only_its_unfinished_jobs(tmp_path, cache):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "killer.py").write_text(KILLER)
    sweep = [*SWEEP_SMOKE, "attention.sigma=2,4,6", *LOCAL]
    out = tmp_path / "out"
    killed = sweep_cli(
        [*sweep, "+hydra.callbacks.killer._target_=killer.KillAt", "+hydra.callbacks.killer.sigma=4"],
        out,
        cache,
        PYTHONPATH=f"{tmp_path / 'plugins'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert summary(killed)[0] == "naclip.run: sweep summary: 1 finished, 0 skipped, 2 failed"
    assert "re-submitting the sweep re-runs it" in killed.stdout  # logged by the launcher
    first = sweep_results(out)
    assert [r["config"]["attention"]["sigma"] for r in first.values()] == [2.0]

    again = sweep_cli(sweep, out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(again)[0] == "naclip.run: sweep summary: 2 finished, 1 skipped, 0 failed"
    assert "Submitting 2 jobs for 3 configs" in again.stdout  # the finished job alone, the other two fused
    done = sweep_results(out)
    assert sorted(r["config"]["attention"]["sigma"] for r in done.values()) == [2.0, 4.0, 6.0]
    (name,) = first
    assert done[name] == first[name]  # untouched
    fused = sweep_cli([*SWEEP_SMOKE, "attention.sigma=4,6", "hydra/launcher=fused"], tmp_path / "local", cache)
    assert fused.returncode == 0
    want = sweep_results(tmp_path / "local")
    for name, result in want.items():
        assert comparable(done[name]) == comparable(result), name


@pytest.mark.slow
def test_a_group_with_two_tasks_is_one_distributed_pass(tmp_path, cache):
    """tasks_per_node=2: the group's one job shards its pass over two ranks (gloo), with one process's numbers."""
    sweep = [*SWEEP_SMOKE, "dataset.num_images=3", "batch_size=1", "attention.sigma=2,6"]
    local = sweep_cli([*sweep, "hydra/launcher=fused"], tmp_path / "local", cache)
    ranks = sweep_cli([*sweep, *LOCAL, "hydra.launcher.tasks_per_node=2"], tmp_path / "ranks", cache)
    assert local.returncode == ranks.returncode == 0, ranks.stderr[-3000:]
    want, got = sweep_results(tmp_path / "local"), sweep_results(tmp_path / "ranks")
    assert len(want) == 2 and set(got) == set(want)
    for name, result in want.items():
        assert (got[name]["world_size"], result["world_size"]) == (2, 1)
        assert got[name]["num_images"] == result["num_images"] == 3
        for key in ("miou", "pixel_acc", "per_class_iou"):
            assert got[name][key] == result[key], (name, key)
