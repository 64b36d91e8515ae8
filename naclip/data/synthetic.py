"""Deterministic generated scenes (coloured shapes on black) for tests and smoke runs without data.

Class ids match ``naclip/classnames/synthetic.txt``: 0 black background, 1 red circle, 2 green square,
3 blue triangle. Each sample depends only on (seed, index), so any worker can regenerate it.
"""

from __future__ import annotations

import numpy as np

# RGB colour of each class id, in the order of synthetic.txt.
COLORS = np.array([[0, 0, 0], [220, 30, 30], [30, 180, 40], [40, 60, 220]], dtype=np.int16)
NUM_CLASSES = len(COLORS)
_NOISE = 12


def make_sample(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw sample ``index`` of the scene set ``seed``.

    Returns:
        image uint8 (height, width, 3) and label int64 (height, width) with ids in [0, NUM_CLASSES).
    """
    if height < 8 or width < 8:
        raise ValueError(f"synthetic image_size must be at least [8, 8], got [{height}, {width}]")
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[:height, :width].astype(np.float64)  # (H, W) each
    side = min(height, width)
    label = np.zeros((height, width), dtype=np.int64)  # (H, W)

    # Green square (class 2), drawn first so later shapes may cover it.
    half = rng.uniform(0.15, 0.25) * side
    cy, cx = rng.uniform(half, height - half), rng.uniform(half, width - half)
    label[(np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)] = 2

    # Blue triangle (class 3): inside all three edges of an upright triangle.
    size = rng.uniform(0.3, 0.5) * side
    ty, tx = rng.uniform(size / 2, height - size / 2), rng.uniform(size / 2, width - size / 2)
    top, bottom = ty - size / 2, ty + size / 2
    inside = (yy <= bottom) & (np.abs(xx - tx) <= (yy - top) / 2)
    label[inside] = 3

    # Red circle (class 1), on top.
    radius = rng.uniform(0.12, 0.22) * side
    cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1

    noise = rng.integers(-_NOISE, _NOISE + 1, size=(height, width, 3))  # (H, W, 3)
    image = np.clip(COLORS[label] + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
    return image, label
