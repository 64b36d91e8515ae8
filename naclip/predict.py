"""Segment your own images with your own words, from the command line.

    python -m naclip.predict image=PATH_OR_DIR 'classes=[car,tree,road,sky]' [background=[wall]] [refine=pamr]

For each image (a file, or every .jpg/.jpeg/.png/.bmp/.webp in a folder, sorted) the Hydra output folder
receives ``<stem>_labels.png`` (palette PNG: pixel value = class index) and ``<stem>_overlay.png`` (the image
with the coloured mask and a legend), both at the image's own size. Pixels whose best probability is below
``prob_thd`` become class 0: the "background" class when ``background=[...]`` is given. Bad input ends with one line
``naclip.predict: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from naclip import config
from naclip.clip import WeightsUnavailableError
from naclip.config import config_dir
from naclip.data import DatasetError, load_class_names
from naclip.predictor import auto_device, prepare_image, read_image
from naclip.viz import overlay, palette_png

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BACKGROUND = "background"


class PredictError(ValueError):
    """Bad user input for the predict app; its message is the one line printed on stderr."""


def find_images(image: str) -> list[Path]:
    """The image file itself, or the folder's images with a known suffix, sorted by name."""
    path = Path(image).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise PredictError(f"folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    raise PredictError(f"image {image!r} does not exist; pass image=FILE or image=FOLDER")


def resolve_classes(classes: Any, background: Sequence[str] = ()) -> tuple[list[list[str]], list[str]]:
    """Query names per class and one display name per class, from the CLI's ``classes`` and ``background``.

    ``classes`` is a list (an entry "a, b" or a nested list gives synonyms) or the path/packaged name of a
    class-names file. Background names, when given, become class 0 "background", so ``prob_thd`` sends
    uncertain pixels there.
    """
    if isinstance(classes, ListConfig | DictConfig):
        classes = OmegaConf.to_container(classes)
    if isinstance(classes, str):
        try:
            groups = load_class_names(classes)
        except DatasetError as err:
            raise PredictError(f"{err}; or pass a list: 'classes=[car,tree]'") from err
    elif isinstance(classes, list | tuple):
        groups = []
        for entry in classes:
            names = [str(n).strip() for n in entry] if isinstance(entry, list | tuple) else str(entry).split(",")
            names = [n.strip() for n in names if n.strip()]
            if not names:
                raise PredictError(f"classes has an empty entry {entry!r}; write e.g. 'classes=[car,tree]'")
            groups.append(names)
    else:
        raise PredictError(f"classes must be a list or a class-names file, got {classes!r}")
    if not groups:
        raise PredictError("classes is empty; write e.g. 'classes=[car,tree,road,sky]'")
    background = [str(n).strip() for n in background if str(n).strip()]
    if background:
        groups = [background, *groups]
    display = ([BACKGROUND] if background else []) + [names[0] for names in groups[1 if background else 0 :]]
    if len(groups) > 256:
        raise PredictError(f"{len(groups)} classes do not fit a palette PNG; use at most 256")
    return groups, display


def _output_stems(images: Sequence[Path]) -> list[str]:
    """File stems, with the suffix appended where two images share a stem (a.jpg and a.png)."""
    stems = [p.stem for p in images]
    return [f"{p.stem}_{p.suffix.lstrip('.')}" if stems.count(p.stem) > 1 else p.stem for p in images]


def run(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """Segment every input image of ``cfg`` into ``out_dir``; returns the written paths.

    Raises:
        PredictError, ValueError, DatasetError: bad input, with a one-line message.
        WeightsUnavailableError: pretrained weights neither cached nor downloadable.
    """
    config.validate(cfg)
    images = find_images(str(cfg.image))
    class_names, display = resolve_classes(cfg.classes, list(cfg.background or []))
    if not 0.0 <= cfg.alpha <= 1.0:
        raise PredictError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.short_side < 0:
        raise PredictError(f"short_side must be >= 0 (0 keeps the image size), got {cfg.short_side}")

    device = auto_device(cfg.backbone.device)
    segmenter, mean, std = config.build_segmenter(cfg, class_names, cfg, device)

    written = []
    for path, stem in zip(images, _output_stems(images), strict=True):
        pixels = read_image(path)  # (3, H, W) uint8
        x = prepare_image(pixels, mean, std, device, cfg.short_side, cfg.max_long_side)  # (3, h, w)
        with torch.no_grad():
            labels = segmenter.predict_list([x], [tuple(pixels.shape[-2:])])[0].cpu()  # (H, W)
        blended = overlay(pixels, labels, display, alpha=cfg.alpha)
        label_path = palette_png(labels, out_dir / f"{stem}_labels.png", display)
        overlay_path = out_dir / f"{stem}_overlay.png"
        Image.fromarray(blended).save(overlay_path)
        for written_path in (label_path, overlay_path):
            print(written_path, flush=True)
            written.append(written_path)
    return written


def _fail(message: str) -> None:
    first = " ".join(str(message).split()) or "unknown error"
    print(f"naclip.predict: error: {first}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ValueError, WeightsUnavailableError, OmegaConfBaseException) as err:
        _fail(str(err))


def main() -> None:
    """Entry point of ``naclip-predict`` and ``python -m naclip.predict``."""
    config.register()
    _app()


if __name__ == "__main__":
    main()
