"""naclip.predict: class and input resolution, the in-process run, and the CLI through subprocesses (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import imgviz
import numpy as np
import open_clip
import pytest
import reference_pipeline as ref
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from naclip import Segmenter, config
from naclip.predict import PredictError, find_images, resolve_classes, run
from naclip.predictor import Predictor, normalize_images


def _write_image(path: Path, height: int, width: int, seed: int = 0, block: int = 1) -> np.ndarray:
    """Random pixels in block x block squares; halving a 2-block image is then exact for any bilinear filter."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    pixels = coarse.repeat(block, axis=0).repeat(block, axis=1)
    Image.fromarray(pixels).save(path)
    return pixels


def _cfg(*overrides: str):
    config.register()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        return compose(
            "predict", overrides=["backbone=b32", "backbone.pretrained=null", "text_cache_dir=null", *overrides]
        )


# ------------------------------------------------------------------------------------------------ classes
# method: (attention, arch, short_side, slide_crop, slide_stride, logit_scale, dataset of the protocol's values), as
# published: SCLIP (Wang et al., ECCV'24) 336 / 224 / 112 / 40, ClearCLIP (Lan et al., ECCV'24) 448 / 448 / 224 / 50
# on the datasets without a background class; CLIP and MaskCLIP rows of NACLIP's Table 1 use NACLIP's protocol.
PREDICT_PRESETS = {
    "naclip": ("full", "reduced", 336, 224, 112, 40.0, "dataset"),
    "clip": ("vanilla", "vanilla", 336, 224, 112, 40.0, "dataset"),
    "maskclip": ("value", "reduced", 336, 224, 112, 40.0, "dataset"),
    "sclip": ("csa", "vanilla", 336, 224, 112, 40.0, "sclip"),
    "clearclip": ("qq", "reduced", 448, 448, 224, 50.0, "clearclip"),
    # registered methods whose windows differ from NACLIP's: ProxyCLIP (Lan et al., ECCV'24) 336 / 336 / 112 / 40 on
    # VOC20, PC59 and COCO-Stuff; GEM (Bousselham et al., CVPR'24) its code's 448 x 448 input everywhere
    "proxyclip": ("full", "reduced", 336, 336, 112, 40.0, "proxyclip"),
    "gem": ("vanilla", "vanilla", 448, 448, 224, 40.0, "gem"),
}


@pytest.mark.parametrize("method", sorted(PREDICT_PRESETS))
def test_method_presets_bring_their_protocol(method):
    cfg = _cfg("image=x.png", "classes=[a]", f"method={method}")
    got = (
        cfg.attention.name,
        cfg.arch.name,
        cfg.short_side,
        cfg.slide_crop,
        cfg.slide_stride,
        cfg.logit_scale,
        cfg.protocol,
    )
    assert got == PREDICT_PRESETS[method]
    assert (cfg.prob_thd, cfg.area_thd) == (0.0, 0.0)
    mine = _cfg("image=x.png", "classes=[a]", f"method={method}", "short_side=512", "logit_scale=30")
    assert (mine.short_side, mine.logit_scale) == (512, 30.0)  # the command line wins over the preset


def test_help_lists_only_the_groups_predict_accepts():
    config.register()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        cfg = compose("predict", overrides=["image=x", "classes=[a]"], return_hydra_config=True)
        template = cfg.hydra.help.template
        listed = {
            line.split(":")[0]: line.split(": ")[1].split(", ")
            for line in template.splitlines()
            if ": " in line and line.split(":")[0].isidentifier()
        }
        assert set(listed) == {"method", "backbone", "attention", "arch", "refine", "proxy"}
        assert listed["proxy"] == ["dino_b16", "dino_b8", "dinov2_b14", "dinov2_b14_reg", "dinov3_b16", "none"]
        assert listed["method"] == [
            "cass",
            "clearclip",
            "clip",
            "clip_surgery",
            "gem",
            "maskclip",
            "naclip",
            "proxyclip",
            "resclip",
            "scclip",
            "sclip",
        ]
        assert {"full", "kk_sim", "vanilla"} <= set(listed["attention"]) and listed["refine"] == ["none", "pamr"]
        for group, options in listed.items():  # every listed choice composes
            for option in options:
                compose("predict", overrides=["image=x", "classes=[a]", f"{group}={option}"])
    assert "naclip.predict is powered by Hydra" in template


def test_classes_list_with_synonyms_and_background():
    groups, display = resolve_classes(["car", "tree, bush", ["road", "street"]], ["wall", "floor"])
    assert groups == [["wall", "floor"], ["car"], ["tree", "bush"], ["road", "street"]]
    assert display == ["background", "car", "tree", "road"]


def test_classes_without_background_keep_their_indices():
    groups, display = resolve_classes(["sky", "grass"])
    assert groups == [["sky"], ["grass"]] and display == ["sky", "grass"]


def test_classes_from_file_and_packaged_name(tmp_path):
    file = tmp_path / "names.txt"
    file.write_text("cat\ndog, puppy\n", encoding="utf-8")
    assert resolve_classes(str(file)) == ([["cat"], ["dog", "puppy"]], ["cat", "dog"])
    groups, display = resolve_classes("voc21")
    assert len(groups) == 21 and display[1] == "aeroplane"


@pytest.mark.parametrize(
    ("classes", "message"),
    [([], "classes is empty"), (["car", " "], "empty entry"), ("no_such_file.txt", "no_such_file.txt"), (3, "list")],
)
def test_bad_classes_raise_one_line(classes, message):
    with pytest.raises(PredictError, match=message) as info:
        resolve_classes(classes)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- inputs
def test_find_images_in_folder_sorted_by_name(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in find_images(str(tmp_path))] == ["a.JPG", "b.png", "c.webp"]
    assert find_images(str(tmp_path / "b.png")) == [tmp_path / "b.png"]


def test_find_images_errors(tmp_path):
    with pytest.raises(PredictError, match="does not exist"):
        find_images(str(tmp_path / "missing.png"))
    with pytest.raises(PredictError, match="holds no images"):
        find_images(str(tmp_path))


# ---------------------------------------------------------------------------------- preprocessing, Predictor
def test_normalize_images_scales_pixels_to_unit_range_before_clip_statistics():
    mean, std = (0.5, 0.25, 0.4), (0.25, 0.5, 0.2)
    pixels = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 4).expand(3, 2, 4)
    unit = torch.tensor([0.0, 0.2, 0.4, 1.0])  # the pixel values divided by 255
    expected = torch.stack([(unit - m) / s for m, s in zip(mean, std, strict=True)])[:, None, :].expand(3, 2, 4)
    got = normalize_images(pixels, mean, std)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        normalize_images(pixels[None].repeat(2, 1, 1, 1), mean, std)[1], expected, atol=1e-6, rtol=0
    )


def test_predictor_returns_labels_at_the_image_size(tmp_path):
    """Segmented at the protocol's size (448 → 224 short side), labelled at the image's own 448x448 pixels."""
    path = tmp_path / "photo.png"
    _write_image(path, 448, 448, seed=3, block=2)
    classes, templates = [["sky"], ["tree", "bush"], ["car"]], ["a photo of a {}."]
    torch.manual_seed(11)
    predictor = Predictor(
        classes, model="ViT-B-32", pretrained=None, device="cpu", short_side=224, slide_crop=0, templates=templates
    )
    labels = predictor(str(path))
    assert labels.shape == (448, 448) and labels.dtype == torch.int64

    torch.manual_seed(11)  # the same random weights, built by open_clip directly
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    names, owner = ref.query_names(classes)
    x = ref.normalize(ref.resize(ref.decode(path.read_bytes()), 224))  # (3, 224, 224): a 7x7 patch grid
    expected = ref.predict_labels(model, ref.text_embeddings(model, names, templates), owner, x, (448, 448))
    assert len(expected.unique()) >= 2
    assert (labels == expected).float().mean().item() > 0.999


# ------------------------------------------------------------------------------------------ in-process run
def test_run_writes_labels_and_overlays_at_image_size(tmp_path, monkeypatch, b32, capsys):
    """Label PNGs hold exactly the segmenter's prediction at the image's size; stems stay unique."""
    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    images = tmp_path / "in"
    images.mkdir()
    # short sides of 128 halved to short_side=64: cv2, mmcv and any bilinear resize agree exactly
    pixels = {
        "a.png": _write_image(images / "a.png", 128, 176, 0, block=2),
        "a.bmp": _write_image(images / "a.bmp", 176, 128, 1, block=2),
    }
    out = tmp_path / "out"
    out.mkdir()
    cfg = _cfg(
        f"image={images}",
        "classes=[sky, 'tree, bush']",
        "background=[wall]",
        "short_side=64",
        "slide_crop=64",
        "slide_stride=32",
        "prob_thd=0.4",
    )
    written = run(cfg, out)

    assert sorted(p.name for p in written) == [
        "a_bmp_labels.png",
        "a_bmp_overlay.png",
        "a_png_labels.png",
        "a_png_overlay.png",
    ]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    seg = Segmenter(b32, [["wall"], ["sky"], ["tree", "bush"]], slide_crop=64, slide_stride=32, prob_thd=0.4)
    for name, source in pixels.items():
        stem = name.replace(".", "_")
        x = ref.normalize(ref.resize(source, 64))
        expected = seg.predict_list([x], [source.shape[:2]])[0].numpy()
        with Image.open(out / f"{stem}_labels.png") as png:
            assert png.mode == "P" and png.size == (source.shape[1], source.shape[0])
            np.testing.assert_array_equal(np.array(png), expected)
            assert png.getpalette()[:768] == imgviz.label_colormap().flatten().tolist()
        with Image.open(out / f"{stem}_overlay.png") as png:
            assert png.mode == "RGB" and png.size == (source.shape[1], source.shape[0])


def test_run_outputs_follow_the_exif_orientation(tmp_path, monkeypatch, b32):
    """An orientation-6 JPEG is shown turned by 90°: labels and overlay come out in that orientation."""
    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)
    stored = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", exif=exif)
    out = tmp_path / "out"
    out.mkdir()
    run(_cfg(f"image={path}", "classes=[sky, tree]", "short_side=64", "slide_crop=0"), out)

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # the pixels as stored, tag ignored
    decoded = cv2.cvtColor(cv2.imdecode(np.fromfile(path, np.uint8), flags), cv2.COLOR_BGR2RGB)
    upright = np.ascontiguousarray(np.rot90(decoded, -1))  # (56, 40, 3): turned 90° clockwise
    seg = Segmenter(b32, [["sky"], ["tree"]], slide_crop=0)
    x = ref.normalize(ref.resize(upright, 64))
    expected = seg.predict_list([x], [upright.shape[:2]])[0].numpy()
    with Image.open(out / "phone_labels.png") as png:
        assert png.size == (40, 56)
        np.testing.assert_array_equal(np.array(png), expected)
    with Image.open(out / "phone_overlay.png") as png:
        assert png.size == (40, 56)


def test_run_checks_config_before_loading_a_model(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be built for bad input")

    monkeypatch.setattr("naclip.clip.load_clip", no_model)
    _write_image(tmp_path / "x.png", 8, 8)
    with pytest.raises(ValueError, match="sigma"):
        run(_cfg(f"image={tmp_path}", "classes=[a]", "attention.sigma=-1"), tmp_path)
    with pytest.raises(PredictError, match="alpha"):
        run(_cfg(f"image={tmp_path}", "classes=[a]", "alpha=3"), tmp_path)


# --------------------------------------------------------------------------------------------------- CLI
def _cli(tmp_path: Path, *args: str, pretrained: str = "null") -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "hydra_out"
    command = [
        sys.executable,
        "-m",
        "naclip.predict",
        *args,
        "backbone=b32",
        f"backbone.pretrained={pretrained}",
        "text_cache_dir=null",
        "short_side=64",
        "slide_crop=0",
        f"out={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a tag that is not cached fails at once, never waits
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    return proc, out


@pytest.mark.slow
def test_cli_folder_with_background(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_image(folder / "first.png", 48, 80, 0)
    _write_image(folder / "second.jpg", 70, 36, 1)
    proc, out = _cli(tmp_path, f"image={folder}", "classes=[car,'tree, bush']", "background=[wall]", "prob_thd=0.5")
    assert proc.returncode == 0, proc.stderr
    names = {"first": (80, 48), "second": (36, 70)}
    printed = [line for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert printed == [str(out / f"{n}_{kind}.png") for n in names for kind in ("labels", "overlay")]
    for stem, size in names.items():
        with Image.open(out / f"{stem}_labels.png") as png:
            assert png.mode == "P" and png.size == size
            assert set(np.unique(np.array(png))) <= {0, 1, 2}
        with Image.open(out / f"{stem}_overlay.png") as png:
            assert png.mode == "RGB" and png.size == size


@pytest.mark.slow
def test_cli_single_image_classes_from_file(tmp_path):
    _write_image(tmp_path / "photo.png", 40, 52)
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass, lawn\ncar\n", encoding="utf-8")
    proc, out = _cli(tmp_path, f"image={tmp_path / 'photo.png'}", f"classes={names}")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "photo_labels.png") as png:
        assert png.size == (52, 40) and set(np.unique(np.array(png))) <= {0, 1, 2}
    assert (out / "photo_overlay.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty_dir", "holds no images"),
        ("no_classes", "classes is empty"),
        ("unreadable", "cannot read image"),
        ("no_weights", "could not download CLIP weights"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, case, message):
    good = tmp_path / "good.png"
    _write_image(good, 32, 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    args = {
        "missing": [f"image={tmp_path / 'nope.png'}", "classes=[a]"],
        "empty_dir": [f"image={tmp_path / 'empty'}", "classes=[a]"],
        "no_classes": [f"image={good}", "classes=[]"],
        "unreadable": [f"image={tmp_path / 'broken.jpg'}", "classes=[a]"],
        "no_weights": [f"image={good}", "classes=[a]"],
    }[case]
    proc, out = _cli(tmp_path, *args, pretrained="openai" if case == "no_weights" else "null")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("naclip.predict: error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(out.glob("*.png"))


# a ProxyCLIP run with a small random proxy (β 0.5 keeps a random proxy's attention rows finite)
RANDOM_PROXY = [
    "method=proxyclip",
    "proxy.model=vit_small_patch16_224.dino",
    "proxy.pretrained=null",
    "proxyclip.beta=0.5",
]


@pytest.mark.parametrize(
    ("pretrained", "proxy", "marked"),
    [("null", [], True), ("openai", [], False), ("openai", RANDOM_PROXY, True)],
    ids=["random-clip", "real-clip", "real-clip-random-proxy"],
)
def test_overlays_from_random_weights_carry_a_red_mark(tmp_path, monkeypatch, b32, pretrained, proxy, marked):
    monkeypatch.setattr("naclip.clip.load_clip", lambda *args, **kwargs: b32)  # stands in for either weights
    _write_image(tmp_path / "x.png", 64, 96, block=2)
    out = tmp_path / "out"
    run(
        _cfg(
            f"image={tmp_path / 'x.png'}",
            "classes=[sky, tree]",
            "short_side=64",
            "slide_crop=0",
            f"backbone.pretrained={pretrained}",
            *proxy,
        ),
        out,
    )
    pixels = np.asarray(Image.open(out / "x_overlay.png"))
    r, g, b = (pixels[-1, :, i].astype(int) for i in range(3))
    red_bottom_row = bool(((r > 180) & (g < 60) & (b < 60)).all())
    assert red_bottom_row == marked
