"""Pixel-adaptive mask refinement (PAMR).

Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020. NACLIP uses it as an
optional post-processing step: the class logits are repeatedly replaced by an image-aware weighted average of
their dilated 8-neighbourhood, so predictions snap to colour edges without any learned parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PAMR"]

# The 8 neighbour directions of a 3x3 stencil (centre excluded), as (row, col) unit offsets.
_DIRECTIONS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)
# Keeps the affinity denominator positive where the image is locally flat (std == 0).
_EPS = 1e-8
# Temperature of the affinity: the intensity difference is compared to 0.1 local standard deviations.
_STD_SCALE = 0.1


def _shifted(padded: Tensor, dilation: int, dy: int, dx: int, height: int, width: int) -> Tensor:
    """View of a replicate-padded map holding, at each pixel, its neighbour at offset (dy, dx) * dilation."""
    top = dilation + dy * dilation
    left = dilation + dx * dilation
    return padded[..., top : top + height, left : left + width]  # (..., H, W)


class PAMR(torch.nn.Module):
    """Refine per-pixel class logits with affinities computed from the image.

    The kernel κ_ij between pixel i and each neighbour j (8 per dilation, offsets (±d, 0/±d), replicate
    padding at borders) is a softmax over all neighbours of all dilations of the channel-averaged logits
    −|I_i − I_j| / (eps + 0.1·σ_i). Following the authors' reference implementation, σ_i is the unbiased
    standard deviation of each 3x3 dilated window *including its centre*, pooled over all dilations (so
    9·len(dilations) values, the centre counted once per dilation). The logits are then updated ``num_iter``
    times as m_i ← Σ_j κ_ij m_j. Everything runs in fp32 without autograd; the result has the input dtype.
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
            raise ValueError(f"PAMR num_iter must be an integer >= 0, got {num_iter!r}")
        dilations = tuple(dilations)
        if not dilations:
            raise ValueError("PAMR dilations must be a non-empty sequence of integers >= 1, got ()")
        for d in dilations:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"PAMR dilations must all be integers >= 1, got {d!r} in {dilations!r}")
        self.num_iter = num_iter
        self.dilations = dilations

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def _check_inputs(self, image: Tensor, logits: Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"PAMR image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        if logits.ndim != 4:
            raise ValueError(f"PAMR logits must have shape (B, K, H, W), got {tuple(logits.shape)}")
        if image.shape[0] != logits.shape[0] or image.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"PAMR image {tuple(image.shape)} and logits {tuple(logits.shape)} must share batch size and "
                "H, W; resize the logits to the image resolution first"
            )
        for name, t in (("image", image), ("logits", logits)):
            if not t.is_floating_point():
                raise ValueError(f"PAMR {name} must be a floating-point tensor, got dtype {t.dtype}")

    def _kernel(self, image: Tensor) -> Tensor:
        """Affinity kernel (B, 8·len(dilations), H, W), summing to 1 over dim 1."""
        _, _, height, width = image.shape
        neighbours = []  # each (B, 3, H, W)
        for d in self.dilations:
            padded = F.pad(image, [d, d, d, d], mode="replicate")  # (B, 3, H+2d, W+2d)
            neighbours.extend(_shifted(padded, d, dy, dx, height, width) for dy, dx in _DIRECTIONS)
        neighbours_t = torch.stack(neighbours, dim=2)  # (B, 3, N, H, W), N = 8·len(dilations)
        centre = image.unsqueeze(2)  # (B, 3, 1, H, W)
        # Window std: the neighbours plus the centre once per dilation, as in the reference implementation.
        window = torch.cat([neighbours_t, centre.expand(-1, -1, len(self.dilations), -1, -1)], dim=2)
        std = window.std(dim=2, keepdim=True)  # (B, 3, 1, H, W)
        del window
        affinity = -(centre - neighbours_t).abs_() / (_EPS + _STD_SCALE * std)  # (B, 3, N, H, W)
        return affinity.mean(dim=1).softmax(dim=1)  # (B, N, H, W)

    @torch.no_grad()
    def forward(self, image: Tensor, logits: Tensor) -> Tensor:
        """image (B,3,H,W) float (CLIP-normalized, same H,W as logits); logits (B,K,H,W) -> refined (B,K,H,W)."""
        self._check_inputs(image, logits)
        if self.num_iter == 0:
            return logits.clone()
        _, _, height, width = logits.shape
        kernel = self._kernel(image.float())  # (B, N, H, W)
        mask = logits.float()  # (B, K, H, W)
        # Accumulating one neighbour at a time keeps peak memory at ~3 logit maps instead of N + 1 of them.
        for _ in range(self.num_iter):
            refined = torch.zeros_like(mask)  # (B, K, H, W)
            j = 0
            for d in self.dilations:
                padded = F.pad(mask, [d, d, d, d], mode="replicate")  # (B, K, H+2d, W+2d)
                for dy, dx in _DIRECTIONS:
                    # (B, 1, H, W) weight broadcast over the K classes
                    refined.addcmul_(kernel[:, j : j + 1], _shifted(padded, d, dy, dx, height, width))
                    j += 1
            mask = refined
        return mask.to(logits.dtype)
