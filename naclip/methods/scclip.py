"""SC-CLIP (Bai et al., "Self-Calibrated CLIP"; code github.com/SuleBai/SC-CLIP): calibrating CLIP's last block
with its own intermediate features.

1. Anomaly tokens: a local-outlier-factor score (the authors' torch LOF, 30 neighbours, top 5 %) on the patch
   tokens entering the last block; each outlier is replaced by the mean of its non-outlier 3×3 neighbours.
2. Intermediate guidance: cosine similarities of block 9's outputs (outliers replaced the same way) aggregate the
   tokens before the last block (similarities below β = 0.4 dropped, rows normalized) and, centred and scaled by 3
   with negatives masked, give a softmax attention that is averaged with the k-k attention of the last block
   (no residual, no feed-forward; the class token after block 11 is added back with weight 0.3). Block 4's
   similarities aggregate the result once more.
3. Multi-level fusion: the sum of blocks 4..10's outputs goes through the same last block and aggregation and is
   added to the features.
Block numbers are 1-based here; the options are the authors' 0-based indices into the blocks' outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from naclip.encoder import DenseEncoder, Taps
from naclip.methods import register_method
from naclip.methods.base import Method, TrunkState

LOF_CHUNK_ELEMENTS = 2**24  # pairwise differences held at once per crop (64 MB of float32)


def lof_outliers(tokens: Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> Tensor:
    """The authors' torch LOF on one crop's tokens (P, C): a (P,) mask of the tokens whose score exceeds the
    (1 - contamination) quantile of all scores.

    As their ``lof_pytorch``: squared Euclidean distances, the n nearest neighbours besides the token itself,
    reachability max(d(p, o), k-distance(p)) with p's own k-distance, lrd = n / mean reachability, LOF = mean of
    the neighbours' lrd over p's. ``n_neighbors`` is capped at P - 1 for grids too small for it.
    """
    count = tokens.shape[0]
    rows = max(1, LOF_CHUNK_ELEMENTS // (count * tokens.shape[1]))
    dist = torch.cat(
        [torch.norm(tokens[r : r + rows, None] - tokens[None, :], dim=2, p=2) ** 2 for r in range(0, count, rows)]
    )
    k = min(n_neighbors, count - 1)
    knn_dist, knn_index = torch.topk(dist, k=k + 1, largest=False)
    knn_dist, knn_index = knn_dist[:, 1:], knn_index[:, 1:]
    reach = torch.max(knn_dist, knn_dist[:, -1:].expand_as(knn_dist))
    lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_index] / lrd.unsqueeze(1)).mean(dim=1)
    return lof > torch.quantile(lof.float(), 1 - contamination)


def replace_outliers(tokens: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each outlier patch token (n, P, C) replaced by the mean of its non-outlier 8-neighbours (kept if none)."""
    n, count, channels = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(n, channels, *grid)
    keep = (~outliers).to(tokens.dtype).view(n, 1, *grid)
    kernel = torch.ones(channels, 1, 3, 3, device=tokens.device, dtype=tokens.dtype)
    kernel[:, 0, 1, 1] = 0
    sums = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), kernel, groups=channels)
    valid = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel[:1])  # (n, 1, rows, cols) non-outlier neighbours
    update = (1 - keep) * (valid > 0).to(tokens.dtype)
    means = sums / valid.masked_fill(valid == 0, 1)
    fmap = fmap * (1 - update) + means * update
    return fmap.reshape(n, channels, count).transpose(1, 2)


def authors_placement(outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """Outlier masks (n, P) moved to where the authors' code puts them: flat index i at (i // rows, i % rows).

    Their ``mean_interpolation`` divides by the grid's first side (``feat_w``, the row count) where the row-major
    position is (i // cols, i % cols): the same on square grids (every crop of their protocol), elsewhere it moves
    the outliers, or indexes outside the grid and fails; a crop where it would fail keeps the true positions.
    """
    rows, cols = grid
    if rows == cols:
        return outliers
    index = torch.arange(rows * cols, device=outliers.device)
    row, col = index // rows, index % rows
    inside = (row < rows) & (col < cols)
    moved = []
    for mask in outliers:
        if (mask & ~inside).any():
            moved.append(mask)
        else:
            placed = torch.zeros_like(mask)
            placed[(row * cols + col)[mask]] = True
            moved.append(placed)
    return torch.stack(moved)


def cosine_similarity(tokens: Tensor) -> Tensor:
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return torch.matmul(unit, unit.transpose(-2, -1))  # (n, P, P)


def aggregate(tokens: Tensor, similarity: Tensor, beta: float) -> Tensor:
    """Tokens (n, P, C) averaged with the row-normalized similarities (n, P, P) that reach β."""
    corr = similarity.masked_fill(similarity < beta, 0.0)
    return torch.matmul(corr / (corr.sum(dim=-1, keepdim=True) + 1e-6), tokens)


class SCCLIP(Method):
    """SC-CLIP's calibrated last block.

    Args:
        encoder: the tower.
        pre_adjust_idx: block output (0-based) whose similarities guide the last block (authors: 8).
        post_adjust_idx: block output whose similarities aggregate the result (authors: 3).
        multi_start_idx, multi_end_idx: block outputs [start, end) summed for multi-level fusion (authors: 3, 10).
        res_cls: weight of the class token added back after the last block (authors: 0.3).
        beta: similarities below it do not aggregate (authors: 0.4).
        n_neighbors, contamination: LOF's neighbours and outlier share (authors: 30, 0.05).
    """

    def __init__(
        self,
        encoder: DenseEncoder,
        pre_adjust_idx: int = 8,
        post_adjust_idx: int = 3,
        multi_start_idx: int = 3,
        multi_end_idx: int = 10,
        res_cls: float = 0.3,
        beta: float = 0.4,
        n_neighbors: int = 30,
        contamination: float = 0.05,
    ) -> None:
        super().__init__(encoder)
        encoder.require_class_token("method=scclip (its residual class token)")
        last = encoder.num_blocks - 1
        outputs = {pre_adjust_idx, post_adjust_idx, *range(multi_start_idx, multi_end_idx)}
        if multi_end_idx <= multi_start_idx or not all(0 <= i < last for i in outputs):
            raise ValueError(
                f"scclip block outputs must lie in [0, {last}) with multi_start_idx < multi_end_idx, got pre "
                f"{pre_adjust_idx}, post {post_adjust_idx}, multi [{multi_start_idx}, {multi_end_idx})"
            )
        if n_neighbors < 1 or not 0 < contamination < 1:
            raise ValueError(
                f"scclip needs n_neighbors >= 1 and 0 < contamination < 1, got {n_neighbors}, {contamination}"
            )
        self.pre, self.post = pre_adjust_idx, post_adjust_idx
        self.multi = range(multi_start_idx, multi_end_idx)
        self.res_cls, self.beta = float(res_cls), float(beta)
        self.n_neighbors, self.contamination = int(n_neighbors), float(contamination)
        # the output of block i is the input of block i + 1; the last block's input is the trunk's own output
        self.taps = Taps(inputs=frozenset(i + 1 for i in outputs if i + 1 < last))

    def extra_repr(self) -> str:
        return (
            f"pre={self.pre}, post={self.post}, multi=[{self.multi.start}, {self.multi.stop}), res_cls={self.res_cls}"
        )

    def output(self, state: TrunkState, block: int) -> Tensor:
        """Tokens (n, 1+N, C) leaving a block (0-based)."""
        return state.x if block + 1 == self.encoder.num_blocks - 1 else state.inputs[block + 1]

    def guided_block(self, tokens: Tensor, guide: Tensor) -> Tensor:
        """The last block on patch tokens (n, P, C): (softmax of the guide + softmax(k kᵀ/√d)) / 2, projected out."""
        _, k, v = self.encoder.qkv(tokens)
        guide = (guide - guide.mean(dim=(-2, -1), keepdim=True)) * 3.0
        attn = guide.masked_fill(guide < 0.0, float("-inf")).softmax(dim=-1).unsqueeze(1)  # same for every head
        attn = attn + (torch.matmul(k, k.transpose(-2, -1)) * k.shape[-1] ** -0.5).softmax(dim=-1)
        return self.encoder.attn_proj(torch.matmul(attn / 2, v))

    def features(self, state: TrunkState) -> Tensor:
        prefix, grid = self.encoder.num_prefix_tokens, state.grid
        cls, patches = state.x[:, :1], state.x[:, prefix:]
        outliers = torch.stack([lof_outliers(p, self.n_neighbors, self.contamination) for p in patches])
        outliers = authors_placement(outliers, grid)
        x = replace_outliers(patches, outliers, grid)
        guide = cosine_similarity(replace_outliers(self.output(state, self.pre)[:, prefix:], outliers, grid))
        x = aggregate(x, guide, self.beta)
        x = self.guided_block(x, guide) + self.res_cls * cls
        after = cosine_similarity(self.output(state, self.post)[:, prefix:])
        x = aggregate(x, after, self.beta)
        fused = self.output(state, self.multi[0])
        for i in self.multi[1:]:
            fused = fused + self.output(state, i)
        fused = self.guided_block(fused[:, prefix:], guide) + self.res_cls * fused[:, :1]
        x = x + aggregate(fused, after, self.beta)
        feats = self.encoder.project(x)  # patch tokens only: the class token left with the outlier step
        return feats.reshape(x.shape[0], grid[0], grid[1], -1)


register_method("scclip", SCCLIP, description="SC-CLIP: anomaly-token resolution, intermediate guidance, fusion")
