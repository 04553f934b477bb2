"""A :class:`~ragkit.RagRetriever` for torch.distributed training: the main rank holds the index.

Every rank calls :meth:`TorchDistributedRetriever.retrieve` in step (as data-parallel training
does). The ranks' question vectors are gathered on the main rank, which searches them all in one
batch and scatters back each rank's ids, embeddings and passages; the other ranks never load the
index. The collectives run on a dedicated gloo process group on CPU, so retrieval works whatever the
training backend is (gloo on CPU, NCCL on GPU) and never interleaves with the gradients' collectives.

Ranks may have different batch sizes (the last batch of an epoch): sizes are exchanged first and
the vectors padded. An error on the main rank (``n_docs`` too large, say) is sent to every rank, so
all of them raise instead of waiting forever, and the group's timeout bounds any wait on a rank
that died.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..configuration_rag import RagConfig
from ..errors import RagInputError
from ..retrieval.base import Index, as_query_matrix
from ..retrieval_rag import RagRetriever
from .errors import RetrievalUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["TorchDistributedRetriever"]


class _MainRankError(RuntimeError):
    """The main rank failed to retrieve; raised on the other ranks with the main rank's message."""


def _collective(operation: Any, *args: Any, timeout_s: float, **kwargs: Any) -> None:
    """Run one torch.distributed collective; a failure (dead rank, timeout) becomes a clear error."""
    try:
        operation(*args, **kwargs)
    except RuntimeError as err:
        raise RetrievalUnavailableError(
            f"torch.distributed retrieval failed in {operation.__name__} ({err}). A rank died or stopped calling "
            f"retrieve in step with the others (the group times out after {timeout_s:.0f} s); check every "
            "rank's log."
        ) from err


class TorchDistributedRetriever(RagRetriever):
    """``RagRetriever`` whose index lives on one rank of a torch.distributed job.

    Create it on every rank (same arguments) and call :meth:`init_retrieval` on every rank once the
    default process group exists; without a process group (or with one rank) it is an ordinary
    ``RagRetriever``.

    Args:
        config: As for :class:`~ragkit.RagRetriever`.
        question_encoder_tokenizer: As for :class:`~ragkit.RagRetriever`.
        generator_tokenizer: As for :class:`~ragkit.RagRetriever`.
        index: As for :class:`~ragkit.RagRetriever`; loaded on the main rank only.
        init_retrieval: Set up now; if the process group does not exist yet, setup waits for
            the first :meth:`retrieve` (collective: every rank must call it).
        allow_pickle: As for :class:`~ragkit.RagRetriever`.
        main_rank: Global rank that holds the index.
        timeout_s: Timeout of the retrieval process group's collectives.
    """

    def __init__(
        self,
        config: RagConfig,
        question_encoder_tokenizer: PreTrainedTokenizerBase,
        generator_tokenizer: PreTrainedTokenizerBase,
        index: Index | None = None,
        init_retrieval: bool = True,
        allow_pickle: bool = False,
        *,
        main_rank: int = 0,
        timeout_s: float = 1800.0,
    ) -> None:
        self.main_rank = main_rank
        self.timeout_s = timeout_s
        self.process_group: Any = None
        # None: not set up yet; "local": one process, plain RagRetriever; "distributed": collectives.
        self._mode: str | None = None
        super().__init__(
            config,
            question_encoder_tokenizer,
            generator_tokenizer,
            index=index,
            init_retrieval=init_retrieval,
            allow_pickle=allow_pickle,
        )

    @classmethod
    def from_retriever(cls, retriever: RagRetriever, **kwargs: Any) -> TorchDistributedRetriever:
        """Wrap an existing (not necessarily loaded) retriever's config, tokenizers and index.

        Args:
            retriever: A :class:`~ragkit.RagRetriever`.
            **kwargs: :class:`TorchDistributedRetriever` arguments (``main_rank``, ``timeout_s``, ...).

        Returns:
            TorchDistributedRetriever
        """
        return cls._from_retriever(retriever, **kwargs)

    @staticmethod
    def _distributed_world() -> int:
        """World size of the default process group (1 without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def is_main(self) -> bool:
        """Whether this process holds the index (always true without a process group)."""
        import torch.distributed as dist

        return self._distributed_world() == 1 or dist.get_rank() == self.main_rank

    def init_retrieval(self) -> None:
        """Create the gloo retrieval group (collective) and load the index on the main rank.

        Without a process group yet, nothing is loaded: :meth:`retrieve` finishes the setup.
        """
        if self._mode is not None:
            return
        world = self._distributed_world()
        if world == 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self._mode = "local"
                super().init_retrieval()
            else:
                logger.info(
                    "No torch.distributed process group yet: retrieval setup waits for the first call."
                )
            return
        import torch.distributed as dist

        if not 0 <= self.main_rank < world:
            raise RagInputError(f"main_rank={self.main_rank} is not a rank of this {world}-process job.")
        # A group of its own: gloo works on CPU tensors whatever backend the training uses.
        self.process_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s)
        )
        if dist.get_rank() == self.main_rank:
            super().init_retrieval()
        self._mode = "distributed"
        logger.info(
            "torch.distributed retrieval ready: rank %d of %d serves the index", self.main_rank, world
        )

    def _ensure_ready(self) -> None:
        """Finish a deferred setup: distributed if a process group exists now, else a local index."""
        if self._mode is not None:
            return
        if self._distributed_world() > 1:
            self.init_retrieval()
        else:
            self._mode = "local"
            RagRetriever.init_retrieval(self)

    def retrieve(self, question_hidden_states: Any, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Retrieve passages for this rank's questions through the main rank (collective call).

        Args:
            question_hidden_states: `(batch_size, vector_size)` numpy array or torch tensor.
            n_docs: Passages per question (the same on every rank).

        Returns:
            tuple: ``retrieved_doc_embeds`` `(batch_size, n_docs, vector_size)` float32, ``doc_ids``
            `(batch_size, n_docs)` int64 and ``doc_dicts``, as :meth:`RagRetriever.retrieve`.
        """
        self._ensure_ready()
        queries = as_query_matrix(question_hidden_states)
        if self._mode == "local":
            return super().retrieve(queries, n_docs)
        return self._exchange(queries, n_docs)

    def _exchange(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Gather the questions on the main rank, search there, scatter the answers."""
        import torch
        import torch.distributed as dist

        group, main, t = self.process_group, self.main_rank, self.timeout_s
        world, is_main = dist.get_world_size(group), dist.get_rank() == main
        batch, dim = queries.shape
        sizes = [torch.zeros(3, dtype=torch.int64) for _ in range(world)]
        _collective(
            dist.all_gather,
            sizes,
            torch.tensor([batch, dim, n_docs], dtype=torch.int64),
            group=group,
            timeout_s=t,
        )
        batches = [int(size[0]) for size in sizes]
        if len({(int(s[1]), int(s[2])) for s in sizes}) != 1:
            # Every rank sees the same sizes, so every rank raises here: nobody is left waiting.
            raise RagInputError(
                "Ranks called retrieve with different vector widths or n_docs "
                f"({[(int(s[1]), int(s[2])) for s in sizes]}); every rank must use the same model and n_docs."
            )
        max_batch = max(batches)
        padded = torch.zeros(max_batch, dim, dtype=torch.float32)
        padded[:batch] = torch.from_numpy(queries)
        gathered = (
            [torch.empty(max_batch, dim, dtype=torch.float32) for _ in range(world)] if is_main else None
        )
        _collective(dist.gather, padded, gather_list=gathered, dst=main, group=group, timeout_s=t)

        # One scatter carries each rank's ids, embeddings and passages (or the main rank's error):
        # fewer collectives per call than one per array, and the answers stay together.
        objects: list[Any] | None = None
        failure: BaseException | None = None
        if is_main:
            try:
                all_queries = np.concatenate([g[:b].numpy() for g, b in zip(gathered, batches)])
                embeds, ids, docs = super().retrieve(all_queries, n_docs)
            except Exception as err:  # sent to every rank below, then re-raised here
                failure = err
                objects = [("error", f"{type(err).__name__}: {err}")] * world
            else:
                bounds = np.cumsum([0, *batches])
                objects = [
                    (
                        "ok",
                        (
                            embeds[bounds[r] : bounds[r + 1]],
                            ids[bounds[r] : bounds[r + 1]],
                            docs[bounds[r] : bounds[r + 1]],
                        ),
                    )
                    for r in range(world)
                ]
        received: list[Any] = [None]
        _collective(dist.scatter_object_list, received, objects, src=main, group=group, timeout_s=t)
        status, payload = received[0]
        if status == "error":
            if failure is not None:
                raise failure
            raise _MainRankError(f"Retrieval failed on the main rank {main}: {payload}")
        embeds, ids, docs = payload
        return np.asarray(embeds, dtype=np.float32), np.asarray(ids, dtype=np.int64), docs
