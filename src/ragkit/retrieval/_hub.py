"""Locating index files: a local directory or a Hub dataset repository, through ``huggingface_hub``.

Downloads show ``huggingface_hub``'s progress bars, land in its cache and honour ``HF_HUB_OFFLINE``;
a file that is neither local nor cached while offline gives an error that says how to fix it. Without
``HF_HUB_OFFLINE`` and without a network, the Hub endpoint is probed once per process (one TCP
connection, a few seconds at most) instead of letting every file retry for half a minute: cached files
are still used, and a missing one is a :class:`HubUnreachableError` at once.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import HubUnreachableError, LocationNotFoundError, MissingFileError, OfflineFileError

logger = logging.getLogger(__name__)

__all__ = [
    "HubUnreachableError",
    "LocationNotFoundError",
    "OfflineFileError",
    "is_local",
    "list_files",
    "resolve_file",
]

#: Seconds the one connection attempt to the Hub endpoint may take.
_PROBE_TIMEOUT_S = 5.0
#: Endpoint -> why it could not be reached ("" when it could), probed once per process.
_ENDPOINT_PROBES: dict[str, str] = {}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_offline() -> bool:
    """Whether ``huggingface_hub`` has downloads disabled (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    """The Hub endpoint ``huggingface_hub`` talks to (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable_reason() -> str:
    """Why the Hub endpoint cannot be reached ("" when it can, or when a proxy makes a direct probe meaningless)."""
    endpoint = _endpoint()
    if endpoint in _ENDPOINT_PROBES:
        return _ENDPOINT_PROBES[endpoint]
    reason = ""
    if not any(os.environ.get(name) for name in _PROXY_VARIABLES):
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=_PROBE_TIMEOUT_S):
                pass
        except OSError as err:
            reason = f"{type(err).__name__}: {err}"
    _ENDPOINT_PROBES[endpoint] = reason
    return reason


def _unreachable_message(repo_id: str, what: str, reason: str) -> str:
    """The error for a Hub file that is not cached while the Hub cannot be reached."""
    return (
        f"{what} from the Hub dataset repo {repo_id!r} is not in the local cache, and the Hub ({_endpoint()}) "
        f"cannot be reached ({reason or 'no connection'}). Check the network connection (or the proxy, "
        "HTTPS_PROXY), or work offline: download the files once on a connected machine into the cache "
        "(then set HF_HUB_OFFLINE=1), or mirror the repository to a local directory and pass that directory."
    )


def _unavailable(repo_id: str, what: str) -> Exception:
    """The error for a Hub file that could not be had: offline by choice, or no connection."""
    if _hub_offline():
        return OfflineFileError(_offline_hint(repo_id, what))
    return HubUnreachableError(_unreachable_message(repo_id, what, _unreachable_reason()))


def _download(function: Any, repo_id: str, what: str, **kwargs: Any) -> Any:
    """Call a ``huggingface_hub`` download function, from the cache alone when the Hub is unreachable."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if _hub_offline() or kwargs.get("local_files_only") or not _unreachable_reason():
        return function(repo_id, **kwargs)
    try:
        return function(repo_id, **{**kwargs, "local_files_only": True})
    except LocalEntryNotFoundError as err:
        raise HubUnreachableError(_unreachable_message(repo_id, what, _unreachable_reason())) from err


def _not_found_message(repo_id: str, what: str) -> str:
    """The error for a location that is neither a local directory nor an accessible Hub dataset repo."""
    return (
        f"{repo_id!r} (`{what}`) is neither a local directory nor a Hub dataset repository you can access. "
        "Pass an existing directory, or a repo id and a token (`token=`) for private repositories."
    )


def is_local(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an existing local directory (otherwise it names a Hub dataset repo)."""
    return os.path.isdir(location)


def _offline_hint(repo_id: str, what: str) -> str:
    """The sentence that tells an offline user how to get ``what`` from ``repo_id``."""
    return (
        f"{what} from the Hub dataset repo {repo_id!r} is not in the local cache and downloads are disabled "
        "(HF_HUB_OFFLINE=1). Download it once with network access (unset HF_HUB_OFFLINE), or mirror the "
        "repository to a local directory and pass that directory instead."
    )


def resolve_file(
    location: str | os.PathLike,
    filename: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    what: str = "index_path",
    **hub_kwargs,
) -> str:
    """Local path of ``filename`` inside ``location`` (a directory, or a Hub dataset repo downloaded on demand).

    Args:
        location: Local directory or Hub dataset repo id (``"facebook/wiki_dpr"``).
        filename: Path of the file inside it.
        revision: Hub revision (branch, tag or commit).
        cache_dir: Hub cache directory (defaults to ``huggingface_hub``'s).
        what: Argument name to mention in errors.
        **hub_kwargs: ``token``, ``force_download``, ``local_files_only``.

    Returns:
        str: A local file path.
    """
    if is_local(location):
        path = Path(location) / filename
        if not path.is_file():
            raise MissingFileError(
                f"Missing file {filename!r} in {os.fspath(location)!r} (`{what}`). Check the directory holds the "
                "expected layout (see docs/retrieval.md) or point the argument at the right directory."
            )
        return os.fspath(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id = os.fspath(location)
    try:
        return _download(
            hf_hub_download,
            repo_id,
            f"File {filename!r}",
            filename=filename,
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            **hub_kwargs,
        )
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError: a subclass of it
        raise _unavailable(repo_id, f"File {filename!r}") from err
    except EntryNotFoundError as err:
        raise MissingFileError(
            f"The Hub dataset repo {repo_id!r} has no file {filename!r} (`{what}`). Check the name and revision."
        ) from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        # HFValidationError: not a valid repo id at all, typically a local directory that does not exist.
        raise LocationNotFoundError(_not_found_message(repo_id, what)) from err


def list_files(
    location: str | os.PathLike,
    pattern: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    what: str = "dataset",
    **hub_kwargs,
) -> list[str]:
    """Local paths of the files matching the glob ``pattern`` in ``location``, sorted by name.

    For a Hub repo the matching files are fetched with ``snapshot_download(allow_patterns=pattern)``
    (parallel downloads with progress bars, cached, offline-aware).
    """
    if is_local(location):
        root = Path(location)
        return sorted(os.fspath(p) for p in root.glob(pattern) if p.is_file())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id = os.fspath(location)
    try:
        folder = _download(
            snapshot_download,
            repo_id,
            f"Files {pattern!r}",
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[pattern],
            **hub_kwargs,
        )
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise LocationNotFoundError(_not_found_message(repo_id, what)) from err
    except LocalEntryNotFoundError as err:
        raise _unavailable(repo_id, f"Files {pattern!r}") from err
    root = Path(folder)
    return sorted(os.fspath(p) for p in root.glob(pattern) if p.is_file())
