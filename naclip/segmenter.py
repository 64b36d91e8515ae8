"""Open-vocabulary segmentation with NACLIP: dense features → cosine logits → (slide) → softmax → labels."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from naclip.encoder import DenseEncoder, Taps, check_images
from naclip.methods import Method, TrunkState, build_method
from naclip.pamr import PAMR
from naclip.text import Template, text_classifier

Window = tuple[int, int, int, int]  # y1, y2, x1, x2


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Windows of mmsegmentation's "slide" inference: the last one on each axis is shifted back inside."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"slide crop and stride must be positive, got crop={crop}, stride={stride}")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def centred_padding(height: int, width: int, patch: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels that bring a crop to whole (rows, cols) patches, split evenly with the odd
    one on the right and bottom: ClearCLIP's padding of sliding-window crops (its ``compute_padsize``)."""
    extra_h, extra_w = -height % patch[0], -width % patch[1]
    return extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2


def pad_crop(crop: Tensor, patch: tuple[int, int]) -> Tensor:
    """A (3, h, w) crop zero-padded (zero = the mean colour after CLIP normalization) to whole patches, centred."""
    return F.pad(crop, centred_padding(crop.shape[-2], crop.shape[-1], patch))


def cut_padding(logits: Tensor, size: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """Logits (Q, h, w) of a crop of `size` padded by :func:`pad_crop`: upsampled to the padded crop, the padding
    cut off, so every pixel keeps its own position instead of the grid being stretched over the crop."""
    left, right, top, bottom = centred_padding(*size, patch)
    padded = _upsample(logits, (size[0] + top + bottom, size[1] + left + right))
    return padded[:, top : top + size[0], left : left + size[1]]


def suppress_small_classes(probs: Tensor, area_thd: float) -> Tensor:
    """SCLIP's ``area_thd`` on (C, H, W) probabilities, class 0 = background: every other class whose argmax area
    is at most ``area_thd`` × the predicted non-background area gets probability 0 everywhere."""
    areas = torch.bincount(probs.argmax(dim=0).flatten(), minlength=probs.shape[0])  # (C,) pixels per class
    small = areas <= area_thd * areas[1:].sum()
    small[0] = False  # background is never suppressed
    return probs * (~small).to(probs.dtype)[:, None, None]


def normalize_class_names(class_names: Sequence[Sequence[str] | str]) -> list[list[str]]:
    """Accept ["cat", ["person", "person in shirt"], "dog, puppy"]: class i → its list of names."""
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list, got {class_names!r}")
    classes = []
    for i, entry in enumerate(class_names):
        names = [n.strip() for n in entry.split(",")] if isinstance(entry, str) else [str(n).strip() for n in entry]
        if not names or any(not n for n in names):
            raise ValueError(f"class {i} has an empty name: {entry!r}")
        classes.append(names)
    return classes


class Segmenter(nn.Module):
    """NACLIP segmenter: one image in, one label map out, no dataset machinery.

    Args:
        model: open_clip CLIP model (see :func:`naclip.load_clip`).
        class_names: class i → list of its names (synonyms); a plain "a, b" string also works.
        attention, arch, sigma: see :class:`naclip.DenseEncoder`.
        slide_crop, slide_stride: sliding-window size and stride in pixels; slide_crop=0 = whole image.
        logit_scale: temperature of the softmax over query names.
        prob_thd: pixels whose best class probability is below it become class 0 (background).
        area_thd: SCLIP's small-region suppression: a non-background class whose argmax area is at most
            area_thd × the whole predicted non-background area gets probability 0 everywhere (None/0 = off).
        pamr: refine the logits with PAMR before the softmax.
        pad_crops: zero-pad each sliding-window crop to whole patches (centred) and cut its logits back out, as
            ClearCLIP does; False lets the patch convolution drop the remainder and stretches the logits over the
            crop (NACLIP, SCLIP). Whole images (slide_crop=0) are never padded.
        templates: prompt templates; None = the method's own (GEM's, CLIP Surgery's), else the 80 OpenAI ones.
        pamr_steps, pamr_dilations: PAMR iterations and dilations.
        crop_batch_size: sliding-window crops per encoder forward.
        cache_dir: on-disk cache of text classifiers (None = no cache).
        method: a registered method (:func:`naclip.methods.list_methods`) or a built :class:`naclip.methods.Method`;
            None = the last-block method given by attention, arch and sigma.
        method_options: keyword arguments of the named method's factory.
        tokenizer: the model's tokenizer (:func:`naclip.text.get_tokenizer`); None = CLIP's (CLIP vocabularies only).

    The pipeline's stages are public so that :class:`naclip.FusedSegmenter` runs the same ones for many
    variants: :meth:`crops` → :meth:`chunks` → :meth:`trunk` (embedding, blocks 1..L-1, taps) → :meth:`head`
    (the method's own part, cosine logits) → :class:`LogitsAccumulator` → :meth:`class_probs` → :meth:`labels`.

    Images given to every method are CLIP-normalized float tensors (B, 3, H, W).

    Example:
        >>> seg = Segmenter(load_clip("ViT-B-16", "openai"), [["sky"], ["tree"], ["car"]])
        >>> labels = seg.predict(images)  # (B, H, W) int64
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[Sequence[str] | str],
        attention: str = "full",
        arch: str = "reduced",
        sigma: float | None = 5.0,
        slide_crop: int = 224,
        slide_stride: int = 112,
        logit_scale: float = 40.0,
        prob_thd: float = 0.0,
        pamr: bool = False,
        templates: Sequence[Template] | None = None,
        *,
        pamr_steps: int = 10,
        pamr_dilations: Sequence[int] = (8, 16),
        crop_batch_size: int = 64,
        cache_dir: str | os.PathLike | None = None,
        area_thd: float | None = None,
        method: str | Method | None = None,
        method_options: Mapping[str, Any] | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        pad_crops: bool = False,
    ) -> None:
        super().__init__()
        if area_thd is not None and not 0.0 <= float(area_thd) < 1.0:
            raise ValueError(f"area_thd must be in [0, 1) or None, got {area_thd}")
        if slide_crop < 0 or (slide_crop > 0 and slide_stride <= 0):
            raise ValueError(f"slide_crop must be >= 0 and slide_stride > 0, got {slide_crop}, {slide_stride}")
        if crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {crop_batch_size}")
        self.encoder = DenseEncoder(model, attention=attention, arch=arch, sigma=sigma)
        if isinstance(method, Method):
            if method_options:
                raise ValueError("method_options go with a method name, not a built Method")
            self.method = method
        else:
            self.method = build_method(method, self.encoder, **dict(method_options or {}))
        self.class_names = normalize_class_names(class_names)
        self.query_names = [name for names in self.class_names for name in names]
        query_class = [c for c, names in enumerate(self.class_names) for _ in names]
        self.register_buffer("query_class", torch.tensor(query_class), persistent=False)
        templates = self.method.templates if templates is None else templates
        classifier = text_classifier(model, self.query_names, templates, cache_dir=cache_dir, tokenizer=tokenizer)
        self.register_buffer("classifier", classifier, persistent=False)  # (Q, D)
        self.slide_crop, self.slide_stride = int(slide_crop), int(slide_stride)
        self.logit_scale, self.prob_thd = float(logit_scale), float(prob_thd)
        self.area_thd = float(area_thd or 0.0)
        self.pamr = PAMR(pamr_steps, tuple(pamr_dilations)) if pamr else None
        self.crop_batch_size = int(crop_batch_size)
        self.pad_crops = bool(pad_crops)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def taps(self) -> Taps:
        """What this segmenter's method needs from the trunk pass."""
        return self.method.taps

    def trunk(self, crops: Tensor, taps: Taps | None = None, wholes: Sequence[Tensor] | None = None) -> TrunkState:
        """The part every variant of one backbone shares: embedding and blocks 1..L-1, with the taps asked for.

        ``wholes``: the whole image each crop was cut from, for methods with image-level terms (CASS); they
        find it as ``state.cache["wholes"]``. Positions are resized by the method's ``position_rule``.
        """
        x, grid = self.encoder.embed(crops, self.method.position_rule)
        taps = self.taps if taps is None else taps
        tapped: dict[str, dict[int, Any]] = {"inputs": {}, "qkv": {}}
        x = self.encoder.run_blocks(x, taps=taps, state=tapped)
        cache: dict[str, Any] = {} if wholes is None else {"wholes": list(wholes)}
        return TrunkState(x, grid, crops, tapped["inputs"], tapped["qkv"], cache)

    def head(self, state: TrunkState) -> Tensor:
        """This variant's part: the method on the trunk's state, cosine logits (n, Q, rows, cols)."""
        return self.method.logits(state, self.classifier)

    def patch_logits(self, crops: Tensor, wholes: Sequence[Tensor] | None = None) -> Tensor:
        """Cosine logits (n, Q, rows, cols) on the crops' patch grid (``wholes``: see :meth:`trunk`)."""
        return self.head(self.trunk(crops, wholes=wholes))

    def crops(self, images: Sequence[Tensor]) -> tuple[list[Tensor], list[tuple[int, Window | None]]]:
        """Every crop the encoder sees and its (image index, window); window None = the whole image."""
        if self.slide_crop == 0:
            return list(images), [(idx, None) for idx in range(len(images))]
        crops, owners = [], []
        for idx, image in enumerate(images):
            for win in slide_windows(image.shape[-2], image.shape[-1], self.slide_crop, self.slide_stride):
                crop = image[:, win[0] : win[1], win[2] : win[3]]
                crops.append(pad_crop(crop, self.encoder.patch_size) if self.pad_crops else crop)
                owners.append((idx, win))
        return crops, owners

    @property
    def chunk_size(self) -> int:
        """Crops per encoder forward: ``crop_batch_size``, capped by the method's ``crops_per_forward``."""
        return min(self.crop_batch_size, self.method.crops_per_forward or self.crop_batch_size)

    def chunks(self, crops: Sequence[Tensor]) -> Iterator[list[int]]:
        """Crop indices of each encoder forward: grouped by shape, at most :attr:`chunk_size` per chunk."""
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, crop in enumerate(crops):
            by_shape[tuple(crop.shape[-2:])].append(i)
        size = self.chunk_size
        for indices in by_shape.values():
            for start in range(0, len(indices), size):
                yield indices[start : start + size]

    def _encode_grouped(self, crops: list[Tensor], wholes: Sequence[Tensor]) -> Iterator[tuple[int, Tensor]]:
        """(index, patch-grid logits) of many crops, one chunk per encoder forward; wholes[i]: crop i's image.

        Yielded chunk by chunk so that only patch-resolution logits of one chunk are alive at a time.
        """
        for chunk in self.chunks(crops):
            logits = self.patch_logits(torch.stack([crops[i] for i in chunk]), [wholes[i] for i in chunk])
            yield from zip(chunk, logits, strict=True)

    @property
    def padded_patch(self) -> tuple[int, int] | None:
        """The patch size crops are padded to (see :func:`pad_crop`), None when they are not padded."""
        return self.encoder.patch_size if self.pad_crops else None

    @torch.no_grad()
    def logits_list(self, images: Sequence[Tensor]) -> list[Tensor]:
        """Cosine logits (Q, H, W) for images of any sizes, all their crops encoded together."""
        for image in images:
            check_images(image[None], self.encoder.patch_size)
        crops, owners = self.crops(images)
        accumulator = LogitsAccumulator(images, owners, len(self.query_names), self.padded_patch)
        for i, lg in self._encode_grouped(crops, [images[idx] for idx, _ in owners]):
            accumulator.add(i, lg)
        return accumulator.result()

    def logits(self, images: Tensor) -> Tensor:
        """Per-query cosine logits (B, Q, H, W) at input size."""
        check_images(images, self.encoder.patch_size)
        return torch.stack(self.logits_list(list(images)))

    @torch.no_grad()
    def class_probs(self, image: Tensor, logits: Tensor, out_size: tuple[int, int] | None) -> Tensor:
        """(C, H', W') probabilities from one image's (Q, H, W) logits: resize, PAMR, softmax, synonym max."""
        logits = logits[None]
        if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        if self.pamr is not None:
            img = F.interpolate(image[None].float(), size=logits.shape[-2:], mode="bilinear", align_corners=False)
            logits = self.pamr(img, logits)
        probs = (self.logit_scale * logits[0]).softmax(dim=0)  # (Q, H', W')
        if len(self.query_names) == self.num_classes:
            return probs
        index = self.query_class[:, None, None].expand_as(probs)
        out = probs.new_zeros((self.num_classes, *probs.shape[-2:]))
        return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=False)  # (C, H', W')

    def labels(self, probs: Tensor) -> Tensor:
        if self.area_thd > 0:
            probs = suppress_small_classes(probs, self.area_thd)
        best, labels = probs.max(dim=0)
        labels[best < self.prob_thd] = 0
        return labels

    @torch.no_grad()
    def predict_list(
        self, images: Sequence[Tensor], out_sizes: Sequence[tuple[int, int] | None] | None = None
    ) -> list[Tensor]:
        """Label maps (H', W') int64 for images of any sizes, crops of all images batched together."""
        out_sizes = list(out_sizes) if out_sizes is not None else [None] * len(images)
        if len(out_sizes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(out_sizes)} output sizes")
        return self.predict_from_logits(images, self.logits_list(images), out_sizes)

    def predict_from_logits(
        self, images: Sequence[Tensor], logits: Sequence[Tensor], out_sizes: Sequence[tuple[int, int] | None]
    ) -> list[Tensor]:
        """Label maps from each image's (Q, H, W) logits: this configuration's post-processing and labelling."""
        triples = zip(images, logits, out_sizes, strict=True)
        return [self.labels(self.class_probs(im, lg, size)) for im, lg, size in triples]

    @torch.no_grad()
    def label_map(
        self, image: Tensor, out_size: tuple[int, int], band_bytes: int = 2**27, dtype: torch.dtype = torch.int64
    ) -> Tensor:
        """Label map (H', W') of one (3, H, W) image at out_size, same labels as :meth:`predict_list`.

        Upsampling all query logits to a large out_size at once costs Q x H' x W' floats (several GB for a
        100-megapixel photo). Bilinear resizing is separable and the width pass comes first, so this resizes
        the width once (Q x H x W' floats, H the small input height), then resizes the height band by band of
        columns, each band at most ``band_bytes`` of logits; every pixel gets exactly the same arithmetic.
        With PAMR or area_thd (both need the whole map) it falls back to the one-shot path. ``dtype`` (e.g. uint8
        for at most 256 classes) keeps the full-size map itself small.
        """
        logits = self.logits_list([image])[0]  # (Q, H, W)
        height, width = (int(v) for v in out_size)
        per_column = logits.shape[0] * height * 4  # bytes of one full-height column of float32 logits
        if self.pamr is not None or self.area_thd > 0 or per_column * width <= band_bytes:
            return self.labels(self.class_probs(image, logits, (height, width))).to(dtype)
        wide = F.interpolate(logits[None], size=(logits.shape[-2], width), mode="bilinear", align_corners=False)
        labels = torch.empty((height, width), dtype=dtype, device=logits.device)
        step = max(1, band_bytes // per_column)
        for x0 in range(0, width, step):
            band = wide[..., x0 : x0 + step]  # (1, Q, H, w) -> height pass only (width scale 1 is exact)
            band = F.interpolate(band, size=(height, band.shape[-1]), mode="bilinear", align_corners=False)
            labels[:, x0 : x0 + step] = self.labels(self.class_probs(image, band[0], None))
        return labels

    @torch.no_grad()
    def probs(self, images: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """Class probabilities (B, C, H', W'): softmax over query names, max over each class's synonyms."""
        logits = self.logits(images)
        return torch.stack([self.class_probs(im, lg, out_size) for im, lg in zip(images, logits, strict=True)])

    @torch.no_grad()
    def predict(self, images: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """Label maps (B, H', W') int64; below prob_thd → class 0."""
        return torch.stack([self.labels(p) for p in self.probs(images, out_size)])


def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


class LogitsAccumulator:
    """Per-image logits (Q, H, W) at input size, filled crop by crop: whole images upsampled, windows averaged.

    Apart from the encoder so that several configurations can fill their own from one shared trunk pass.
    ``padded_patch``: the windows' crops were padded by :func:`pad_crop` to this patch size (None: not padded).
    """

    def __init__(
        self,
        images: Sequence[Tensor],
        owners: Sequence[tuple[int, Window | None]],
        num_queries: int,
        padded_patch: tuple[int, int] | None = None,
    ) -> None:
        self.owners = owners
        self.padded_patch = padded_patch
        self.sizes = [tuple(image.shape[-2:]) for image in images]
        self.whole: list[Tensor | None] = [None] * len(images)
        slide = any(win is not None for _, win in owners)
        self.sums = [im.new_zeros((num_queries, *im.shape[-2:]), dtype=torch.float32) for im in images] if slide else []
        self.counts = [im.new_zeros(im.shape[-2:], dtype=torch.float32) for im in images] if slide else []

    def add(self, index: int, logits: Tensor) -> None:
        """Take crop `index`'s patch-grid logits (Q, rows, cols)."""
        idx, win = self.owners[index]
        if win is None:
            self.whole[idx] = _upsample(logits, self.sizes[idx])
            return
        y1, y2, x1, x2 = win
        size = (y2 - y1, x2 - x1)
        patch = self.padded_patch
        self.sums[idx][:, y1:y2, x1:x2] += cut_padding(logits, size, patch) if patch else _upsample(logits, size)
        self.counts[idx][y1:y2, x1:x2] += 1

    def result(self) -> list[Tensor]:
        if not self.sums:
            return self.whole  # type: ignore[return-value]
        return [s.div_(c) for s, c in zip(self.sums, self.counts, strict=True)]
