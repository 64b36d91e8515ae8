"""Decoding and the evaluation protocol's resize, done with OpenCV as the published mmseg/mmcv pipeline does.

The published numbers come from mmseg pipelines: images are decoded by ``cv2.imdecode(..., IMREAD_COLOR)``
(which applies a JPEG's EXIF orientation) and converted to RGB, then rescaled keeping the aspect ratio with
``cv2.resize(..., INTER_LINEAR)``, a fixed-point bilinear filter without antialiasing; labels are decoded by
PIL as stored (never resized, never rotated). Calling OpenCV itself gives the same uint8 pixels byte for
byte: a float bilinear rounded to uint8 (torch's, PIL's) is off by one grey level on many values.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import cv2
import numpy as np
import torch
from PIL import Image

ImageSource = str | os.PathLike | bytes | BinaryIO

# Single-channel PIL modes whose pixel values are class indices.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B")


def _open(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or a file object with PIL (lazily; callers force the decode)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return Image.open(source)


def _describe(source: ImageSource) -> str:
    """How an error names the image: its path, a file object's name, or the size of raw bytes."""
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return repr(getattr(source, "name", None) or type(source).__name__)


def _read_bytes(source: ImageSource) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as file:
            return file.read()
    return source.read()


def _check_pixel_count(data: bytes, name: str) -> None:
    """Refuse images whose header declares more pixels than Pillow's decompression-bomb limit (2 × MAX).

    Only the header is parsed, so a bomb is refused before any pixel memory is allocated. Formats PIL does
    not know are left to OpenCV (which has its own limit).
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        raise ValueError(f"cannot read image {name}: {err}") from err
    except Exception:  # not identifiable by PIL: OpenCV decides below
        return
    if width * height > 2 * limit:
        raise ValueError(
            f"cannot read image {name}: {width}x{height} pixels exceed the limit of {2 * limit} "
            f"(2 x PIL.Image.MAX_IMAGE_PIXELS), a possible decompression bomb"
        )


def read_rgb(source: ImageSource) -> np.ndarray:
    """Decode an image like the published protocol: ``cv2.imdecode(..., IMREAD_COLOR)``, then BGR → RGB.

    Grey, palette, CMYK and RGBA files all come back as 3-channel RGB (alpha dropped), and a JPEG's EXIF
    orientation is applied (orientation 6 swaps height and width), exactly as OpenCV does.

    Args:
        source: a path, the encoded bytes, or a binary file object.

    Returns:
        uint8 array (H, W, 3), RGB.

    Raises:
        ValueError: one line naming the image: missing or unreadable file, not a decodable image, or more
            pixels than Pillow's decompression-bomb limit.

    Example:
        >>> read_rgb("2007_000033.jpg").shape
        (366, 500, 3)
    """
    name = _describe(source)
    try:
        data = _read_bytes(source)
    except OSError as err:
        raise ValueError(f"cannot read image {name}: {err.strerror or err}") from err
    if not data:
        raise ValueError(f"cannot read image {name}: the file is empty")
    _check_pixel_count(data, name)
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our ValueError is the one message
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # (H, W, 3) BGR
    except cv2.error as err:
        raise ValueError(f"cannot read image {name}: {' '.join(str(err).split())}") from err
    finally:
        cv2.utils.logging.setLogLevel(level)
    if bgr is None:
        raise ValueError(f"cannot read image {name}: OpenCV cannot decode it (corrupt, truncated or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) RGB


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


def _as_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bring an image to a contiguous (H, W, C) uint8 array, C in (1, 3); numpy defaults to HWC, tensors to CHW."""
    if not isinstance(image, np.ndarray | torch.Tensor):
        raise ValueError(f"resize_image expects a numpy array or a torch tensor, got {type(image).__name__}")
    is_numpy = isinstance(image, np.ndarray)
    array = image if is_numpy else image.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise ValueError(f"resize_image expects a uint8 image, got dtype {image.dtype}")
    if array.ndim == 2:
        array = array[..., None]  # (H, W, 1)
    elif array.ndim == 3:
        channels_last = array.shape[-1] in (1, 3)
        channels_first = array.shape[0] in (1, 3)
        if not (channels_last and (is_numpy or not channels_first)):
            if not channels_first:
                raise ValueError(f"resize_image expects 1 or 3 channels (HWC or CHW), got shape {array.shape}")
            array = array.transpose(1, 2, 0)  # (H, W, C)
    else:
        raise ValueError(f"resize_image expects an (H, W), (H, W, C) or (C, H, W) image, got {array.shape}")
    return np.ascontiguousarray(array)


def resize_image(image: np.ndarray | torch.Tensor, short_side: int, max_long_side: int) -> torch.Tensor:
    """Rescale an image the way the benchmark protocol does: mmcv keep-ratio size, ``cv2.INTER_LINEAR``.

    Args:
        image: uint8 image, numpy (H, W, 3) / (H, W) or tensor (3, H, W) / (H, W, 3).
        short_side: target short side (336 for most benchmarks, 560 for Cityscapes).
        max_long_side: cap on the long side (2048).

    Returns:
        uint8 tensor (3, h, w) with (h, w) from :func:`rescaled_size`, byte-identical to OpenCV's.

    Example:
        >>> resize_image(np.zeros((375, 500, 3), np.uint8), 336, 2048).shape
        torch.Size([3, 336, 448])
    """
    hwc = _as_hwc(image)  # (H, W, C)
    height, width = hwc.shape[:2]
    size = rescaled_size(height, width, short_side, max_long_side)
    if size != (height, width):
        hwc = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR).reshape(*size, -1)  # (h, w, C)
    chw = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)  # (C, h, w)
    return chw.expand(3, -1, -1).contiguous()  # (3, h, w)
