"""One-image inference in three lines, like detectron2's DefaultPredictor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from naclip.clip import image_mean_std, load_clip
from naclip.data.transforms import read_rgb, resize_image
from naclip.segmenter import Segmenter
from naclip.text import get_tokenizer


def auto_device(device: str | None = "auto") -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) in [0, 255] → CLIP-normalized float32."""
    x = images.float() / 255.0
    shape = (-1, 1, 1)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


def prepare_image(
    pixels: Tensor, mean: Sequence[float], std: Sequence[float], device: str, short_side: int, max_long_side: int
) -> Tensor:
    """uint8 (3, H, W) → normalized (3, h, w) on `device`, resized by the benchmark protocol (short_side 0 = as is).

    The resize is :func:`naclip.data.transforms.resize_image` (mmcv keep-ratio size, ``cv2.INTER_LINEAR``).
    """
    if short_side > 0:
        pixels = resize_image(pixels, short_side, max_long_side)
    return normalize_images(pixels.to(device), mean, std)


def read_image(image: str | os.PathLike | Image.Image | np.ndarray | Tensor) -> Tensor:
    """A path, PIL image, HWC uint8 array or CHW uint8 tensor → uint8 tensor (3, H, W).

    Files are decoded by :func:`naclip.data.transforms.read_rgb` (OpenCV, EXIF orientation applied), so the
    pixels, and the label maps made from them, are in the orientation the user sees.

    Raises:
        ValueError: one line naming the file: missing, unreadable, not an image, or a decompression bomb.
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
        image = read_rgb(path)  # (H, W, 3)
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got {getattr(image, 'shape', type(image))}")
    return image.to(torch.uint8)


class Predictor:
    """Build once, then call on raw images: resize like the benchmarks, normalize, segment, resize back.

    Example:
        >>> predictor = Predictor(["sky", "tree", "road, street"], pretrained="openai")
        >>> labels = predictor("street.jpg")  # (H, W) int64 at the image's size
    """

    def __init__(
        self,
        class_names: Sequence[Sequence[str] | str],
        model: str = "ViT-B-16",
        pretrained: str | None = "openai",
        device: str | None = "auto",
        precision: str = "fp32",
        short_side: int = 336,
        max_long_side: int = 2048,
        **segmenter_kwargs: Any,
    ) -> None:
        self.device = auto_device(device)
        clip = load_clip(model, pretrained, device=self.device, precision=precision)  # type: ignore[arg-type]
        self.mean, self.std = image_mean_std(model, pretrained)
        self.short_side, self.max_long_side = short_side, max_long_side
        segmenter_kwargs.setdefault("tokenizer", get_tokenizer(model, random_weights=pretrained is None))
        self.segmenter = Segmenter(clip, class_names, **segmenter_kwargs).to(self.device)

    def preprocess(self, image: Any) -> Tensor:
        """Raw image → normalized (3, h, w) on the device, resized by the protocol (short_side 0 = as is)."""
        return prepare_image(read_image(image), self.mean, self.std, self.device, self.short_side, self.max_long_side)

    @torch.no_grad()
    def __call__(self, image: Any) -> Tensor:
        pixels = read_image(image)
        x = self.preprocess(pixels)
        return self.segmenter.predict_list([x], [tuple(pixels.shape[-2:])])[0].cpu()
