"""Tests for naclip.metrics.IoUMetric: mmseg's dataset-level mIoU, checked against explicit counting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from naclip.metrics import IoUMetric

IGNORE = 255


def _count_reference(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict:
    """mmseg's definition by explicit per-pixel counting: dataset-level intersections and unions."""
    inter = [0] * num_classes
    area_target = [0] * num_classes
    area_pred = [0] * num_classes
    for pred, target in pairs:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
            if t == IGNORE:
                continue
            area_target[t] += 1
            area_pred[p] += 1
            if p == t:
                inter[t] += 1
    per_class = []
    for k in range(num_classes):
        union = area_target[k] + area_pred[k] - inter[k]
        per_class.append(None if union == 0 else 100.0 * inter[k] / union)
    present = [v for v in per_class if v is not None]
    return {
        "miou": sum(present) / len(present),
        "per_class_iou": per_class,
        "pixel_acc": 100.0 * sum(inter) / sum(area_target),
    }


def _assert_result_equal(got: dict, expected: dict) -> None:
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert got["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-9)
    assert len(got["per_class_iou"]) == len(expected["per_class_iou"])
    for g, e in zip(got["per_class_iou"], expected["per_class_iou"], strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            assert g == pytest.approx(e, abs=1e-9)


def _random_pairs(seed: int, num_classes: int, count: int, shape=(6, 7)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        target = torch.randint(0, num_classes, shape, generator=gen)
        target[torch.rand(shape, generator=gen) < 0.15] = IGNORE
        pred = torch.randint(0, num_classes, shape, generator=gen)
        pairs.append((pred, target))
    return pairs


def test_hand_worked_example() -> None:
    # Pixels (target, pred): (0,0) (0,1) (1,1) / (1,1) (2,0) (255,2 -> ignored). Class 3 never appears.
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    metric = IoUMetric(num_classes=4)
    metric.update(pred, target)
    result = metric.compute()
    # class 0: inter 1, union 2 + 2 - 1 = 3; class 1: inter 2, union 2 + 3 - 2 = 3; class 2: inter 0, union 1
    assert result["per_class_iou"] == pytest.approx([100 / 3, 200 / 3, 0.0, None])
    assert result["miou"] == pytest.approx(100 / 3)  # mean of the three present classes only
    assert result["pixel_acc"] == pytest.approx(60.0)  # 3 correct of 5 non-ignored pixels
    expected_confmat = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(metric.confmat, expected_confmat)  # rows = target, cols = pred
    assert metric.confmat.dtype == torch.int64


def test_matches_explicit_counting_on_random_batches() -> None:
    pairs = _random_pairs(seed=0, num_classes=5, count=4)
    metric = IoUMetric(num_classes=5)
    for pred, target in pairs:
        metric.update(pred, target)
    _assert_result_equal(metric.compute(), _count_reference(pairs, 5))


def test_zero_union_class_is_none_and_left_out_of_mean() -> None:
    target = torch.tensor([[0, 0], [2, 2]])
    pred = torch.tensor([[0, 2], [2, 2]])
    metric = IoUMetric(num_classes=3)
    metric.update(pred, target)
    result = metric.compute()
    assert result["per_class_iou"][1] is None
    assert result["miou"] == pytest.approx((50.0 + 200 / 3) / 2)  # class 0: 1/2, class 2: 2/3
    assert not math.isnan(result["miou"])


def test_ignored_pixels_do_not_count_whatever_the_prediction() -> None:
    target = torch.tensor([[1, 1, IGNORE, IGNORE]])
    metric_a = IoUMetric(num_classes=2)
    metric_a.update(torch.tensor([[1, 1, 0, 1]]), target)
    metric_b = IoUMetric(num_classes=2)
    metric_b.update(torch.tensor([[1, 1, 200, -3]]), target)  # invalid preds only where ignored
    for metric in (metric_a, metric_b):
        result = metric.compute()
        assert result["per_class_iou"] == [None, 100.0]
        assert result["pixel_acc"] == 100.0
        assert metric.confmat.sum().item() == 2


def test_custom_ignore_index() -> None:
    target = torch.tensor([[0, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 0, 1]])
    metric = IoUMetric(num_classes=2, ignore_index=2)
    metric.update(pred, target)
    assert metric.compute()["miou"] == 100.0


def test_dataset_level_sum_not_mean_of_per_image_iou() -> None:
    # Image A: perfect on class 0 (per-image mIoU 1.0). Image B: class 0 IoU 0, class 1 IoU 3/4 -> 0.375.
    pairs = [
        (torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 0], [0, 0]])),
        (torch.tensor([[1, 1], [1, 1]]), torch.tensor([[0, 1], [1, 1]])),
    ]
    accumulated = IoUMetric(num_classes=2)
    for pred, target in pairs:
        accumulated.update(pred, target)
    concatenated = IoUMetric(num_classes=2)
    concatenated.update(torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]))
    stacked = IoUMetric(num_classes=2)
    stacked.update(torch.stack([p for p, _ in pairs]), torch.stack([t for _, t in pairs]))  # (B, H, W)

    result = accumulated.compute()
    # Dataset level: class 0 inter 4 / union 5, class 1 inter 3 / union 4.
    assert result["miou"] == pytest.approx((80.0 + 75.0) / 2)
    assert result["miou"] != pytest.approx(100 * (1.0 + 0.375) / 2)
    _assert_result_equal(concatenated.compute(), result)
    _assert_result_equal(stacked.compute(), result)
    assert torch.equal(accumulated.confmat, concatenated.confmat)


def test_reset_and_integer_dtypes() -> None:
    metric = IoUMetric(num_classes=3)
    metric.update(torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))
    assert metric.compute()["miou"] == 0.0
    metric.reset()
    assert metric.confmat.sum().item() == 0
    metric.update(torch.tensor([[2, 1]], dtype=torch.uint8), torch.tensor([[2, 255]], dtype=torch.uint8))
    result = metric.compute()
    assert result["per_class_iou"] == [None, None, 100.0]


def test_confmat_reflects_updates_after_compute() -> None:
    metric = IoUMetric(num_classes=2)
    metric.update(torch.tensor([[0]]), torch.tensor([[0]]))
    metric.compute()
    metric.update(torch.tensor([[1]]), torch.tensor([[0]]))
    assert torch.equal(metric.confmat, torch.tensor([[1, 1], [0, 0]]))
    assert metric.compute()["per_class_iou"] == [50.0, 0.0]


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), r"target has values \[7\]"),
        (torch.tensor([[0, 1, 1]]), torch.tensor([[-1, 3, 9]]), r"\[-1, 3, 9\]"),
        (torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), r"pred has values \[3\]"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 1, 1]]), "shape"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]]), "dtype"),
    ],
)
def test_bad_inputs_raise(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IoUMetric(num_classes=3).update(pred, target)


def test_error_lists_only_a_few_offending_values() -> None:
    target = torch.arange(10, 30).reshape(4, 5)
    with pytest.raises(ValueError, match=r"\[10, 11, 12, 13, 14\] outside") as info:
        IoUMetric(num_classes=3).update(torch.zeros_like(target), target)
    assert "15" not in str(info.value)


@pytest.mark.parametrize("num_classes", [0, -2])
def test_bad_num_classes_raises(num_classes: int) -> None:
    with pytest.raises(ValueError, match=str(num_classes)):
        IoUMetric(num_classes=num_classes)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, shards: list) -> None:
    """One rank of the gloo test: accumulate its own shard, compute (collective), save what it saw."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = IoUMetric(num_classes=4)
        for pred, target in shards[rank]:
            metric.update(pred, target)
        local = metric.confmat
        result = metric.compute()
        torch.save({"result": result, "local": local, "synced": metric.confmat}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_compute_covers_all_ranks(tmp_path: Path) -> None:
    shard0 = _random_pairs(seed=1, num_classes=3, count=2)  # classes 0..2 only
    shard1 = _random_pairs(seed=2, num_classes=4, count=3, shape=(5, 4))
    shards = [shard0, shard1]
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "dist_init"), str(tmp_path), shards),
        nprocs=2,
        join=True,
    )
    single = IoUMetric(num_classes=4)
    for pred, target in shard0 + shard1:
        single.update(pred, target)
    expected = single.compute()
    _assert_result_equal(expected, _count_reference(shard0 + shard1, 4))
    locals_sum = torch.zeros(4, 4, dtype=torch.int64)
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt")
        _assert_result_equal(saved["result"], expected)
        assert torch.equal(saved["synced"], single.confmat)
        locals_sum += saved["local"]
    assert torch.equal(locals_sum, single.confmat)
