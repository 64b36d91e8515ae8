"""CASS (Kim et al., CVPR 2025): spectral distillation of a proxy's attention graph into CLIP, object-presence prompts.

Per crop, as the authors' code (github.com/MICV-yonsei/CASS) does:

1. **Graph matching.** CLIP's last-block key graphs ``K_h K_hᵀ/√d`` and the proxy's (its last-block keys, resized
   bilinearly to CLIP's grid and rescaled to the range of CLIP's keys) are compared head by head through their
   top ``k_eigen`` eigenvalues (L2-, then L1-normalized, sorted, L1 distance); the Hungarian algorithm pairs the
   heads on the cost ``1 − distance``.
2. **Spectral distillation.** Each paired proxy graph is replaced by its rank-10 randomized SVD approximation
   (singular values stretched to ``[0.5·min, 1.5·max]`` except on VOC20 and Cityscapes), its diagonal zeroed and
   its range matched to CLIP's graph, then blended into it with weight ``w·scale_factor`` (w = 1 − cost).
3. The blended graph plus NACLIP's Gaussian window (no [CLS]) goes through a softmax over CLIP's values, the
   output projection (no residual, no feed-forward), final norm and projection.
4. **Object presence.** The text classifier's queries are clustered (Ward linkage of cosine distances, cut at
   ``h_threshold``); in each cluster the query the image-level [CLS] embedding matches best is moved towards the
   mean of its two best-matching patches (weight ``mean_vector_weight``); the logits are blended with the
   image-level [CLS]-text similarity (weight ``global_semantics_weight``). The image-level [CLS] comes from the
   whole image (from the crop itself when ``whole_image_semantics`` is off, as on Cityscapes).

The proxy sees the crop as the authors' code gives it: CLIP-normalized pixels mapped through the inverse of
ImageNet's normalization (with its 0.255 blue std), quantized to 8 bits, resized to a square of the crop's short
side (PIL, bicubic), then ImageNet-normalized; it runs in fp32 and its keys are rounded to fp16.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform
from torch import Tensor

from naclip.attention import attend, gaussian_prior, get_attention
from naclip.encoder import DenseEncoder
from naclip.methods import Method, TrunkState, register_method
from naclip.proxy import Proxy

# CASS maps CLIP-normalized crops back with these (ImageNet's, blue std written 0.255 in the authors' code).
_INV_MEAN = (0.485, 0.456, 0.406)
_INV_STD = (0.229, 0.224, 0.255)
SVD_RANK = 10  # the authors' energy search always stops at its first rank (the ratio is within the q values)
# torch.svd_lowrank is randomized and the authors' code draws from the global generator (mmengine seeds it with 42
# before the evaluation), one draw per head pair in head order. Seeding it with 42 per crop, in a forked RNG state,
# gives each crop the authors' draws for a crop evaluated right after that seed, independent of batching.
SVD_SEED = 42
# The head pairing often ties exactly on random weights (equal total costs); batched trunk products round the keys
# differently in the last bit and tip such ties, so the trunk runs one crop per forward, as the authors' code.
CROPS_PER_FORWARD = 1


def proxy_pixels(crop: Tensor, size: int | None = None) -> Tensor:
    """The proxy's input for one CLIP-normalized crop (3, h, w) as CASS builds it, as pixels in [0, 1].

    8-bit image of ``crop · inv_std + inv_mean``, resized (PIL bicubic) to a square of the short side, then to
    ``size`` × ``size`` (PIL bilinear) when given.
    """
    # torchvision's Normalize(-mean/std, 1/std), float32 arithmetic, as the authors' code: the 8-bit rounding
    # below is sensitive to the last bit
    shift = torch.tensor([-m / s for m, s in zip(_INV_MEAN, _INV_STD, strict=True)])[:, None, None]
    div = torch.tensor([1 / s for s in _INV_STD])[:, None, None]
    y = (crop.float().cpu() - shift) / div
    img = (y.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)
    side = min(img.shape[:2])
    pil = Image.fromarray(img).resize((side, side), Image.BICUBIC)
    if size is not None:
        pil = pil.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div(255).to(crop.device)


def proxy_keys(proxy: Proxy, state: TrunkState, size: int | None) -> list[Tensor]:
    """The proxy's last-block keys (heads, rows'·cols', d) of each crop, fp16, computed once per chunk."""
    key = f"cass:{id(proxy)}:{size}"
    if key not in state.cache:
        keys = []
        for crop in state.crops:  # crops are square in the protocol; one at a time keeps the authors' per-crop sizes
            out = proxy(proxy.normalize(proxy_pixels(crop, size))[None], dtype=torch.float32, fused=False)
            if out.keys is None:
                raise ValueError(f"proxy {proxy.name!r} exposes no last-block keys; cass needs a timm ViT proxy")
            keys.append((out.keys[0].half(), out.grid))
        state.cache[key] = keys
    return state.cache[key]


def top_eigenvalues(graphs: Tensor, k: int) -> Tensor:
    """The k largest eigenvalues (h, k) of symmetric graphs (h, N, N), in float64, descending."""
    return torch.linalg.eigvalsh(graphs.double()).flip(-1)[:, :k]


def head_matching(proxy_graphs: Tensor, clip_graphs: Tensor, k_eigen: int) -> tuple[np.ndarray, Tensor]:
    """CASS's head pairing: (col, cost) with ``col[i]`` the proxy head assigned to CLIP head i, cost (h, h).

    cost[i, j] = 1 − Σ|sort(p_i) − sort(c_j)|, p and c the top eigenvalues L2- then L1-normalized per head,
    p of proxy head i and c of CLIP head j; the Hungarian algorithm minimizes it. (The authors' code then
    blends proxy head ``col[i]`` into CLIP head i with the weight 1 − cost[i, col[i]]; kept as is.)
    """
    p = F.normalize(F.normalize(top_eigenvalues(proxy_graphs, k_eigen), p=2, dim=1), p=1, dim=-1)
    c = F.normalize(F.normalize(top_eigenvalues(clip_graphs, k_eigen), p=2, dim=1), p=1, dim=-1)
    dist = (p.sort(dim=-1).values[:, None] - c.sort(dim=-1).values[None]).abs().sum(-1)  # (h, h)
    cost = (1 - dist).float()
    _, col = linear_sum_assignment(cost.cpu().numpy())
    return col, cost


def _match_range(source: Tensor, target: Tensor) -> Tensor:
    """source rescaled linearly so that its min and max become target's."""
    lo, hi = source.min(), source.max()
    return (source - lo) / (hi - lo) * (target.max() - target.min()) + target.min()


def low_rank_graph(graph: Tensor, stretch: bool) -> Tensor:
    """Rank-10 randomized SVD approximation (float64) of one proxy graph, singular values optionally stretched to
    ``[0.5·min, 1.5·max]``, its diagonal zeroed (CASS's spectral distillation)."""
    u, s, v = torch.svd_lowrank(graph.double(), q=SVD_RANK)  # draws from the global generator
    if stretch:
        lo, hi = s.min(), s.max()
        s = (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo
    approx = u @ torch.diag(s) @ v.T
    return approx.fill_diagonal_(0)


def distilled_graph(clip_keys: Tensor, proxy_keys: Tensor, scale_factor: float, k_eigen: int, stretch: bool) -> Tensor:
    """CLIP's key graphs (h, N, N) of one crop with the paired proxy graphs blended in; keys (h, N, d), proxy keys
    already on CLIP's grid and range. Returned in CLIP's dtype. The randomized SVDs run from :data:`SVD_SEED`,
    CLIP head 0 first, in a forked RNG state (the caller's generators are left as they were)."""
    scale = clip_keys.shape[-1] ** -0.5
    clip_graphs = clip_keys @ clip_keys.transpose(1, 2) * scale
    proxy_graphs = proxy_keys @ proxy_keys.transpose(1, 2) * scale
    col, cost = head_matching(proxy_graphs, clip_graphs, k_eigen)
    blended = torch.zeros_like(clip_graphs)
    devices = [clip_graphs.device] if clip_graphs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        for i, j in enumerate(col):
            w = (1 - cost[i, j]).to(clip_graphs.device) * scale_factor
            sparse = _match_range(low_rank_graph(proxy_graphs[j], stretch), clip_graphs[i])
            blended[i] = (w * sparse + clip_graphs[i]) / (w + 1)
    return blended


def query_clusters(classifier: Tensor, h_threshold: float) -> np.ndarray:
    """Cluster id (0-based) of each query: Ward linkage of the text embeddings' cosine distances, cut at h."""
    emb = F.normalize(classifier.double().cpu(), dim=-1).numpy()
    dist = np.clip(1 - emb @ emb.T, 0, 2)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0)
    if len(emb) == 1:
        return np.zeros(1, dtype=np.int64)
    return fcluster(linkage(squareform(dist), method="ward"), t=h_threshold, criterion="distance") - 1


def presence_prompts(
    feats: Tensor, classifier: Tensor, global_sim: Tensor, clusters: np.ndarray, alpha: float
) -> Tensor:
    """CASS's object-presence text refinement for one crop: unit patch features (N, D), unit classifier (Q, D),
    image-level similarities (Q,) → the adjusted classifier (Q, D)."""
    adjusted = classifier.clone()
    sims = global_sim.cpu().numpy()
    for cluster in range(int(clusters.max()) + 1):
        members = np.flatnonzero(clusters == cluster)
        best = int(members[np.argmax(sims[members])])
        text = F.normalize(classifier[best], dim=0)
        top = torch.topk(feats @ text, min(2, feats.shape[0])).indices
        mean = F.normalize(feats[top].mean(dim=0), dim=0)
        adjusted[best] = F.normalize((1 - alpha) * text + alpha * mean, dim=0)
    return adjusted


class CASS(Method):
    """CASS's last block and text refinement on the trunk's tokens.

    Args:
        encoder: the CLIP tower's stages.
        proxy: the second vision model; its heads and head width must equal CLIP's (DINO ViT-B with CLIP ViT-B).
        sigma: the Gaussian window's standard deviation in patches.
        scale_factor, k_eigen: the proxy graph's blending weight factor and the eigenvalues compared per head.
        scale_singular_values: stretch the low-rank graph's singular values (off on VOC20 and Cityscapes).
        global_semantics_weight, mean_vector_weight, h_threshold: the object-presence refinement (per dataset).
        whole_image_semantics: image-level [CLS] of the whole image (True) or of the crop (Cityscapes).
        proxy_size: resize the proxy's input to this square (518 for DINOv2 in the authors' code); None = the
            crop's short side (DINO).
    """

    crops_per_forward = CROPS_PER_FORWARD

    def __init__(
        self,
        encoder: DenseEncoder,
        proxy: Proxy | None = None,
        sigma: float = 5.0,
        scale_factor: float = 10.0,
        k_eigen: int = 20,
        scale_singular_values: bool = True,
        global_semantics_weight: float = 0.0,
        mean_vector_weight: float = 0.0,
        h_threshold: float = 0.0,
        whole_image_semantics: bool = True,
        proxy_size: int | None = None,
    ) -> None:
        super().__init__(encoder)
        if proxy is None:
            raise ValueError("method cass needs a proxy model: set proxy=dino_b8 (see naclip.list_proxies())")
        width = encoder.visual.transformer.width if hasattr(encoder.visual.transformer, "width") else None
        if proxy.num_heads != encoder.num_heads or (width and proxy.model.embed_dim != width):
            raise ValueError(
                f"cass pairs proxy and CLIP heads: proxy {proxy.name!r} has {proxy.num_heads} heads of width "
                f"{proxy.model.embed_dim}, CLIP {encoder.num_heads} of width {width}; use a ViT-B proxy with ViT-B CLIP"
            )
        self.proxy = proxy
        self.sigma, self.scale_factor, self.k_eigen = float(sigma), float(scale_factor), int(k_eigen)
        self.scale_singular_values = bool(scale_singular_values)
        self.global_semantics_weight = float(global_semantics_weight)
        self.mean_vector_weight, self.h_threshold = float(mean_vector_weight), float(h_threshold)
        self.whole_image_semantics = bool(whole_image_semantics)
        self.proxy_size = proxy_size
        self._clusters: tuple[tuple[int, int, int], np.ndarray] | None = None

    def extra_repr(self) -> str:
        return (
            f"sigma={self.sigma}, gsw={self.global_semantics_weight}, mvw={self.mean_vector_weight}, "
            f"h={self.h_threshold}, whole_image_semantics={self.whole_image_semantics}"
        )

    def _cls(self, x: Tensor) -> Tensor:
        """Unit image-level embeddings (n, D): [CLS] after CLIP's own last block on trunk tokens (n, 1+N, C)."""
        q, k, v = self.encoder.qkv(x)
        out = self.encoder.block_tail(x, self.encoder.attn_proj(attend(get_attention("vanilla"), q, k, v, None)))
        return F.normalize(self.encoder.project(out[:, :1])[:, 0].float(), dim=-1)

    def _image_cls(self, state: TrunkState) -> Tensor:
        """Image-level [CLS] (n, D) of each crop's whole image (each image encoded once per chunk), or the crop's."""
        wholes = state.cache.get("wholes")
        if not self.whole_image_semantics or wholes is None:
            return self._cls(state.x)
        out = []
        for image in wholes:
            key = f"cass:cls:{image.data_ptr()}:{tuple(image.shape)}"
            if key not in state.cache:
                x, _ = self.encoder.embed(image[None])
                state.cache[key] = self._cls(self.encoder.run_blocks(x))[0]
            out.append(state.cache[key])
        return torch.stack(out)

    def attention(self, state: TrunkState) -> Tensor:
        """CASS's last-block attention over patches (n, h, N, N) (for figures)."""
        _, k, _ = self.encoder.qkv(state.x)
        k = k[:, :, self.encoder.num_prefix_tokens :]
        prior = gaussian_prior(state.grid, self.sigma, device=k.device, dtype=torch.float32)[1:, 1:].to(k.dtype)
        out = []
        for crop_k, (pk, pgrid) in zip(k, proxy_keys(self.proxy, state, self.proxy_size), strict=True):
            h, n, d = crop_k.shape
            if n < SVD_RANK:
                raise ValueError(f"cass needs at least {SVD_RANK} patches per crop, got a {state.grid} grid")
            pk = pk.transpose(1, 2).reshape(h, d, *pgrid)
            pk = F.interpolate(pk, size=state.grid, mode="bilinear", align_corners=False).reshape(h, d, n)
            pk = _match_range(pk.transpose(1, 2), crop_k)
            graph = distilled_graph(crop_k, pk, self.scale_factor, self.k_eigen, self.scale_singular_values)
            out.append((graph + prior).softmax(dim=-1))
        return torch.stack(out)

    def features(self, state: TrunkState) -> Tensor:
        _, _, v = self.encoder.qkv(state.x)
        v = v[:, :, self.encoder.num_prefix_tokens :]
        out = self.attention(state) @ v  # (n, h, N, d)
        x = self.encoder.project(self.encoder.attn_proj(out))
        return x.reshape(x.shape[0], *state.grid, -1)

    def clusters(self, classifier: Tensor) -> np.ndarray:
        key = (classifier.data_ptr(), *classifier.shape)
        if self._clusters is None or self._clusters[0] != key:
            self._clusters = (key, query_clusters(classifier, self.h_threshold))
        return self._clusters[1]

    def logits(self, state: TrunkState, classifier: Tensor) -> Tensor:
        feats = F.normalize(self.features(state).float(), dim=-1)  # (n, rows, cols, D)
        classifier = classifier.float()
        global_sim = self._image_cls(state) @ classifier.T  # (n, Q)
        clusters = self.clusters(classifier)
        w = self.global_semantics_weight
        out = []
        for f, g in zip(feats.flatten(1, 2), global_sim, strict=True):
            text = presence_prompts(f, classifier, g, clusters, self.mean_vector_weight)
            out.append((f @ text.T) * (1 - w) + g * w)  # (N, Q)
        return torch.stack(out).reshape(feats.shape[0], *state.grid, -1).permute(0, 3, 1, 2)


register_method(
    "cass",
    CASS,
    description="CASS: spectral distillation of a proxy's (DINO) attention graph, object-presence prompts",
)
