"""scripts/bench.py: its timing and statistics helpers, its argument checks, and a --quick end-to-end run."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("naclip_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_interleaved_calls_every_function_once_per_round_in_rotating_order(bench):
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.time_interleaved(fns, repeats=4, warmup=2, sync=lambda: None)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up first, untimed
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_time_interleaved_rejects_zero_repeats(bench):
    with pytest.raises(ValueError, match="repeats"):
        bench.time_interleaved({"a": lambda: None}, repeats=0, warmup=0)


def test_statistics_match_a_hand_computation(bench):
    assert bench.quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 3.0, 4.0)
    stats = bench.ms_stats("x", [0.001, 0.002, 0.003, 0.004, 0.005])
    assert stats == pytest.approx({"x_ms": 3.0, "x_iqr_ms": 2.0})
    # per-round ratios 2, 2, 3 → median 2, quartiles by linear interpolation 2 and 2.5
    assert bench.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == pytest.approx(
        {"ratio": 2.0, "ratio_p25": 2.0, "ratio_p75": 2.5}
    )


def test_slide_crops_are_the_segmenter_windows(bench):
    image = torch.arange(3 * 336 * 448, dtype=torch.float32).reshape(3, 336, 448)
    crops = bench.slide_crops(image)
    assert crops.shape == (6, 3, 224, 224)  # 2 rows × 3 columns with stride 112
    assert torch.equal(crops[0], image[:, :224, :224])
    assert torch.equal(crops[-1], image[:, 112:, 224:])


def test_quick_profile_and_explicit_values(bench):
    args = bench.parse_args(["--quick"])
    assert (args.models, args.repeats, args.memory_model) == (["ViT-B-32"], 2, "ViT-B-32")
    args = bench.parse_args(["--models", "ViT-B-16", "--repeats", "3"])
    assert (args.models, args.repeats, args.memory_model) == (["ViT-B-16"], 3, "ViT-L-14")
    assert bench.parse_args(["--precision", "fp16"]).precision == "fp16"  # half precision runs on the CPU too


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "ViT-Q-99"], "unknown open_clip model 'ViT-Q-99'"),
        (["--repeats", "0"], "must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_test_waits_under_a_wall_clock_limit():
    """A loaded CI machine may take any time: no subprocess or notebook call in the suite carries a `timeout=`."""
    offenders = []
    for path in sorted(SCRIPT.parents[1].joinpath("tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "timeout" for k in node.keywords):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


@pytest.mark.slow
def test_quick_run_writes_complete_json(tmp_path):
    out = tmp_path / "tmp" / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--memory", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Encoder: NACLIP DenseEncoder vs open_clip" in proc.stdout
    result = json.loads(out.read_text())
    assert {"device", "torch", "threads", "encoder", "batching", "prior", "text", "memory", "data"} <= set(result)
    assert result["data"]["opencv_ms"] > 0 and result["data"]["pil_torch_ms"] > 0
    assert result["data"]["resized_size"][0] == 336
    assert result["threads"] >= 1

    combos = {(r["model"], r["attention"], r["arch"]) for r in result["encoder"]}
    attentions = ("vanilla", "kk_sim", "n_only", "full", "value", "qq", "csa")
    archs = ("vanilla", "reduced")
    assert combos == {("ViT-B-32", a, r) for a in attentions for r in archs}
    for row in result["encoder"]:
        assert row["naclip_ms"] > 0 and row["open_clip_ms"] > 0 and row["ratio"] > 0

    batching = result["batching"]
    assert batching["crops"] == batching["images"] * 2  # 224×280 → 1 row × 2 columns of windows
    assert batching["batched_ms"] > 0 and batching["per_crop_ms"] > 0

    assert set(result["prior"]) == {"sigma", "14x14", "64x64"}
    assert result["prior"]["64x64"]["tokens"] == 64 * 64 + 1
    assert result["prior"]["14x14"]["cached_us"] > 0

    text = result["text"]
    assert text["prompts"] == text["names"] * text["templates"] and text["templates"] == 80
    assert text["trimmed_tokens"] < text["full_tokens"] == 77
    assert 0 <= text["max_deviation"] <= 1e-5  # exactness of trimming is math, not timing
    assert text["cache_hit_equal"] is True

    memory = result["memory"]
    assert memory["model"] == "ViT-B-32" and memory["classes"] == 19
    assert memory["peak_mb"] > 0 and memory["peak_mb"] >= memory["baseline_mb"] - 1


@pytest.mark.slow
def test_quick_proxy_run_times_both_methods_and_measures_their_memory(tmp_path):
    out = tmp_path / "proxy.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--proxy-only", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["proxy"]
    assert result["proxy"] == "dino_b8" and result["crop"] == 224 and result["crops"] == 2
    assert [row["method"] for row in result["time"]] == ["clip alone (naclip)", "proxyclip", "cass"]
    assert result["time"][0]["ratio"] == 1.0
    assert all(row["per_crop_ms"] > 0 and row["ratio"] > 0 for row in result["time"])
    assert [row["method"] for row in result["memory"]] == ["naclip", "proxyclip", "cass"]
    for row in result["memory"]:
        assert row["image_size"] == [224, 448] and row["crops"] == 3  # 224×448 in 224² windows, stride 112
        assert row["peak_mb"] > 0 and row["peak_mb"] >= row["baseline_mb"] - 1
    assert "ms/crop" in proc.stdout and "x CLIP alone" in proc.stdout
