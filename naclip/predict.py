"""Segment your own images with your own words, from the command line.

    python -m naclip.predict image=PATH_OR_DIR 'classes=[car,tree,road,sky]' [background=[wall]] [refine=pamr]

For each image (a file, or every .jpg/.jpeg/.png/.bmp/.webp in a folder, sorted) the output folder (``out=DIR``;
default ``$NACLIP_OUTPUT/predict/<timestamp>``, with ``outputs`` when unset) receives ``<stem>_labels.png``
(palette PNG: pixel value = class index) and ``<stem>_overlay.png`` (the image with the coloured mask and a
legend), both at the image's own size. Pixels whose best probability is below
``prob_thd`` become class 0: the "background" class when ``background=[...]`` is given. Bad input ends with one line
``naclip.predict: error: ...`` on stderr and exit code 2; in a folder, every readable image is still segmented and
each unreadable one gets its own line.

The PNGs it writes carry a ``Software: naclip.predict`` text chunk. A folder's inputs never include them (so
``out=`` may be the input folder and a re-run does not segment its own outputs), a re-run may replace them,
and any other existing file in the way stops the run before anything is written: a user's file is never
overwritten.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, PngImagePlugin

from naclip import config
from naclip.clip import WeightsUnavailableError
from naclip.config import config_dir
from naclip.data import DatasetError, load_class_names
from naclip.predictor import auto_device, prepare_image, read_image
from naclip.results import random_weights
from naclip.viz import mark_random_weights, overlay, palette_png

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BACKGROUND = "background"
SOFTWARE = "naclip.predict"  # the PNG text chunk "Software" of every file this tool writes


class PredictError(ValueError):
    """Bad user input for the predict app; its message is the one line printed on stderr."""


def printable(path: str | os.PathLike) -> str:
    """A path as text any terminal can show: bytes that are not UTF-8 appear as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def is_own_output(path: Path) -> bool:
    """Whether ``path`` is a PNG this tool wrote (its "Software" text chunk, read from the header only)."""
    if path.suffix.lower() != ".png":
        return False
    try:
        with Image.open(path) as png:
            return png.info.get("Software") == SOFTWARE
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def find_images(image: str) -> list[Path]:
    """The image file itself, or the folder's images with a known suffix, sorted by name.

    A folder's PNGs written by this tool (labels and overlays of an earlier run) are not inputs.
    """
    path = Path(image).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_own_output(p)
        )
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
    _reject_duplicates(groups)
    if len(groups) > 256:
        raise PredictError(f"{len(groups)} classes do not fit a palette PNG; use at most 256")
    return groups, display


def _reject_duplicates(groups: Sequence[Sequence[str]]) -> None:
    """A name given twice makes one of its classes impossible to predict (CLIP's tokenizer ignores case)."""
    seen: dict[str, int] = {}
    for index, names in enumerate(groups):
        for name in names:
            key = " ".join(name.lower().split())
            if key in seen:
                raise PredictError(
                    f"class name {name!r} is given twice (classes {seen[key]} and {index}, counting background "
                    f"first if given); a duplicate can never be predicted, remove it"
                )
            seen[key] = index


def _output_stems(images: Sequence[Path]) -> list[str]:
    """File stems, with the suffix appended where two images share a stem (a.jpg and a.png)."""
    stems = [p.stem for p in images]
    return [f"{p.stem}_{p.suffix.lstrip('.')}" if stems.count(p.stem) > 1 else p.stem for p in images]


def _output_paths(out_dir: Path, stem: str) -> tuple[Path, Path]:
    """(label PNG, overlay PNG) of one image."""
    return out_dir / f"{stem}_labels.png", out_dir / f"{stem}_overlay.png"


def plan_outputs(images: Sequence[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """Each image's two output paths, refused before anything is written if one would overwrite a file this
    tool did not write (e.g. a user's ``cat_overlay.png`` next to ``cat.jpg``) or another image's output."""
    plan = [_output_paths(out_dir, stem) for stem in _output_stems(images)]
    seen: set[str] = set()
    for target in (path for pair in plan for path in pair):
        key = os.path.abspath(target)
        if key in seen:
            raise PredictError(
                f"output {printable(target)!r} would be written for two images (a.png and a_png.jpg?); rename one"
            )
        seen.add(key)
        if os.path.lexists(target) and not is_own_output(target):
            raise PredictError(
                f"output {printable(target)!r} already exists and was not written by naclip.predict; nothing was "
                f"written: choose another out=... or move that file"
            )
    return plan


def run(cfg: DictConfig, out_dir: Path | None = None) -> list[Path]:
    """Segment every input image of ``cfg`` into ``out_dir`` (default ``cfg.out``); returns the written paths.

    The folder is made only when the first result is ready, so a failed run leaves no empty folder. An image
    that cannot be read or segmented does not stop the others: all are tried, then PredictError lists the
    failed ones, one line each.

    Raises:
        PredictError, ValueError, DatasetError: bad input, with a one-line message (one line per bad image).
        WeightsUnavailableError: pretrained weights neither cached nor downloadable.
    """
    config.validate(cfg)
    images = find_images(str(cfg.image))
    class_names, display = resolve_classes(cfg.classes, list(cfg.background or []))
    if not 0.0 <= cfg.alpha <= 1.0:
        raise PredictError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.short_side < 0:
        raise PredictError(f"short_side must be >= 0 (0 keeps the image size), got {cfg.short_side}")
    out_dir = Path(str(cfg.out) if out_dir is None else out_dir).expanduser()
    plan = plan_outputs(images, out_dir)

    device = auto_device(cfg.backbone.device)
    segmenter, mean, std = config.build_segmenter(cfg, class_names, cfg, device)

    written, failed = [], []
    for path, targets in zip(images, plan, strict=True):
        try:
            pixels = read_image(path)  # (3, H, W) uint8
            x = prepare_image(pixels, mean, std, device, cfg.short_side, cfg.max_long_side)  # (3, h, w)
            labels = segmenter.label_map(x, tuple(pixels.shape[-2:]), dtype=torch.uint8).cpu()  # (H, W), <= 256 classes
        except (ValueError, OSError, Image.DecompressionBombError) as err:
            message = " ".join(str(err).split())
            failed.append(printable(message if str(path) in message else f"{path}: {message}"))
            continue
        blended = overlay(pixels, labels, display, alpha=cfg.alpha)
        if random_weights(cfg):
            mark_random_weights(blended)
        for written_path in _save(out_dir, targets, labels, blended, display):
            print(printable(written_path), flush=True)
            written.append(written_path)
    if failed:
        raise PredictError("\n".join(failed))
    return written


def _save(
    out_dir: Path, targets: tuple[Path, Path], labels: torch.Tensor, blended: Any, display: Sequence[str]
) -> list[Path]:
    """Write one image's label PNG and overlay, both marked as this tool's; an unwritable folder stops the run
    with one line."""
    label_path, overlay_path = targets
    mark = PngImagePlugin.PngInfo()
    mark.add_text("Software", SOFTWARE)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        palette_png(labels, label_path, display, pnginfo=mark)
        Image.fromarray(blended).save(overlay_path, pnginfo=mark)
    except OSError as err:
        raise PredictError(f"cannot write to the output folder {printable(out_dir)!r}: {err.strerror or err}") from err
    return [label_path, overlay_path]


def _fail(message: str) -> None:
    """One line per problem on stderr (a folder run lists each unreadable image), then exit code 2."""
    lines = [" ".join(line.split()) for line in str(message).splitlines()]
    for line in [line for line in lines if line] or ["unknown error"]:
        print(f"naclip.predict: error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("naclip.predict: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except (ValueError, WeightsUnavailableError, OmegaConfBaseException) as err:
        _fail(str(err))


def main() -> None:
    """Entry point of ``naclip-predict`` and ``python -m naclip.predict``."""
    config.register()
    _app()


if __name__ == "__main__":
    main()
