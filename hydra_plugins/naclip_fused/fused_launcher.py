"""``hydra/launcher=fused``: a multirun whose jobs share backbone and data is evaluated in one pass per group.

Hydra imports every module under ``hydra_plugins`` when an app starts, so this one imports only Hydra at
the top; naclip (and torch) load when a fused sweep actually launches.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this file outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.naclip_fused.fused_launcher.FusedLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="naclip")


class FusedLauncher(Launcher):
    """Local launcher that runs every group of jobs sharing their shared work in one pass (naclip.sweep)."""

    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from naclip.sweep import launch_fused

        if self.config is None or self.hydra_context is None or self.task_function is None:
            raise RuntimeError("FusedLauncher.launch called before setup")
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, fused where they share their data and backbone")
        sweep_configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            sweep_configs.append(sweep_config)
        return launch_fused(sweep_configs, self.hydra_context, self.task_function, self.config)
