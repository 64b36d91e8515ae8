"""Zero-shot text classifier: prompt-ensembled, normalized class-name embeddings, cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

Template = str | Callable[[str], str]
OPENAI_TEMPLATES: tuple[Template, ...] = tuple(open_clip.OPENAI_IMAGENET_TEMPLATES)
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("NACLIP_CACHE", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "naclip"))


def _fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f"names must be a non-empty list of class names, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:3]!r}")
    return list(names)


@torch.no_grad()
def encode_text_trimmed(model: nn.Module, tokens: Tensor) -> Tensor:
    """Same as ``model.encode_text`` but runs only up to the longest real token sequence of the batch.

    With the causal mask, tokens after a sequence's end-of-text token cannot change that token's output,
    so dropping the padded tail common to the whole batch is exact (and several times faster).
    """
    eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in the vocabulary
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (B, L, W)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


CLIP_VOCAB = 49408  # open_clip's CLIP BPE tokenizer: the end-of-text id 49407 is the largest id


def get_tokenizer(model_name: str, random_weights: bool = False) -> Callable[[list[str]], Tensor]:
    """open_clip's tokenizer for a model: CLIP's BPE for the CLIP families (LAION, DataComp, DFN, MetaCLIP, EVA02),
    a Hugging Face tokenizer for SigLIP (SentencePiece) and SigLIP2 (Gemma), which needs ``transformers``.

    With ``random_weights`` (a smoke run: the text has no meaning) a tokenizer that cannot be loaded is replaced by
    CLIP's BPE with its ids folded into the text tower's vocabulary, so offline tests run every family.

    Raises:
        ValueError: unknown model, or a tokenizer that cannot be loaded for real weights (one line: what to install).
    """
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}")
    try:
        return open_clip.get_tokenizer(model_name)
    except (ImportError, OSError, ValueError) as err:
        text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
        if not random_weights:
            name = text_cfg.get("hf_tokenizer_name", model_name)
            why = " ".join(str(err).split())[:160]
            raise ValueError(
                f"the tokenizer of {model_name} ({name}) cannot be loaded ({type(err).__name__}: {why}); it needs "
                f"`pip install transformers` and its files from the Hugging Face Hub (or a cached copy)"
            ) from err
        vocab, context = int(text_cfg.get("vocab_size", CLIP_VOCAB)), int(text_cfg.get("context_length", 77))
        log.warning(
            "tokenizer of %s unavailable (%s); random weights: CLIP's BPE folded into %d ids",
            model_name,
            type(err).__name__,
            vocab,
        )
        return lambda texts: open_clip.tokenize(texts, context_length=context) % vocab


def _fingerprint(model: nn.Module) -> str:
    """Cheap identity of the text tower's weights, so a cache never serves another model's embeddings.

    A strided sample of every text-tower tensor (all blocks included) keeps it fast for large models.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("visual.") or not tensor.is_floating_point():
            continue
        h.update(name.encode())
        h.update(tensor.detach().flatten()[::101].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _text_model_supported(model: nn.Module) -> bool:
    """Whether :func:`encode_text_trimmed` is exact: open_clip's CLIP text tower with a causal mask, pooled at the
    argmax token as ``encode_text`` itself pools (CLIP's BPE: the end-of-text id is the largest). SigLIP's towers
    (last-token pooling, no mask) and EVA02's custom text tower run ``model.encode_text``."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    pooled_at_eot = getattr(model, "text_pool_type", "argmax") == "argmax"
    return pooled_at_eot and all(getattr(model, n, None) is not None for n in needed)


@torch.no_grad()
def text_classifier(
    model: nn.Module,
    names: Sequence[str],
    templates: Sequence[Template] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Callable[[list[str]], Tensor] | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Prompt-ensembled text embeddings (len(names), D), L2-normalized.

    For each name: the mean of the normalized embeddings of all templates (default: the 80 OpenAI
    ImageNet templates shipped by open_clip), normalized again.

    Args:
        model: an open_clip CLIP model.
        names: query names, e.g. ["person", "person in shirt", "car"].
        templates: format strings with ``{}`` or callables; default the 80 OpenAI templates.
        cache_dir: if given, classifiers are stored there keyed by weights, names and templates, and a
            later call with the same key skips the text tower.
        tokenizer: the model's tokenizer (:func:`get_tokenizer`); None = open_clip's CLIP tokenizer with the model's
            context length, valid only for a text tower with CLIP's vocabulary.
        batch_size: prompts per text-tower forward (rounded to whole names, at least one name).

    Raises:
        ValueError: empty name list, an empty name, no templates, or no tokenizer for a non-CLIP vocabulary.
    """
    names = _check_names(names)
    templates = tuple(OPENAI_TEMPLATES if templates is None else templates)
    if not templates:
        raise ValueError("templates must not be empty")
    prompts_per_name = [[_fill(t, n) for t in templates] for n in names]

    device = next(model.parameters()).device
    vocab = getattr(model, "vocab_size", CLIP_VOCAB)
    if tokenizer is None and vocab != CLIP_VOCAB:
        raise ValueError(
            f"this text tower has a {vocab}-token vocabulary, not CLIP's; "
            f"pass tokenizer=naclip.text.get_tokenizer(<open_clip model name>)"
        )
    cache_file = None
    if cache_dir is not None:
        key = json.dumps({"w": _fingerprint(model), "p": prompts_per_name}, sort_keys=True)
        cache_file = Path(cache_dir).expanduser() / f"text-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
        cached = _read_cache(cache_file, len(names))
        if cached is not None:
            return cached.to(device)

    context = getattr(model, "context_length", 77)
    tokenize = tokenizer or (lambda texts: open_clip.tokenize(texts, context_length=context))
    if _text_model_supported(model):

        def encode(tokens: Tensor) -> Tensor:
            return encode_text_trimmed(model, tokens)
    else:
        encode = model.encode_text
    # whole names per forward (about batch_size prompts), so the bar counts names: 56 names take ~15 s on CPU
    names_per_step = max(1, batch_size // len(templates))
    chunks = []
    with tqdm(total=len(names), desc="text classifier", unit="name", disable=None, leave=False) as bar:
        for i in range(0, len(names), names_per_step):
            step = prompts_per_name[i : i + names_per_step]
            prompts = [p for per_name in step for p in per_name]
            chunks.append(F.normalize(encode(tokenize(prompts).to(device)).float(), dim=-1))
            bar.update(len(step))
    emb = torch.cat(chunks).reshape(len(names), len(templates), -1)  # (Q, T, D)
    classifier = F.normalize(emb.mean(dim=1), dim=-1)  # (Q, D)

    if cache_file is not None:
        _write_cache(cache_file, classifier)
    return classifier


def _read_cache(path: Path, rows: int) -> Tensor | None:
    """The cached classifier, or None on a miss. A corrupt entry (truncated, emptied, wrong content) is a
    miss with one warning line: it is rebuilt and replaced, never a traceback on every later run."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises EOFError, RuntimeError, UnpicklingError, ... on bad bytes
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    else:
        if isinstance(cached, Tensor) and cached.ndim == 2 and cached.shape[0] == rows and cached.is_floating_point():
            return cached
        reason = f"holds {type(cached).__name__} {tuple(getattr(cached, 'shape', ()))}, not a ({rows}, D) tensor"
    log.warning("text-classifier cache %s is unreadable (%s); rebuilding it", path, reason)
    return None


_UNWRITABLE: set[Path] = set()  # cache folders already reported unwritable in this process


def _write_cache(path: Path, classifier: Tensor) -> None:
    """Write through a temp file and rename, so readers never see half a file. A folder that cannot take it
    (read-only, full, not a folder: torch.save raises RuntimeError there, not OSError) warns once and the run
    goes on without the cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(classifier.cpu(), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if path.parent not in _UNWRITABLE:
            _UNWRITABLE.add(path.parent)
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            log.warning(
                "could not write the text-classifier cache in %s (%s); going on without it", path.parent, reason
            )
