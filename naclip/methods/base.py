"""What a dense method is: the part of the pipeline after the shared trunk, from its state to patch-grid logits.

The pipeline (see :class:`naclip.Segmenter`): crops → embedding → blocks 1..L-1 (the trunk, shared by every
variant of a fused sweep, with the taps the methods declared) → the method's own part → head (cosine logits
against the text classifier) → accumulation over windows → post-processing → labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from naclip.encoder import DenseEncoder, Taps
from naclip.text import Template


@dataclass
class TrunkState:
    """One chunk of crops after the shared trunk. Methods read it and never modify its tensors in place.

    Attributes:
        x: tokens entering the last block, (n, 1+N, C).
        grid: (rows, cols) of the patch grid.
        crops: the CLIP-normalized crops themselves, (n, 3, h, w) (for methods with a second vision model).
        inputs: block index → tokens entering that block, for every tapped block.
        qkv: block index → that block's own per-head (q, k, v), each (n, h, 1+N, d), for every tapped block.
        cache: per-chunk results that several variants share (e.g. a second model's features), by key.
    """

    x: Tensor
    grid: tuple[int, int]
    crops: Tensor
    inputs: dict[int, Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


def cosine_logits(features: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarity of patch features (n, rows, cols, D) with unit text embeddings (Q, D): (n, Q, rows, cols)."""
    feats = F.normalize(features.float(), dim=-1)
    return (feats @ classifier.float().T).permute(0, 3, 1, 2)


def parallel_path(
    encoder: DenseEncoder, state: TrunkState, first: int, attention: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """A second path beside CLIP's blocks first..L (GEM, CLIP Surgery): it starts from the tokens entering block
    ``first`` and each block adds its layer-scaled ``attention(x, block)`` of the original stream's input ``x``
    (no feed-forward). Needs ``Taps(inputs=range(first, L - 1))``; returns the path's tokens (n, T, C)."""
    last = encoder.num_blocks - 1
    inputs = [state.inputs[i] for i in range(first, last)] + [state.x]  # the original stream
    path = inputs[0]
    for block, x in enumerate(inputs, start=first):
        path = path + encoder.attn_scale(attention(x, block), block)
    return path


class Method(nn.Module):
    """A dense method's own part. Subclasses set :attr:`taps` and implement :meth:`features` (or :meth:`logits`
    when the text classifier enters before the cosine, e.g. feature surgery or text refinement).

    :attr:`position_rule` names how the trunk resizes position embeddings for this method's crops (a name of
    :data:`naclip.towers.POSITION_RULES`, for methods whose authors' code resizes them its own way); None, the
    default, is the family's own rule (NACLIP's for open_clip's ViTs). Fused variants share a trunk pass only
    with variants of the same rule. :attr:`templates` are the prompt templates its authors' code embeds class
    names with, used when the segmenter is given none (None: the 80 OpenAI ImageNet templates).
    :attr:`crops_per_forward` caps the crops of one trunk forward below the segmenter's ``crop_batch_size``
    (None: no cap), for a method whose discrete steps must see its authors' per-crop arithmetic to the last bit
    (batched matrix products round differently).

    Args:
        encoder: the tower's stages (embedding, blocks, q/k/v, projection) the method computes with.
    """

    taps: Taps = Taps()
    position_rule: str | None = None
    templates: tuple[Template, ...] | None = None
    crops_per_forward: int | None = None

    def __init__(self, encoder: DenseEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def features(self, state: TrunkState) -> Tensor:
        """Projected, unnormalized patch features (n, rows, cols, D)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither features nor logits")

    def logits(self, state: TrunkState, classifier: Tensor) -> Tensor:
        """Patch-grid logits (n, Q, rows, cols) against the unit text embeddings (Q, D)."""
        return cosine_logits(self.features(state), classifier)


class LastBlock(Method):
    """The methods that change only the last block's attention and architecture (NACLIP, CLIP, MaskCLIP, SCLIP,
    ClearCLIP and registered attentions): the encoder's own attention, arch and σ."""

    def features(self, state: TrunkState) -> Tensor:
        return self.encoder.head(state.x, state.grid)
