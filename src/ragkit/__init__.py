"""ragkit: retrieval-augmented generation for PyTorch, a drop-in for Transformers' RAG.

>>> from ragkit import RagTokenizer, RagRetriever, RagSequenceForGeneration
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module. Imported on first use so that ``import ragkit`` (and the CLI) stay fast.
_LAZY = {
    "RagConfig": "configuration_rag",
    "RagTokenizer": "tokenization_rag",
    "RagRetriever": "retrieval_rag",
    "RagModel": "modeling_rag",
    "RagPreTrainedModel": "modeling_rag",
    "RagSequenceForGeneration": "modeling_rag",
    "RagTokenForGeneration": "modeling_rag",
    "RetrievAugLMOutput": "modeling_rag",
    "RetrievAugLMMarginOutput": "modeling_rag",
}

__all__ = [
    "RagConfig",
    "RagModel",
    "RagPreTrainedModel",
    "RagRetriever",
    "RagSequenceForGeneration",
    "RagTokenForGeneration",
    "RagTokenizer",
    "RetrievAugLMMarginOutput",
    "RetrievAugLMOutput",
    "__version__",
]

if TYPE_CHECKING:
    from .configuration_rag import RagConfig
    from .modeling_rag import (
        RagModel,
        RagPreTrainedModel,
        RagSequenceForGeneration,
        RagTokenForGeneration,
        RetrievAugLMMarginOutput,
        RetrievAugLMOutput,
    )
    from .retrieval_rag import RagRetriever
    from .tokenization_rag import RagTokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ragkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
