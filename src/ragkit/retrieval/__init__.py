"""Index backends of :class:`~ragkit.RagRetriever` and the tools that build and convert indexes.

- :class:`CustomHFIndex`: your own passages (``datasets.Dataset``) and faiss index (``index_name="custom"``).
- :class:`CanonicalHFIndex`: wiki_dpr from the Hub or a local mirror (``"exact"``, ``"compressed"``).
- :class:`LegacyIndex`: DPR's original files, pickled or converted (``"legacy"``).
- :func:`build_index`: embed a corpus and write a custom index; :func:`build_passages_index`: write
  already embedded passages and their faiss index (atomically); :func:`convert_legacy_index`: make
  DPR's files pickle-free.
- :mod:`ragkit.retrieval.device_search`: search on a GPU (``RagRetriever.to_search_device``).

Names are imported on first use so that ``import ragkit.retrieval`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "MISSING_DOC_ID",
    "BuiltIndex",
    "CanonicalHFIndex",
    "CustomHFIndex",
    "HFIndexBase",
    "Index",
    "LegacyIndex",
    "build_index",
    "build_passages_index",
    "convert_legacy_index",
]

_LAZY = {
    "MISSING_DOC_ID": "base",
    "Index": "base",
    "HFIndexBase": "base",
    "CustomHFIndex": "custom",
    "CanonicalHFIndex": "canonical",
    "LegacyIndex": "legacy",
    "convert_legacy_index": "legacy",
    "BuiltIndex": "building",
    "build_index": "building",
    "build_passages_index": "building",
}

if TYPE_CHECKING:
    from .base import MISSING_DOC_ID, HFIndexBase, Index
    from .building import BuiltIndex, build_index, build_passages_index
    from .canonical import CanonicalHFIndex
    from .custom import CustomHFIndex
    from .legacy import LegacyIndex, convert_legacy_index


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ragkit.retrieval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
