"""``ragkit eval``'s outputs: never the checkpoint's index, never a user's file unless --overwrite says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragkit.cli import main

QUESTIONS = ("what is the capital of france?", "who wrote hamlet?")


@pytest.fixture
def eval_files(tmp_path):
    """(questions file, gold answers file in ``ans`` mode)."""
    questions, gold = tmp_path / "questions.txt", tmp_path / "gold.ans"
    questions.write_text("".join(q + "\n" for q in QUESTIONS))
    gold.write_text("Paris\nShakespeare\n")
    return questions, gold


def _eval(checkpoint, questions, gold, *extra):
    return main(
        [
            "eval",
            "--model_name_or_path", str(checkpoint),
            "--evaluation_set", str(questions),
            "--gold_data_path", str(gold),
            "--gold_data_mode", "ans",
            "--n_docs", "2",
            "--num_beams", "1",
            "--max_length", "4",
            *extra,
        ]
    )  # fmt: skip


def test_outputs_never_overwrite_the_index_the_checkpoint_points_at(checkpoint, eval_files, capsys):
    config = json.loads((checkpoint / "config.json").read_text())
    index_file = config["index_path"]
    before = Path(index_file).read_bytes()
    for extra in ([], ["--overwrite"]):  # not even with --overwrite: it is an input
        assert _eval(checkpoint, *eval_files, "--predictions_path", index_file, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("ragkit eval: error:") and "would overwrite the index_path of" in err, err
    assert Path(index_file).read_bytes() == before
    passages = config["passages_path"]
    assert _eval(checkpoint, *eval_files, "--predictions_path", f"{passages}/p.txt") == 2
    assert "would overwrite the passages_path of" in capsys.readouterr().err
    manifest = f"{index_file.rsplit('/', 1)[0]}/ragkit_index.json"
    assert _eval(checkpoint, *eval_files, "--metrics_path", manifest, "--overwrite") == 2
    assert "would overwrite the index of" in capsys.readouterr().err


def test_an_existing_predictions_file_is_replaced_only_with_overwrite(
    checkpoint, eval_files, tmp_path, capsys
):
    predictions = tmp_path / "my_notes.txt"
    predictions.write_text("my notes\n")
    assert _eval(checkpoint, *eval_files, "--predictions_path", str(predictions)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit eval: error: --predictions_path") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and predictions.read_text() == "my notes\n"
    assert _eval(checkpoint, *eval_files, "--predictions_path", str(predictions), "--overwrite") == 0
    assert len(predictions.read_text().splitlines()) == len(QUESTIONS)


def test_the_default_predictions_file_in_the_current_directory_is_not_replaced(
    checkpoint, eval_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.txt").write_text("mine\n")
    assert _eval(checkpoint, *eval_files) == 2
    assert "'predictions.txt' already exists" in capsys.readouterr().err
    assert (tmp_path / "predictions.txt").read_text() == "mine\n"


def test_a_metrics_file_eval_wrote_is_replaced_any_other_is_not(checkpoint, eval_files, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"runs": [1, 2, 3]}')
    out = ["--predictions_path", str(tmp_path / "p1.txt"), "--metrics_path", str(metrics)]
    assert _eval(checkpoint, *eval_files, *out) == 2
    assert "--metrics_path" in capsys.readouterr().err and metrics.read_text() == '{"runs": [1, 2, 3]}'
    assert not (tmp_path / "p1.txt").exists()
    metrics.unlink()
    assert _eval(checkpoint, *eval_files, *out) == 0
    written = metrics.read_text()
    # A metrics file eval wrote is recognised and replaced (the predictions file is new).
    out[1] = str(tmp_path / "p2.txt")
    assert _eval(checkpoint, *eval_files, *out) == 0
    assert json.loads(metrics.read_text()) == json.loads(written)  # the same model, the same scores


def test_an_evaluation_set_that_is_a_directory_says_so(checkpoint, eval_files, tmp_path, capsys):
    _, gold = eval_files
    (tmp_path / "questions").mkdir()
    assert _eval(checkpoint, tmp_path / "questions", gold, "--predictions_path", str(tmp_path / "p.txt")) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err
