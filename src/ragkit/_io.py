"""Atomic writes: a reader sees the old file or directory or the complete new one, never a partial one.

The temporaries live beside the target as ``.<name>.<pid>-<random>.tmp`` (and a replaced directory as
``.<name>.old-<pid>-<random>`` until it is deleted). A write that is killed leaves them behind; the next
successful write to the same target removes those whose process is gone (never those of a live writer).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import RagInputError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_not_inside",
    "check_replaceable",
    "file_above",
    "read_json_object",
]


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry so a rename survives a crash (no-op where unsupported)."""
    # Folders cannot be opened on every platform, and some network mounts have no fsync.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory``, files before the folders holding them.

    A directory renamed into place whole must hold its data on disk first: else a power loss soon after
    the rename could leave it with empty or partial files, its previous version already deleted.
    """
    for path in [*sorted(directory.rglob("*"), reverse=True), directory]:
        _fsync_path(path)


#: When this process started writing (roughly): its own temporaries older than this are leftovers of an
#: earlier process that had the same pid (containers restart with the same pids).
_PROCESS_STARTED = time.time()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (unknown platforms: assume it does)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _leftover_pattern(name: str) -> re.Pattern[str]:
    """The names of the temporaries written for target ``name``, with the writer's pid as group 1 or 2."""
    escaped = re.escape(name)
    return re.compile(rf"\.{escaped}\.(?:(\d+)-[^./]+\.tmp|old-(\d+)-[0-9a-f]+)")


def _unmarked_leftover_pattern(name: str) -> re.Pattern[str]:
    """Temporaries of target ``name`` without a writer's pid (written by other tools or older versions)."""
    escaped = re.escape(name)
    return re.compile(rf"\.{escaped}\.(?:[^./]+\.tmp|old-[^./]+)")


def _remove_stale_temporaries(path: Path, started: float) -> None:
    """Delete the temporaries of ``path`` left by killed writes: their process is gone, or is this process
    but they predate it (a recycled pid); unmarked ones when they predate the write that just finished."""
    pattern = _leftover_pattern(path.name)
    unmarked = _unmarked_leftover_pattern(path.name)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        try:
            if match is not None:
                pid = int(match.group(1) or match.group(2))
                stale = not _pid_alive(pid) or (
                    pid == os.getpid() and entry.lstat().st_mtime < _PROCESS_STARTED
                )
            elif unmarked.fullmatch(entry.name):
                # No pid to ask: only what was last touched before this write began is surely abandoned.
                stale = entry.lstat().st_mtime < started
            else:
                continue
        except OSError:
            continue
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _followed(path: str | os.PathLike) -> Path:
    """``path``, or where it points when it is a symbolic link: the temporaries go beside the real target."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed.

    A symbolic link at ``path`` is followed: the file it points to is replaced and the link is kept.
    """
    path = _followed(path)
    if path.is_dir():
        raise RagInputError(f"{os.fspath(path)!r} is a directory; give a file path to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask).
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_path(path.parent)
        _remove_stale_temporaries(path, started)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_not_inside(output_dir: str | os.PathLike, source: str | os.PathLike, what: str) -> None:
    """Raise :class:`~ragkit.errors.RagInputError` when ``source`` is ``output_dir`` or lies inside it.

    :func:`atomic_directory` deletes the old ``output_dir`` once the new one is in place, which would
    delete an input read from there.
    """
    output = Path(output_dir).resolve()
    src = Path(source).resolve()
    if src == output or output in src.parents:
        raise RagInputError(
            f"{what} {os.fspath(source)!r} is inside the output directory {os.fspath(output_dir)!r}, which is "
            "replaced as a whole (its old content deleted); write the output to another directory."
        )


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in the file ``path``; None when it is missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return content if isinstance(content, dict) else None


def file_above(path: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so ``path`` cannot be created), else None."""
    parent = next((p for p in Path(path).parents if p.exists()), None)
    return parent if parent is not None and not parent.is_dir() else None


def check_replaceable(
    output_dir: str | os.PathLike,
    owned: Iterable[str],
    what: str,
    *,
    owned_pattern: re.Pattern[str] | None = None,
    advice: str = "Give a new or empty directory, or one written earlier by the same command.",
    file_advice: str = "Give a new or empty directory path.",
) -> None:
    """Raise :class:`~ragkit.errors.RagInputError` when ``output_dir`` cannot be written as a directory of its own.

    :func:`atomic_directory` replaces the directory whole; an output directory that already holds
    the user's own files (a project folder given by mistake) must not be wiped. An output that is an
    existing file, or lies under one, is refused too: commands call this before their long work, so
    such a path fails at once rather than when the result is written. A symbolic link is checked where it
    points, as :func:`atomic_directory` writes there (a link to a directory not made yet passes).

    Args:
        output_dir: The directory that will be replaced.
        owned: Names of the entries the command writes there (any other entry is the user's).
        what: What the messages call ``output_dir`` first (a flag such as ``--dest``, or a parameter name).
        owned_pattern: Further owned names, matched whole (numbered weight shards).
        advice: What to do when the directory holds other entries.
        file_advice: What to do when ``output_dir`` is a file or lies under one.
    """
    shown_path = os.fspath(output_dir)
    output = _followed(output_dir)
    if output.exists() and not output.is_dir():
        raise RagInputError(
            f"{what} {shown_path!r} is an existing file, not a directory; it is not replaced. {file_advice}"
        )
    parent = file_above(output)
    if parent is not None:
        raise RagInputError(
            f"{what} {shown_path!r} cannot be created: {os.fspath(parent)!r} is a file, not a directory. "
            f"{file_advice}"
        )
    if not output.is_dir():
        return
    names = set(owned)
    foreign = sorted(
        entry.name
        for entry in output.iterdir()
        if entry.name not in names and not (owned_pattern is not None and owned_pattern.fullmatch(entry.name))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RagInputError(
            f"{what} {shown_path!r} already holds files ragkit did not write ({shown}); it would be replaced as "
            f"a whole, deleting them. {advice}"
        )


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    An existing ``path`` is moved aside first and deleted only once the new one is in place, so an
    interruption at any point leaves either the old directory or the new one under ``path``; the new one's
    files are flushed to disk before the rename. A symbolic link at ``path`` is followed (an index kept on
    another disk stays there, and so does the link).
    """
    path = _followed(path)
    if path.exists() and not path.is_dir():
        # Replacing it would move the user's file aside to a hidden name and put a directory in its place.
        raise RagInputError(
            f"{os.fspath(path)!r} is an existing file, not a directory; it is not replaced. Give a new or empty "
            "directory path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    # mkdtemp creates the directory 0700; give it the mode os.mkdir would (0777 less the umask).
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            # A unique name: a leftover of an interrupted earlier call (same pid, e.g. in a container) must not
            # make every later call fail.
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _remove_stale_temporaries(path, started)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
