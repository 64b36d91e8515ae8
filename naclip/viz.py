"""Figures and label images: last-block attention maps (paper Fig. 1), mask overlays, palette PNGs.

Everything draws on matplotlib ``Figure`` objects with an Agg canvas (no pyplot state, no GUI backend) or on
PIL images, so it runs headless in scripts, tests, notebooks and the W&B sink alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import imgviz
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch import Tensor, nn

from naclip.attention import ATTENTIONS, attention_weights, gaussian_prior, get_attention
from naclip.encoder import DenseEncoder

Patch = tuple[int, int]  # (row, col) in the patch grid
ArrayLike = np.ndarray | Tensor

# Column titles of the attention figure; unknown variants keep their own name.
VARIANT_TITLES: dict[str, str] = {
    "vanilla": "vanilla (CLIP: q·k)",
    "kk_sim": "key-key (k·k)",
    "n_only": "neighbourhood only",
    "full": "NACLIP (k·k + Gaussian)",
    "value": "MaskCLIP (v: itself only)",
    "qq": "ClearCLIP (q·q)",
    "csa": "SCLIP (q·q + k·k)",
}


BACKGROUND = "background"


def variant_title(name: str) -> str:
    """Column title of a variant; one whose rows do not sum to 1 (SCLIP's csa: 2) says how it is normalised."""
    title = VARIANT_TITLES.get(name, name)
    variant = ATTENTIONS.get(name)
    if variant is not None and variant.row_sum != 1.0:
        title += f"\nweights ÷ {variant.row_sum:g} (rows sum to {variant.row_sum:g})"
    return title


def label_colormap() -> np.ndarray:
    """The VOC palette (256, 3) uint8: black for class 0 (VOC's background), a visible colour for every other."""
    return imgviz.label_colormap()


def class_colours(class_names: Sequence[str]) -> np.ndarray:
    """A (256, 3) uint8 palette for these classes: only a class named "background" is black.

    The other classes take the VOC palette's non-black colours in order, so a dataset whose class 0 is its
    background keeps the VOC colours exactly, and a user's first class (``person``) is never drawn black as if
    unlabelled. Values past the class list (e.g. 255 = ignore) keep their VOC colour.

    Example:
        >>> class_colours(["person", "car"])[0].tolist()  # the VOC palette's class-1 red, not black
        [128, 0, 0]
    """
    voc = label_colormap()
    colours = voc.copy()
    visible = 0
    for index, name in enumerate(class_names[: len(voc)]):
        if name == BACKGROUND:
            colours[index] = voc[0]
        else:
            colours[index] = voc[1 + visible % (len(voc) - 1)]
            visible += 1
    return colours


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    image: Tensor,
    patches: Sequence[Patch],
    variants: Sequence[str] = ("vanilla", "kk_sim", "full"),
    arch: str = "reduced",
    sigma: float = 5.0,
) -> dict[str, Tensor]:
    """Where chosen patches look in the last block: head-averaged attention over the patch grid per variant.

    The blocks before the last one are shared by all variants, so they run once and only the last block's
    attention differs. ``arch`` does not change these weights (it acts after the attention); it is checked
    so that a figure is always labelled with a valid configuration.

    Args:
        model: open_clip CLIP model with a ViT image tower.
        image: CLIP-normalized float image (3, H, W) or (1, 3, H, W).
        patches: (row, col) positions in the patch grid of the query patches.
        variants: attention variants (see :func:`naclip.list_attentions`).
        arch: "vanilla" or "reduced".
        sigma: Gaussian prior std in patches, for the variants that use it.

    Returns:
        ``{variant: (len(patches), rows, cols)}`` float32 CPU tensors; the CLS column is dropped, so a row
        sums to one minus the mass on the class token. Variants whose weight rows sum to more than one (SCLIP's
        ``csa``, two softmaxes: 2) are divided by that sum, and their figure title says so.

    Example:
        >>> maps = attention_maps(model, x, [(3, 4)])  # maps["full"].shape == (1, rows, cols)
    """
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one (3, H, W) or (1, 3, H, W) tensor, got shape {tuple(image.shape)}")
    if not patches:
        raise ValueError("patches must list at least one (row, col) position")
    if not variants:
        raise ValueError("variants must name at least one attention variant")
    kinds = {name: get_attention(name) for name in variants}
    encoder = DenseEncoder(model, attention="vanilla", arch=arch)
    x, grid = encoder.embed(image.to(next(encoder.parameters()).device))  # (1, prefix+N, C)
    rows, cols = grid
    bad = [p for p in patches if not (0 <= p[0] < rows and 0 <= p[1] < cols)]
    if bad:
        raise ValueError(
            f"patches {bad} lie outside the {rows}x{cols} patch grid; valid rows 0..{rows - 1}, cols 0..{cols - 1}"
        )
    q, k, _ = encoder.qkv(encoder.trunk(x))  # (1, h, prefix+N, d) each
    pre = encoder.num_prefix_tokens
    queries = torch.tensor([pre + r * cols + c for r, c in patches], device=q.device)  # token index of each patch
    maps = {}
    for name, kind in kinds.items():
        prior = gaussian_prior(grid, sigma, device=q.device, dtype=q.dtype, prefix=pre) if kind.uses_sigma else None
        weights = attention_weights(kind, q, k, prior)[0].float().mean(dim=0) / kind.row_sum  # (prefix+N, prefix+N)
        maps[name] = weights[queries, pre:].reshape(len(patches), rows, cols).cpu()  # (P, rows, cols)
    return maps


@torch.no_grad()
def method_attention_maps(
    segmenter: nn.Module, image: Tensor, patches: Sequence[Patch], grid: tuple[int, int] | None = None
) -> Tensor:
    """Where chosen patches look in a method's own last-block attention (ProxyCLIP's proxy-guided attention on
    the proxy's grid, CASS's distilled attention on CLIP's grid): (len(patches), rows, cols), head-averaged.

    Args:
        segmenter: a :class:`naclip.Segmenter` whose method has ``attention(state)`` (proxyclip, cass).
        image: CLIP-normalized float image (3, H, W) or (1, 3, H, W).
        patches: (row, col) positions of the query patches on the grid the attention lives on, or on ``grid``.
        grid: the (rows, cols) grid ``patches`` are given on (e.g. CLIP's, to set the map beside
            :func:`attention_maps` of the same patches): each then queries the attention-grid cell holding its centre.
    """
    method = segmenter.method
    if not hasattr(method, "attention"):
        raise ValueError(f"method {type(method).__name__} exposes no attention(state); use attention_maps")
    image = image[None] if image.ndim == 3 else image
    state = segmenter.trunk(image.to(segmenter.classifier.device), wholes=list(image))
    out = method.attention(state)
    attn, (rows, cols) = out if isinstance(out, tuple) else (out[0].float().mean(dim=0)[None], state.grid)
    if grid is not None:
        patches = [(int((r + 0.5) * rows / grid[0]), int((c + 0.5) * cols / grid[1])) for r, c in patches]
    bad = [p for p in patches if not (0 <= p[0] < rows and 0 <= p[1] < cols)]
    if bad:
        raise ValueError(f"patches {bad} lie outside the {rows}x{cols} attention grid")
    queries = torch.tensor([r * cols + c for r, c in patches], device=attn.device)
    return attn[0, queries].float().reshape(len(patches), rows, cols).cpu()


def _as_hwc(image: ArrayLike | Image.Image) -> np.ndarray:
    """uint8 image as (H, W, 3): accepts HWC arrays, CHW arrays/tensors and PIL images."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # (H, W, 3)
    elif isinstance(image, Tensor) and array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)  # tensors are CHW by convention even when W == 3
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _as_labels(labels: ArrayLike) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be an integer (H, W) map, got shape {array.shape} dtype {array.dtype}")
    return array


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_legend(pixels: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """Swatch + name per entry in a light box at the top-left of an (H, W, 3) uint8 array, drawn in place and
    clipped by the image. Only the box's corner of the image goes through PIL, so a huge photo is not copied."""
    height, width = pixels.shape[:2]
    size = int(np.clip(round(min(width, height) / 28), 8, 22))
    font, pad, gap = _font(size), max(2, size // 4), max(1, size // 6)
    line = size + gap
    text_width = max(int(np.ceil(font.getlength(name))) for name, _ in entries)
    box = (0, 0, min(width - 1, 2 * pad + size + pad + text_width), min(height - 1, pad + line * len(entries)))
    corner = (slice(0, min(height, box[3] + size)), slice(0, min(width, box[2] + size)))  # box + glyph overhang
    canvas = Image.fromarray(pixels[corner])
    draw = ImageDraw.Draw(canvas, "RGBA")
    draw.rectangle(box, fill=(255, 255, 255, 190))
    for i, (name, colour) in enumerate(entries):
        top = pad + i * line
        draw.rectangle((pad, top, pad + size, top + size - 1), fill=tuple(colour), outline=(0, 0, 0))
        draw.text((2 * pad + size, top + size / 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    pixels[corner] = np.asarray(canvas)


RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS: a pipeline check, not a real segmentation"
MARK_RED = (220, 0, 0)


def mark_random_weights(pixels: np.ndarray, note: str = RANDOM_WEIGHTS_NOTE) -> np.ndarray:
    """Draw ``note`` in white on a red strip along the bottom of an (H, W, 3) uint8 image, in place (and return it).

    Outputs of random weights look like results; the strip keeps a copied overlay from passing as one. Only the
    bottom band goes through PIL, so a huge photo is not copied.
    """
    height, width = pixels.shape[:2]
    size = int(np.clip(round(min(width, height) / 28), 8, 22))
    pad = max(2, size // 4)
    top = max(0, height - (size + 2 * pad))
    canvas = Image.fromarray(pixels[top:])
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, height - top), fill=MARK_RED)
    draw.text((pad, (height - top) / 2), note, fill=(255, 255, 255), font=_font(size), anchor="lm")
    pixels[top:] = np.asarray(canvas)
    return pixels


_BLEND_ROWS = 512  # rows blended at a time by overlay()


def overlay(
    image: ArrayLike | Image.Image,
    labels: ArrayLike,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
) -> np.ndarray:
    """Image blended with its coloured label map (:func:`class_colours`) and a legend of the classes present.

    Args:
        image: uint8 (H, W, 3) array, (3, H, W) array/tensor or PIL image.
        labels: integer (H, W) class map at the image's size; values outside ``class_names`` (e.g. 255 =
            ignore) are coloured but left out of the legend.
        class_names: display name of each class index.
        alpha: mask opacity in [0, 1].
        legend: draw the legend (inside the image, top-left).

    Returns:
        uint8 (H, W, 3), exactly the image's size.
    """
    pixels, label_map = _as_hwc(image), _as_labels(labels)
    if label_map.shape != pixels.shape[:2]:
        raise ValueError(f"labels {label_map.shape} and image {pixels.shape[:2]} must have the same (H, W)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError(f"labels must lie in [0, 255] to be coloured, got [{label_map.min()}, {label_map.max()}]")
    colours = class_colours(class_names)
    blended = np.empty(pixels.shape, dtype=np.uint8)  # (H, W, 3)
    counts = np.zeros(len(class_names), dtype=np.int64)  # pixels per class, for the legend
    for y in range(0, pixels.shape[0], _BLEND_ROWS):  # row bands: float and int64 copies of a huge photo stay small
        rows = slice(y, y + _BLEND_ROWS)
        mixed = (1.0 - alpha) * pixels[rows].astype(np.float32) + alpha * colours[label_map[rows]].astype(np.float32)
        blended[rows] = np.clip(np.rint(mixed), 0, 255)
        band = np.bincount(label_map[rows].ravel(), minlength=len(class_names))
        counts += band[: len(class_names)]
    present = [c for c in range(len(class_names)) if counts[c]]
    if legend and present:
        _draw_legend(blended, [(str(class_names[c]), tuple(int(v) for v in colours[c])) for c in present])
    return blended


def palette_png(
    labels: ArrayLike,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    pnginfo: PngImagePlugin.PngInfo | None = None,
) -> Path:
    """Write a label map as a palette ("P") PNG: pixel value = class index, colours = the VOC palette.

    This is the format of PASCAL VOC ground truth, so the files load back as class indices with PIL. With
    ``class_names`` the colours are :func:`class_colours` (those of :func:`overlay`): only background is black.
    ``pnginfo``: text chunks to store (naclip.predict marks its outputs with one).
    """
    label_map = _as_labels(labels)
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError(
            f"a palette PNG holds class indices 0..255, got [{label_map.min()}, {label_map.max()}]; "
            f"use at most 256 classes"
        )
    png = Image.fromarray(label_map.astype(np.uint8), mode="P")
    palette = label_colormap() if class_names is None else class_colours(class_names)
    png.putpalette(palette.flatten().tolist())
    path = Path(path)
    png.save(path, format="PNG", pnginfo=pnginfo)
    return path


def _upsample(heat: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(rows, cols) map → (H, W) bilinear, scaled to [0, 1] for display."""
    up = F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    up = up - up.min()
    return (up / up.max().clamp_min(1e-12)).numpy()


def plot_attention(
    image: ArrayLike | Image.Image,
    maps: Mapping[str, Tensor],
    patches: Sequence[Patch],
    path: str | os.PathLike | None = None,
    alpha: float = 0.6,
    cmap: str = "jet",
    note: str | None = None,
) -> Figure:
    """Figure 1 of the paper: per chosen patch, the image with the patch boxed, then each variant's attention.

    Args:
        image: the uint8 image the maps were computed on (HWC or CHW), so patch boxes line up.
        maps: output of :func:`attention_maps`, ``{variant: (P, rows, cols)}``.
        patches: the same (row, col) positions, in the same order.
        path: if given, the figure is also saved there as PNG.
        alpha: heatmap opacity over the image.
        cmap: matplotlib colormap of the heatmaps.
        note: a warning drawn in red above the panels (e.g. :data:`RANDOM_WEIGHTS_NOTE`).

    Returns:
        The matplotlib Figure (Agg canvas; display it in a notebook or save it).
    """
    pixels = _as_hwc(image)
    height, width = pixels.shape[:2]
    if not maps:
        raise ValueError("maps is empty; pass the output of attention_maps")
    for name, value in maps.items():
        if value.ndim != 3 or value.shape[0] != len(patches):
            raise ValueError(f"maps[{name!r}] has shape {tuple(value.shape)}; expected ({len(patches)}, rows, cols)")
    rows, cols = next(iter(maps.values())).shape[-2:]
    cell_h, cell_w = height / rows, width / cols
    ncols = 1 + len(maps)
    scale = 2.6 / max(height, width)
    fig = Figure(figsize=(ncols * width * scale, len(patches) * height * scale + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(patches), ncols, squeeze=False)
    for i, (r, c) in enumerate(patches):
        panels = [("image", None)] + [(variant_title(n), m[i]) for n, m in maps.items()]
        for j, (title, heat) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(pixels)
            if heat is not None:
                ax.imshow(_upsample(heat, (height, width)), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
            box = Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="white", linewidth=1.5)
            ax.add_patch(box)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"patch ({r}, {c})", fontsize=8)
    _add_note(fig, note)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def image_grid(
    panels: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    path: str | os.PathLike | None = None,
    note: str | None = None,
) -> Figure:
    """Rows of same-size uint8 images under column titles (the paper's Figure 3 layout); saved when path given.

    ``note`` is a warning drawn in red above the grid (e.g. :data:`RANDOM_WEIGHTS_NOTE`).
    """
    if not panels or any(len(row) != len(titles) for row in panels):
        raise ValueError(f"every row needs one image per title ({len(titles)} titles)")
    height, width = panels[0][0].shape[:2]
    scale = 2.4 / max(height, width)
    fig = Figure(figsize=(len(titles) * width * scale, len(panels) * height * scale + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), len(titles), squeeze=False)
    for i, row in enumerate(panels):
        for j, picture in enumerate(row):
            axes[i, j].imshow(_as_hwc(picture))
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
    _add_note(fig, note)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _add_note(fig: Figure, note: str | None) -> None:
    """A red, bold line above a figure's panels (constrained layout makes room for it)."""
    if note:
        fig.suptitle(note, color=tuple(v / 255 for v in MARK_RED), fontsize=9, fontweight="bold")
