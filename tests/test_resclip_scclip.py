"""ResCLIP and SC-CLIP: each against a per-image formulation written here from the authors' code (float64 where the
authors' arithmetic allows, open_clip's own modules for the unchanged blocks), batching invariance, fused sweeps
bit for bit, and every protocol file as the authors' configs state it."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composing import compose_config

from naclip import FusedSegmenter, Segmenter, config

NAMES = [["sky"], ["tree"], ["car", "auto"], ["road"]]
ONE_TEMPLATE = ("a photo of a {}.",)


# ------------------------------------------------------------------------------------------- shared reference
def trunk_reference(model, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Tokens (1+N, C) entering every block of one image, with open_clip's modules; positions resized as DINO/NACLIP
    do (bicubic by ((rows + 0.1) / g0, (cols + 0.1) / g0)) unless the grid is the pretraining one."""
    v = model.visual
    p = v.conv1.kernel_size[0]
    x = F.conv2d(image[None], v.conv1.weight, stride=p)
    rows, cols = x.shape[-2:]
    g0 = v.grid_size[0]
    pos = v.positional_embedding
    if (rows, cols) != (g0, g0):
        grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            scale_factor=((rows + 0.1) / g0, (cols + 0.1) / g0),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])
    x = torch.cat([v.class_embedding[None], x.flatten(2)[0].T]) + pos
    x = v.ln_pre(x)[None]
    inputs = []
    for blk in v.transformer.resblocks:
        inputs.append(x[0])
        x = blk(x)
    return inputs, (rows, cols)


def heads_qkv(blk, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h, T, d) q, k, v of one open_clip block from its input (T, C), float64."""
    ln = copy.deepcopy(blk.ln_1).double()
    proj = ln(x.double()) @ blk.attn.in_proj_weight.double().T + blk.attn.in_proj_bias.double()
    h = blk.attn.num_heads
    return tuple(t.reshape(t.shape[0], h, -1).transpose(0, 1) for t in proj.chunk(3, dim=-1))


def merge_heads(blk, out: torch.Tensor) -> torch.Tensor:
    """Per-head outputs (h, T, d) → the block's out_proj (T, C), float64."""
    merged = out.transpose(0, 1).reshape(out.shape[1], -1)
    return merged @ blk.attn.out_proj.weight.double().T + blk.attn.out_proj.bias.double()


def project(model, x: torch.Tensor) -> torch.Tensor:
    v = model.visual
    return copy.deepcopy(v.ln_post).double()(x) @ v.proj.double()


def cosine(feats: torch.Tensor, classifier: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, D) patch features → (Q, rows, cols) cosine logits."""
    logits = F.normalize(feats, dim=-1) @ classifier.double().T
    return logits.T.reshape(-1, *grid)


def pamr_reference(image: torch.Tensor, mask: torch.Tensor, iters: int = 10, dilations=(8, 16)) -> torch.Tensor:
    """PAMR as its authors write it: affinity softmax over the dilated 8-neighbours of -|I_i - I_j| / (1e-8 + 0.1 σ),
    σ the std of each dilation's 3×3 window with its centre (pooled), channel-averaged; then iters averaging steps."""
    h, w = image.shape[-2:]

    def around(x: torch.Tensor, d: int, centre: bool = False) -> list[torch.Tensor]:
        padded = F.pad(x, [d] * 4, mode="replicate")
        offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if centre or (a, b) != (0, 0)]
        return [padded[..., d + a * d : d + a * d + h, d + b * d : d + b * d + w] for a, b in offsets]

    neighbours = torch.stack([s for d in dilations for s in around(image, d)], dim=2)
    window = torch.stack([s for d in dilations for s in around(image, d, centre=True)], dim=2)
    std = window.std(dim=2, keepdim=True)
    affinity = (-(image[:, :, None] - neighbours).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True).softmax(2)
    for _ in range(iters):
        mask = (torch.stack([s for d in dilations for s in around(mask, d)], dim=2) * affinity).sum(2)
    return mask


# ------------------------------------------------------------------------------------------- ResCLIP
def sfr_reference(queries: np.ndarray, sigma: float) -> torch.Tensor:
    """ResCLIP's feedback map (1+N, 1+N) from each patch's query (rows, cols), pair by pair as described: 1 where
    two patches share the query, times exp(-steps / max steps) unless every cell sampled on the straight line at
    the fractions k / max_steps (k = 0..steps, float32, rounded half to even) holds that query too; each row
    blurred with a normalized Gaussian of size min(P, int(6σ + 1)) (odd), ReLU, normalized to sum 1."""
    rows, cols = queries.shape
    count = rows * cols
    lab = queries.reshape(-1)
    pos = [(i // cols, i % cols) for i in range(count)]
    steps = np.array([[max(abs(a[0] - b[0]), abs(a[1] - b[1])) for b in pos] for a in pos])
    longest = int(steps.max())
    t = torch.linspace(0, 1, steps=longest + 1).numpy()  # float32, as the authors sample
    same = np.zeros((count, count))
    for i, (r0, c0) in enumerate(pos):
        for j, (r1, c1) in enumerate(pos):
            if lab[i] != lab[j]:
                continue
            s = steps[i, j]
            rr = np.round(np.float32(r0) * (np.float32(1) - t[: s + 1]) + np.float32(r1) * t[: s + 1]).astype(int)
            cc = np.round(np.float32(c0) * (np.float32(1) - t[: s + 1]) + np.float32(c1) * t[: s + 1]).astype(int)
            inside = all(lab[r * cols + c] == lab[i] for r, c in zip(rr, cc, strict=True))
            same[i, j] = 1.0 if inside else math.exp(-s / longest)
    size = min(count, int(6 * sigma + 1))
    size += 1 - size % 2
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    blurred = np.maximum(np.stack([np.convolve(row, g, mode="same") for row in same]), 0)
    out = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    out[1:, 1:] = torch.from_numpy(blurred / (blurred.sum(1, keepdims=True) + 1e-8))
    return out


def gaussian_omega(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    rows, cols = grid
    r, c = np.divmod(np.arange(rows * cols), cols)
    d2 = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
    out = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.float64)
    out[1:, 1:] = torch.from_numpy(np.exp(-d2 / (2 * sigma**2)))
    return out


def resclip_reference(model, image, classifier, base: str, temp_thd: float, rcs_w, sfr_w, sigma=5.0, scale=40.0):
    """One image (3, H, W) → (Q, rows, cols) logits and the share of first-pass pixels below temp_thd."""
    inputs, grid = trunk_reference(model, image)
    blocks = model.visual.transformer.resblocks
    rcs = []
    for b in (5, 6, 7, 8):
        q, k, _ = heads_qkv(blocks[b], inputs[b])
        rcs.append((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1))
    rcs = torch.stack(rcs).mean(0)
    last, x = blocks[-1], inputs[-1].double()
    q, k, v = heads_qkv(last, x)
    d = q.shape[-1]

    def second_block(sfr):
        def score(a):
            s = a @ a.transpose(-2, -1) / math.sqrt(d)
            return s if sfr is None else sfr_w[0] * ((1 - sfr_w[1]) * s + sfr_w[1] * sfr)

        if base == "sclip":
            attn = score(q).softmax(-1) + score(k).softmax(-1)
        elif base == "naclip":
            attn = (score(k) + gaussian_omega(grid, sigma)).softmax(-1)
        else:
            attn = score(q).softmax(-1)
        attn = rcs_w[0] * ((1 - rcs_w[1]) * attn + rcs_w[1] * rcs)
        out = merge_heads(last, attn @ v)
        if base == "sclip":
            out = x + out
            out = out + copy.deepcopy(last.mlp).double()(copy.deepcopy(last.ln_2).double()(out))
        return cosine(project(model, out)[1:], classifier, grid)

    first = second_block(None)
    up = F.interpolate(first[None], size=image.shape[-2:], mode="bilinear", align_corners=False)
    probs = (pamr_reference(image[None].double(), up)[0] * scale).softmax(0)
    pred = probs.argmax(0)
    low = probs.amax(0) < temp_thd
    pred[low] = 0
    p = model.visual.conv1.kernel_size[0]
    queries = np.zeros(grid, dtype=int)
    for r in range(grid[0]):
        for c in range(grid[1]):
            queries[r, c] = int(torch.bincount(pred[r * p : (r + 1) * p, c * p : (c + 1) * p].flatten()).argmax())
    sfr = sfr_reference(queries, sigma)
    sfr = (sfr / sfr.max()).to(torch.float16).double()  # the authors round the normalized map to float16
    return second_block(sfr), float(low.double().mean())


# temp_thd near the median best first-pass probability of these random weights, so it splits the pixels
@pytest.mark.parametrize(
    ("base", "size", "temp_thd"),
    [
        ("naclip", (160, 224), 0.37),
        pytest.param("sclip", (224, 224), 0.25, marks=pytest.mark.slow),
        pytest.param("clearclip", (224, 160), 0.29, marks=pytest.mark.slow),
    ],
)
@torch.no_grad()
def test_resclip_matches_its_formula(b32, base, size, temp_thd):
    torch.manual_seed(2)
    image = torch.randn(3, *size)
    options = {"base": base, "temp_thd": temp_thd, "rcs_weights": [2.0, 0.4], "sfr_weights": [1.8, 0.7]}
    seg = Segmenter(b32, NAMES, templates=ONE_TEMPLATE, slide_crop=0, method="resclip", method_options=options)
    state = seg.trunk(image[None])
    ours = seg.head(state)[0]
    expected, low = resclip_reference(b32, image, seg.classifier, base, temp_thd, (2.0, 0.4), (1.8, 0.7))
    assert 0.2 < low < 0.8  # temp_thd really splits the first pass
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
    # SFR matters: without it (sfr weights (1, 0): the plain scores) the logits move by far more than the tolerance
    plain = Segmenter(
        b32,
        NAMES,
        templates=ONE_TEMPLATE,
        slide_crop=0,
        method="resclip",
        method_options={**options, "sfr_weights": [1.0, 0.0]},
    )
    assert (plain.head(state)[0] - ours).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- SC-CLIP
def lof_reference(tokens: torch.Tensor, k: int = 30, contamination: float = 0.05) -> np.ndarray:
    """The authors' torch LOF, written token by token: squared distances, k nearest others, reachability with the
    token's own k-distance, lrd = k / mean reachability, LOF = mean neighbour lrd / own lrd; outliers above the
    (1 - contamination) linear quantile."""
    x = tokens.double().numpy()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, 1 : k + 1]
    knn = np.take_along_axis(d, order, axis=1)
    reach = np.maximum(knn, knn[:, -1:])
    lrd = k / reach.mean(1)
    lof = (lrd[order] / lrd[:, None]).mean(1)
    return lof > np.quantile(lof, 1 - contamination)


def neighbour_mean(fmap: np.ndarray, outliers: np.ndarray) -> np.ndarray:
    """(rows, cols, C): each outlier replaced by the mean of its non-outlier 8-neighbours (kept if it has none)."""
    rows, cols = outliers.shape
    out = fmap.copy()
    for r, c in zip(*np.nonzero(outliers), strict=True):
        around = [(r + a, c + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
        good = [fmap[y, x] for y, x in around if 0 <= y < rows and 0 <= x < cols and not outliers[y, x]]
        if good:
            out[r, c] = np.sum(good, axis=0) / len(good)
    return out


def placed_as_the_authors(flat: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols) outlier mask from a flat one as the authors' mean_interpolation indexes it: token i at
    (i // rows, i % rows); where one of them falls outside the grid (their code fails), at (i // cols, i % cols)."""
    rows, cols = grid
    spots = [(i // rows, i % rows) for i in np.flatnonzero(flat)]
    if any(r >= rows or c >= cols for r, c in spots):
        return flat.reshape(grid)
    out = np.zeros(grid, dtype=bool)
    for r, c in spots:
        out[r, c] = True
    return out


def scclip_reference(model, image, classifier) -> torch.Tensor:
    inputs, grid = trunk_reference(model, image)
    blocks = model.visual.transformer.resblocks
    last = blocks[-1]

    def output(i):  # tokens leaving block i (0-based): the input of block i + 1
        return inputs[i + 1].double()

    def sims(t):
        u = t / t.norm(dim=-1, keepdim=True)
        return u @ u.T

    def agg(t, s):
        s = torch.where(s < 0.4, torch.zeros_like(s), s)
        return (s / (s.sum(-1, keepdim=True) + 1e-6)) @ t

    def guided(t, guide):
        _, k, v = heads_qkv(last, t)
        g = (guide - guide.mean()) * 3.0
        g = torch.where(g < 0, torch.full_like(g, -math.inf), g).softmax(-1)
        attn = (g + (k @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])).softmax(-1)) / 2
        return merge_heads(last, attn @ v)

    x = output(10)
    flat = lof_reference(x[1:])
    assert 0 < flat.sum() < flat.size
    outliers = placed_as_the_authors(flat, grid)
    cols = x.shape[-1]
    patches = torch.from_numpy(neighbour_mean(x[1:].numpy().reshape(*grid, cols), outliers).reshape(-1, cols))
    pre = torch.from_numpy(neighbour_mean(output(8)[1:].numpy().reshape(*grid, cols), outliers).reshape(-1, cols))
    guide = sims(pre)
    feats = guided(agg(patches, guide), guide) + 0.3 * x[:1]
    after = sims(output(3)[1:])
    feats = agg(feats, after)
    fused = sum(output(i) for i in range(3, 10))
    feats = feats + agg(guided(fused[1:], guide) + 0.3 * fused[:1], after)
    return cosine(project(model, feats), classifier, grid)


@torch.no_grad()
def test_lof_matches_its_formula():
    from naclip.methods.scclip import lof_outliers

    torch.manual_seed(0)
    tokens = torch.randn(64, 8)
    tokens[[3, 40]] *= 4.0  # two far-off tokens
    ours = lof_outliers(tokens).numpy()
    expected = lof_reference(tokens)
    assert (ours == expected).all() and expected.sum() == 4 and expected[[3, 40]].all()


# (256, 224): 8 × 7 patches, the outliers land inside the grid at the authors' (i // rows, i % rows), moved;
# (224, 256): 7 × 8, one would fall outside (their code fails), so the true positions stay
@pytest.mark.parametrize("size", [(224, 224), (256, 224), pytest.param((224, 256), marks=pytest.mark.slow)])
@torch.no_grad()
def test_scclip_matches_its_formula(b32, size):
    torch.manual_seed(4)
    image = torch.randn(3, *size)
    seg = Segmenter(b32, NAMES, templates=ONE_TEMPLATE, slide_crop=0, method="scclip")
    ours = seg.patch_logits(image[None])[0]
    expected = scclip_reference(b32, image, seg.classifier)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().mean() > 1e-3


# ------------------------------------------------------------------------------------------- batching and fusion
def batch_images() -> list[torch.Tensor]:
    torch.manual_seed(5)
    return [torch.randn(3, 160, 224), torch.randn(3, 192, 160)]  # 2 windows of 160 each


def segmenter(model, method: str | None, cache, **extra) -> Segmenter:
    options = {"resclip": {"temp_thd": 0.3}, "scclip": {}}.get(method)
    return Segmenter(
        model,
        NAMES,
        templates=ONE_TEMPLATE,
        slide_crop=160,
        slide_stride=96,
        cache_dir=cache,
        method=method,
        method_options=options,
        prob_thd=0.3,
        **extra,
    )


@pytest.mark.parametrize("method", ["resclip", "scclip"])
@torch.no_grad()
def test_labels_do_not_depend_on_batching(b32, cache, method):
    images = batch_images()
    together = segmenter(b32, method, cache, crop_batch_size=8)
    logits = together.logits_list(images)  # all four windows in one chunk
    one = segmenter(b32, method, cache, crop_batch_size=1)
    for image, got in zip(images, logits, strict=True):
        alone = one.logits_list([image])[0]  # one window per chunk, one image at a time
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
        assert torch.equal(together.labels(together.class_probs(image, got, None)), one.predict_list([image])[0])


@torch.no_grad()
def test_fused_equals_each_variant_alone_bit_for_bit(b32, cache):
    images = batch_images()
    variants = [
        segmenter(b32, "resclip", cache),
        segmenter(b32, "scclip", cache),
        segmenter(b32, None, cache, attention="full"),
    ]
    fused = FusedSegmenter(variants).logits_list(images)
    for variant, logits in zip(variants, fused, strict=True):
        for got, want in zip(logits, variant.logits_list(images), strict=True):
            assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- protocols
BENCHMARKS = ["voc21", "voc20", "pc60", "pc59", "coco_object", "coco_stuff", "cityscapes", "ade"]
KEYS = ("short_side", "slide_crop", "slide_stride", "logit_scale", "prob_thd", "area_thd")
# ResCLIP's configs (yvhangyang/ResCLIP configs/cfg_*.py): NACLIP's protocol plus temp_thd and (tau, lambda) pairs
RESCLIP = {  # dataset: protocol values, temp_thd, rcs_weights, sfr_weights
    "voc21": ((336, 0, 112, 40.0, 0.1, 0.0), 0.5, [2.0, 0.3], [2.2, 0.7]),
    "voc20": ((336, 0, 112, 40.0, 0.0, 0.0), 0.1, [2.0, 0.6], [2.1, 0.6]),
    "pc60": ((336, 224, 112, 40.0, 0.1, 0.0), 0.3, [2.0, 0.3], [1.8, 0.7]),
    "pc59": ((336, 224, 112, 40.0, 0.0, 0.0), 0.25, [2.0, 0.4], [1.8, 0.7]),
    "coco_object": ((336, 224, 112, 40.0, 0.1, 0.0), 0.11, [2.0, 0.4], [1.8, 0.7]),
    "coco_stuff": ((336, 224, 112, 40.0, 0.0, 0.0), 0.11, [2.0, 0.4], [1.8, 0.7]),
    "cityscapes": ((560, 224, 112, 40.0, 0.0, 0.0), 0.1, [2.0, 0.2], [2.1, 0.6]),
    "ade": ((336, 224, 112, 40.0, 0.0, 0.0), 0.25, [2.0, 0.3], [2.1, 0.7]),
}
# SC-CLIP's configs (SuleBai/SC-CLIP configs/cfg_*.py): slide 224/112 everywhere, defaults logit 40, no thresholds
SCCLIP = {d: (560 if d == "cityscapes" else 336, 224, 112, 40.0, 0.0, 0.0) for d in BENCHMARKS}
SCCLIP.update(
    voc21=(336, 224, 112, 50.0, 0.15, 0.1),
    pc60=(336, 224, 112, 40.0, 0.15, 0.0),
    coco_object=(336, 224, 112, 55.0, 0.35, 0.0),
)


@pytest.mark.parametrize("dataset", BENCHMARKS)
@pytest.mark.parametrize("method", ["resclip", "scclip"])
@torch.no_grad()
def test_protocol_files_reach_the_segmenter(b32, cache, method, dataset):
    cfg = compose_config([f"method={method}", f"dataset={dataset}", f"text_cache_dir={cache}"])
    config.validate(cfg)
    assert cfg.method == method and cfg.dataset.protocol == method
    if method == "resclip":
        values, temp_thd, rcs, sfr = RESCLIP[dataset]
    else:
        values = SCCLIP[dataset]
    assert tuple(cfg.dataset[k] for k in KEYS) == pytest.approx(values)
    assert cfg.dataset.class_names == dataset  # NACLIP's files: the authors' own (test_class_name_files_...)
    seg, _, _ = config.build_segmenter(cfg, [["a"], ["b"]], cfg.dataset, "cpu", model=b32)
    assert (seg.slide_crop, seg.slide_stride, seg.logit_scale, seg.prob_thd, seg.area_thd) == pytest.approx(values[1:])
    if method == "resclip":
        m = seg.method
        assert (m.base, m.temp_thd, m.logit_scale) == ("naclip", pytest.approx(temp_thd), values[3])
        assert list(m.rcs_weights) == pytest.approx(rcs) and list(m.sfr_weights) == pytest.approx(sfr)
    else:
        m = seg.method
        assert (m.pre, m.post, m.multi, m.res_cls, m.beta) == (8, 3, range(3, 10), 0.3, 0.4)


# sha256 (first 16 hex digits) of the authors' configs/cls_*.txt, trailing newline stripped: ResCLIP's and SC-CLIP's
# files are identical, word for word (synonyms, "wood " with its space on PC60)
AUTHORS_CLASS_FILES = {
    "ade": "e53ded02c488bdb9",
    "cityscapes": "6f6782fc1bf92bfd",
    "coco_object": "3475d03d61f85ce0",
    "coco_stuff": "fb98709b9ab1baff",
    "pc59": "cd808465f06a1616",
    "pc60": "5e620446a8699f29",
    "voc20": "c68f65a2b342397c",
    "voc21": "80e643a9a1439668",
}


def test_class_name_files_are_the_authors():
    from importlib import resources

    for name, digest in AUTHORS_CLASS_FILES.items():
        text = resources.files("naclip").joinpath("classnames", f"{name}.txt").read_text().rstrip("\n")
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, name


def test_method_options_are_checked_early():
    cfg = compose_config(["method=resclip", "dataset=ade", "resclip.base=sclip", "dataset.logit_scale=33"])
    assert config.method_spec(cfg)[1]["base"] == "sclip"
    assert config.method_spec(cfg)[1]["logit_scale"] == 33.0  # the first pass follows the protocol's temperature
    with pytest.raises(Exception, match=r"resclip\.bsae"):
        compose_config(["method=resclip", "resclip.bsae=sclip"])
    with pytest.raises(Exception, match=r"scclip\.res_cls"):
        compose_config(["method=scclip", "scclip.res_cls=high"])
    # the node is always there (a sweep `method=resclip,naclip resclip.base=sclip` composes); only resclip reads it
    other = compose_config(["method=naclip", "resclip.base=sclip"])
    assert other.resclip.base == "sclip" and config.method_spec(other) == (None, {})


def test_fused_sweeps_share_the_trunk_across_method_options():
    from naclip.sweep import group_key

    common = ["dataset=ade", "backbone=b32"]
    keys = {
        group_key(compose_config([*common, *extra]))
        for extra in (
            ["method=resclip"],
            ["method=resclip", "resclip.base=sclip"],
            ["method=scclip"],
            ["method=naclip"],
        )
    }
    assert len(keys) == 1  # the ADE protocols of all three share windows and resize: one pass for all
    assert group_key(compose_config([*common, "method=scclip", "dataset.slide_stride=64"])) not in keys


def test_bad_options_are_one_clear_error(b32):
    with pytest.raises(ValueError, match="unknown resclip base 'maskclip'"):
        Segmenter(b32, NAMES, templates=ONE_TEMPLATE, method="resclip", method_options={"base": "maskclip"})
    with pytest.raises(ValueError, match="scclip block outputs"):
        Segmenter(b32, NAMES, templates=ONE_TEMPLATE, method="scclip", method_options={"pre_adjust_idx": 11})
