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

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING_DOC_ID",
    "Index",
    "PassageTable",
    "apply_search_parameters",
    "as_query_matrix",
    "check_query_shape",
    "read_faiss_index",
]

#: Id given to the slots of a result that the index could not fill (faiss returned ``-1``).
MISSING_DOC_ID = -1


def as_query_matrix(question_hidden_states: Any, dim: int | None = None) -> np.ndarray:
    """Return questions as a C-contiguous `(batch_size, dim)` float32 numpy array.

    Accepts numpy arrays, lists and torch tensors on any device and in any float dtype (half
    precision on GPU included): they are moved to CPU float32, which is what faiss searches with.

    Args:
        question_hidden_states: `(batch_size, dim)` query vectors.
        dim: Width the index expects; a different width raises ``ValueError``.

    Returns:
        np.ndarray: `(batch_size, dim)` float32.
    """
    if hasattr(question_hidden_states, "detach"):  # torch.Tensor, without importing torch here
        question_hidden_states = question_hidden_states.detach().to("cpu").float().numpy()
    queries = np.ascontiguousarray(question_hidden_states, dtype=np.float32)
    check_query_shape(queries.shape, dim)
    return queries


def check_query_shape(shape: tuple[int, ...], dim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``shape`` is `(batch_size, dim)` (any width when ``dim`` is None)."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(
            f"`question_hidden_states` must have shape (batch_size, vector_size), got {shape}. "
            "Pass one row per question (add a batch axis for a single question)."
        )
    if dim is not None and shape[1] != dim:
        raise ValueError(
            f"`question_hidden_states` has width {shape[1]} but the index holds vectors of width {dim}. "
            "Use a question encoder whose output size matches the index (config.retrieval_vector_size) "
            "or an index built with the same encoder family."
        )


def read_faiss_index(path: str | os.PathLike, what: str = "index_path") -> Any:
    """Read a faiss index file, turning faiss's low-level errors into an error that names the file."""
    import faiss

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No faiss index file at {path!r} (`{what}`). Point `{what}` at the file written by "
            "`dataset.get_index('embeddings').save(path)`, `faiss.write_index` or `ragkit build-index`."
        )
    try:
        return faiss.read_index(path)
    except RuntimeError as err:
        raise ValueError(
            f"Could not read the faiss index at {path!r} (`{what}`): the file is truncated, corrupt or not a "
            f"faiss index ({str(err).strip().splitlines()[-1] if str(err).strip() else err}). Rebuild it, or "
            "download it again (force_download=True for Hub files)."
        ) from err


def apply_search_parameters(index: Any, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set ``nprobe`` (IVF indexes) and ``efSearch`` (HNSW graphs, including an IVF's HNSW quantizer).

    A value that does not apply to the index type is logged and ignored, so one config can serve
    several indexes.
    """
    import faiss

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


def _check_n_docs(n_docs: int, ntotal: int) -> None:
    """Raise when more documents are asked for than the index holds."""
    if not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise ValueError(f"`n_docs` must be an integer >= 1, got {n_docs!r}.")
    if n_docs > ntotal:
        raise ValueError(
            f"`n_docs`={n_docs} is larger than the number of passages in the index ({ntotal}). "
            "Lower `n_docs` (config.n_docs or the n_docs argument) or index more passages."
        )


def _warn_missing(n_missing: int, n_asked: int) -> None:
    """Log that faiss returned fewer hits than asked and how to get more."""
    logger.warning(
        "The index returned %d empty slot(s) out of %d (faiss id -1); they are padded with doc id -1, an "
        "empty passage and a zero embedding. Raise index_nprobe (IVF) or index_ef_search (HNSW) to fill them.",
        n_missing,
        n_asked,
    )


class PassageTable:
    """Bulk, row-id based access to passages stored in an Arrow table (title, text, embeddings).

    The embedding column is exposed chunk by chunk as zero-copy `(rows, dim)` numpy views (over the
    memory map when the table lives on disk), so gathering `n` rows is one fancy-indexing per chunk
    touched, not `n` Python-level lookups.

    Args:
        table: A ``pyarrow.Table`` with ``title`` and ``text`` string columns and, optionally, an
            ``embeddings`` column of fixed-width float lists.
        row_map: Optional `(n_rows,)` int array mapping logical row ids to table rows (the indices
            mapping of a ``datasets.Dataset`` after ``select``/``shuffle``).
        extra_columns: Other string columns to return with each passage (``id`` for wiki_dpr).
        source: Human-readable origin used in error messages.
    """

    def __init__(
        self,
        table: Any,
        row_map: np.ndarray | None = None,
        extra_columns: Sequence[str] = (),
        source: str = "the dataset",
    ):
        missing = {"title", "text"} - set(table.column_names)
        if missing:
            raise ValueError(
                f"{source} must have columns 'title' (str), 'text' (str) and 'embeddings' (float vectors), "
                f"but {sorted(missing)} missing (columns: {table.column_names}). Rename or add the columns "
                "(for example `dataset.rename_column('passage', 'text')`)."
            )
        self.table = table
        self.row_map = None if row_map is None else np.asarray(row_map, dtype=np.int64)
        self.num_rows = len(self.row_map) if self.row_map is not None else table.num_rows
        self.extra_columns = tuple(c for c in extra_columns if c in table.column_names)
        self.source = source
        self._starts = np.zeros(1, dtype=np.int64)
        self._embedding_chunks: list[np.ndarray] | None = None
        self.dim: int | None = None
        if "embeddings" in table.column_names:
            self._embedding_chunks, self._starts = self._embedding_views(table.column("embeddings"))
            self.dim = self._embedding_chunks[0].shape[1] if self._embedding_chunks else None
        # Zero-copy record batches of the string columns: one ``take`` per batch fetches every column.
        self.text_columns = ("title", "text", *self.extra_columns)
        batches = [b for b in table.select(list(self.text_columns)).to_batches() if b.num_rows]
        self._text_batches = batches or [table.select(list(self.text_columns)).to_batches()[0]]
        lengths = np.fromiter((b.num_rows for b in self._text_batches), dtype=np.int64)
        self._text_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def _embedding_views(self, column: Any) -> tuple[list[np.ndarray], np.ndarray]:
        """Zero-copy `(rows, dim)` views of every chunk of the embeddings column."""
        import pyarrow as pa

        views, starts, start = [], [], 0
        dim = None
        for chunk in column.chunks:
            if len(chunk) == 0:
                continue
            if chunk.null_count:
                raise ValueError(f"{self.source}: the 'embeddings' column has missing (null) vectors.")
            if pa.types.is_fixed_size_list(chunk.type):
                width = chunk.type.list_size
                values = chunk.values.slice(chunk.offset * width, len(chunk) * width)
            elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                offsets = chunk.offsets.to_numpy()
                lengths = np.diff(offsets)
                width = int(lengths[0])
                if not np.all(lengths == width):
                    raise ValueError(
                        f"{self.source}: the 'embeddings' column holds vectors of different lengths "
                        f"({int(lengths.min())} to {int(lengths.max())}); every passage needs one vector "
                        "of the same width."
                    )
                values = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            else:
                raise ValueError(
                    f"{self.source}: the 'embeddings' column must hold float vectors, got type {chunk.type}."
                )
            if dim is not None and width != dim:
                raise ValueError(f"{self.source}: the 'embeddings' column mixes widths {dim} and {width}.")
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
            raise ValueError(f"{self.source} has no 'embeddings' column.")
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
            raise ValueError(f"{self.source} has no 'embeddings' column.")
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
        """Per-question ``{"title": [...], "text": [...]}`` for `(batch_size, n_docs)` row ids (-1 = empty)."""
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if doc_ids.ndim != 2:
            raise ValueError(f"`doc_ids` must have shape (batch_size, n_docs), got {doc_ids.shape}.")
        batch_size, n_docs = doc_ids.shape
        flat = doc_ids.reshape(-1)
        if flat.size and flat.max() >= self.num_rows:
            raise IndexError(
                f"doc id {int(flat.max())} is out of range for {self.source} with {self.num_rows} passages: "
                "the faiss index and the passages do not belong together. Rebuild or re-pair them."
            )
        if flat.size == 0:
            values = {column: [] for column in self.text_columns}
        elif flat.min() >= 0:
            values = self.texts(flat)
        else:
            valid = flat >= 0
            found = self.texts(flat[valid]) if valid.any() else {c: [] for c in self.text_columns}
            positions = np.flatnonzero(valid).tolist()
            values = {}
            for column in self.text_columns:
                column_values = [""] * flat.size
                for position, value in zip(positions, found[column]):
                    column_values[position] = value
                values[column] = column_values
        return [
            {column: values[column][i * n_docs : (i + 1) * n_docs] for column in self.text_columns}
            for i in range(batch_size)
        ]


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
        """Passages of `(batch_size, n_docs)` doc ids: one ``{"title": [...], "text": [...]}`` per query."""

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
            raise ValueError(
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
