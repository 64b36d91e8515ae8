"""Vision-tower adapters: each CLIP family's own embedding, block, attention and projection as the same stages.

:class:`naclip.DenseEncoder` and every method (naclip.methods) compute with these stages only, so they run
unchanged on every family open_clip ships:

- :class:`OpenClipTower`: open_clip's own ``VisionTransformer`` (OpenAI, LAION, DataComp, DFN, MetaCLIP weights):
  a class token, learned absolute positions resized by NACLIP's published rule (or a method's own, see
  :data:`POSITION_RULES`), ``ln_post @ proj``.
- :class:`TimmTower`: open_clip's ``TimmModel`` around a timm trunk (``visual.trunk``): EVA02 (class token, rotary
  embeddings in every attention, SwiGLU, sub-LN) and SigLIP / SigLIP2 (no class token, an attention-pool head).
  Absolute positions are resized with timm's ``resample_abs_pos_embed``, as timm does for other image sizes.

A tower is stateless except for the patch grid of the last :meth:`Tower.embed` call, which EVA02's rotary
embeddings need in every block (they are rebuilt for that grid, exactly as timm's dynamic-size path does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITION_RULES: dict[str, str] = {
    "naclip": "bicubic by the factors ((rows + 0.1) / g0, (cols + 0.1) / g0); kept when the grid has g0·g0 cells and "
    "the image is square (NACLIP, SCLIP, ClearCLIP)",
    "antialias_bicubic": "antialiased bicubic to exactly (rows, cols); kept when the grid has g0·g0 cells (GEM's code)",
    "bilinear": "bilinear (no antialiasing) to exactly (rows, cols); kept on the pretraining grid "
    "(CLIP Surgery's code)",
}


def check_position_rule(rule: str | None) -> None:
    """Raise one line unless rule is None (the family's own) or a name of :data:`POSITION_RULES`."""
    if rule is not None and rule not in POSITION_RULES:
        raise ValueError(f"unknown position rule {rule!r}; valid choices: {list(POSITION_RULES)} or None")


def keeps_positions(base: tuple[int, int], grid: tuple[int, int], rule: str, square: bool = True) -> bool:
    """Whether ``rule`` keeps the pretrained positions of grid ``base`` for a (rows, cols) grid as they are
    (``square``: whether the image is square, which only NACLIP's rule reads)."""
    cells = grid[0] * grid[1] == base[0] * base[1]
    return {"naclip": cells and square, "antialias_bicubic": cells, "bilinear": tuple(grid) == tuple(base)}[rule]


def resample_positions(pos: Tensor, base: tuple[int, int], grid: tuple[int, int], rule: str) -> Tensor:
    """Patch position embeddings (g0h·g0w, C) of the pretraining grid ``base`` resampled to a (rows, cols) grid
    by a rule of :data:`POSITION_RULES`: (rows·cols, C)."""
    patch = pos.reshape(1, base[0], base[1], -1).permute(0, 3, 1, 2).float()
    if rule == "naclip":  # floor(g0 · (n + 0.1) / g0) = n cells per axis, samples where that factor puts them
        scale = ((grid[0] + 0.1) / base[0], (grid[1] + 0.1) / base[1])
        patch = F.interpolate(
            patch, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False
        )
    elif rule == "antialias_bicubic":
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=True)
    else:
        patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    return patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)


class Tower:
    """One family's stages on a vision tower that is never modified (its weights are only read)."""

    kind: str = ""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.grid: tuple[int, int] | None = None  # the patch grid of the last embed call
        self._pos_cache: dict[tuple[Any, ...], Tensor] = {}

    patch_size: tuple[int, int]
    num_heads: int
    num_prefix_tokens: int

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def position_embedding(self, grid: tuple[int, int], square: bool = True, rule: str | None = None) -> Tensor:
        raise NotImplementedError

    def embed(self, images: Tensor, rule: str | None = None) -> tuple[Tensor, tuple[int, int]]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The tower's architecture, for messages."""
        raise NotImplementedError

    def run_block(self, x: Tensor, block: int) -> Tensor:
        raise NotImplementedError

    def qkv(self, x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def attn_proj(self, out: Tensor, block: int) -> Tensor:
        raise NotImplementedError

    def attn_norm(self, x: Tensor, block: int) -> Tensor:
        raise NotImplementedError

    def attn_scale(self, attn_out: Tensor, block: int) -> Tensor:
        raise NotImplementedError

    def block_tail(self, x: Tensor, attn_out: Tensor, block: int) -> Tensor:
        raise NotImplementedError

    def project(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class OpenClipTower(Tower):
    """open_clip's ``VisionTransformer``: conv patches, class token, ``transformer.resblocks``, ``ln_post @ proj``."""

    kind = "open_clip"

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        self.patch_size = tuple(visual.conv1.kernel_size)  # type: ignore[assignment]
        self.num_heads = visual.transformer.resblocks[-1].attn.num_heads
        self.num_prefix_tokens = 1

    @property
    def name(self) -> str:
        return "open_clip VisionTransformer"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def position_embedding(self, grid: tuple[int, int], square: bool = True, rule: str | None = None) -> Tensor:
        """(1 + rows·cols, C), resized by ``rule`` (None: NACLIP's; see DenseEncoder.position_embedding)."""
        check_position_rule(rule)
        rule = rule or "naclip"
        pos = self.visual.positional_embedding
        key = (grid[0], grid[1], square, rule, pos.dtype, pos.device)
        if key not in self._pos_cache:
            base = tuple(self.visual.grid_size)
            if keeps_positions(base, grid, rule, square):
                self._pos_cache[key] = pos
            else:
                self._pos_cache[key] = torch.cat([pos[:1], resample_positions(pos[1:], base, grid, rule)])
        return self._pos_cache[key]

    def embed(self, images: Tensor, rule: str | None = None) -> tuple[Tensor, tuple[int, int]]:
        visual = self.visual
        x = visual.conv1(images.to(self.dtype))  # (B, C, rows, cols)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = self.position_embedding(grid, square=images.shape[-2] == images.shape[-1], rule=rule)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # (B, 1+N, C)
        self.grid = grid
        return visual.ln_pre(visual.patch_dropout(x)), grid

    def run_block(self, x: Tensor, block: int) -> Tensor:
        """One block as OpenAI's CLIP code runs it: sequence-first attention through
        ``F.multi_head_attention_forward``, bit for bit the published methods' trunks.

        A batch-first ``nn.MultiheadAttention`` at inference takes torch's fused fast path, whose rounding differs
        in the last bit; methods with discrete steps (CASS's head pairing) can flip on that difference.
        """
        blk = self.blocks[block]
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            if getattr(self.visual.transformer, "batch_first", True):
                return blk(x)
            return blk(x.transpose(0, 1)).transpose(0, 1)
        y = blk.ln_1(x).transpose(0, 1).contiguous()  # (N, B, C)
        out, _ = F.multi_head_attention_forward(
            *(y, y, y, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias),
            *(attn.bias_k, attn.bias_v, attn.add_zero_attn, 0.0, attn.out_proj.weight, attn.out_proj.bias),
            training=False,
            need_weights=False,
        )
        return self.block_tail(x, out.transpose(0, 1), block)

    def qkv(self, x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.blocks[block]
        attn = blk.attn
        b, n, c = x.shape
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3C)
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attn_proj(self, out: Tensor, block: int) -> Tensor:
        b, h, n, d = out.shape
        return self.blocks[block].attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def attn_norm(self, x: Tensor, block: int) -> Tensor:
        return self.blocks[block].ln_1(x)

    def attn_scale(self, attn_out: Tensor, block: int) -> Tensor:
        return self.blocks[block].ls_1(attn_out)

    def block_tail(self, x: Tensor, attn_out: Tensor, block: int) -> Tensor:
        blk = self.blocks[block]
        x = x + self.attn_scale(attn_out, block)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def project(self, x: Tensor) -> Tensor:
        return self.visual.ln_post(x) @ self.visual.proj


class TimmTower(Tower):
    """open_clip's ``TimmModel``: a timm ViT (SigLIP) or EVA trunk at ``visual.trunk`` and open_clip's ``head``.

    EVA02: q and k of every block are rotated by the trunk's rotary embedding for the crop's grid, after the
    prefix (class) token, exactly as ``EvaAttention`` does; the attention output goes through its sub-LN
    (``attn.norm``) before the output projection, and the block scales by ``gamma_1`` / ``gamma_2`` when set.

    SigLIP: no class token (``num_prefix_tokens`` 0) and an attention-pool head (``trunk.attn_pool``): one
    learned query attends over the patch tokens, then the output projection and a residual MLP. A dense feature
    has no pool; like MaskCLIP for CLIP's attention pool, each token goes through the pool's value projection,
    its output projection and the residual MLP by itself — the pool's output for a token attending only to itself.
    """

    kind = "timm"

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        trunk = visual.trunk
        self.trunk = trunk
        self.patch_size = tuple(trunk.patch_embed.proj.kernel_size)  # type: ignore[assignment]
        self.num_heads = trunk.blocks[-1].attn.num_heads
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self.rope = getattr(trunk, "rope", None)
        if getattr(trunk, "rope_mixed", False):
            raise ValueError(f"{type(trunk).__name__} with per-block (mixed) rotary embeddings is not supported")
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None and (getattr(pool, "pos_embed", None) is not None or pool.latent_len != 1):
            raise ValueError("an attention pool with its own positions or several latents has no per-token form")
        self._rope_cache: dict[tuple[Any, ...], Tensor] = {}

    @property
    def name(self) -> str:
        cfg = getattr(self.trunk, "pretrained_cfg", None) or {}
        return f"timm {cfg.get('architecture', type(self.trunk).__name__)}"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    def position_embedding(self, grid: tuple[int, int], square: bool = True, rule: str | None = None) -> Tensor:
        """(P + rows·cols, C) absolute positions (P: prefix tokens with a position), resized by timm's
        ``resample_abs_pos_embed`` (bicubic, antialiased, exact size) as timm's dynamic image size does, or by
        ``rule`` of :data:`POSITION_RULES` when a method names one."""
        from timm.layers import resample_abs_pos_embed

        check_position_rule(rule)
        pos = self.trunk.pos_embed
        key = (grid, square, rule, pos.dtype, pos.device)
        if key not in self._pos_cache:
            prefix = 0 if getattr(self.trunk, "no_embed_class", False) else self.num_prefix_tokens
            old = tuple(self.trunk.patch_embed.grid_size)
            if rule is None:
                self._pos_cache[key] = resample_abs_pos_embed(pos, list(grid), list(old), num_prefix_tokens=prefix)[0]
            elif keeps_positions(old, grid, rule, square):
                self._pos_cache[key] = pos[0]
            else:
                self._pos_cache[key] = torch.cat(
                    [pos[0, :prefix], resample_positions(pos[0, prefix:], old, grid, rule)]
                )
        return self._pos_cache[key]

    def rope_embedding(self, grid: tuple[int, int]) -> Tensor | None:
        """EVA02's concatenated (sin, cos) rotary table for a grid, built as timm's ``rope.get_embed(shape)``."""
        if self.rope is None:
            return None
        key = (grid, self.rope.bands.device)
        if key not in self._rope_cache:
            if getattr(self.rope, "feat_shape", None) is not None and tuple(self.rope.feat_shape) == grid:
                self._rope_cache[key] = self.rope.get_embed()
            else:  # the cached table is for the pretraining grid only: rebuild from the frequency bands
                self._rope_cache[key] = self.rope._build_embed_cat(list(grid), self.rope.bands)
        return self._rope_cache[key]

    def _rope_for(self, x: Tensor) -> Tensor | None:
        if self.rope is None:
            return None
        if self.grid is None or x.shape[1] != self.num_prefix_tokens + self.grid[0] * self.grid[1]:
            raise ValueError(f"{x.shape[1]} tokens do not match the grid of the last embed call ({self.grid})")
        return self.rope_embedding(self.grid)

    def embed(self, images: Tensor, rule: str | None = None) -> tuple[Tensor, tuple[int, int]]:
        trunk = self.trunk
        x = trunk.patch_embed.proj(images.to(self.dtype))  # (B, C, rows, cols): any size, not only 224 px
        grid = (x.shape[-2], x.shape[-1])
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (trunk.cls_token, getattr(trunk, "reg_token", None)) if t is not None
        ]
        pos = self.position_embedding(grid, images.shape[-2] == images.shape[-1], rule).to(x.dtype)
        if getattr(trunk, "no_embed_class", False):
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        x = trunk.pos_drop(x)
        if getattr(trunk, "patch_drop", None) is not None:  # a no-op in eval mode; EVA's returns (x, indices)
            x = trunk.patch_drop(x)
            x = x[0] if isinstance(x, tuple) else x
        self.grid = grid
        return trunk.norm_pre(x), grid

    def run_block(self, x: Tensor, block: int) -> Tensor:
        rope = self._rope_for(x)
        blk = self.blocks[block]
        return blk(x) if rope is None else blk(x, rope=rope)

    def qkv(self, x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
        from timm.layers import apply_rot_embed_cat

        blk = self.blocks[block]
        attn = blk.attn
        h = blk.norm1(x)
        b, n, _ = h.shape
        if getattr(attn, "qkv", None) is not None:
            bias = getattr(attn, "q_bias", None)
            if bias is None:
                qkv = attn.qkv(h)
            else:  # EVA's fused layout with separate biases (k has none)
                qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                p(h).reshape(b, n, self.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self._rope_for(x)
        if rope is not None:
            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        return q, k, v

    def attn_proj(self, out: Tensor, block: int) -> Tensor:
        attn = self.blocks[block].attn
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention (the gate reads the block input) is not supported by attn_proj")
        b, h, n, d = out.shape
        return attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, h * d)))

    def attn_norm(self, x: Tensor, block: int) -> Tensor:
        return self.blocks[block].norm1(x)

    def attn_scale(self, attn_out: Tensor, block: int) -> Tensor:
        blk = self.blocks[block]
        if hasattr(blk, "ls1"):  # timm Block (SigLIP)
            return blk.ls1(attn_out)
        return attn_out if blk.gamma_1 is None else blk.gamma_1 * attn_out  # EvaBlock

    def block_tail(self, x: Tensor, attn_out: Tensor, block: int) -> Tensor:
        blk = self.blocks[block]
        x = x + self.attn_scale(attn_out, block)
        if hasattr(blk, "ls1"):  # timm Block (SigLIP)
            return x + blk.ls2(blk.mlp(blk.norm2(x)))
        gamma_2 = blk.gamma_2  # EvaBlock
        mlp = blk.mlp(blk.norm2(x))
        return x + (mlp if gamma_2 is None else gamma_2 * mlp)

    def project(self, x: Tensor) -> Tensor:
        """Per token: the trunk's final norm, its pooling head's per-token part, fc_norm, head and open_clip's head."""
        trunk = self.trunk
        x = trunk.norm(x)
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            c = x.shape[-1]
            value = F.linear(x, pool.kv.weight[c:], None if pool.kv.bias is None else pool.kv.bias[c:])
            x = pool.proj(value)
            if pool.mlp is not None:
                x = x + pool.mlp(pool.norm(x))
        x = trunk.head(trunk.head_drop(trunk.fc_norm(x)))
        return self.visual.head(x)


def build_tower(model: nn.Module) -> Tower:
    """The adapter for a CLIP model's (or a bare vision tower's) image tower; one line when there is none."""
    visual = getattr(model, "visual", model)
    if getattr(visual, "trunk", None) is not None:
        trunk = visual.trunk
        if not (hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed") and hasattr(trunk, "pos_embed")):
            raise ValueError(f"timm trunk {type(trunk).__name__} is not a ViT (no patch embedding and blocks)")
        return TimmTower(visual)
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj")
    if any(not hasattr(visual, n) for n in needed) or getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"{type(visual).__name__} is not an open_clip VisionTransformer with a class token")
    return OpenClipTower(visual)
