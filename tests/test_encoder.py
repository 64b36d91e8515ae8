"""The dense encoder against an independent, equation-by-equation formulation (NACLIP Sec. 3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from naclip import DenseEncoder, gaussian_prior

PAIRS = [(a, r) for a in ("vanilla", "kk_sim", "n_only", "full") for r in ("vanilla", "reduced")]


def reference_omega(rows: int, cols: int, sigma: float) -> torch.Tensor:
    """ω over [CLS] + patches from explicit grid coordinates; CLS row/column 0, 1 on the patch diagonal."""
    coords = torch.tensor([(t // cols, t % cols) for t in range(rows * cols)], dtype=torch.float64)
    d2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    omega = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-d2 / (2 * sigma**2))
    return omega


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the four taps at distances 1 + t, t, 1 - t and 2 - t."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def published_resize_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) float64 matrix of the published bicubic resize along one axis.

    The factor is (out + 0.1) / in; output cell i samples the input at (i + 0.5) / factor - 0.5 (half-pixel
    centres), from taps floor - 1 .. floor + 2, each clamped to the border.
    """
    factor = (out_size + 0.1) / in_size
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = (i + 0.5) / factor - 0.5
        base = math.floor(src)
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(src - base), strict=True):
            matrix[i, min(max(tap, 0), in_size - 1)] += weight
    return matrix


def reference_position_embedding(pos: torch.Tensor, base: int, rows: int, cols: int, square: bool) -> torch.Tensor:
    """The published rule: kept when rows·cols == base² on a square image, else the bicubic resize above."""
    if rows * cols == base * base and square:
        return pos
    patch = pos[1:].reshape(base, base, -1).double()  # (g0, g0, C)
    resized = torch.einsum(
        "ri,cj,ijd->rcd", published_resize_matrix(rows, base), published_resize_matrix(cols, base), patch
    )
    return torch.cat([pos[:1], resized.reshape(rows * cols, -1).to(pos.dtype)])


def reference_features(model, images, attention, arch, sigma):
    """Plain tensor code: patchify by unfold, explicit per-head attention, eq. 16 for the reduced block."""
    v = model.visual
    b = images.shape[0]
    p = v.conv1.kernel_size[0]
    width = v.conv1.weight.shape[0]
    rows, cols = images.shape[2] // p, images.shape[3] // p
    patches = images[:, :, : rows * p, : cols * p].unfold(2, p, p).unfold(3, p, p)  # (B, 3, rows, cols, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, rows * cols, 3 * p * p)
    x = patches @ v.conv1.weight.reshape(width, -1).T  # (B, N, C)
    square = images.shape[2] == images.shape[3]
    pos = reference_position_embedding(v.positional_embedding, v.grid_size[0], rows, cols, square)
    x = torch.cat([v.class_embedding.expand(b, 1, width), x], 1) + pos
    x = F.layer_norm(x, (width,), v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    last = v.transformer.resblocks[-1]
    heads = last.attn.num_heads
    d = width // heads
    h = F.layer_norm(x, (width,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
    w_q, w_k, w_v = last.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = last.attn.in_proj_bias.chunk(3)
    q, k, val = h @ w_q.T + b_q, h @ w_k.T + b_k, h @ w_v.T + b_v
    omega = reference_omega(rows, cols, sigma).float() if sigma else None
    qs = [q[..., i * d : (i + 1) * d] for i in range(heads)]
    ks = [k[..., i * d : (i + 1) * d] for i in range(heads)]
    vs = [val[..., i * d : (i + 1) * d] for i in range(heads)]
    if attention == "n_only":  # c: mean over heads and all token pairs of |q_i||k_j|/√d, per image
        pair_means = [
            (qh.norm(dim=-1)[:, :, None] * kh.norm(dim=-1)[:, None, :]).mean((1, 2))
            for qh, kh in zip(qs, ks, strict=True)
        ]
        c = torch.stack(pair_means).mean(0) / math.sqrt(d)
    outs = []
    for qh, kh, vh in zip(qs, ks, vs, strict=True):
        if attention == "vanilla":
            logits = qh @ kh.transpose(1, 2) / math.sqrt(d)
        elif attention == "kk_sim":
            logits = kh @ kh.transpose(1, 2) / math.sqrt(d)
        elif attention == "full":
            logits = kh @ kh.transpose(1, 2) / math.sqrt(d) + omega
        else:
            logits = c[:, None, None] * omega
        outs.append(torch.softmax(logits, -1) @ vh)
    sa = torch.cat(outs, -1) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if arch == "reduced":
        z = sa
    else:
        z = x + sa
        z = z + last.mlp(F.layer_norm(z, (width,), last.ln_2.weight, last.ln_2.bias, last.ln_2.eps))
    z = F.layer_norm(z, (width,), v.ln_post.weight, v.ln_post.bias, v.ln_post.eps) @ v.proj
    return z[:, 1:].reshape(b, rows, cols, -1)


def assert_tokens_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same direction and same magnitude, token by token."""
    assert got.shape == ref.shape
    cos = F.cosine_similarity(got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
    assert cos.min().item() >= 0.99999, cos.min().item()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def distinct_images(size: int) -> torch.Tensor:
    """Three images that differ in content and statistics (not a global scale, which LayerNorm removes):
    noise, a smooth offset gradient, and flat blocks."""
    gen = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    noise = torch.randn(3, size, size, generator=gen)
    smooth = torch.stack([torch.sin(xx / 9), torch.cos(yy / 5), (xx - yy) / size]) * 1.5 + 0.8
    blocks = torch.rand(3, size // 32, size // 32, generator=gen) * 4 - 2
    blocks = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2)
    return torch.stack([noise, smooth, blocks])


@pytest.mark.parametrize(
    "size", [(160, 160), (128, 208), (112, 448), (224, 230)], ids=["square", "nonsquare", "196-cells", "14x14-wide"]
)
@pytest.mark.parametrize(("attention", "arch"), PAIRS)
def test_b16_matches_reference(b16, attention, arch, size):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    sigma = 5.0 if attention in ("n_only", "full") else None
    got = DenseEncoder(b16, attention=attention, arch=arch, sigma=5.0)(images)
    with torch.no_grad():
        ref = reference_features(b16, images, attention, arch, sigma)
    assert_tokens_close(got, ref)


@pytest.mark.parametrize(("attention", "arch"), PAIRS)
def test_b32_matches_reference(b32, attention, arch):
    torch.manual_seed(2)
    images = torch.randn(1, 3, 192, 288)
    sigma = 5.0 if attention in ("n_only", "full") else None
    got = DenseEncoder(b32, attention=attention, arch=arch, sigma=5.0)(images)
    with torch.no_grad():
        ref = reference_features(b32, images, attention, arch, sigma)
    assert_tokens_close(got, ref)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 3.5, 8.0])
@pytest.mark.parametrize("attention", ["full", "n_only"])
def test_several_sigmas(b16, attention, sigma):
    torch.manual_seed(3)
    images = torch.randn(1, 3, 96, 144)
    got = DenseEncoder(b16, attention=attention, arch="reduced", sigma=sigma)(images)
    with torch.no_grad():
        ref = reference_features(b16, images, attention, "reduced", sigma)
    assert_tokens_close(got, ref)


@pytest.mark.parametrize(
    ("grid", "square"),
    [((10, 10), True), ((28, 28), True), ((21, 28), False), ((7, 28), False), ((14, 14), False), ((5, 3), False)],
)
@pytest.mark.parametrize("model", ["b16", "b32"])
def test_position_embedding_follows_the_published_resize(request, model, grid, square):
    visual = request.getfixturevalue(model).visual
    enc = DenseEncoder(visual)
    got = enc.position_embedding(grid, square=square)
    base = visual.grid_size[0]
    want = reference_position_embedding(visual.positional_embedding, base, *grid, square)
    assert got.shape == (1 + grid[0] * grid[1], visual.positional_embedding.shape[1])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got[0], visual.positional_embedding[0])  # the class token's embedding is kept
    # Not the exact-size resize: the published sample positions move the embeddings measurably.
    patch = visual.positional_embedding[1:].reshape(1, base, base, -1).permute(0, 3, 1, 2)
    exact = (
        F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(-1, got.shape[1])
    )
    assert (got[1:] - exact).abs().max() > 1e-3
    assert enc.position_embedding(grid, square=square) is got  # cached


def test_position_embedding_is_kept_only_for_a_square_pretraining_grid(b16):
    enc = DenseEncoder(b16)
    pos = b16.visual.positional_embedding
    assert enc.position_embedding((14, 14), square=True) is pos
    assert not torch.equal(enc.position_embedding((14, 14), square=False), pos)  # a 224×230 image: 14.1 / 14
    assert not torch.equal(enc.position_embedding((7, 28), square=False)[1:], pos[1:])  # 196 cells, not square


def test_sigma_changes_features(b16):
    images = torch.randn(1, 3, 128, 128)
    a = DenseEncoder(b16, "full", "reduced", sigma=1.0)(images)
    b = DenseEncoder(b16, "full", "reduced", sigma=8.0)(images)
    assert not torch.allclose(a, b)


def test_vanilla_reproduces_open_clip_tokens(b16):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 224, 224)
    visual = copy.deepcopy(b16.visual)
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual(images)
    ref = (tokens @ visual.proj).reshape(2, 14, 14, -1)
    assert_tokens_close(DenseEncoder(b16, "vanilla", "vanilla")(images), ref)


def openai_layout_trunk(visual, x: torch.Tensor) -> torch.Tensor:
    """Blocks 1..L-1 as OpenAI's CLIP code (and every published method's) runs them: tokens sequence-first through
    a batch_first=False nn.MultiheadAttention holding the same weights (torch's unfused path)."""
    x = x.transpose(0, 1)  # (N, B, C)
    for blk in visual.transformer.resblocks[:-1]:
        attn = torch.nn.MultiheadAttention(blk.attn.embed_dim, blk.attn.num_heads)
        attn.load_state_dict(blk.attn.state_dict())
        h = blk.ln_1(x)
        x = x + attn.eval()(h, h, h, need_weights=False)[0]
        x = x + blk.mlp(blk.ln_2(x))
    return x.transpose(0, 1)


@pytest.mark.parametrize("size", [(224, 224), (160, 240)])
def test_trunk_is_bitwise_openai_clip(b16, size):
    """Bit for bit the authors' trunk at inference, one crop per forward as their code runs it: open_clip's
    batch-first attention would take torch's fused fast path, a last-bit difference that flips discrete steps
    downstream (CASS's head pairing). (Batched, the feed-forward GEMMs round differently in any torch code.)"""
    torch.manual_seed(5)
    encoder = DenseEncoder(b16, "full", "reduced")
    with torch.inference_mode():
        x, _ = encoder.embed(torch.randn(1, 3, *size))
        assert torch.equal(encoder.trunk(x), openai_layout_trunk(b16.visual, x))


def test_model_left_untouched(b16):
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = b16.encode_image(images)
        DenseEncoder(b16, "full", "reduced")(torch.randn(1, 3, 160, 240))
        after = b16.encode_image(images)
    assert torch.equal(before, after)


@pytest.mark.parametrize("attention", ["n_only", "full"])
def test_batched_images_equal_each_image_alone(b16, attention):
    """Batching must never mix images (n_only's constant c is per image): values equal, not only directions."""
    images = distinct_images(128)
    enc = DenseEncoder(b16, attention, "reduced")
    batched = enc(images)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], enc(images[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_prior_closed_form_and_cache():
    prior = gaussian_prior((5, 7), 2.5)
    assert torch.allclose(prior.double(), reference_omega(5, 7, 2.5), atol=1e-7)
    assert prior[0].abs().sum() == 0 and prior[:, 0].abs().sum() == 0
    assert torch.all(prior[1:, 1:].diagonal() == 1)
    assert gaussian_prior((5, 7), 2.5) is prior


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "qk_sim"}, "valid choices"),
        ({"arch": "tiny"}, "valid choices"),
        ({"attention": "full", "sigma": 0.0}, "sigma"),
        ({"attention": "n_only", "sigma": -1.0}, "sigma"),
    ],
)
def test_bad_arguments(b16, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseEncoder(b16, **kwargs)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(3, 224, 224), "B, 3, H, W"),
        (torch.randn(1, 1, 224, 224), "B, 3, H, W"),
        (torch.randn(1, 3, 8, 224), "smaller than one patch"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
    ],
)
def test_bad_images(b16, images, match):
    with pytest.raises(ValueError, match=match):
        DenseEncoder(b16)(images)
