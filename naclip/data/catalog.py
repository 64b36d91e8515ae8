"""Dataset catalog: class-name files, the evaluation Dataset, and its collate function.

A dataset config (one ``conf/dataset/*.yaml`` as a plain dict) names a layout, where the data lives and the
protocol values; :func:`build_dataset` turns it into a torch ``Dataset`` whose samples are already resized
images with labels at original resolution. Bad files never raise inside ``__getitem__`` (DataLoader workers
would mangle the traceback); the sample carries an ``error`` line instead and the runner decides, in the
main process, whether to raise or skip (``dataset.on_error``).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from naclip.data.errors import DatasetError
from naclip.data.layouts import Source, build_source
from naclip.data.transforms import invalid_label_values, reduce_zero_label, resize_image

ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")
BACKGROUND = "background"
# Packaged class-name files whose class 0 is the background class (its synonyms "sky, wall, ..." are prompt words).
BACKGROUND_FIRST: frozenset[str] = frozenset({"voc21", "pc60", "coco_object"})
_REQUIRED_KEYS = ("layout", "class_names", "short_side", "max_long_side")


def list_class_names() -> list[str]:
    """Class-name files shipped in ``naclip/classnames`` (the names :func:`load_class_names` accepts)."""
    folder = resources.files("naclip").joinpath("classnames")
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def _parse_class_names(text: str, source: str) -> list[list[str]]:
    lines = text.rstrip().splitlines()
    classes = [[name.strip() for name in line.split(",") if name.strip()] for line in lines]
    empty = [i + 1 for i, names in enumerate(classes) if not names]
    if not classes or empty:
        where = f"line(s) {empty}" if empty else "the file"
        raise DatasetError(f"class-name file '{source}': {where} empty; write one class per line")
    return classes


def load_class_names(name_or_path: str) -> list[list[str]]:
    """Class names as ``[[synonym, ...], ...]``: line i is class i, synonyms separated by ", ".

    Args:
        name_or_path: a packaged name (``"voc21"``, ``"ade"``, ``"synthetic"``, see :func:`list_class_names`)
            or the path of a ``.txt`` file.

    Raises:
        DatasetError: unknown name / missing file, or an empty line (it would shift every class id).

    Example:
        >>> load_class_names("voc21")[1]
        ['aeroplane']
    """
    name = str(name_or_path)
    if name in list_class_names():
        file = resources.files("naclip").joinpath("classnames").joinpath(f"{name}.txt")
        return _parse_class_names(file.read_text(encoding="utf-8"), name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"class names {name!r}: not a packaged name ({', '.join(list_class_names())}) nor an existing file"
        )
    return _parse_class_names(path.read_text(encoding="utf-8"), str(path))


def display_names(class_names: list[list[str]], background_index: int | None = None) -> list[str]:
    """One name per class for tables, result.json, W&B and figures; synonyms stay prompt words only.

    A class's display name is its first synonym, except the dataset's background class (``background_index``,
    e.g. VOC's class 0 whose prompts are "sky, wall, tree, ..."), which reads "background".

    Example:
        >>> display_names([["sky", "wall"], ["aeroplane"]], background_index=0)
        ['background', 'aeroplane']
    """
    names = [synonyms[0] for synonyms in class_names]
    if background_index is not None:
        names[background_index] = BACKGROUND
    return names


def _one_line(message: str) -> str:
    return " ".join(message.split())


class SegmentationDataset(Dataset):
    """Evaluation samples of one benchmark; built by :func:`build_dataset`, not directly.

    Each item is a dict: ``image`` uint8 (3, h, w) resized by the protocol, ``label`` int64 (H, W) at the
    original resolution with ``ignore_index`` for unlabelled pixels, ``name``, ``path`` and ``error``
    (None, or one line naming the bad file; then image and label are None).
    """

    def __init__(
        self,
        source: Source,
        *,
        name: str,
        class_names: list[list[str]],
        ignore_index: int,
        reduce_zero_label: bool,
        short_side: int,
        max_long_side: int,
        on_error: str,
        background_index: int | None = None,
        min_side: int = 1,
    ) -> None:
        self.rows = source.rows
        self.reader = source.reader
        self.name = name
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.background_index = background_index
        self.display_names = display_names(class_names, background_index)
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.short_side = short_side
        self.max_long_side = max_long_side
        self.on_error = on_error
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"SegmentationDataset(name={self.name!r}, samples={len(self)}, classes={self.num_classes})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        name, image_path, label_path = self.reader.locate(row, index)
        sample: dict[str, Any] = {"image": None, "label": None, "name": name, "path": image_path, "error": None}
        try:
            image = self.reader.image(row)  # (H, W, 3) uint8
        except Exception as exc:
            sample["error"] = _one_line(f"{self.name}: cannot read image {image_path}: {type(exc).__name__}: {exc}")
            return sample
        try:
            raw = self.reader.label(row)  # (H, W)
        except Exception as exc:
            sample["error"] = _one_line(f"{self.name}: cannot read label {label_path}: {type(exc).__name__}: {exc}")
            return sample
        error = self._check(image, raw, image_path, label_path)
        if error:
            sample["error"] = error
            return sample
        label = reduce_zero_label(raw, self.ignore_index) if self.reduce_zero_label else raw
        bad = invalid_label_values(label, self.num_classes, self.ignore_index)
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            sample["error"] = (
                f"{self.name}: label {label_path} has values [{shown}] outside [0, {self.num_classes}) "
                f"(ignore {self.ignore_index}, reduce_zero_label={self.reduce_zero_label}); wrong "
                f"dataset.class_names or label files?"
            )
            return sample
        sample["image"] = resize_image(image, self.short_side, self.max_long_side)  # (3, h, w) uint8
        height, width = sample["image"].shape[-2:]
        if min(height, width) < self.min_side:
            sample["image"] = None
            sample["error"] = (
                f"{self.name}: image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW), "
                f"{height}x{width} after the protocol resize (short_side={self.short_side}, "
                f"max_long_side={self.max_long_side}): smaller than one {self.min_side}-pixel patch"
            )
            return sample
        sample["label"] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))  # (H, W)
        return sample

    def _check(self, image: np.ndarray, label: np.ndarray, image_path: str, label_path: str) -> str | None:
        """Shape problems that make a pair unusable, as a one-line message."""
        if image.ndim not in (2, 3) or label.ndim != 2:
            return (
                f"{self.name}: image {image_path} has shape {image.shape} and label {label_path} shape "
                f"{label.shape}; expected (H, W, 3) and (H, W)"
            )
        if image.shape[:2] != label.shape:
            return (
                f"{self.name}: label {label_path} is {label.shape[0]}x{label.shape[1]} (HxW) but image "
                f"{image_path} is {image.shape[0]}x{image.shape[1]}"
            )
        return None


def _int_option(cfg: Mapping[str, Any], key: str, name: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DatasetError(f"{name}: dataset.{key} must be a positive integer, got {value!r}")
    return value


def default_background_index(name_or_path: str, class_names: list[list[str]]) -> int | None:
    """0 where the class-name file's class 0 is background (VOC21, PC60, COCO-Object or a first name "background").

    So ``dataset=hf dataset.class_names=voc21`` reports class 0 as "background", not as its first synonym "sky".
    """
    if name_or_path in BACKGROUND_FIRST or class_names[0][0].lower() == BACKGROUND:
        return 0
    return None


def build_dataset(cfg: Mapping[str, Any], on_error: str = "raise", min_side: int = 1) -> SegmentationDataset:
    """Build the evaluation dataset described by one dataset config.

    Args:
        cfg: the ``dataset`` config group as a plain dict (keys of ``conf/dataset/*.yaml``).
        on_error: what the runner should do with bad samples, ``"raise"`` or ``"skip"``; stored as
            ``dataset.on_error`` (the dataset itself never raises from ``__getitem__``).
        min_side: the model's patch size; an image whose resized short side is below it becomes a bad sample
            naming the file (e.g. 10000x50 resizes to 2048x10, too small for a 16-pixel patch).

    Returns:
        A torch Dataset of dict samples, with ``class_names``, ``display_names``, ``num_classes``,
        ``ignore_index``, ``name`` and ``on_error`` attributes.

    Raises:
        DatasetError: bad config, missing root / split file, or no images (one line naming the path and
            the fix: ``NACLIP_DATA`` or ``dataset.root=...``).
        ValueError: ``on_error`` not in ``("raise", "skip")`` (as DatasetError, a ValueError).

    Example:
        >>> ds = build_dataset({"name": "synthetic", "layout": "synthetic", "class_names": "synthetic",
        ...                     "short_side": 96, "max_long_side": 2048})
        >>> ds[0]["image"].shape
        torch.Size([3, 96, 128])
    """
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"build_dataset expects the dataset config as a mapping, got {type(cfg).__name__}")
    name = str(cfg.get("name") or cfg.get("layout"))
    if on_error not in ON_ERROR_CHOICES:
        raise DatasetError(f"{name}: on_error={on_error!r} is not one of {', '.join(ON_ERROR_CHOICES)}")
    missing = [key for key in _REQUIRED_KEYS if cfg.get(key) is None]
    if missing:
        raise DatasetError(f"{name}: dataset config lacks {', '.join(missing)}; set dataset.<key>=...")
    ignore_index = cfg.get("ignore_index", 255)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise DatasetError(f"{name}: dataset.ignore_index must be an integer, got {ignore_index!r}")
    short_side = _int_option(cfg, "short_side", name)
    max_long_side = _int_option(cfg, "max_long_side", name)
    class_names = load_class_names(cfg["class_names"])
    background_index = cfg.get("background_index")
    if background_index is None:
        background_index = default_background_index(str(cfg["class_names"]), class_names)
    if background_index is not None and (
        not isinstance(background_index, int) or not 0 <= background_index < len(class_names)
    ):
        raise DatasetError(
            f"{name}: dataset.background_index must be a class index in [0, {len(class_names)}) or null, "
            f"got {background_index!r}"
        )
    source = build_source(cfg)
    return SegmentationDataset(
        source,
        name=name,
        class_names=class_names,
        ignore_index=ignore_index,
        reduce_zero_label=bool(cfg.get("reduce_zero_label", False)),
        short_side=short_side,
        max_long_side=max_long_side,
        on_error=on_error,
        background_index=background_index,
        min_side=min_side,
    )


def collate(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Batch samples as per-key lists: images differ in size and bad samples hold None, so no stacking."""
    if not batch:
        return {}
    keys = list(batch[0])
    if any(list(sample) != keys for sample in batch):
        raise ValueError(f"collate expects samples with the same keys {keys}")
    return {key: [sample[key] for sample in batch] for key in keys}
