"""GEM and CLIP Surgery (naclip.methods.gem, naclip.methods.clip_surgery): each against a plain re-derivation from
the papers' and authors' code's description on the raw open_clip modules (never naclip's encoder), batch invariance,
fused = alone bit for bit, their config nodes and protocols, and the README's own-method plug-in example."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from composing import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from processes import readme_blocks, run_readme_example

from naclip import DenseEncoder, FusedSegmenter, Segmenter, config
from naclip.encoder import Taps
from naclip.methods import METHODS, build_method
from naclip.tables import methods_table

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("isolated_cached")
BENCHMARKS = ("voc21", "voc20", "pc60", "pc59", "coco_object", "coco_stuff", "cityscapes", "ade")
NAMES = [["sky"], ["tree", "bush"], ["car"], ["road"]]
ONE = {"templates": ["a photo of a {}."]}  # one prompt per name keeps the text tower cheap


# ----------------------------------------------------------------------------------- plain re-derivations
def tower_input(model, images: torch.Tensor) -> torch.Tensor:
    """Patch + class embeddings with the pretrained positions (the grid is the pretraining one) and ln_pre."""
    vis = model.visual
    x = vis.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + vis.positional_embedding
    return vis.ln_pre(x)


def run_block(model, block: int, x: torch.Tensor) -> torch.Tensor:
    blk = model.visual.transformer.resblocks[block]
    return blk(x) if getattr(model.visual.transformer, "batch_first", True) else blk(x.transpose(0, 1)).transpose(0, 1)


def heads_qkv(model, block: int, x: torch.Tensor):
    """LN1 of x, and q, k, v split into heads (B, h, N, d), from the block's packed in-projection."""
    attn = model.visual.transformer.resblocks[block].attn
    h = model.visual.transformer.resblocks[block].ln_1(x)
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # noqa: E731
    return h, split(q), split(k), split(v)


def merge_out(model, block: int, out: torch.Tensor) -> torch.Tensor:
    return model.visual.transformer.resblocks[block].attn.out_proj(out.transpose(1, 2).flatten(2))


def softmax_attention(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    logits = (a @ b.transpose(-2, -1)) * scale
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def with_second_stream(model, images: torch.Tensor, depth: int, step) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's own stream through every block, and a second one that starts as its input to block L-depth+1 and
    from there adds `step(i, x)` per block (x: the original stream entering block i; no FFN): (x, path)."""
    x = tower_input(model, images)
    blocks = len(model.visual.transformer.resblocks)
    path = None
    for i in range(blocks):
        if i == blocks - (depth - 1):
            path = x
        if path is not None:
            path = path + step(i, x)
        x = run_block(model, i, x)
    return x, path


def reference_gem(model, images, depth=7, iterations=1, temperature=None) -> torch.Tensor:
    """GEM (Bousselham et al.): from block L-depth+1 on, a second stream adds, without FFN, the out-projection of
    the mean over s ∈ {v, k, q} of softmax(τ ŝ ŝᵀ) v, ŝ = s L2-normalised and refined `iterations` times
    (s ← softmax(τ ŝ ŝᵀ) ŝ), τ = mean_tokens ‖LN1(x)‖ / √d unless fixed; q, k, v from the original stream."""

    def step(i: int, x: torch.Tensor) -> torch.Tensor:
        h, q, k, v = heads_qkv(model, i, x)
        tau = temperature or (h.norm(dim=-1).mean(dim=-1) / math.sqrt(q.shape[-1]))[:, None, None, None]
        outs = []
        for s in (v, k, q):
            for _ in range(iterations):
                s = F.normalize(s, dim=-1)
                s = softmax_attention(s, s, tau) @ s
            s = F.normalize(s, dim=-1)
            outs.append(softmax_attention(s, s, tau) @ v)
        return merge_out(model, i, (outs[0] + outs[1] + outs[2]) / 3)

    _, path = with_second_stream(model, images, depth, step)
    return model.visual.ln_post(path) @ model.visual.proj  # (B, 1+N, D)


def reference_surgery(model, images, classifier, depth=7) -> torch.Tensor:
    """CLIP Surgery (Li et al.): v-v path softmax(v vᵀ/√d) v from block L-depth+1 on (no FFN), class token from
    CLIP's own output; then the authors' element-wise feature surgery: f ⊙ t_q weighted by w (from the class
    token's softmax(2 f₀·t), divided by its mean), minus its mean over the queries, summed over channels."""

    def step(i: int, x: torch.Tensor) -> torch.Tensor:
        _, _, _, v = heads_qkv(model, i, x)
        return merge_out(model, i, softmax_attention(v, v, 1 / math.sqrt(v.shape[-1])) @ v)

    x, path = with_second_stream(model, images, depth, step)
    tokens = torch.cat([x[:, :1], path[:, 1:]], dim=1)
    f = F.normalize(model.visual.ln_post(tokens) @ model.visual.proj, dim=-1)  # (B, 1+N, D)
    prob = (2 * f[:, :1] @ classifier.T).softmax(-1)  # (B, 1, Q)
    w = prob / prob.mean(-1, keepdim=True)
    feats = f[:, :, None, :] * classifier[None, None] * w[:, :, :, None]  # (B, 1+N, Q, D)
    return (feats - feats.mean(2, keepdim=True)).sum(-1)  # (B, 1+N, Q)


def patches(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens[:, 1:].reshape(tokens.shape[0], *grid, -1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "options", [{}, {"depth": 3}, {"iterations": 2}, {"iterations": 0, "temperature": 3.0}, {"depth": 13}]
)
def test_gem_matches_its_formula(b32, images, options):
    seg = Segmenter(b32, NAMES, method="gem", method_options=options, slide_crop=0, **ONE)
    with torch.no_grad():
        state = seg.trunk(images)
        got = seg.method.features(state)
        want = patches(reference_gem(b32, images, **options), state.grid)
        logits = seg.patch_logits(images)
    assert got.shape == want.shape == (2, 7, 7, 512)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    cos = F.normalize(want, dim=-1) @ seg.classifier.T
    torch.testing.assert_close(logits, cos.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)


def test_gem_differs_from_clip_and_its_options_matter(b32, images):
    with torch.no_grad():
        base = reference_gem(b32, images)
        assert not torch.allclose(base, reference_gem(b32, images, depth=3), atol=1e-3)
        assert not torch.allclose(base, reference_gem(b32, images, temperature=0.5), atol=1e-3)


@pytest.mark.parametrize("depth", [7, 2])
def test_clip_surgery_matches_its_formula(b32, images, depth):
    seg = Segmenter(b32, NAMES, method="clip_surgery", method_options={"depth": depth}, slide_crop=0, **ONE)
    with torch.no_grad():
        got = seg.patch_logits(images)
        want = reference_surgery(b32, images, seg.classifier, depth)[:, 1:]
    want = want.transpose(1, 2).reshape(2, -1, 7, 7)
    assert got.shape == (2, 5, 7, 7)  # one logit per query name (tree and bush both)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert want.abs().max() > 1e-4  # compared at a magnitude that matters
    torch.testing.assert_close(got.mean(dim=1), torch.zeros(2, 7, 7), rtol=0, atol=1e-6)  # surgery removes the mean


def test_bad_options_are_one_clear_error(b32):
    with pytest.raises(ValueError, match=r"gem\.depth must be in"):
        Segmenter(b32, NAMES, method="gem", method_options={"depth": 1})
    with pytest.raises(ValueError, match=r"clip_surgery\.depth must be in"):
        Segmenter(b32, NAMES, method="clip_surgery", method_options={"depth": 14})
    with pytest.raises(TypeError):
        Segmenter(b32, NAMES, method="gem", method_options={"dept": 3})


# ------------------------------------------------------------------------------------- batching, fusing
def photos() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(3, 64, 96, generator=gen), torch.randn(3, 80, 64, generator=gen)]


@pytest.mark.parametrize("method", ["gem", "clip_surgery"])
def test_same_labels_whatever_the_batching(b32, method):
    kwargs = {"method": method, "slide_crop": 64, "slide_stride": 32, **ONE}
    ims = photos()
    together = Segmenter(b32, NAMES, crop_batch_size=64, **kwargs)
    one_by_one = Segmenter(b32, NAMES, crop_batch_size=1, **kwargs)
    batched, batched_logits = together.predict_list(ims), together.logits_list(ims)
    for i, image in enumerate(ims):
        assert torch.equal(one_by_one.predict_list([image])[0], batched[i])
        torch.testing.assert_close(one_by_one.logits_list([image])[0], batched_logits[i])


def test_fused_equals_each_variant_alone_bit_for_bit(b32, tmp_path):
    variants = [
        {"method": "gem", "method_options": {"depth": 4}},
        {"method": "clip_surgery"},
        {"attention": "full", "arch": "reduced"},
        {"method": "gem", "method_options": {"iterations": 2}},
    ]
    fused = FusedSegmenter.create(b32, NAMES, variants, cache_dir=tmp_path, slide_crop=64, slide_stride=32, **ONE)
    ims = photos()
    logits, labels = fused.logits_list(ims), fused.predict_list(ims)
    for v, variant in enumerate(fused.variants):
        alone = variant.logits_list(ims)
        assert all(torch.equal(a, b) for a, b in zip(alone, logits[v], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(variant.predict_list(ims), labels[v], strict=True))


# ------------------------------------------------------------------------ position embeddings of other grids
def embedded(model, images: torch.Tensor, patch_pos: torch.Tensor) -> torch.Tensor:
    """Patch + class embeddings with the given patch positions (rows·cols, C) and the class token's own, ln_pre."""
    vis = model.visual
    x = vis.conv1(images).flatten(2).transpose(1, 2)
    pos = torch.cat([vis.positional_embedding[:1], patch_pos])
    return vis.ln_pre(torch.cat([vis.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + pos)


def pretrained_grid(model) -> torch.Tensor:
    """The pretrained patch positions as a (1, C, g0, g0) image."""
    pos = model.visual.positional_embedding[1:]
    side = math.isqrt(pos.shape[0])
    return pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)


def as_tokens(grid_image: torch.Tensor) -> torch.Tensor:
    return grid_image[0].flatten(1).T  # (C, rows, cols) → (rows·cols, C)


def gem_positions(model, grid: tuple[int, int], square: bool) -> torch.Tensor:
    """GEM's code (gem_utils.resample_abs_pos_embed, timm's function): bicubic with antialiasing to the exact grid,
    the pretrained positions kept whenever the token count matches. Built with timm's own function."""
    from timm.layers import resample_abs_pos_embed

    pos = model.visual.positional_embedding
    if grid[0] * grid[1] == pos.shape[0] - 1:
        return pos[1:]
    return resample_abs_pos_embed(pos[None], list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=True)[
        0, 1:
    ]


def surgery_positions(model, grid: tuple[int, int], square: bool) -> torch.Tensor:
    """CLIP Surgery's code: F.interpolate(..., (side, side), mode="bilinear") of the pretrained grid (its only case
    is square; naclip takes the exact (rows, cols) for other grids)."""
    return as_tokens(F.interpolate(pretrained_grid(model), size=grid, mode="bilinear", align_corners=False))


def naclip_positions(model, grid: tuple[int, int], square: bool) -> torch.Tensor:
    """NACLIP's published rule: the pretrained positions for a square image of g0·g0 cells, otherwise bicubic by the
    factors ((rows + 0.1) / g0, (cols + 0.1) / g0), no size given."""
    image = pretrained_grid(model)
    if square and grid[0] * grid[1] == image.shape[-2] * image.shape[-1]:
        return model.visual.positional_embedding[1:]
    scale = ((grid[0] + 0.1) / image.shape[-2], (grid[1] + 0.1) / image.shape[-1])
    image = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False)
    assert tuple(image.shape[-2:]) == grid
    return as_tokens(image)


RULES = {"gem": gem_positions, "clip_surgery": surgery_positions, None: naclip_positions}


@pytest.mark.parametrize(
    ("method", "size"),
    [
        ("gem", (448, 448)),
        ("gem", (224, 320)),
        ("clip_surgery", (320, 320)),
        ("clip_surgery", (224, 320)),
        (None, (448, 448)),
        (None, (224, 320)),
    ],
)
def test_each_method_embeds_crops_with_its_authors_position_rule(b32, method, size):
    """GEM's crops (448 in its protocol) get antialiased-bicubic positions, CLIP Surgery's bilinear ones, and every
    other method still NACLIP's: the tokens entering block 1 of the trunk pass, against the rule built here."""
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    seg = Segmenter(b32, NAMES, method=method, slide_crop=0, **ONE)
    grid = (size[0] // 32, size[1] // 32)
    with torch.no_grad():
        got = seg.trunk(images, Taps(inputs=frozenset({0}))).inputs[0]
        want = embedded(b32, images, RULES[method](b32, grid, size[0] == size[1]))
        others = [
            embedded(b32, images, rule(b32, grid, size[0] == size[1])) for m, rule in RULES.items() if m != method
        ]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for other in others:  # the rules differ by much more than the tolerance on these grids
        assert (other - want).abs().max() > 1e-3


def test_positions_are_kept_where_each_authors_code_keeps_them(b32):
    """At the pretraining grid every rule keeps the pretrained positions; GEM's code keeps them for any grid with as
    many cells (a 1 × 49 strip here), NACLIP's only for square images, CLIP Surgery's only on the same grid."""
    pos = b32.visual.positional_embedding
    strip = torch.randn(1, 3, 32, 49 * 32, generator=torch.Generator().manual_seed(3))
    square = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for method in RULES:
            seg = Segmenter(b32, NAMES, method=method, slide_crop=0, **ONE)
            rule = seg.method.position_rule
            assert seg.encoder.position_embedding((7, 7), square=True, rule=rule) is pos
            kept = seg.encoder.position_embedding((1, 49), square=False, rule=rule)
            assert (kept is pos) == (method == "gem")
            for images in (strip, square):
                grid = (images.shape[-2] // 32, images.shape[-1] // 32)
                got = seg.trunk(images, Taps(inputs=frozenset({0}))).inputs[0]
                want = embedded(b32, images, RULES[method](b32, grid, images is square))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_unknown_position_rule_is_one_clear_error(b32):
    enc = DenseEncoder(b32)
    with pytest.raises(ValueError, match="unknown position rule 'nearest'"):
        enc.position_embedding((3, 3), rule="nearest")


def prompt_ensemble(model, names: list[str], templates: list[str]) -> torch.Tensor:
    """Per name: the mean of the unit text embeddings of its prompts, normalised again (both authors' codes)."""
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    out = []
    for name in names:
        emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        out.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)


@pytest.mark.slow
def test_each_method_prompts_class_names_as_its_authors_code(b32, tmp_path):
    """GEM's encode_text prompts "a photo of a {}." only; CLIP Surgery's encode_text_with_prompt_ensemble the 80
    OpenAI ImageNet templates and five "in the scene" ones; given templates still win."""
    names = [["sky"], ["car"]]
    scene = ["there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
             "this is the {} in the scene.", "this is one {} in the scene."]  # fmt: skip
    imagenet = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    want = {
        "gem": prompt_ensemble(b32, ["sky", "car"], ["a photo of a {}."]),
        "clip_surgery": prompt_ensemble(b32, ["sky", "car"], imagenet + scene),
    }
    for method, expected in want.items():
        seg = Segmenter(b32, names, method=method, cache_dir=tmp_path)
        torch.testing.assert_close(seg.classifier, expected, rtol=1e-5, atol=1e-5)
    assert (want["gem"] - want["clip_surgery"]).abs().max() > 1e-2
    given = Segmenter(b32, names, method="clip_surgery", cache_dir=tmp_path, templates=["a photo of a {}."])
    torch.testing.assert_close(given.classifier, want["gem"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- configs
KEYS = ("short_side", "slide_crop", "slide_stride", "logit_scale", "prob_thd", "area_thd")
BACKGROUND = ("voc21", "pc60", "coco_object")
PROTOCOLS = {  # GEM: its code's 448 input everywhere; CLIP Surgery: the datasets' own (NACLIP's) values
    "gem": {d: (448, 448, 224, 40.0, 0.1 if d in BACKGROUND else 0.0, 0.0) for d in BENCHMARKS},
    "clip_surgery": {
        d: (
            560 if d == "cityscapes" else 336,
            0 if d in ("voc21", "voc20") else 224,
            112,
            40.0,
            0.1 if d in BACKGROUND else 0.0,
            0.0,
        )
        for d in BENCHMARKS
    },
}


@pytest.mark.parametrize("dataset", BENCHMARKS)
@pytest.mark.parametrize("method", ["gem", "clip_surgery"])
def test_protocol_per_dataset(method, dataset):
    cfg = compose_config([f"method={method}", f"dataset={dataset}"])
    config.validate(cfg)
    assert tuple(cfg.dataset[k] for k in KEYS) == pytest.approx(PROTOCOLS[method][dataset])
    assert cfg.dataset.protocol == method and cfg.dataset.class_names == dataset
    assert config.method_spec(cfg)[0] == method


def test_config_options_reach_the_method(b32):
    cfg = compose_config(["method=gem", "gem.depth=4", "gem.iterations=2", "gem.temperature=2.5"])
    name, options = config.method_spec(cfg)
    assert (name, options) == ("gem", {"depth": 4, "iterations": 2, "temperature": 2.5})
    method = build_method(name, DenseEncoder(b32), **options)
    assert (method.first, method.iterations, method.temperature) == (12 - 3, 2, 2.5)
    assert config.method_spec(compose_config(["method=clip_surgery", "clip_surgery.depth=3"])) == (
        "clip_surgery",
        {"depth": 3},
    )
    assert config.method_spec(compose_config(["method=sclip"])) == (None, {})


def test_option_typos_and_stray_method_options_fail():
    with pytest.raises(Exception, match="dept"):
        compose_config(["method=gem", "gem.dept=3"])
    cfg = compose_config(["method=gem", "+method_options.depth=3"])
    with pytest.raises(ValueError, match=r"takes its options from `gem\.\*`"):
        config.validate(cfg)
    cfg = compose_config(["method=naclip", "+method_options.depth=3"])
    with pytest.raises(ValueError, match="method_options given but method 'naclip' is not registered"):
        config.validate(cfg)


def test_methods_table_rows_for_registered_methods():
    def fake(method, dataset, miou, protocol, attention):
        choices = {
            "backbone": "b16",
            "refine": "none",
            "method": method,
            "dataset": dataset,
            "attention": attention,
            "arch": "vanilla",
        }
        return {
            "choices": choices,
            "miou": miou,
            "finished_at": "2026-01-01T00:00:00+00:00",
            "config": {"dataset": {"protocol": protocol}, "attention": {"sigma": None}},
        }

    results = [fake("gem", d, 40.0 + i, "gem", "full" if i else "vanilla") for i, d in enumerate(BENCHMARKS)]
    results.append(fake("clip_surgery", "voc21", 12.5, "dataset", "vanilla"))
    table = methods_table(results)
    assert table.value("GEM [fp32]", "V21") == 40.0 and table.value("GEM [fp32]", "Avg") == pytest.approx(43.5)
    assert table.value("CLIP Surgery (shared protocol) [fp32]", "V21") == 12.5
    assert table.value("CLIP Surgery", "V21") is None
    labels = [label for label, _ in table.rows]
    for name in ("GEM", "ProxyCLIP"):  # no source states their eight numbers: nothing quoted that was not read
        (published,) = [label for label in labels if label.startswith(f"{name} (published, ")]
        assert all(v is None for v in dict(table.rows)[published])
    (surgery,) = [label for label in labels if label.startswith("CLIP Surgery (published, ")]
    assert sum(v is not None for v in dict(table.rows)[surgery]) == 2  # its README's table: City and C-Stf only
    (resclip,) = [label for label in labels if label.startswith("ResCLIP (published, ResCLIP repository")]
    assert dict(table.rows)[resclip][-1] == pytest.approx(41.4, abs=0.05)  # its stated average over the eight


def test_methods_experiment_includes_the_new_methods():
    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=methods"], return_hydra_config=True)
    swept = cfg.hydra.sweeper.params["method"].split(",")
    assert {"gem", "clip_surgery", "resclip", "scclip"} <= set(swept)
    assert {"gem", "clip_surgery"} <= set(METHODS)


# ------------------------------------------------------------------------------- own-method plug-in
@pytest.mark.slow
def test_readme_method_plugin_example_end_to_end(tmp_path):
    """The README's own-method blocks, written as they stand, run from a fresh folder without touching naclip."""
    blocks = readme_blocks("method-plugin")
    assert set(blocks) == {"my_method.py", "my_conf/method/early_kk.yaml", "run"}, sorted(blocks)
    result = run_readme_example(blocks, tmp_path)
    assert result["config"]["method"] == "early_kk" and result["config"]["plugins"] == ["my_method"]
    assert result["config"]["method_options"] == {"block": -3} and result["num_images"] > 0


def test_fused_launcher_groups_the_methods_with_their_backbone():
    """Under hydra/launcher=fused, gem and clip_surgery jobs (and their options) share the pass of NACLIP's."""
    from naclip.sweep import group_key

    base = ["dataset=pc59", "protocol=shared"]
    keys = {
        group_key(compose_config([*base, *extra]))
        for extra in (["method=naclip"], ["method=gem", "gem.depth=4"], ["method=clip_surgery"], ["method=gem"])
    }
    assert len(keys) == 1
    assert group_key(compose_config(["dataset=pc59", "method=gem"])) not in keys  # GEM's own protocol: other crops
