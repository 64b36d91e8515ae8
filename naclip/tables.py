"""Rebuild Tables 1–4 of the NACLIP paper (and the σ sweep plot) from finished evaluation results.

Results come from a :class:`ResultSource`: local ``result.json`` files written by each evaluation job, or
finished W&B runs converted to the same dict form. Each table row is selected by the run's Hydra
``choices`` (plus ``config.attention.sigma``); when several results fill the same cell a full measurement
beats a caveated one and then the newest (``finished_at``) wins.

A cell only takes a result run in the paper's setting: its resolved config holds the shipped values of its
backbone choice (model, weights; rows name the precision instead), its dataset's protocol (``conf/dataset``, or
the method's ``conf/protocol`` file for a method's published protocol), its refine choice, and a method whose
preset fits its attention and arch. Others (``backbone.model=ViT-B-32`` under ``backbone=b16``, other weights,
``dataset.logit_scale=100``, ``method=sclip attention=full``) fill no cell; one stderr line says how many and why.
A result without a finite mIoU, or with fields of the wrong type, is skipped with a warning.

Results that are not full measurements (random weights, or a partial split: ``max_images``, skipped samples,
fewer images than the protocol's split) are left out by default, with one line saying how many and why;
``include_partial`` puts them in, each such cell marked with ``†`` and a footnote.

CLI::

    python -m naclip.tables --source local outputs/ [--out tables/] [--include-partial] [--export all.csv]
    python -m naclip.tables --source wandb ENTITY/PROJECT
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

from naclip.results import PARTIAL, RANDOM_WEIGHTS, caveats

# Dataset option -> column header, in the paper's column order.
DATASET_COLUMNS: dict[str, str] = {
    "voc21": "V21",
    "pc60": "PC60",
    "coco_object": "C-Obj",
    "voc20": "V20",
    "cityscapes": "City",
    "pc59": "PC59",
    "ade": "ADE",
    "coco_stuff": "C-Stf",
}
# Backbone option -> header prefix used by Table 2.
BACKBONE_HEADERS: dict[str, str] = {"b16": "B/16", "b32": "B/32", "l14": "L/14"}
# Datasets Table 2 reports per backbone.
TABLE2_DATASETS: tuple[str, ...] = ("voc21", "pc59")
DEFAULT_SIGMA = 5.0
# The configuration whose σ is swept (NACLIP without PAMR); every backbone and dataset found gets its own line.
SIGMA_SWEEP_CHOICES: dict[str, str] = {
    "attention": "full",
    "arch": "reduced",
    "refine": "none",
}
MISSING = "–"
SIGMA_PLOT = "sigma_sweep.png"  # the plot's file name in --out, replaced by each run (removed when it draws none)
DAGGER = "†"
FOOTNOTE = f"{DAGGER} not a full measurement (random weights or a partial split), shown by --include-partial"

# ---------------------------------------------------------------------------------------------------------
# PUBLISHED REFERENCE VALUES — mIoU (%) as printed in Hajimiri et al., "Pay Attention to Your Neighbours:
# Training-Free Open-Vocabulary Semantic Segmentation" (NACLIP), WACV 2025. These are the paper's numbers,
# shown beside measured rows for comparison; they are NOT results of this framework. The Avg columns are
# derived from these values the same way as for measured rows (they match the paper's printed averages).
# ---------------------------------------------------------------------------------------------------------
_PAPER_VANILLA_CLIP = (18.6, 7.8, 6.5, 49.1, 6.7, 11.2, 3.2, 5.7)
PAPER_RESULTS: dict[str, dict[str, tuple[float, ...]]] = {
    # Tables 1, 3, 4: values in DATASET_COLUMNS order.
    "table1": {
        "none": (58.9, 32.2, 33.2, 79.7, 35.5, 35.2, 17.4, 23.3),
        "pamr": (64.1, 35.0, 36.2, 83.0, 38.3, 38.4, 19.1, 25.7),
    },
    # Table 2: (V21, PC59) per backbone, refine pamr.
    "table2": {"b16": (64.1, 38.4), "b32": (54.8, 34.9), "l14": (57.9, 36.4)},
    "table3": {
        "vanilla": _PAPER_VANILLA_CLIP,
        "n_only": (38.0, 17.0, 16.1, 65.9, 21.4, 23.9, 10.2, 14.6),
        "kk_sim": (36.0, 15.6, 10.9, 64.9, 24.8, 26.2, 9.6, 15.1),
        "full": (40.2, 17.4, 13.9, 68.2, 28.1, 27.9, 11.2, 16.5),
    },
    "table4": {
        "vanilla": _PAPER_VANILLA_CLIP,
        "reduced": (37.5, 22.3, 23.2, 81.4, 20.2, 24.9, 11.6, 16.7),
    },
}

Cell = float | None
_K = TypeVar("_K")


@dataclass
class Table:
    """A results table: labelled rows of mIoU values (``None`` = not measured) under value columns.

    ``marked`` holds the (row label, column) cells that come from a result that is not a full measurement;
    they are shown with ``†`` and the table gets a footnote.
    """

    title: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    label_header: str = "Method"
    marked: set[tuple[str, str]] = field(default_factory=set)

    def value(self, row: str, column: str) -> Cell:
        """Look up one cell by row label and column header (KeyError if either is unknown)."""
        for label, values in self.rows:
            if label == row:
                return values[self.columns.index(column)]
        raise KeyError(f"no row {row!r} in table {self.title!r}; rows: {[r for r, _ in self.rows]}")

    def add_row(self, label: str, values: Sequence[Cell], marked: Iterable[str] = ()) -> None:
        """Append a row; ``marked`` names its columns whose value is not a full measurement."""
        self.rows.append((label, list(values)))
        self.marked.update((label, column) for column in marked)

    def formatted_rows(self) -> list[list[str]]:
        """Rows as display strings: values with 1 decimal (``†`` when marked), missing cells as ``–``."""
        return [
            [
                label,
                *(
                    _fmt(v) + (DAGGER if (label, c) in self.marked else "")
                    for v, c in zip(values, self.columns, strict=True)
                ),
            ]
            for label, values in self.rows
        ]

    @property
    def footnote(self) -> str | None:
        return FOOTNOTE if self.marked else None

    def to_markdown(self) -> str:
        """Render as a GitHub-flavoured markdown table (without the title), its footnote below when marked."""
        header = [self.label_header, *self.columns]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "---|" + "---:|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.formatted_rows()]
        if self.footnote:
            lines += ["", self.footnote]
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV for pandas & co: plain numbers, missing cells empty.

        When cells are marked, a last ``Note`` column lists them per row (``V21 †; PC60 †``).
        """
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([self.label_header, *self.columns, *(["Note"] if self.marked else [])])
            for label, values in self.rows:
                note = "; ".join(f"{c} {DAGGER}" for c in self.columns if (label, c) in self.marked)
                cells = ["" if v is None else f"{v:.1f}" for v in values]
                writer.writerow([label, *cells, *([note] if self.marked else [])])
        return path


def _fmt(value: Cell) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _mean_if_complete(values: Sequence[Cell]) -> Cell:
    """Average only when every value is measured; a partial mean would not be comparable to the paper."""
    measured = [v for v in values if v is not None]
    return sum(measured) / len(values) if measured and len(measured) == len(values) else None


def _printed_mean(values: Sequence[Cell]) -> Cell:
    """A published row's complete-only average, computed exactly on the printed decimals and rounded to one decimal
    (an exact tie to even, as formatting rounds one): CASS's 44.35 reads 44.4 as its source prints it, where the
    binary float mean (44.3499...) would read 44.3."""
    if any(v is None for v in values) or not values:
        return None
    mean = sum(Decimal(str(v)) for v in values) / len(values)
    return float(mean.quantize(Decimal("0.1"), rounding=ROUND_HALF_EVEN))


# ------------------------------------------------------------------------------------------------ sources
class ResultSource(Protocol):
    """Anything that yields evaluation results as dicts in ``result.json`` form."""

    def results(self) -> list[dict]: ...


def _warn(message: str) -> None:
    print(f"naclip.tables: warning: {message}", file=sys.stderr)


def _unusable(result: Any) -> str | None:
    """Why a result cannot be placed in a table (None if it can): choices of names, a finite mIoU, and config
    sections (when present) of the types a run writes. A hand-edited file never crashes the tables."""
    if not isinstance(result, dict):
        return "not a JSON object"
    choices = result.get("choices")
    if not isinstance(choices, dict) or not all(isinstance(v, str) for v in choices.values()):
        return "no 'choices' dict of option names"
    miou = result.get("miou")
    if isinstance(miou, bool) or not isinstance(miou, int | float) or not math.isfinite(miou):
        return f"mIoU {miou!r} is not a finite number"
    config = result.get("config", {})
    if not isinstance(config, dict) or not all(isinstance(v, dict) for k, v in config.items() if k in _SECTIONS):
        return "'config' is not a dict of config sections"
    sigma = (config.get("attention") or {}).get("sigma")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float)):
        return f"attention.sigma {sigma!r} is not a number"
    return None


def _is_usable(result: Any) -> bool:
    return _unusable(result) is None


class LocalSource:
    """Reads every ``result.json`` below ``root`` (recursively), skipping unreadable or partial files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"result directory {str(self.root)!r} does not exist; pass the Hydra output dir")

    def results(self) -> list[dict]:
        found = []
        for path in sorted(self.root.rglob("result.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                _warn(f"skipping unreadable {path}: {type(err).__name__}")
                continue
            why = _unusable(data)
            if why is not None:
                _warn(f"skipping {path}: {why}")
                continue
            found.append(data)
        return found


class WandbSource:
    """Reads the finished runs of a W&B project and converts them to ``result.json`` form."""

    def __init__(self, path: str, api: Any = None) -> None:
        parts = path.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"W&B location {path!r} must look like ENTITY/PROJECT")
        self.path = path
        self._api = api

    def results(self) -> list[dict]:
        try:
            api = self._api
            if api is None:
                import wandb

                api = wandb.Api()
            runs = list(api.runs(self.path, filters={"state": "finished"}))
        except Exception as err:  # login/network/project errors surface as one line, not a traceback
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"could not list W&B runs of {self.path!r}: {first_line}") from err
        found = []
        for run in runs:
            if getattr(run, "state", None) != "finished":
                continue
            result = run_to_result(run)
            why = _unusable(result)
            if why is None:
                found.append(result)
            else:
                _warn(f"skipping W&B run {getattr(run, 'name', '?')!r}: {why}")
        return found


def run_to_result(run: Any) -> dict:
    """Convert one W&B run (``.config``, ``.summary``) into the ``result.json`` dict form."""
    config = dict(run.config)
    summary = dict(run.summary.items())
    result: dict[str, Any] = {
        "choices": config.get("choices"),
        "config": config.get("config", {}),
        "overrides": config.get("overrides", []),
        "per_class_iou": {k.removeprefix("iou/"): v for k, v in summary.items() if k.startswith("iou/")},
    }
    for key in ("miou", "pixel_acc", "num_images", "images_per_sec", "seconds_eval", "finished_at"):
        result[key] = summary.get(key)
    facts = summary.get("provenance")
    if isinstance(facts, Mapping):
        result["provenance"] = dict(facts)
    elif getattr(run, "tags", None) is not None:  # runs logged before provenance: their tags say the same
        result["provenance"] = {"random_weights": RANDOM_WEIGHTS in run.tags, "partial": PARTIAL in run.tags}
    return result


def load_source(kind: str, location: str) -> ResultSource:
    """Create a result source by kind name.

    Args:
        kind: ``"local"`` (``location`` = directory) or ``"wandb"`` (``location`` = ``ENTITY/PROJECT``).
    Raises:
        ValueError: unknown kind, missing directory or malformed W&B path.
    Example:
        >>> load_source("local", "outputs").results()  # doctest: +SKIP
    """
    if kind == "local":
        return LocalSource(location)
    if kind == "wandb":
        return WandbSource(location)
    raise ValueError(f"unknown source {kind!r}; valid sources: local, wandb")


def select_results(results: list[dict], include_partial: bool = False) -> tuple[list[dict], str | None]:
    """The results tables are built from, and one line saying which were left out and why (None if none were).

    By default only full measurements with real weights count; ``include_partial`` keeps the others (the tables
    then mark their cells with ``†``).
    """
    flagged = [caveats(r) for r in results]
    random_weights = sum(RANDOM_WEIGHTS in f for f in flagged)
    partial = sum(bool(f) for f in flagged) - random_weights
    if not random_weights and not partial:
        return list(results), None
    why = " and ".join(
        f"{count} {text}"
        for count, text in ((random_weights, "with random weights"), (partial, "on a partial split"))
        if count
    )
    if include_partial:
        return list(
            results
        ), f"included {random_weights + partial} results that are not full measurements ({why}), marked {DAGGER}"
    kept = [r for r, f in zip(results, flagged, strict=True) if not f]
    return kept, f"left out {random_weights + partial} of {len(results)} results ({why}); --include-partial shows them"


# -------------------------------------------------------------------------------------------------- tables
def _sigma(result: Mapping[str, Any]) -> float:
    attention = (result.get("config") or {}).get("attention") or {}
    sigma = attention.get("sigma")
    return DEFAULT_SIGMA if sigma is None else float(sigma)


def _finished_at(result: Mapping[str, Any]) -> datetime:
    """Parse ``finished_at`` for newest-wins; missing or unparsable stamps count as oldest."""
    stamp = result.get("finished_at")
    try:
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _rank(result: Mapping[str, Any]) -> tuple[bool, datetime]:
    """Which of two results fills a cell: a full measurement first, then the newest."""
    return not caveats(result), _finished_at(result)


def _matches(result: Mapping[str, Any], choices: Mapping[str, str]) -> bool:
    picked = result["choices"]
    return all(picked.get(key) == want for key, want in choices.items())


def _best_by(results: Iterable[dict], key: Callable[[dict], _K]) -> dict[_K, dict]:
    """Group results by ``key`` keeping the best of each group (:func:`_rank`; later input wins ties)."""
    best: dict[_K, dict] = {}
    for result in results:
        group = key(result)
        if group not in best or _rank(result) >= _rank(best[group]):
            best[group] = result
    return best


# Config sections compared with the shipped setting, and dataset keys that say where the data lives or how it is
# reported, not what is computed on it.
_SECTIONS = ("backbone", "dataset", "refine", "attention", "arch")
_WHERE_KEYS = frozenset(
    {
        "name",
        "root",
        "hf_path",
        "hf_name",
        "data_files",
        "image_column",
        "label_column",
        "num_images",
        "image_size",
        "seed",
        "background_index",
        "expected_images",
    }
)


@functools.cache
def _shipped(group: str, option: str) -> dict[str, Any] | None:
    """A config option as shipped (``conf/<group>/<option>.yaml``, interpolations unresolved); None if absent."""
    from omegaconf import OmegaConf

    from naclip.config import config_dir

    path = Path(config_dir()) / group / f"{option}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None  # type: ignore


@functools.cache
def _paper_setting(
    backbone: str, dataset: str, refine: str, protocol: str, method: str = "naclip", proxy: str = "none"
) -> dict[str, dict[str, Any]] | None:
    """The values a result of these choices must hold to be the paper's (or a method's published) setting:
    the shipped backbone, refine and dataset options, the dataset's schema defaults under them, for a method's
    protocol (``protocol`` != "dataset") its ``conf/protocol/<protocol>_<dataset>.yaml`` on top, the proxy model
    the ``proxy`` option names, and a registered method's own options (``proxyclip.beta``, ``cass.h_threshold``...)
    as its schema, preset and protocol file set them."""
    from dataclasses import asdict

    from naclip.config import DatasetConfig, RefineConfig

    shipped = {
        "backbone": _shipped("backbone", backbone),
        "dataset": _shipped("dataset", dataset),
        "refine": _shipped("refine", refine),
        "proxy": _shipped("proxy", proxy),
    }
    if any(v is None for v in shipped.values()):
        return None
    overlay = {} if protocol == "dataset" else _shipped("protocol", f"{protocol}_{dataset}")
    if overlay is None:
        return None
    # a global-package protocol file (e.g. CASS's) sets the dataset's values and the method's options apart
    global_package = isinstance(overlay.get("dataset"), dict)
    dataset_overlay = overlay["dataset"] if global_package else overlay
    defaults = {k: v for k, v in asdict(DatasetConfig()).items() if v != "???"}
    dataset_values = {**defaults, **shipped["dataset"], **dataset_overlay}
    setting = {
        # precision is not part of the setting: the authors evaluate fp16, and each row names its precisions
        "backbone": {k: v for k, v in shipped["backbone"].items() if k not in ("name", "device", "precision")},
        "dataset": {k: v for k, v in dataset_values.items() if k not in _WHERE_KEYS},
        "refine": {**asdict(RefineConfig()), **shipped["refine"]},
        # the model only: proxy.pretrained may name a local copy of the weights, and null is a random-weights caveat
        "proxy": {"model": shipped["proxy"].get("model")},
    }
    options = _method_options(method, dataset_values, overlay.get(method) if global_package else None)
    if options is not None:
        setting[method] = options
    return setting


def _method_options(
    method: str, dataset_values: Mapping[str, Any], protocol_values: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """A registered method's options node (``conf/config`` schema defaults, then its preset's, then its protocol
    file's), interpolations resolved against the dataset values; None for a method without such a node."""
    from dataclasses import asdict, fields

    from omegaconf import OmegaConf

    from naclip.config import MethodConfig

    # a config group's node (backbone, proxy, ...) has no default factory; a method's option node has one
    node = next((f for f in fields(MethodConfig) if f.name == method), None)
    if node is None or not callable(node.default_factory):
        return None
    preset = (_shipped("method", method) or {}).get(method) or {}
    merged = {**asdict(node.default_factory()), **preset, **(protocol_values or {})}
    resolved = OmegaConf.create({"dataset": dict(dataset_values), method: merged})
    return OmegaConf.to_container(resolved, resolve=True)[method]  # type: ignore[index]


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, int | float) and isinstance(want, int | float) and not isinstance(got, bool):
        return math.isclose(got, want)
    return got == want


def _method(result: Mapping[str, Any]) -> str:
    """The method preset a result was run with (``naclip`` for results written before the method group)."""
    return str(result["choices"].get("method") or (result.get("config") or {}).get("method") or "naclip")


def _setting_mismatch(result: Mapping[str, Any], protocol: str = "dataset") -> str | None:
    """The first value by which a result's resolved config leaves the shipped setting of its choices (None if
    none does). A key the result lacks (written before the key existed) is not held against it."""
    choices = result["choices"]
    setting = _paper_setting(
        str(choices.get("backbone")),
        str(choices.get("dataset")),
        str(choices.get("refine", "none")),
        protocol,
        _method(result),
        str(choices.get("proxy", "none")),
    )
    if setting is None:
        return None if protocol == "dataset" else f"no published protocol {protocol!r} for this dataset"
    config = result.get("config") or {}
    for section, want in setting.items():
        got = config.get(section) or {}
        for key, value in want.items():
            if key in got and not _same(got[key], value):
                return f"{section}.{key}={got[key]!r} (paper setting: {value!r})"
    return None


def _method_fits(result: Mapping[str, Any]) -> bool:
    """NACLIP's ablations run under method=naclip; another method counts only with its own attention and arch
    and NACLIP's protocol (``method=clip`` is the vanilla row), so ``method=sclip attention=full`` fills none."""
    method = _method(result)
    spec = METHODS.get(method)
    choices = result["choices"]
    return method == "naclip" or (
        spec is not None
        and spec.protocol == "dataset"
        and (choices.get("attention"), choices.get("arch")) == (spec.attention, spec.arch)
    )


def _measured(results: Iterable[dict], choices: Mapping[str, str], protocol: str = "dataset") -> dict[str, dict]:
    """The σ = 5 result filling each dataset's cell among the usable results (a NaN mIoU never fills one) matching
    ``choices`` and run in the setting of ``protocol`` ("dataset": the paper's own; else that method's published
    one)."""
    selected = (
        r
        for r in results
        if _is_usable(r)
        and _matches(r, choices)
        and math.isclose(_sigma(r), DEFAULT_SIGMA)
        and ("method" in choices or _method_fits(r))
        and _setting_mismatch(r, protocol) is None
    )
    return {str(k): v for k, v in _best_by(selected, lambda r: r["choices"].get("dataset")).items()}


def _why_not_paper(result: Mapping[str, Any]) -> str | None:
    """Why a result of a paper dataset and backbone can fill no cell of any table (None if it can)."""
    choices = result["choices"]
    if choices.get("dataset") not in DATASET_COLUMNS or choices.get("backbone") not in BACKBONE_HEADERS:
        return None
    mismatch = _setting_mismatch(result, _protocol(result))
    if mismatch is not None:
        return mismatch
    spec = METHODS.get(_method(result))
    off = {k: v for k, v in (_own_choices(_method(result)) if spec else {}).items() if choices.get(k) != v}
    if off:
        return f"method={_method(result)} but " + " ".join(
            f"{k}={choices.get(k)} (its own: {v})" for k, v in off.items()
        )
    own = spec is not None and (
        spec.attention is None or (choices.get("attention"), choices.get("arch")) == (spec.attention, spec.arch)
    )
    if _protocol(result) == "dataset" and (own or _method_fits(result)):
        return None
    if _protocol(result) != "dataset" and own and _protocol(result) == spec.protocol:
        return None
    return (
        f"method={_method(result)} but attention={choices.get('attention')} arch={choices.get('arch')} "
        f"(protocol {_protocol(result)!r})"
    )


def setting_note(results: Iterable[dict]) -> str | None:
    """One line: how many results fill no cell because they were not run in a paper setting, and why."""
    reasons = Counter(why for why in map(_why_not_paper, results) if why is not None)
    if not reasons:
        return None
    listed = "; ".join(f"{count} with {why}" for why, count in reasons.most_common())
    return f"left out {sum(reasons.values())} results not run in the paper's setting ({listed})"


def _cells(by_dataset: Mapping[str, dict], datasets: Sequence[str]) -> tuple[list[Cell], list[bool]]:
    """mIoU of each dataset plus their complete-only average, and which of those cells are not full measurements."""
    picked = [by_dataset.get(d) for d in datasets]
    values = [None if r is None else r["miou"] for r in picked]
    flags = [r is not None and bool(caveats(r)) for r in picked]
    return [*values, _mean_if_complete(values)], [*flags, any(flags) and None not in values]


def _marked_columns(columns: Sequence[str], flags: Sequence[bool]) -> list[str]:
    return [column for column, flag in zip(columns, flags, strict=True) if flag]


@dataclass(frozen=True)
class _BenchmarkSpec:
    """An eight-benchmark paper table: the choices all rows share, the option that varies per row, and the
    row label of each value of that option (in row order; the keys of its ``PAPER_RESULTS`` entry)."""

    title: str
    fixed: dict[str, str]
    varies: str
    labels: dict[str, str]


_BENCHMARK_SPECS: dict[str, _BenchmarkSpec] = {
    "table1": _BenchmarkSpec(
        "Table 1 — NACLIP on eight benchmarks (ViT-B/16, σ = 5)",
        {"backbone": "b16", "attention": "full", "arch": "reduced"},
        "refine",
        {"none": "NACLIP", "pamr": "NACLIP + PAMR"},
    ),
    "table3": _BenchmarkSpec(
        "Table 3 — attention ablation (ViT-B/16, vanilla architecture, no PAMR, σ = 5)",
        {"backbone": "b16", "arch": "vanilla", "refine": "none"},
        "attention",
        {
            "vanilla": "CLIP (vanilla)",
            "n_only": "Neighbourhood only (n_only)",
            "kk_sim": "Key-key similarity (kk_sim)",
            "full": "Full NACLIP attention (full)",
        },
    ),
    "table4": _BenchmarkSpec(
        "Table 4 — architecture ablation (ViT-B/16, vanilla attention, no PAMR, σ = 5)",
        {"backbone": "b16", "attention": "vanilla", "refine": "none"},
        "arch",
        {"vanilla": "Vanilla architecture", "reduced": "Reduced architecture"},
    ),
}
# Table 2: NACLIP + PAMR with one group of columns per backbone.
_TABLE2_TITLE = "Table 2 — NACLIP + PAMR across CLIP backbones (σ = 5)"
_TABLE2_CHOICES = {"attention": "full", "arch": "reduced", "refine": "pamr"}
_TABLE2_LABEL = "NACLIP + PAMR"


def _benchmark_table(spec: _BenchmarkSpec, results: list[dict], paper: Mapping[str, Sequence[float]]) -> Table:
    """Eight-benchmark table: each measured row followed by its paper row."""
    table = Table(spec.title, [*DATASET_COLUMNS.values(), "Avg"])
    for option, label in spec.labels.items():
        values, flags = _cells(_measured(results, {**spec.fixed, spec.varies: option}), list(DATASET_COLUMNS))
        table.add_row(label, values, _marked_columns(table.columns, flags))
        table.add_row(f"{label} (paper)", [*paper[option], _mean_if_complete(paper[option])])
    return table


def _table2(results: list[dict]) -> Table:
    """V21, PC59 and their mean for each backbone, measured row then paper row."""
    headers = [*(DATASET_COLUMNS[d] for d in TABLE2_DATASETS), "Avg"]
    columns = [f"{BACKBONE_HEADERS[b]} {header}" for b in BACKBONE_HEADERS for header in headers]
    measured: list[Cell] = []
    flags: list[bool] = []
    published: list[Cell] = []
    for backbone in BACKBONE_HEADERS:
        values, marks = _cells(_measured(results, {**_TABLE2_CHOICES, "backbone": backbone}), TABLE2_DATASETS)
        paper_values = PAPER_RESULTS["table2"][backbone]
        measured += values
        flags += marks
        published += [*paper_values, _mean_if_complete(paper_values)]
    table = Table(_TABLE2_TITLE, columns)
    table.add_row(_TABLE2_LABEL, measured, _marked_columns(columns, flags))
    table.add_row(f"{_TABLE2_LABEL} (paper)", published)
    return table


# `+experiment=backbones`: NACLIP ± PAMR on every CLIP family (conf/backbone), rows in this order.
BACKBONE_FAMILIES: dict[str, str] = {
    "b16": "OpenAI B/16",
    "b16_laion": "LAION-2B B/16",
    "b16_datacomp": "DataComp-XL B/16",
    "b16_dfn": "DFN-2B B/16",
    "b16_metaclip": "MetaCLIP B/16",
    "l14_laion": "LAION-2B L/14",
    "eva02_b16": "EVA02-CLIP B/16",
    "siglip_b16": "SigLIP B/16",
    "siglip2_b16": "SigLIP 2 B/16",
}


def _backbones_table(results: list[dict]) -> Table:
    """V21, PC59 and their mean for each CLIP family, NACLIP without then with PAMR (no published values)."""
    table = Table("CLIP families — NACLIP ± PAMR (σ = 5)", [*(DATASET_COLUMNS[d] for d in TABLE2_DATASETS), "Avg"])
    for backbone, label in BACKBONE_FAMILIES.items():
        for refine, suffix in (("none", ""), ("pamr", " + PAMR")):
            choices = {"attention": "full", "arch": "reduced", "refine": refine, "backbone": backbone}
            values, flags = _cells(_measured(results, choices), TABLE2_DATASETS)
            table.add_row(f"{label}{suffix}", values, _marked_columns(table.columns, flags))
    return table


def _paper_table(name: str) -> Callable[[list[dict]], Table]:
    spec = _BENCHMARK_SPECS[name]
    return lambda results: _benchmark_table(spec, results, PAPER_RESULTS[name])


# table name -> builder from results in result.json form (caveated cells are marked): a new table is one entry
TABLE_BUILDERS: dict[str, Callable[[list[dict]], Table]] = {
    **{name: _paper_table(name) for name in _BENCHMARK_SPECS},
    "table2": _table2,
    "backbones": _backbones_table,
}


# -------------------------------------------------------------------------------------------- methods table
# PUBLISHED REFERENCE VALUES of the neighbouring methods — mIoU (%) with ViT-B/16, in DATASET_COLUMNS order, as
# printed in the source named beside each; NOT results of this framework. `protocol` is the `dataset.protocol`
# value a run under the method's published protocol records ("dataset" = the dataset config's own, NACLIP's).
@dataclass(frozen=True)
class _MethodSpec:
    """``attention``/``arch`` None: a registered method (naclip.methods) that does not read them, so any counts."""

    label: str
    attention: str | None
    arch: str | None
    protocol: str
    published: tuple[Cell, ...]
    source: str


_UNSTATED = (None,) * len(DATASET_COLUMNS)


METHODS: dict[str, _MethodSpec] = {
    "clip": _MethodSpec("CLIP", "vanilla", "vanilla", "dataset", _PAPER_VANILLA_CLIP, "NACLIP Table 1"),
    "maskclip": _MethodSpec(
        "MaskCLIP", "value", "reduced", "dataset", (43.4, 23.2, 20.6, 74.9, 24.9, 26.4, 11.9, 16.7), "NACLIP Table 1"
    ),
    "sclip": _MethodSpec(
        "SCLIP", "csa", "vanilla", "sclip", (59.1, 30.4, 30.5, 80.4, 32.2, 34.2, 16.1, 22.4), "NACLIP Table 1"
    ),
    "clearclip": _MethodSpec(
        "ClearCLIP", "qq", "reduced", "clearclip", (51.8, 32.6, 33.0, 80.9, 30.0, 35.9, 16.7, 23.9), "ClearCLIP Table 1"
    ),
    "naclip": _MethodSpec("NACLIP", "full", "reduced", "dataset", PAPER_RESULTS["table1"]["none"], "NACLIP Table 1"),
    # Registered methods: only values printed in the authors' own repository or project page (the papers' tables could
    # not be read where this was written), each in this table's column order whatever the source's order; `–` where
    # the source prints none. None of these rows uses PAMR (the authors' evaluation commands leave it off).
    # GEM, ProxyCLIP: their repositories print no per-benchmark numbers.
    "gem": _MethodSpec("GEM", None, None, "gem", _UNSTATED, "none in the authors' repository"),
    # CLIP Surgery: README figs/fig6.jpg (its Table 6: ViT-B/16, no post-processing) prints COCO-Stuff and Cityscapes;
    # its "PASCAL Context" (29.3) does not say 59 or 60 classes, so neither column takes it.
    "clip_surgery": _MethodSpec(
        "CLIP Surgery",
        None,
        None,
        "clip_surgery",
        (None, None, None, None, 31.4, None, None, 21.9),
        "CLIP Surgery repository, figs/fig6.jpg",
    ),
    "resclip": _MethodSpec(  # on NACLIP (its default base), ViT-B/16: the two results tables in its README
        "ResCLIP",
        None,
        None,
        "resclip",
        (61.1, 33.5, 35.0, 86.0, 35.9, 36.8, 18.0, 24.7),
        "ResCLIP repository, figs/main_results_w.png and main_results_wo.png",
    ),
    # SC-CLIP: the README's radar figure, whose eight values average 43.9; it names no backbone, the repository's
    # configs are ViT-B/16 and its SCLIP point on VOC21 (59.7) is at SCLIP's ViT-B/16 level, not its ViT-L/14 one.
    "scclip": _MethodSpec(
        "SC-CLIP",
        None,
        None,
        "scclip",
        (64.6, 36.8, 37.7, 84.3, 41.0, 40.1, 20.1, 26.6),
        "SC-CLIP repository, figs/scclip.jpg",
    ),
    "proxyclip": _MethodSpec("ProxyCLIP", None, None, "proxyclip", _UNSTATED, "none in the authors' repository"),
    # CASS (CLIP ViT-B/16, DINO ViT-B/8): the mIoU table of its project page, shown in its README; the authors'
    # evaluation commands (README, eval_all.sh) run `--pamr off`.
    "cass": _MethodSpec(
        "CASS",
        None,
        None,
        "cass",
        (65.8, 36.7, 37.8, 87.8, 39.4, 40.2, 20.4, 26.7),
        "CASS project page, static/images/miou.png",
    ),
}


# Config groups whose choice in a method's preset is part of that method's protocol: its rows take only runs with it.
_PRESET_GROUPS = ("refine", "proxy")


@functools.cache
def _own_choices(method: str) -> dict[str, str]:
    """The refine (``none`` unless its preset overrides it) and proxy (only where its preset chooses one) a run of
    ``method`` must hold to fill its rows, as its preset ``conf/method/<method>.yaml`` chooses them."""
    preset = _shipped("method", method) or {}
    chosen: dict[str, str] = {"refine": "none"}
    for entry in preset.get("defaults") or []:
        for key, option in entry.items() if isinstance(entry, dict) else ():
            group = key.removeprefix("override").strip().strip("/")
            if group in _PRESET_GROUPS:
                chosen[group] = str(option)
    return chosen


def _methods_title() -> str:
    """The methods table's title, naming the methods whose own protocol refines (e.g. PAMR)."""
    refined: dict[str, list[str]] = {}
    for method, spec in METHODS.items():
        refine = _own_choices(method)["refine"]
        if refine != "none":
            refined.setdefault(refine.upper(), []).append(spec.label)
    which = "; ".join(f"{refine} for {', '.join(labels)} only" for refine, labels in refined.items()) or "no PAMR"
    return f"Methods — the family side by side (ViT-B/16, each under its own protocol: {which})"


def _protocol(result: Mapping[str, Any]) -> str:
    dataset = (result.get("config") or {}).get("dataset") or {}
    return str(dataset.get("protocol", "dataset"))


def _precision(result: Mapping[str, Any]) -> str:
    """The backbone precision a result was computed in (results from before the key existed ran fp32)."""
    backbone = (result.get("config") or {}).get("backbone") or {}
    return str(backbone.get("precision") or "fp32")


def _with_precisions(label: str, results: Iterable[Mapping[str, Any]]) -> str:
    """A measured row's label naming the precision(s) of its cells, e.g. ``ClearCLIP [fp16]``: the authors'
    published numbers are fp16 on GPU, and fp32 moves a few labels, so a reader must see which one a row is."""
    precisions = sorted({_precision(r) for r in results})
    return f"{label} [{', '.join(precisions)}]" if precisions else label


def methods_table(results: list[dict]) -> Table:
    """Each method measured under its published protocol, then under the shared one where that differs, then its
    published row (source named in the label). A run counts for a method only with that method's attention and
    arch, so `method=sclip attention=full` never fills SCLIP's row, and with the refine and proxy its preset
    (``conf/method``) chooses (:func:`_own_choices`: ProxyCLIP's DINO ViT-B/8 proxy; no refine unless a preset
    overrides it), so `method=proxyclip proxy=dinov3_b16` fills none. A measured row's label names the precision(s)
    its results were computed in (``SCLIP [fp16]``)."""
    table = Table(_methods_title(), [*DATASET_COLUMNS.values(), "Avg"])
    for method, spec in METHODS.items():
        choices = {"backbone": "b16", "method": method, **_own_choices(method)}
        if spec.attention is not None:
            choices.update(attention=spec.attention, arch=spec.arch)
        protocols = [(spec.protocol, spec.label)]
        if spec.protocol != "dataset":
            protocols.append(("dataset", f"{spec.label} (shared protocol)"))
        for protocol, label in protocols:
            measured = _measured([r for r in results if _protocol(r) == protocol], choices, protocol)
            values, flags = _cells(measured, list(DATASET_COLUMNS))
            row = _with_precisions(label, (measured[d] for d in DATASET_COLUMNS if d in measured))
            table.add_row(row, values, _marked_columns(table.columns, flags))
        table.add_row(f"{spec.label} (published, {spec.source})", [*spec.published, _printed_mean(spec.published)])
    return table


def build_tables(results: list[dict]) -> dict[str, Table]:
    """Rebuild Tables 1–4 of the NACLIP paper from results in ``result.json`` form (σ = 5 only).

    Pass the results through :func:`select_results` first to leave out those that are not full measurements;
    any that remain are marked ``†`` in the tables.

    Returns:
        ``{"table1": ..., "table4": ...}``; each measured row is followed by its ``(paper)`` row.
    Example:
        >>> print(build_tables(LocalSource("outputs").results())["table1"].to_markdown())  # doctest: +SKIP
    """
    return {name: TABLE_BUILDERS[name](results) for name in sorted(TABLE_BUILDERS)}


# ----------------------------------------------------------------------------------------------- σ sweep
def sigma_sweep(results: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """mIoU vs σ of NACLIP (full attention, reduced arch, no PAMR), one curve per (backbone, dataset) found.

    Keys follow the backbones' and the paper's dataset order, unknown names after them; σ ascending; for each
    (backbone, dataset, σ) a full measurement beats a caveated one, then the newest wins.
    """
    selected = (r for r in results if _matches(r, SIGMA_SWEEP_CHOICES))
    best = _best_by(
        selected, lambda r: (str(r["choices"].get("backbone")), str(r["choices"].get("dataset")), _sigma(r))
    )
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (backbone, dataset, sigma), result in best.items():
        curves.setdefault((backbone, dataset), []).append((sigma, result["miou"]))
    backbones = [*BACKBONE_HEADERS, *sorted({b for b, _ in curves} - set(BACKBONE_HEADERS))]
    datasets = [*DATASET_COLUMNS, *sorted({d for _, d in curves} - set(DATASET_COLUMNS))]
    return {(b, d): sorted(curves[b, d]) for b in backbones for d in datasets if (b, d) in curves}


def _curve_caveated(results: list[dict], backbone: str, dataset: str) -> bool:
    choices = {**SIGMA_SWEEP_CHOICES, "backbone": backbone, "dataset": dataset}
    return any(caveats(r) for r in results if _matches(r, choices))


_BACKBONE_MARKERS = ("o", "s", "^", "D", "v", "P")


def sigma_figure(results: list[dict]) -> Any:
    """The mIoU-vs-σ figure (a matplotlib ``Figure``), or ``None`` when no result is of the swept configuration.

    Colour follows the dataset and the marker the backbone; a (backbone, dataset) measured at one σ only is drawn as
    a point, not a line. The legend sits beside the axes (never over the data) and the ``†`` footnote, when a line
    comes from results that are not full measurements, is wrapped under them; save with ``bbox_inches="tight"``.
    """
    curves = sigma_sweep(results)
    if not curves:
        return None
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe inside notebooks.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    datasets = list(dict.fromkeys(d for _, d in curves))
    backbones = list(dict.fromkeys(b for b, _ in curves))
    colours = colormaps["tab10"] if len(datasets) <= 10 else colormaps["tab20"]
    marked = False
    for (backbone, dataset), points in curves.items():
        sigmas, mious = zip(*points, strict=True)
        dagger = DAGGER if _curve_caveated(results, backbone, dataset) else ""
        marked = marked or bool(dagger)
        label = f"{BACKBONE_HEADERS.get(backbone, backbone)} {DATASET_COLUMNS.get(dataset, dataset)}{dagger}"
        ax.plot(
            sigmas,
            mious,
            color=colours(datasets.index(dataset)),
            marker=_BACKBONE_MARKERS[backbones.index(backbone) % len(_BACKBONE_MARKERS)],
            linestyle="-" if len(points) > 1 else "none",
            label=label,
        )
    ax.set_xlabel("σ (Gaussian neighbourhood)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("NACLIP: mIoU vs σ")
    if all(float(sigma).is_integer() for points in curves.values() for sigma, _ in points):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)
    if marked:
        fig.text(0.02, 0.01, textwrap.fill(FOOTNOTE, 100), fontsize="x-small", va="bottom", ha="left")
        fig.subplots_adjust(bottom=0.22)
    return fig


def plot_sigma(results: list[dict], path: str | Path) -> Path | None:
    """Write the mIoU-vs-σ plot (:func:`sigma_figure`) as PNG; ``None`` with a note when there is nothing to draw."""
    fig = sigma_figure(results)
    if fig is None:
        print("naclip.tables: note: no σ-sweep results (full/reduced/none); plot skipped", file=sys.stderr)
        return None
    path = Path(path)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.1)
    return path


# ------------------------------------------------------------------------------------------------- export
EXPORT_COLUMNS: tuple[str, ...] = (
    "method", "backbone", "attention", "sigma", "arch", "refine", "dataset", "protocol", "miou", "pixel_acc",
    "num_images", "caveats", "overrides", "finished_at",
)  # fmt: skip


def export_results(results: list[dict], path: str | Path) -> Path:
    """Every result as one CSV row, its configuration then its numbers (``EXPORT_COLUMNS``).

    The paper tables hold only their own cells; this holds everything else too (plug-in attentions, other σ,
    backbones or datasets, custom runs), with ``caveats`` naming the results that are not full measurements.
    """

    def cells(result: dict) -> dict[str, Any]:
        config = result.get("config") or {}
        choices = result["choices"]
        sigma = (config.get("attention") or {}).get("sigma")
        return {
            **{key: choices.get(key, "") for key in ("method", "backbone", "attention", "arch", "refine", "dataset")},
            "sigma": "" if sigma is None else sigma,
            "protocol": _protocol(result),
            "miou": f"{result['miou']:.2f}",
            "pixel_acc": "" if result.get("pixel_acc") is None else f"{result['pixel_acc']:.2f}",
            "num_images": result.get("num_images", ""),
            "caveats": "; ".join(caveats(result)),
            "overrides": " ".join(str(o) for o in result.get("overrides") or []),
            "finished_at": result.get("finished_at") or "",
        }

    def order(row: dict[str, Any]) -> tuple:
        names = tuple(str(row[k]) for k in ("dataset", "backbone", "method", "attention", "arch", "refine", "protocol"))
        return *names, -1.0 if row["sigma"] == "" else float(row["sigma"]), str(row["finished_at"])

    rows = sorted((cells(r) for r in results), key=order)
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------- CLI
class _UsageError(Exception):
    """Raised instead of argparse's exit so bad input ends as one stderr line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (use --source local DIR or --source wandb ENTITY/PROJECT)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m naclip.tables", description="Rebuild the NACLIP paper tables.")
    parser.add_argument(
        "--source",
        nargs=2,
        required=True,
        metavar=("KIND", "LOCATION"),
        help="'local DIR' (reads result.json files below DIR) or 'wandb ENTITY/PROJECT'",
    )
    parser.add_argument("--out", default="tables", help="output directory (default: ./tables)")
    parser.add_argument(
        "--include-partial",
        action="store_true",
        help=f"also use results with random weights or on a partial split, marked {DAGGER}",
    )
    parser.add_argument(
        "--export",
        metavar="CSV",
        help="also write every result found (config -> mIoU, caveats included) to this CSV file, e.g. all.csv",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print Tables 1–4 and the methods table as markdown; write their CSVs and ``sigma_sweep.png`` to ``--out``.

    Results with random weights or on a partial split are left out unless ``--include-partial`` is given;
    ``--export`` writes every result found, whatever the tables use.
    """
    try:
        args = _parse(argv)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is a file, not a folder; pass a folder for the CSVs and the plot")
        kind, location = args.source
        results = load_source(kind, location).results()
        if not results:
            raise ValueError(f"no usable results found in {kind} source {location!r}; run evaluations first")
    except (_UsageError, ValueError) as err:
        print(f"naclip.tables: error: {err}", file=sys.stderr)
        return 2

    if args.export:
        try:
            exported = export_results(results, args.export)
        except OSError as err:
            print(f"naclip.tables: error: cannot write --export {args.export}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"naclip.tables: exported {len(results)} results to {exported}", file=sys.stderr)
    results, note = select_results(results, args.include_partial)
    for line in (note, setting_note(results)):
        if line:
            print(f"naclip.tables: {line}", file=sys.stderr)
    tables = {**build_tables(results), "methods": methods_table(results)}
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            print(f"### {table.title}\n\n{table.to_markdown()}\n")
            table.to_csv(out / f"{name}.csv")
        plot_path = out / SIGMA_PLOT
        plot = plot_sigma(results, plot_path)
        if plot is None and plot_path.is_file():  # an earlier run's plot beside these tables would not match them
            plot_path.unlink()
            print(
                f"naclip.tables: removed the earlier {SIGMA_PLOT} from {out}: this run has no σ-sweep results",
                file=sys.stderr,
            )
    except OSError as err:
        print(f"naclip.tables: error: cannot write to {str(out)!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    written = ", ".join([*(f"{name}.csv" for name in tables), *([plot.name] if plot else [])])
    print(f"wrote {written} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
