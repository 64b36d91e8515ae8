"""Text classifier against open_clip's own encode_text, templates, and the on-disk cache."""

from __future__ import annotations

import re

import open_clip
import pytest
import torch
import torch.nn.functional as F

import naclip.text
from naclip.text import OPENAI_TEMPLATES, encode_text_trimmed, text_classifier

NAMES = ["cat", "person in a red sweater"]
TEMPLATES = ["itap of my {}.", lambda n: f"a blurry picture of the {n}, taken at night in heavy rain."]
LONG = " ".join(["a very long and detailed description of a small brown dog sitting on a green lawn"] * 8)


def reference_classifier(model: torch.nn.Module, names: list[str], templates: list) -> torch.Tensor:
    """Per name: open_clip's full-length encode_text of every prompt, normalize, average, normalize."""
    prompts = [t(name) if callable(t) else t.replace("{}", name) for name in names for t in templates]
    emb = model.encode_text(open_clip.tokenize(prompts)).float().reshape(len(names), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)  # (N, T, D)
    mean = emb.mean(dim=1)  # (N, D)
    return mean / mean.norm(dim=-1, keepdim=True)


def test_trimmed_encoder_equals_open_clip(b16):
    prompts = ["a", "a photo of a cat.", "an extremely blurry photo of a tiny red car parked near the old bridge", LONG]
    tokens = open_clip.tokenize(prompts)  # (4, 77); LONG is truncated to the full context
    assert int(tokens.argmax(dim=-1).max()) == 76
    want = b16.encode_text(tokens)
    got = encode_text_trimmed(b16, tokens)
    assert got.shape == want.shape == (4, 512)
    assert bool((F.cosine_similarity(got, want, dim=-1) >= 1 - 1e-5).all())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    short = open_clip.tokenize(prompts[:2])  # trimmed to 6 tokens: a different, much shorter batch
    torch.testing.assert_close(encode_text_trimmed(b16, short), want[:2], rtol=1e-4, atol=1e-4)


def test_classifier_is_mean_of_normalized_template_embeddings(b16):
    got = text_classifier(b16, NAMES, TEMPLATES)
    assert got.shape == (len(NAMES), b16.text_projection.shape[1])
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(NAMES)))
    torch.testing.assert_close(got, reference_classifier(b16, NAMES, TEMPLATES), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_classifier(b16, NAMES, TEMPLATES, batch_size=3), got, rtol=1e-5, atol=1e-6)


def test_callable_and_format_string_templates_agree(b16):
    as_string = text_classifier(b16, ["dog"], ["a photo of a {}.", "art of the {}."])
    as_callable = text_classifier(b16, ["dog"], [lambda n: f"a photo of a {n}.", lambda n: f"art of the {n}."])
    torch.testing.assert_close(as_string, as_callable)
    assert not torch.allclose(as_string, text_classifier(b16, ["dog"], ["a photo of a {}."]))


def test_default_templates_are_the_80_openai_ones(b16, monkeypatch):
    assert len(OPENAI_TEMPLATES) == 80
    assert OPENAI_TEMPLATES[0]("cat") == "a bad photo of a cat."
    seen: list[str] = []

    def tokenize(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return open_clip.tokenize(texts)

    def fake_encode(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:5].float()  # (B, 4): stands in for the text tower, the prompts are what matter

    monkeypatch.setattr(naclip.text, "encode_text_trimmed", fake_encode)
    out = text_classifier(b16, ["cat", "dog"], tokenizer=tokenize)
    assert out.shape == (2, 4)
    assert seen == [t(n) for n in ("cat", "dog") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]


def test_disk_cache_is_reused_and_keyed(b16, tmp_path, monkeypatch):
    first = text_classifier(b16, ["cat", "dog"], ["a photo of a {}."], cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower ran although the classifier is cached")

    with monkeypatch.context() as patch:
        patch.setattr(naclip.text, "encode_text_trimmed", refuse)
        torch.testing.assert_close(
            text_classifier(b16, ["cat", "dog"], ["a photo of a {}."], cache_dir=tmp_path), first
        )
        assert sorted(tmp_path.iterdir()) == files
        with pytest.raises(AssertionError, match="text tower ran"):
            text_classifier(b16, ["cat", "bird"], ["a photo of a {}."], cache_dir=tmp_path)

    text_classifier(b16, ["cat", "bird"], ["a photo of a {}."], cache_dir=tmp_path)
    text_classifier(b16, ["cat", "dog"], ["art of the {}."], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3

    original = b16.text_projection.detach().clone()
    try:
        with torch.no_grad():
            b16.text_projection.mul_(-1.0)
        other = text_classifier(b16, ["cat", "dog"], ["a photo of a {}."], cache_dir=tmp_path)
    finally:
        with torch.no_grad():
            b16.text_projection.copy_(original)
    assert len(list(tmp_path.iterdir())) == 4
    torch.testing.assert_close(other, -first)


@pytest.mark.parametrize(
    "names, templates, message",
    [
        ([], None, "[]"),
        ("cat", None, "'cat'"),
        (["cat", ""], None, "['']"),
        (["cat", "   "], None, "['   ']"),
        (["cat", 3], None, "[3]"),
        (["cat"], [], "templates must not be empty"),
    ],
)
def test_bad_input(b16, names, templates, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        text_classifier(b16, names, templates)
