"""Segmenter against plain re-formulations: per-crop slide loop, softmax + synonym max, threshold, batching."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import reference_pipeline as ref
import torch
import torch.nn.functional as F

from naclip import PAMR, DenseEncoder, Segmenter, slide_windows, text_classifier

TEMPLATES = ["a photo of a {}."]
CLASSES = [["sky"], ["tree", "bush"], ["car", "truck", "van"], ["road"]]
QUERIES = ["sky", "tree", "bush", "car", "truck", "van", "road"]
CLASS_OF_QUERY = [0, 1, 1, 2, 2, 2, 3]
CROP, STRIDE = 32, 16


@pytest.fixture(scope="module")
def make(b16, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Segmenter]:
    """Segmenter factory on random ViT-B/16; a shared text cache runs the text tower once per class list."""
    cache_dir = tmp_path_factory.mktemp("text-cache")

    def build(classes=CLASSES, **kwargs) -> Segmenter:
        options = {"templates": TEMPLATES, "slide_crop": CROP, "slide_stride": STRIDE, "cache_dir": cache_dir}
        return Segmenter(b16, classes, **{**options, **kwargs})

    return build


def images(*sizes: tuple[int, int], batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Seeded random "normalized" images, one (batch, 3, h, w) tensor per size."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, h, w, generator=gen) for h, w in sizes]


def spans(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Window extents along one axis: step by stride until a window reaches the end, clamp it back inside."""
    out, i = [], 0
    while True:
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
        if i * stride + crop >= size:
            return out
        i += 1


def cosine_logits(encoder: DenseEncoder, classifier: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(Q, rows, cols) cosine similarity of one image's patch features with every query embedding."""
    feats = encoder(image[None])[0]  # (rows, cols, D)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return torch.einsum("rcd,qd->qrc", feats, classifier)


def reference_slide_logits(model, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg "slide" inference written as a plain double loop over windows, one crop at a time."""
    encoder = DenseEncoder(model, attention="full", arch="reduced", sigma=5.0)
    classifier = text_classifier(model, QUERIES, TEMPLATES)  # (Q, D)
    _, h, w = image.shape
    canvas = torch.zeros(len(QUERIES), h, w)
    count = torch.zeros(h, w)
    for y1, y2 in spans(h, crop, stride):
        for x1, x2 in spans(w, crop, stride):
            cos = cosine_logits(encoder, classifier, image[:, y1:y2, x1:x2])
            up = F.interpolate(cos[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            canvas[:, y1:y2, x1:x2] += up
            count[y1:y2, x1:x2] += 1
    return canvas / count


def reference_class_probs(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W): softmax over all query names, then each class keeps the best of its synonyms."""
    probs = torch.softmax(scale * logits, dim=1)  # (B, Q, H, W)
    per_class = []
    for c in range(len(CLASSES)):
        members = [q for q, owner in enumerate(CLASS_OF_QUERY) if owner == c]
        per_class.append(probs[:, members].max(dim=1).values)
    return torch.stack(per_class, dim=1)


@pytest.fixture(scope="module")
def seg(make) -> Segmenter:
    return make()


# ---------------------------------------------------------------- sliding windows


def test_slide_windows_hand_listed():
    rows = [(0, 32), (16, 48), (18, 50)]
    cols = [(0, 32), (16, 48), (32, 64), (39, 71)]
    expected = [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    assert slide_windows(50, 71, 32, 16) == expected
    assert slide_windows(20, 40, 32, 16) == [(0, 20, 0, 32), (0, 20, 8, 40)]
    assert slide_windows(32, 32, 32, 16) == [(0, 32, 0, 32)]


@pytest.mark.parametrize("height, width", [(1, 1), (20, 20), (32, 32), (33, 47), (48, 80), (50, 71), (100, 37)])
@pytest.mark.parametrize("crop, stride", [(32, 16), (32, 32), (32, 5)])
def test_slide_windows_cover_image_and_stay_inside(height, width, crop, stride):
    windows = slide_windows(height, width, crop, stride)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == (min(crop, height), min(crop, width))
        covered[y1:y2, x1:x2] += 1
    assert bool((covered > 0).all())
    assert len(set(windows)) == len(windows)
    assert windows == [(a, b, c, d) for a, b in spans(height, crop, stride) for c, d in spans(width, crop, stride)]


@pytest.mark.parametrize("crop, stride", [(0, 16), (32, 0), (-1, 16)])
def test_slide_windows_reject_non_positive(crop, stride):
    with pytest.raises(ValueError, match=f"crop={crop}, stride={stride}"):
        slide_windows(48, 48, crop, stride)


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("size", [(40, 53), (24, 40)], ids=["not-multiple-of-stride", "smaller-than-crop"])
def test_slide_logits_equal_plain_per_crop_loop(b16, seg, size):
    (x,) = images(size)
    got = seg.logits(x)[0]
    want = reference_slide_logits(b16, x[0], CROP, STRIDE)
    assert got.shape == (len(QUERIES), *size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(24, 40), (21, 27), (40, 53)], ids=["thin", "thin-odd-margins", "whole-patches"])
def test_padded_crops_equal_clearclips_formulation(b16, make, size):
    """pad_crops: a window thinner than whole patches is padded with zeros around its centre, its logits cut back
    out (ClearCLIP); windows of whole patches (40×53 with 32-pixel crops) are left as they are."""
    (x,) = images(size)
    got = make(pad_crops=True).logits(x)[0]
    want = ref.padded_slide_logits(b16, text_classifier(b16, QUERIES, TEMPLATES), x[0], CROP, STRIDE, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    stretched = make().logits(x)[0]
    assert ((got - stretched).abs().max() > 1e-3) == (size != (40, 53))


def test_whole_image_mode_is_upsampled_patch_logits(b16, make):
    seg = make(slide_crop=0)
    (x,) = images((50, 71))
    encoder = DenseEncoder(b16, attention="full", arch="reduced", sigma=5.0)
    cos = cosine_logits(encoder, text_classifier(b16, QUERIES, TEMPLATES), x[0])  # (Q, 3, 4)
    assert cos.shape[-2:] == (3, 4)
    want = F.interpolate(cos[None], size=(50, 71), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(seg.logits(x)[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("slide_crop", [CROP, 0], ids=["slide", "whole"])
def test_batching_across_images_changes_nothing(make, slide_crop):
    xs = [x[0] for x in images((32, 48), (40, 35), (24, 40), seed=1)]
    one_by_one = make(slide_crop=slide_crop, crop_batch_size=1)
    together = make(slide_crop=slide_crop, crop_batch_size=64)
    singles = [together.logits_list([x])[0] for x in xs]
    for got in (together.logits_list(xs), one_by_one.logits_list(xs)):
        assert [tuple(g.shape) for g in got] == [(len(QUERIES), *x.shape[-2:]) for x in xs]
        for g, s in zip(got, singles, strict=True):
            torch.testing.assert_close(g, s, atol=1e-5, rtol=0)
    sizes = [(30, 41), None, (7, 9)]
    labels = together.predict_list(xs, sizes)
    for single, size, lab in zip(singles, sizes, labels, strict=True):
        logits = single[None] if size is None else F.interpolate(single[None], size=size, mode="bilinear")
        want = reference_class_probs(logits, 40.0)[0].argmax(dim=0)  # (H', W')
        assert lab.dtype == torch.int64 and torch.equal(lab, want)


def test_batch_path_equals_per_image_reference(b16, seg):
    """A batch of two different images (content and statistics) gives each image's own plain slide result."""
    (x,) = images((32, 48), batch=2, seed=2)
    x[1] = x[1].cumsum(dim=-1) * 0.2 + 0.7  # smooth and offset, unlike the noise of image 0
    want = torch.stack([reference_slide_logits(b16, image, CROP, STRIDE) for image in x])
    torch.testing.assert_close(seg.logits(x), want, atol=1e-5, rtol=1e-5)
    resized = F.interpolate(want, size=(30, 50), mode="bilinear", align_corners=False)
    probs = reference_class_probs(resized, 40.0)
    torch.testing.assert_close(seg.probs(x, (30, 50)), probs, atol=1e-5, rtol=1e-5)
    got = seg.predict(x, (30, 50))
    assert got.shape == (2, 30, 50) and (got == probs.argmax(dim=1)).float().mean() > 0.999


# ---------------------------------------------------------------- probabilities and labels


def test_probs_softmax_over_queries_then_synonym_max(seg):
    (x,) = images((32, 48), batch=2, seed=3)
    full = seg.logits(x)  # (B, Q, 32, 48)
    for out_size in (None, (30, 50)):
        logits = full if out_size is None else F.interpolate(full, size=out_size, mode="bilinear", align_corners=False)
        got = seg.probs(x, out_size)
        assert got.shape == (2, len(CLASSES), *(out_size or (32, 48)))
        torch.testing.assert_close(got, reference_class_probs(logits, 40.0), atol=1e-6, rtol=1e-5)
        sums = got.sum(dim=1)
        assert bool((sums <= 1 + 1e-5).all())
        assert bool((sums < 1 - 1e-4).any())  # synonyms are maxed, not summed


def test_probs_without_synonyms_sum_to_one(make):
    seg = make(classes=["sky", "tree", "car"], logit_scale=10.0)
    (x,) = images((32, 48), seed=4)
    probs = seg.probs(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 32, 48))
    torch.testing.assert_close(probs, torch.softmax(10.0 * seg.logits(x), dim=1))


def test_predict_is_argmax_with_threshold_to_background(make, seg):
    (x,) = images((32, 48), batch=2, seed=5)
    probs = seg.probs(x)
    best, argmax = probs.max(dim=1)
    assert torch.equal(seg.predict(x), argmax)
    thd = float(best.median())
    flipped = (best < thd) & (argmax != 0)
    assert bool(flipped.any()) and not bool((best < thd).all())
    want = argmax.clone()
    want[best < thd] = 0
    got = make(prob_thd=thd).predict(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


def test_pamr_refines_logits_before_softmax(make, seg):
    refined = make(pamr=True, pamr_steps=3, pamr_dilations=(1, 2))
    (x,) = images((32, 48), seed=6)
    got = refined.probs(x, (24, 40))
    logits = F.interpolate(seg.logits(x), size=(24, 40), mode="bilinear", align_corners=False)
    plain = reference_class_probs(logits, 40.0)
    assert got.shape == plain.shape == (1, len(CLASSES), 24, 40)
    assert (got - plain).abs().max() > 1e-3
    small = F.interpolate(x, size=(24, 40), mode="bilinear", align_corners=False)
    want = reference_class_probs(PAMR(3, (1, 2))(small, logits), 40.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert refined.predict(x).shape == (1, 32, 48)


@pytest.fixture(scope="module")
def b32_queries(b32, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, Path]:
    """Query embeddings of CLASSES by the plainly written text reference, and a text cache for the segmenters."""
    return ref.text_embeddings(b32, QUERIES, TEMPLATES), tmp_path_factory.mktemp("b32-text-cache")


@pytest.mark.parametrize("attention", ["vanilla", "kk_sim", "n_only", "full"])
@pytest.mark.parametrize("arch", ["vanilla", "reduced"])
def test_every_attention_and_arch_segments(b32, b32_queries, attention, arch):
    """Each option's whole-image logits, probabilities and labels equal the plain pipeline's (7x7 native grid)."""
    queries, cache = b32_queries
    seg = Segmenter(b32, CLASSES, attention, arch, 5.0, slide_crop=0, templates=TEMPLATES, cache_dir=cache)
    assert (seg.encoder.attention, seg.encoder.arch, seg.num_classes) == (attention, arch, len(CLASSES))
    (x,) = images((224, 224), seed=7)
    want = ref.whole_logits(b32, queries, x[0], attention=attention, arch=arch, sigma=5.0)  # (Q, 224, 224)
    torch.testing.assert_close(seg.logits(x)[0], want, atol=1e-5, rtol=1e-4)
    labels = reference_class_probs(want[None], 40.0).argmax(dim=1)
    assert (seg.predict(x) == labels).float().mean() > 0.999


def test_class_names_accept_comma_strings(make):
    seg = make(classes=["sky", "tree, bush", ["car", "truck", "van"], "road"])
    assert seg.class_names == CLASSES and seg.query_names == QUERIES
    assert seg.query_class.tolist() == CLASS_OF_QUERY


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "[]"),
        ("sky", "'sky'"),
        (["sky", ""], "''"),
        (["sky", ["tree", "  "]], "['tree', '  ']"),
        (["sky", "tree, , bush"], "'tree, , bush'"),
        (["sky", []], "class 1"),
    ],
)
def test_bad_class_names(make, classes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(classes=classes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "bogus"}, "'bogus'"),
        ({"arch": "tiny"}, "'tiny'"),
        ({"sigma": 0.0}, "got 0.0"),
        ({"sigma": -2.0}, "got -2.0"),
        ({"slide_crop": -1}, "-1"),
        ({"slide_stride": 0}, "32, 0"),
        ({"crop_batch_size": 0}, "got 0"),
    ],
)
def test_bad_options(make, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**kwargs)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 48, 80), "(3, 48, 80)"),
        ((1, 1, 48, 80), "(1, 1, 48, 80)"),
        ((1, 4, 48, 80), "(1, 4, 48, 80)"),
        ((1, 3, 8, 40), "(8, 40)"),
        ((1, 3, 40, 15), "(40, 15)"),
    ],
)
def test_bad_images(seg, shape, message):
    x = torch.randn(shape)
    for call in (seg.logits, seg.probs, seg.predict):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(x)


def test_bad_list_inputs(seg):
    with pytest.raises(ValueError, match=re.escape("(1, 1, 48, 80)")):
        seg.logits_list([torch.randn(1, 48, 80)])
    with pytest.raises(ValueError, match=r"torch\.uint8"):
        seg.predict_list([torch.zeros(3, 48, 80, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="2 images but 1 output sizes"):
        seg.predict_list([torch.randn(3, 48, 80)] * 2, [(10, 10)])
