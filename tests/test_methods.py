"""The method family: value/qq/csa attentions against plain formulas, SCLIP's area_thd on a hand-worked map, every
method preset's protocol per dataset (the issue's table), and the README's plug-in example end to end."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composing import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from processes import readme_blocks, run_readme_example

import naclip
from naclip import DenseEncoder, Segmenter, attention, config
from naclip.segmenter import suppress_small_classes
from naclip.tables import METHODS, methods_table
from naclip.viz import attention_maps, variant_title

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("isolated_cached")
GRIDS = [(2, 3), (4, 4), (3, 5)]


# ------------------------------------------------------------------------------------------- attentions
def plain_softmax_attention(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a_i·b_j/√d) / Σ_j exp(a_i·b_j/√d), written out in float64: (B, h, N, N)."""
    logits = torch.einsum("bhid,bhjd->bhij", a.double(), b.double()) / math.sqrt(a.shape[-1])
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def reference_output(name: str, q, k, v) -> torch.Tensor:
    """The issue's formulas: value → v; qq → softmax(q qᵀ/√d) v; csa → (softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v."""
    if name == "value":
        return v.double()
    if name == "qq":
        return plain_softmax_attention(q, q) @ v.double()
    return (plain_softmax_attention(q, q) + plain_softmax_attention(k, k)) @ v.double()


def qkv(grid: tuple[int, int], batch: int = 3, heads: int = 4, dim: int = 16):
    gen = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    n = 1 + grid[0] * grid[1]
    # different scales per image so the batch holds genuinely different inputs
    scale = torch.tensor([0.5, 1.0, 2.0][:batch]).view(batch, 1, 1, 1)
    return [torch.randn(batch, heads, n, dim, generator=gen) * scale for _ in range(3)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", ["value", "qq", "csa"])
def test_new_attentions_match_their_formulas(name, grid):
    q, k, v = qkv(grid)
    variant = naclip.get_attention(name)
    out = attention.attend(variant, q, k, v, None)
    expected = reference_output(name, q, k, v)
    assert out.shape == v.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    # images differ, so their outputs do: no broadcasting across the batch
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("grid", GRIDS)
def test_explicit_weights_match_formulas(grid):
    q, k, _ = qkv(grid)
    n = q.shape[-2]
    names = ("value", "qq", "csa")
    weights = {name: attention.attention_weights(naclip.get_attention(name), q, k, None) for name in names}
    torch.testing.assert_close(weights["value"], torch.eye(n).expand_as(weights["value"]))
    torch.testing.assert_close(weights["qq"].double(), plain_softmax_attention(q, q), atol=1e-6, rtol=1e-5)
    csa = plain_softmax_attention(q, q) + plain_softmax_attention(k, k)
    torch.testing.assert_close(weights["csa"].double(), csa, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights["csa"].sum(-1), torch.full(weights["csa"].shape[:-1], 2.0))


def test_fused_kernel_calls(monkeypatch):
    """One fused call per scaled-dot-product attention: value none (no N×N at all), qq one, csa two."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    q, k, v = qkv((3, 5))
    prior = attention.gaussian_prior((3, 5), 2.0)
    for name, expected in (("value", 0), ("qq", 1), ("csa", 2), ("vanilla", 1), ("full", 1)):
        calls.clear()
        attention.attend(naclip.get_attention(name), q, k, v, prior)
        assert len(calls) == expected, name


def reference_last_block(model, images, name: str, arch: str) -> torch.Tensor:
    """Projected patch features from the trunk's output, the last block written out per head (float64)."""
    enc = DenseEncoder(model, attention="vanilla", arch="vanilla")
    x, grid = enc.embed(images)
    x = enc.trunk(x).double()
    blk = model.visual.transformer.resblocks[-1]
    width, heads = x.shape[-1], blk.attn.num_heads
    d = width // heads
    h = F.layer_norm(x, (width,), blk.ln_1.weight.double(), blk.ln_1.bias.double(), blk.ln_1.eps)
    proj = h @ blk.attn.in_proj_weight.double().T + blk.attn.in_proj_bias.double()
    q, k, v = (proj[..., i * width : (i + 1) * width] for i in range(3))
    outs = []
    for i in range(heads):
        cut = slice(i * d, (i + 1) * d)
        outs.append(reference_output(name, q[None, ..., cut], k[None, ..., cut], v[None, ..., cut])[0])
    att = torch.cat(outs, -1) @ blk.attn.out_proj.weight.double().T + blk.attn.out_proj.bias.double()
    if arch == "vanilla":
        y = x + att
        ln2 = F.layer_norm(y, (width,), blk.ln_2.weight.double(), blk.ln_2.bias.double(), blk.ln_2.eps)
        att = y + copy.deepcopy(blk.mlp).double()(ln2)
    v_ = model.visual
    out = F.layer_norm(att, (width,), v_.ln_post.weight.double(), v_.ln_post.bias.double(), v_.ln_post.eps)
    out = out @ v_.proj.double()
    return out[:, 1:].reshape(images.shape[0], grid[0], grid[1], -1)


@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
@pytest.mark.parametrize(
    ("name", "arch"), [("value", "reduced"), ("qq", "reduced"), ("csa", "vanilla"), ("csa", "reduced")]
)
@torch.no_grad()
def test_encoder_last_block_with_new_attentions(b32, name, arch, size):
    torch.manual_seed(3)
    images = torch.randn(2, 3, *size)
    images[1] = images[1] * 0.5 + 1.0  # a second, different image
    ours = DenseEncoder(b32, attention=name, arch=arch)(images)
    expected = reference_last_block(b32, images, name, arch)
    assert ours.shape == (2, size[0] // 32, size[1] // 32, expected.shape[-1])
    torch.testing.assert_close(ours.double(), expected, atol=2e-4, rtol=1e-3)


@torch.no_grad()
def test_attention_maps_accept_new_variants(b32):
    torch.manual_seed(1)
    image = torch.randn(3, 32 * 3, 32 * 4)
    patches = [(0, 0), (1, 2)]
    maps = attention_maps(b32, image, patches, variants=("value", "qq", "csa"))
    for i, (r, c) in enumerate(patches):
        onehot = torch.zeros(3, 4)
        onehot[r, c] = 1.0
        torch.testing.assert_close(maps["value"][i], onehot)  # itself only
    for name in ("qq", "csa"):
        sums = maps[name].sum(dim=(1, 2))  # csa is divided by its row sum 2, so it too is at most 1
        assert torch.all(sums > 0.0) and torch.all(sums <= 1 + 1e-5), (name, sums)
    assert "÷ 2" in variant_title("csa") and "÷" not in variant_title("qq")


# ------------------------------------------------------------------------------------------- area_thd
# A 3×4 scene, classes bg=0, A=1, B=2, C=3. Argmax map:  bg bg A A / A A A B / C C bg A
# areas: bg 3, A 6, B 1, C 2 → foreground 9.
TOP = [[0, 0, 1, 1], [1, 1, 1, 2], [3, 3, 0, 1]]
PIXEL_PROBS = {  # per top class: probabilities of (bg, A, B, C)
    0: (0.5, 0.2, 0.15, 0.15),
    1: (0.2, 0.5, 0.1, 0.2),
    2: (0.05, 0.15, 0.5, 0.3),
    3: (0.2, 0.3, 0.0, 0.5),
}


def scene_probs() -> torch.Tensor:
    return torch.tensor([[PIXEL_PROBS[t] for t in row] for row in TOP]).permute(2, 0, 1)  # (4, 3, 4)


@pytest.mark.parametrize(
    ("area_thd", "prob_thd", "expected"),
    [
        (0.0, 0.0, TOP),
        # 0.15 × 9 = 1.35: B (1 pixel) goes, C (2) stays; B's pixel falls to its next best, C (0.3)
        (0.15, 0.0, [[0, 0, 1, 1], [1, 1, 1, 3], [3, 3, 0, 1]]),
        # 0.2 × 9 = 1.8 keeps C: the share is of the foreground (9), not of all 12 pixels (which would give 2.4)
        (0.2, 0.0, [[0, 0, 1, 1], [1, 1, 1, 3], [3, 3, 0, 1]]),
        # 0.25 × 9 = 2.25: B and C go; B's pixel → A (0.15), C's pixels → A (0.3)
        (0.25, 0.0, [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]]),
        # then prob_thd 0.2 as usual: B's pixel has 0.15 left → background
        (0.25, 0.2, [[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]]),
        # exactly at the limit counts as small: 2/9 × 9 = 2 ≤ 2 suppresses C (and B)
        (2 / 9, 0.0, [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]]),
    ],
)
def test_area_thd_on_a_hand_worked_map(b32, area_thd, prob_thd, expected):
    seg = Segmenter(
        b32,
        ["background", "cat", "dog", "bird"],
        templates=("a {}.",),
        slide_crop=0,
        logit_scale=1.0,
        prob_thd=prob_thd,
        area_thd=area_thd or None,
    )
    # log-probabilities as logits: with logit_scale 1 the softmax gives back exactly the scene's probabilities
    seg.logits = lambda images: torch.log(scene_probs().clamp_min(1e-12))[None]
    got = seg.predict(torch.zeros(1, 3, 3, 4))[0]
    assert got.tolist() == expected


def test_suppress_small_classes_zeroes_whole_classes():
    probs = scene_probs()
    out = suppress_small_classes(probs, 0.15)
    assert torch.all(out[2] == 0)  # B everywhere, not only on its argmax pixel
    torch.testing.assert_close(out[[0, 1, 3]], probs[[0, 1, 3]])


def test_area_thd_never_suppresses_the_background():
    """Background wins 1 pixel of 12, far below 0.5 × the foreground (11): it keeps its probabilities and its pixel."""
    top = [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 2]]  # bg 1, A 10, B 1: foreground 11, limit 5.5
    probs = torch.tensor([[PIXEL_PROBS[t][:3] for t in row] for row in top]).permute(2, 0, 1)  # (3, 3, 4)
    out = suppress_small_classes(probs, 0.5)
    torch.testing.assert_close(out[:2], probs[:2])  # background and A untouched
    assert torch.all(out[2] == 0)  # B (1 pixel) is small
    labels = out.argmax(dim=0)
    assert labels[0, 0] == 0 and labels[2, 3] == 1  # B's pixel falls to A (0.15 > bg 0.05)


def test_area_thd_rejects_bad_values(b32):
    with pytest.raises(ValueError, match="area_thd"):
        Segmenter(b32, ["a", "b"], templates=("a {}.",), area_thd=1.5)


# ------------------------------------------------------------------------------------------ presets
BENCHMARKS = ["voc21", "pc60", "coco_object", "voc20", "cityscapes", "pc59", "ade", "coco_stuff"]
KEYS = ("short_side", "slide_crop", "slide_stride", "logit_scale", "prob_thd", "area_thd")
# NACLIP's protocol (the dataset configs): short side 336 (City 560), slide 224/112 but whole image on VOC,
# logit scale 40, prob_thd 0.1 on the three sets with background.
NACLIP = {
    d: (
        560 if d == "cityscapes" else 336,
        0 if d in ("voc21", "voc20") else 224,
        112,
        40.0,
        0.1 if d in ("voc21", "pc60", "coco_object") else 0.0,
        0.0,
    )
    for d in BENCHMARKS
}
SCLIP = {
    "voc21": (336, 224, 112, 65.0, 0.1, 0.1),
    "pc60": (336, 224, 112, 50.0, 0.1, 0.0),
    "coco_object": (336, 224, 112, 50.0, 0.1, 0.0),
    "voc20": (336, 224, 112, 40.0, 0.0, 0.0),
    "cityscapes": (560, 224, 112, 40.0, 0.0, 0.0),
    "pc59": (336, 224, 112, 40.0, 0.0, 0.0),
    "ade": (336, 224, 112, 40.0, 0.0, 0.0),
    "coco_stuff": (448, 224, 112, 40.0, 0.0, 0.0),
}
CLEARCLIP = {d: (448, 448, 224, 50.0, 0.0, 0.0) for d in BENCHMARKS}
CLEARCLIP.update(
    voc21=(448, 448, 224, 50.0, 0.5, 0.0),
    pc60=(448, 448, 224, 50.0, 0.15, 0.0),
    coco_object=(448, 448, 224, 50.0, 0.4, 0.0),
    cityscapes=(448, 224, 224, 50.0, 0.0, 0.0),
)
REGISTERED = ("gem", "clip_surgery", "resclip", "scclip", "proxyclip", "cass")
PRESETS = {  # method: (attention, arch, protocol values per dataset, dataset.protocol)
    "clip": ("vanilla", "vanilla", NACLIP, "dataset"),
    "maskclip": ("value", "reduced", NACLIP, "dataset"),
    "sclip": ("csa", "vanilla", SCLIP, "sclip"),
    "clearclip": ("qq", "reduced", CLEARCLIP, "clearclip"),
    "naclip": ("full", "reduced", NACLIP, "dataset"),
}


def protocol_of(cfg) -> tuple:
    return tuple(cfg.dataset[key] for key in KEYS)


@pytest.mark.parametrize("dataset", BENCHMARKS)
@pytest.mark.parametrize("method", list(PRESETS))
def test_method_presets_resolve_the_published_protocol(method, dataset):
    att, arch, protocols, source = PRESETS[method]
    cfg = compose_config([f"method={method}", f"dataset={dataset}"])
    config.validate(cfg)
    assert (cfg.method, cfg.attention.name, cfg.arch.name) == (method, att, arch)
    assert protocol_of(cfg) == pytest.approx(protocols[dataset])
    assert cfg.dataset.protocol == source
    shared = compose_config([f"method={method}", f"dataset={dataset}", "protocol=shared"])
    assert protocol_of(shared) == pytest.approx(NACLIP[dataset]) and shared.dataset.protocol == "dataset"
    assert (shared.attention.name, shared.arch.name) == (att, arch)
    assert (cfg.dataset.pad_crops, shared.dataset.pad_crops) == (method == "clearclip", False)
    own = f"clearclip_{dataset}" if method == "clearclip" and dataset in CLEARCLIP_NAMES else dataset
    assert (cfg.dataset.class_names, shared.dataset.class_names) == (own, dataset)


# ClearCLIP's own class-name files (mc-lan/ClearCLIP configs/cls_*.txt): one name per class where NACLIP has synonyms
CLEARCLIP_NAMES = {
    "voc21": {0: "background", 15: "person", 20: "tvmonitor"},
    "voc20": {14: "person", 19: "tvmonitor"},
    "coco_object": {0: "background", 1: "person"},
}


@pytest.mark.parametrize("dataset", list(CLEARCLIP_NAMES))
def test_clearclip_class_names_are_single_names_in_the_datasets_order(dataset):
    from naclip.data import load_class_names

    own, theirs = load_class_names(dataset), load_class_names(f"clearclip_{dataset}")
    assert len(theirs) == len(own) and all(len(names) == 1 for names in theirs)
    for index, name in CLEARCLIP_NAMES[dataset].items():
        assert theirs[index] == [name] and len(own[index]) > 1
    # elsewhere ClearCLIP's names are NACLIP's first synonyms
    differ = [i for i, (a, b) in enumerate(zip(own, theirs, strict=True)) if a[0] != b[0]]
    assert set(differ) <= set(CLEARCLIP_NAMES[dataset])


@pytest.mark.parametrize("dataset", ["demo", "voc21"])
@pytest.mark.parametrize("method", list(PRESETS))
def test_plain_command_line_of_each_method_validates(method, dataset):
    """As `python -m naclip.run method=X dataset=Y` composes and validates: Hydra's runtime choices set, so the
    default protocol choice `<method>_<dataset>` is checked exactly as on the command line."""
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        overrides = [] if method == "naclip" and dataset == "demo" else [f"method={method}", f"dataset={dataset}"]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert HydraConfig.get().runtime.choices["protocol"] == f"{method}_{dataset}"
        with open_dict(cfg):
            del cfg["hydra"]
        config.validate(cfg)  # a wrong default protocol name would be refused here as an unknown protocol
    assert cfg.method == method


def test_default_method_is_naclip_and_command_line_wins():
    cfg = compose_config([])
    assert (cfg.method, cfg.attention.name, cfg.arch.name) == ("naclip", "full", "reduced")
    cfg = compose_config(["method=sclip", "dataset=voc21", "attention=full", "arch=reduced", "dataset.logit_scale=30"])
    assert (cfg.attention.name, cfg.attention.sigma, cfg.arch.name) == ("full", 5.0, "reduced")
    assert cfg.dataset.logit_scale == 30.0 and cfg.dataset.area_thd == 0.1  # the rest of SCLIP's protocol stays


def test_methods_experiment_sweeps_every_method_and_benchmark():
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=methods"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params["method"].split(",")) == sorted([*PRESETS, *REGISTERED])
    assert sorted(params["dataset"].split(",")) == sorted(BENCHMARKS)


def test_methods_table_presets_agree_with_the_configs():
    assert sorted(m for m, spec in METHODS.items() if spec.attention is None) == sorted(REGISTERED)
    for method, spec in METHODS.items():
        if spec.attention is None:  # registered methods (tests/test_gem_surgery.py and their own tests)
            continue
        cfg = compose_config([f"method={method}"])
        assert (cfg.attention.name, cfg.arch.name) == (spec.attention, spec.arch)
        assert spec.protocol == PRESETS[method][3]


def fake(
    method: str,
    dataset: str,
    miou: float,
    protocol: str,
    attention_name: str | None = None,
    precision: str | None = None,
) -> dict:
    spec = METHODS[method]
    choices = {
        "backbone": "b16",
        "refine": "none",
        "method": method,
        "dataset": dataset,
        "attention": attention_name or spec.attention,
        "arch": spec.arch,
    }
    backbone = {} if precision is None else {"precision": precision}  # None: a result from before the key
    return {
        "choices": choices,
        "miou": miou,
        "finished_at": "2026-01-01T00:00:00+00:00",
        "config": {"dataset": {"protocol": protocol}, "attention": {"sigma": None}, "backbone": backbone},
    }


def test_methods_table_rows():
    results = [fake("sclip", d, 50.0 + i, "sclip") for i, d in enumerate(BENCHMARKS)]
    results += [
        fake("sclip", "voc21", 11.0, "dataset", precision="fp16"),
        fake("sclip", "voc21", 99.0, "sclip", attention_name="full"),
    ]
    results += [
        fake("clearclip", "voc21", 40.0, "clearclip", precision="fp16"),
        fake("clearclip", "pc60", 30.0, "clearclip", precision="fp32"),
    ]
    table = methods_table(results)
    assert table.value("SCLIP [fp32]", "V21") == 50.0 and table.value("SCLIP [fp32]", "C-Stf") == 57.0
    assert table.value("SCLIP [fp32]", "Avg") == pytest.approx(53.5)
    assert table.value("SCLIP (shared protocol) [fp16]", "V21") == 11.0
    assert table.value("ClearCLIP [fp16, fp32]", "V21") == 40.0  # a row of mixed precisions names both
    assert table.value("SCLIP (published, NACLIP Table 1)", "V21") == 59.1
    assert table.value("ClearCLIP (published, ClearCLIP Table 1)", "PC60") == 32.6
    assert table.value("MaskCLIP (published, NACLIP Table 1)", "C-Stf") == 16.7
    assert table.value("CLIP", "V21") is None
    labels = [label for label, _ in table.rows]
    assert "CLIP" in labels  # no results: no precision to name
    for spec in METHODS.values():  # each measured row is followed by the published one
        measured = next(i for i, label in enumerate(labels) if label.split(" [")[0] == spec.label)
        assert labels.index(f"{spec.label} (published, {spec.source})") > measured


# ------------------------------------------------------------------------------------------ plug-ins
@pytest.fixture
def scratch_variant():
    names = []
    yield names
    for name in names:
        attention.ATTENTIONS.pop(name, None)


def test_registered_variant_is_a_builtin_in_every_way(b32, scratch_variant):
    def qk_sum(q, k, v, prior):  # softmax((q+k)(q+k)ᵀ/√d + ω) v
        return F.scaled_dot_product_attention(q + k, q + k, v, attn_mask=prior.to(q.dtype))

    scratch_variant.append("qk_sum_test")
    naclip.register_attention("qk_sum_test", qk_sum, uses_sigma=True)
    assert "qk_sum_test" in naclip.list_attentions()
    with pytest.raises(ValueError, match="qk_sum_test"):  # error messages list it
        naclip.get_attention("nope")
    with pytest.raises(ValueError, match="already registered"):
        naclip.register_attention("qk_sum_test", qk_sum, uses_sigma=True)
    with pytest.raises(ValueError, match="already registered"):
        naclip.register_attention("full", qk_sum, uses_sigma=True)
    cfg = compose_config(["attention=full", "attention.name=qk_sum_test", "attention.sigma=null"])
    with pytest.raises(ValueError, match=r"attention\.sigma must be a positive number"):
        config.validate(cfg)
    # default weights (fn with v = identity) equal the explicit formula
    q, k, _ = qkv((3, 4))
    prior = attention.gaussian_prior((3, 4), 2.0)
    s = q + k
    logits = torch.einsum("bhid,bhjd->bhij", s.double(), s.double()) / math.sqrt(q.shape[-1]) + prior.double()
    got = attention.attention_weights(naclip.get_attention("qk_sum_test"), q, k, prior)
    torch.testing.assert_close(got.double(), logits.softmax(-1), atol=1e-5, rtol=1e-4)
    maps = attention_maps(b32, torch.randn(3, 96, 128), [(1, 1)], variants=("qk_sum_test",), sigma=2.0)
    assert maps["qk_sum_test"].shape == (1, 3, 4)


def test_registered_weights_and_row_sum_are_what_figures_draw(b32, scratch_variant):
    """`weights=` replaces the probe of `fn` in figures and every row is divided by `row_sum`."""

    def thrice_uniform(q, k, prior):  # rows sum to 3: a figure must draw 1/N everywhere
        n = q.shape[-2]
        return torch.full((*q.shape[:-2], n, n), 3.0 / n, dtype=q.dtype)

    scratch_variant.append("uniform_test")
    naclip.register_attention(
        "uniform_test", lambda q, k, v, prior: F.scaled_dot_product_attention(q, q, v), uses_sigma=False,
        weights=thrice_uniform, row_sum=3.0,
    )  # fmt: skip
    maps = attention_maps(b32, torch.randn(3, 96, 128), [(0, 0), (2, 3)], variants=("uniform_test",))
    tokens = 1 + 3 * 4
    torch.testing.assert_close(maps["uniform_test"], torch.full((2, 3, 4), 1.0 / tokens))
    assert "÷ 3" in variant_title("uniform_test")


def test_unknown_plugin_module_is_one_clear_error():
    cfg = compose_config(["plugins=[surely_not_a_module_xyz]"])
    with pytest.raises(ValueError, match="plugins: cannot import 'surely_not_a_module_xyz'"):
        config.validate(cfg)


def readme_plugin_blocks() -> dict[str, str]:
    blocks = readme_blocks("plugin")
    assert {"run"} < set(blocks) and len(blocks) == 3, sorted(blocks)
    return blocks


def test_readme_plugin_example_is_short():
    blocks = readme_plugin_blocks()
    lines = [line for body in blocks.values() for line in body.splitlines() if line.strip()]
    assert len(lines) <= 20


@pytest.mark.slow
def test_readme_plugin_example_end_to_end(tmp_path):
    """The README's three blocks, written as they stand, run from a fresh folder without touching naclip."""
    result = run_readme_example(readme_plugin_blocks(), tmp_path)
    assert result["config"]["attention"] == {"name": "qq_gauss", "sigma": 5.0}
    assert result["config"]["plugins"] == ["my_attention"]
    assert result["choices"]["attention"] == "qq_gauss" and result["num_images"] > 0


@pytest.mark.slow
def test_misspelt_protocol_is_one_clear_error(tmp_path):
    """`protocol` is an optional group, so Hydra alone would skip an unknown name; the runner must not."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NACLIP_OUTPUT": str(tmp_path / "out")}
    args = ["protocol=shard", "method=sclip", "dataset=synthetic", "backbone=b32", "backbone.pretrained=null"]
    proc = subprocess.run(
        [sys.executable, "-m", "naclip.run", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("naclip.run: error: unknown protocol 'shard'")
    assert "sclip_voc21" in proc.stderr and "shared" in proc.stderr
    assert not list((tmp_path / "out").rglob("result.json"))  # the failed job records only its status.json
    (status,) = (tmp_path / "out").rglob("status.json")
    assert json.loads(status.read_text())["status"] == "failed"
