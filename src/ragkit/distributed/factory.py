"""Pick a retriever for (distributed) fine-tuning from the ``ragkit finetune`` flags.

``--distributed_retriever {none,pytorch,ray} --num_retrieval_workers N --ray_address ADDR
--index_shards S`` map onto :func:`make_distributed_retriever`:

* ``none``: the retriever as it is (every process holds its own index).
* ``pytorch``: :class:`~ragkit.distributed.TorchDistributedRetriever`; rank 0 holds the index.
* ``ray``: :class:`~ragkit.distributed.RayRetriever`; ``S == 1``: ``N`` actors each holding the whole
  index; ``S > 1``: ``S`` actors each holding a slice of it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..configuration_rag import RagConfig
from ..errors import RagInputError
from ..retrieval_rag import RagRetriever

logger = logging.getLogger(__name__)

__all__ = [
    "DISTRIBUTED_RETRIEVERS",
    "add_distributed_retriever_arguments",
    "distributed_retriever_from_args",
    "make_distributed_retriever",
]

#: Values of ``--distributed_retriever``.
DISTRIBUTED_RETRIEVERS = ("none", "pytorch", "ray")


def _base_retriever(
    base: RagRetriever | RagConfig,
    question_encoder_tokenizer: PreTrainedTokenizerBase | None,
    generator_tokenizer: PreTrainedTokenizerBase | None,
) -> RagRetriever:
    """A RagRetriever (index not loaded) from a retriever or a config plus tokenizers."""
    if isinstance(base, RagRetriever):
        return base
    if isinstance(base, RagConfig):
        if question_encoder_tokenizer is None or generator_tokenizer is None:
            raise RagInputError(
                "make_distributed_retriever got a RagConfig: also pass question_encoder_tokenizer= and "
                "generator_tokenizer= (or pass a RagRetriever)."
            )
        return RagRetriever(
            config=base,
            question_encoder_tokenizer=question_encoder_tokenizer,
            generator_tokenizer=generator_tokenizer,
            init_retrieval=False,
        )
    raise TypeError(f"Expected a RagRetriever or a RagConfig, got {type(base).__name__}.")


def _world_size() -> int:
    """World size of the torch.distributed job this process is part of (1 if none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _shared_actor_name(retriever: RagRetriever, layout: str, num_actors: int) -> str:
    """A name the ranks of one job agree on and other jobs (other index or layout) do not reuse."""
    config = retriever.config
    identity = "|".join(
        str(part)
        for part in (
            config.index_name,
            config.passages_path,
            config.index_path,
            config.dataset,
            layout,
            num_actors,
        )
    )
    return f"ragkit-retrieval-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def make_distributed_retriever(
    base: RagRetriever | RagConfig,
    kind: str = "none",
    num_workers: int = 1,
    ray_address: str | None = None,
    index_shards: int = 1,
    *,
    question_encoder_tokenizer: PreTrainedTokenizerBase | None = None,
    generator_tokenizer: PreTrainedTokenizerBase | None = None,
    **kwargs: Any,
) -> RagRetriever:
    """Return the retriever for ``--distributed_retriever kind``.

    Build ``base`` with ``init_retrieval=False`` so this process does not load an index that the
    distributed retriever serves from elsewhere.

    Args:
        base: A :class:`~ragkit.RagRetriever` (its config, tokenizers and index recipe are reused) or a
            :class:`~ragkit.RagConfig` with the two tokenizers.
        kind: ``"none"``, ``"pytorch"`` or ``"ray"``.
        num_workers: Ray actors holding a full copy of the index (``index_shards == 1``).
        ray_address: Ray cluster to attach to (``"auto"``, ``"ray://head:10001"``); ``None`` starts a
            local Ray instance. Several training processes must share a cluster: pass its address.
        index_shards: With ``"ray"``, split the passages over this many actors (exact merge of
            their results on a flat index).
        question_encoder_tokenizer: Needed when ``base`` is a config.
        generator_tokenizer: Needed when ``base`` is a config.
        **kwargs: More arguments of :class:`~ragkit.distributed.RayRetriever` (``actor_options``,
            ``name``, ``call_timeout_s``, ...) or :class:`~ragkit.distributed.TorchDistributedRetriever`
            (``main_rank``, ``timeout_s``).

    Returns:
        RagRetriever: ``base`` itself for ``"none"``, else a distributed retriever (set up now, or
        for ``"pytorch"`` without a process group yet, at its first call).
    """
    if kind not in DISTRIBUTED_RETRIEVERS:
        raise RagInputError(f"--distributed_retriever must be one of {DISTRIBUTED_RETRIEVERS}, got {kind!r}.")
    if num_workers < 1 or index_shards < 1:
        raise RagInputError(
            f"--num_retrieval_workers ({num_workers}) and --index_shards ({index_shards}) must be at least 1."
        )
    retriever = _base_retriever(base, question_encoder_tokenizer, generator_tokenizer)
    if kind == "none":
        if not retriever.index.is_initialized():
            retriever.init_retrieval()
        return retriever
    if kind == "pytorch":
        if index_shards > 1 or num_workers > 1 or ray_address is not None:
            raise RagInputError(
                "--distributed_retriever pytorch serves the index from rank 0 alone: drop --index_shards, "
                "--num_retrieval_workers and --ray_address, or use --distributed_retriever ray."
            )
        from .torch_retriever import TorchDistributedRetriever

        return TorchDistributedRetriever.from_retriever(retriever, **kwargs)
    from .ray_retriever import RayRetriever

    if index_shards > 1 and num_workers not in (1, index_shards):
        raise RagInputError(
            f"--index_shards {index_shards} starts one actor per shard; --num_retrieval_workers {num_workers} "
            "cannot also apply. Leave --num_retrieval_workers at 1 (or equal to --index_shards)."
        )
    layout = "sharded" if index_shards > 1 else "replicated"
    num_actors = index_shards if layout == "sharded" else num_workers
    if _world_size() > 1:
        if ray_address is None:
            raise RagInputError(
                "--distributed_retriever ray in a multi-process job needs one Ray cluster for all ranks: start "
                "it (`ray start --head` on the first node, `ray start --address HEAD:6379` on the others) and "
                "pass --ray_address auto."
            )
        # Every rank derives the same name, so the ranks share one set of actors instead of one each.
        kwargs.setdefault("name", _shared_actor_name(retriever, layout, num_actors))
    logger.info("Ray retriever: %d %s actor(s), address %s", num_actors, layout, ray_address or "local")
    return RayRetriever.from_retriever(
        retriever, num_actors=num_actors, layout=layout, address=ray_address, **kwargs
    )


def add_distributed_retriever_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--distributed_retriever``, ``--num_retrieval_workers``, ``--ray_address``, ``--index_shards``.

    Args:
        parser: The ``ragkit finetune`` parser.
    """
    group = parser.add_argument_group("distributed retrieval")
    group.add_argument(
        "--distributed_retriever",
        choices=DISTRIBUTED_RETRIEVERS,
        default="none",
        help="serve the index from rank 0 (pytorch) or from Ray actors (ray) instead of every process",
    )
    group.add_argument(
        "--num_retrieval_workers", type=int, default=1, help="Ray actors holding the whole index"
    )
    group.add_argument(
        "--ray_address", default=None, help="Ray cluster to attach to (default: start one locally)"
    )
    group.add_argument(
        "--index_shards", type=int, default=1, help="split the passages over this many Ray actors"
    )


def distributed_retriever_from_args(retriever: RagRetriever, args: argparse.Namespace) -> RagRetriever:
    """:func:`make_distributed_retriever` with the values of :func:`add_distributed_retriever_arguments`.

    Args:
        retriever: The retriever built from the checkpoint (preferably with ``init_retrieval=False``).
        args: Parsed ``ragkit finetune`` arguments.

    Returns:
        RagRetriever: the retriever to attach with ``model.set_retriever``.
    """
    return make_distributed_retriever(
        retriever,
        args.distributed_retriever,
        num_workers=args.num_retrieval_workers,
        ray_address=args.ray_address,
        index_shards=args.index_shards,
    )
