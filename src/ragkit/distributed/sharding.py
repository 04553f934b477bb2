"""Index slices that a retrieval worker can hold, and the exact merge of their top-k lists.

Nothing here needs Ray or torch.distributed: a :class:`PassageShard` is a plain object that owns a
contiguous slice of the passages (or all of them) with a faiss index over that slice, and answers
a batch of question vectors with scores, *global* passage ids, embeddings and the passages
themselves in one go, so a caller never goes back to the passages for the documents it was given.
:func:`merge_shard_results` turns the per-shard top-k lists into the top-k of the whole collection,
ordered as faiss orders a single exact index, so a sharded exact index answers exactly like an
unsharded one.

A shard is described by a small picklable :class:`ShardSpec` and built where it will live (a Ray
actor, the main rank): only the spec travels, never the index.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RagInputError
from ..retrieval._devices import import_faiss
from ..retrieval.base import PassageTable, apply_search_parameters, as_query_matrix, read_faiss_index
from ..retrieval.building import build_faiss_index

logger = logging.getLogger(__name__)

__all__ = [
    "IndexReplica",
    "PassageShard",
    "ReplicaSpec",
    "ShardResult",
    "ShardSpec",
    "merge_shard_results",
    "shard_bounds",
]


@dataclass
class ShardResult:
    """Answer of one shard (or of a whole index) to a batch of questions.

    Attributes:
        scores: ``(batch, n_docs)`` float32 inner products, best first; ``None`` where the index
            does not report them (a replica of an index that only gives ids).
        doc_ids: ``(batch, n_docs)`` int64 passage ids in the whole collection; -1 where the
            shard had fewer than ``n_docs`` passages to return.
        doc_embeds: ``(batch, n_docs, dim)`` float32 embeddings of those passages.
        doc_dicts: one dict per question, column name -> list of its ``n_docs`` passages' values
            (``title``, ``text``, ...), as ``RagRetriever.retrieve`` returns them.
    """

    scores: np.ndarray | None
    doc_ids: np.ndarray
    doc_embeds: np.ndarray
    doc_dicts: list[dict[str, Any]]


def shard_bounds(num_passages: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``range(num_passages)`` into ``num_shards`` contiguous ``(start, stop)`` slices.

    Sizes differ by at most one, larger slices first (as ``numpy.array_split``).

    Args:
        num_passages: Size of the collection.
        num_shards: Number of slices wanted.

    Returns:
        ``num_shards`` ``(start, stop)`` pairs covering the collection in order.
    """
    if num_shards < 1:
        raise RagInputError(f"num_shards must be at least 1, got {num_shards}.")
    if num_passages < num_shards:
        raise RagInputError(
            f"Cannot split {num_passages} passages into {num_shards} shards; use at most {num_passages} shards."
        )
    base, extra = divmod(num_passages, num_shards)
    bounds, start = [], 0
    for shard in range(num_shards):
        stop = start + base + (1 if shard < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _faiss_order(scores: np.ndarray, ids: np.ndarray, n_docs: int) -> np.ndarray:
    """Positions of the ``n_docs`` best candidates per row, in the order faiss's exact search gives.

    faiss's inner-product heap keeps, among equal scores, the *smallest* ids, and its final sort
    lists equal scores by *decreasing* id. Both rules are reproduced so that duplicated passages
    (wiki_dpr has some) come back in the same order as from one unsharded index.
    """
    scores = np.where(ids < 0, -np.inf, scores)
    # np.lexsort sorts by the last key first: best score, then smallest id.
    chosen = np.lexsort((ids, -scores), axis=-1)[:, :n_docs]
    chosen_scores = np.take_along_axis(scores, chosen, axis=-1)
    chosen_ids = np.take_along_axis(ids, chosen, axis=-1)
    reorder = np.lexsort((-chosen_ids, -chosen_scores), axis=-1)
    return np.take_along_axis(chosen, reorder, axis=-1)


def merge_shard_results(results: Sequence[ShardResult], n_docs: int) -> ShardResult:
    """Merge per-shard top-k answers into the top-``n_docs`` of the whole collection.

    Args:
        results: One :class:`ShardResult` per shard, for the same batch of questions, each with
            scores and at least ``n_docs`` candidates per question (padded with id -1).
        n_docs: Number of documents to keep per question.

    Returns:
        The merged :class:`ShardResult`; equal to what one exact index over all shards returns.
    """
    if not results:
        raise RagInputError("merge_shard_results needs at least one shard result.")
    if len(results) == 1:
        return results[0]
    if any(result.scores is None for result in results):
        raise RagInputError(
            "Sharded results must carry scores to be merged; build the shards with PassageShard."
        )
    per_shard = results[0].doc_ids.shape[1]
    scores = np.concatenate([result.scores for result in results], axis=1)
    ids = np.concatenate([result.doc_ids for result in results], axis=1)
    positions = _faiss_order(scores, ids, n_docs)
    merged_ids = np.take_along_axis(ids, positions, axis=-1)
    if (merged_ids < 0).any():
        raise RagInputError(
            f"n_docs={n_docs} is larger than the number of passages in the index; ask for fewer documents."
        )
    shard_of, local = np.divmod(positions, per_shard)
    batch = len(positions)
    all_embeds = np.concatenate([result.doc_embeds for result in results], axis=1)
    embeds = np.take_along_axis(all_embeds, positions[..., None], axis=1)
    doc_dicts = []
    for q in range(batch):
        columns = results[0].doc_dicts[q].keys()
        merged = {
            column: [results[s].doc_dicts[q][column][j] for s, j in zip(shard_of[q], local[q])]
            for column in columns
        }
        if "embeddings" in merged:
            merged["embeddings"] = embeds[q].astype(np.float32, copy=False)
        doc_dicts.append(merged)
    return ShardResult(
        scores=np.take_along_axis(scores, positions, axis=-1),
        doc_ids=merged_ids.astype(np.int64),
        doc_embeds=embeds.astype(np.float32, copy=False),
        doc_dicts=doc_dicts,
    )


def _load_passages(passages: Any) -> Any:
    """A ``datasets.Dataset`` from a Dataset or a directory written by ``Dataset.save_to_disk``."""
    if isinstance(passages, (str, os.PathLike)):
        from datasets import load_from_disk

        return load_from_disk(os.fspath(passages))
    return passages


class _ShardRows:
    """Rows ``[start, stop)`` of a :class:`PassageTable`'s embeddings, indexable like a numpy array."""

    def __init__(self, passages: PassageTable, start: int, stop: int):
        self.passages, self.start, self.stop = passages, start, stop
        self.shape = (stop - start, passages.dim)

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(self.shape[0])[rows]
        return self.passages.embeddings(self.start + np.asarray(rows, dtype=np.int64))


class PassageShard:
    """A contiguous slice ``[start, stop)`` of a passage collection with its own faiss index.

    Holding all passages (``start=0``, ``stop=None``) makes a full replica of the index. Documents
    come out exactly as ragkit's ``RagRetriever`` gives them (``title``, ``text`` and ``id`` when the
    passages have one), with *global* ids.

    Args:
        passages: A ``datasets.Dataset`` with ``title``, ``text`` and ``embeddings`` columns, or the
            directory it was saved to (memory-mapped: only the pages the shard touches are read).
        start: First passage (global id) of the slice.
        stop: One past the last passage of the slice; ``None`` for the end of the collection.
        index_factory: faiss factory string of the slice's index (``"Flat"`` is exact); any other
            string (``"HNSW128,SQ8"``, ``"IVF1024,PQ64"``) is trained on the slice.
        index_path: A saved faiss index over exactly this slice (for example the whole collection's
            HNSW index of wiki_dpr); when set it is read instead of built.
        nprobe: faiss ``nprobe`` for IVF indexes (``config.index_nprobe``).
        ef_search: faiss ``efSearch`` for HNSW indexes (``config.index_ef_search``).
        num_threads: faiss (OpenMP) threads for this process; ``None`` keeps faiss's default.
    """

    def __init__(
        self,
        passages: Any,
        start: int = 0,
        stop: int | None = None,
        *,
        index_factory: str = "Flat",
        index_path: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            faiss = import_faiss()

            faiss.omp_set_num_threads(num_threads)
        self.passages = PassageTable.from_dataset(_load_passages(passages), source="The passages")
        if self.passages.dim is None:
            raise RagInputError(
                "The passages have no 'embeddings' column; embed them first (`ragkit build-index` does)."
            )
        stop = self.passages.num_rows if stop is None else stop
        if not 0 <= start < stop <= self.passages.num_rows:
            raise RagInputError(
                f"Shard [{start}, {stop}) is outside the {self.passages.num_rows} passages; fix start/stop."
            )
        self.start, self.stop, self.dim = start, stop, self.passages.dim
        if index_path is not None:
            self.index = read_faiss_index(index_path)
            if self.index.ntotal != stop - start:
                raise RagInputError(
                    f"The index at {os.fspath(index_path)!r} holds {self.index.ntotal} vectors but the shard has "
                    f"{stop - start} passages; give the index built over exactly these passages."
                )
        else:
            self.index = build_faiss_index(_ShardRows(self.passages, start, stop), index_factory)
        apply_search_parameters(self.index, nprobe, ef_search)
        logger.info(
            "Passage shard [%d, %d) ready: %d vectors of width %d", start, stop, self.index.ntotal, self.dim
        )

    @property
    def num_passages(self) -> int:
        """Number of passages in the slice."""
        return self.stop - self.start

    def search(self, question_hidden_states: np.ndarray, n_docs: int) -> ShardResult:
        """Top-``n_docs`` passages of the slice for each question, with global ids and the passages.

        Args:
            question_hidden_states: ``(batch, dim)`` question vectors.
            n_docs: Number of passages per question.

        Returns:
            A :class:`ShardResult`; slots the slice cannot fill have id -1, score -inf, a zero
            embedding and an empty passage.
        """
        queries = as_query_matrix(question_hidden_states, self.dim)
        scores, local_ids = self.index.search(queries, n_docs)
        found = local_ids >= 0
        global_ids = np.where(found, local_ids + self.start, -1).astype(np.int64)
        embeds = np.zeros((*global_ids.shape, self.dim), dtype=np.float32)
        if found.any():
            embeds[found] = self.passages.embeddings(global_ids[found])
        return ShardResult(
            scores=np.where(found, scores, -np.inf).astype(np.float32),
            doc_ids=global_ids,
            doc_embeds=embeds,
            doc_dicts=self.passages.doc_dicts(global_ids),
        )


class IndexReplica:
    """Serve any ragkit ``Index`` (custom, canonical, legacy) as a whole-collection replica.

    Used for the replicated layout when the index is not a passages dataset that a
    :class:`PassageShard` can slice; the index reports no scores, so it cannot be sharded.

    Args:
        index: An object with ragkit's ``Index`` interface (``init_index``, ``get_top_docs``,
            ``get_doc_dicts``); it is initialised (loaded) here.
    """

    def __init__(self, index: Any) -> None:
        self.index = index
        if not index.is_initialized():
            index.init_index()

    def search(self, question_hidden_states: np.ndarray, n_docs: int) -> ShardResult:
        """Top-``n_docs`` passages per question from the wrapped index (``scores`` is ``None``).

        Args:
            question_hidden_states: ``(batch, dim)`` question vectors.
            n_docs: Number of passages per question.

        Returns:
            A :class:`ShardResult` without scores.
        """
        doc_ids, doc_embeds = self.index.get_top_docs(question_hidden_states, n_docs)
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        return ShardResult(
            scores=None,
            doc_ids=doc_ids,
            doc_embeds=np.asarray(doc_embeds, dtype=np.float32),
            doc_dicts=self.index.get_doc_dicts(doc_ids),
        )


@dataclass
class ShardSpec:
    """Picklable recipe for a :class:`PassageShard`, built where the shard will live.

    Attributes mirror :class:`PassageShard`'s arguments. A memory-mapped ``datasets.Dataset``
    pickles as a reference to its files, so sending one to a local actor copies no passages.
    """

    passages: Any
    start: int = 0
    stop: int | None = None
    index_factory: str = "Flat"
    index_path: str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    num_threads: int | None = None

    def build(self) -> PassageShard:
        """Build the shard (reads the passages and builds or loads its index)."""
        return PassageShard(
            self.passages,
            self.start,
            self.stop,
            index_factory=self.index_factory,
            index_path=self.index_path,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            num_threads=self.num_threads,
        )


@dataclass
class ReplicaSpec:
    """Picklable recipe for an :class:`IndexReplica`.

    Attributes:
        index: A ragkit ``Index`` (not yet loaded: it is pickled to the actor), or a recipe with a
            ``build()`` method returning one, which keeps big data out of the pickle.
        num_threads: faiss (OpenMP) threads in the actor; ``None`` keeps faiss's default.
    """

    index: Any
    num_threads: int | None = None

    def build(self) -> IndexReplica:
        """Load the index and wrap it (an object with ``build()`` is a recipe that makes the index)."""
        if self.num_threads is not None:
            faiss = import_faiss()

            faiss.omp_set_num_threads(self.num_threads)
        index = self.index.build() if hasattr(self.index, "build") else self.index
        return IndexReplica(index)
