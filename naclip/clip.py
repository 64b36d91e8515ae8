"""Loading open_clip CLIP models: random weights, open_clip tags or local files, never hanging offline."""

from __future__ import annotations

import os
import socket
import urllib.parse
import zipfile
from pathlib import Path
from typing import Literal

import open_clip
import torch
from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsUnavailableError(RuntimeError):
    """The requested pretrained weights are neither cached nor downloadable (e.g. no network).

    Its message names the Hydra key (``backbone.pretrained``); entry points with another knob (the notebooks'
    ``NACLIP_PRETRAINED``, ``naclip.figures --pretrained``) print :meth:`hint` with their own.
    """

    def __init__(self, model: str, tag: str, why: str) -> None:
        self.model, self.tag, self.why = model, tag, why
        super().__init__(self.hint())

    def hint(self, setting: str = "backbone.pretrained={}", random: str = "null") -> str:
        """The message with ``setting`` (a template for one value) as the way to choose other weights."""
        return (
            f"could not download CLIP weights {self.model}/{self.tag} ({self.why}); set "
            f"{setting.format('/path/to/open_clip_model.safetensors')} (a local weights file) or "
            f"{setting.format(random)} (random weights, a smoke run)"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # pickled by launchers (submitit)
        return type(self), (self.model, self.tag, self.why)


def _reachable(url: str, timeout: float = 3.0) -> str | None:
    """Return None if the host of `url` accepts a TCP connection, else the reason (fails fast offline)."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host} unreachable: {err.__class__.__name__}"


def _cached_hf_file(hf_hub: str) -> str | None:
    """Path of an already downloaded file for an open_clip `hf_hub` entry, preferring safetensors."""
    from huggingface_hub import try_to_load_from_cache

    if hf_hub.endswith("/"):  # open_clip's convention: a bare repo id means its default file name
        repo_id, filename = hf_hub.rstrip("/"), "open_clip_pytorch_model.bin"
    else:
        repo_id, filename = os.path.split(hf_hub)
    stem = os.path.splitext(filename)[0]
    for candidate in (f"{stem}.safetensors", "open_clip_model.safetensors", filename):
        path = try_to_load_from_cache(repo_id, candidate)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _is_openai_archive(path: Path) -> bool:
    """OpenAI's original checkpoints are TorchScript archives; they always need QuickGELU."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _weights_format(path: Path) -> str | None:
    """The file's kind: "safetensors", "zip" (torch.save / TorchScript), "pickle" (legacy torch.save), or None.

    Checked from the first bytes, so a text file or a truncated download is refused with a clear message
    before torch.load suggests ``weights_only=False``, which a user must not follow for an untrusted file.
    """
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if zipfile.is_zipfile(path):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+
        return "pickle"
    return None


def _file_needs_quick_gelu(name: str, path: Path) -> bool:
    if name.endswith("-quickgelu"):
        return True
    return "openai" in str(path).lower() or _is_openai_archive(path)


def resolve_pretrained(name: str, pretrained: str) -> tuple[str, bool]:
    """Map a tag or path to (local file or tag for open_clip, quick_gelu), failing fast when offline.

    Raises:
        ValueError: unknown tag or missing file.
        WeightsUnavailableError: tag not cached and its host unreachable.
    """
    path = Path(pretrained).expanduser()
    looks_like_path = os.sep in pretrained or path.suffix in _WEIGHT_SUFFIXES
    if looks_like_path:
        if not path.is_file():
            raise ValueError(f"weights file {pretrained!r} does not exist")
        return str(path), _file_needs_quick_gelu(name, path)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; valid tags: {tags} or a local file")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    quick_gelu = bool(cfg.get("quick_gelu", False)) or name.endswith("-quickgelu")
    if cfg.get("hf_hub"):
        cached = _cached_hf_file(cfg["hf_hub"])
        if cached:
            return cached, quick_gelu
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise WeightsUnavailableError(name, pretrained, "HF_HUB_OFFLINE is set")
        why = _reachable(endpoint)
    else:
        why = _reachable(cfg.get("url", ""))
    if why is not None:
        raise WeightsUnavailableError(name, pretrained, why)
    return pretrained, quick_gelu


def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    quick_gelu: bool | None = None,
) -> nn.Module:
    """Build an open_clip CLIP model in eval mode.

    Args:
        name: open_clip model name ("ViT-B-16", "ViT-B-32", "ViT-L-14", ...).
        pretrained: an open_clip tag ("openai", the default, as in :class:`naclip.Predictor` and
            ``backbone.pretrained``; "laion2b_s34b_b88k", ...), a path to a local .safetensors/.bin/.pt/.pth file,
            or None for random weights (pipeline checks only).
        device: where the model lives.
        precision: "fp32", "fp16" or "bf16"; half precision runs on CPU and GPU (the authors evaluated in fp16).
        quick_gelu: force QuickGELU on/off; None decides from the weights (OpenAI weights need it).

    Returns:
        The open_clip model, eval mode, gradients off.

    Raises:
        ValueError: unknown model name, tag, precision, a weights file that is missing or does not match, or
            quick_gelu=True for a timm image tower (EVA02, SigLIP).
        WeightsUnavailableError: weights not cached and not downloadable.

    Example:
        >>> model = load_clip("ViT-B-16", pretrained=None)
    """
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    timm_tower = (open_clip.get_model_config(name) or {}).get("vision_cfg", {}).get("timm_model_name")
    if quick_gelu and timm_tower:
        raise ValueError(
            f"quick_gelu=true has no meaning for {name}: its image tower is timm's {timm_tower}, whose activation is "
            f"fixed by the architecture; leave backbone.quick_gelu=null"
        )
    source, auto_quick_gelu = (None, False) if pretrained is None else resolve_pretrained(name, pretrained)
    use_quick_gelu = auto_quick_gelu if quick_gelu is None else quick_gelu
    if source is not None and Path(source).is_file() and _weights_format(Path(source)) is None:
        raise ValueError(
            f"{pretrained!r} is not a valid weights file (neither safetensors nor a PyTorch checkpoint); "
            f"point backbone.pretrained at an open_clip .safetensors/.bin/.pt/.pth file"
        )
    try:
        model = open_clip.create_model(
            name,
            pretrained=source,
            device=device,
            precision=precision,
            force_quick_gelu=use_quick_gelu,
            pretrained_text=False,
        )
    except FileNotFoundError as err:
        raise WeightsUnavailableError(name, str(pretrained), str(err).splitlines()[0]) from err
    except Exception as err:  # a local file that is not a usable checkpoint of this architecture
        if source is None or not Path(source).is_file():
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err):  # torch.load's advice to unpickle arbitrary code: never pass it on
            first = "it cannot be loaded as plain tensors, so it is not a valid weights file"
        raise ValueError(f"weights {pretrained!r} are not a usable open_clip {name} checkpoint: {first}") from err
    model.eval().requires_grad_(False)
    return model


def image_mean_std(name: str, pretrained: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization constants that travel with the weights: the tag's open_clip preprocessing config.

    For a local file or random weights: the values every pretrained tag of the model shares (SigLIP: 0.5, EVA02:
    OpenAI's), OpenAI's when the tags disagree (ViT-L-14: OpenAI vs LAION) or the model has none.
    """
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        tags = [pretrained]
    values = set()
    for tag in tags:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        values.add((tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))))
    return values.pop() if len(values) == 1 else (OPENAI_MEAN, OPENAI_STD)
