"""Errors raised when a distributed retriever cannot answer (defined in :mod:`ragkit.errors`)."""

from __future__ import annotations

from ..errors import RetrievalTimeoutError, RetrievalUnavailableError

__all__ = ["RetrievalTimeoutError", "RetrievalUnavailableError"]
