"""naclip.run's config composed in the test process, as the Hydra app composes it (no process is started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from naclip import config


def compose_config(overrides: list[str], *, hydra_config: bool = False) -> DictConfig:
    """The composed `config` for these command-line overrides (with Hydra's own node when `hydra_config`)."""
    config.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=hydra_config)
    finally:
        GlobalHydra.instance().clear()


def job_config(overrides: list[str], *, mode: RunMode | None = None) -> DictConfig:
    """A job's config as the runner's task function gets it: `HydraConfig` set (run or multirun `mode` when
    given), the `hydra` node left out."""
    cfg = compose_config(overrides, hydra_config=True)
    if mode is not None:
        cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def evaluate_job(overrides: list[str], out_dir: Path, *, mode: RunMode | None = None) -> dict[str, Any]:
    """naclip.run's evaluate of one job in this process, with the config the Hydra app would give it."""
    from naclip.run import evaluate

    return evaluate(job_config(overrides, mode=mode), out_dir)
