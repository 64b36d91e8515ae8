"""GEM (Bousselham et al., CVPR 2024): a self-self attention path run beside CLIP's last blocks.

From the block ``L - depth + 1`` on, a second token stream starts from that block's input. Each of those blocks
adds to it, without feed-forward, the output projection of the q-q, k-k and v-v self-self attentions averaged
(computed from the *original* stream's q, k, v of that block): each of q, k, v is L2-normalised, attends to itself
with inverse temperature τ, is refined ``iterations`` times, and its final attention weights average v. The
second stream then goes through CLIP's final norm and projection. τ defaults to the mean token norm of the
block's normalised input (LN1) times 1/√d, per image, as the authors' code (WalBouss/GEM, ``gem_utils.py``)
computes it. Position embeddings of other grids are resampled as that code does (``resample_abs_pos_embed``):
antialiased bicubic to the exact grid, kept when the grid has as many cells as the pretraining one. Class names
are prompted as that code's ``encode_text`` does: ``a photo of a {}.`` only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from naclip.encoder import DenseEncoder, Taps
from naclip.methods import Method, TrunkState, register_method
from naclip.methods.base import parallel_path


def self_self_weights(x: Tensor, inv_temp: Tensor | float, iterations: int) -> Tensor:
    """Softmax weights (B, h, N, N) of one self-self stream x (B, h, N, d) after ``iterations`` refinements."""
    for _ in range(iterations):
        x = F.normalize(x, dim=-1)
        x = ((x @ x.transpose(-2, -1)) * inv_temp).softmax(dim=-1) @ x
    x = F.normalize(x, dim=-1)
    return ((x @ x.transpose(-2, -1)) * inv_temp).softmax(dim=-1)


class GEM(Method):
    """GEM's self-self attention path over the last ``depth - 1`` blocks (the authors' ``gem_depth``).

    Args:
        encoder: the tower's stages.
        depth: the authors' ``gem_depth``: blocks L-depth+1 .. L get the path (7: the last six).
        iterations: self-self refinements before the final assignment to v (``ss_attn_iter``).
        temperature: fixed inverse temperature (``ss_attn_temp``); None = the adaptive one described above.
    """

    position_rule = "antialias_bicubic"
    templates = ("a photo of a {}.",)

    def __init__(
        self, encoder: DenseEncoder, depth: int = 7, iterations: int = 1, temperature: float | None = None
    ) -> None:
        super().__init__(encoder)
        if not 2 <= depth <= encoder.num_blocks + 1:
            raise ValueError(f"gem.depth must be in [2, {encoder.num_blocks + 1}] for this tower, got {depth}")
        if iterations < 0:
            raise ValueError(f"gem.iterations must be >= 0, got {iterations}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"gem.temperature must be positive or null (adaptive), got {temperature}")
        self.first = encoder.num_blocks - (depth - 1)
        self.iterations, self.temperature = int(iterations), temperature
        self.taps = Taps(inputs=frozenset(range(self.first, encoder.num_blocks - 1)))

    def extra_repr(self) -> str:
        return (
            f"blocks={self.first}..{self.encoder.num_blocks - 1}, iterations={self.iterations}, "
            f"temperature={self.temperature or 'adaptive'}"
        )

    def self_self(self, x: Tensor, block: int) -> Tensor:
        """One block's GEM attention output (B, N, C), before the block's layer scale, from its input x."""
        enc = self.encoder
        q, k, v = enc.qkv(x, block)
        if self.temperature is None:
            ln_x = enc.attn_norm(x, block)
            inv_temp = ln_x.norm(dim=-1).mean(dim=-1)[:, None, None, None] * q.shape[-1] ** -0.5  # (B, 1, 1, 1)
        else:
            inv_temp = float(self.temperature)
        out = sum(self_self_weights(s, inv_temp, self.iterations) @ v for s in (v, k, q)) / 3
        return enc.attn_proj(out, block)

    def features(self, state: TrunkState) -> Tensor:
        enc = self.encoder
        path = parallel_path(enc, state, self.first, self.self_self)
        feats = enc.project(path)[:, enc.num_prefix_tokens :]
        return feats.reshape(feats.shape[0], *state.grid, -1)


register_method("gem", GEM, description="GEM: q-q/k-k/v-v self-self attention path over the last blocks (CVPR'24)")
