"""Registry of dense methods that change more than the last block's attention (see :mod:`naclip.methods.base`).

The presets that only swap the last block's attention and architecture (naclip, clip, maskclip, sclip, clearclip)
are not registered here: they are :class:`LastBlock` with the segmenter's attention, arch and σ.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from naclip.encoder import DenseEncoder
from naclip.methods.base import LastBlock, Method, TrunkState, cosine_logits

MethodFactory = Callable[..., Method]  # (encoder, **options) -> Method


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: MethodFactory
    description: str


METHODS: dict[str, MethodEntry] = {}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def register_method(name: str, factory: MethodFactory, *, description: str = "") -> MethodEntry:
    """Add a method: ``Segmenter(model, names, method=name, method_options={...})`` then builds
    ``factory(encoder, **method_options)``; in configs, ``method=name`` selects it (see README, Methods).

    Raises:
        ValueError: invalid or already registered name, or a factory that is not callable.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name must be a word (letters, digits, _ or -), got {name!r}")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered; registered: {list_methods()}")
    if not callable(factory):
        raise ValueError(f"method {name!r}: factory must be a callable (encoder, **options) -> Method")
    entry = MethodEntry(name, factory, description or name)
    METHODS[name] = entry
    return entry


def list_methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtins()
    return list(METHODS)


def build_method(name: str | None, encoder: DenseEncoder, **options: Any) -> Method:
    """The method named ``name`` on ``encoder``; None = :class:`LastBlock` (the encoder's own attention)."""
    if name is None:
        if options:
            raise ValueError(f"method options {sorted(options)} given without a method")
        return LastBlock(encoder)
    _load_builtins()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {list_methods()}")
    method = METHODS[name].factory(encoder, **options)
    if not isinstance(method, Method):
        raise ValueError(f"method {name!r}: its factory returned {type(method).__name__}, not a naclip Method")
    return method


def _load_builtins() -> None:
    """Import the built-in method modules (each registers itself), once."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = [
    "METHODS",
    "LastBlock",
    "Method",
    "MethodEntry",
    "TrunkState",
    "build_method",
    "cosine_logits",
    "list_methods",
    "register_method",
]
