"""Dataset-level mIoU with the same definition as mmsegmentation's ``IoUMetric``.

NACLIP's published numbers come from mmseg, which sums intersections and unions over the whole dataset
(not a mean of per-image IoUs), drops classes that never occur in either prediction or ground truth from the
mean (``nanmean``), and ignores pixels labelled ``ignore_index``. The confusion matrix is accumulated by
torchmetrics so that it is summed across processes under ``torch.distributed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = ["IoUMetric"]

# How many offending label values an error message lists.
_MAX_LISTED = 5


def _out_of_range(values: Tensor, num_classes: int) -> list[int]:
    """Up to ``_MAX_LISTED`` distinct values of ``values`` (1-D) that are not class indices."""
    bad = values[(values < 0) | (values >= num_classes)]
    return torch.unique(bad)[:_MAX_LISTED].tolist() if bad.numel() else []


class IoUMetric:
    """Accumulates a (K, K) confusion matrix (rows = target, cols = pred) and derives mIoU / pixel accuracy.

    Per-class IoU is diag / (rowsum + colsum - diag); a class with an empty union gets NaN and is left out of
    the mean, exactly as mmseg does. Under an initialized ``torch.distributed`` process group, ``compute()``
    is a collective call (every rank must make it) that returns the metric over all ranks.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"IoUMetric num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        # Ignored pixels are dropped in update(), so torchmetrics sees only valid (pred, target) pairs.
        self._metric = MulticlassConfusionMatrix(num_classes, ignore_index=None, validate_args=False).to(self.device)
        self._synced: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one image (H, W) or a batch (B, H, W) of integer label maps to the running confusion matrix.

        Pixels whose target equals ``ignore_index`` are skipped whatever the prediction there is.
        """
        if pred.shape != target.shape:
            raise ValueError(f"IoUMetric pred shape {tuple(pred.shape)} must equal target shape {tuple(target.shape)}")
        if target.ndim not in (2, 3):
            raise ValueError(f"IoUMetric expects (H, W) or (B, H, W) label maps, got shape {tuple(target.shape)}")
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"IoUMetric {name} must hold integer class indices, got dtype {t.dtype}")
        target = target.to(self.device).reshape(-1)  # (N,)
        pred = pred.to(self.device).reshape(-1)  # (N,)
        keep = target != self.ignore_index  # (N,)
        target = target[keep].long()  # (M,)
        pred = pred[keep].long()  # (M,)
        bad_target = _out_of_range(target, self.num_classes)
        if bad_target:
            raise ValueError(
                f"IoUMetric target has values {bad_target} outside [0, {self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}; check the dataset's label mapping / num_classes"
            )
        bad_pred = _out_of_range(pred, self.num_classes)
        if bad_pred:
            raise ValueError(
                f"IoUMetric pred has values {bad_pred} outside [0, {self.num_classes}) at non-ignored pixels"
            )
        self._metric.update(pred, target)
        self._synced = None

    def compute(self) -> dict:
        """Return {"miou", "per_class_iou", "pixel_acc"} in percent over all data seen (and all ranks).

        ``per_class_iou[k]`` is None where class k has an empty union; ``miou`` and ``pixel_acc`` are NaN
        when nothing countable was seen.
        """
        matrix = self._metric.compute().to(torch.int64).clone()  # (K, K), synced across ranks
        self._synced = matrix
        intersection = matrix.diagonal().double()  # (K,)
        union = matrix.sum(dim=1).double() + matrix.sum(dim=0).double() - intersection  # (K,)
        iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.nan)  # (K,)
        total = matrix.sum().item()
        pixel_acc = 100.0 * intersection.sum().item() / total if total else float("nan")
        return {
            "miou": 100.0 * torch.nanmean(iou).item(),
            "per_class_iou": [None if math.isnan(v) else 100.0 * v for v in iou.tolist()],
            "pixel_acc": pixel_acc,
        }

    def reset(self) -> None:
        """Forget everything accumulated so far (e.g. between datasets)."""
        self._metric.reset()
        self._synced = None

    @property
    def confmat(self) -> Tensor:
        """(K, K) int64 counts, rows = target, cols = pred; after compute(), summed over all ranks."""
        if self._synced is not None:
            return self._synced.clone()
        return self._metric.confmat.to(torch.int64).clone()
