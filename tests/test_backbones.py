"""Every CLIP family as a backbone, on random weights: the dense encoder against each tower's own forward, every
attention against an independent formulation on that family's q, k, v, and end-to-end runs.

Towers keep two blocks (the stages are per block, so more add time, not coverage); images are 32-80 px.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from naclip import DenseEncoder, Segmenter, load_clip
from naclip.clip import image_mean_std
from naclip.text import get_tokenizer, text_classifier

FAST = ["ViT-B-16-quickgelu", "EVA02-B-16", "ViT-B-16-SigLIP"]
SLOW = ["ViT-B-16-SigLIP2", "ViT-L-14"]  # SigLIP2: a 256k-token text embedding; L/14: 300M parameters
FAMILIES = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]
BLOCKS = 2


def _truncate(model: nn.Module) -> nn.Module:
    visual = model.visual
    if hasattr(visual, "trunk"):
        visual.trunk.blocks = visual.trunk.blocks[:BLOCKS]
    else:
        visual.transformer.resblocks = visual.transformer.resblocks[:BLOCKS]
    text = getattr(model, "text", model)
    text.transformer.resblocks = text.transformer.resblocks[:1]
    return model


_MODELS: dict[str, nn.Module] = {}


def family(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        model = _truncate(load_clip(name, pretrained=None))
        with torch.no_grad():  # random init leaves some weights at exact constants; make every stage matter
            for param in model.visual.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        _MODELS[name] = model
    return _MODELS[name]


def images(size: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def own_patch_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tower's own forward up to its per-token projection, patch tokens only: (B, N, D), written per family."""
    visual = model.visual
    if not hasattr(visual, "trunk"):  # open_clip ViT: its own token output, projected
        visual.output_tokens = True
        try:
            _, tokens = visual(x)
        finally:
            visual.output_tokens = False
        return tokens @ visual.proj
    trunk = visual.trunk
    feats = trunk.forward_features(x)  # timm's own embedding, blocks (with RoPE for EVA) and final norm
    if trunk.attn_pool is not None:  # SigLIP: the pool on one token at a time (attention over one token = v)
        per_token = [trunk.attn_pool(feats[:, i : i + 1]) for i in range(feats.shape[1])]
        return visual.head(trunk.head(torch.stack(per_token, dim=1)))
    return visual.head(trunk.head(trunk.fc_norm(feats[:, trunk.num_prefix_tokens :])))


def close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    cos = F.cosine_similarity(got.reshape(-1, got.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double(), -1)
    assert cos.min().item() >= 0.99999, cos.min().item()
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", FAMILIES)
def test_vanilla_encoder_equals_the_towers_own_forward(name):
    model = family(name)
    x = images((224, 224))
    with torch.no_grad():
        got = DenseEncoder(model, "vanilla", "vanilla")(x)
        ref = own_patch_features(model, x)
    close(got.reshape(2, -1, got.shape[-1]), ref)


@pytest.mark.parametrize("name", ["EVA02-B-16"])
def test_eva_class_token_projection_is_encode_image(name):
    model = family(name)
    x = images((224, 224))
    with torch.no_grad():
        enc = DenseEncoder(model, "vanilla", "vanilla")
        tokens, grid = enc.embed(x)
        pooled = enc.project(enc.last_block(enc.trunk(tokens), grid))[:, 0]
        close(pooled, model.encode_image(x))


def _dynamic_timm(arch: str, **kwargs) -> nn.Module:
    """A timm trunk that runs any image size with its own code (dynamic_img_size), as an open_clip-like tower."""
    torch.manual_seed(1)
    trunk = timm.create_model(arch, pretrained=False, depth=BLOCKS, dynamic_img_size=True, **kwargs).eval()
    with torch.no_grad():
        for param in trunk.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    tower = nn.Module()
    tower.trunk, tower.head = trunk, nn.Identity()
    return tower


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("eva02_base_patch16_clip_224", {"num_classes": 512}),
        ("vit_base_patch16_siglip_224", {"num_classes": 0}),
    ],
)
@pytest.mark.parametrize("size", [(48, 80), (64, 32)])
def test_timm_trunks_on_other_grids_follow_timm(arch, kwargs, size):
    """Positions resampled and EVA02's rotary table rebuilt for the crop's grid exactly as timm's own code does."""
    tower = _dynamic_timm(arch, **kwargs)
    x = images(size, seed=3)
    with torch.no_grad():
        enc = DenseEncoder(tower, "vanilla", "vanilla")
        tokens, grid = enc.embed(x)
        ours = tower.trunk.norm(enc.last_block(enc.trunk(tokens), grid))
        close(ours, tower.trunk.forward_features(x))


def _independent_qkv(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v of the last block and its input, from hooks on the tower's own modules and the papers' RoPE rule."""
    visual, seen = model.visual, {}
    if hasattr(visual, "trunk"):
        block = visual.trunk.blocks[-1]
        hook = block.register_forward_pre_hook(
            lambda m, a, kw: seen.update(x=a[0], rope=kw.get("rope")), with_kwargs=True
        )
        visual.trunk.forward_features(x)
        hook.remove()
        h = block.norm1(seen["x"])
        attn = block.attn
        if hasattr(attn, "q_proj"):
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = attn.qkv(h).chunk(3, dim=-1)
    else:
        block = visual.transformer.resblocks[-1]
        hook = block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        visual(x)
        hook.remove()
        h = block.ln_1(seen["x"])
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    heads = block.attn.num_heads
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if seen.get("rope") is not None:  # EVA02: rotate each (even, odd) channel pair of the patch tokens
        sin, cos = seen["rope"].chunk(2, dim=-1)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            pairs = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).flatten(-2)
            return torch.cat([t[:, :, :1], t[:, :, 1:] * cos + pairs[:, :, 1:] * sin], dim=2)

        q, k = rotate(q), rotate(k)
    return seen["x"], q, k, v


def _prior(rows: int, cols: int, sigma: float, prefix: int) -> torch.Tensor:
    pos = [(i, j) for i in range(rows) for j in range(cols)]
    n = prefix + rows * cols
    prior = torch.zeros(n, n)
    for a, (i, j) in enumerate(pos):
        for b, (m, o) in enumerate(pos):
            prior[prefix + a, prefix + b] = math.exp(-((i - m) ** 2 + (j - o) ** 2) / (2 * sigma**2))
    return prior


def _expected(attention: str, q, k, v, prior) -> torch.Tensor:
    d = q.shape[-1]

    def soft(a, b, bias=0.0):
        return ((a @ b.transpose(-2, -1)) / math.sqrt(d) + bias).softmax(-1) @ v

    if attention == "vanilla":
        return soft(q, k)
    if attention == "full":
        return soft(k, k, prior)
    if attention == "qq":
        return soft(q, q)
    if attention == "kk_sim":
        return soft(k, k)
    if attention == "csa":
        return soft(q, q) + soft(k, k)
    if attention == "value":
        return v
    c = torch.stack([q[b].norm(dim=-1)[:, :, None] * k[b].norm(dim=-1)[:, None, :] for b in range(q.shape[0])])
    return ((c.mean(dim=(1, 2, 3)) / math.sqrt(d))[:, None, None, None] * prior).softmax(-1) @ v  # n_only


@pytest.mark.parametrize("attention", ["vanilla", "full", "qq", "kk_sim", "csa", "value", "n_only"])
@pytest.mark.parametrize("name", FAMILIES)
def test_each_attention_equals_an_independent_formulation(name, attention):
    model = family(name)
    x = images((224, 224), seed=5)
    sigma = 3.0
    with torch.no_grad():
        block_input, q, k, v = _independent_qkv(model, x)
        enc = DenseEncoder(model, attention, "reduced", sigma=sigma)
        tokens, grid = enc.embed(x)
        got = enc.last_block(enc.trunk(tokens), grid)
        prior = _prior(*grid, sigma, prefix=enc.num_prefix_tokens)
        ref = enc.attn_proj(_expected(attention, q, k, v, prior))
    torch.testing.assert_close(enc.trunk(tokens), block_input, atol=1e-5, rtol=1e-5)
    close(got, ref)


@pytest.mark.parametrize("name", FAST)
def test_vanilla_attention_reproduces_the_blocks_own_attention(name):
    """q and k (EVA02: rotated) are the ones the model's attention uses: its own module gives the same output."""
    model = family(name)
    x = images((224, 224), seed=6)
    with torch.no_grad():
        enc = DenseEncoder(model, "vanilla", "reduced")
        tokens, grid = enc.embed(x)
        trunk_out = enc.trunk(tokens)
        got = enc.last_block(trunk_out, grid)
        block = enc.blocks[-1]
        if hasattr(model.visual, "trunk"):
            rope = enc.tower.rope_embedding(grid)
            kwargs = {} if rope is None else {"rope": rope}
            ref = block.attn(block.norm1(trunk_out), **kwargs)
        else:
            h = block.ln_1(trunk_out)
            ref = block.attn(h, h, h, need_weights=False)[0]
    close(got, ref)


def test_siglip_has_no_class_token_and_its_prior_covers_patches_only():
    enc = DenseEncoder(family("ViT-B-16-SigLIP"), "full", "reduced", sigma=5.0)
    tokens, grid = enc.embed(images((32, 48)))
    assert enc.num_prefix_tokens == 0 and tokens.shape[1] == grid[0] * grid[1] == 6
    prior = enc.prior(grid, tokens)
    assert prior.shape == (6, 6) and torch.all(prior.diagonal() == 1)
    with pytest.raises(ValueError, match="needs a class token"):
        enc.require_class_token("feature surgery")


@pytest.mark.parametrize("name", FAMILIES)
def test_segmenter_end_to_end(name):
    model = family(name)
    tokenizer = get_tokenizer(name, random_weights=True)
    seg = Segmenter(
        model,
        ["sky", "tree", "car"],
        templates=["a {}."],
        slide_crop=32,
        slide_stride=16,
        tokenizer=tokenizer,
        pamr=True,
    )
    labels = seg.predict(images((40, 56), n=1))
    assert labels.shape == (1, 40, 56) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2}


def test_text_tokenizers_per_family():
    assert isinstance(get_tokenizer("EVA02-B-16"), open_clip.tokenizer.SimpleTokenizer)
    stand_in = get_tokenizer("ViT-B-16-SigLIP", random_weights=True)
    tokens = stand_in(["a photo of a cat"])
    assert tokens.shape == (1, 64) and int(tokens.max()) < 32000
    with pytest.raises(ValueError, match="vocabulary"):
        text_classifier(family("ViT-B-16-SigLIP"), ["cat"], ["a {}"])


@pytest.mark.parametrize("name", ["EVA02-B-16", "ViT-B-16-SigLIP"])
def test_quick_gelu_on_a_timm_tower_fails_with_one_line(name):
    with pytest.raises(ValueError, match=r"quick_gelu=true has no meaning .* timm"):
        load_clip(name, None, quick_gelu=True)


def test_mean_std_come_from_the_family():
    assert image_mean_std("ViT-B-16-SigLIP", None) == ((0.5,) * 3, (0.5,) * 3)
    assert image_mean_std("ViT-L-14", "laion2b_s32b_b82k") == ((0.5,) * 3, (0.5,) * 3)
    assert image_mean_std("ViT-B-16-SigLIP2", "webli") == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["b16_dfn", "eva02_b16", "siglip_b16"])
def test_cli_run_on_synthetic_data(backbone, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "NACLIP_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    args = [
        "dataset=synthetic",
        f"backbone={backbone}",
        "backbone.pretrained=null",
        "max_images=1",
        "num_workers=0",
        f"output_root={tmp_path}",
    ]
    done = subprocess.run([sys.executable, "-m", "naclip.run", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(Path(tmp_path).rglob("result.json"))


WEIGHTS = [  # (model, tag, env var naming a local file of that tag's weights): real weights, skipped without
    ("ViT-B-16", "laion2b_s34b_b88k", "NACLIP_LAION_B16"),
    ("ViT-B-16", "datacomp_xl_s13b_b90k", "NACLIP_DATACOMP_B16"),
    ("ViT-B-16-quickgelu", "dfn2b", "NACLIP_DFN_B16"),
    ("ViT-B-16-quickgelu", "metaclip_fullcc", "NACLIP_METACLIP_B16"),
    ("ViT-L-14", "laion2b_s32b_b82k", "NACLIP_LAION_L14"),
    ("EVA02-B-16", "merged2b_s8b_b131k", "NACLIP_EVA02_B16"),
    ("ViT-B-16-SigLIP", "webli", "NACLIP_SIGLIP_B16"),
    ("ViT-B-16-SigLIP2", "webli", "NACLIP_SIGLIP2_B16"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "tag", "env"), WEIGHTS)
def test_real_weights_segment_the_demo_image(name, tag, env):
    path = os.environ.get(env)
    if not path or not Path(path).is_file():
        pytest.skip(f"no {name} weights: set {env}=/path/to/open_clip weights file")
    import reference_pipeline as ref

    model = load_clip(name, path)
    rgb, label = ref.demo_sample()
    mean, std = (torch.tensor(v)[:, None, None] for v in image_mean_std(name, tag))
    x = (torch.from_numpy(ref.resize(rgb, 336)).permute(2, 0, 1).float() / 255 - mean) / std
    names = ref.class_names("voc21")
    seg = Segmenter(model, names, tokenizer=get_tokenizer(name), prob_thd=0.1)
    pred = seg.predict(x[None], out_size=label.shape)[0]
    ious = [v for v in ref.iou_percent([pred.numpy()], [label], len(names)) if v is not None]
    assert sum(ious) / len(ious) >= 30, ious  # random weights score near 0 on this image


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("method", ["gem", "clip_surgery"])
def test_methods_tapping_earlier_blocks_run_on_every_family(name, method):
    """GEM and CLIP Surgery compute through the tower's own norms and layer scales (EVA's gammas, SigLIP's ls1)."""
    model = family(name)
    seg_kwargs = {"templates": ["a photo of a {}."], "slide_crop": 0, "tokenizer": get_tokenizer(name, True)}
    if method == "clip_surgery" and "SigLIP" in name:
        with pytest.raises(ValueError, match="needs a class token, which this backbone"):
            Segmenter(model, ["sky", "tree"], method=method, method_options={"depth": 2}, **seg_kwargs)
        return
    seg = Segmenter(model, ["sky", "tree"], method=method, method_options={"depth": 2}, **seg_kwargs)
    base = Segmenter(model, ["sky", "tree"], attention="vanilla", arch="vanilla", **seg_kwargs)
    x = images((48, 64), n=1)
    with torch.no_grad():
        got, plain = seg.logits(x), base.logits(x)
    assert got.shape == plain.shape == (1, 2, 48, 64) and torch.isfinite(got).all()
    assert (got - plain).abs().max() > 1e-4  # the method's own path, not CLIP's last block
