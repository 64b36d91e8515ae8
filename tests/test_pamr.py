"""Tests for naclip.pamr.PAMR against a plain per-pixel reference and its qualitative properties."""

from __future__ import annotations

import math

import pytest
import torch

from naclip.pamr import PAMR


def _reference_pamr(image: torch.Tensor, logits: torch.Tensor, num_iter: int, dilations: tuple[int, ...]):
    """PAMR written pixel by pixel with python loops, in float64, for a handful of pixels."""
    img = image.double().tolist()  # [B][C][H][W]
    m = logits.double().tolist()  # [B][K][H][W]
    batch, channels, height, width = image.shape
    classes = logits.shape[1]

    def clamp(v: int, hi: int) -> int:
        return min(max(v, 0), hi - 1)

    # Neighbour coordinates per pixel: 8 per dilation, borders replicated by clamping the coordinates.
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    nbr = {
        (y, x): [(clamp(y + oy, height), clamp(x + ox, width)) for oy, ox in offsets]
        for y in range(height)
        for x in range(width)
    }

    kernels = []  # kernels[b][(y, x)] -> list of weights, one per neighbour
    for b in range(batch):
        per_pixel = {}
        for y in range(height):
            for x in range(width):
                logit_sum = [0.0] * len(offsets)
                for c in range(channels):
                    centre = img[b][c][y][x]
                    values = [img[b][c][ny][nx] for ny, nx in nbr[(y, x)]]
                    window = values + [centre] * len(dilations)  # centre once per dilation
                    mean = sum(window) / len(window)
                    std = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
                    for j, v in enumerate(values):
                        logit_sum[j] += -abs(centre - v) / (1e-8 + 0.1 * std)
                logit_avg = [s / channels for s in logit_sum]
                top = max(logit_avg)
                exps = [math.exp(v - top) for v in logit_avg]
                per_pixel[(y, x)] = [e / sum(exps) for e in exps]
        kernels.append(per_pixel)

    for _ in range(num_iter):
        new = [[[[0.0] * width for _ in range(height)] for _ in range(classes)] for _ in range(batch)]
        for b in range(batch):
            for k in range(classes):
                for y in range(height):
                    for x in range(width):
                        new[b][k][y][x] = sum(
                            w * m[b][k][ny][nx] for w, (ny, nx) in zip(kernels[b][(y, x)], nbr[(y, x)], strict=True)
                        )
        m = new
    return torch.tensor(m, dtype=torch.float64)


def test_matches_pixelwise_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 7, 9, generator=gen)
    logits = torch.randn(2, 2, 7, 9, generator=gen)
    out = PAMR(num_iter=3, dilations=(1, 2))(image, logits)
    expected = _reference_pamr(image, logits, num_iter=3, dilations=(1, 2))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_dilation_larger_than_image_matches_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 4, 5, generator=gen)
    logits = torch.randn(1, 3, 4, 5, generator=gen)
    out = PAMR(num_iter=2, dilations=(8,))(image, logits)
    expected = _reference_pamr(image, logits, num_iter=2, dilations=(8,))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_constant_logits_stay_constant() -> None:
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 12, 10, generator=gen)
    logits = torch.full((1, 4, 12, 10), 0.0)
    logits[:, 0] = 2.5
    logits[:, 3] = -1.0
    out = PAMR(num_iter=5, dilations=(1, 3))(image, logits)
    torch.testing.assert_close(out, logits)


def test_zero_iterations_is_identity() -> None:
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 6, 6, generator=gen)
    logits = torch.randn(2, 5, 6, 6, generator=gen)
    out = PAMR(num_iter=0)(image, logits)
    assert torch.equal(out, logits)


def test_step_edge_limits_leakage_compared_to_plain_averaging() -> None:
    height, width = 16, 16
    image = torch.zeros(1, 3, height, width)
    image[..., width // 2 :] = 1.0  # vertical step edge in every channel
    logits = torch.zeros(1, 2, height, width)
    logits[:, 0, :, : width // 2] = 1.0  # class 0 on the left half
    logits[:, 1, :, width // 2 :] = 1.0  # class 1 on the right half
    refined = PAMR(num_iter=5, dilations=(1, 2))(image, logits)

    # Plain averaging: the same neighbour set with uniform weights, via the constant-image kernel.
    averaged = PAMR(num_iter=5, dilations=(1, 2))(torch.zeros_like(image), logits)

    def leakage(out: torch.Tensor) -> float:
        return (out[0, 0, :, width // 2 :].sum() + out[0, 1, :, : width // 2].sum()).item()

    assert leakage(averaged) > 10.0
    assert leakage(refined) < 0.01 * leakage(averaged)
    # On the correct side the class score is preserved.
    torch.testing.assert_close(refined[0, 0, :, : width // 2], torch.ones(height, width // 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_shape_and_dtype_preserved(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 9, 11, generator=gen).to(dtype)
    logits = torch.randn(2, 7, 9, 11, generator=gen).to(dtype)
    out = PAMR(num_iter=2, dilations=(1, 2))(image, logits)
    assert out.shape == logits.shape
    assert out.dtype == dtype
    expected = _reference_pamr(image, logits, num_iter=2, dilations=(1, 2))  # float64 from the same inputs
    # computed in fp32 and cast back once: within one rounding step of the output dtype
    tol = max(torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_refinement_is_a_convex_combination() -> None:
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 10, 10, generator=gen)
    logits = torch.randn(1, 3, 10, 10, generator=gen)
    out = PAMR(num_iter=4, dilations=(1, 2))(image, logits)
    assert out.min() >= logits.min() - 1e-6
    assert out.max() <= logits.max() + 1e-6
    assert not torch.allclose(out, logits)


def test_no_gradient_is_tracked() -> None:
    image = torch.randn(1, 3, 5, 5)
    logits = torch.randn(1, 2, 5, 5, requires_grad=True)
    assert not PAMR(num_iter=1, dilations=(1,))(image, logits).requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_iter": -1}, "-1"),
        ({"dilations": ()}, r"\(\)"),
        ({"dilations": (1, 0)}, "got 0"),
        ({"dilations": (-2,)}, "got -2"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PAMR(**kwargs)


@pytest.mark.parametrize(
    ("image_shape", "logits_shape"),
    [
        ((1, 3, 8, 8), (2, 4, 8, 8)),  # batch mismatch
        ((1, 3, 8, 8), (1, 4, 8, 9)),  # width mismatch
        ((1, 3, 7, 8), (1, 4, 8, 8)),  # height mismatch
        ((1, 1, 8, 8), (1, 4, 8, 8)),  # not 3 channels
        ((3, 8, 8), (1, 4, 8, 8)),  # image not 4-D
        ((1, 3, 8, 8), (4, 8, 8)),  # logits not 4-D
    ],
)
def test_bad_input_shapes_raise(image_shape: tuple, logits_shape: tuple) -> None:
    with pytest.raises(ValueError, match="PAMR"):
        PAMR(num_iter=1, dilations=(1,))(torch.zeros(image_shape), torch.zeros(logits_shape))
