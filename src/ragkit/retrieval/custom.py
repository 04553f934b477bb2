"""Indexes over a ``datasets.Dataset`` of passages (title, text, embeddings) and a faiss index.

:class:`HFIndexBase` holds the shared search and fetch logic; :class:`CustomHFIndex` is the user's own
index (``index_name="custom"``), given in memory or as ``passages_path`` (``dataset.save_to_disk``)
plus ``index_path`` (``faiss.write_index`` / ``dataset.get_index("embeddings").save``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .base import (
    Index,
    PassageTable,
    _check_n_docs,
    _warn_missing,
    apply_search_parameters,
    as_query_matrix,
    read_faiss_index,
)

logger = logging.getLogger(__name__)

__all__ = ["CustomHFIndex", "HFIndexBase"]


def _attached_faiss_index(dataset: Any) -> Any | None:
    """The faiss index attached to the dataset's ``embeddings`` column, if any."""
    if "embeddings" not in dataset.list_indexes():
        return None
    return dataset.get_index("embeddings").faiss_index


class HFIndexBase(Index):
    """Search a faiss index and fetch passages from the ``datasets.Dataset`` it was built over.

    The dataset is read through its Arrow table (memory-mapped when loaded from disk) and is not
    modified: its format and attached indexes stay as the caller left them.

    Args:
        vector_size: Width of the embeddings (``config.retrieval_vector_size``).
        dataset: ``datasets.Dataset`` with ``title``, ``text`` and ``embeddings`` columns.
        index_initialized: Whether the faiss index is already attached to ``dataset``.
        nprobe: faiss ``nprobe`` for IVF indexes.
        ef_search: faiss ``efSearch`` for HNSW indexes.
    """

    def __init__(
        self,
        vector_size: int,
        dataset: Any,
        index_initialized: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        self.vector_size = vector_size
        self.dataset = dataset
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.faiss_index: Any = None
        self._index_initialized = index_initialized
        self._search_device: Any = None  # a CUDA torch.device once moved; None: faiss on the CPU
        self._device_search: Any = None  # its DeviceSearch, built when the faiss index is there
        self._check_dataset_format(with_index=index_initialized)
        self.passages = self._passage_table(dataset)
        if self.passages.dim is not None and self.passages.dim != vector_size:
            raise ValueError(
                f"The dataset's embeddings have width {self.passages.dim} but `retrieval_vector_size` is "
                f"{vector_size}. Set config.retrieval_vector_size={self.passages.dim} or re-embed the passages "
                "with an encoder of the right width."
            )
        if index_initialized:
            self._set_faiss_index(_attached_faiss_index(dataset))

    def _check_dataset_format(self, with_index: bool) -> None:
        """Raise if the dataset is not a ``datasets.Dataset`` with the three columns (and index) needed."""
        from datasets import Dataset

        if not isinstance(self.dataset, Dataset):
            raise TypeError(
                f"The passages must be a datasets.Dataset, got {type(self.dataset).__name__}. Load them with "
                "`datasets.load_from_disk(path)` or build one with `Dataset.from_dict(...)`."
            )
        missing = {"title", "text", "embeddings"} - set(self.dataset.column_names)
        if missing:
            raise ValueError(
                "The dataset must have columns 'title' (str), 'text' (str) and 'embeddings' (float vectors of "
                f"width retrieval_vector_size); {sorted(missing)} missing (columns: {self.dataset.column_names}). "
                "Add or rename the columns (`ragkit build-index` writes the right layout)."
            )
        if with_index and "embeddings" not in self.dataset.list_indexes():
            raise ValueError(
                "The dataset has no faiss index on 'embeddings'. Call `dataset.add_faiss_index('embeddings')` "
                "to build one or `dataset.load_faiss_index('embeddings', path)` to load one, or give "
                "`index_path`."
            )

    @staticmethod
    def _passage_table(dataset: Any) -> PassageTable:
        """Bulk accessor over the dataset's Arrow table (respecting a ``select``/``shuffle`` mapping)."""
        indices = getattr(dataset, "_indices", None)
        row_map = None if indices is None else indices.column(0).to_numpy()
        extra = [c for c in ("id",) if c in dataset.column_names]
        return PassageTable(dataset.data.table, row_map=row_map, extra_columns=extra, source="The dataset")

    def _set_faiss_index(self, index: Any) -> None:
        """Check the faiss index against the passages and apply the search parameters."""
        if index.d != self.vector_size:
            raise ValueError(
                f"The faiss index has dimension {index.d} but `retrieval_vector_size` is {self.vector_size}. "
                "Use the index built for these passages, or set config.retrieval_vector_size to match."
            )
        if index.ntotal != self.passages.num_rows:
            raise ValueError(
                f"The faiss index holds {index.ntotal} vectors but the dataset has {self.passages.num_rows} "
                "passages: they do not belong together. Rebuild the index from this dataset."
            )
        apply_search_parameters(index, self.nprobe, self.ef_search)
        if self._search_device is not None:
            from .device_search import DeviceSearch

            self._device_search = DeviceSearch(index, self._search_device)
        self.faiss_index = index

    def init_index(self) -> None:
        """Implemented by subclasses."""
        raise NotImplementedError

    def is_initialized(self) -> bool:
        return self._index_initialized

    def get_doc_dicts(self, doc_ids: np.ndarray) -> list[dict]:
        return self.passages.doc_dicts(doc_ids)

    @property
    def search_device(self) -> Any:
        """The ``torch.device`` searched on: the CPU (faiss-cpu) until :meth:`to_search_device` moves it."""
        import torch

        return self._search_device if self._search_device is not None else torch.device("cpu")

    def to_search_device(self, device: Any) -> None:
        """Search on ``device`` from now on (``"cpu"``: faiss on the CPU again).

        On a CUDA device the faiss index is copied to it with faiss-gpu when installed; otherwise an
        exact index (``IndexFlatIP``/``IndexFlatL2``) is searched there with PyTorch (see
        :mod:`ragkit.retrieval.device_search`). Before :meth:`init_index` the move waits for the index
        to load. The CPU faiss index is kept (``save_pretrained`` writes it as before).

        Args:
            device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or a ``torch.device``.

        Raises:
            AcceleratorUnavailableError: A CUDA device was asked for and PyTorch sees none.
            ValueError: faiss has no GPU support and the index is not exact (the message names its type).
        """
        from .device_search import DeviceSearch, resolve_search_device

        resolved = resolve_search_device(device)
        if resolved.type == "cpu":
            self._search_device = self._device_search = None
            return
        device_search = None if self.faiss_index is None else DeviceSearch(self.faiss_index, resolved)
        self._search_device, self._device_search = resolved, device_search

    def get_top_docs(self, question_hidden_states: Any, n_docs: int = 5) -> tuple[np.ndarray, np.ndarray]:
        self._require_initialized()
        if self._device_search is not None:
            _, ids = self._device_search.search(question_hidden_states, n_docs)
        else:
            queries = as_query_matrix(question_hidden_states, self.vector_size)
            _check_n_docs(n_docs, self.faiss_index.ntotal)
            _, ids = self.faiss_index.search(queries, n_docs)
        return ids, self.embeddings_of(ids)

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        """`(batch_size, n_docs, dim)` float32 embeddings of `(batch_size, n_docs)` ids (zeros for -1)."""
        batch_size, n_docs = ids.shape
        flat = ids.reshape(-1)
        valid = flat >= 0
        if valid.all():
            return self.passages.embeddings(flat).reshape(batch_size, n_docs, -1)
        _warn_missing(int((~valid).sum()), flat.size)
        out = np.zeros((flat.size, self.vector_size), dtype=np.float32)
        if valid.any():
            out[valid] = self.passages.embeddings(flat[valid])
        return out.reshape(batch_size, n_docs, -1)


class CustomHFIndex(HFIndexBase):
    """The user's own passages and faiss index (``index_name="custom"``).

    Args:
        vector_size: Width of the embeddings.
        dataset: ``datasets.Dataset`` with ``title``, ``text``, ``embeddings`` (and a faiss index on
            ``embeddings`` when ``index_path`` is None).
        index_path: faiss index file to load in :meth:`init_index`.
        nprobe: faiss ``nprobe`` for IVF indexes.
        ef_search: faiss ``efSearch`` for HNSW indexes.
    """

    def __init__(
        self,
        vector_size: int,
        dataset: Any,
        index_path: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        super().__init__(
            vector_size, dataset, index_initialized=index_path is None, nprobe=nprobe, ef_search=ef_search
        )
        self.index_path = None if index_path is None else os.fspath(index_path)

    @classmethod
    def load_from_disk(
        cls,
        vector_size: int,
        dataset_path: str | os.PathLike | None,
        index_path: str | os.PathLike | None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> CustomHFIndex:
        """Load passages saved with ``dataset.save_to_disk(dataset_path)`` (memory-mapped) and the index path.

        Args:
            vector_size: Width of the embeddings.
            dataset_path: Directory written by ``save_to_disk``.
            index_path: faiss index file.
            nprobe: faiss ``nprobe`` for IVF indexes.
            ef_search: faiss ``efSearch`` for HNSW indexes.

        Returns:
            CustomHFIndex: not yet initialized (the faiss file is read by :meth:`init_index`).
        """
        if dataset_path is None or index_path is None:
            raise ValueError(
                "index_name='custom' needs `passages_path` (a directory written by `dataset.save_to_disk`) and "
                "`index_path` (a file written by `dataset.get_index('embeddings').save(path)`), or pass "
                "`indexed_dataset=` to RagRetriever.from_pretrained. `ragkit build-index` writes both."
            )
        if not os.path.isdir(dataset_path):
            raise FileNotFoundError(
                f"`passages_path` {os.fspath(dataset_path)!r} is not a directory. Give the directory written by "
                "`dataset.save_to_disk(passages_path)`."
            )
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"`index_path` {os.fspath(index_path)!r} does not exist. Give the file written by "
                "`dataset.get_index('embeddings').save(index_path)` or `ragkit build-index`."
            )
        from datasets import load_from_disk

        logger.info("Loading passages from %s", dataset_path)
        try:
            dataset = load_from_disk(os.fspath(dataset_path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"`passages_path` {os.fspath(dataset_path)!r} is not a dataset saved with `save_to_disk` "
                f"({err}). Save the passages with `dataset.save_to_disk(path)`."
            ) from err
        if not hasattr(dataset, "list_indexes"):
            raise TypeError(
                f"`passages_path` {os.fspath(dataset_path)!r} holds a DatasetDict; save a single split "
                "(`dataset_dict['train'].save_to_disk(path)`)."
            )
        return cls(
            vector_size=vector_size,
            dataset=dataset,
            index_path=index_path,
            nprobe=nprobe,
            ef_search=ef_search,
        )

    def init_index(self) -> None:
        """Read the faiss index from ``index_path`` (no-op when already initialized)."""
        if self.is_initialized():
            return
        logger.info("Loading index from %s", self.index_path)
        self._set_faiss_index(read_faiss_index(self.index_path))
        self._index_initialized = True
