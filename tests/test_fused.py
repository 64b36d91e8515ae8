"""Fused sweeps: one trunk pass serves many heads, bit for bit; the fused launcher behaves like the basic one."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composing import compose_config, evaluate_job
from hydra.core.global_hydra import GlobalHydra
from processes import SWEEP_SMOKE, comparable, sweep_cli, sweep_results

from naclip import DenseEncoder, FusedSegmenter, Segmenter, slide_windows
from naclip import config as naclip_config
from naclip.methods import LastBlock

CONF = Path(naclip_config.config_dir())
NAMES = ["black background", "red circle", "green square", "blue triangle"]
ONE_TEMPLATE = ("a photo of a {}.",)
VARIANTS = [
    {"sigma": 2.0},
    {"sigma": 6.0},
    {"attention": "kk_sim"},
    {"attention": "vanilla", "arch": "vanilla"},
    {"pamr": True},
    {"prob_thd": 0.333, "logit_scale": 30.0},
]


pytestmark = pytest.mark.usefixtures("isolated_cached")


def images() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(3, 96, 128), torch.randn(3, 64, 96)]


@pytest.mark.parametrize(
    ("slide_crop", "pad_crops"), [(64, False), (0, False), (100, True)], ids=["slide", "whole", "padded-crops"]
)  # 100: 128-wide images get 100-wide crops, padded
def test_fused_segmenter_equals_each_variant_alone_bit_for_bit(b32, cache, slide_crop, pad_crops):
    fused = FusedSegmenter.create(
        b32,
        NAMES,
        VARIANTS,
        cache_dir=cache,
        templates=ONE_TEMPLATE,
        slide_crop=slide_crop,
        slide_stride=32,
        crop_batch_size=3,
        pad_crops=pad_crops,
    )
    ims = images()
    logits, labels = fused.logits_list(ims), fused.predict_list(ims, [(48, 64), None])
    assert len(logits) == len(labels) == len(VARIANTS)
    for v, kwargs in enumerate(VARIANTS):
        alone = Segmenter(
            b32,
            NAMES,
            templates=ONE_TEMPLATE,
            slide_crop=slide_crop,
            slide_stride=32,
            crop_batch_size=3,
            pad_crops=pad_crops,
            **kwargs,
        )
        for got, want in zip(logits[v], alone.logits_list(ims), strict=True):
            assert torch.equal(got, want)
        for got, want in zip(labels[v], alone.predict_list(ims, [(48, 64), None]), strict=True):
            assert torch.equal(got, want)
    assert not torch.equal(logits[0][0], logits[1][0])  # the variants do differ


def test_fused_predict_stacks_each_variant(b32, cache):
    fused = FusedSegmenter.create(
        b32, NAMES, VARIANTS[:2], cache_dir=cache, templates=ONE_TEMPLATE, slide_crop=64, slide_stride=32
    )
    batch = torch.randn(2, 3, 64, 96)
    out = fused.predict(batch)
    assert [tuple(o.shape) for o in out] == [(2, 64, 96)] * 2
    assert torch.equal(out[1], fused.variants[1].predict(batch))


def test_trunk_runs_once_per_chunk_for_all_variants(b32, cache):
    """Blocks 1..L-1 run once per chunk of crops, whatever the number of variants; the last block once per variant."""
    fused = FusedSegmenter.create(
        b32, NAMES, VARIANTS, cache_dir=cache, templates=ONE_TEMPLATE, slide_crop=64, slide_stride=32, crop_batch_size=3
    )
    blocks = b32.visual.transformer.resblocks
    calls = {"first": 0, "last": 0}
    hooks = [
        blocks[0].mlp.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1)),
        blocks[-1].ln_1.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1)),
    ]
    try:
        fused.predict_list(images())
    finally:
        for hook in hooks:
            hook.remove()
    crops = len(slide_windows(96, 128, 64, 32)) + len(slide_windows(64, 96, 64, 32))  # all 64×64: one shape
    assert crops == 6 + 2
    chunks = math.ceil(crops / 3)
    assert calls == {"first": chunks, "last": chunks * len(VARIANTS)}


def test_variants_with_different_position_rules_run_one_trunk_pass_per_rule(b32, cache):
    """GEM and CLIP Surgery resize position embeddings their authors' way, so on a non-pretraining grid their trunk
    differs from NACLIP's: one pass per distinct rule per chunk (variants of one rule still share it), and every
    variant still equals itself alone bit for bit."""
    variants = [
        {"sigma": 2.0},
        {"method": "gem"},
        {"method": "clip_surgery"},
        {"method": "gem", "method_options": {"iterations": 2}},
        {"attention": "vanilla", "arch": "vanilla"},
    ]
    fused = FusedSegmenter.create(
        b32, NAMES, variants, cache_dir=cache, templates=ONE_TEMPLATE, slide_crop=64, slide_stride=32, crop_batch_size=3
    )
    ims = images()
    alone = [variant.logits_list(ims) for variant in fused.variants]
    calls = []
    hook = b32.visual.transformer.resblocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        logits = fused.logits_list(ims)
    finally:
        hook.remove()
    chunks = math.ceil((6 + 2) / 3)  # 64-pixel crops of the two images, as in the test above
    assert len(calls) == chunks * 3  # three rules: NACLIP's (two variants), GEM's (two), CLIP Surgery's (one)
    for got, want in zip(logits, alone, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert (logits[1][0] - logits[3][0]).abs().max() > 1e-4  # GEM's two variants differ by their own option


class OneCropPerForward(LastBlock):
    """NACLIP's last block from a method that caps its trunk forwards at one crop (as CASS does)."""

    crops_per_forward = 1


def test_variants_with_other_chunking_get_their_own_trunk_passes(b32, cache):
    """A method's crops_per_forward caps its chunks below crop_batch_size; fused, each chunking gets its own trunk
    passes and every variant still equals itself alone bit for bit."""
    common = {"templates": ONE_TEMPLATE, "cache_dir": cache, "slide_crop": 64, "slide_stride": 32}
    capped = Segmenter(b32, NAMES, crop_batch_size=3, method=OneCropPerForward(DenseEncoder(b32)), **common)
    variants = [
        Segmenter(b32, NAMES, crop_batch_size=3, **common),
        capped,
        Segmenter(b32, NAMES, crop_batch_size=2, sigma=2.0, **common),
    ]
    ims = images()
    crops, _ = capped.crops(ims)
    assert capped.chunk_size == 1 and all(len(chunk) == 1 for chunk in capped.chunks(crops))
    one_by_one = Segmenter(b32, NAMES, crop_batch_size=1, **common)
    alone = [variant.logits_list(ims) for variant in variants]
    assert all(torch.equal(a, b) for a, b in zip(alone[1], one_by_one.logits_list(ims), strict=True))
    calls = []
    hook = b32.visual.transformer.resblocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        logits = FusedSegmenter(variants).logits_list(ims)
    finally:
        hook.remove()
    assert len(calls) == math.ceil(8 / 3) + 8 + math.ceil(8 / 2)  # 8 crops of one shape in chunks of 3, 1 and 2
    for got, want in zip(logits, alone, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_variants_that_cannot_share_a_pass_are_rejected(b32, b16, cache):
    common = {"templates": ONE_TEMPLATE, "cache_dir": cache}
    with pytest.raises(ValueError, match="slide_crop"):
        FusedSegmenter([Segmenter(b32, NAMES, slide_crop=64, **common), Segmenter(b32, NAMES, slide_crop=96, **common)])
    with pytest.raises(ValueError, match="slide_stride"):
        FusedSegmenter(
            [
                Segmenter(b32, NAMES, slide_crop=64, slide_stride=32, **common),
                Segmenter(b32, NAMES, slide_crop=64, slide_stride=48, **common),
            ]
        )
    with pytest.raises(ValueError, match="pad_crops"):
        FusedSegmenter([Segmenter(b32, NAMES, **common), Segmenter(b32, NAMES, pad_crops=True, **common)])
    with pytest.raises(ValueError, match="model"):
        FusedSegmenter([Segmenter(b32, NAMES, **common), Segmenter(b16, NAMES, **common)])
    with pytest.raises(ValueError, match="at least one"):
        FusedSegmenter([])


def test_grouping_by_shared_work():
    from naclip.sweep import group_jobs

    jobs = [
        ["attention.sigma=2"],  # 0
        ["attention.sigma=7", "refine=pamr", "dataset.prob_thd=0.2", "dataset.logit_scale=50"],  # 1: head only
        ["attention=kk_sim", "arch=vanilla", "logger=wandb", "force=true"],  # 2: head and bookkeeping
        ["backbone=b16"],  # 3: another backbone
        ["backbone.precision=bf16"],  # 4: another precision
        ["dataset.short_side=128"],  # 5: another resize
        ["dataset.slide_crop=96"],  # 6: other crops
        ["max_images=1"],  # 7: other images
        ["dataset=voc21"],  # 8: another dataset
        ["crop_batch_size=2"],  # 9: another chunking
        ["attention.sigma=3", "dataset.short_side=128"],  # 10: with 5
        ["dataset.slide_stride=48"],  # 11: the same crop size, other windows
    ]
    cfgs = [compose_config([*SWEEP_SMOKE, *o]) for o in jobs]
    assert group_jobs(cfgs) == [[0, 1, 2], [3], [4], [5, 10], [6], [7], [8], [9], [11]]


def test_group_evaluation_equals_each_job_alone(tmp_path):
    from naclip.sweep import evaluate_group

    sweep = [["attention.sigma=2"], ["attention.sigma=8"], ["attention=kk_sim", "arch=vanilla"], ["refine=pamr"]]
    alone = [evaluate_job([*SWEEP_SMOKE, *o], tmp_path / str(i)) for i, o in enumerate(sweep)]
    assert len({r["miou"] for r in alone}) > 1  # the jobs' numbers differ, so a mixed-up head would show
    done = evaluate_group([compose_config([*SWEEP_SMOKE, *o]) for o in sweep])
    for want, got in zip(alone, done.outcomes, strict=True):
        assert got.error is None
        assert got.scores["miou"] == want["miou"]
        assert got.scores["pixel_acc"] == want["pixel_acc"]
        assert got.scores["per_class_list"] == list(want["per_class_iou"].values())
        assert got.scores["num_images"] == want["num_images"] == 2


def test_a_job_whose_segmenter_cannot_be_built_fails_alone(tmp_path):
    from naclip.sweep import evaluate_group

    broken = ["refine=pamr", "refine.dilations=[]"]
    cfgs = [compose_config([*SWEEP_SMOKE, "attention.sigma=2"]), compose_config([*SWEEP_SMOKE, *broken])]
    want = evaluate_job([*SWEEP_SMOKE, "attention.sigma=2"], tmp_path / "a")
    done = evaluate_group(cfgs)
    assert done.outcomes[0].scores["miou"] == want["miou"]
    assert isinstance(done.outcomes[1].error, ValueError) and done.outcomes[1].scores is None


def sweep_in_process(monkeypatch, overrides: list[str]) -> None:
    """`python -m naclip.run -m <overrides>` in this process (Hydra's app, launchers and callbacks, all of it)."""
    from naclip import run

    monkeypatch.setattr(sys, "argv", ["naclip.run", "-m", *overrides])
    GlobalHydra.instance().clear()
    run.main()


def test_fused_sweep_records_each_job_once_and_only_its_own_sweep(tmp_path, monkeypatch, capsys):
    """In-process fused sweeps: a fused job runs only in its group's pass, gets its own text-classifier time and
    its status.json; a re-run records reused jobs as skipped and a new one as finished; an older sweep's
    failure left in the same folder counts in neither summary."""
    from naclip import run, sweep

    sweep_dir = tmp_path / "outputs" / "sweeps" / "default"
    (sweep_dir / "stale").mkdir(parents=True)
    (sweep_dir / "stale" / "status.json").write_text(json.dumps({"status": "failed", "error": "x", "sweep": "old"}))
    alone, groups, built = [], [], []
    evaluate, evaluate_group, build = run.evaluate, sweep.evaluate_group, naclip_config.build_segmenter

    def counting_build(cfg, names, protocol, device, timings=None, model=None, **kwargs):  # a time per segmenter
        out = build(cfg, names, protocol, device, timings, model, **kwargs)
        built.append(cfg.attention.sigma)
        timings["seconds_text_classifier"] = 100.0 + len(built)
        return out

    monkeypatch.setattr(run, "evaluate", lambda cfg, out: alone.append(cfg.attention.sigma) or evaluate(cfg, out))
    monkeypatch.setattr(sweep, "evaluate_group", lambda cfgs: groups.append(len(cfgs)) or evaluate_group(cfgs))
    monkeypatch.setattr(naclip_config, "build_segmenter", counting_build)

    def statuses() -> dict[str, tuple[str, float]]:
        found = {}
        for path in sweep_dir.glob("*/status.json"):
            status = json.loads(path.read_text())
            if status["sweep"] != "old":
                sigma = json.loads((path.parent / "result.json").read_text())["config"]["attention"]["sigma"]
                found[sigma] = status["status"]
        return found

    sweep_in_process(monkeypatch, [*SWEEP_SMOKE, "max_images=1", "attention.sigma=2,6", "hydra/launcher=fused"])
    assert (alone, groups, built) == ([], [2], [2.0, 6.0])  # one pass for both, neither job run again alone
    assert statuses() == {2.0: "finished", 6.0: "finished"}
    texts = {
        r["config"]["attention"]["sigma"]: r["seconds_text_classifier"]
        for r in sweep_results(tmp_path / "outputs").values()
    }
    assert texts == {2.0: 101.0, 6.0: 102.0}
    assert "sweep summary: 2 finished, 0 skipped, 0 failed" in capsys.readouterr().out

    sweep_in_process(monkeypatch, [*SWEEP_SMOKE, "max_images=1", "attention.sigma=2,6,9", "hydra/launcher=fused"])
    assert sorted(alone) == [2.0, 6.0, 9.0] and groups == [2]  # the two finished jobs reused, the new one alone
    assert statuses() == {2.0: "skipped", 6.0: "skipped", 9.0: "finished"}
    out = capsys.readouterr().out
    assert "sweep summary: 1 finished, 2 skipped, 0 failed" in out and "stale" not in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep",
    [
        ["attention.sigma=1,2,5,9"],
        ["attention=vanilla,kk_sim,n_only,full", "arch=vanilla,reduced"],
        ["refine=none,pamr", "attention.sigma=3,5"],
    ],
    ids=["sigma", "attention-x-arch", "refine"],
)
def test_fused_launcher_writes_what_the_basic_launcher_writes(tmp_path, cache, sweep):
    basic = sweep_cli([*SWEEP_SMOKE, *sweep], tmp_path / "basic", cache)
    fused = sweep_cli([*SWEEP_SMOKE, *sweep, "hydra/launcher=fused"], tmp_path / "fused", cache)
    assert basic.returncode == 0, basic.stderr[-3000:]
    assert fused.returncode == 0, fused.stderr[-3000:]
    want, got = sweep_results(tmp_path / "basic"), sweep_results(tmp_path / "fused")
    jobs = math.prod(len(s.split("=", 1)[1].split(",")) for s in sweep)
    assert len(want) == jobs and set(got) == set(want)
    assert len({r["miou"] for r in want.values()}) > 1
    assert "fused pass shared by" in fused.stderr + fused.stdout
    for name, result in want.items():
        assert comparable(got[name]) == comparable(result), name
        folder = tmp_path / "fused" / "sweeps" / "default" / name
        assert {p.name for p in (folder / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert "result written" in (folder / "run.log").read_text()


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("naclip.run: error:")]


@pytest.mark.slow
def test_fused_launcher_failure_skip_and_force(tmp_path, cache):
    out = tmp_path / "fused"
    first = sweep_cli([*SWEEP_SMOKE, "attention.sigma=2,-1,6", "hydra/launcher=fused"], out, cache)
    alone = sweep_cli([*SWEEP_SMOKE, "attention.sigma=-1"], tmp_path / "basic", cache)
    assert first.returncode == alone.returncode == 1  # a sweep with a failed job, under either launcher
    # the job's own line, then the summary's count: the same job line as the basic launcher prints
    assert len(error_lines(first)) == len(error_lines(alone)) == 2 and error_lines(first)[0] == error_lines(alone)[0]
    assert "sigma" in error_lines(alone)[0] and "Traceback" not in first.stderr
    assert "sweep summary: 2 finished, 0 skipped, 1 failed" in first.stdout
    done = sweep_results(out)
    assert sorted(r["config"]["attention"]["sigma"] for r in done.values()) == [2.0, 6.0]
    failed = [p for p in (out / "sweeps" / "default").iterdir() if "sigma=-1" in p.name]
    assert len(failed) == 1 and not (failed[0] / "result.json").exists()
    assert json.loads((failed[0] / "status.json").read_text())["status"] == "failed"

    again = sweep_cli([*SWEEP_SMOKE, "attention.sigma=2,6", "hydra/launcher=fused"], out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (finished result in") == 2
    assert sweep_results(out) == done

    forced = sweep_cli([*SWEEP_SMOKE, "attention.sigma=2,6", "force=true", "hydra/launcher=fused"], out, cache)
    assert forced.returncode == 0, forced.stderr[-3000:]
    redone = sweep_results(out)
    assert set(redone) == set(done)
    for name, result in redone.items():
        assert result["miou"] == done[name]["miou"]
        assert result["config"]["force"] is True


@pytest.mark.slow
def test_fused_launcher_runs_a_finished_jobs_partner_alone(tmp_path, cache):
    out = tmp_path / "fused"
    assert sweep_cli([*SWEEP_SMOKE, "attention.sigma=2"], out, cache).returncode == 0
    proc = sweep_cli([*SWEEP_SMOKE, "attention.sigma=2,6", "hydra/launcher=fused"], out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped (finished result in") == 1
    assert "fused pass" not in proc.stderr + proc.stdout  # one job left to run: it runs alone
    assert len(sweep_results(out)) == 2


@pytest.mark.slow
def test_readme_fused_example_runs(cache):
    """The README's FusedSegmenter example, with random weights instead of the (unavailable here) OpenAI ones."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Fused sweeps\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'pretrained="openai"' in block
    namespace: dict = {}
    exec(block.replace('pretrained="openai"', "pretrained=None"), namespace)
    labels = namespace["labels"]
    assert len(labels) == 10 and all(lb.shape == (1, 224, 448) and lb.dtype == torch.int64 for lb in labels)
