"""Leaf checks of search inputs shared by every index backend and the GPU search (imports no index module)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import RagInputError

__all__ = ["as_query_matrix", "check_finite", "check_n_docs", "check_query_shape"]


def check_query_shape(shape: tuple[int, ...], dim: int | None = None) -> None:
    """Raise ``RagInputError`` unless ``shape`` is `(batch_size, dim)` (any width when ``dim`` is None)."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise RagInputError(
            f"`question_hidden_states` must have shape (batch_size, vector_size), got {shape}. "
            "Pass one row per question (add a batch axis for a single question)."
        )
    if dim is not None and shape[1] != dim:
        raise RagInputError(
            f"`question_hidden_states` has width {shape[1]} but the index holds vectors of width {dim}. "
            "Use a question encoder whose output size matches the index (config.retrieval_vector_size) "
            "or an index built with the same encoder family."
        )


def check_finite(all_finite: bool, rows: Any = None) -> None:
    """Raise ``RagInputError`` when question vectors hold NaN or infinity (``rows``: the offending rows)."""
    if all_finite:
        return
    where = "" if rows is None else f" (rows {rows})"
    raise RagInputError(
        f"`question_hidden_states` holds NaN or infinite values{where}: a search over them returns "
        "arbitrary passages. Check the question encoder's outputs (overflow in half precision, a diverged "
        "model) before retrieving."
    )


def as_query_matrix(question_hidden_states: Any, dim: int | None = None) -> np.ndarray:
    """Return questions as a C-contiguous `(batch_size, dim)` float32 numpy array of finite values.

    Accepts numpy arrays, lists and torch tensors on any device and in any float dtype (half
    precision on GPU included): they are moved to CPU float32, which is what faiss searches with.

    Args:
        question_hidden_states: `(batch_size, dim)` query vectors.
        dim: Width the index expects; a different width raises ``RagInputError``.

    Returns:
        np.ndarray: `(batch_size, dim)` float32.

    Raises:
        RagInputError: Wrong shape or width, or NaN/infinite values.
    """
    if hasattr(question_hidden_states, "detach"):  # torch.Tensor, without importing torch here
        question_hidden_states = question_hidden_states.detach().to("cpu").float().numpy()
    try:
        queries = np.ascontiguousarray(question_hidden_states, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise RagInputError(
            f"`question_hidden_states` must be a (batch_size, vector_size) array of floats ({err})."
        ) from err
    check_query_shape(queries.shape, dim)
    finite = np.isfinite(queries).all(axis=1)
    check_finite(bool(finite.all()), None if finite.all() else np.flatnonzero(~finite).tolist()[:10])
    return queries


def check_n_docs(n_docs: int, ntotal: int) -> int:
    """``n_docs`` as a Python int (faiss refuses numpy integers); ``RagInputError`` when it is not a positive
    integer or exceeds the index size."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise RagInputError(f"`n_docs` must be an integer >= 1, got {n_docs!r}.")
    if n_docs > ntotal:
        raise RagInputError(
            f"`n_docs`={n_docs} is larger than the number of passages in the index ({ntotal}). "
            "Lower `n_docs` (config.n_docs or the n_docs argument) or index more passages."
        )
    return int(n_docs)
