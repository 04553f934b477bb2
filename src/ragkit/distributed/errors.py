"""Errors raised when a distributed retriever cannot answer: each says what to check or change."""

from __future__ import annotations

__all__ = ["RetrievalTimeoutError", "RetrievalUnavailableError"]


class RetrievalUnavailableError(RuntimeError):
    """The processes serving the index are gone (actor dead past its restarts, cluster down)."""


class RetrievalTimeoutError(TimeoutError):
    """A retrieval call got no answer within its timeout (overloaded or unreachable servers)."""
