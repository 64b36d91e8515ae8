"""Dataset catalog for the NACLIP evaluation protocol (configs in ``conf/dataset/*.yaml``).

Example:
    >>> from naclip.data import build_dataset
    >>> ds = build_dataset({"name": "synthetic", "layout": "synthetic", "class_names": "synthetic",
    ...                     "short_side": 96, "max_long_side": 2048})
    >>> sorted(ds[0])
    ['error', 'image', 'label', 'name', 'path']
"""

from naclip.data.catalog import (
    SegmentationDataset,
    build_dataset,
    collate,
    display_names,
    list_class_names,
    load_class_names,
)
from naclip.data.errors import DatasetError
from naclip.data.layouts import list_layouts
from naclip.data.transforms import rescaled_size, resize_image

__all__ = [
    "DatasetError",
    "SegmentationDataset",
    "build_dataset",
    "collate",
    "display_names",
    "list_class_names",
    "list_layouts",
    "load_class_names",
    "rescaled_size",
    "resize_image",
]
