"""naclip.viz: attention maps against the encoder and the plain Gaussian, overlays and palette PNGs."""

from __future__ import annotations

import math
import subprocess
import sys

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from naclip.attention import attend, attention_weights, gaussian_prior, get_attention
from naclip.viz import (
    RANDOM_WEIGHTS_NOTE,
    attention_maps,
    image_grid,
    mark_random_weights,
    overlay,
    palette_png,
    plot_attention,
)

ROWS, COLS = 5, 6  # patch grid of a 160x192 image with ViT-B/32
PATCHES = [(0, 0), (2, 3), (4, 5)]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 32 * ROWS, 32 * COLS)


@pytest.fixture(scope="module")
def maps(b32, image) -> dict[str, torch.Tensor]:
    return attention_maps(b32, image, PATCHES, variants=("vanilla", "kk_sim", "n_only", "full"), sigma=2.0)


def test_attention_maps_shapes(maps):
    assert list(maps) == ["vanilla", "kk_sim", "n_only", "full"]
    for value in maps.values():
        assert value.shape == (len(PATCHES), ROWS, COLS)
        assert value.dtype == torch.float32
        sums = value.sum(dim=(1, 2))  # mass on patches: all but the CLS token's share
        assert torch.all(sums > 0.5) and torch.all(sums <= 1 + 1e-5)


def _last_block_qk(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (h, 1+N, d) of the last block, from the input open_clip's own forward feeds it."""
    block = model.visual.transformer.resblocks[-1]
    seen = []
    hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.encode_image(image[None])
    finally:
        hook.remove()
    x = block.ln_1(seen[0][0])  # (1+N, C), batch-first blocks
    heads = block.attn.num_heads
    q, k, _ = (x @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
    return (t.reshape(len(x), heads, -1).transpose(0, 1) for t in (q, k))


@pytest.mark.parametrize("variant", ["vanilla", "kk_sim", "full"])
def test_attention_maps_equal_softmax_of_scaled_scores(b32, variant):
    """softmax(q·kᵀ/√d [+ ω]) from the model's own last-block q and k, head average, CLS column dropped."""
    native = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(2))  # 7x7 grid: no resizing
    q, k = _last_block_qk(b32, native)
    query = k if variant in ("kk_sim", "full") else q
    scores = query @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (h, 50, 50)
    if variant == "full":
        rr, cc = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
        rr, cc = rr.flatten(), cc.flatten()
        omega = torch.zeros(50, 50)
        omega[1:, 1:] = torch.exp(-((rr[:, None] - rr) ** 2 + (cc[:, None] - cc) ** 2) / (2 * 2.0**2))
        scores = scores + omega
    weights = scores.softmax(dim=-1).mean(dim=0)  # (50, 50)
    patches = [(0, 0), (3, 4), (6, 2)]
    got = attention_maps(b32, native, patches, variants=(variant,), sigma=2.0)[variant]
    for i, (r, c) in enumerate(patches):
        torch.testing.assert_close(got[i], weights[1 + r * 7 + c, 1:].reshape(7, 7), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", ["vanilla", "kk_sim", "n_only", "full"])
def test_explicit_weights_are_the_fused_attention(variant):
    """The figures' explicit weights, applied to v, give the fused kernel's output (softmax(QKᵀ/√d + bias) v)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 13, 16, generator=gen) * torch.tensor([1.0, 3.0])[:, None, None, None]
    k = torch.randn(2, 4, 13, 16, generator=gen)
    v = torch.randn(2, 4, 13, 16, generator=gen)
    kind = get_attention(variant)
    prior = gaussian_prior((3, 4), 1.5) if kind.uses_sigma else None
    weights = attention_weights(kind, q, k, prior)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 13))
    torch.testing.assert_close(weights @ v, attend(kind, q, k, v, prior), atol=1e-5, rtol=1e-4)
    if variant == "vanilla":
        want = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)  # √d = 4
        torch.testing.assert_close(weights, want, atol=1e-6, rtol=1e-5)


def test_batched_and_unbatched_image_agree(b32, image, maps):
    again = attention_maps(b32, image[None], PATCHES[:1], variants=("full",), sigma=2.0)
    torch.testing.assert_close(again["full"][0], maps["full"][0])


def test_neighbourhood_only_follows_the_gaussian(maps):
    """softmax(c·ω): log-attention is affine in ω with a positive slope and peaks at the query patch."""
    rr, cc = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    for i, (r, c) in enumerate(PATCHES):
        omega = np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * 2.0**2))
        logs = np.log(maps["n_only"][i].double().numpy())
        slope, intercept = np.polyfit(omega.ravel(), logs.ravel(), 1)
        assert slope > 0
        np.testing.assert_allclose(logs, slope * omega + intercept, atol=1e-4)
        assert np.unravel_index(np.argmax(logs), logs.shape) == (r, c)


def test_full_attention_is_more_local_than_vanilla(maps):
    rr, cc = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    for i, (r, c) in enumerate(PATCHES):
        near = torch.from_numpy(np.hypot(rr - r, cc - c) <= 2)
        share = {n: (maps[n][i][near].sum() / maps[n][i].sum()).item() for n in ("vanilla", "full")}
        assert share["full"] > share["vanilla"] + 0.05, share


def test_attention_maps_reject_bad_input(b32, image):
    with pytest.raises(ValueError, match=r"outside the 5x6 patch grid"):
        attention_maps(b32, image, [(5, 0)])
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        attention_maps(b32, image, [(0, 0)], variants=("nope",))
    with pytest.raises(ValueError, match="unknown arch"):
        attention_maps(b32, image, [(0, 0)], arch="nope")
    with pytest.raises(ValueError, match="one"):
        attention_maps(b32, torch.stack([image, image]), [(0, 0)])


def _picture(height: int = 40, width: int = 56) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), dtype=np.int64)
    labels[:, width // 2 :] = 2
    labels[height - 5 :, :5] = 255  # ignore: coloured, no legend entry
    return pixels, labels


def test_overlay_blends_with_the_voc_palette():
    pixels, labels = _picture()
    out = overlay(pixels, labels, ["background", "cat", "dog"], alpha=0.25, legend=False)
    colours = imgviz.label_colormap()
    expected = np.rint(0.75 * pixels.astype(np.float64) + 0.25 * colours[labels]).astype(np.uint8)
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    names = ["background", "cat", "dog"]
    np.testing.assert_array_equal(overlay(pixels, labels, names, alpha=0.0, legend=False), pixels)
    np.testing.assert_array_equal(overlay(pixels, labels, names, alpha=1.0, legend=False), colours[labels])


def test_user_classes_are_never_black_only_background_is():
    """naclip.predict's classes without background=[...]: `person` (class 0) must not look unlabelled."""
    labels = np.repeat(np.arange(3), 8)[None].repeat(6, axis=0)  # (6, 24): stripes of classes 0, 1, 2
    black = np.zeros((1, 1, 3), np.uint8)
    voc = imgviz.label_colormap()
    for names in (["person", "car", "dog"], ["background", "person", "car"], ["sky", "background", "tree"]):
        painted = overlay(np.zeros((*labels.shape, 3), np.uint8), labels, names, alpha=1.0, legend=False)
        for index, name in enumerate(names):
            colour = painted[labels == index]
            assert len(colour) and (colour == colour[0]).all()
            assert (colour[0] == black).all() == (name == "background"), (names, name, colour[0])
        user = [tuple(painted[labels == i][0]) for i, n in enumerate(names) if n != "background"]
        assert len(set(user)) == len(user)  # distinct colours
        # the user classes take the VOC palette's visible colours in order: 1, 2, ...
        assert user == [tuple(voc[k]) for k in range(1, len(user) + 1)]


def test_overlay_legend_stays_inside_and_accepts_chw():
    pixels, labels = _picture(120, 160)
    plain = overlay(pixels, labels, ["background", "cat", "dog"], legend=False)
    with_legend = overlay(torch.from_numpy(pixels).permute(2, 0, 1), labels, ["background", "cat", "dog"])
    assert with_legend.shape == (120, 160, 3)
    changed = np.any(with_legend != plain, axis=-1)
    assert changed[:20, :20].any()  # the legend box is top-left
    assert not changed[60:, 80:].any()  # the rest of the image is untouched


def test_overlay_rejects_mismatched_sizes():
    pixels, labels = _picture()
    with pytest.raises(ValueError, match="same"):
        overlay(pixels, labels[:10], ["a"])
    with pytest.raises(ValueError, match="alpha"):
        overlay(pixels, labels, ["a"], alpha=2.0)


def test_palette_png_round_trips_indices_and_palette(tmp_path):
    _, labels = _picture()
    path = palette_png(torch.from_numpy(labels), tmp_path / "labels.png")
    with Image.open(path) as png:
        assert png.mode == "P"
        assert png.size == (56, 40)
        np.testing.assert_array_equal(np.array(png), labels)
        palette = np.array(png.getpalette()[: 256 * 3]).reshape(256, 3)
    np.testing.assert_array_equal(palette, imgviz.label_colormap())


def test_palette_png_with_names_matches_the_overlay_colours(tmp_path):
    _, labels = _picture()
    path = palette_png(labels, tmp_path / "labels.png", ["person", "car", "dog"])
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.array(png), labels)
        palette = np.array(png.getpalette()[: 256 * 3]).reshape(256, 3)
    assert palette[0].tolist() == imgviz.label_colormap()[1].tolist() != [0, 0, 0]


def test_palette_png_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"0\.\.255"):
        palette_png(np.full((4, 4), 256), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_attention_draws_every_panel(tmp_path, image, maps):
    pixels = np.zeros((32 * ROWS, 32 * COLS, 3), dtype=np.uint8)
    fig = plot_attention(pixels, maps, PATCHES, path=tmp_path / "attention.png")
    assert len(fig.axes) == len(PATCHES) * (1 + len(maps))
    assert [ax.get_title() for ax in fig.axes[:2]] == ["image", "vanilla (CLIP: q·k)"]
    with Image.open(tmp_path / "attention.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    with pytest.raises(ValueError, match="expected"):
        plot_attention(pixels, maps, PATCHES[:1])


def test_image_grid_layout(tmp_path):
    tiles = [[np.zeros((8, 10, 3), np.uint8)] * 3] * 2
    fig = image_grid(tiles, ["image", "CLIP", "NACLIP"], path=tmp_path / "grid.png")
    assert len(fig.axes) == 6 and (tmp_path / "grid.png").is_file()
    assert math.isclose(fig.get_figwidth() / 3, 2.4, rel_tol=0.01)
    with pytest.raises(ValueError, match="one image per title"):
        image_grid(tiles, ["only one"])


@pytest.mark.slow
def test_figures_module_on_synthetic(tmp_path):
    command = [
        sys.executable,
        "-m",
        "naclip.figures",
        "--dataset",
        "synthetic",
        "--backbone",
        "b32",
        "--pretrained",
        "null",
        "--num-images",
        "2",
        "--out",
        str(tmp_path),
        "text_cache_dir=null",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("naclip.figures: ")]
    assert progress[0].startswith("naclip.figures: loading CLIP ViT-B-32 (random weights)")
    assert sum(line.startswith("naclip.figures: image ") for line in progress) == 2
    expected = ["attention_00_synthetic_000.png", "attention_01_synthetic_001.png", "qualitative.png"]
    assert proc.stdout.split() == [str(tmp_path / name) for name in expected]
    for name in expected:
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and min(png.size) > 100
    bad = subprocess.run(
        [sys.executable, "-m", "naclip.figures", "--dataset", "nope", "--pretrained", "null"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("naclip.figures: error: ") and "nope" in bad.stderr


def test_figures_weights_hint_names_its_own_flag(monkeypatch, capsys):
    """naclip.figures has no backbone.pretrained key: its error must name --pretrained."""
    from naclip import clip, figures

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # weights not cached and downloads off: fails before any model exists
    monkeypatch.setattr(clip, "_cached_hf_file", lambda hf_hub: None)
    assert figures.main(["--dataset", "synthetic", "--backbone", "b32", "--pretrained", "openai"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("naclip.figures: error: could not download CLIP weights ViT-B-32/openai")
    assert "--pretrained null" in lines[-1] and "backbone.pretrained" not in lines[-1]


def _red(pixels: np.ndarray) -> np.ndarray:
    """Where an (H, W, 3) uint8 image is a strong pure red (the random-weights marker's colour)."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > 180) & (g < 60) & (b < 60)


def test_random_weights_mark_is_a_red_strip_along_the_bottom():
    grey = np.full((120, 200, 3), 128, dtype=np.uint8)
    marked = mark_random_weights(grey.copy())
    assert (marked[:100] == 128).all()  # the image above the strip is untouched
    strip = marked[-12:]  # 8-pixel letters + 2 × 2 padding on a 120-pixel-high image
    assert _red(strip).mean() > 0.6 and (strip > 200).all(axis=-1).sum() > 20  # red, with white lettering


@pytest.mark.slow
def test_figures_on_a_one_image_dataset_count_one_image_and_mark_random_weights(tmp_path, monkeypatch, capsys, b32):
    """--num-images 4 on a one-image dataset says "image 1/1"; random-weight figures say so in red above the panels."""
    from naclip import figures

    monkeypatch.setattr(figures, "load_clip", lambda *args, **kwargs: b32)
    argv = [
        "--dataset",
        "synthetic",
        "--backbone",
        "b32",
        "--pretrained",
        "null",
        "--num-images",
        "4",
        "--out",
        str(tmp_path),
        "dataset.num_images=1",
        "text_cache_dir=null",
    ]
    assert figures.main(argv) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("naclip.figures: image ")]
    assert len(progress) == 1 and progress[0].startswith("naclip.figures: image 1/1: ")
    for name in ("qualitative.png", "attention_00_synthetic_000.png"):
        pixels = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        top = pixels[: max(8, pixels.shape[0] // 12)]  # the line above the panels' titles
        assert _red(top).sum() > 30, name


@pytest.mark.slow
def test_figures_with_a_proxy_method_add_its_column_and_its_attention(tmp_path, monkeypatch, capsys, b32):
    """`method=proxyclip` adds a ProxyCLIP column to the grid and its proxy-guided attention (on the proxy's finer
    grid) to each attention figure; real CLIP weights with a random proxy still say RANDOM WEIGHTS."""
    from naclip import figures

    monkeypatch.setattr(figures, "load_clip", lambda *args, **kwargs: b32)  # stands in for real CLIP weights
    drawn: dict[str, list] = {"grid": [], "attention": []}

    def spy(kind, draw):
        def record(*args, **kwargs):
            drawn[kind].append((args, kwargs))
            return draw(*args, **kwargs)

        return record

    monkeypatch.setattr(figures, "image_grid", spy("grid", figures.image_grid))
    monkeypatch.setattr(figures, "plot_attention", spy("attention", figures.plot_attention))
    argv = ["--dataset", "synthetic", "--backbone", "b32", "--pretrained", "openai", "--num-images", "1"]
    overrides = [
        "method=proxyclip",
        "proxy.model=vit_small_patch16_224.dino",
        "proxy.pretrained=null",
        "proxyclip.beta=0.5",  # a random proxy's rows stay finite (see test_proxy)
        "dataset.num_images=1",
        "text_cache_dir=null",
    ]
    assert figures.main([*argv, "--out", str(tmp_path), *overrides]) == 0, capsys.readouterr().err
    (rows, titles), grid_kwargs = drawn["grid"][0]
    assert titles == ["image", "CLIP", "NACLIP", "proxyclip + vit_small_patch16_224.dino", "ground truth"]
    assert len(rows[0]) == 5 and grid_kwargs["note"] == RANDOM_WEIGHTS_NOTE
    (_image, maps, patches), attention_kwargs = drawn["attention"][0]
    assert list(maps) == ["vanilla", "kk_sim", "full", "proxyclip + vit_small_patch16_224.dino"]
    clip_grid, proxy_grid = maps["full"].shape[-2:], maps["proxyclip + vit_small_patch16_224.dino"].shape[-2:]
    assert tuple(proxy_grid) == (2 * clip_grid[0], 2 * clip_grid[1])  # patch 16 vs CLIP's 32
    proxy_map = maps["proxyclip + vit_small_patch16_224.dino"]
    torch.testing.assert_close(proxy_map.sum(dim=(1, 2)), torch.ones(len(patches)))  # softmax rows: a distribution
    assert attention_kwargs["note"] == RANDOM_WEIGHTS_NOTE
