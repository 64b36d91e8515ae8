"""CLIP Surgery (Li et al., Pattern Recognition 2025; arXiv 2304.05653): v-v attention path and feature surgery.

Architecture surgery: from block ``L - depth + 1`` on, a second token stream starts from that block's input; each
of those blocks adds to it, without feed-forward, the output projection of v-v self-attention
``softmax(v vᵀ/√d) v`` computed from the *original* stream's v. The class token is the original CLIP's.
Feature surgery: with unit image features f (class token f₀) and unit text embeddings t_q, the weights
``w = softmax(2 f₀·t) / mean(softmax(2 f₀·t))`` over the queries, and the logit of query q at a patch is
``w_q (f·t_q) − mean_q' w_q' (f·t_q')``: what every query shares is removed. As the authors' code
(xmed-lab/CLIP_Surgery, ``clip_surgery_model.py`` and ``clip.clip_feature_surgery``) computes it, per image.
Position embeddings of other grids are resampled bilinearly from the pretrained ones to the exact grid, as that
code does for square grids (it has no non-square case). Class names are prompted with that code's ensemble
(``encode_text_with_prompt_ensemble``): the 80 OpenAI ImageNet templates, then five "in the scene" ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from naclip.encoder import DenseEncoder, Taps
from naclip.methods import Method, TrunkState, register_method
from naclip.methods.base import parallel_path
from naclip.text import OPENAI_TEMPLATES

SURGERY_TEMPERATURE = 2.0  # the authors' fixed factor inside the class-token softmax of the feature surgery


def feature_surgery(features: Tensor, classifier: Tensor) -> Tensor:
    """Surgery logits (n, 1+N, Q) of unit features (n, 1+N, D), class token first, and unit text (Q, D)."""
    sims = features @ classifier.T  # (n, 1+N, Q)
    prob = (SURGERY_TEMPERATURE * sims[:, :1]).softmax(dim=-1)  # (n, 1, Q): per image, from its class token
    weighted = sims * (prob / prob.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)


class CLIPSurgery(Method):
    """CLIP Surgery's v-v path over the last ``depth - 1`` blocks and its feature surgery.

    Args:
        encoder: the tower's stages.
        depth: blocks L-depth+1 .. L get the v-v path (the authors' ``range(1, 7)``: 7, the last six).
    """

    position_rule = "bilinear"
    templates = (
        *OPENAI_TEMPLATES,
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )

    def __init__(self, encoder: DenseEncoder, depth: int = 7) -> None:
        super().__init__(encoder)
        encoder.require_class_token("method=clip_surgery (feature surgery weighs classes by the class token)")
        if not 2 <= depth <= encoder.num_blocks + 1:
            raise ValueError(f"clip_surgery.depth must be in [2, {encoder.num_blocks + 1}] for this tower, got {depth}")
        self.first = encoder.num_blocks - (depth - 1)
        self.taps = Taps(inputs=frozenset(range(self.first, encoder.num_blocks - 1)))

    def extra_repr(self) -> str:
        return f"blocks={self.first}..{self.encoder.num_blocks - 1}"

    def value_value(self, x: Tensor, block: int) -> Tensor:
        """One block's v-v attention output (B, N, C), before the block's layer scale, from its input x."""
        _, _, v = self.encoder.qkv(x, block)
        return self.encoder.attn_proj(F.scaled_dot_product_attention(v, v, v), block)

    def original_class_token(self, x: Tensor) -> Tensor:
        """CLIP's own last block on the class token only (B, 1, C): the other tokens do not change it."""
        enc = self.encoder
        prefix = enc.num_prefix_tokens
        q, k, v = enc.qkv(x)
        out = enc.attn_proj(F.scaled_dot_product_attention(q[:, :, :prefix], k, v))
        return enc.block_tail(x[:, :prefix], out)

    def tokens(self, state: TrunkState) -> Tensor:
        """Projected tokens (n, 1+N, D), the class token first (feature surgery needs it)."""
        enc = self.encoder
        path = parallel_path(enc, state, self.first, self.value_value)
        prefix = enc.num_prefix_tokens
        return enc.project(torch.cat([self.original_class_token(state.x), path[:, prefix:]], dim=1))

    def features(self, state: TrunkState) -> Tensor:
        """The surgery path's patch features (n, rows, cols, D), before feature surgery."""
        feats = self.tokens(state)[:, self.encoder.num_prefix_tokens :]
        return feats.reshape(feats.shape[0], *state.grid, -1)

    def logits(self, state: TrunkState, classifier: Tensor) -> Tensor:
        tokens = F.normalize(self.tokens(state).float(), dim=-1)
        sims = feature_surgery(tokens, classifier.float())[:, self.encoder.num_prefix_tokens :]  # (n, N, Q)
        return sims.transpose(1, 2).reshape(sims.shape[0], -1, *state.grid)


register_method("clip_surgery", CLIPSurgery, description="CLIP Surgery: v-v attention path and feature surgery")
