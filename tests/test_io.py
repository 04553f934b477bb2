"""ragkit._io: atomic writes leave files and directories with the usual permissions."""

from __future__ import annotations

import os
import re
import stat

import pytest

from ragkit._io import atomic_directory, atomic_file, check_replaceable


def test_atomic_writes_respect_umask(tmp_path):
    # mkstemp/mkdtemp create 0600/0700 entries; saved checkpoints must be as readable as plain writes.
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "config.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            (tmp / "weights.bin").write_bytes(b"0")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "checkpoint").stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain_dir").stat().st_mode
    )
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o644


def test_atomic_directory_survives_a_leftover_from_an_interrupted_call(tmp_path):
    # A kill while the old directory was being deleted leaves `.name.old-<pid>` behind; a process with
    # the same pid (containers) used to fail every later replace with "Directory not empty".
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "v1").write_text("1")
    leftover = tmp_path / f".checkpoint.old-{os.getpid()}"
    leftover.mkdir()
    (leftover / "partial").write_text("x")
    with atomic_directory(target) as tmp:
        (tmp / "v2").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v2"]


def test_check_replaceable_accepts_missing_empty_and_own_directories(tmp_path):
    check_replaceable(tmp_path / "missing", ("index.faiss",), "`output_dir`")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", ("index.faiss",), "`output_dir`")
    own = tmp_path / "own"
    own.mkdir()
    (own / "index.faiss").write_bytes(b"")
    check_replaceable(own, ("index.faiss",), "`output_dir`")
    (own / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"`output_dir` .*\(thesis\.tex\)"):
        check_replaceable(own, ("index.faiss",), "`output_dir`")


_KILLED_WRITE = """
import os, signal, sys
from ragkit._io import atomic_directory, atomic_file

target = sys.argv[1]
if sys.argv[2] == "dir":
    with atomic_directory(target) as tmp:
        (tmp / "half").write_text("half-written")
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with atomic_file(target) as tmp:
        tmp.write_text("half-written")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_write(target, kind: str) -> list[str]:
    """Run a write to ``target`` in a process killed mid-write; return the temporaries it left beside it."""
    import subprocess
    import sys

    process = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITE, str(target), kind], env={**os.environ}, capture_output=True
    )
    assert process.returncode == -9, process.stderr.decode()
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.mark.skipif(os.name != "posix", reason="simulates a kill with SIGKILL")
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_later_write_removes_the_temporaries_of_a_killed_one(tmp_path, kind):
    target = tmp_path / ("index" if kind == "dir" else "predictions.txt")
    leftovers = _killed_write(target, kind)
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert not target.exists()
    # A live writer's temporary (its pid is running: here the parent of this process) must survive.
    live = tmp_path / f".{target.name}.{os.getppid()}-abcd1234.tmp"
    live.mkdir() if kind == "dir" else live.write_text("in progress")
    dead_pid = re.search(r"\.(\d+)-[^.]+\.tmp$", leftovers[0]).group(1)
    unrelated = tmp_path / f".other.{dead_pid}-abcd1234.tmp"  # the dead writer's, but for another target
    unrelated.write_text("someone else's")
    if kind == "dir":
        with atomic_directory(target) as tmp:
            (tmp / "whole").write_text("complete")
        assert [p.name for p in target.iterdir()] == ["whole"]
    else:
        with atomic_file(target) as tmp:
            tmp.write_text("complete")
        assert target.read_text() == "complete"
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers[0] not in remaining
    assert live.name in remaining and unrelated.name in remaining


def test_temporaries_of_this_pid_from_before_this_process_are_stale(tmp_path):
    # Containers restart with the same pids: a leftover carrying our pid but older than this process is
    # not ours (a concurrent write of this process would be newer).
    target = tmp_path / "checkpoint"
    old = tmp_path / f".checkpoint.{os.getpid()}-zzzz9999.tmp"
    old.mkdir()
    os.utime(old, (1_000_000, 1_000_000))
    new = tmp_path / f".checkpoint.{os.getpid()}-yyyy8888.tmp"
    new.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    assert not old.exists() and new.exists()


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    # It used to move the file aside to a hidden name and put a directory in its place.
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="existing file, not a directory"), atomic_directory(target) as tmp:
        (tmp / "x").write_text("x")
    assert target.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="is a directory"), atomic_file(tmp_path) as tmp:
        tmp.write_text("x")


def test_check_replaceable_refuses_a_file_and_a_path_under_a_file(tmp_path):
    # Checked before a command's long work: atomic_directory would refuse them only at the end.
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="existing file, not a directory"):
        check_replaceable(target, ("index.faiss",), "`output_dir`")
    for under in (target / "index", target / "a" / "b"):
        with pytest.raises(ValueError, match=r"cannot be created: '.*notes\.txt' is a file"):
            check_replaceable(under, ("index.faiss",), "`output_dir`")
    assert target.read_text() == "mine"


def test_check_replaceable_checks_a_symlink_where_it_points(tmp_path):
    # atomic_directory writes where a link points: the check looks there too.
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere" / "index")
    check_replaceable(link, ("index.faiss",), "`output_dir`")  # the target is made by the write
    (tmp_path / "elsewhere" / "index").mkdir()
    (tmp_path / "elsewhere" / "index" / "index.faiss").write_bytes(b"")
    check_replaceable(link, ("index.faiss",), "`output_dir`")
    (tmp_path / "elsewhere" / "index" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"'.*out' already holds files ragkit did not write \(thesis\.tex\)"):
        check_replaceable(link, ("index.faiss",), "`output_dir`")
    (tmp_path / "notes.txt").write_text("mine")
    under_a_file = tmp_path / "to_notes"
    under_a_file.symlink_to(tmp_path / "notes.txt" / "index")
    with pytest.raises(ValueError, match=r"cannot be created: '.*notes\.txt' is a file"):
        check_replaceable(under_a_file, ("index.faiss",), "`output_dir`")


def test_check_replaceable_owns_names_matching_a_pattern(tmp_path):
    import re

    shard = re.compile(r"model-\d+-of-\d+\.safetensors")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    check_replaceable(tmp_path, ("config.json",), "`dest`", owned_pattern=shard)
    (tmp_path / "model-1-of-2.safetensors.bak").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(model-1-of-2\.safetensors\.bak\).* Keep out\.$"):
        check_replaceable(tmp_path, ("config.json",), "`dest`", owned_pattern=shard, advice="Keep out.")


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_symlinked_output_is_written_where_it_points(tmp_path, kind):
    # An index kept on another disk through a link: written there, the link kept (not replaced by a copy).
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    target, link = tmp_path / "big" / "index", tmp_path / "small" / "index"
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "v").write_text("old")
    link.symlink_to(target)
    if kind == "file":
        with atomic_file(link) as tmp:
            tmp.write_text("new")
        assert target.read_text() == "new"
    else:
        with atomic_directory(link) as tmp:
            (tmp / "v").write_text("new")
        assert (target / "v").read_text() == "new"
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert [p.name for p in (tmp_path / "small").iterdir()] == ["index"]
    assert [p.name for p in (tmp_path / "big").iterdir()] == ["index"]
