"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last-block attention replaced by a proxy model's feature similarity.

Per crop, the proxy's final-norm patch features f (rows', cols' on its own grid) give the attention

    S = cos(f_i, f_j);   S = (S − β·mean(S))·γ;   S[S < 0] = −∞;   A = softmax(S)

(the mean over the crop's whole similarity matrix), shared by every head. CLIP's last-block values of the patch
tokens, resized bilinearly to the proxy's grid, are mixed by A, then CLIP's output projection, final norm and
projection give features on the proxy's grid (no residual, no feed-forward, as the authors' code).

The proxy sees the crop itself: CLIP's normalization undone (OpenAI's constants, as the authors' code) and the
proxy's own applied, run in CLIP's precision. Its features are cached per chunk, so every β/γ variant of a
fused sweep shares one proxy pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from naclip.clip import OPENAI_MEAN, OPENAI_STD
from naclip.encoder import DenseEncoder
from naclip.methods import Method, TrunkState, register_method
from naclip.proxy import Proxy, clip_to_pixels


def proxy_attention(features: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's attention (n, M, M) from proxy patch features (n, rows, cols, C), in their dtype.

    Rows whose every shifted similarity is negative have no finite entry: the softmax gives NaN there, as in the
    authors' code (it cannot happen for trained proxies: the diagonal is 1 and β·mean stays below 1).
    """
    f = F.normalize(features.flatten(1, 2), dim=-1)  # (n, M, C)
    sim = f @ f.transpose(1, 2)  # (n, M, M); in place below: one M×M buffer per crop besides the softmax's
    sim.sub_(sim.mean(dim=(1, 2), keepdim=True) * beta).mul_(gamma)
    sim.masked_fill_(sim < 0.0, float("-inf"))
    return sim.softmax(dim=-1)


def proxy_features(proxy: Proxy, state: TrunkState, dtype: torch.dtype) -> Tensor:
    """The proxy's patch features (n, rows', cols', C) of this chunk's crops, computed once per chunk."""
    key = f"proxyclip:{id(proxy)}:{dtype}"
    if key not in state.cache:
        pixels = clip_to_pixels(state.crops, OPENAI_MEAN, OPENAI_STD)
        state.cache[key] = proxy(proxy.normalize(pixels), dtype=dtype).features
    return state.cache[key]


class ProxyCLIP(Method):
    """ProxyCLIP's last block on the trunk's tokens.

    Args:
        encoder: the CLIP tower's stages.
        proxy: the second vision model (see :func:`naclip.proxy.load_proxy`).
        beta, gamma: the shift (× the mean similarity) and the scale of the proxy similarity (the code's 1.2, 3.0).
    """

    def __init__(self, encoder: DenseEncoder, proxy: Proxy | None = None, beta: float = 1.2, gamma: float = 3.0):
        super().__init__(encoder)
        if proxy is None:
            raise ValueError("method proxyclip needs a proxy model: set proxy=dino_b8 (see naclip.list_proxies())")
        self.proxy = proxy
        self.beta, self.gamma = float(beta), float(gamma)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}"

    def attention(self, state: TrunkState) -> tuple[Tensor, tuple[int, int]]:
        """The proxy-guided attention (n, M, M) of this chunk and the proxy's grid (for figures)."""
        feats = proxy_features(self.proxy, state, self.encoder.dtype)
        return proxy_attention(feats, self.beta, self.gamma), (feats.shape[1], feats.shape[2])

    def features(self, state: TrunkState) -> Tensor:
        attn, (rows, cols) = self.attention(state)
        _, _, v = self.encoder.qkv(state.x)  # (n, h, 1+N, d)
        n, h, _, d = v.shape
        v = v[:, :, self.encoder.num_prefix_tokens :].reshape(n * h, *state.grid, d).permute(0, 3, 1, 2)
        v = F.interpolate(v, size=(rows, cols), mode="bilinear", align_corners=False)
        v = v.reshape(n, h * d, rows * cols).transpose(1, 2)  # (n, M, h·d): every head's values side by side
        # one attention for every head: a single (M, M) @ (M, h·d) product, never h broadcast copies of attn
        out = (attn.to(v.dtype) @ v).reshape(n, rows * cols, h, d).transpose(1, 2)  # (n, h, M, d)
        x = self.encoder.project(self.encoder.attn_proj(out))  # (n, M, D)
        return x.reshape(n, rows, cols, -1)


register_method(
    "proxyclip",
    ProxyCLIP,
    description="ProxyCLIP: last-block attention from a proxy model's (DINO) patch-feature similarity",
)
