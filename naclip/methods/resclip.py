"""ResCLIP (Yang et al., CVPR 2025; code github.com/yvhangyang/ResCLIP): residual attention in CLIP's last block.

RCS (residual cross-correlation self-attention): the mean of the plain q-k attention maps of blocks 6-9 is mixed
into the last block's attention after its softmax, ``A ← τ_r((1 - λ_r) A + λ_r A_rcs)``.
SFR (semantic feedback refinement): a first pass with RCS gives a segmentation of the crop (upsampled, PAMR,
softmax, ``temp_thd``); each patch takes its most frequent query; an N×N map says which patches share a query
(decayed with distance unless a straight path stays inside that query's region), is blurred along each row with
a Gaussian, row-normalized and mixed into the last block's scores before the softmax,
``S ← τ_s((1 - λ_s) S + λ_s M / max M)``. The second pass with both gives the features.
The last block's own attention is the base method's: NACLIP (k-k + Gaussian ω, no residual, no FFN), SCLIP
(q-q + k-k softmaxes, CLIP's block) or ClearCLIP (q-q, no residual, no FFN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from naclip.attention import gaussian_prior
from naclip.encoder import DenseEncoder, Taps
from naclip.methods import register_method
from naclip.methods.base import Method, TrunkState, cosine_logits
from naclip.pamr import PAMR

# base → (score kind, Gaussian ω added, CLIP's residual block); the authors' `attn_strategy` and `arch`
BASES: dict[str, tuple[str, bool, bool]] = {
    "naclip": ("kk", True, False),
    "sclip": ("csa", False, True),
    "clearclip": ("qq", False, False),
}
FEEDBACK_PAMR = (10, (8, 16))  # the first pass's PAMR (iterations, dilations), fixed in the authors' code
PATH_CACHE_SIZE = 8  # grids whose straight-path tables are kept


class ResCLIP(Method):
    """ResCLIP on a base method's last block.

    Args:
        encoder: the tower.
        base: "naclip" (default), "sclip" or "clearclip".
        sigma: σ (patches) of NACLIP's prior ω and of SFR's row blur (the authors' ``gaussian_std``).
        logit_scale: softmax temperature of the first pass (the protocol's logit scale in the authors' code).
        temp_thd: first-pass pixels whose best query probability is below it count as query 0.
        rcs_weights: (τ_r, λ_r) of the RCS mix.
        sfr_weights: (τ_s, λ_s) of the SFR mix.
        rcs_blocks: 0-based blocks whose q-k attention maps RCS averages.
        delete_same_entity: decay same-query pairs whose straight path leaves the region (authors: always on).
    """

    def __init__(
        self,
        encoder: DenseEncoder,
        base: str = "naclip",
        sigma: float = 5.0,
        logit_scale: float = 40.0,
        temp_thd: float = 0.25,
        rcs_weights: Sequence[float] = (2.0, 0.3),
        sfr_weights: Sequence[float] = (2.1, 0.7),
        rcs_blocks: Sequence[int] = (5, 6, 7, 8),
        delete_same_entity: bool = True,
    ) -> None:
        super().__init__(encoder)
        if base not in BASES:
            raise ValueError(f"unknown resclip base {base!r}; valid choices: {list(BASES)}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"resclip sigma must be a positive number, got {sigma!r}")
        for name, pair in (("rcs_weights", rcs_weights), ("sfr_weights", sfr_weights)):
            if len(pair) != 2:
                raise ValueError(f"resclip {name} must be a pair (tau, lambda), got {list(pair)}")
        last = encoder.num_blocks - 1
        blocks = tuple(encoder.block_index(b) for b in rcs_blocks)
        if not blocks or any(b >= last for b in blocks):
            raise ValueError(f"resclip rcs_blocks must be non-empty and before the last block, got {list(rcs_blocks)}")
        self.base, self.sigma, self.logit_scale, self.temp_thd = base, float(sigma), float(logit_scale), float(temp_thd)
        self.rcs_weights = tuple(float(w) for w in rcs_weights)
        self.sfr_weights = tuple(float(w) for w in sfr_weights)
        self.rcs_blocks, self.delete_same_entity = blocks, bool(delete_same_entity)
        self.taps = Taps(qkv=frozenset(blocks))
        self.pamr = PAMR(FEEDBACK_PAMR[0], FEEDBACK_PAMR[1])
        self._paths: dict[tuple[int, int, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"base={self.base}, rcs_blocks={self.rcs_blocks}, rcs={self.rcs_weights}, sfr={self.sfr_weights}"

    # ------------------------------------------------------------------------------------------ RCS
    def rcs_attention(self, state: TrunkState) -> Tensor:
        """Mean over ``rcs_blocks`` of their plain attention softmax(q kᵀ/√d): (n, h, 1+N, 1+N)."""
        maps = []
        for b in self.rcs_blocks:
            q, k, _ = state.qkv[b]
            maps.append(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).softmax(dim=-1))
        return torch.stack(maps).mean(dim=0)

    # ------------------------------------------------------------------------------------------ last block
    def last_block(self, state: TrunkState, rcs: Tensor, sfr: Tensor | None) -> Tensor:
        """The base's last block with RCS (and SFR when given), projected: patch features (n, rows, cols, D)."""
        enc, x = self.encoder, state.x
        kind, with_prior, residual = BASES[self.base]
        q, k, v = enc.qkv(x)
        scale = q.shape[-1] ** -0.5
        if sfr is not None:  # the authors normalize by the map's maximum and round it to float16
            sfr = (sfr / sfr.amax(dim=(-2, -1), keepdim=True)).to(torch.float16).to(q.dtype)[:, None]
        tau_s, lam_s = self.sfr_weights

        def scores(a: Tensor) -> Tensor:
            s = torch.matmul(a, a.transpose(-2, -1)) * scale
            return s if sfr is None else tau_s * ((1 - lam_s) * s + lam_s * sfr)

        if kind == "csa":
            attn = scores(q).softmax(dim=-1) + scores(k).softmax(dim=-1)
        else:
            s = scores(k if kind == "kk" else q)
            if with_prior:
                s = s + gaussian_prior(state.grid, self.sigma, device=s.device, dtype=s.dtype)
            attn = s.softmax(dim=-1)
        tau_r, lam_r = self.rcs_weights
        attn = tau_r * ((1 - lam_r) * attn + lam_r * rcs)
        out = enc.attn_proj(torch.matmul(attn, v))
        x = enc.block_tail(x, out) if residual else out
        feats = enc.project(x)[:, enc.num_prefix_tokens :]
        return feats.reshape(x.shape[0], state.grid[0], state.grid[1], -1)

    # ------------------------------------------------------------------------------------------ SFR
    def patch_queries(self, logits: Tensor, crops: Tensor) -> Tensor:
        """Each patch's most frequent first-pass query (n, rows, cols) from first-pass logits (n, Q, rows, cols).

        As the authors: upsample to the crop, PAMR on the crop, softmax(logit_scale ·) over queries, pixels below
        temp_thd → query 0, then the mode over each patch's pixels.
        """
        up = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        probs = (self.pamr(crops, up) * self.logit_scale).softmax(dim=1)
        pred = probs.argmax(dim=1)  # (n, H, W)
        pred[probs.amax(dim=1) < self.temp_thd] = 0
        p = self.encoder.patch_size
        rows, cols = logits.shape[-2:]
        patches = pred.unfold(1, p[0], p[0]).unfold(2, p[1], p[1]).reshape(pred.shape[0], rows, cols, -1)
        return torch.mode(patches, dim=-1).values

    def _path_tables(self, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per grid: the cells (P², S) the authors' straight-path check visits for each patch pair, which of them
        count (P², S), each pair's first patch (P²,), and the distance decay (P, P)."""
        key = (grid[0], grid[1], str(device))
        if key not in self._paths:
            if len(self._paths) >= PATH_CACHE_SIZE:  # whole-image protocols see many grids; tables are O(P² · side)
                self._paths.clear()
            rows, cols = grid
            index = torch.arange(rows * cols, device=device)
            i, j = torch.meshgrid(index, index, indexing="ij")
            start = torch.stack((i // cols, i % cols), dim=-1).view(-1, 2)
            end = torch.stack((j // cols, j % cols), dim=-1).view(-1, 2)
            steps = (end - start).abs().max(dim=1).values  # Chebyshev distance of each pair
            max_steps = int(steps.max())
            # every pair is sampled at the fractions k / max_steps (of the longest pair), k = 0..its own steps
            t = torch.linspace(0, 1, steps=max_steps + 1, device=device).unsqueeze(1).unsqueeze(0)
            coords = (start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t).round().long()  # (P², S, 2)
            cells = (coords[..., 0] * cols + coords[..., 1]).int()
            counted = torch.arange(max_steps + 1, device=device).unsqueeze(0) <= steps.unsqueeze(1)
            decay = torch.exp(-steps / max_steps).view(rows * cols, rows * cols)
            self._paths[key] = (cells, counted, i.reshape(-1), decay)
        return self._paths[key]

    def feedback_map(self, queries: Tensor) -> Tensor:
        """SFR's attention map (n, 1+N, 1+N) from each patch's query (n, rows, cols); class-token row/column 0."""
        n, rows, cols = queries.shape
        labels = queries.reshape(n, -1)
        count = labels.shape[1]
        same = (labels.unsqueeze(2) == labels.unsqueeze(1)).float()  # (n, P, P), 1 on the diagonal
        if self.delete_same_entity:
            cells, counted, first, decay = self._path_tables((rows, cols), labels.device)
            inside = torch.stack(
                [((lab[cells] == lab[first].unsqueeze(1)) | ~counted).all(dim=1) for lab in labels]
            ).view(n, count, count)
            same = torch.where(inside, same, same * decay)
        size = min(count, int(6 * self.sigma + 1))
        size = size if size % 2 == 1 else size + 1
        offsets = torch.arange(size, device=labels.device) - size // 2
        kernel = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        kernel = kernel / kernel.sum()
        blurred = F.conv1d(same.reshape(n * count, 1, count), kernel.view(1, 1, -1), padding=size // 2)
        blurred = F.relu(blurred.view(n, count, count))
        out = blurred.new_zeros(n, count + 1, count + 1)
        out[:, 1:, 1:] = blurred / (blurred.sum(dim=-1, keepdim=True) + 1e-8)
        return out

    def logits(self, state: TrunkState, classifier: Tensor) -> Tensor:
        rcs = self.rcs_attention(state)
        first = cosine_logits(self.last_block(state, rcs, None), classifier)
        sfr = self.feedback_map(self.patch_queries(first, state.crops.float()))
        return cosine_logits(self.last_block(state, rcs, sfr), classifier)


register_method(
    "resclip", ResCLIP, description="ResCLIP (CVPR'25): residual intermediate attention + semantic feedback"
)
