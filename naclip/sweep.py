"""Fused sweeps, runner side: group a multirun's jobs by the work they share and evaluate each group in one pass.

Jobs whose configs differ only in their heads (attention, arch, σ, refine, prob_thd, logit_scale) and in
bookkeeping (logger, force, folder names) decode the same images and run the same blocks 1..L-1 on the same
crops: :func:`evaluate_group` does that once for all of them (see :class:`naclip.fused.FusedSegmenter`).
:func:`launch_fused` is the body of the ``hydra/launcher=fused`` plugin (``hydra_plugins/naclip_fused``):
every job still goes through Hydra's ``run_job`` (its folder, ``.hydra/``, log, callbacks), and writes its
result with naclip.run's own functions, so a fused job's result.json is the one it would write alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from naclip import config, jobs, run
from naclip.data import DatasetError, SegmentationDataset
from naclip.fused import FusedSegmenter
from naclip.metrics import IoUMetric

log = logging.getLogger("naclip.sweep")

# Config keys that only change a job's own head and post-processing: jobs differing only there share a pass.
HEAD_KEYS = (
    "method",
    "attention",
    "arch",
    "refine",
    "dataset.prob_thd",
    "dataset.area_thd",
    "dataset.logit_scale",
    "dataset.protocol",
    "resclip",
    "scclip",
    "gem",
    "clip_surgery",
    "proxyclip",
    "cass",
    "method_options",
)
# Per-job bookkeeping that changes neither the shared pass nor the numbers.
JOB_KEYS = ("logger", "force", "experiment_name", "output_root", "text_cache_dir", "log_every")


def group_key(cfg: DictConfig) -> str:
    """Equal for jobs that share decoding, resizing and blocks 1..L-1: the config without heads and bookkeeping.

    Any key not listed in HEAD_KEYS or JOB_KEYS (backbone, dataset and its protocol, max_images, batch sizes,
    seed, ...) separates groups, so a key added later can only make groups smaller, never wrong.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for path in (*HEAD_KEYS, *JOB_KEYS):
        *parents, leaf = path.split(".")
        node = resolved
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    return json.dumps(resolved, sort_keys=True, default=str)


def group_jobs(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """Indices of the jobs of each group, groups ordered by their first job."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(group_key(cfg), []).append(i)
    return list(groups.values())


@dataclass
class JobOutcome:
    """One job's share of a fused pass: its scores and overlay samples, or the error that stopped it."""

    scores: dict[str, Any] | None = None
    samples: list[run.Sample] = field(default_factory=list)
    error: Exception | None = None
    timings: dict[str, float] = field(default_factory=dict)  # model load (shared) and this job's text classifier


class HeadError(Exception):
    """The shared pass failed in some job's own head (its attention, refine, ...); which job is unknown, so each
    job of the group runs alone and meets its own outcome, as under the basic launcher."""


@dataclass
class GroupRun:
    """What :func:`evaluate_group` measured, and what writing each job's result needs."""

    outcomes: list[JobOutcome]
    dataset: SegmentationDataset | None  # None when the group failed before its data was read
    rank: int
    world: int


def evaluate_group(cfgs: Sequence[DictConfig]) -> GroupRun:
    """Evaluate jobs of one group (equal :func:`group_key`) in one pass over their shared data.

    The data and the model come from the first job's config, as they would for each job alone (same seed
    before the same calls), so every job sees the same images and weights it would see alone. A job whose
    segmenter cannot be built fails alone; a data or weights error fails the whole group, as it would fail
    every job of it; an error of the pass itself that is not the data's raises :class:`HeadError`. A job
    without an mIoU (every label ignored) fails alone. Under torchrun the pass is sharded like one job's.
    """
    lead = cfgs[0]
    device, rank, world = run.setup_device(lead)
    dataset, shard = run.load_shard(lead, rank, world)
    shared: dict[str, float] = {}
    model = config.load_backbone(lead, device, shared)
    proxy = config.load_proxy(lead, device)  # the proxy, like the backbone, is part of the group key: loaded once
    outcomes = [JobOutcome() for _ in cfgs]
    variants, live, mean, std = [], [], (), ()
    for outcome, cfg in zip(outcomes, cfgs, strict=True):
        outcome.timings = dict(shared)
        try:
            segmenter, mean, std = config.build_segmenter(
                cfg, dataset.class_names, cfg.dataset, device, outcome.timings, model=model, proxy=proxy
            )
        except run.KNOWN_ERRORS as err:
            outcome.error = err
            continue
        variants.append(segmenter)
        live.append(outcome)
    if variants:
        fused = FusedSegmenter(variants)
        metrics = [IoUMetric(dataset.num_classes, ignore_index=dataset.ignore_index, device=device) for _ in live]
        log.info("one pass over %d images for %d jobs", len(shard), len(live))
        heads = [run.head_label(cfg) for cfg, o in zip(cfgs, outcomes, strict=True) if o.error is None]
        try:
            stats = run.run_pass(
                lead,
                shard,
                _finite_fused_predict(fused, heads),
                metrics,
                [o.samples for o in live],
                mean,
                std,
                device,
                rank,
            )
        except (DatasetError, run.NoImagesError):
            raise  # the data fails every job alike
        except Exception as err:
            raise HeadError(jobs.one_line(f"{type(err).__name__}: {err}")) from err
        for outcome, metric in zip(live, metrics, strict=True):
            # collective: same job order on every rank
            scores = {**run.job_scores(metric, stats, device), **outcome.timings}
            try:
                run.require_scored(scores, dataset)
                outcome.scores = scores
            except run.NoLabelledPixelsError as err:
                outcome.error = err
    return GroupRun(outcomes, dataset, rank, world)


def _finite_fused_predict(fused: FusedSegmenter, heads: Sequence[str]) -> run.Predict:
    """Every job's label maps from one shared pass, each job's logits checked finite (see run.finite_predict)."""

    @torch.no_grad()
    def predict(images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
        logits = fused.logits_list(images)
        labels = []
        for v, (variant, head) in enumerate(zip(fused.variants, heads, strict=True)):
            run.require_finite(logits[v], head)
            labels.append(variant.predict_from_logits(images, logits[v], sizes))
            logits[v] = []  # this job's full-size logits are no longer needed
        return labels

    return predict


@dataclass
class _Job:
    index: int
    sweep_config: DictConfig  # with its hydra node, as run_job wants it
    cfg: DictConfig  # the task config, as the task function gets it
    out_dir: Path
    fusable: bool  # a naclip.run job, valid and not finished yet: it may share a pass


def _jobs(sweep_configs: Sequence[DictConfig]) -> tuple[list[_Job], list[_Job]]:
    """Every job of a sweep, and those that may share a pass; Hydra's current config is left as it was."""
    previous = HydraConfig.instance().cfg
    try:
        every = [_job(i, c) for i, c in enumerate(sweep_configs)]
    finally:
        HydraConfig.instance().cfg = previous
    return every, [j for j in every if j.fusable]


def _job(index: int, sweep_config: DictConfig) -> _Job:
    """The task config and output folder run_job will give this job (no folder is made yet)."""
    HydraConfig.instance().set_config(sweep_config)
    out_dir = Path(
        os.path.abspath(
            os.path.join(
                str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")),
            )
        )
    )
    with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = str(out_dir)  # as run_job sets it: job_logging's file names use it
    cfg = copy.deepcopy(sweep_config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    fusable = all(key in cfg for key in ("backbone", "dataset", "attention", "max_images"))  # naclip.run's config
    if fusable:
        try:
            config.validate(cfg)
            fusable = run.finished_result(cfg, out_dir) is None
        except run.KNOWN_ERRORS:
            fusable = False  # it fails, alone, through the task function: same line as the basic launcher
    return _Job(index, sweep_config, cfg, out_dir, fusable)


def _finish(job: _Job, group: GroupRun, outcome: JobOutcome) -> Callable[[DictConfig], float]:
    """The task of a fused job inside run_job: write its result as naclip.run would, or report its error as
    naclip.run does in a sweep (one line, recorded in its folder; the sweep goes on, the summary counts it)."""

    def task(cfg: DictConfig) -> float | None:
        if outcome.error is not None:
            run.report_failure(job.out_dir, outcome.error)
            return None
        assert outcome.scores is not None and group.dataset is not None, "a fused job has scores or an error"
        log.info("evaluated in one fused pass shared by %d jobs", len(group.outcomes))
        try:
            result = run.write_result(
                cfg, job.out_dir, outcome.scores, outcome.samples, group.dataset, group.rank, group.world
            )
        except run.KNOWN_ERRORS as err:  # e.g. result.json unwritable: the same line and status as naclip.run
            run.report_failure(job.out_dir, err)
            return None
        miou = float(result["miou"])
        if group.rank == 0:
            jobs.record_success(job.out_dir, miou)
        return miou

    return task


def _resolved_logging(job: _Job) -> dict[str, Any]:
    HydraConfig.instance().set_config(job.sweep_config)
    return OmegaConf.to_container(job.sweep_config.hydra.job_logging, resolve=True)


def _log_into_every_job(group: list[_Job]) -> None:
    """Logging of a shared pass: the first job's job_logging, each file handler repeated for every job.

    So every job's own log (e.g. run.log) holds the pass's progress lines, then run_job appends the rest.
    """
    conf = _resolved_logging(group[0])
    files = [name for name, handler in conf.get("handlers", {}).items() if "filename" in handler]
    for i, job in enumerate(group):
        handlers = _resolved_logging(job)["handlers"]
        for name in files:
            Path(handlers[name]["filename"]).parent.mkdir(parents=True, exist_ok=True)
            conf["handlers"][f"{name}.{i}"] = handlers[name]
    for holder in [conf.get("root", {}), *conf.get("loggers", {}).values()]:
        names = holder.get("handlers", [])
        holder["handlers"] = [h for h in names if h not in files] + [
            f"{h}.{i}" for h in names if h in files for i in range(len(group))
        ]
    for name in files:
        del conf["handlers"][name]
    configure_log(OmegaConf.create(conf), group[0].sweep_config.hydra.verbose)


def _evaluate(group: list[_Job]) -> GroupRun | None:
    """evaluate_group under the first job's Hydra config; a data or weights error fails every job of the group.

    None when the pass failed in a job's own head: the caller then runs each job alone.
    """
    previous = HydraConfig.instance().cfg
    try:
        _log_into_every_job(group)
        HydraConfig.instance().set_config(group[0].sweep_config)
        return evaluate_group([j.cfg for j in group])
    except HeadError as err:
        log.warning("the shared pass failed (%s); running its %d jobs one by one", err, len(group))
        return None
    except run.KNOWN_ERRORS as err:
        return GroupRun([JobOutcome(error=err) for _ in group], None, 0, 1)
    finally:
        HydraConfig.instance().cfg = previous


def launch_fused(
    sweep_configs: Sequence[DictConfig],
    hydra_context: HydraContext,
    task_function: TaskFunction,
    launcher_config: DictConfig,
) -> list[JobReturn]:
    """Run a multirun's jobs, fusing those that share their pass; every job still goes through run_job.

    Groups run in the order of their first job; a job alone in its group, invalid, already finished or not
    naclip.run's runs through the app's own task function, exactly as under the basic launcher. A job that
    fails with a known error records it and does not stop the others; `naclip.jobs.JobSummary` reports every
    job and sets the exit code at the end, as under the basic launcher. A group whose shared pass fails in a
    job's own head runs its jobs one by one, so each meets its own outcome. Ctrl-C stops the sweep (exit 130) and,
    as naclip.run does for its job, records every job of the interrupted group as interrupted.
    """
    every, candidates = _jobs(sweep_configs)
    groups = [[candidates[i] for i in g] for g in group_jobs([j.cfg for j in candidates])]
    fused = {g[0].index: g for g in groups if len(g) > 1}
    in_fused = {j.index for g in fused.values() for j in g}
    returns: dict[int, JobReturn] = {}

    def launch(job: _Job, task: Callable[[DictConfig], Any]) -> None:
        returns[job.index] = run_job(
            hydra_context=hydra_context,
            task_function=task,
            config=job.sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(launcher_config.hydra.hydra_logging, launcher_config.hydra.verbose)

    running: list[_Job] = []  # the jobs of the shared pass under way, until each has its outcome
    try:
        for job in every:
            if job.index in fused:
                group = fused[job.index]
                running = list(group)
                done = _evaluate(group)
                for i, member in enumerate(group):
                    if done is None:
                        running.remove(member)  # alone, naclip.run records its own interruption
                        launch(member, task_function)
                    else:
                        launch(member, _finish(member, done, done.outcomes[i]))
                        running.remove(member)
            elif job.index not in in_fused:
                launch(job, task_function)
    except KeyboardInterrupt:
        print(f"naclip.run: {run.INTERRUPTED}", file=sys.stderr, flush=True)
        for member in running:
            if int(os.environ.get("RANK", "0")) == 0:
                jobs.record_failure(member.out_dir, run.INTERRUPTED)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return [returns[j.index] for j in every]  # the sweeper raises any unexpected error, as with the basic launcher


def plan(sweep_configs: Sequence[DictConfig]) -> list[list[tuple[int, Path]]]:
    """The units :func:`launch_fused` runs a sweep in: each fused group (two or more jobs sharing one pass) and each
    job that runs alone (alone in its group, invalid, finished, or not naclip.run's), ordered by their first job.

    Each job is given as (its index in `sweep_configs`, its output folder); cluster launchers submit one job per unit.
    """
    every, candidates = _jobs(sweep_configs)
    group_of: dict[int, list[_Job]] = {}
    for indices in group_jobs([j.cfg for j in candidates]):
        members = [candidates[i] for i in indices]
        group_of.update((m.index, members) for m in members)
    units: list[list[tuple[int, Path]]] = []
    placed: set[int] = set()
    for job in every:
        if job.index not in placed:
            members = group_of.get(job.index, [job])
            placed.update(m.index for m in members)
            units.append([(m.index, m.out_dir) for m in members])
    return units
