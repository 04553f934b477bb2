"""Search a faiss index on a GPU: with faiss's own GPU indexes when installed, else exactly in PyTorch.

:meth:`ragkit.RagRetriever.to_search_device` (or ``search_device=`` in ``from_pretrained``) hands the
index backend a :class:`DeviceSearch`, which picks one of two ways to search on a CUDA device:

- **faiss-gpu** (faiss built with GPU support and a GPU it can see): the index is copied with
  ``faiss.index_cpu_to_gpu`` (flat and IVF indexes; ``nprobe`` carried over). faiss's Python API
  takes host arrays, so queries pass through host memory.
- **exact search in PyTorch** (any faiss, for an exact index: ``IndexFlatIP``, ``IndexFlatL2``,
  ``IndexFlat``, also inside an ``IndexIDMap``): the vectors are copied once to the device in float32
  and searched as a matmul + top-k (:class:`TorchExactSearch`). Question vectors already on the
  device are searched where they are, with no copy to the host.

Any other index without faiss-gpu (HNSW, IVF, PQ, ...) is a ``ValueError`` that names its type and the
ways out. The CPU faiss index is kept as it is: saving a retriever writes the same file as before
and nothing about the device is persisted.

:class:`TorchExactSearch` works on any torch device, so it is tested on the CPU against faiss.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..errors import RagInputError
from ._devices import faiss_gpu_count as _faiss_gpu_count
from ._devices import import_faiss, resolve_search_device
from ._queries import as_query_matrix, check_finite, check_query_shape
from ._queries import check_n_docs as _check_n_docs

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BLOCK_BYTES",
    "DEFAULT_QUERY_CHUNK_SIZE",
    "DeviceSearch",
    "TorchExactSearch",
    "as_query_tensor",
    "resolve_search_device",
]

#: Largest `(queries, vectors)` float32 score block the exact search materializes at once.
DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20
#: Queries scored together by the exact search.
DEFAULT_QUERY_CHUNK_SIZE = 1024
#: Host memory used at a time while copying an index's vectors to the device.
_UPLOAD_BYTES = 64 * 2**20
#: Metrics of the exact search: inner product (largest first) and squared L2 distance (smallest first).
_METRICS = ("ip", "l2")
_precision_warned = False


# --------------------------------------------------------------------------------------------------
# Probes and checks
# --------------------------------------------------------------------------------------------------


def as_query_tensor(
    question_hidden_states: Any, device: torch.device, dim: int | None = None
) -> torch.Tensor:
    """Questions as a contiguous `(batch_size, dim)` float32 tensor on ``device``.

    A tensor already on ``device`` is cast there (bf16/fp16 -> float32) without a trip through host
    memory; numpy arrays, lists and tensors elsewhere are copied to ``device``.

    Args:
        question_hidden_states: `(batch_size, dim)` query vectors (torch tensor, numpy array or list).
        device: Where to search.
        dim: Width the index expects; a different width raises ``ValueError``.

    Returns:
        torch.Tensor: `(batch_size, dim)` float32 on ``device``.
    """
    if isinstance(question_hidden_states, torch.Tensor):
        queries = question_hidden_states.detach()
        if queries.device.type == "meta":
            raise RagInputError(
                "`question_hidden_states` is on the meta device, so it holds no values; pass a tensor on the "
                f"CPU or on {device}."
            )
    else:
        queries = torch.from_numpy(np.ascontiguousarray(question_hidden_states, dtype=np.float32))
    check_query_shape(tuple(queries.shape), dim)
    queries = queries.to(device=device, dtype=torch.float32).contiguous()
    check_finite(bool(torch.isfinite(queries).all()))
    return queries


def _warn_if_reduced_precision() -> None:
    """Warn once when float32 matmuls may run in TF32/bf16 (the exact search's scores then lose digits)."""
    global _precision_warned
    if _precision_warned or torch.get_float32_matmul_precision() == "highest":
        return
    _precision_warned = True
    logger.warning(
        "torch.get_float32_matmul_precision() is %r: the exact GPU search's matmuls may run in TF32, so "
        "scores lose about 3 digits and near-ties can change order against faiss. Set it to 'highest' "
        "(torch.set_float32_matmul_precision('highest')) for results identical to faiss.",
        torch.get_float32_matmul_precision(),
    )


# --------------------------------------------------------------------------------------------------
# Index inspection
# --------------------------------------------------------------------------------------------------


def _index_type_name(index: Any) -> str:
    """``IndexHNSWFlat``, ``IndexIDMap(IndexFlatIP)``, ...: the faiss class names, for messages."""
    faiss = import_faiss()

    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap):
        return f"{type(top).__name__}({type(faiss.downcast_index(top.index)).__name__})"
    return type(top).__name__


def _exact_parts(index: Any) -> tuple[Any, str, np.ndarray | None] | None:
    """(flat index, metric, id map or None) of an exact index, else None.

    Exact means a float ``IndexFlat`` (``IndexFlatIP``, ``IndexFlatL2``) with the inner-product or L2
    metric, bare or inside an ``IndexIDMap``/``IndexIDMap2`` (whose labels are returned as ids).
    """
    faiss = import_faiss()

    top = faiss.downcast_index(index)
    id_map = None
    if isinstance(top, faiss.IndexIDMap):
        id_map = faiss.vector_to_array(top.id_map).astype(np.int64, copy=False)
        top = faiss.downcast_index(top.index)
    if not isinstance(top, faiss.IndexFlat):
        return None
    metric = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(top.metric_type)
    return None if metric is None else (top, metric, id_map)


def _not_supported_message(index: Any) -> str:
    """Why a non-exact index cannot be searched on the GPU here, and the three ways out."""
    return (
        f"Search on the GPU needs faiss with GPU support for this {_index_type_name(index)} index, and this "
        "faiss has none (faiss-cpu, or no GPU visible to faiss). Install faiss with GPU support (faiss-gpu, "
        "e.g. from conda's pytorch channel), or use an exact index (faiss.IndexFlatIP / IndexFlatL2, "
        "`ragkit build-index --index_factory Flat`), which ragkit searches on the GPU with PyTorch, or keep "
        "search_device='cpu'."
    )


# --------------------------------------------------------------------------------------------------
# Exact search in PyTorch
# --------------------------------------------------------------------------------------------------


class TorchExactSearch:
    """Exact k-nearest-neighbour search (inner product or squared L2) as a matmul + top-k on a torch device.

    Gives what faiss's ``IndexFlatIP`` / ``IndexFlatL2`` give: the same ids and distances (inner
    products, largest first; squared L2 distances, smallest first, ranked by ``|x|^2 - 2 x.q`` as faiss
    does). Documents with equal scores (ties) may come back in another order than faiss's. Scores are
    float32 whatever the question's dtype; queries are scored ``query_chunk_size`` at a time against
    blocks of vectors small enough that one `(queries, vectors)` score block stays within
    ``max_block_bytes`` (256 MiB by default), and the running top-k is merged block by block, so the
    memory a search needs beyond the vectors is bounded whatever the index size.

    Args:
        vectors: `(ntotal, dim)` database vectors; kept as float32 on their device (no copy when they
            already are).
        metric: ``"ip"`` (inner product) or ``"l2"`` (squared Euclidean distance).
        ids: Optional `(ntotal,)` int64 labels returned instead of row numbers (an ``IndexIDMap``'s map).
        max_block_bytes: Largest `(queries, vectors)` float32 score block computed at once.
        query_chunk_size: Queries scored together.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        metric: str = "ip",
        ids: Any = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    ):
        if metric not in _METRICS:
            raise RagInputError(f"metric must be one of {_METRICS}, got {metric!r}.")
        if vectors.ndim != 2:
            raise RagInputError(f"`vectors` must have shape (ntotal, dim), got {tuple(vectors.shape)}.")
        if max_block_bytes < 4 or query_chunk_size < 1:
            raise RagInputError("max_block_bytes must be >= 4 and query_chunk_size >= 1.")
        self.vectors = vectors.detach().to(torch.float32).contiguous()
        self.metric = metric
        self.ids = None
        if ids is not None:
            self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.vectors.device)
            if self.ids.shape != (self.ntotal,):
                raise RagInputError(f"`ids` must have shape ({self.ntotal},), got {tuple(self.ids.shape)}.")
        self.max_block_bytes = int(max_block_bytes)
        self.query_chunk_size = int(query_chunk_size)
        self.norms = self._squared_norms() if metric == "l2" else None

    @classmethod
    def from_faiss(cls, index: Any, device: torch.device | str, **kwargs: Any) -> TorchExactSearch:
        """Copy the vectors of an exact faiss index to ``device``.

        Args:
            index: ``IndexFlatIP``, ``IndexFlatL2``, ``IndexFlat`` (IP or L2), optionally in an ``IndexIDMap``.
            device: Where to keep the vectors and search.
            **kwargs: ``max_block_bytes``, ``query_chunk_size``.

        Returns:
            TorchExactSearch

        Raises:
            ValueError: The index is not exact.
        """
        parts = _exact_parts(index)
        if parts is None:
            raise RagInputError(
                f"This {_index_type_name(index)} index is not exact: the PyTorch search handles IndexFlatIP, "
                "IndexFlatL2 and IndexFlat (inner product or L2), also inside an IndexIDMap."
            )
        flat, metric, id_map = parts
        ntotal, dim = int(flat.ntotal), int(flat.d)
        vectors = torch.empty((ntotal, dim), dtype=torch.float32, device=device)
        rows = max(1, _UPLOAD_BYTES // (4 * max(dim, 1)))
        for start in range(0, ntotal, rows):  # bounded host memory, whatever the index size
            count = min(rows, ntotal - start)
            vectors[start : start + count] = torch.from_numpy(flat.reconstruct_n(start, count))
        return cls(vectors, metric, id_map, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the vectors live and the search runs."""
        return self.vectors.device

    @property
    def ntotal(self) -> int:
        """Number of vectors."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.vectors.shape[1])

    def _block_rows(self, num_queries: int) -> int:
        """Vectors per score block for ``num_queries`` queries (at least 1)."""
        return max(1, min(self.ntotal, self.max_block_bytes // (4 * max(num_queries, 1))))

    def _squared_norms(self) -> torch.Tensor:
        """`(ntotal,)` squared norms, block by block (no full-size temporary)."""
        norms = torch.empty(self.ntotal, dtype=torch.float32, device=self.device)
        rows = self._block_rows(self.dim)
        for start in range(0, self.ntotal, rows):
            block = self.vectors[start : start + rows]
            norms[start : start + rows] = (block * block).sum(dim=1)
        return norms

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest vectors of each query.

        Args:
            queries: `(batch_size, dim)` query vectors (moved to :attr:`device` as float32 if needed).
            k: Neighbours per query, between 1 and :attr:`ntotal`.

        Returns:
            tuple: distances `(batch_size, k)` float32 (as faiss returns them) and ids `(batch_size, k)`
            int64, both on :attr:`device`, best first.
        """
        check_query_shape(tuple(queries.shape), self.dim)
        k = _check_n_docs(k, self.ntotal)
        queries = queries.detach().to(device=self.device, dtype=torch.float32)
        if queries.shape[0] == 0:
            return (
                torch.empty((0, k), dtype=torch.float32, device=self.device),
                torch.empty((0, k), dtype=torch.int64, device=self.device),
            )
        if self.device.type == "cuda":
            _warn_if_reduced_precision()
        distances, ids = [], []
        chunk_size = max(1, min(self.query_chunk_size, self.max_block_bytes // 4))
        for start in range(0, queries.shape[0], chunk_size):
            chunk_distances, chunk_ids = self._search_chunk(queries[start : start + chunk_size], k)
            distances.append(chunk_distances)
            ids.append(chunk_ids)
        if len(distances) == 1:
            return distances[0], ids[0]
        return torch.cat(distances), torch.cat(ids)

    def _search_chunk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Search one chunk of queries block by block, keeping a running top-k (higher score = nearer)."""
        block_rows = self._block_rows(queries.shape[0])
        best_scores = best_rows = None
        for start in range(0, self.ntotal, block_rows):
            block = self.vectors[start : start + block_rows]
            scores = queries @ block.T  # (chunk, block_rows)
            if self.norms is not None:  # -(|x|^2 - 2 x.q): the L2 ranking, as a score to maximize
                scores.mul_(2).sub_(self.norms[start : start + block.shape[0]])
            top_scores, top_rows = scores.topk(min(k, block.shape[0]), dim=1)
            top_rows += start
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=1)
                top_rows = torch.cat([best_rows, top_rows], dim=1)
                top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)
                top_rows = top_rows.gather(1, order)
            best_scores, best_rows = top_scores, top_rows
        if self.norms is not None:
            best_scores = ((queries * queries).sum(dim=1, keepdim=True) - best_scores).clamp_min_(0.0)
        ids = best_rows if self.ids is None else self.ids[best_rows]
        return best_scores, ids


# --------------------------------------------------------------------------------------------------
# What an index backend holds
# --------------------------------------------------------------------------------------------------


def _to_faiss_gpu(index: Any, device: torch.device) -> tuple[Any, Any]:
    """(GPU copy of ``index``, its ``StandardGpuResources``), with the CPU index's ``nprobe``."""
    faiss = import_faiss()

    resources = faiss.StandardGpuResources()
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, device.index, index)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        raise RagInputError(
            f"faiss cannot copy this {_index_type_name(index)} index to the GPU ({message}). faiss-gpu supports "
            "flat and IVF indexes (not HNSW); use one of those, or keep search_device='cpu'."
        ) from err
    try:
        nprobe = faiss.extract_index_ivf(index).nprobe
    except RuntimeError:
        nprobe = None
    if nprobe is not None:
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", int(nprobe))
    return gpu_index, resources


class DeviceSearch:
    """A faiss index's search on a CUDA device: faiss-gpu's copy of the index, else :class:`TorchExactSearch`.

    The CPU index is not modified (apply ``nprobe`` to it first: the GPU copy takes its value).

    Args:
        index: The (CPU) faiss index.
        device: A CUDA device (see :func:`resolve_search_device`); any torch device for the exact search.
        **kwargs: ``max_block_bytes``, ``query_chunk_size`` of the exact search.

    Raises:
        ValueError: faiss has no GPU support and the index is not exact, or faiss-gpu cannot copy it.
    """

    def __init__(self, index: Any, device: torch.device, **kwargs: Any):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.ntotal, self.dim = int(index.ntotal), int(index.d)
        self._faiss_index = self._resources = None
        self._exact: TorchExactSearch | None = None
        if self.device.type == "cuda" and _faiss_gpu_count() > 0:
            self._faiss_index, self._resources = _to_faiss_gpu(index, self.device)
            self.backend = "faiss-gpu"
        else:
            if _exact_parts(index) is None:
                raise RagInputError(_not_supported_message(index))
            self._exact = TorchExactSearch.from_faiss(index, self.device, **kwargs)
            self.backend = "torch-exact"
        logger.info(
            "Searching the %s index (%d vectors) on %s with %s.",
            _index_type_name(index),
            self.ntotal,
            self.device,
            self.backend,
        )

    def search(self, question_hidden_states: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search like ``faiss.Index.search``, for queries anywhere.

        Args:
            question_hidden_states: `(batch_size, dim)` torch tensor (any device and float dtype), numpy
                array or list.
            k: Neighbours per query, between 1 and the index size.

        Returns:
            tuple: distances `(batch_size, k)` float32 and ids `(batch_size, k)` int64, numpy (host), as
            faiss returns them (id -1 for slots an IVF search could not fill).
        """
        if self._exact is None:
            queries = as_query_matrix(question_hidden_states, self.dim)
            distances, ids = self._faiss_index.search(queries, _check_n_docs(k, self.ntotal))
            return distances, np.asarray(ids, dtype=np.int64)
        queries = as_query_tensor(question_hidden_states, self.device, self.dim)
        distances, ids = self._exact.search(queries, k)
        return distances.cpu().numpy(), ids.cpu().numpy()
