"""The index protocol behind :class:`~ragkit.RagRetriever` and the building blocks its backends share.

An index answers two questions: which passages are nearest to a batch of query vectors
(:meth:`Index.get_top_docs`) and what those passages say (:meth:`Index.get_doc_dicts`). Backends keep
their passages in Arrow tables (memory-mapped where they come from disk) and fetch rows in bulk:
:class:`PassageTable` turns a list of row ids into a contiguous embedding matrix and lists of strings
with a handful of numpy/Arrow calls, whatever the batch size.

When faiss returns fewer hits than asked (id ``-1``: an IVF index probing too few lists, an HNSW
graph with a low ``efSearch``), the missing slots are padded, never filled by repeating another
passage: id ``-1``, a zero embedding and an empty title and text (:data:`MISSING_DOC_ID`).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import CorruptFileError, MissingFileError, RagInputError
from ._devices import import_faiss
from ._queries import as_query_matrix, check_n_docs, check_query_shape

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING_DOC_ID",
    "HFIndexBase",
    "Index",
    "PassageTable",
    "apply_search_parameters",
    "as_query_matrix",
    "check_n_docs",
    "check_query_shape",
    "read_faiss_index",
]

#: Id given to the slots of a result that the index could not fill (faiss returned ``-1``).
MISSING_DOC_ID = -1


def read_faiss_index(path: str | os.PathLike, what: str = "index_path") -> Any:
    """Read a faiss index file, turning faiss's low-level errors into an error that names the file."""
    faiss = import_faiss()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"No faiss index file at {path!r} (`{what}`). Point `{what}` at the file written by "
            "`dataset.get_index('embeddings').save(path)`, `faiss.write_index` or `ragkit build-index`."
        )
    try:
        return faiss.read_index(path)
    except RuntimeError as err:
        raise CorruptFileError(
            f"Could not read the faiss index at {path!r} (`{what}`): the file is truncated, corrupt or not a "
            f"faiss index ({str(err).strip().splitlines()[-1] if str(err).strip() else err}). Rebuild it, or "
            "download it again (force_download=True for Hub files)."
        ) from err


def apply_search_parameters(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set ``nprobe`` (IVF indexes) and ``efSearch`` (HNSW graphs, including an IVF's HNSW quantizer).

    A value that does not apply to the index type is logged and ignored, so one config can serve
    several indexes.
    """
    faiss = import_faiss()

    if nprobe is not None:
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        if ivf is None:
            logger.warning("index_nprobe=%d ignored: the index is not an IVF index.", nprobe)
        else:
            ivf.nprobe = int(nprobe)
    if ef_search is not None:
        graphs = []
        top = faiss.downcast_index(index)
        if hasattr(top, "hnsw"):
            graphs.append(top.hnsw)
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            quantizer = faiss.downcast_index(ivf.quantizer)
            if hasattr(quantizer, "hnsw"):
                graphs.append(quantizer.hnsw)
        if not graphs:
            logger.warning("index_ef_search=%d ignored: the index has no HNSW graph.", ef_search)
        for graph in graphs:
            graph.efSearch = int(ef_search)


def _warn_missing(n_missing: int, n_asked: int) -> None:
    """Log that faiss returned fewer hits than asked and how to get more."""
    logger.warning(
        "The index returned %d empty slot(s) out of %d (faiss id -1); they are padded with doc id -1, an "
        "empty passage and a zero embedding. Raise index_nprobe (IVF) or index_ef_search (HNSW) to fill them.",
        n_missing,
        n_asked,
    )


def _is_string_type(arrow_type: Any) -> bool:
    """Whether an Arrow type holds strings (``string`` or ``large_string``)."""
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


class PassageTable:
    """Bulk, row-id based access to passages stored in an Arrow table (title, text, embeddings).

    The embedding column is exposed chunk by chunk as zero-copy `(rows, dim)` numpy views (over the
    memory map when the table lives on disk), so gathering `n` rows is one fancy-indexing per chunk
    touched, not `n` Python-level lookups. The ``title`` and ``text`` columns are checked when the
    table is opened (string type, no nulls: the schema and a null count, no scan of the values).

    Args:
        table: A ``pyarrow.Table`` with ``title`` and ``text`` string columns and, optionally, an
            ``embeddings`` column of fixed-width float lists.
        row_map: Optional `(n_rows,)` int array mapping logical row ids to table rows (the indices
            mapping of a ``datasets.Dataset`` after ``select``/``shuffle``).
        extra_columns: Other columns to return with each passage (``id`` for wiki_dpr); None: every
            column besides ``title``, ``text`` and ``embeddings``.
        source: Human-readable origin used in error messages.
    """

    def __init__(
        self,
        table: Any,
        row_map: np.ndarray | None = None,
        extra_columns: Sequence[str] | None = (),
        source: str = "the dataset",
    ):
        missing = {"title", "text"} - set(table.column_names)
        if missing:
            raise RagInputError(
                f"{source} must have columns 'title' (str), 'text' (str) and 'embeddings' (float vectors), "
                f"but {sorted(missing)} missing (columns: {table.column_names}). Rename or add the columns "
                "(for example `dataset.rename_column('passage', 'text')`)."
            )
        self._check_string_columns(table, source)
        self.table = table
        self.row_map = None if row_map is None else np.asarray(row_map, dtype=np.int64)
        self.num_rows = len(self.row_map) if self.row_map is not None else table.num_rows
        if self.num_rows == 0:
            raise RagInputError(
                f"{source} holds no passages: there is nothing to retrieve. Index at least one passage "
                "(`ragkit build-index`), or check that the dataset was not filtered down to nothing."
            )
        if extra_columns is None:
            extra_columns = [c for c in table.column_names if c not in ("title", "text", "embeddings")]
        self.extra_columns = tuple(c for c in extra_columns if c in table.column_names)
        self.source = source
        self._starts = np.zeros(1, dtype=np.int64)
        self._embedding_chunks: list[np.ndarray] | None = None
        self.dim: int | None = None
        if "embeddings" in table.column_names:
            self._embedding_chunks, self._starts = self._embedding_views(table.column("embeddings"))
            self.dim = self._embedding_chunks[0].shape[1] if self._embedding_chunks else None
        # Zero-copy record batches of the other columns: one ``take`` per batch fetches every column.
        self.text_columns = ("title", "text", *self.extra_columns)
        self._string_columns = {c for c in self.text_columns if _is_string_type(table.schema.field(c).type)}
        batches = [b for b in table.select(list(self.text_columns)).to_batches() if b.num_rows]
        self._text_batches = batches or [table.select(list(self.text_columns)).to_batches()[0]]
        lengths = np.fromiter((b.num_rows for b in self._text_batches), dtype=np.int64)
        self._text_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    @classmethod
    def from_dataset(cls, dataset: Any, source: str = "The dataset") -> PassageTable:
        """Bulk accessor over a ``datasets.Dataset``'s Arrow table (respecting a ``select``/``shuffle`` mapping).

        Every column is returned with each passage, as ``dataset[ids]`` would.
        """
        indices = getattr(dataset, "_indices", None)
        row_map = None if indices is None else indices.column(0).to_numpy()
        return cls(dataset.data.table, row_map=row_map, extra_columns=None, source=source)

    @staticmethod
    def _check_string_columns(table: Any, source: str) -> None:
        """Refuse a ``title``/``text`` column that is not of string type or holds nulls."""
        for column in ("title", "text"):
            arrow_type = table.schema.field(column).type
            if not _is_string_type(arrow_type) and table.num_rows:
                raise RagInputError(
                    f"{source}: the {column!r} column must hold strings, but its type is {arrow_type}. "
                    f"Convert it (for example `dataset.cast_column({column!r}, datasets.Value('string'))`) "
                    "or rebuild the passages with `ragkit build-index`."
                )
            nulls = table.column(column).null_count
            if nulls:
                raise RagInputError(
                    f"{source}: the {column!r} column has {nulls} missing (null) value(s); every passage "
                    f"needs a {column} (use '' for none), for example "
                    f"`dataset.map(lambda row: {{{column!r}: row[{column!r}] or ''}})`."
                )

    def _embedding_views(self, column: Any) -> tuple[list[np.ndarray], np.ndarray]:
        """Zero-copy `(rows, dim)` views of every chunk of the embeddings column."""
        import pyarrow as pa

        views, starts, start = [], [], 0
        dim = None
        for chunk in column.chunks:
            if len(chunk) == 0:
                continue
            if chunk.null_count:
                raise RagInputError(f"{self.source}: the 'embeddings' column has missing (null) vectors.")
            if pa.types.is_fixed_size_list(chunk.type):
                width = chunk.type.list_size
                values = chunk.values.slice(chunk.offset * width, len(chunk) * width)
            elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                offsets = chunk.offsets.to_numpy()
                lengths = np.diff(offsets)
                width = int(lengths[0])
                if not np.all(lengths == width):
                    raise RagInputError(
                        f"{self.source}: the 'embeddings' column holds vectors of different lengths "
                        f"({int(lengths.min())} to {int(lengths.max())}); every passage needs one vector "
                        "of the same width."
                    )
                values = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            else:
                raise RagInputError(
                    f"{self.source}: the 'embeddings' column must hold float vectors, got type {chunk.type}."
                )
            if width == 0:
                raise CorruptFileError(
                    f"{self.source}: the 'embeddings' column holds vectors of width 0, so the passages file is "
                    "damaged or was written without embeddings. Rebuild the passages (`ragkit build-index`) or "
                    "restore them from a good copy."
                )
            if dim is not None and width != dim:
                raise RagInputError(f"{self.source}: the 'embeddings' column mixes widths {dim} and {width}.")
            dim = width
            array = values.to_numpy(zero_copy_only=False)
            views.append(array.reshape(len(chunk), width))
            starts.append(start)
            start += len(chunk)
        return views, np.asarray(starts if starts else [0], dtype=np.int64)

    def _table_rows(self, ids: np.ndarray) -> np.ndarray:
        """Map logical row ids to physical table rows."""
        return ids if self.row_map is None else self.row_map[ids]

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """`(n, dim)` float32 embeddings of the rows ``ids`` (all valid, 1-D)."""
        if self._embedding_chunks is None:
            raise RagInputError(f"{self.source} has no 'embeddings' column.")
        rows = self._table_rows(ids)
        if len(self._embedding_chunks) == 1:
            out = self._embedding_chunks[0][rows]
        else:
            chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
            out = np.empty((len(rows), self.dim), dtype=self._embedding_chunks[0].dtype)
            for chunk in np.unique(chunk_of):
                mask = chunk_of == chunk
                out[mask] = self._embedding_chunks[chunk][rows[mask] - self._starts[chunk]]
        return out.astype(np.float32, copy=False)

    def all_embeddings(self) -> np.ndarray:
        """`(num_rows, dim)` float32 matrix of every embedding (for building an index in memory)."""
        if self._embedding_chunks is None:
            raise RagInputError(f"{self.source} has no 'embeddings' column.")
        matrix = np.concatenate(self._embedding_chunks).astype(np.float32, copy=False)
        return matrix if self.row_map is None else matrix[self.row_map]

    def texts(self, ids: np.ndarray) -> dict[str, list]:
        """Values of the string columns (title, text, extras) at rows ``ids`` (all valid, 1-D)."""
        import pyarrow as pa

        rows = self._table_rows(ids)
        if len(self._text_batches) == 1:
            return self._text_batches[0].take(pa.array(rows)).to_pydict()
        batch_of = np.searchsorted(self._text_starts, rows, side="right") - 1
        first = batch_of[0]
        if np.all(batch_of == first):
            local = pa.array(rows - self._text_starts[first])
            return self._text_batches[first].take(local).to_pydict()
        order = np.argsort(batch_of, kind="stable")
        sorted_batches, sorted_rows = batch_of[order], rows[order]
        bounds = np.flatnonzero(np.diff(sorted_batches)) + 1
        parts = [
            self._text_batches[sorted_batches[start]].take(
                pa.array(part - self._text_starts[sorted_batches[start]])
            )
            for start, part in zip(np.concatenate([[0], bounds]), np.split(sorted_rows, bounds))
        ]
        gathered = pa.Table.from_batches(parts).to_pydict()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {column: [values[i] for i in inverse.tolist()] for column, values in gathered.items()}

    def strings(self, column: str, ids: np.ndarray) -> list:
        """Values of one string column at rows ``ids`` (all valid, 1-D)."""
        return self.texts(ids)[column]

    def doc_dicts(self, doc_ids: np.ndarray) -> list[dict]:
        """One dict per question of every column at `(batch_size, n_docs)` row ids (-1 = an empty slot).

        As ``dataset[ids]`` with the embeddings formatted as numpy: each dict maps a column name to the
        list of its ``n_docs`` values, and ``embeddings`` (when the table has it) to a `(n_docs, dim)`
        float32 array. Empty slots get ``""`` in string columns, None in others and a zero embedding.
        """
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if doc_ids.ndim != 2:
            raise RagInputError(f"`doc_ids` must have shape (batch_size, n_docs), got {doc_ids.shape}.")
        batch_size, n_docs = doc_ids.shape
        flat = doc_ids.reshape(-1)
        if flat.size and flat.max() >= self.num_rows:
            raise IndexError(
                f"doc id {int(flat.max())} is out of range for {self.source} with {self.num_rows} passages: "
                "the faiss index and the passages do not belong together. Rebuild or re-pair them."
            )
        valid = flat >= 0
        if flat.size == 0:
            values = {column: [] for column in self.text_columns}
        elif valid.all():
            values = self.texts(flat)
        else:
            found = self.texts(flat[valid]) if valid.any() else {c: [] for c in self.text_columns}
            positions = np.flatnonzero(valid).tolist()
            values = {}
            for column in self.text_columns:
                column_values = ["" if column in self._string_columns else None] * flat.size
                for position, value in zip(positions, found[column]):
                    column_values[position] = value
                values[column] = column_values
        embeddings = None
        if self._embedding_chunks is not None:
            embeddings = np.zeros((flat.size, self.dim or 0), dtype=np.float32)
            if valid.any():
                embeddings[valid] = self.embeddings(flat[valid])
            embeddings = embeddings.reshape(batch_size, n_docs, self.dim or 0)
        docs = []
        for i in range(batch_size):
            doc = {column: values[column][i * n_docs : (i + 1) * n_docs] for column in self.text_columns}
            if embeddings is not None:
                doc["embeddings"] = embeddings[i]
            docs.append(doc)
        return docs


class Index(abc.ABC):
    """What :class:`~ragkit.RagRetriever` needs from an index (the same four methods as the reference's)."""

    @abc.abstractmethod
    def init_index(self) -> None:
        """Load the index into memory (called once, by the retriever or by the user)."""

    @abc.abstractmethod
    def is_initialized(self) -> bool:
        """Whether :meth:`init_index` has run."""

    @abc.abstractmethod
    def get_top_docs(
        self, question_hidden_states: np.ndarray, n_docs: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the index.

        Args:
            question_hidden_states: `(batch_size, vector_size)` float32 query vectors.
            n_docs: Number of documents per query.

        Returns:
            tuple: doc ids `(batch_size, n_docs)` int64 (``-1`` marks an empty slot) and their
            embeddings `(batch_size, n_docs, vector_size)` float32 (zeros for empty slots).
        """

    @abc.abstractmethod
    def get_doc_dicts(self, doc_ids: np.ndarray) -> list[dict]:
        """Passages of `(batch_size, n_docs)` doc ids: one dict per query, column name -> its ``n_docs`` values.

        ragkit's dataset-backed indexes return every column, ``embeddings`` as an `(n_docs, dim)` float32
        array (as Transformers does); the legacy index returns ``title`` and ``text``.
        """

    @property
    def search_device(self) -> Any:
        """The ``torch.device`` :meth:`get_top_docs` searches on: the CPU (faiss-cpu) unless moved."""
        import torch

        return torch.device("cpu")

    def to_search_device(self, device: Any) -> None:
        """Search on ``device`` from now on; indexes that only search on the CPU accept ``"cpu"`` alone.

        Args:
            device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or a ``torch.device``.

        Raises:
            AcceleratorUnavailableError: ``device`` is a CUDA device and PyTorch sees none.
            ValueError: This index cannot search on ``device``.
        """
        from .device_search import resolve_search_device

        resolved = resolve_search_device(device)
        if resolved.type != "cpu":
            raise RagInputError(
                f"{type(self).__name__} searches with faiss on the CPU only and cannot search on {resolved}. "
                "Search on the GPU is supported by the custom and wiki_dpr indexes (index_name='custom', "
                "'exact', 'compressed'); keep search_device='cpu' for this one."
            )

    def _require_initialized(self) -> None:
        """Raise a clear error when searching before :meth:`init_index`."""
        if not self.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} is not initialized: call `retriever.init_retrieval()` (or "
                "`index.init_index()`) first, or create the retriever with init_retrieval=True."
            )


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
        source: Where the passages come from, for error messages (``"The passages at '/data/x'"``).
    """

    def __init__(
        self,
        vector_size: int,
        dataset: Any,
        index_initialized: bool = False,
        nprobe: int | None = None,
        ef_search: int | None = None,
        source: str = "The dataset",
    ):
        self.vector_size = vector_size
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.source = source
        self.faiss_index: Any = None
        self._index_initialized = index_initialized
        self._search_device: Any = None  # a CUDA torch.device once moved; None: faiss on the CPU
        self._device_search: Any = None  # its DeviceSearch, built when the faiss index is there
        self._set_dataset(dataset, with_index=index_initialized)
        if index_initialized:
            self._set_faiss_index(_attached_faiss_index(dataset))

    def _set_dataset(self, dataset: Any, with_index: bool) -> None:
        """Check ``dataset`` (columns, types, embedding width) and read passages from it from now on."""
        self.dataset = dataset
        self._check_dataset_format(with_index=with_index)
        self.passages = PassageTable.from_dataset(dataset, source=self.source)
        if self.passages.dim is not None and self.passages.dim != self.vector_size:
            raise RagInputError(
                f"The dataset's embeddings have width {self.passages.dim} but `retrieval_vector_size` is "
                f"{self.vector_size}. Set config.retrieval_vector_size={self.passages.dim} or re-embed the passages "
                "with an encoder of the right width."
            )

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
            raise RagInputError(
                "The dataset must have columns 'title' (str), 'text' (str) and 'embeddings' (float vectors of "
                f"width retrieval_vector_size); {sorted(missing)} missing (columns: {self.dataset.column_names}). "
                "Add or rename the columns (`ragkit build-index` writes the right layout)."
            )
        if with_index and "embeddings" not in self.dataset.list_indexes():
            raise RagInputError(
                "The dataset has no faiss index on 'embeddings'. Call `dataset.add_faiss_index('embeddings')` "
                "to build one or `dataset.load_faiss_index('embeddings', path)` to load one, or give "
                "`index_path`."
            )

    def _set_faiss_index(self, index: Any) -> None:
        """Check the faiss index against the passages and apply the search parameters."""
        if index.d != self.vector_size:
            raise RagInputError(
                f"The faiss index has dimension {index.d} but `retrieval_vector_size` is {self.vector_size}. "
                "Use the index built for these passages, or set config.retrieval_vector_size to match."
            )
        if index.ntotal != self.passages.num_rows:
            raise RagInputError(
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
            _, ids = self.faiss_index.search(queries, check_n_docs(n_docs, self.faiss_index.ntotal))
        return ids, self.embeddings_of(ids)

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        """`(batch_size, n_docs, dim)` float32 embeddings of `(batch_size, n_docs)` ids (zeros for -1)."""
        batch_size, n_docs = ids.shape
        flat = ids.reshape(-1)
        if flat.size and flat.max() >= self.passages.num_rows:
            raise RagInputError(
                f"The faiss index returned doc id {int(flat.max())} but the dataset has {self.passages.num_rows} "
                "passages: its ids must be the row numbers of the passages (faiss id i is passage i), not other "
                "ids (an IndexIDMap with add_with_ids). Rebuild the index from these passages in their order."
            )
        valid = flat >= 0
        if valid.all():
            # The width is explicit: with no question (batch_size 0) there is nothing to infer it from.
            return self.passages.embeddings(flat).reshape(batch_size, n_docs, self.vector_size)
        _warn_missing(int((~valid).sum()), flat.size)
        out = np.zeros((flat.size, self.vector_size), dtype=np.float32)
        if valid.any():
            out[valid] = self.passages.embeddings(flat[valid])
        return out.reshape(batch_size, n_docs, self.vector_size)
