"""The exception types ragkit raises on purpose, in one place (a leaf module: it imports nothing of ragkit).

Every error ragkit raises for bad input or a bad file is one of these, so users can catch them by type:

- :class:`RagkitError` is the base of ragkit's own errors.
- :class:`RagInputError` (a ``ValueError`` *and* an ``AssertionError``): an argument is wrong (shape,
  value, type, a combination). Transformers' RAG asserts in many of these places, so code written for it
  that catches ``AssertionError`` keeps working, and code that catches ``ValueError`` works too.
- :class:`CorruptFileError` (a ``ValueError``): a file exists but cannot be read (truncated, wrong
  format, damaged); the message names the file and what to do.
- :class:`MissingFileError` (a ``FileNotFoundError``): a file or folder ragkit needs is not there.
- :class:`CheckpointError` (a ``ValueError``): a checkpoint is incomplete or inconsistent (missing
  weights, missing tokenizer folder); the message says which parts and how to opt in where that is safe.
- :class:`OfflineFileError`, :class:`LocationNotFoundError`, :class:`HubUnreachableError`: a Hub file
  could not be had (offline, no such repository, no connection).
- :class:`AcceleratorUnavailableError` (an ``ImportError``): a CUDA-only path lacks a GPU or a package.
- :class:`RetrievalUnavailableError`, :class:`RetrievalTimeoutError`: a distributed retriever cannot answer.
"""

from __future__ import annotations

__all__ = [
    "AcceleratorUnavailableError",
    "CheckpointError",
    "CorruptFileError",
    "HubUnreachableError",
    "LocationNotFoundError",
    "MissingFileError",
    "OfflineFileError",
    "RagInputError",
    "RagkitError",
    "RetrievalTimeoutError",
    "RetrievalUnavailableError",
]


class RagkitError(Exception):
    """Base class of the errors ragkit raises on purpose."""


class RagInputError(RagkitError, ValueError, AssertionError):
    """An argument is wrong; the message names it and the fix.

    Both a ``ValueError`` and an ``AssertionError``: Transformers' RAG asserts where ragkit checks, so
    ``except AssertionError`` (and ``pytest.raises(AssertionError)``) written for it still catches these.
    """


class CorruptFileError(RagkitError, ValueError):
    """A file exists but cannot be read as what it should be; the message names the file and what to do."""


class MissingFileError(RagkitError, FileNotFoundError):
    """A file or folder ragkit needs does not exist; the message names it."""


class CheckpointError(RagkitError, ValueError):
    """A checkpoint is incomplete or inconsistent (missing weights, missing tokenizer folder)."""


class OfflineFileError(RagkitError, FileNotFoundError):
    """A Hub file is not in the local cache and downloads are disabled (``HF_HUB_OFFLINE=1``)."""


class LocationNotFoundError(RagkitError, FileNotFoundError):
    """The location is neither an existing local directory nor a Hub repository one can access."""


class HubUnreachableError(RagkitError, ConnectionError):
    """The Hub could not be reached (no network) and the file is not in the local cache."""


class AcceleratorUnavailableError(RagkitError, ImportError):
    """A CUDA-only path (flash-attention, bitsandbytes, GPU search) was asked for but a piece it needs is missing.

    An ``ImportError`` so that code catching transformers' own errors for the same cases keeps working.
    """


class RetrievalUnavailableError(RagkitError, RuntimeError):
    """The processes serving the index are gone (actor dead past its restarts, cluster down)."""


class RetrievalTimeoutError(RagkitError, TimeoutError):
    """A retrieval call got no answer within its timeout (overloaded or unreachable servers)."""
