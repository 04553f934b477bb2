"""A :class:`~ragkit.RagRetriever` whose index lives in Ray actors.

:class:`RayRetriever` is a ``RagRetriever``: same constructor arguments (plus the Ray ones), same
``__call__``/``retrieve``/``postprocess_docs``. Only the lookup "question vectors -> ids, embeddings,
passages" goes to the actors (:class:`~ragkit.distributed.ray_service.RayIndexService`); the
training process itself never loads the faiss index. A RAG model takes it wherever it takes a
``RagRetriever``.

The actors build their index from a small recipe, not from a copy sent over the wire:

* **replicated**: each actor builds the very index the single-process retriever would (the same
  custom dataset and faiss file, or the index the config names), so its answers are that
  retriever's answers.
* **sharded**: actor ``i`` builds an index over passages ``[start_i, stop_i)`` of the passages
  dataset (``index_factory="Flat"``, exact inner product, by default) and the client merges the
  shards' top-k lists exactly, so on an exact index the answers equal the single-process ones.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..configuration_rag import RagConfig
from ..errors import RagInputError
from ..retrieval.base import Index, as_query_matrix
from ..retrieval.canonical import CanonicalHFIndex
from ..retrieval.custom import CustomHFIndex
from ..retrieval.legacy import LegacyIndex
from ..retrieval_rag import RagRetriever
from .ray_service import LAYOUTS, RayIndexService
from .sharding import ReplicaSpec, ShardSpec, shard_bounds

logger = logging.getLogger(__name__)

__all__ = ["RayRetriever"]


def _without_faiss_indexes(dataset: Any) -> Any:
    """A shallow copy of a ``datasets.Dataset`` without attached faiss indexes.

    Shards build their own index over their slice; shipping the whole collection's index to each of
    them would only cost memory and time.
    """
    if not dataset.list_indexes():
        return dataset
    clone = copy.copy(dataset)
    clone._indexes = {}
    return clone


@dataclass
class _CustomIndexRecipe:
    """Rebuild a :class:`CustomHFIndex` in an actor: memory-mapped passages travel as their path."""

    vector_size: int
    dataset: Any
    index_path: str | None
    nprobe: int | None
    ef_search: int | None

    def build(self) -> Index:
        """The same index as the single-process retriever's, loaded."""
        index = CustomHFIndex(
            self.vector_size,
            self.dataset,
            index_path=self.index_path,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
        )
        index.init_index()
        return index


@dataclass
class _ConfigIndexRecipe:
    """Build, in an actor, the index a :class:`RagConfig` names (canonical wiki_dpr, legacy, custom on disk)."""

    config: RagConfig
    allow_pickle: bool = False

    def build(self) -> Index:
        """The index ``RagRetriever`` builds from the config, loaded."""
        index = RagRetriever._build_index(self.config, allow_pickle=self.allow_pickle)
        index.init_index()
        return index


class RayRetriever(RagRetriever):
    """``RagRetriever`` served by Ray actors (replicated or sharded index).

    Args:
        config: As for :class:`~ragkit.RagRetriever`.
        question_encoder_tokenizer: As for :class:`~ragkit.RagRetriever`.
        generator_tokenizer: As for :class:`~ragkit.RagRetriever`.
        index: As for :class:`~ragkit.RagRetriever`; never loaded in this process, only used as the
            recipe for the actors.
        init_retrieval: Start the actors now (else on :meth:`init_retrieval`).
        allow_pickle: As for :class:`~ragkit.RagRetriever` (legacy index files).
        num_actors: Number of actors: replicas (``"replicated"``) or shards (``"sharded"``).
        layout: ``"replicated"`` (each actor holds the whole index) or ``"sharded"`` (each holds a
            contiguous slice of the passages; needs a passages dataset with embeddings).
        address: Ray cluster to attach to (``"auto"``, ``"ray://head:10001"``); ``None`` uses the Ray
            already started in this process or starts a local instance.
        passages: For ``"sharded"``: the passages (a ``datasets.Dataset`` or a ``save_to_disk``
            directory) when the index does not carry them.
        index_factory: faiss factory string of each shard's index; ``"Flat"`` is exact. Any other
            string is trained by each shard on its own slice when the actor starts.
        shard_index_paths: For ``"sharded"``: one prebuilt faiss file per shard, over exactly that
            shard's passages (:func:`~ragkit.distributed.shard_bounds` gives the slices); read
            instead of built, for indexes too slow to build at start-up (HNSW, IVF-PQ).
        name: Share actors by name across processes (every training rank passing the same name and
            address uses the same actors); ``None`` for private actors.
        actor_options: Extra Ray options per actor (``num_cpus``, ``memory``, ``resources``, ...).
        max_restarts: How many times Ray restarts a dead actor.
        call_timeout_s: Longest wait for one retrieval call.
        init_timeout_s: Longest wait for an actor to build its index.
        num_threads: faiss threads per actor (defaults to faiss's choice).
        ray_init_kwargs: Passed to ``ray.init`` if this retriever starts or attaches to Ray.
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
        num_actors: int = 1,
        layout: str = "replicated",
        address: str | None = None,
        passages: Any = None,
        index_factory: str = "Flat",
        shard_index_paths: list[str] | None = None,
        name: str | None = None,
        actor_options: dict[str, Any] | None = None,
        max_restarts: int = 2,
        call_timeout_s: float = 120.0,
        init_timeout_s: float = 600.0,
        num_threads: int | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise RagInputError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        if num_actors < 1:
            raise RagInputError(f"num_actors must be at least 1, got {num_actors}.")
        self.num_actors = num_actors
        self.layout = layout
        self.address = address
        self.passages = passages
        if shard_index_paths is not None and (layout != "sharded" or len(shard_index_paths) != num_actors):
            raise RagInputError(
                f"shard_index_paths needs layout='sharded' and one file per shard ({num_actors}), got "
                f"{len(shard_index_paths)} file(s) with layout={layout!r}."
            )
        self.index_factory = index_factory
        self.shard_index_paths = shard_index_paths
        self.name = name
        self.actor_options = actor_options
        self.max_restarts = max_restarts
        self.call_timeout_s = call_timeout_s
        self.init_timeout_s = init_timeout_s
        self.num_threads = num_threads
        self.ray_init_kwargs = ray_init_kwargs
        self.service: RayIndexService | None = None
        self._allow_pickle = allow_pickle
        self._index_from_config = index is None
        self._num_passages: int | None = None
        # The parent builds the Index object (cheap: paths and memory maps) but, with
        # init_retrieval routed to init_retrieval() below, never loads it here.
        super().__init__(
            config,
            question_encoder_tokenizer,
            generator_tokenizer,
            index=index,
            init_retrieval=init_retrieval,
            allow_pickle=allow_pickle,
        )

    @classmethod
    def from_retriever(cls, retriever: RagRetriever, **kwargs: Any) -> RayRetriever:
        """Serve an existing retriever's index from Ray actors.

        Args:
            retriever: A :class:`~ragkit.RagRetriever`; its config, tokenizers and index recipe are reused.
            **kwargs: :class:`RayRetriever` arguments (``num_actors``, ``layout``, ``address``, ...).

        Returns:
            RayRetriever: started unless ``init_retrieval=False`` is given.
        """
        return cls._from_retriever(retriever, **kwargs)

    def _shard_passages(self) -> Any:
        """The passages dataset the shards slice (given, or the index's own)."""
        if self.passages is not None:
            return self.passages
        dataset = getattr(self.index, "dataset", None)
        if dataset is None or "embeddings" not in getattr(dataset, "column_names", ()):
            raise RagInputError(
                f"layout='sharded' needs the passages with their embeddings, and the {type(self.index).__name__} "
                "has none: pass passages= (a datasets.Dataset or a save_to_disk directory with title, text "
                "and embeddings) or use layout='replicated'."
            )
        return _without_faiss_indexes(dataset)

    def _replica_recipe(self) -> Any:
        """How an actor rebuilds the index of this retriever."""
        if isinstance(self.index, CustomHFIndex):
            return _CustomIndexRecipe(
                self.index.vector_size,
                self.index.dataset,
                self.index.index_path,
                self.index.nprobe,
                self.index.ef_search,
            )
        if self._index_from_config or isinstance(self.index, (CanonicalHFIndex, LegacyIndex)):
            # The backends the config names are rebuilt from the config, which holds only names and paths.
            return _ConfigIndexRecipe(self.config, getattr(self.index, "allow_pickle", self._allow_pickle))
        # A user-made index: it travels as it is (pickled), so it should hold paths, not data.
        return self.index

    def _specs(self) -> list[ShardSpec | ReplicaSpec]:
        """One spec per actor for the chosen layout."""
        if self.layout == "replicated":
            spec = ReplicaSpec(self._replica_recipe(), num_threads=self.num_threads)
            passages = getattr(self.index, "passages", None)
            self._num_passages = getattr(passages, "num_rows", None)
            return [spec] * self.num_actors
        passages = self._shard_passages()
        if isinstance(passages, (str, bytes)) or hasattr(passages, "__fspath__"):
            from datasets import load_from_disk

            num_passages = len(load_from_disk(str(passages)))
        else:
            num_passages = len(passages)
        self._num_passages = num_passages
        return [
            ShardSpec(
                passages,
                start,
                stop,
                index_factory=self.index_factory,
                index_path=None if self.shard_index_paths is None else str(self.shard_index_paths[shard]),
                nprobe=getattr(self.config, "index_nprobe", None),
                ef_search=getattr(self.config, "index_ef_search", None),
                num_threads=self.num_threads,
            )
            for shard, (start, stop) in enumerate(shard_bounds(num_passages, self.num_actors))
        ]

    def init_retrieval(self) -> None:
        """Start (or attach to) Ray and the actors, and wait until every actor has built its index."""
        if self.service is not None:
            return
        logger.info("initializing retrieval: %d %s Ray actor(s)", self.num_actors, self.layout)
        service = RayIndexService(
            self._specs(),
            layout=self.layout,
            address=self.address,
            name=self.name,
            actor_options=self.actor_options,
            max_restarts=self.max_restarts,
            call_timeout_s=self.call_timeout_s,
            init_timeout_s=self.init_timeout_s,
            ray_init_kwargs=self.ray_init_kwargs,
        )
        self.service = service.start()

    def retrieve(self, question_hidden_states: Any, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Retrieve passages for a batch of question vectors from the actors (one round trip).

        Args:
            question_hidden_states: `(batch_size, vector_size)` numpy array or torch tensor.
            n_docs: Passages per question.

        Returns:
            tuple: ``retrieved_doc_embeds`` `(batch_size, n_docs, vector_size)` float32, ``doc_ids``
            `(batch_size, n_docs)` int64 and ``doc_dicts``, as :meth:`RagRetriever.retrieve`.
        """
        if self.service is None:
            self.init_retrieval()
        if self._num_passages is not None and n_docs > self._num_passages:
            raise RagInputError(
                f"`n_docs`={n_docs} is larger than the number of passages in the index ({self._num_passages}). "
                "Lower `n_docs` (config.n_docs or the n_docs argument) or index more passages."
            )
        result = self.service.search(
            as_query_matrix(question_hidden_states, self.config.retrieval_vector_size), n_docs
        )
        return result.doc_embeds, result.doc_ids, result.doc_dicts

    def close(self) -> None:
        """Stop private actors (and a local Ray instance this retriever started).

        Named actors are shared with the other processes of the job: they are left running and end
        with the process that created them.
        """
        if self.service is not None:
            self.service.close(kill_actors=self.name is None)
            self.service = None

    def __enter__(self) -> RayRetriever:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
