"""The stage pipeline: taps are the trunk's own activations, one trunk pass serves every method of a fused sweep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from naclip import DenseEncoder, FusedSegmenter, Segmenter
from naclip import methods as naclip_methods
from naclip.encoder import Taps
from naclip.methods import Method, TrunkState, build_method, register_method

NAMES = ["sky", "tree", "car"]
ONE_TEMPLATE = ("a photo of a {}.",)


class ReplayFrom(Method):
    """A toy method: CLIP's own remaining blocks from the tokens tapped at `start`, then the projection."""

    def __init__(self, encoder, start: int = 6) -> None:
        super().__init__(encoder)
        self.start = start
        self.taps = Taps(inputs=frozenset({start}), qkv=frozenset({3}))

    def features(self, state: TrunkState) -> torch.Tensor:
        x = self.encoder.run_blocks(state.inputs[self.start], self.start, self.encoder.num_blocks)
        x = self.encoder.project(x)[:, 1:]
        return x.reshape(x.shape[0], *state.grid, -1)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the method registry, so test registrations do not leak (the built-ins loaded first, so they
    register in the real one and not only in the copy)."""
    naclip_methods.list_methods()
    monkeypatch.setattr(naclip_methods, "METHODS", dict(naclip_methods.METHODS))
    return naclip_methods


def _crops() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 3, 224, 224)  # the pretraining grid: open_clip's own forward applies unchanged


def test_taps_are_the_blocks_own_inputs_and_qkv(b32):
    visual = b32.visual
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, block in enumerate(visual.transformer.resblocks)
    ]
    crops = _crops()
    try:
        with torch.no_grad():
            b32.encode_image(crops)
    finally:
        for hook in hooks:
            hook.remove()
    seg = Segmenter(b32, NAMES, templates=ONE_TEMPLATE, method=ReplayFrom(DenseEncoder(b32), 6))
    with torch.no_grad():
        state = seg.trunk(crops)
    assert set(state.inputs) == {6} and set(state.qkv) == {3}
    torch.testing.assert_close(state.inputs[6], seen[6], rtol=1e-5, atol=1e-5)
    # block 3's q, k, v written out from nn.MultiheadAttention's packed projection
    block = visual.transformer.resblocks[3]
    heads = block.attn.num_heads
    packed = F.linear(block.ln_1(seen[3]), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = (t.reshape(2, 50, heads, -1).transpose(1, 2) for t in packed.chunk(3, dim=-1))
    for got, want in zip(state.qkv[3], (q, k, v), strict=True):
        assert got.shape == (2, heads, 50, 768 // heads)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert want.abs().mean() > 0.01  # a real signal, not zeros compared with zeros
    torch.testing.assert_close(state.x, seen[len(visual.transformer.resblocks) - 1], rtol=1e-5, atol=1e-5)


def test_a_tapping_method_computes_clips_own_tokens(b32):
    """ReplayFrom reruns CLIP's blocks: its features are open_clip's final tokens, projected."""
    seg = Segmenter(b32, NAMES, templates=ONE_TEMPLATE)
    seg.method = ReplayFrom(seg.encoder, 6)
    crops = _crops()
    visual = b32.visual
    tokens = {}
    hook = visual.ln_post.register_forward_pre_hook(lambda mod, args: tokens.__setitem__("x", args[0].clone()))
    try:
        with torch.no_grad():
            b32.encode_image(crops)
    finally:
        hook.remove()
    want = (visual.ln_post(tokens["x"]) @ visual.proj)[:, 1:].reshape(2, 7, 7, -1)
    with torch.no_grad():
        got = seg.method.features(seg.trunk(crops))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.norm(dim=-1).mean() > 0.1


def test_fused_runs_the_trunk_once_for_every_method_and_equals_alone(b32):
    torch.manual_seed(5)
    images = [torch.randn(3, 96, 160), torch.randn(3, 64, 64)]
    common = {"templates": ONE_TEMPLATE, "slide_crop": 64, "slide_stride": 32, "crop_batch_size": 4}
    full = Segmenter(b32, NAMES, attention="full", sigma=3.0, **common)
    replay = Segmenter(b32, NAMES, attention="vanilla", arch="vanilla", **common)
    replay.method = ReplayFrom(replay.encoder, 6)
    alone = [full.logits_list(images), replay.logits_list(images)]
    calls = []
    hook = b32.visual.transformer.resblocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        fused = FusedSegmenter([full, replay]).logits_list(images)
    finally:
        hook.remove()
    n_chunks = sum(1 for _ in full.chunks(full.crops(images)[0]))
    assert len(calls) == n_chunks  # block 1 ran once per chunk, not once per method
    for got, want in zip(fused, alone, strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert not torch.equal(fused[0][0], fused[1][0])  # two different methods, two different results


def test_register_method_selects_it_by_name(registry, b32):
    registry.register_method("replay", ReplayFrom, description="CLIP's own blocks from a tap")
    assert "replay" in registry.list_methods()
    seg = Segmenter(b32, NAMES, templates=ONE_TEMPLATE, method="replay", method_options={"start": 9})
    assert isinstance(seg.method, ReplayFrom) and seg.method.start == 9 and seg.taps.inputs == frozenset({9})


@pytest.mark.parametrize(
    ("name", "factory", "match"),
    [("bad name", ReplayFrom, "must be a word"), ("x", 3, "must be a callable")],
)
def test_register_method_refuses_bad_entries(registry, name, factory, match):
    with pytest.raises(ValueError, match=match):
        register_method(name, factory)


def test_unknown_duplicate_and_non_method_factories_fail_with_one_line(registry, b32):
    registry.register_method("replay", ReplayFrom)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("replay", ReplayFrom)
    encoder = Segmenter(b32, NAMES, templates=ONE_TEMPLATE).encoder
    with pytest.raises(ValueError, match=r"unknown method 'nope'; registered: \[.*'replay'"):
        build_method("nope", encoder)
    registry.register_method("broken", lambda enc: object())
    with pytest.raises(ValueError, match="not a naclip Method"):
        build_method("broken", encoder)
    with pytest.raises(ValueError, match="without a method"):
        build_method(None, encoder, start=3)
