"""``ragkit demo``'s inputs: what it refuses before any work (a user's files in --work_dir, sizes it cannot
run, options the chosen mode would ignore)."""

from __future__ import annotations

import json
import shlex

import pytest

from ragkit.cli import main


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's first step (reading the corpus) fails the test: every refusal here comes before it."""
    import ragkit.demo

    def started(*args, **kwargs):
        raise AssertionError("the demo started its work")

    monkeypatch.setattr(ragkit.demo, "stdlib_facts", started)


def _one_error(err: str) -> str:
    assert err.startswith("ragkit demo: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _demo_like_work_dir(work_dir):
    """A work directory as a kept demo leaves it (small stand-ins for its files)."""
    for name in ("index/passages", "rag/generator_tokenizer", "generator_tokenizer", "finetune"):
        (work_dir / name).mkdir(parents=True)
    (work_dir / "index" / "index.faiss").write_bytes(b"")
    (work_dir / "rag" / "config.json").write_text("{}")
    (work_dir / "generator_tokenizer" / "vocab.json").write_text("{}")
    (work_dir / "finetune" / "metrics.json").write_text(json.dumps({"global_step": 3, "train_loss": [1.0]}))
    (work_dir / "held_out.questions").write_text("Which module provides dedent()?\n")
    (work_dir / "held_out.answers").write_text("textwrap\n")


@pytest.mark.parametrize(
    "user_file",
    [
        "held_out.answers",
        "held_out.questions",
        "rag/notes.txt",
        "index/notes.txt",
        "generator_tokenizer/notes.txt",
        "finetune/metrics.json",
    ],
)
def test_work_dir_with_the_users_files_is_refused_before_any_work(tmp_path, capsys, no_demo_work, user_file):
    work_dir = tmp_path / "demo"
    _demo_like_work_dir(work_dir)
    (work_dir / user_file).write_text("mine\n")
    assert main(["demo", "--quick", "--no_progress", "--work_dir", str(work_dir)]) == 2
    err = _one_error(capsys.readouterr().err)
    assert str(work_dir / user_file.split("/")[0]) in err and "--work_dir" in err
    assert (work_dir / user_file).read_text() == "mine\n"
    assert sorted(p.name for p in (work_dir / "rag").iterdir()) == sorted(
        ["config.json", "generator_tokenizer", *(["notes.txt"] if user_file == "rag/notes.txt" else [])]
    )


def test_a_work_dir_an_earlier_demo_wrote_passes_the_check(tmp_path):
    from ragkit.demo import check_work_dir

    _demo_like_work_dir(tmp_path / "demo")
    (tmp_path / "demo" / "notes.txt").write_text("mine")  # other entries of the work dir are left alone
    check_work_dir(tmp_path / "demo")
    check_work_dir(tmp_path / "new")


def test_a_corpus_too_small_to_split_is_refused(capsys, no_demo_work):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--max_facts", "3", "--epochs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit demo: error: argument --max_facts: must be a whole number >= 12")
    from ragkit.demo import run_offline_demo

    with pytest.raises(ValueError, match="max_facts 3 is too small"):
        run_offline_demo("unused", max_facts=3)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--index", "wiki_dpr-exact"], "--index"),
        (["--model", "facebook/rag-sequence-nq", "--work_dir", "kept"], "--work_dir"),
        (["--model", "facebook/rag-sequence-nq", "--epochs", "2"], "--epochs"),
        (["--model", "facebook/rag-sequence-nq", "--quick"], "--quick"),
        (["--model", "facebook/rag-sequence-nq", "--max_facts", "50", "--seed", "1"], "--max_facts, --seed"),
    ],
)
def test_options_the_mode_would_ignore_are_refused(argv, named, tmp_path, monkeypatch, capsys, no_demo_work):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *argv]) == 2
    err = _one_error(capsys.readouterr().err)
    assert named in err and ("give --model" in err or "ignored with --model" in err)
    assert list(tmp_path.iterdir()) == []


def test_the_printed_eval_command_writes_its_predictions_in_the_work_dir(tmp_path):
    from ragkit.commands.demo import _say_where_kept

    kept = {
        "checkpoint": str(tmp_path / "rag"),
        "index": str(tmp_path / "index"),
        "questions": str(tmp_path / "held_out.questions"),
        "answers": str(tmp_path / "held_out.answers"),
    }
    lines = []
    _say_where_kept(kept, 2, lines.append)
    command = shlex.split(lines[-1].removeprefix("evaluate it: "))
    assert command[:2] == ["ragkit", "eval"]
    predictions = command[command.index("--predictions_path") + 1]
    assert predictions == str(tmp_path / "held_out.predictions")
