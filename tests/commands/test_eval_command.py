"""``ragkit eval``: it never overwrites its inputs (the checkpoint's index included) or a user's file unless
--overwrite says so, refuses what cannot be evaluated, fails like a command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragkit.cli import main

#: Questions about the tiny passages and their gold answers (``ans`` mode: one line of answers per question).
QUESTIONS = ("what is the capital of france?", "where is the louvre?", "who wrote hamlet?")
ANSWERS = ("Paris", "Paris", "Shakespeare")


@pytest.fixture
def eval_files(tmp_path):
    """(questions file, gold answers file in ``ans`` mode) over :data:`QUESTIONS`."""
    questions, gold = tmp_path / "questions.txt", tmp_path / "gold.ans"
    questions.write_text("".join(q + "\n" for q in QUESTIONS))
    gold.write_text("".join(a + "\n" for a in ANSWERS))
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
            "--max_length", "6",
            *extra,
        ]
    )  # fmt: skip


def test_eval_writes_predictions_and_metrics(checkpoint, eval_files, tmp_path, capsys):
    questions, gold = eval_files
    predictions, metrics = tmp_path / "predictions.txt", tmp_path / "metrics.json"
    assert (
        _eval(
            checkpoint,
            questions,
            gold,
            "--predictions_path",
            str(predictions),
            "--metrics_path",
            str(metrics),
        )
        == 0
    )
    lines = predictions.read_text().splitlines()
    assert len(lines) == len(QUESTIONS)
    scores = json.loads(metrics.read_text())
    assert scores["n"] == len(QUESTIONS)
    # The printed EM is the one of the written predictions.
    from ragkit.evaluation import evaluate_answers, load_gold_answers

    expected = evaluate_answers(lines, load_gold_answers(gold, "ans")).metrics
    assert scores["em"] == pytest.approx(expected["em"]) and scores["f1"] == pytest.approx(expected["f1"])
    assert f"em: {expected['em']:.4f}" in capsys.readouterr().out


def test_predictions_file_has_one_line_per_question_whatever_the_answers_hold(
    checkpoint, eval_files, tmp_path, monkeypatch
):
    import ragkit.evaluation

    # Byte-level BPE can decode any character: line breaks other than \n must not split a prediction.
    answers = ["Par\ris", "Paris\u2028France", "Shake\x0bspeare\r\n"]
    monkeypatch.setattr(ragkit.evaluation, "generate_answers", lambda *args, **kwargs: list(answers))
    questions, gold = eval_files
    predictions, metrics = tmp_path / "predictions.txt", tmp_path / "metrics.json"
    extra = ["--predictions_path", str(predictions), "--metrics_path", str(metrics)]
    assert _eval(checkpoint, questions, gold, *extra) == 0
    with open(predictions, encoding="utf-8") as f:  # read back as any text reader would
        lines = [line.rstrip("\n") for line in f]
    assert len(lines) == len(QUESTIONS)
    from ragkit.evaluation import evaluate_answers, load_gold_answers

    from_file = evaluate_answers(lines, load_gold_answers(gold, "ans")).metrics
    scores = json.loads(metrics.read_text())
    assert (scores["em"], scores["f1"]) == pytest.approx((from_file["em"], from_file["f1"]))


@pytest.mark.parametrize(
    "flag, target",
    [
        ("--predictions_path", "questions"),
        ("--predictions_path", "gold"),
        ("--metrics_path", "questions"),
        ("--metrics_path", "gold"),
    ],
)
def test_outputs_never_overwrite_the_inputs(checkpoint, eval_files, tmp_path, capsys, flag, target):
    questions, gold = eval_files
    path = {"questions": questions, "gold": gold}[target]
    before = path.read_bytes()
    extra = [flag, str(path)]
    if flag == "--metrics_path":
        extra += ["--predictions_path", str(tmp_path / "predictions.txt")]
    assert _eval(checkpoint, questions, gold, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit eval: error:") and "would overwrite" in err and flag in err
    assert path.read_bytes() == before


def test_outputs_inside_the_checkpoint_or_one_file_for_both_are_refused(
    checkpoint, eval_files, tmp_path, capsys
):
    questions, gold = eval_files
    config = (checkpoint / "config.json").read_bytes()
    assert _eval(checkpoint, questions, gold, "--predictions_path", str(checkpoint / "config.json")) == 2
    assert "would overwrite --model_name_or_path" in capsys.readouterr().err
    assert (checkpoint / "config.json").read_bytes() == config
    same = str(tmp_path / "out.txt")
    assert _eval(checkpoint, questions, gold, "--predictions_path", same, "--metrics_path", same) == 2
    assert "same file" in capsys.readouterr().err
    assert _eval(checkpoint, questions, gold, "--predictions_path", str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err


def test_empty_question_file_is_refused(checkpoint, tmp_path, capsys):
    questions, gold = tmp_path / "q.txt", tmp_path / "g.ans"
    questions.write_text("\n\n")
    gold.write_text("")
    predictions = tmp_path / "predictions.txt"
    assert _eval(checkpoint, questions, gold, "--predictions_path", str(predictions)) == 2
    assert "holds no questions" in capsys.readouterr().err
    assert not predictions.exists()


def test_input_errors_are_messages_not_tracebacks(checkpoint, eval_files, tmp_path, capsys):
    questions, gold = eval_files
    out = ["--predictions_path", str(tmp_path / "p.txt")]
    short = tmp_path / "short.ans"
    short.write_text("Paris\n")
    assert _eval(checkpoint, questions, short, *out) == 2
    assert "has 3 questions but --gold_data_path" in capsys.readouterr().err
    assert _eval(checkpoint, tmp_path / "missing.txt", gold, *out) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ?\n".encode("latin-1"))
    assert _eval(checkpoint, latin1, gold, *out) == 2
    err = capsys.readouterr().err
    assert "latin1.txt is not UTF-8" in err and "Traceback" not in err
    assert _eval(tmp_path / "no_checkpoint", questions, gold, *out) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bad_values_are_refused_at_parse_time(checkpoint, eval_files, capsys):
    questions, gold = eval_files
    for flag in ("--n_docs", "--num_beams", "--max_length", "--eval_batch_size", "--k"):
        with pytest.raises(SystemExit) as exit_info:
            _eval(checkpoint, questions, gold, flag, "0")
        assert exit_info.value.code == 2
        assert ">= 1" in capsys.readouterr().err


def test_a_qa_gold_file_for_other_questions_is_refused_before_the_model_loads(eval_files, tmp_path, capsys):
    questions, _ = eval_files
    gold = tmp_path / "gold.tsv"
    # Line 2 answers another question (the gold file of another evaluation set, or reordered).
    gold.write_text(
        f"{QUESTIONS[0]}\t['Paris']\nwho painted the mona lisa?\t['Leonardo']\n{QUESTIONS[2]}\tX\n"
    )
    missing = tmp_path / "no_checkpoint"  # never loaded: the gold file is refused first
    args = [
        "eval",
        "--model_name_or_path", str(missing),
        "--evaluation_set", str(questions),
        "--gold_data_path", str(gold),
        "--gold_data_mode", "qa",
        "--predictions_path", str(tmp_path / "p.txt"),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ragkit eval: error: {gold}, line 2: ") and len(err.strip().splitlines()) == 1, err
    assert f"'who painted the mona lisa?' is not question 2 of the evaluation set, {QUESTIONS[1]!r}" in err
    assert not (tmp_path / "p.txt").exists()


# ----------------------------------------------------------------------------- outputs


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
