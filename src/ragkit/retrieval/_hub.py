"""Locating index files: a local directory or a Hub dataset repository, through ``huggingface_hub``.

Downloads show ``huggingface_hub``'s progress bars, land in its cache and honour ``HF_HUB_OFFLINE``;
a file that is neither local nor cached while offline gives an error that says how to fix it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import LocationNotFoundError, OfflineFileError

logger = logging.getLogger(__name__)

__all__ = ["LocationNotFoundError", "OfflineFileError", "is_local", "list_files", "resolve_file"]


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
            raise FileNotFoundError(
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
        return hf_hub_download(
            repo_id, filename, repo_type="dataset", revision=revision, cache_dir=cache_dir, **hub_kwargs
        )
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"The Hub dataset repo {repo_id!r} has no file {filename!r} (`{what}`). Check the name and revision."
        ) from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        # HFValidationError: not a valid repo id at all, typically a local directory that does not exist.
        raise LocationNotFoundError(_not_found_message(repo_id, what)) from err
    except LocalEntryNotFoundError as err:
        raise OfflineFileError(_offline_hint(repo_id, f"File {filename!r}")) from err


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
        folder = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[pattern],
            **hub_kwargs,
        )
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise LocationNotFoundError(_not_found_message(repo_id, what)) from err
    except LocalEntryNotFoundError as err:
        raise OfflineFileError(_offline_hint(repo_id, f"Files {pattern!r}")) from err
    root = Path(folder)
    return sorted(os.fspath(p) for p in root.glob(pattern) if p.is_file())
