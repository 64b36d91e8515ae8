"""Proxy models (timm) and the methods that use them, ProxyCLIP and CASS, against formulations written from their
papers and code descriptions; random weights, small grids."""

from __future__ import annotations

import itertools
import socket

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from composing import compose_config
from processes import run_python

from naclip import FusedSegmenter, Segmenter, config
from naclip.clip import OPENAI_MEAN, OPENAI_STD
from naclip.methods import TrunkState
from naclip.methods.cass import distilled_graph, proxy_keys, proxy_pixels, query_clusters
from naclip.methods.proxyclip import proxy_attention
from naclip.proxy import Proxy, ProxyWeightsUnavailableError, clip_to_pixels, list_proxies, load_proxy

NAMES = ["sky", "tree, bush", "car"]


def _proxy(arch: str) -> Proxy:
    torch.manual_seed(1)
    return load_proxy(arch, None, name=arch)


@pytest.fixture(scope="module")
def tiny() -> Proxy:
    return _proxy("vit_small_patch16_224.dino")


@pytest.fixture(scope="module")
def base() -> Proxy:
    return _proxy("vit_base_patch16_224.dino")


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


def images(*sizes: tuple[int, int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [clip_normalize(torch.rand(3, h, w, generator=gen)) for h, w in sizes]


# ---------------------------------------------------------------- ProxyCLIP's attention


def reference_proxy_attention(features: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Per crop: cosine similarities of the patch features, minus β × their mean, times γ; entries below 0
    excluded; softmax over each row of what is left."""
    n, rows, cols, c = features.shape
    out = np.zeros((n, rows * cols, rows * cols))
    for b in range(n):
        f = features[b].reshape(-1, c)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        s = f @ f.T
        s = (s - beta * s.mean()) * gamma
        for i in range(len(s)):
            keep = s[i] >= 0
            e = np.where(keep, np.exp(s[i] - s[i][keep].max()), 0.0)
            out[b, i] = e / e.sum()
    return out


@pytest.mark.parametrize(("beta", "gamma"), [(1.2, 3.0), (0.5, 1.0)])
def test_proxy_attention_matches_its_formula(beta, gamma):
    feats = torch.randn(2, 3, 4, 8, dtype=torch.float64) + 0.5  # positive mean: some similarities fall below 0
    got = proxy_attention(feats, beta, gamma)
    want = reference_proxy_attention(feats.numpy(), beta, gamma)
    assert (want == 0).any() and (want > 0.01).any()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    # per-crop statistics: a crop's attention does not depend on the other crops of its batch
    np.testing.assert_allclose(proxy_attention(feats[1:], beta, gamma).numpy(), want[1:], rtol=1e-10, atol=1e-12)


def test_proxyclip_features_equal_an_independent_formulation(b32, tiny):
    """CLIP's last-block values (from its own block input, hooked), bilinearly resized to the proxy's grid, mixed by
    the proxy attention, CLIP's out_proj, ln_post and proj; the proxy on ImageNet-normalized pixels (timm)."""
    image = images((224, 224))[0][None]
    seg = Segmenter(b32, NAMES, method="proxyclip", method_options={"proxy": tiny}, slide_crop=0)
    got = seg.method.features(seg.trunk(image))  # (1, 14, 14, D) on the proxy's grid

    visual = b32.visual
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        visual(image)
    hook.remove()
    x = seen["x"] if getattr(visual.transformer, "batch_first", True) else seen["x"].transpose(0, 1)
    block = visual.transformer.resblocks[-1]
    c = x.shape[-1]
    v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)[..., 2 * c :]  # (1, 50, C)
    heads = block.attn.num_heads
    v = v[0, 1:].reshape(7, 7, heads, c // heads).permute(2, 3, 0, 1)  # (h, d, 7, 7)
    v = F.interpolate(v, size=(14, 14), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    pixels = image * torch.tensor(OPENAI_STD)[:, None, None] + torch.tensor(OPENAI_MEAN)[:, None, None]
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
    with torch.no_grad():
        feats = tiny.model.forward_features(imagenet)[:, 1:].reshape(1, 14, 14, -1)
        attn = torch.from_numpy(reference_proxy_attention(feats.double().numpy(), 1.2, 3.0)).float()[0]
        out = torch.cat([attn @ v[h] for h in range(heads)], dim=-1)  # (196, C), heads concatenated
        want = (visual.ln_post(block.attn.out_proj(out)) @ visual.proj).reshape(1, 14, 14, -1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the proxy's input and grid


def test_proxyclip_input_is_imagenet_normalized_pixels(tiny):
    pixel = torch.tensor([0.2, 0.5, 0.8])
    crop = clip_normalize(pixel[:, None, None].expand(3, 2, 2))
    got = tiny.normalize(clip_to_pixels(crop, OPENAI_MEAN, OPENAI_STD))[:, 0, 0]
    want = torch.tensor([(0.2 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.8 - 0.406) / 0.225])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cass_input_is_the_authors_8_bit_image():
    """CASS maps a CLIP-normalized crop through ImageNet's inverse normalization (blue std 0.255), truncates to
    8 bits, and squares it at its short side."""
    pixel = torch.tensor([0.2, 0.5, 0.8])
    crop = clip_normalize(pixel[:, None, None].expand(3, 4, 6))
    got = proxy_pixels(crop)
    assert got.shape == (3, 4, 4)
    x = (pixel - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    want = torch.floor((x * torch.tensor([0.229, 0.224, 0.255]) + torch.tensor([0.485, 0.456, 0.406])) * 255) / 255
    torch.testing.assert_close(got[:, 0, 0], want, rtol=0, atol=1e-6)
    assert proxy_pixels(crop, 7).shape == (3, 7, 7)


def test_default_grid_equals_timm_and_other_grids_resize_positions_the_dino_way(tiny):
    """At 224² the proxy is timm's own forward; at 64×96 its position embeddings are resized with DINO's
    bicubic scale factors ((rows + 0.1)/g0, (cols + 0.1)/g0), not timm's exact-size resize."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tiny(x).features.flatten(1, 2), tiny.model.forward_features(x)[:, 1:])
    x = torch.randn(1, 3, 64, 96)
    fixed = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=(64, 96))
    state = {k: v for k, v in tiny.model.state_dict().items() if k != "pos_embed"}
    grid = tiny.model.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(4.1 / 14, 6.1 / 14), mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (4, 6)
    state["pos_embed"] = torch.cat([tiny.model.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    fixed.load_state_dict(state)
    fixed.eval()
    with torch.no_grad():
        got = tiny(x)
        want = fixed.forward_features(x)[:, 1:].reshape(1, 4, 6, -1)
        timm_own = tiny.model.forward_features(x)[:, 1:].reshape(1, 4, 6, -1)
    assert got.grid == (4, 6)
    torch.testing.assert_close(got.features, want, rtol=1e-4, atol=1e-5)
    assert (timm_own - want).abs().max() > 1e-3  # the rule matters


def test_partial_patches_are_dropped(tiny):
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        torch.testing.assert_close(tiny(x).features, tiny(x[..., :64, :96]).features)


# ---------------------------------------------------------------- CASS's graph step


def exact_rank_10(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(g)
    return u[:, :10], s[:10], vt[:10]


def reference_distilled_graph(
    k: np.ndarray, pk: np.ndarray, scale_factor: float, k_eigen: int, stretch: bool, svd=exact_rank_10
):
    """From CASS's description: key graphs KKᵀ/√d per head; head cost 1 − Σ|sorted p − sorted c| over the top
    eigenvalues (L2 then L1 normalized); the assignment of least total cost (brute force here); each proxy graph
    of the pair replaced by its rank-10 SVD (`svd`, called for CLIP head 0 first; singular values stretched to
    [0.5·min, 1.5·max]), diagonal zeroed, rescaled to the CLIP graph's range, and blended:
    (w·f·P + C)/(w·f + 1), w = 1 − cost."""
    h, _, d = k.shape
    clip_g = k @ k.transpose(0, 2, 1) / np.sqrt(d)
    prox_g = pk @ pk.transpose(0, 2, 1) / np.sqrt(d)

    def spectrum(g):
        ev = np.sort(np.linalg.eigvalsh(g))[::-1][:k_eigen]
        ev = ev / np.linalg.norm(ev)
        return np.sort(ev / np.abs(ev).sum())

    cost = np.array([[1 - np.abs(spectrum(prox_g[i]) - spectrum(clip_g[j])).sum() for j in range(h)] for i in range(h)])
    best = min(itertools.permutations(range(h)), key=lambda p: sum(cost[i, p[i]] for i in range(h)))
    out = np.zeros_like(clip_g)
    for i in range(h):
        j = best[i]
        u, s, vt = svd(prox_g[j])
        if stretch:
            s = (s - s.min()) / (s.max() - s.min()) * (1.5 * s.max() - 0.5 * s.min()) + 0.5 * s.min()
        p = u @ np.diag(s) @ vt
        np.fill_diagonal(p, 0)
        c = clip_g[i]
        p = (p - p.min()) / (p.max() - p.min()) * (c.max() - c.min()) + c.min()
        w = (1 - np.float32(cost[i, j])) * scale_factor
        out[i] = (w * p + c) / (w + 1)
    return out


@pytest.mark.parametrize("stretch", [True, False])
def test_cass_graph_step_matches_its_description(stretch):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 12, 4, generator=gen, dtype=torch.float64)
    pk = torch.randn(3, 12, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    got = distilled_graph(k, pk, 10.0, 5, stretch)
    want = reference_distilled_graph(k.numpy(), pk.numpy(), 10.0, 5, stretch)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-8)


def test_cass_randomized_svds_draw_as_the_authors_after_seed_42():
    """The authors' code calls torch.svd_lowrank(q=10) on the global generator, which mmengine seeds with 42, one
    call per head pair, CLIP head 0 first; each crop starts from that seed and leaves the caller's state alone."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 24, 16, generator=gen, dtype=torch.float64)  # rank 16 > 10: randomized != exact
    pk = torch.randn(3, 24, 16, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    state = torch.get_rng_state()
    got = distilled_graph(k, pk, 10.0, 5, True).numpy()
    assert torch.equal(torch.get_rng_state(), state)

    def seeded_lowrank(g: np.ndarray):
        u, s, v = torch.svd_lowrank(torch.from_numpy(g), q=10)
        return u.numpy(), s.numpy(), v.numpy().T

    torch.manual_seed(42)
    want = reference_distilled_graph(k.numpy(), pk.numpy(), 10.0, 5, True, svd=seeded_lowrank)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    exact = reference_distilled_graph(k.numpy(), pk.numpy(), 10.0, 5, True)
    assert np.abs(exact - want).max() > 1e-3 * np.abs(want).max()  # the draws matter at this rank


def reference_vit_keys(net: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Last-block keys (B, heads, N, d) of a timm DINO ViT at its default grid, every step written out as the
    original DINO code computes it: (q·kᵀ)·scale, softmax, ·v, projection; pre-norm blocks with a GELU MLP."""
    x = net.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + net.pos_embed
    for i, blk in enumerate(net.blocks):
        a = blk.attn
        b, n, c = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        if i == len(net.blocks) - 1:
            return qkv[1]
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * a.scale).softmax(dim=-1)
        x = x + a.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        x = x + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))
    raise AssertionError("no blocks")


def test_cass_proxy_keys_are_bitwise_the_original_dino_computation(tiny):
    """CASS rounds the proxy's keys to fp16 and pairs heads by a discrete assignment, so a last-bit difference
    (timm's fused attention kernel) can flip a pair: its keys come from the step-by-step attention."""
    crop = clip_normalize(torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(3)))
    state = TrunkState(x=crop[None], grid=(14, 14), crops=crop[None])
    keys, grid = proxy_keys(tiny, state, None)[0]
    with torch.no_grad():
        want = reference_vit_keys(tiny.model, tiny.normalize(proxy_pixels(crop))[None])[0, :, 1:]
    assert grid == (14, 14) and keys.dtype == torch.float16
    assert torch.equal(keys, want.half())
    assert any(b.attn.fused_attn for b in tiny.model.blocks) == timm.layers.use_fused_attn()  # restored


def test_cass_query_clusters_cut_the_ward_tree_at_h():
    a = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    near = F.normalize(torch.tensor([1.0, 0.05, 0.0]), dim=0)
    far = torch.tensor([0.0, 0.0, 1.0])
    clusters = query_clusters(torch.stack([a, near, far]), 0.1)
    assert clusters[0] == clusters[1] != clusters[2] and sorted(set(clusters)) == [0, 1]
    assert len(set(query_clusters(torch.stack([a, near, far]), 0.0))) == 3


# ---------------------------------------------------------------- pipeline: batches, fused sweeps


@pytest.mark.slow
@pytest.mark.parametrize("method", ["proxyclip", "cass"])
def test_labels_do_not_depend_on_batching(b16, base, method):
    imgs = images((64, 96), (64, 64))
    common = {"slide_crop": 64, "slide_stride": 32, "method": method, "method_options": {"proxy": base}}
    one = Segmenter(b16, NAMES, crop_batch_size=1, **common)
    many = Segmenter(b16, NAMES, crop_batch_size=16, **common)
    a, b = one.logits_list(imgs), many.logits_list(imgs)
    for x, y in zip(a, b, strict=True):
        assert torch.isfinite(x).all() and x.abs().mean() > 1e-3
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    labels = [torch.stack(many.predict_list([im])) for im in imgs]  # one image per call
    assert all((lb[0] == p).all() for lb, p in zip(labels, many.predict_list(imgs), strict=True))


@pytest.mark.slow
def test_cass_does_not_depend_on_batching_to_the_last_bit(b16, base):
    """CASS runs one crop per trunk forward whatever crop_batch_size says: its head pairing can tie exactly, and
    batched products (two 224² crops) round CLIP's keys differently in the last bit."""
    image = images((224, 336))
    common = {"slide_crop": 224, "slide_stride": 112, "method": "cass", "method_options": {"proxy": base}}
    one = Segmenter(b16, NAMES, crop_batch_size=1, **common).logits_list(image)[0]
    many = Segmenter(b16, NAMES, crop_batch_size=16, **common).logits_list(image)[0]
    assert torch.isfinite(one).all() and torch.equal(one, many)


@pytest.mark.slow
def test_fused_variants_equal_alone_and_share_one_proxy_pass(b16, tiny, monkeypatch):
    imgs = images((64, 96))
    variants = [{"beta": 1.2, "gamma": 3.0}, {"beta": 0.8, "gamma": 2.0}]
    segs = [
        Segmenter(b16, NAMES, slide_crop=64, slide_stride=32, method="proxyclip", method_options={"proxy": tiny, **v})
        for v in variants
    ]
    calls = []
    forward = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    fused = FusedSegmenter(segs).predict_list(imgs)
    assert len(calls) == 1  # one chunk, one proxy pass for both variants
    for seg, labels in zip(segs, fused, strict=True):
        assert (seg.predict_list(imgs)[0] == labels[0]).all()
    assert not torch.equal(segs[0].logits_list(imgs)[0], segs[1].logits_list(imgs)[0])


# ---------------------------------------------------------------- configuration and offline weights


@pytest.mark.parametrize(
    ("method", "dataset", "expected"),
    [
        ("proxyclip", "voc21", (336, 336, 112, 40.0, 0.2, "proxyclip_voc21")),
        ("proxyclip", "pc60", (336, 336, 112, 40.0, 0.15, "pc60")),
        ("proxyclip", "coco_object", (336, 336, 112, 40.0, 0.25, "proxyclip_coco_object")),
        ("proxyclip", "cityscapes", (448, 224, 112, 40.0, 0.0, "cityscapes")),
        ("proxyclip", "ade", (448, 336, 112, 40.0, 0.0, "ade")),
        ("cass", "voc21", (336, 0, 112, 40.0, 0.1, "voc21")),
        ("cass", "cityscapes", (560, 224, 112, 40.0, 0.0, "cityscapes")),
    ],
)
def test_method_presets_select_their_proxy_and_protocol(method, dataset, expected):
    cfg = compose_config([f"method={method}", f"dataset={dataset}"])
    config.validate(cfg)
    d = cfg.dataset
    assert (d.short_side, d.slide_crop, d.slide_stride, d.logit_scale, d.prob_thd, d.class_names) == expected
    assert (cfg.proxy.name, cfg.proxy.model, cfg.proxy.pretrained) == ("dino_b8", "vit_base_patch8_224.dino", "timm")
    if method == "cass":
        assert cfg.refine.name == "none"  # the authors evaluate with --pamr off
        assert cfg.cass.whole_image_semantics == (dataset != "cityscapes")


def test_every_listed_proxy_is_a_timm_model_with_weights():
    assert list_proxies()[0] == "none"
    for name in list_proxies()[1:]:
        cfg = compose_config(["method=proxyclip", f"proxy={name}"])
        assert cfg.proxy.model in timm.list_pretrained() and cfg.proxy.pretrained == "timm"


def test_a_proxy_with_a_clip_only_method_is_refused():
    with pytest.raises(ValueError, match="proxy=dino_b8 is used only by"):
        config.validate(compose_config(["proxy=dino_b8"]))


def test_offline_proxy_weights_fail_fast_naming_proxy_pretrained(tmp_path, monkeypatch):
    attempts: list[object] = []

    def refuse(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError("refused")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("naclip.proxy._cached_timm_file", lambda hub_id: None)
    with pytest.raises(ProxyWeightsUnavailableError) as err:
        load_proxy("vit_base_patch8_224.dino", "timm")
    message = str(err.value)
    assert len(attempts) == 1 and "\n" not in message
    assert "proxy.pretrained=null" in message and "vit_base_patch8_224.dino" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProxyWeightsUnavailableError, match="HF_HUB_OFFLINE"):
        load_proxy("vit_base_patch8_224.dino", "timm")


def test_bad_proxy_settings_are_one_line_errors(tmp_path, b32):
    with pytest.raises(ValueError, match="unknown timm model"):
        load_proxy("no_such_vit", None)
    with pytest.raises(ValueError, match="does not exist"):
        load_proxy("vit_small_patch16_224.dino", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="needs a proxy model"):
        Segmenter(b32, NAMES, method="proxyclip")


def test_local_weights_file_loads(tmp_path, tiny):
    from safetensors.torch import save_file

    path = tmp_path / "proxy.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_proxy("vit_small_patch16_224.dino", str(path))
    torch.testing.assert_close(loaded.model.pos_embed, tiny.model.pos_embed, rtol=0, atol=0)


def test_method_attention_maps_draw_the_proxy_guided_attention(b32, tiny):
    from naclip.viz import method_attention_maps

    image = images((64, 64))[0]
    seg = Segmenter(b32, NAMES, method="proxyclip", method_options={"proxy": tiny}, slide_crop=0)
    maps = method_attention_maps(seg, image, [(0, 0), (3, 2)])
    assert maps.shape == (2, 4, 4)  # the proxy's grid (patch 16 on 64 px), not CLIP's 2x2
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))
    with torch.no_grad():
        feats = tiny(tiny.normalize(clip_to_pixels(image[None], OPENAI_MEAN, OPENAI_STD))).features
    want = reference_proxy_attention(feats.double().numpy(), 1.2, 3.0)[0]
    np.testing.assert_allclose(maps[1].flatten().numpy(), want[3 * 4 + 2], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        method_attention_maps(seg, image, [(4, 0)])
    # patches on CLIP's 2x2 grid query the proxy cell holding their centre: (1, 0) → centre (1.5, 0.5) → (3, 1)
    on_clip_grid = method_attention_maps(seg, image, [(1, 0), (0, 1)], grid=(2, 2))
    torch.testing.assert_close(on_clip_grid, method_attention_maps(seg, image, [(3, 1), (1, 3)]), rtol=0, atol=0)


# ---------------------------------------------------------------- torchrun


def _run_module(args: list[str], root, port: int | None = None) -> dict:
    """`python [-m torch.distributed.run ...] -m naclip.run args` in `root`; its result.json."""
    import json

    launcher = [] if port is None else ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    out = root / ("ranked" if port else "single")
    run_python([*launcher, "-m", "naclip.run", *args, f"hydra.run.dir={out}"], root)
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_torchrun_with_a_proxy_equals_one_process(tmp_path):
    # β 0.5: a random proxy's patch features are nearly parallel, and with the published β 1.2 every shifted
    # similarity of a row is negative (NaN rows, as in the authors' code); 0.5 keeps every row finite
    overrides = [
        "method=proxyclip",
        "proxy=dino_b16",
        "proxy.pretrained=null",
        "backbone.pretrained=null",
        "dataset=synthetic",
        "backbone=b32",
        "dataset.num_images=3",
        "num_workers=0",
        "seed=3",
        "proxyclip.beta=0.5",
        "force=true",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranked = _run_module(overrides, tmp_path, port)
    single = _run_module(overrides, tmp_path)
    assert (ranked["world_size"], single["world_size"], ranked["num_images"]) == (2, 1, 3)
    assert any(iou > 0 for iou in single["per_class_iou"].values())
    assert ranked["per_class_iou"] == single["per_class_iou"]
    assert (ranked["miou"], ranked["pixel_acc"]) == (single["miou"], single["pixel_acc"])
