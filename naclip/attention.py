"""Attention variants of the last encoder block and the Gaussian neighbourhood prior (NACLIP, Sec. 3).

Every variant is written as the inputs of one scaled-dot-product attention call,
``softmax(query keyᵀ / √d + bias) v``, so the fast fused kernel serves all of them and the explicit
attention weights (for figures) come from the very same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# (q, k, prior) -> (query, key, additive bias or None); q, k: (B, h, N, d), prior: (N, N)
ScoreInputs = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor | None]]


@dataclass(frozen=True)
class AttentionVariant:
    """A named attention of the paper's ablation (Table 3)."""

    name: str
    uses_sigma: bool
    score_inputs: ScoreInputs
    description: str


def _vanilla(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return q, k, None


def _kk_sim(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return k, k, None


def _full(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return k, k, prior


def _n_only(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    # c = mean over heads and token pairs (i, j) of |q_i||k_j|/√d, one per image; the pair mean factorises.
    assert prior is not None
    scale = q.norm(dim=-1).mean(-1) * k.norm(dim=-1).mean(-1) / math.sqrt(q.shape[-1])  # (B, h)
    c = scale.mean(-1)  # (B,)
    bias = c[:, None, None, None] * prior  # (B, 1, N, N)
    return torch.zeros_like(q), k, bias  # a zero query leaves only the bias in the logits


ATTENTIONS: dict[str, AttentionVariant] = {
    v.name: v
    for v in (
        AttentionVariant("vanilla", False, _vanilla, "softmax(q kᵀ/√d) v: plain CLIP"),
        AttentionVariant("kk_sim", False, _kk_sim, "softmax(k kᵀ/√d) v: key-key similarity"),
        AttentionVariant("n_only", True, _n_only, "softmax(c·ω) v: neighbourhood only"),
        AttentionVariant("full", True, _full, "softmax(k kᵀ/√d + ω) v: NACLIP"),
    )
}


def list_attentions() -> list[str]:
    """Names of the attention variants, as typed on the command line."""
    return list(ATTENTIONS)


def get_attention(name: str) -> AttentionVariant:
    """Look up an attention variant by name; unknown names raise with the valid choices."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid choices: {list_attentions()}")
    return ATTENTIONS[name]


def check_sigma(sigma: float | None) -> float:
    if sigma is None or not math.isfinite(float(sigma)) or float(sigma) <= 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    return float(sigma)


@lru_cache(maxsize=64)
def _gaussian_prior_cpu(rows: int, cols: int, sigma: float) -> Tensor:
    # Separable closed form: ω[(i,j),(m,n)] = g_rows[i,m] · g_cols[j,n] with g[a,b] = exp(-(a-b)²/(2σ²)).
    def axis(n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2 * sigma**2))

    patches = torch.kron(axis(rows), axis(cols))  # (N-1, N-1), 1 on the diagonal
    prior = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.float64)
    prior[1:, 1:] = patches  # the CLS token's row and column stay 0
    return prior.float()


_DEVICE_CACHE: dict[tuple[int, int, float, str, torch.dtype], Tensor] = {}


def gaussian_prior(
    grid: tuple[int, int],
    sigma: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unnormalized Gaussian neighbourhood prior ω over [CLS] + patch tokens (paper eq. 11), (N, N).

    Cached per (grid, σ, device, dtype): it is built once per grid, never per crop.
    """
    sigma = check_sigma(sigma)
    rows, cols = grid
    key = (rows, cols, sigma, str(device), dtype)
    if key not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) > 64:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[key] = _gaussian_prior_cpu(rows, cols, sigma).to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def attend(variant: AttentionVariant, q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
    """Attention output (B, h, N, d) through the fused kernel."""
    query, key, bias = variant.score_inputs(q, k, prior)
    bias = bias.to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(query, key, v, attn_mask=bias)


def attention_weights(variant: AttentionVariant, q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
    """Explicit attention probabilities (B, h, N, N) of the same variant, for figures and tests."""
    query, key, bias = variant.score_inputs(q, k, prior)
    logits = query @ key.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)
