"""The one error type of the dataset catalog, kept apart so every data module can raise it."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be built: bad config, missing root/split file, or no images found.

    Messages are one line and say how to fix the problem (usually ``NACLIP_DATA`` or ``dataset.root=...``).
    """
