"""Result sinks: an atomic local result.json (always) and W&B (optional, never blocking)."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"
_PACKAGES = ("naclip", "torch", "torchvision", "open_clip_torch", "timm", "hydra-core", "datasets", "torchmetrics")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The commit of the naclip checkout, when it is one (never fails)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultWriteError(RuntimeError):
    """result.json could not be written; the message names the fallback file that holds the result."""


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON through a temp file in the same folder and rename it: readers never see half a file.

    The file gets the mode the user's umask gives (like any file they create), not mkstemp's 0600, so people
    sharing a results folder can read each other's results.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write result.json; if that fails, keep the full result in a fallback file and raise ResultWriteError.

    A long evaluation must never be lost because its folder became unwritable at the end.
    """
    try:
        return write_json_atomic(path, result)
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
    try:
        fd, fallback = tempfile.mkstemp(prefix="naclip-result-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, default=str)
    except OSError as err:
        raise ResultWriteError(
            f"could not write {path} ({reason}) nor a fallback file ({err}); the result is printed above"
        ) from err
    raise ResultWriteError(f"could not write {path} ({reason}); the full result is in {fallback}")


def read_finished_result(folder: Path) -> dict[str, Any] | None:
    """The finished result.json in `folder`, or None if absent, unreadable or not of the types a run writes
    (a finite mIoU, a config dict): a hand-edited file means the job runs again, never a traceback."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        return None
    miou = result.get("miou")
    finite = isinstance(miou, int | float) and not isinstance(miou, bool) and math.isfinite(miou)
    return result if finite else None


RANDOM_WEIGHTS = "random-weights"
PARTIAL = "partial"
# Method choices a W&B run is tagged with ("attention:full", ...), so dashboards filter by them.
TAGGED_CHOICES: tuple[str, ...] = ("attention", "arch", "backbone", "dataset", "refine")


def random_weights(config: Mapping[str, Any]) -> bool:
    """Whether a run's CLIP or its second vision model (ProxyCLIP's, CASS's proxy) had random weights
    (``pretrained: null``): either one makes every number a smoke value, not a measurement of the method."""
    backbone = config.get("backbone") or {}
    proxy = config.get("proxy") or {}
    return ("pretrained" in backbone and backbone["pretrained"] is None) or (
        proxy.get("model") is not None and "pretrained" in proxy and proxy["pretrained"] is None
    )


def provenance(config: Mapping[str, Any], dataset_images: int, num_skipped: int) -> dict[str, Any]:
    """What a result's numbers stand for: real or random weights, the whole protocol split or only part of it.

    Args:
        config: the resolved run config (``backbone.pretrained``, ``proxy.pretrained``, ``max_images``,
            ``dataset.expected_images``).
        dataset_images: images the dataset split holds on disk.
        num_skipped: samples left out because they could not be read (``on_error=skip``).

    Returns:
        ``random_weights``, ``partial`` and ``partial_reasons`` (one short phrase per reason), with the counts
        they come from.
    """
    expected = (config.get("dataset") or {}).get("expected_images")
    max_images = config.get("max_images")
    reasons = []
    if max_images is not None and max_images < dataset_images:
        reasons.append(f"max_images={max_images} of {dataset_images} images")
    if num_skipped:
        reasons.append(f"{num_skipped} unreadable samples skipped")
    if expected is not None and dataset_images != expected:
        reasons.append(f"split holds {dataset_images} images, the protocol {expected}")
    return {
        "random_weights": random_weights(config),
        "partial": bool(reasons),
        "partial_reasons": reasons,
        "dataset_images": dataset_images,
        "expected_images": expected,
        "max_images": max_images,
        "num_skipped": num_skipped,
    }


def caveats(result: Mapping[str, Any]) -> list[str]:
    """``random-weights`` and/or ``partial`` for a result that is not a full measurement with real weights.

    Reads the result's ``provenance``; results written before it existed are judged from their config.
    """
    facts = result.get("provenance")
    if not isinstance(facts, Mapping):
        config = result.get("config") or {}
        facts = {
            "random_weights": random_weights(config),
            "partial": config.get("max_images") is not None or bool(result.get("skipped")),
        }
    return [
        tag for tag, flag in ((RANDOM_WEIGHTS, facts.get("random_weights")), (PARTIAL, facts.get("partial"))) if flag
    ]


def run_tags(result: Mapping[str, Any]) -> list[str]:
    """W&B tags of a result: its caveats and its method choices (``attention:full``, ``dataset:voc21``, ...)."""
    choices = result.get("choices") or {}
    return [*caveats(result), *(f"{key}:{choices[key]}" for key in TAGGED_CHOICES if key in choices)]


class Sink(Protocol):
    def log_samples(self, samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> None: ...
    def write(self, result: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class LocalSink:
    """result.json in the job's output folder, written only by a finished run."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / RESULT_FILE

    def log_samples(self, samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> None:
        return None

    def write(self, result: dict[str, Any]) -> None:
        write_result(self.path, result)
        log.info("result written to %s", self.path)

    def close(self) -> None:
        return None


SUMMARY_KEYS: tuple[str, ...] = (
    "miou",
    "pixel_acc",
    "num_images",
    "seconds_eval",
    "seconds_model_load",
    "seconds_text_classifier",
    "images_per_sec",
    "peak_memory_mb",
    "finished_at",
    "provenance",
)


class WandbSink:
    """One W&B run per job. Offline unless W&B was configured online; falls back to offline on failure."""

    def __init__(
        self,
        folder: str | os.PathLike,
        project: str,
        group: str,
        name: str,
        config: dict[str, Any],
        class_names: list[str],
        entity: str | None = None,
        mode: str | None = None,
        init_timeout: float = 30.0,
    ) -> None:
        import wandb

        self._wandb = wandb
        self.class_names = class_names
        mode = mode or os.environ.get("WANDB_MODE") or ("online" if _wandb_configured_online() else "offline")
        tags = run_tags(config)
        kwargs = dict(project=project, entity=entity, group=group, name=name, config=config, dir=str(folder), tags=tags)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
        except Exception as err:  # network, auth, server: never lose the local result over W&B
            log.warning("W&B init failed (%s); logging offline instead", str(err).splitlines()[0] if str(err) else err)
            self.run = wandb.init(mode="offline", **kwargs)

    def log_samples(self, samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]]) -> None:
        from naclip.viz import overlay

        images = [
            self._wandb.Image(
                np.concatenate([overlay(img, pred, self.class_names), overlay(img, gt, self.class_names)], axis=1),
                caption=f"{name}: prediction | ground truth",
            )
            for img, pred, gt, name in samples
        ]
        if images:
            self.run.log({"predictions": images})

    def write(self, result: dict[str, Any]) -> None:
        per_class = result.get("per_class_iou", {})
        table = self._wandb.Table(columns=["class", "iou"], data=[[k, v] for k, v in per_class.items()])
        self.run.log({"per_class_iou": table})
        summary = {k: result[k] for k in SUMMARY_KEYS if k in result}
        summary.update({f"iou/{k}": v for k, v in per_class.items()})
        self.run.summary.update(summary)
        self.run.tags = tuple(run_tags(result))  # the final caveats (skipped samples are known only now)

    def close(self) -> None:
        self.run.finish()


def _wandb_configured_online() -> bool:
    """True only when the user logged in (API key in the environment or netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
