"""Per-job outcomes and the end-of-sweep summary, shared by every launcher.

A job records how it ended in ``status.json`` inside its own folder (finished, skipped, or failed with the
one-line reason). A failed job deletes nothing: its Hydra log and ``.hydra/`` stay for the post-mortem and it
writes no ``result.json``. The :class:`JobSummary` Hydra callback checks that the output folder can be written
before any job starts, and after a sweep prints one line per job plus totals and exits non-zero if any failed,
so a sweep goes on past a job with a known error (missing dataset, bad file) instead of stopping there.
Launchers that run jobs in other processes (submitit, SLURM) find the outcomes through the job folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from naclip.results import utc_now

STATUS_FILE = "status.json"
SWEEP_ENV = "NACLIP_SWEEP_ID"  # ties the status files to the sweep that launched them
SWEEP_FAILED_EXIT = 1
BAD_INPUT_EXIT = 2
Status = Literal["finished", "skipped", "failed"]


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended: ``detail`` is its mIoU line or the one-line reason it failed."""

    folder: Path
    status: Status
    detail: str


def one_line(message: object) -> str:
    """Any error message as a single line (never empty)."""
    return " ".join(str(message).split()) or type(message).__name__


def _write_status(out_dir: Path, payload: dict[str, Any]) -> None:
    """Best effort: a folder that cannot be written must not hide the job's own error."""
    payload = {**payload, "at": utc_now(), "sweep": os.environ.get(SWEEP_ENV)}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, out_dir / STATUS_FILE)
    except OSError:
        return


def record_failure(out_dir: str | os.PathLike, message: str) -> None:
    """Record in the job's folder that it failed and why; removes nothing."""
    _write_status(Path(out_dir), {"status": "failed", "error": one_line(message)})


def record_success(out_dir: str | os.PathLike, miou: float, skipped: bool = False) -> None:
    """Record that the job finished (or reused a finished result, ``skipped``) with this mIoU."""
    _write_status(Path(out_dir), {"status": "skipped" if skipped else "finished", "miou": miou})


def read_outcome(out_dir: str | os.PathLike) -> JobOutcome | None:
    """The outcome recorded in a job folder, or None when there is none (or it is unreadable)."""
    folder = Path(out_dir)
    try:
        payload = json.loads((folder / STATUS_FILE).read_text())
        status = payload["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if status == "failed":
        return JobOutcome(folder, "failed", str(payload.get("error", "unknown error")))
    if status in ("finished", "skipped") and isinstance(payload.get("miou"), int | float):
        return JobOutcome(folder, status, f"mIoU {payload['miou']:.2f}")
    return None


def collect(sweep_dir: str | os.PathLike, sweep_id: str | None = None) -> list[JobOutcome]:
    """Outcomes of the jobs below ``sweep_dir``; only those of sweep ``sweep_id`` when given."""
    outcomes = []
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        if sweep_id is not None:
            try:
                if json.loads(path.read_text()).get("sweep") != sweep_id:
                    continue
            except (OSError, ValueError, AttributeError):
                continue
        outcome = read_outcome(path.parent)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def summarize(outcomes: Iterable[JobOutcome], root: str | os.PathLike | None = None) -> tuple[str, int]:
    """The summary text of a sweep and its exit code (non-zero when any job failed)."""
    outcomes = list(outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed")}
    lines = [f"sweep summary: {counts['finished']} finished, {counts['skipped']} skipped, {counts['failed']} failed"]
    for outcome in outcomes:
        inside = root is not None and outcome.folder.is_relative_to(root)
        name = str(outcome.folder.relative_to(root)) if inside else str(outcome.folder)
        lines.append(f"  {outcome.status:<8} {name}: {outcome.detail}")
    return "\n".join(lines), SWEEP_FAILED_EXIT if counts["failed"] else 0


def log_to_files(message: str, logger: str = "naclip") -> None:
    """Append an error line to the job's log file only (the console already shows it on stderr)."""
    record = logging.getLogger(logger).makeRecord(logger, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def preset_refusal(preset: str, app: str = "naclip.run") -> str:
    """Why an experiment preset cannot run without -m: presets are sweeps, so Hydra would run one default job."""
    return f"+experiment={preset} is a sweep; add -m: python -m {app} -m +experiment={preset}"


def slurm_unavailable(launcher: str) -> str | None:
    """Why a SLURM launcher (its ``_target_``) cannot submit from this machine (no ``srun``), or None."""
    if not launcher.endswith("SlurmLauncher") or shutil.which("srun") is not None:
        return None
    return (
        "hydra/launcher=slurm needs a SLURM cluster ('srun' is not on PATH); on this machine use "
        "hydra/launcher=submitit_local to try the launcher, or hydra/launcher=fused"
    )


# Bytes the writability probe writes and syncs: about what Hydra writes into a job folder first (.hydra/*.yaml),
# so a full disk fails here with one line instead of in Hydra with a traceback (an empty file fits on a full disk).
PROBE_BYTES = 64 * 1024


def check_writable(folder: str | os.PathLike) -> str | None:
    """None if files can be created and filled in ``folder`` (made if missing), else the reason in one line."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        return one_line(f"{type(err).__name__}: {err.strerror or err}")
    return None


class JobSummary(Callback):
    """Hydra callback (``hydra.callbacks``): fail early on an unwritable output folder; summarize sweeps."""

    def __init__(self, app: str = "naclip.run") -> None:
        self.app = app
        self.sweep_id: str | None = None

    def _require_writable(self, folder: str) -> None:
        reason = check_writable(folder)
        if reason is not None:
            print(
                f"{self.app}: error: cannot write the output folder {folder} ({reason}); choose another with "
                f"output_root=... or hydra.run.dir=...",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(BAD_INPUT_EXIT)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        preset = config.hydra.runtime.choices.get("experiment")
        if preset is not None:  # refused before Hydra makes the job's folder
            print(f"{self.app}: error: {preset_refusal(preset, self.app)}", file=sys.stderr, flush=True)
            raise SystemExit(BAD_INPUT_EXIT)
        HydraConfig.instance().set_config(config)  # the run dir may use ${hydra:...}; run_job sets it next anyway
        self._require_writable(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        reason = slurm_unavailable(str(config.hydra.launcher.get("_target_", "")))
        if reason is not None:  # submitit would end in a traceback once the sweep has started
            print(f"{self.app}: error: {reason}", file=sys.stderr, flush=True)
            raise SystemExit(BAD_INPUT_EXIT)
        HydraConfig.instance().set_config(config)
        self._require_writable(str(config.hydra.sweep.dir))
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ENV] = self.sweep_id  # inherited by the jobs, in this process or launched ones

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = collect(sweep_dir, self.sweep_id)
        text, code = summarize(outcomes, sweep_dir)
        os.environ.pop(SWEEP_ENV, None)
        print(f"{self.app}: {text}", flush=True)
        if code:
            failed = sum(o.status == "failed" for o in outcomes)
            print(
                f"{self.app}: error: {failed} of {len(outcomes)} jobs failed (reasons above and in each job's "
                f"{STATUS_FILE})",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(code)
