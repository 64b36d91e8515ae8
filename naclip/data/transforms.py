"""Decoding and the evaluation protocol's resize, written to match mmseg/mmcv (cv2) numerically.

The published numbers come from mmseg pipelines: images are read as RGB, rescaled keeping the aspect ratio
with cv2's bilinear filter (no antialiasing), and labels stay at their original resolution. PIL's resize
antialiases when shrinking, so it would change the inputs the model sees; torch's bilinear without
antialiasing is the same half-pixel filter as cv2.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageSource = str | bytes | BinaryIO

# Single-channel PIL modes whose pixel values are class indices.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B")
# Far above float64 bilinear round-off (~1e-13 on 0..255) and far below the gap between a true .5 tie and
# the nearest non-tie value (~1e-8 for sizes up to 2048).
_TIE_EPS = 1e-9


def _open(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or a file object with PIL (lazily; callers force the decode)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return Image.open(source)


def read_rgb(source: ImageSource) -> np.ndarray:
    """Decode an image as RGB uint8 (H, W, 3); grayscale, palette and CMYK JPEGs exist in VOC/COCO."""
    with _open(source) as image:
        return np.array(image.convert("RGB"))  # (H, W, 3) uint8


def read_label(source: ImageSource) -> np.ndarray:
    """Decode a palette/grayscale PNG as its class indices (H, W) int64, never its palette colours.

    Raises:
        ValueError: the file is a colour image, so its pixels are not class indices.
    """
    with _open(source) as image:
        if image.mode not in _INDEX_MODES:
            raise ValueError(
                f"label image has mode {image.mode!r}; expected a palette or grayscale PNG of class "
                f"indices (one of {', '.join(_INDEX_MODES)})"
            )
        return np.array(image).astype(np.int64)  # (H, W)


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (unlabelled) becomes ignore, every other class id shifts by -1.

    Datasets without a background class (ADE20K, PASCAL Context 59, VOC 20) store "unlabelled" as 0.
    """
    out = label.astype(np.int64) - 1  # (H, W)
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out


def invalid_label_values(label: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """Label values outside ``[0, num_classes)`` other than ``ignore_index``, sorted (empty if valid)."""
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    return [int(v) for v in np.unique(label[bad])]


def rescaled_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Output (h, w) of mmcv's keep-ratio ``rescale`` to the scale (max_long_side, short_side).

    The factor is the largest that keeps the short side <= short_side and the long side <= max_long_side;
    sizes round half up like mmcv's ``_scale_size``.
    """
    if short_side <= 0 or max_long_side <= 0:
        raise ValueError(f"short_side={short_side} and max_long_side={max_long_side} must both be positive integers")
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bring an image to a (3, H, W) uint8 tensor; numpy defaults to HWC and tensors to CHW."""
    is_numpy = isinstance(image, np.ndarray)
    if is_numpy and not image.flags.writeable:  # torch.from_numpy needs a writable array
        image = image.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if is_numpy else image
    if tensor.dtype != torch.uint8:
        raise ValueError(f"resize_image expects a uint8 image, got dtype {tensor.dtype}")
    if tensor.ndim == 2:
        tensor = tensor[None]  # (1, H, W)
    elif tensor.ndim == 3:
        channels_last = tensor.shape[-1] in (1, 3)
        channels_first = tensor.shape[0] in (1, 3)
        if channels_last and (is_numpy or not channels_first):
            tensor = tensor.permute(2, 0, 1)  # (C, H, W)
        elif not channels_first:
            raise ValueError(f"resize_image expects 1 or 3 channels (HWC or CHW), got shape {tuple(tensor.shape)}")
    else:
        raise ValueError(f"resize_image expects an (H, W), (H, W, C) or (C, H, W) image, got {tuple(tensor.shape)}")
    return tensor.expand(3, -1, -1)  # (3, H, W)


def resize_image(image: np.ndarray | torch.Tensor, short_side: int, max_long_side: int) -> torch.Tensor:
    """Rescale an image the way the benchmark protocol does (mmcv keep-ratio rescale, cv2 bilinear).

    Args:
        image: uint8 image, numpy (H, W, 3) / (H, W) or tensor (3, H, W) / (H, W, 3).
        short_side: target short side (336 for most benchmarks, 560 for Cityscapes).
        max_long_side: cap on the long side (2048).

    Returns:
        uint8 tensor (3, h, w) with (h, w) from :func:`rescaled_size`.

    Example:
        >>> resize_image(np.zeros((375, 500, 3), np.uint8), 336, 2048).shape
        torch.Size([3, 336, 448])
    """
    chw = _as_chw(image)  # (3, H, W)
    size = rescaled_size(chw.shape[1], chw.shape[2], short_side, max_long_side)
    if size == tuple(chw.shape[1:]):
        return chw.contiguous()
    resized = F.interpolate(
        chw[None].double(), size=size, mode="bilinear", align_corners=False, antialias=False
    )  # (1, 3, h, w)
    # Round half up like cv2's fixed point. torch's kernels differ by thread count in the last bits, which
    # flips exact .5 ties; float64 keeps that error near 1e-13, and _TIE_EPS makes such ties round up in
    # every process (DataLoader workers run single-threaded).
    rounded = torch.floor(resized[0] + (0.5 + _TIE_EPS))  # (3, h, w)
    return rounded.clamp(0, 255).to(torch.uint8)  # (3, h, w)
