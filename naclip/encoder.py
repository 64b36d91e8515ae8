"""Neighbour-aware dense CLIP image encoder (NACLIP, Sec. 3): embed → blocks 1..L-1 → modified block L → project."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from naclip.attention import (
    AttentionVariant,
    attend,
    attention_weights,
    check_sigma,
    gaussian_prior,
    get_attention,
)
from naclip.towers import Tower, build_tower

ARCHS: dict[str, str] = {
    "vanilla": "Z = Z + SA(LN1(Z)); Z = Z + MLP(LN2(Z)): CLIP's block",
    "reduced": "Z = SA(LN1(Z)): no residual, no feed-forward (paper eq. 16)",
}


@dataclass(frozen=True)
class Taps:
    """What a method needs from the shared trunk pass besides its final tokens: block indices (non-negative).

    ``inputs``: the tokens entering these blocks; ``qkv``: these blocks' own per-head q, k, v.
    """

    inputs: frozenset[int] = frozenset()
    qkv: frozenset[int] = frozenset()

    def __or__(self, other: Taps) -> Taps:
        return Taps(self.inputs | other.inputs, self.qkv | other.qkv)


def list_archs() -> list[str]:
    return list(ARCHS)


def check_images(images: Tensor, patch: tuple[int, int]) -> None:
    """Raise a ValueError unless images is a float (B, 3, H, W) batch of at least one patch."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if images.shape[-2] < patch[0] or images.shape[-1] < patch[1]:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than one patch {patch}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalized float tensors, got dtype {images.dtype}")


class DenseEncoder(nn.Module):
    """Projected patch features of an open_clip ViT with NACLIP's last block.

    The wrapped model is never modified: the last block is re-run from its own weights, so
    ``model.encode_image`` keeps its behaviour. Every stage delegates to the family's tower adapter
    (:mod:`naclip.towers`: open_clip's ViT, or a timm trunk such as EVA02 and SigLIP), so methods built on
    these stages run on every family.

    Args:
        model: an open_clip CLIP model (see :func:`naclip.load_clip`) with a ViT image tower (open_clip's own
            or a timm ViT/EVA trunk).
        attention: a name of :func:`naclip.list_attentions`, e.g. "full" (NACLIP), "csa" (SCLIP), "qq" (ClearCLIP).
        arch: "vanilla" (CLIP's last block) or "reduced" (no residual, no FFN).
        sigma: standard deviation of the Gaussian prior in patches (used by "n_only" and "full").

    Example:
        >>> enc = DenseEncoder(load_clip("ViT-B-16"), attention="full", arch="reduced")
        >>> feats = enc(torch.randn(1, 3, 224, 224))  # (1, 14, 14, 512)
    """

    def __init__(
        self, model: nn.Module, attention: str = "full", arch: str = "reduced", sigma: float | None = 5.0
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; valid choices: {list_archs()}")
        self.variant: AttentionVariant = get_attention(attention)
        self.sigma = check_sigma(sigma) if self.variant.uses_sigma else None
        self.arch = arch
        self.tower: Tower = build_tower(model)
        self.visual = self.tower.visual
        self.patch_size: tuple[int, int] = self.tower.patch_size
        self.num_heads: int = self.tower.num_heads

    @property
    def attention(self) -> str:
        return self.variant.name

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    def extra_repr(self) -> str:
        return (
            f"attention={self.attention}, arch={self.arch}, sigma={self.sigma}, patch={self.patch_size}, "
            f"tower={self.tower.kind}"
        )

    def position_embedding(self, grid: tuple[int, int], square: bool = True, rule: str | None = None) -> Tensor:
        """Position embeddings (prefix + rows·cols, C) for a patch grid, resized as each family's code does.

        open_clip's towers: NACLIP (like SCLIP and ClearCLIP, after DINO) keeps the pretrained embeddings when
        the grid has as many cells as the pretraining grid (g0, g0) and the input image is square. Otherwise it
        resizes the (g0, g0) patch embeddings bicubically by the factors ((rows + 0.1) / g0, (cols + 0.1) / g0):
        the output has rows × cols cells, but its samples sit where that factor puts them, not where an exact
        resize to (rows, cols) would. The class token's embedding is kept. Matching this keeps logits equal to
        the authors' evaluation. timm towers (EVA02, SigLIP): timm's own ``resample_abs_pos_embed`` (exact size,
        antialiased bicubic). A method whose authors resize otherwise names its rule (``Method.position_rule``,
        one of :data:`naclip.towers.POSITION_RULES`: GEM's antialiased bicubic, CLIP Surgery's bilinear), which
        replaces the family's own. One result is cached per grid and rule.

        Args:
            grid: (rows, cols) of the patch grid.
            square: whether the image fed to the encoder is square (height == width in pixels).
            rule: a name of :data:`naclip.towers.POSITION_RULES`; None = the family's own (above).
        """
        return self.tower.position_embedding(grid, square, rule)

    def embed(self, images: Tensor, position_rule: str | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch (+ class token) embedding with (resized) positions and the pre-norm: (B, P+N, C), and the grid.

        ``position_rule``: how positions are resized (see :meth:`position_embedding`); None = the family's own."""
        check_images(images, self.patch_size)
        return self.tower.embed(images, position_rule)

    @property
    def blocks(self) -> nn.ModuleList:
        """The tower's encoder blocks, first to last."""
        return self.tower.blocks

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (1: CLIP's and EVA02's class token; 0: SigLIP has none); methods slice
        patches as ``x[:, num_prefix_tokens:]``."""
        return self.tower.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self.num_prefix_tokens > 0

    def require_class_token(self, what: str) -> None:
        """Raise one line when ``what`` (a method, an option) needs the class token this tower does not have."""
        if not self.has_class_token:
            raise ValueError(f"{what} needs a class token, which this backbone ({self.tower.name}) does not have")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_index(self, block: int) -> int:
        """A block index as a non-negative number (negative counts from the last block)."""
        index = block + self.num_blocks if block < 0 else block
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block {block} does not exist: the tower has {self.num_blocks} blocks")
        return index

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        stop: int | None = None,
        taps: Taps | None = None,
        state: dict[str, dict[int, Any]] | None = None,
    ) -> Tensor:
        """Blocks start..stop-1 unchanged (batch-first in and out); default stop: all but the last block.

        With ``taps``, ``state["inputs"][i]`` receives the tokens entering each tapped block i and
        ``state["qkv"][i]`` that block's own per-head (q, k, v), each computed once in this pass.
        """
        stop = self.num_blocks - 1 if stop is None else stop
        for i in range(start, stop):
            if taps is not None and state is not None:
                if i in taps.inputs:
                    state["inputs"][i] = x
                if i in taps.qkv:
                    state["qkv"][i] = self.qkv(x, block=i)
            x = self.tower.run_block(x, i)
        return x

    def trunk(self, x: Tensor) -> Tensor:
        """All encoder blocks but the last, unchanged (batch-first in and out)."""
        return self.run_blocks(x)

    def qkv(self, x: Tensor, block: int = -1) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v (B, h, N, d) of one block's attention (default the last) from that block's input,
        as that block's attention computes them (EVA02: q and k rotated by the grid's rotary embedding)."""
        return self.tower.qkv(x, self.block_index(block))

    def attn_proj(self, out: Tensor, block: int = -1) -> Tensor:
        """One block's output projection of per-head attention outputs (B, h, N, d) → (B, N, C)."""
        return self.tower.attn_proj(out, self.block_index(block))

    def attn_norm(self, x: Tensor, block: int = -1) -> Tensor:
        """One block's pre-attention norm (the input its q, k, v are projected from)."""
        return self.tower.attn_norm(x, self.block_index(block))

    def attn_scale(self, attn_out: Tensor, block: int = -1) -> Tensor:
        """One block's layer scale of its attention branch (identity where the family has none)."""
        return self.tower.attn_scale(attn_out, self.block_index(block))

    def block_tail(self, x: Tensor, attn_out: Tensor, block: int = -1) -> Tensor:
        """The rest of a standard block after its attention: residual, then the residual feed-forward."""
        return self.tower.block_tail(x, attn_out, self.block_index(block))

    def project(self, x: Tensor) -> Tensor:
        """Final norm and projection into the joint image-text space, per token: (B, T, C) → (B, T, D).

        SigLIP's attention-pool head becomes per token its value and output projections and residual MLP."""
        return self.tower.project(x)

    def prior(self, grid: tuple[int, int], x: Tensor) -> Tensor | None:
        if self.sigma is None:
            return None
        return gaussian_prior(grid, self.sigma, device=x.device, dtype=x.dtype, prefix=self.num_prefix_tokens)

    def last_block(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """NACLIP's last block: modified self-attention, then CLIP's or the reduced architecture."""
        q, k, v = self.qkv(x)
        out = self.attn_proj(attend(self.variant, q, k, v, self.prior(grid, x)))  # (B, N, C)
        return out if self.arch == "reduced" else self.block_tail(x, out)

    def head(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Modified last block and projection of the trunk's output: patch features (B, rows, cols, D).

        Kept apart from :meth:`trunk` so several variants can share one trunk pass (see naclip.fused).
        """
        x = self.project(self.last_block(x, grid))  # (B, 1+N, D)
        return x[:, self.num_prefix_tokens :].reshape(x.shape[0], grid[0], grid[1], -1)

    def forward(self, images: Tensor) -> Tensor:
        """Projected, unnormalized patch features (B, H//p, W//p, D) of normalized images (B, 3, H, W)."""
        x, grid = self.embed(images)
        return self.head(self.trunk(x), grid)

    def attention_weights(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Last-block attention probabilities (B, h, P+N, P+N) of this variant (P prefix tokens), and the grid."""
        x, grid = self.embed(images)
        x = self.trunk(x)
        q, k, _ = self.qkv(x)
        return attention_weights(self.variant, q, k, self.prior(grid, x)), grid
