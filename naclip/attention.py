"""Attention variants of the last encoder block and the Gaussian neighbourhood prior (NACLIP, Sec. 3).

A variant is a function ``(q, k, v, prior) -> output`` on per-head tensors. Most variants are one
scaled-dot-product attention, ``softmax(query keyᵀ / √d + bias) v``: they are written as the inputs of that one
call (:func:`sdpa_variant`), so the fused kernel serves them and their explicit weights (for figures) come from
the very same inputs. The others (``value``: no attention at all; ``csa``: two attentions) bring their own
function. Users add variants with :func:`register_attention`; they then behave exactly like the built-ins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# (q, k, prior) -> (query, key, additive bias or None); q, k: (B, h, N, d), prior: (N, N)
ScoreInputs = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor | None]]
# (q, k, v, prior) -> attention output (B, h, N, d)
AttendFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
# (q, k, prior) -> explicit attention weights (B, h, N, N)
WeightsFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class AttentionVariant:
    """A named last-block attention: its output function and, for figures, its explicit weights.

    ``row_sum`` is what each row of the weights sums to (1 for a softmax, 2 for SCLIP's sum of two softmaxes);
    figures divide by it so every variant is drawn as a distribution over tokens.
    """

    name: str
    uses_sigma: bool
    attend: AttendFn
    weights: WeightsFn
    description: str
    row_sum: float = 1.0


def sdpa_variant(name: str, uses_sigma: bool, score_inputs: ScoreInputs, description: str) -> AttentionVariant:
    """A variant that is one ``softmax(query keyᵀ/√d + bias) v``: one fused call, weights from the same inputs."""

    def attend(q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
        query, key, bias = score_inputs(q, k, prior)
        bias = bias.to(q.dtype) if bias is not None else None
        return F.scaled_dot_product_attention(query, key, v, attn_mask=bias)

    def weights(q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
        query, key, bias = score_inputs(q, k, prior)
        logits = query @ key.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)

    return AttentionVariant(name, uses_sigma, attend, weights, description)


def _vanilla(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return q, k, None


def _kk_sim(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return k, k, None


def _qq_sim(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return q, q, None


def _full(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    return k, k, prior


def _n_only(q: Tensor, k: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    # c = mean over heads and token pairs (i, j) of |q_i||k_j|/√d, one per image; the pair mean factorises.
    assert prior is not None
    scale = q.norm(dim=-1).mean(-1) * k.norm(dim=-1).mean(-1) / math.sqrt(q.shape[-1])  # (B, h)
    c = scale.mean(-1)  # (B,)
    bias = c[:, None, None, None] * prior  # (B, 1, N, N)
    return torch.zeros_like(q), k, bias  # a zero query leaves only the bias in the logits


def _value_attend(q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
    return v  # every token attends only to itself: no N×N product at all


def _value_weights(q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
    n = q.shape[-2]
    return torch.eye(n, dtype=q.dtype, device=q.device).expand(*q.shape[:-2], n, n)  # (B, h, N, N)


def _csa_attend(q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
    # SCLIP's correlative self-attention: two fused-kernel calls, their outputs summed.
    return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)


def _csa_weights(q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
    scale = 1 / math.sqrt(q.shape[-1])
    return (q @ q.transpose(-2, -1) * scale).softmax(-1) + (k @ k.transpose(-2, -1) * scale).softmax(-1)


ATTENTIONS: dict[str, AttentionVariant] = {
    v.name: v
    for v in (
        sdpa_variant("vanilla", False, _vanilla, "softmax(q kᵀ/√d) v: plain CLIP"),
        sdpa_variant("kk_sim", False, _kk_sim, "softmax(k kᵀ/√d) v: key-key similarity"),
        sdpa_variant("n_only", True, _n_only, "softmax(c·ω) v: neighbourhood only"),
        sdpa_variant("full", True, _full, "softmax(k kᵀ/√d + ω) v: NACLIP"),
        AttentionVariant("value", False, _value_attend, _value_weights, "v: each token attends to itself (MaskCLIP)"),
        sdpa_variant("qq", False, _qq_sim, "softmax(q qᵀ/√d) v: query-query similarity (ClearCLIP)"),
        AttentionVariant(
            "csa",
            False,
            _csa_attend,
            _csa_weights,
            "(softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v: correlative self-attention (SCLIP)",
            row_sum=2.0,
        ),
    )
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class AttentionError(ValueError):
    """A registered attention raised or returned the wrong shape; the message is one line naming it."""


def _checked(name: str, fn: AttendFn) -> AttendFn:
    """A user's attention, its failures turned into one-line AttentionErrors naming it (the shape check is free;
    finiteness is checked once per batch on the logits, by the runner)."""

    def attend(q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
        try:
            out = fn(q, k, v, prior)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise AttentionError(f"attention {name!r} raised {reason}") from err
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise AttentionError(
                f"attention {name!r} returned shape {got}; expected {tuple(v.shape)}, the (B, heads, N, d) of v"
            )
        return out

    return attend


def _probe_weights(attend: AttendFn) -> WeightsFn:
    """Weights of an attention that is linear in v: its output with v = the identity (one column per token)."""

    def weights(q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
        n = q.shape[-2]
        eye = torch.eye(n, dtype=q.dtype, device=q.device).expand(*q.shape[:-2], n, n)  # (B, h, N, N)
        return attend(q, k, eye.contiguous(), prior)

    return weights


def register_attention(
    name: str,
    fn: AttendFn,
    *,
    uses_sigma: bool,
    weights: WeightsFn | None = None,
    description: str = "",
    row_sum: float = 1.0,
) -> AttentionVariant:
    """Add an attention variant to the registry the built-ins live in: `attention.name=<name>` then selects it.

    Args:
        name: the name typed on the command line; must be new (built-ins cannot be replaced).
        fn: ``fn(q, k, v, prior) -> output``, all (B, heads, N, d) with token 0 the class token; ``prior`` is
            the Gaussian ω (N, N) when ``uses_sigma`` is true, else None.
        uses_sigma: whether the variant needs the Gaussian prior (and so `attention.sigma`).
        weights: ``weights(q, k, prior) -> (B, heads, N, N)`` for attention figures; by default ``fn`` applied
            to the identity as values, exact for any attention that is linear in v.
        description: one line shown by listings.
        row_sum: what each row of the weights sums to (figures divide by it).

    Returns:
        The registered :class:`AttentionVariant`.

    Raises:
        ValueError: invalid or already registered name, or ``fn`` not callable. When the variant runs, an
            exception of ``fn`` or an output not shaped like v becomes an :class:`AttentionError` naming it.

    Example:
        >>> register_attention("mine", lambda q, k, v, prior: F.scaled_dot_product_attention(q, q, v),
        ...                    uses_sigma=False)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"attention name must be a word (letters, digits, _ or -), got {name!r}")
    if name in ATTENTIONS:
        raise ValueError(f"attention {name!r} is already registered; registered: {list_attentions()}")
    if not callable(fn) or (weights is not None and not callable(weights)):
        raise ValueError(f"attention {name!r}: fn and weights must be callables (q, k, v, prior) and (q, k, prior)")
    if not (math.isfinite(row_sum) and row_sum > 0):
        raise ValueError(f"attention {name!r}: row_sum must be a positive number, got {row_sum!r}")
    fn = _checked(name, fn)
    variant = AttentionVariant(
        name, bool(uses_sigma), fn, weights or _probe_weights(fn), description or name, float(row_sum)
    )
    ATTENTIONS[name] = variant
    return variant


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
def _gaussian_prior_cpu(rows: int, cols: int, sigma: float, prefix: int = 1) -> Tensor:
    # Separable closed form: ω[(i,j),(m,n)] = g_rows[i,m] · g_cols[j,n] with g[a,b] = exp(-(a-b)²/(2σ²)).
    def axis(n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2 * sigma**2))

    patches = torch.kron(axis(rows), axis(cols))  # (N-1, N-1), 1 on the diagonal
    prior = torch.zeros(rows * cols + prefix, rows * cols + prefix, dtype=torch.float64)
    prior[prefix:, prefix:] = patches  # the prefix (class) tokens' rows and columns stay 0
    return prior.float()


_DEVICE_CACHE: dict[tuple[int, int, float, int, str, torch.dtype], Tensor] = {}


def gaussian_prior(
    grid: tuple[int, int],
    sigma: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: int = 1,
) -> Tensor:
    """Unnormalized Gaussian neighbourhood prior ω over [CLS] + patch tokens (paper eq. 11), (N, N).

    ``prefix``: tokens before the patches (1: the class token; 0 for towers without one, e.g. SigLIP), whose
    rows and columns are 0. Cached per (grid, σ, prefix, device, dtype): built once per grid, never per crop.
    """
    sigma = check_sigma(sigma)
    rows, cols = grid
    key = (rows, cols, sigma, prefix, str(device), dtype)
    if key not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) > 64:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[key] = _gaussian_prior_cpu(rows, cols, sigma, prefix).to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def attend(variant: AttentionVariant, q: Tensor, k: Tensor, v: Tensor, prior: Tensor | None) -> Tensor:
    """Attention output (B, h, N, d) of a variant (fused kernel for the built-ins)."""
    return variant.attend(q, k, v, prior)


def attention_weights(variant: AttentionVariant, q: Tensor, k: Tensor, prior: Tensor | None) -> Tensor:
    """Explicit attention weights (B, h, N, N) of the same variant, for figures and tests."""
    return variant.weights(q, k, prior)
