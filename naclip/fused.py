"""Several segmenter configurations over one shared encoder trunk: a whole sweep from one pass over the images.

Every attention, architecture, σ, refinement, threshold and temperature variant of one backbone runs the same
embedding and blocks 1..L-1 on the same crops; only the last block, the head and the post-processing differ.
:class:`FusedSegmenter` runs the shared part once per chunk of crops (once per position-embedding rule when the
variants' methods resize positions differently, e.g. GEM beside NACLIP) and every variant's own part on it.
"""

from __future__ import annotations

import functools
import operator
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from naclip.encoder import check_images
from naclip.segmenter import LogitsAccumulator, Segmenter

# What every variant must share for one trunk pass to serve them all (besides the model itself).
_SHARED = ("slide_crop", "slide_stride", "pad_crops")


class FusedSegmenter(nn.Module):
    """Variants of :class:`naclip.Segmenter` over one CLIP model, evaluated from one trunk pass per chunk.

    Each variant's predictions equal its own ``predict_list`` to the last bit: the crops, their chunking
    and every kernel are the same; only blocks 1..L-1 are run once instead of once per variant.

    Args:
        variants: segmenters built on the same model, with the same slide_crop, slide_stride and pad_crops (they
            may differ in attention, arch, sigma, PAMR, logit_scale, prob_thd, classes, crops per forward).

    Raises:
        ValueError: no variants, variants on different models, or different cropping.

    Example:
        >>> model = load_clip("ViT-B-16", "openai")
        >>> fused = FusedSegmenter.create(model, ["sky", "tree"], [{"sigma": s} for s in (1, 3, 5)])
        >>> labels = fused.predict_list([image])  # labels[v][i]: variant v, image i, (H, W) int64
    """

    def __init__(self, variants: Sequence[Segmenter]) -> None:
        super().__init__()
        if not variants:
            raise ValueError("FusedSegmenter needs at least one variant")
        first = variants[0]
        for i, seg in enumerate(variants):
            if seg.encoder.visual is not first.encoder.visual:
                raise ValueError(f"variant {i} uses another model than variant 0; variants must share one model")
            for name in _SHARED:
                if getattr(seg, name) != getattr(first, name):
                    raise ValueError(
                        f"variant {i} has {name}={getattr(seg, name)} but variant 0 has {getattr(first, name)}; "
                        f"variants must share {', '.join(_SHARED)}"
                    )
        self.variants = nn.ModuleList(variants)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        class_names: Sequence[Sequence[str] | str],
        variants: Sequence[Mapping[str, Any]],
        cache_dir: str | os.PathLike | None = None,
        **common: Any,
    ) -> FusedSegmenter:
        """One :class:`Segmenter` per entry of `variants` (keyword arguments on top of `common`), one model.

        The text classifier is computed once: later variants read it from `cache_dir` (a temporary folder
        when None), so a 10-value σ sweep does not run the text tower ten times.
        """
        if cache_dir is not None:
            return cls([Segmenter(model, class_names, cache_dir=cache_dir, **{**common, **v}) for v in variants])
        with tempfile.TemporaryDirectory(prefix="naclip-fused-") as tmp:
            return cls([Segmenter(model, class_names, cache_dir=tmp, **{**common, **v}) for v in variants])

    def __len__(self) -> int:
        return len(self.variants)

    @torch.no_grad()
    def logits_list(self, images: Sequence[Tensor]) -> list[list[Tensor]]:
        """Cosine logits: result[v][i] is variant v's (Q_v, H, W) logits of image i.

        The trunk runs once per chunk for all variants with the same chunking (``Segmenter.chunk_size``) whose
        methods resize positions by the same rule (``Method.position_rule``), with the union of their taps; each
        of those variants' heads reads the same trunk state (and its shared per-chunk cache). Each state is
        dropped as soon as its variants have run their heads on it, so memory grows with the variants only by
        their own logits.
        """
        first: Segmenter = self.variants[0]
        for image in images:
            check_images(image[None], first.encoder.patch_size)
        groups: dict[int, dict[str | None, list[int]]] = {}
        for v, variant in enumerate(self.variants):
            groups.setdefault(variant.chunk_size, {}).setdefault(variant.method.position_rule, []).append(v)
        crops, owners = first.crops(images)
        accumulators = [
            LogitsAccumulator(images, owners, len(v.query_names), first.padded_patch) for v in self.variants
        ]
        for rules in groups.values():
            taps = {
                rule: functools.reduce(operator.or_, (self.variants[v].taps for v in vs)) for rule, vs in rules.items()
            }
            chunking = self.variants[next(iter(rules.values()))[0]]
            for chunk in chunking.chunks(crops):
                batch, wholes = torch.stack([crops[i] for i in chunk]), [images[owners[i][0]] for i in chunk]
                for rule, members in rules.items():
                    state = self.variants[members[0]].trunk(batch, taps[rule], wholes)  # its method has this rule
                    for v in members:
                        for i, lg in zip(chunk, self.variants[v].head(state), strict=True):
                            accumulators[v].add(i, lg)
                    del state
        return [accumulator.result() for accumulator in accumulators]

    @torch.no_grad()
    def predict_list(
        self, images: Sequence[Tensor], out_sizes: Sequence[tuple[int, int] | None] | None = None
    ) -> list[list[Tensor]]:
        """Label maps: result[v][i] is variant v's (H', W') int64 labels of image i (see Segmenter.predict_list)."""
        out_sizes = list(out_sizes) if out_sizes is not None else [None] * len(images)
        if len(out_sizes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(out_sizes)} output sizes")
        logits = self.logits_list(images)
        out = []
        for v, variant in enumerate(self.variants):
            out.append(variant.predict_from_logits(images, logits[v], out_sizes))
            logits[v] = []  # this variant's full-size logits are no longer needed
        return out

    @torch.no_grad()
    def predict(self, images: Tensor, out_size: tuple[int, int] | None = None) -> list[Tensor]:
        """Label maps (B, H', W') int64 of each variant, in the order of the variants."""
        check_images(images, self.variants[0].encoder.patch_size)
        per_variant = self.predict_list(list(images), [out_size] * images.shape[0])
        return [torch.stack(labels) for labels in per_variant]
