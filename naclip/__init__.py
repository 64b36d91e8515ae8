"""naclip: NACLIP (Hajimiri, Ben Ayed, Dolz, WACV 2025) training-free open-vocabulary segmentation.

The public names are imported lazily (PEP 562), so light entry points such as ``python -m naclip.tables``
do not pay for importing torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "gaussian_prior": "naclip.attention",
    "get_attention": "naclip.attention",
    "list_attentions": "naclip.attention",
    "register_attention": "naclip.attention",
    "WeightsUnavailableError": "naclip.clip",
    "image_mean_std": "naclip.clip",
    "load_clip": "naclip.clip",
    "DenseEncoder": "naclip.encoder",
    "list_archs": "naclip.encoder",
    "FusedSegmenter": "naclip.fused",
    "IoUMetric": "naclip.metrics",
    "Method": "naclip.methods",
    "list_methods": "naclip.methods",
    "register_method": "naclip.methods",
    "PAMR": "naclip.pamr",
    "list_proxies": "naclip.proxy",
    "Predictor": "naclip.predictor",
    "Segmenter": "naclip.segmenter",
    "slide_windows": "naclip.segmenter",
    "text_classifier": "naclip.text",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'naclip' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
