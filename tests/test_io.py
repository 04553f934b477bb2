"""ragkit._io: atomic writes leave files and directories with the usual permissions."""

from __future__ import annotations

import os
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
