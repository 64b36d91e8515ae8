"""Make COCO-Object labels from COCO-Stuff164k: ``*_instanceTrainIds.png`` next to each ``*_labelTrainIds.png``.

COCO-Object keeps COCO's 80 thing classes and merges all stuff into one background class, so the
benchmark has 81 classes (``naclip/classnames/coco_object.txt``). In COCO-Stuff164k trainIds, 0-79 are the
things and 80-170 the stuff; 255 is unlabelled. Mapping: thing t -> t + 1, stuff -> 0, 255 -> 255.

Usage:
    python scripts/convert_coco_object.py $NACLIP_DATA/coco_stuff164k --split val2017 --workers 4
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

NUM_THINGS = 80
NUM_STUFF_CLASSES = 171
IGNORE = 255
SOURCE_SUFFIX = "_labelTrainIds.png"
TARGET_SUFFIX = "_instanceTrainIds.png"


def _lookup_table() -> np.ndarray:
    """256-entry map from COCO-Stuff trainId to COCO-Object id; -1 marks ids that must not occur."""
    table = np.full(256, -1, dtype=np.int16)
    table[:NUM_THINGS] = np.arange(1, NUM_THINGS + 1)
    table[NUM_THINGS:NUM_STUFF_CLASSES] = 0
    table[IGNORE] = IGNORE
    return table


_TABLE = _lookup_table()


def to_object_ids(train_ids: np.ndarray, source: str = "label") -> np.ndarray:
    """Map a COCO-Stuff trainId map (H, W) to COCO-Object ids (H, W) uint8.

    Raises:
        ValueError: the map holds values that are not trainIds (171-254 or outside uint8).
    """
    if train_ids.dtype != np.uint8:
        raise ValueError(f"{source}: expected an 8-bit trainId map, got dtype {train_ids.dtype}")
    mapped = _TABLE[train_ids]  # (H, W)
    if (mapped < 0).any():
        bad = np.unique(train_ids[mapped < 0]).tolist()
        raise ValueError(f"{source}: values {bad} are not COCO-Stuff trainIds (0-170 or 255)")
    return mapped.astype(np.uint8)


def convert_file(source: Path) -> Path:
    """Write the COCO-Object label for one ``*_labelTrainIds.png``; returns the written path."""
    target = source.with_name(source.name[: -len(SOURCE_SUFFIX)] + TARGET_SUFFIX)
    with Image.open(source) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{source}: mode {image.mode!r}, expected a grayscale trainId PNG")
        train_ids = np.array(image)  # (H, W) uint8
    Image.fromarray(to_object_ids(train_ids, str(source))).save(target)
    return target


def convert_split(root: Path, split: str = "val2017", workers: int = 1) -> list[Path]:
    """Convert every ``annotations/<split>/*_labelTrainIds.png`` under a COCO-Stuff164k root.

    Raises:
        FileNotFoundError: the annotation folder is missing or holds no ``*_labelTrainIds.png``.
    """
    folder = Path(root) / "annotations" / split
    sources = sorted(folder.glob(f"*{SOURCE_SUFFIX}")) if folder.is_dir() else []
    if not sources:
        raise FileNotFoundError(
            f"no '*{SOURCE_SUFFIX}' files in '{folder}'; pass the COCO-Stuff164k root (holding "
            f"annotations/{split}) prepared with mmsegmentation's coco_stuff164k converter"
        )
    if workers <= 1:
        return [convert_file(s) for s in sources]
    with Pool(workers) as pool:
        return pool.map(convert_file, sources, chunksize=64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="COCO-Stuff164k root (holds images/ and annotations/)")
    parser.add_argument("--split", default="val2017", help="annotation folder name (default: val2017)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    args = parser.parse_args(argv)
    try:
        written = convert_split(args.root, args.split, args.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} '*{TARGET_SUFFIX}' files in {args.root / 'annotations' / args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
