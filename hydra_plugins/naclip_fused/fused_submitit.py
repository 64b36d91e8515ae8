"""``hydra/launcher=fused_slurm`` and ``fused_submitit_local``: one submitit job per group of a fused sweep.

The sweep is cut into the units ``hydra/launcher=fused`` runs it in (:func:`naclip.sweep.plan`): each group of jobs
sharing one pass becomes one job of a submitit array and runs :func:`naclip.sweep.launch_fused` on its members; a
job alone (alone in its group, invalid, finished) runs exactly as under hydra-submitit-launcher's own launchers.
A group job that dies (killed, out of memory, past its time limit) leaves every member without a result re-runnable
and recorded as failed, so the sweep summary lists it and re-submitting the sweep runs just those; a pre-empted one
is requeued by submitit with the same members (``checkpoint``), and its finished members are then skipped.

Like the other plugin module, this imports only Hydra (and the submitit launcher's Hydra side) at the top.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this file outside sys.modules.
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

# One member of a submitted unit: the job's overrides and its number in the sweep.
Member = tuple[list[str], int]


class FusedSubmititLauncher(BaseSubmititLauncher):
    """hydra-submitit-launcher with the sweep's fused groups as its jobs (one array over the units)."""

    def __call__(  # type: ignore[override]  # submitit calls it with one unit of the sweep
        self, members: Sequence[Member], singleton_state: dict[type, Singleton]
    ) -> list[JobReturn]:
        """Body of one submitted job: a lone job as the plain launcher runs it, a group as one fused pass."""
        import submitit

        from naclip.sweep import launch_fused

        if len(members) == 1:
            overrides, num = members[0]
            return [super().__call__(overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", singleton_state)]
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        job_id = submitit.JobEnvironment().job_id
        sweep_configs = []
        for overrides, num in members:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.id = job_id
                sweep_config.hydra.job.num = num
            sweep_configs.append(sweep_config)
        return launch_fused(sweep_configs, self.hydra_context, self.task_function, self.config)

    def _executor(self) -> Any:
        """The submitit executor of hydra.launcher's settings, mapped as hydra-submitit-launcher maps them."""
        import submitit

        init_only = {"submitit_folder", "max_num_timeout"}
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_only}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from naclip.sweep import plan

        if self.config is None or self.hydra_context is None:
            raise RuntimeError(f"{type(self).__name__}.launch called before setup")
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        sweep_configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.num = idx
            sweep_configs.append(sweep_config)
        units = plan(sweep_configs)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        log.info(f"Submitting {len(units)} jobs for {len(job_overrides)} configs, one per fused group")
        for k, unit in enumerate(units):
            log.info(f"\tjob {k} ({'one fused pass' if len(unit) > 1 else 'alone'}):")
            for i, _ in unit:
                log.info(f"\t\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
        params = [[(list(job_overrides[i]), initial_job_idx + i) for i, _ in unit] for unit in units]
        submitted = self._executor().map_array(self, params, [Singleton.get_state()] * len(units))
        returns: dict[int, JobReturn] = {}
        for unit, job in zip(units, submitted, strict=True):
            returns.update(zip((i for i, _ in unit), _unit_returns(job, unit, job_overrides), strict=True))
        return [returns[i] for i in range(len(job_overrides))]


def _unit_returns(job: Any, unit: list[tuple[int, Path]], job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
    """What a submitted unit returned; when it died before returning, each member still without an outcome in this
    sweep is recorded as failed (its folder keeps whatever it had) and returns None, as a job with a known error does.
    """
    from submitit.core.utils import UncompletedJobError

    from naclip import jobs

    try:
        return job.results()[0]  # the first task's: under several tasks rank 0 reports
    except UncompletedJobError as err:  # FailedJobError too: the job raised an unexpected error
        state = re.search(r"\(state: (\w+)\)", str(err))
        why = f"state {state.group(1)}" if state else "an unexpected error"
        cause = f"its submitit job {job.job_id} ended before this job finished ({why}; log: {job.paths.stderr})"
    sweep_id = os.environ.get(jobs.SWEEP_ENV)
    returns = []
    for index, out_dir in unit:
        if not jobs.collect(out_dir, sweep_id):  # no outcome of this sweep: it never finished
            log.error(f"{out_dir.name}: {cause}; re-submitting the sweep re-runs it")
            jobs.record_failure(out_dir, cause)
        returns.append(
            JobReturn(overrides=list(job_overrides[index]), working_dir=str(out_dir), status=JobStatus.COMPLETED)
        )
    return returns


class FusedLocalLauncher(FusedSubmititLauncher):
    _EXECUTOR = "local"


class FusedSlurmLauncher(FusedSubmititLauncher):
    _EXECUTOR = "slurm"
