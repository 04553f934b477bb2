"""Retrieval for multi-GPU and multi-node fine-tuning without a copy of the index in every worker.

- :class:`RayRetriever`: the index lives in Ray actors, replicated (each actor holds all of it) or
  sharded (each holds a slice; top-k merged exactly); actors restart on failure, calls time out.
- :class:`TorchDistributedRetriever`: rank 0 holds the index; the other ranks' questions and
  answers travel over a gloo process group.
- :func:`make_distributed_retriever`: the factory behind ``ragkit finetune --distributed_retriever``.
- :mod:`ragkit.distributed.sharding`: the shards and the exact merge, usable without Ray.

Both retrievers are :class:`~ragkit.RagRetriever` subclasses: a RAG model takes them as it takes a
``RagRetriever``. Ray is optional (``pip install 'ray[default]'``, or ``pip install -e '.[distributed]'`` in a clone); names are imported on
first use so that ``import ragkit.distributed`` needs neither Ray nor the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DISTRIBUTED_RETRIEVERS",
    "PassageShard",
    "RayIndexService",
    "RayRetriever",
    "RetrievalTimeoutError",
    "RetrievalUnavailableError",
    "ShardResult",
    "TorchDistributedRetriever",
    "add_distributed_retriever_arguments",
    "distributed_retriever_from_args",
    "make_distributed_retriever",
    "merge_shard_results",
    "shard_bounds",
]

_LAZY = {
    "DISTRIBUTED_RETRIEVERS": "factory",
    "add_distributed_retriever_arguments": "factory",
    "distributed_retriever_from_args": "factory",
    "make_distributed_retriever": "factory",
    "PassageShard": "sharding",
    "ShardResult": "sharding",
    "merge_shard_results": "sharding",
    "shard_bounds": "sharding",
    "RayIndexService": "ray_service",
    "RayRetriever": "ray_retriever",
    "TorchDistributedRetriever": "torch_retriever",
    "RetrievalTimeoutError": "errors",
    "RetrievalUnavailableError": "errors",
}

if TYPE_CHECKING:
    from .errors import RetrievalTimeoutError, RetrievalUnavailableError
    from .factory import (
        DISTRIBUTED_RETRIEVERS,
        add_distributed_retriever_arguments,
        distributed_retriever_from_args,
        make_distributed_retriever,
    )
    from .ray_retriever import RayRetriever
    from .ray_service import RayIndexService
    from .sharding import PassageShard, ShardResult, merge_shard_results, shard_bounds
    from .torch_retriever import TorchDistributedRetriever


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ragkit.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
