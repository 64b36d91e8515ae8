"""`python -m naclip.run [overrides]`: one evaluation job (or a sweep with -m), thin glue around the library.

Also runs under `torchrun --nproc_per_node=N -m naclip.run ...`: every rank evaluates a disjoint shard,
confusion matrices are summed across ranks, rank 0 alone writes the result.
"""

from __future__ import annotations

import io
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from naclip import config, jobs
from naclip.clip import WeightsUnavailableError
from naclip.data import DatasetError, SegmentationDataset, build_dataset, collate
from naclip.metrics import IoUMetric
from naclip.predictor import auto_device, normalize_images
from naclip.results import (
    RESULT_FILE,
    LocalSink,
    ResultWriteError,
    Sink,
    WandbSink,
    git_commit,
    package_versions,
    provenance,
    read_finished_result,
    utc_now,
)

log = logging.getLogger("naclip.run")
Sample = tuple[np.ndarray, np.ndarray, np.ndarray, str]  # image, prediction, label, name (overlays)
# (images, label sizes) -> every job's label maps: job j's are the call's j-th list
Predict = Callable[[list[torch.Tensor], list[tuple[int, int]]], list[list[torch.Tensor]]]
config.register()


class NoImagesError(ValueError):
    """Every sample was skipped, so there is no score to report."""


class NonFiniteLogitsError(ValueError):
    """A job's logits hold NaN or inf (e.g. a plug-in attention's output): its scores would mean nothing."""


class NoLabelledPixelsError(ValueError):
    """Every evaluated label pixel is ignore_index, so the job has no mIoU."""


INTERRUPTED = "interrupted, no result written"


# Errors that are the user's input or environment: one line, never a traceback.
KNOWN_ERRORS = (DatasetError, WeightsUnavailableError, ResultWriteError, ValueError, OSError)


def setup_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun: (rank, world size)."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        # several tasks of one submitit/SLURM job: export torchrun-style variables (MASTER_ADDR, RANK, ...)
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(num_items: int, rank: int, world: int) -> list[int]:
    """Every item exactly once across ranks: no padding, no drops (unlike DistributedSampler)."""
    return list(range(rank, num_items, world))


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _across_ranks(value: float, op: str = "sum") -> float:
    """`value` summed (or maxed) over all ranks; itself when not distributed."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def _batches(loader: Any, on_error: str, skipped: list[dict[str, str]]) -> Iterator[dict[str, list]]:
    """Batches with bad samples raised (on_error=raise) or removed and recorded (on_error=skip)."""
    for batch in loader:
        keep = []
        for i, error in enumerate(batch["error"]):
            if error is None:
                keep.append(i)
            elif on_error == "raise":
                raise DatasetError(error)
            else:
                log.warning("skipping %s", error)
                skipped.append({"path": batch["path"][i], "error": error})
        if keep:
            yield {k: [v[i] for i in keep] for k, v in batch.items()}


def _refuse_preset_without_multirun() -> None:
    """Experiment presets are sweeps: run without -m, Hydra would run one unrelated default job instead."""
    hydra_cfg = HydraConfig.get()
    preset = hydra_cfg.runtime.choices.get("experiment")
    if preset is not None and hydra_cfg.mode == RunMode.RUN:
        raise ValueError(jobs.preset_refusal(preset))


def _wandb_sink(cfg: DictConfig, out_dir: Path, resolved: dict[str, Any], class_names: list[str]) -> WandbSink:
    return WandbSink(
        out_dir,
        project=cfg.logger.project,
        group=cfg.experiment_name,
        name=out_dir.name,
        config={"choices": _choices(), "config": resolved, "overrides": _overrides()},
        class_names=class_names,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        init_timeout=cfg.logger.init_timeout,
    )


def _reuse(
    cfg: DictConfig, out_dir: Path, found: tuple[Path, dict[str, Any]], resolved: dict[str, Any]
) -> dict[str, Any]:
    """A finished result of the same result config: print it, and still log it when this job logs to W&B."""
    folder, previous = found
    log.info("skipping: %s already holds a finished result for this config (force=true re-runs)", folder)
    if cfg.logger.name == "wandb" and int(os.environ.get("RANK", "0")) == 0:
        sink = _wandb_sink(cfg, out_dir, resolved, list(previous.get("per_class_iou", {})))
        try:
            sink.write(previous)
        finally:
            sink.close()
    print(f"skipped (finished result in {folder}): mIoU {previous['miou']:.2f}")
    return previous


def finished_result(cfg: DictConfig, out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """A finished result for the same result config, which this job reuses (None: run it), and its folder.

    The job's own folder comes first, then its siblings (the other jobs of ``outputs/runs`` or of the sweep):
    a folder name comes from the overrides as written, so ``refine=none`` or ``attention=full`` spelled out names
    another folder than the default run, for the same numbers.
    """
    if cfg.force:
        return None
    wanted = config.result_config(OmegaConf.to_container(cfg, resolve=True))
    siblings = sorted(p for p in out_dir.parent.glob("*") if p != out_dir) if out_dir.parent.is_dir() else []
    for folder in (out_dir, *siblings):
        previous = read_finished_result(folder)
        if previous is not None and config.result_config(previous["config"]) == wanted:
            return folder, previous
    return None


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate one configuration; returns the result dict (also written by the sinks on rank 0)."""
    _refuse_preset_without_multirun()
    config.validate(cfg)
    found = finished_result(cfg, out_dir)
    if found is not None:
        return _reuse(cfg, out_dir, found, OmegaConf.to_container(cfg, resolve=True))

    device, rank, world = setup_device(cfg)
    dataset, shard = load_shard(cfg, rank, world)  # fails on a missing root before any model loads
    timings: dict[str, float] = {}
    segmenter, mean, std = config.build_segmenter(cfg, dataset.class_names, cfg.dataset, device, timings)
    metric = IoUMetric(dataset.num_classes, ignore_index=dataset.ignore_index, device=device)
    samples: list[Sample] = []
    stats = run_pass(
        cfg, shard, finite_predict(segmenter, head_label(cfg)), [metric], [samples], mean, std, device, rank
    )
    scores = {**job_scores(metric, stats, device), **timings}
    require_scored(scores, dataset)
    return write_result(cfg, out_dir, scores, samples, dataset, rank, world)


def head_label(cfg: DictConfig) -> str:
    """What computes a job's own logits, for messages: its registered method, else its last-block attention."""
    method = config.method_spec(cfg)[0]
    return f"method {method!r}" if method is not None else f"attention {cfg.attention.name!r}"


def require_finite(logits: list[torch.Tensor], head: str) -> None:
    """Stop a job whose logits of this batch hold NaN or inf: one reduction per image, one sync per batch."""
    if logits and not bool(torch.stack([torch.isfinite(lg).all() for lg in logits]).all()):
        raise NonFiniteLogitsError(f"{head} produced non-finite logits (NaN or inf); no result written")


def finite_predict(segmenter: Any, head: str) -> Predict:
    """One job's label maps, its logits checked finite first (NaN logits still give plausible labels)."""

    @torch.no_grad()
    def predict(images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
        logits = segmenter.logits_list(images)
        require_finite(logits, head)
        return [segmenter.predict_from_logits(images, logits, sizes)]

    return predict


def require_scored(scores: dict[str, Any], dataset: SegmentationDataset) -> None:
    """Refuse a job without an mIoU (every label pixel ignored) in one line, before anything is written."""
    if not math.isfinite(scores["miou"]):
        raise NoLabelledPixelsError(
            f"no mIoU: every label pixel of the {scores['num_images']} evaluated images is ignore_index "
            f"{dataset.ignore_index}; check the labels, dataset.ignore_index and dataset.reduce_zero_label"
        )


def setup_device(cfg: DictConfig) -> tuple[str, int, int]:
    """(device, rank, world size) of this process, the process group joined and the seed set."""
    device = auto_device(cfg.backbone.device)
    rank, world = setup_distributed(device)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    torch.manual_seed(cfg.seed)
    return device, rank, world


def load_shard(cfg: DictConfig, rank: int, world: int) -> tuple[SegmentationDataset, torch.utils.data.Subset]:
    """The dataset and this rank's shard of its first max_images images.

    Images smaller than one patch after the protocol resize become per-sample errors naming the file.
    """
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset = build_dataset(dataset_cfg, on_error=cfg.on_error, min_side=config.patch_size(cfg.backbone.model))
    count = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    return dataset, torch.utils.data.Subset(dataset, shard_indices(count, rank, world))


def write_result(
    cfg: DictConfig,
    out_dir: Path,
    scores: dict[str, Any],
    samples: list[Sample],
    dataset: SegmentationDataset,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """A finished job's result with its provenance: reported on rank 0, then handed to its sinks (always closed)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    sinks: list[Sink] = []
    if rank == 0:
        sinks.append(LocalSink(out_dir))
        if cfg.logger.name == "wandb":
            sinks.append(_wandb_sink(cfg, out_dir, resolved, dataset.display_names))
    try:
        for sink in sinks:
            sink.log_samples(samples)
        result = dict(scores)
        result.update(
            provenance=provenance(resolved, len(dataset), len(result["skipped"])),
            choices=_choices(),
            overrides=_overrides(),
            config=resolved,
            versions=package_versions(),
            git_commit=git_commit(),
            world_size=world,
            finished_at=utc_now(),
        )
        per_class = result.pop("per_class_list")
        result["per_class_iou"] = dict(zip(dataset.display_names, per_class, strict=True))
        if rank == 0:
            print(_report(result), flush=True)  # before writing: a failed write must not lose the numbers
        for sink in sinks:
            sink.write(result)
    finally:
        for sink in sinks:
            sink.close()
    return result


@dataclass
class PassStats:
    """What one pass over a shard measured, shared by every job it evaluated."""

    seen: int
    seconds: float
    skipped: list[dict[str, str]]


def run_pass(
    cfg: DictConfig,
    shard: Any,
    predict: Predict,
    metrics: list[IoUMetric],
    samples: list[list[Sample]],
    mean: tuple,
    std: tuple,
    device: str,
    rank: int,
) -> PassStats:
    """One pass over the shard: each batch decoded and normalized once, `predict` gives every job's label maps
    (job j's are predict(...)[j]), which update job j's metric and overlay samples.

    Raises:
        NoImagesError: every sample was skipped on every rank, so no job has a score.
    """
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )
    skipped: list[dict[str, str]] = []
    seen, start = 0, time.perf_counter()
    bar = tqdm(total=len(shard), disable=rank != 0 or not sys.stderr.isatty(), desc="eval", unit="img")
    for batch in _batches(loader, cfg.on_error, skipped):
        images = [normalize_images(im.to(device), mean, std) for im in batch["image"]]
        labels = [lb.to(device) for lb in batch["label"]]
        per_job = predict(images, [tuple(lb.shape) for lb in labels])
        for preds, metric, job_samples in zip(per_job, metrics, samples, strict=True):
            for pred, label, image, name in zip(preds, labels, batch["image"], batch["name"], strict=True):
                metric.update(pred, label)
                if len(job_samples) < cfg.logger.log_images:
                    pixels = image.permute(1, 2, 0).numpy()
                    job_samples.append((pixels, _resize_nearest(pred, image), _resize_nearest(label, image), name))
        first = seen == 0
        seen += len(labels)
        bar.update(len(labels))
        crossed = cfg.log_every and (seen // cfg.log_every) > ((seen - len(labels)) // cfg.log_every)
        if rank == 0 and (first or crossed):  # the first batch shows at once that the job runs and how fast
            elapsed = time.perf_counter() - start
            rate = seen / elapsed
            log.info(
                "%d/%d images, %.2f img/s, ETA %.0f s, peak memory %.0f MB",
                seen,
                len(shard),
                rate,
                (len(shard) - seen) / rate,
                peak_memory_mb(device),
            )
    bar.close()
    if int(_across_ranks(seen)) == 0:
        raise NoImagesError(
            f"no images evaluated: all {len(skipped)} samples were skipped (on_error=skip; the log lists each "
            f"file and why)"
        )
    return PassStats(seen, time.perf_counter() - start, skipped)


def job_scores(metric: IoUMetric, stats: PassStats, device: str) -> dict[str, Any]:
    """One job's scores after a pass (collective under torch.distributed: call in the same order on every rank)."""
    scores = metric.compute()  # sums the confusion matrices across ranks
    seconds = _across_ranks(stats.seconds, "max")  # the evaluation pass only
    total = int(_across_ranks(stats.seen))
    return {
        "miou": scores["miou"],
        "per_class_list": scores["per_class_iou"],
        "pixel_acc": scores["pixel_acc"],
        "num_images": total,
        "seconds_eval": round(seconds, 3),
        "images_per_sec": round(total / seconds, 4) if seconds > 0 else None,
        "peak_memory_mb": round(_across_ranks(peak_memory_mb(device), "max"), 1),
        "skipped": _gather_skipped(stats.skipped),
    }


def _resize_nearest(labels: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """Labels at the (resized) image's size, for overlays."""
    resized = torch.nn.functional.interpolate(labels[None, None].float().cpu(), size=image.shape[-2:], mode="nearest")
    return resized[0, 0].long().numpy()


def _gather_skipped(skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    if not dist.is_initialized():
        return skipped
    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, skipped)
    return [item for part in everything for item in part]


def _choices() -> dict[str, str]:
    choices = HydraConfig.get().runtime.choices
    return {k: v for k, v in choices.items() if not k.startswith("hydra") and k != "schema" and v is not None}


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def _report(result: dict[str, Any]) -> str:
    lines = [f"{'class':<28} {'IoU':>6}", "-" * 35]
    for name, iou in result["per_class_iou"].items():
        lines.append(f"{name[:28]:<28} {'nan' if iou is None else f'{iou:6.2f}':>6}")
    lines += [
        "-" * 35,
        f"mIoU {result['miou']:.2f}  pixel acc {result['pixel_acc']:.2f}  images {result['num_images']}  "
        f"{result['images_per_sec']} img/s",
    ]
    caveats = [
        *(["random weights"] if result["provenance"]["random_weights"] else []),
        *result["provenance"]["partial_reasons"],
    ]
    if caveats:
        lines.append(f"not a full measurement: {'; '.join(caveats)}")
    return "\n".join(lines)


def _result_stamp(out_dir: Path) -> tuple[int, int] | None:
    """Identity of the current result.json (inode, mtime): a new write replaces the file."""
    try:
        st = (out_dir / RESULT_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def main() -> None:
    """Console entry point. Under torchrun every rank composes the config, so a composition error (an unknown
    group option, a bad override) would print once per rank: ranks other than 0 hold their stderr back until their
    job starts, and rank 0 alone prints Hydra's message."""
    if int(os.environ.get("RANK", "0")) == 0:
        _hydra_main()
        return
    _held_stderr.append(sys.stderr)
    sys.stderr = io.StringIO()
    try:
        _hydra_main()
    finally:
        if _held_stderr:
            sys.stderr = _held_stderr.pop()


_held_stderr: list[TextIO] = []  # a rank's real stderr while `main` holds it back


@hydra.main(version_base="1.3", config_path=config.config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's task function: known errors end with one line on stderr and exit code 2 (Ctrl-C: 130).

    In a sweep (-m) a job with a known error records it in its folder and returns, so the sweep goes on;
    `naclip.jobs.JobSummary` prints the summary and sets the exit code at the end. Nothing is ever deleted.
    """
    if _held_stderr:  # the job has started: every rank's own errors are its own again
        sys.stderr = _held_stderr.pop()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    before = _result_stamp(out_dir)
    try:
        miou = float(evaluate(cfg, out_dir)["miou"])
    except KeyboardInterrupt:
        print(f"naclip.run: {INTERRUPTED}", file=sys.stderr, flush=True)
        _record(jobs.record_failure, out_dir, INTERRUPTED)
        sys.exit(130)  # stops a sweep too: the user asked to stop
    except KNOWN_ERRORS as err:
        report_failure(out_dir, err)
        if sweep:
            return None
        sys.exit(jobs.BAD_INPUT_EXIT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _record(jobs.record_success, out_dir, miou, skipped=_result_stamp(out_dir) == before)
    return miou


def report_failure(out_dir: Path, err: BaseException) -> None:
    """A job ended with a known error: one line on stderr (from rank 0) and in its log, the reason in its folder;
    nothing deleted."""
    message = jobs.one_line(err)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank meets it: one line, once (all logs keep it)
        print(f"naclip.run: error: {message}", file=sys.stderr, flush=True)
    jobs.log_to_files(message)
    _record(jobs.record_failure, out_dir, message)


def _record(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Job outcomes are written by one process only (rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        fn(*args, **kwargs)


if __name__ == "__main__":
    main()
