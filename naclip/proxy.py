"""A second vision model beside CLIP (a "proxy", e.g. DINO), loaded with timm, for ProxyCLIP and CASS.

Self-supervised ViTs know where objects are; ProxyCLIP and CASS let their patch features (or last-block keys)
decide which CLIP patches attend to which. The proxy sees its own normalization (ImageNet mean/std) and its own
patch grid; each method aligns that grid with CLIP's as its authors' code does (see naclip.methods.proxyclip and
naclip.methods.cass). One :class:`Proxy` serves every variant of a fused sweep: methods cache its output per
chunk of crops in :attr:`naclip.methods.TrunkState.cache`.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from naclip.clip import WeightsUnavailableError, _reachable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name → timm model: the proxies the published methods use, and DINOv3 (conf/proxy/<name>.yaml).
PROXIES: dict[str, str] = {
    "dino_b16": "vit_base_patch16_224.dino",
    "dino_b8": "vit_base_patch8_224.dino",
    "dinov2_b14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_b14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov3_b16": "vit_base_patch16_dinov3.lvd1689m",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def list_proxies() -> list[str]:
    """Names of the `proxy` config group: "none" and the shipped proxies (any timm ViT works as proxy.model)."""
    return ["none", *PROXIES]


class ProxyWeightsUnavailableError(WeightsUnavailableError):
    """The proxy's pretrained weights are neither cached nor downloadable; the message names ``proxy.pretrained``."""

    def hint(self, setting: str = "proxy.pretrained={}", random: str = "null") -> str:
        return (
            f"could not download proxy weights {self.model}.{self.tag} ({self.why}); set "
            f"{setting.format('/path/to/proxy_weights.safetensors')} (a local weights file) or "
            f"{setting.format(random)} (random weights, a smoke run)"
        )


@dataclass
class ProxyOutput:
    """The proxy's last-block results on a batch: ``features`` (B, rows, cols, C), its final-norm patch tokens,
    and ``keys`` (B, heads, rows·cols, d), its last block's per-head keys of the patch tokens (None if unknown)."""

    features: Tensor
    keys: Tensor | None
    grid: tuple[int, int]


def _weights_file(pretrained: str) -> str | None:
    """The local file a proxy.pretrained value names, or None for a keyword."""
    path = Path(pretrained).expanduser()
    if os.sep not in pretrained and path.suffix not in _WEIGHT_SUFFIXES:
        return None
    if not path.is_file():
        raise ValueError(f"proxy.pretrained: weights file {pretrained!r} does not exist")
    return str(path)


def _cached_timm_file(hf_hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def load_proxy(
    model: str, pretrained: str | None = None, device: str | torch.device = "cpu", name: str | None = None
) -> Proxy:
    """Build a timm ViT as a proxy, eval mode, gradients off.

    Args:
        model: a timm model name with its pretrained tag ("vit_base_patch8_224.dino"); the tag also chooses the
            input normalization (timm's config of those weights), even for random weights or a local file.
        pretrained: "timm" (the tag's weights, downloaded once by timm and cached), a local weights file (timm's
            or the authors' original checkpoint: timm converts it), or None for random weights.
        device: where the model lives.
        name: the config name, for messages.

    Raises:
        ValueError: unknown model or keyword, missing file.
        ProxyWeightsUnavailableError: timm weights not cached and the hub unreachable (fails within seconds).
    """
    import timm

    arch, _, tag = model.partition(".")
    if not timm.list_models(arch):
        raise ValueError(f"proxy.model: unknown timm model {arch!r}; e.g. {[m for m in PROXIES.values()]}")
    if tag and model not in timm.list_pretrained(model):
        raise ValueError(f"proxy.model: timm has no tag {tag!r} for {arch}; tags: {timm.list_pretrained(arch + '.*')}")
    kwargs: dict = {"pretrained": False}
    file = None if pretrained is None else _weights_file(pretrained)
    if file is not None:
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": file}}
    elif pretrained == "timm":
        hub_id = timm.models.get_pretrained_cfg(model).hf_hub_id
        cached = _cached_timm_file(hub_id) if hub_id else None
        if cached is not None:
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}}
        elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ProxyWeightsUnavailableError(arch, tag, "HF_HUB_OFFLINE is set")
        else:
            why = _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
            if why is not None:
                raise ProxyWeightsUnavailableError(arch, tag, why)
            kwargs = {"pretrained": True}
    elif pretrained is not None:
        raise ValueError(f"proxy.pretrained must be 'timm', a weights file or null, got {pretrained!r}")
    try:
        net = timm.create_model(model, num_classes=0, dynamic_img_size=True, **kwargs)
    except (RuntimeError, OSError) as err:
        if file is None:
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"proxy.pretrained {pretrained!r} is not a usable {arch} checkpoint: {first}") from err
    return Proxy(net.to(device).eval().requires_grad_(False), name or model)


class Proxy(nn.Module):
    """A timm ViT run up to its final norm, keeping its last block's keys.

    For timm's ``VisionTransformer`` (DINO, DINOv2) the position embeddings of a non-default grid are resized as
    the DINO and DINOv2 code does (bicubic, ``scale_factor=((rows + 0.1) / g0, (cols + 0.1) / g0)``; kept when
    the grid has g0² cells and the image is square), not as timm does. Other timm models (DINOv3's RoPE ViT)
    run their own ``forward_features``.

    Args:
        model: a timm model with ``patch_embed``, ``blocks`` and ``num_prefix_tokens``.
        name: its name in messages.
    """

    def __init__(self, model: nn.Module, name: str = "proxy") -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens")):
            raise ValueError(f"proxy {name!r}: {type(model).__name__} is not a timm ViT (patch_embed, blocks)")
        self.model = model
        self.name = name
        patch = model.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.num_heads: int = model.blocks[-1].attn.num_heads
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std: tuple[float, ...] = tuple(cfg.get("std", IMAGENET_STD))
        self._casts: dict[torch.dtype, nn.Module] = {}

    def extra_repr(self) -> str:
        return f"name={self.name}, patch={self.patch_size}, heads={self.num_heads}"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] (B, 3, H, W) → the proxy's input normalization (ImageNet mean/std for DINO)."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype)[:, None, None]
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype)[:, None, None]
        return (pixels - mean) / std

    def _net(self, dtype: torch.dtype) -> nn.Module:
        """The model in `dtype` (ProxyCLIP runs it in CLIP's half precision); converted copies are kept."""
        if dtype == self.dtype:
            return self.model
        if dtype not in self._casts:
            self._casts[dtype] = copy.deepcopy(self.model).to(dtype)
        return self._casts[dtype]

    @torch.no_grad()
    def forward(self, images: Tensor, dtype: torch.dtype | None = None, fused: bool = True) -> ProxyOutput:
        """Last-block features and keys of proxy-normalized images (B, 3, H, W), run in `dtype`.

        ``fused=False`` computes every attention step by step, softmax(q·kᵀ·scale)·v, as the original DINO code
        does, instead of timm's fused kernel: the same values to the last bit as the authors' DINO, which CASS
        needs (it rounds the keys to fp16 and pairs heads by a discrete assignment that a last-bit change can flip).
        """
        dtype = self.dtype if dtype is None else dtype
        net = self._net(dtype)
        attns = [b.attn for b in net.blocks if hasattr(getattr(b, "attn", None), "fused_attn")]
        saved = [a.fused_attn for a in attns]
        try:
            for a in attns:
                a.fused_attn = a.fused_attn and fused
            return self._forward(net, images, dtype)
        finally:
            for a, flag in zip(attns, saved, strict=True):
                a.fused_attn = flag

    def _forward(self, net: nn.Module, images: Tensor, dtype: torch.dtype) -> ProxyOutput:
        square = images.shape[-2] == images.shape[-1]
        grid = (images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1])
        # a partial last patch is dropped (DINO's convolution floors; DINOv2 asks for whole patches)
        images = images[..., : grid[0] * self.patch_size[0], : grid[1] * self.patch_size[1]].to(dtype)
        if type(net).__name__ != "VisionTransformer":
            return self._forward_timm(net, images, grid)
        x = net.patch_embed(images)  # (B, rows, cols, C): dynamic_img_size keeps it a grid
        x = self._with_positions(net, x, square=square)
        x = net.norm_pre(net.patch_drop(net.pos_drop(x)))
        for block in net.blocks[:-1]:
            x = block(x)
        last = net.blocks[-1]
        keys = self._keys(last.attn, last.norm1(x))
        x = net.norm(last(x))
        return self._output(x, keys, grid)

    def _output(self, tokens: Tensor, keys: Tensor | None, grid: tuple[int, int]) -> ProxyOutput:
        p = self.num_prefix_tokens
        features = tokens[:, p:].reshape(tokens.shape[0], grid[0], grid[1], -1)
        return ProxyOutput(features, None if keys is None else keys[:, :, p:], grid)

    def _keys(self, attn: nn.Module, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return attn.k_norm(qkv[1]) if hasattr(attn, "k_norm") else qkv[1]

    def _forward_timm(self, net: nn.Module, images: Tensor, grid: tuple[int, int]) -> ProxyOutput:
        """Models with their own positions (RoPE): timm's forward; keys from the last block's qkv when it has one."""
        seen: dict[str, Tensor] = {}
        attn = net.blocks[-1].attn
        hook = None
        if isinstance(getattr(attn, "qkv", None), nn.Linear):
            hook = attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
        try:
            tokens = net.forward_features(images)
        finally:
            if hook is not None:
                hook.remove()
        keys = None
        if "qkv" in seen:
            b, n, _ = seen["qkv"].shape
            keys = seen["qkv"].reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)[1]
        return self._output(tokens, keys, grid)

    @staticmethod
    def _with_positions(net: nn.Module, x: Tensor, square: bool) -> Tensor:
        """Prefix tokens and position embeddings, resized the DINO way for a (rows, cols) grid."""
        b, rows, cols, c = x.shape
        pos = net.pos_embed
        n_pos_prefix = 0 if net.no_embed_class else net.num_prefix_tokens
        prefix_pos, patch_pos = pos[:, :n_pos_prefix], pos[:, n_pos_prefix:]
        g0 = int(math.sqrt(patch_pos.shape[1]))
        if rows * cols != g0 * g0 or not square:
            grid_pos = patch_pos.reshape(1, g0, g0, c).permute(0, 3, 1, 2).float()
            scale = ((rows + 0.1) / g0, (cols + 0.1) / g0)
            grid_pos = F.interpolate(
                grid_pos, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False
            )
            patch_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, c).to(pos.dtype)
        x = x.reshape(b, rows * cols, c)
        prefix = []
        if net.cls_token is not None:
            prefix.append(net.cls_token.expand(b, -1, -1))
        if net.reg_token is not None:
            prefix.append(net.reg_token.expand(b, -1, -1))
        if net.no_embed_class:
            return torch.cat([*prefix, x + patch_pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)


def clip_to_pixels(crops: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """CLIP-normalized crops (B, 3, H, W) back to pixels in [0, 1], in float32."""
    m = torch.tensor(mean, device=crops.device, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, device=crops.device, dtype=torch.float32)[:, None, None]
    return crops.float() * s + m


def uses_proxy(method: str | None) -> bool:
    """Whether a registered method takes a proxy (its factory has a ``proxy`` argument)."""
    import inspect

    from naclip.methods import METHODS, list_methods

    if method is None or method not in list_methods():
        return False
    return "proxy" in inspect.signature(METHODS[method].factory).parameters


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROXIES",
    "Proxy",
    "ProxyOutput",
    "ProxyWeightsUnavailableError",
    "clip_to_pixels",
    "list_proxies",
    "load_proxy",
    "uses_proxy",
]
