"""Regenerate the paper's qualitative figures from a dataset config.

* ``attention_<i>_<name>.png`` (Figure 1 style): for a few patches on the ground-truth objects of each
  image, the last block's attention of vanilla CLIP (q·k), key-key similarity (k·k) and NACLIP (k·k + the
  Gaussian neighbourhood prior).
* ``qualitative.png`` (Figure 3 style): image | CLIP | NACLIP | ground truth, one row per image, where
  CLIP = vanilla attention + vanilla architecture and NACLIP = full attention + reduced architecture.

With ``method=<registered method>`` (e.g. ``method=proxyclip``, ``method=cass proxy=dinov2_b14``) that method's
segmentation is one more grid column, and a method with its own last-block attention (ProxyCLIP's proxy-guided
attention, CASS's distilled one) adds its map of the same patches to each attention figure.

The dataset is composed from ``conf/config.yaml`` with Hydra's compose API, so any extra ``key=value``
arguments are config overrides (e.g. ``dataset.root=/data/VOCdevkit/VOC2012``).

Progress (model loading, each image) goes to stderr; stdout lists the written files.

Example:
    python -m naclip.figures --dataset demo --pretrained openai --out figures/
    python -m naclip.figures --dataset synthetic --pretrained null --num-images 3 --out /tmp/figs
    python -m naclip.figures --dataset demo --out figures/ method=proxyclip proxy=dino_b8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch import Tensor, nn

from naclip import Segmenter, config
from naclip.clip import WeightsUnavailableError, image_mean_std, load_clip
from naclip.data import build_dataset
from naclip.predictor import auto_device, normalize_images
from naclip.results import random_weights
from naclip.text import get_tokenizer
from naclip.viz import RANDOM_WEIGHTS_NOTE, attention_maps, image_grid, method_attention_maps, overlay, plot_attention

ATTENTION_VARIANTS = ("vanilla", "kk_sim", "full")
GRID_TITLES = ["image", "CLIP", "NACLIP", "ground truth"]


def method_title(cfg: DictConfig) -> str:
    """The column title of the config's registered method: its name, and its proxy's timm model if it has one."""
    proxy = cfg.get("proxy")
    return f"{cfg.method} + {proxy.model}" if proxy is not None and proxy.model is not None else str(cfg.method)


def compose_config(dataset: str, backbone: str, pretrained: str, overrides: list[str]) -> DictConfig:
    """The run config of ``conf/config.yaml`` for this dataset and backbone, with extra overrides."""
    config.register()
    weights = "null" if pretrained.lower() in ("null", "none") else pretrained
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"dataset={dataset}", f"backbone={backbone}", f"backbone.pretrained={weights}", *overrides],
        )


def _say(message: str) -> None:
    """A progress line on stderr (stdout holds only the written paths)."""
    print(f"naclip.figures: {message}", file=sys.stderr, flush=True)


def pick_patches(label: Tensor, grid: tuple[int, int], skip: set[int], count: int) -> list[tuple[int, int]]:
    """Patches on the `count` largest ground-truth classes: each at the class pixel nearest its centroid.

    Falls back to the grid centre when no class outside `skip` is present.
    """
    height, width = label.shape
    classes, areas = torch.unique(label, return_counts=True)
    ranked = [int(c) for _, c in sorted(zip(areas.tolist(), classes.tolist(), strict=True), reverse=True)]
    patches: list[tuple[int, int]] = []
    for cls in [c for c in ranked if c not in skip]:
        ys, xs = torch.nonzero(label == cls, as_tuple=True)
        nearest = torch.argmin((ys - ys.float().mean()) ** 2 + (xs - xs.float().mean()) ** 2)
        patch = (int(ys[nearest]) * grid[0] // height, int(xs[nearest]) * grid[1] // width)
        if patch not in patches:
            patches.append(patch)
        if len(patches) == count:
            break
    return patches or [(grid[0] // 2, grid[1] // 2)]


def _resize_to(image: Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 (3, h, w) → (H, W, 3) at the label's size, for side-by-side panels."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    return np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))


def make_figures(cfg: DictConfig, num_images: int, patches_per_image: int, out: Path) -> list[Path]:
    """Write the attention figures and the qualitative grid for the first `num_images` usable samples."""
    dataset_cfg: dict[str, Any] = OmegaConf.to_container(cfg.dataset, resolve=True)  # type: ignore[assignment]
    dataset = build_dataset(dataset_cfg, on_error="skip")
    device = auto_device(cfg.backbone.device)
    backbone = cfg.backbone
    _say(f"loading CLIP {backbone.model} ({backbone.pretrained or 'random weights'}) on {device}")
    model: nn.Module = load_clip(
        backbone.model, backbone.pretrained, device, backbone.precision, quick_gelu=backbone.quick_gelu
    )
    mean, std = image_mean_std(backbone.model, backbone.pretrained)
    sigma = cfg.attention.sigma if cfg.attention.sigma is not None else 5.0
    common = {
        "slide_crop": cfg.dataset.slide_crop,
        "slide_stride": cfg.dataset.slide_stride,
        "logit_scale": cfg.dataset.logit_scale,
        "prob_thd": cfg.dataset.prob_thd,
        "crop_batch_size": cfg.crop_batch_size,
        "cache_dir": cfg.text_cache_dir,
        "tokenizer": get_tokenizer(backbone.model, random_weights=backbone.pretrained is None),
    }
    _say(f"building the text classifiers for {len(dataset.class_names)} classes (CLIP and NACLIP)")
    methods = {
        "CLIP": Segmenter(model, dataset.class_names, attention="vanilla", arch="vanilla", **common),
        "NACLIP": Segmenter(model, dataset.class_names, attention="full", arch="reduced", sigma=sigma, **common),
    }
    extra: dict[str, Segmenter] = {}  # a registered method: one more column (and its own attention, if it has one)
    if config.method_spec(cfg)[0] is not None:
        extra[method_title(cfg)] = config.build_segmenter(cfg, dataset.class_names, cfg.dataset, device, model=model)[0]
    methods.update(extra)
    for segmenter in methods.values():
        segmenter.to(device)
    titles = [*GRID_TITLES[:-1], *extra, GRID_TITLES[-1]]
    names = dataset.display_names
    skip = {dataset.ignore_index} | ({dataset.background_index} if dataset.background_index is not None else set())
    patch = methods["NACLIP"].encoder.patch_size

    note = RANDOM_WEIGHTS_NOTE if random_weights(cfg) else None
    total = min(num_images, len(dataset))  # "image 1/1" on a one-image dataset, not "1/4"

    out.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for index in range(len(dataset)):
        if len(rows) == num_images:
            break
        sample = dataset[index]
        if sample["error"]:
            print(f"naclip.figures: skipping {sample['name']}: {sample['error']}", file=sys.stderr)
            continue
        _say(f"image {len(rows) + 1}/{total}: {sample['name']} ({len(methods)} segmentations, attention maps)")
        image, label = sample["image"], sample["label"]  # (3, h, w) uint8, (H, W) int64
        x = normalize_images(image.to(device), mean, std)  # (3, h, w)
        size = tuple(label.shape)
        preds = {k: seg.predict_list([x], [size])[0].cpu() for k, seg in methods.items()}  # (H, W) each
        shown = _resize_to(image, size)  # (H, W, 3)
        rows.append([shown, *(overlay(shown, pred, names) for pred in preds.values()), overlay(shown, label, names)])

        grid = (image.shape[-2] // patch[0], image.shape[-1] // patch[1])
        patches = pick_patches(label, grid, skip, patches_per_image)
        maps = attention_maps(model, x, patches, variants=ATTENTION_VARIANTS, arch="reduced", sigma=sigma)
        for title, segmenter in extra.items():
            if hasattr(segmenter.method, "attention"):
                maps[title] = method_attention_maps(segmenter, x, patches, grid=grid)
        path = out / f"attention_{len(rows) - 1:02d}_{sample['name']}.png"
        plot_attention(image, maps, patches, path=path, note=note)
        written.append(path)
    if not rows:
        raise ValueError(f"dataset {dataset.name!r} gave no usable images; check dataset.root and its files")
    grid_path = out / "qualitative.png"
    image_grid(rows, titles, path=grid_path, note=note)
    written.append(grid_path)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m naclip.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="demo", help="a conf/dataset option (demo, synthetic, voc21, ...)")
    parser.add_argument("--backbone", default="b16", help="a conf/backbone option (b16, b32, l14)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag, local weights file, or null")
    parser.add_argument("--num-images", type=int, default=4, help="images in the grid (and attention figures)")
    parser.add_argument("--patches-per-image", type=int, default=2, help="query patches per attention figure")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. dataset.root=/data/voc")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.patches_per_image < 1:
        parser.error("--num-images and --patches-per-image must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = compose_config(args.dataset, args.backbone, args.pretrained, args.overrides)
        config.validate(cfg)
        written = make_figures(cfg, args.num_images, args.patches_per_image, args.out)
    except WeightsUnavailableError as err:
        print(f"naclip.figures: error: {err.hint('--pretrained {}')}", file=sys.stderr)
        return 2
    except (ValueError, HydraException, OmegaConfBaseException) as err:
        print(f"naclip.figures: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
