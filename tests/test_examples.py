"""Every script in examples/ runs offline with --local (tiny random checkpoint, real code paths).

The tiny model's answers are noise, so the checks are on what must hold whatever it answers: the counts,
the files each script says it wrote, and metrics that agree with the written predictions.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import their shared `_local` helper
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--local", *argv]) == 0
    return capsys.readouterr().out


def test_generate(monkeypatch, capsys):
    # Random weights: the answer itself is noise (often empty); generation's numbers are checked by the
    # parity tests. Here: the script runs end to end and prints one answer for its question.
    out = _run("generate", monkeypatch, capsys)
    assert re.fullmatch(r"Q: How many people live in Paris\?\nA: [^\n]*\n", out), out


def test_use_own_knowledge_dataset(tmp_path, monkeypatch, capsys):
    out = _run("use_own_knowledge_dataset", monkeypatch, capsys, "--work_dir", str(tmp_path))
    assert f"indexed 16 passages (32 dims) in {tmp_path / 'my_index'}" in out
    assert len(re.findall(r"^A: ", out, flags=re.M)) == 2  # both default questions answered
    assert (tmp_path / "my_index" / "index.faiss").is_file()  # the printed directory is kept
    assert "temporary directory" not in out


def test_consolidate_rag_checkpoint(tmp_path, monkeypatch, capsys):
    from ragkit import RagSequenceForGeneration

    out = _run("consolidate_rag_checkpoint", monkeypatch, capsys, "--work_dir", str(tmp_path))
    assert f"RAG checkpoint written to {tmp_path / 'consolidated'}" in out
    model = RagSequenceForGeneration.from_pretrained(tmp_path / "consolidated")
    assert model.config.model_type == "rag" and model.config.question_encoder.model_type == "dpr"


def test_finetune_rag(tmp_path, monkeypatch, capsys):
    out = _run("finetune_rag", monkeypatch, capsys, "--work_dir", str(tmp_path))
    assert "fine-tuned model written to" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # 5 questions, batches of 2: 3 steps per epoch, 2 epochs; one validation EM per epoch.
    assert metrics["global_step"] == 6 and len(metrics["train_loss"]) == 6 and len(metrics["val_em"]) == 2


def test_eval_rag_scores_three_questions(tmp_path, monkeypatch, capsys):
    from ragkit.evaluation import evaluate_answers, load_gold_answers

    out = _run("eval_rag", monkeypatch, capsys, "--work_dir", str(tmp_path))
    printed = dict(re.findall(r"^(em|f1|n): (\S+)$", out, flags=re.M))
    assert int(printed["n"]) == 3  # the docstring promises three questions
    predictions = (tmp_path / "predictions.txt").read_text().splitlines()
    assert len(predictions) == 3
    expected = evaluate_answers(predictions, load_gold_answers(tmp_path / "gold.tsv", "qa")).metrics
    assert float(printed["em"]) == pytest.approx(expected["em"], abs=1e-4)
    assert float(printed["f1"]) == pytest.approx(expected["f1"], abs=1e-4)
    assert json.loads((tmp_path / "metrics.json").read_text())["em"] == pytest.approx(expected["em"])


def test_local_examples_without_work_dir_say_their_files_are_gone(monkeypatch, capsys):
    out = _run("eval_rag", monkeypatch, capsys)
    written = re.search(r"predictions written to (\S+)", out).group(1)
    assert not Path(written).exists()
    assert out.strip().splitlines()[-1].startswith("(--local: the files above were in a temporary directory")


@pytest.mark.parametrize(
    "name, argv",
    [
        ("generate", ["--dummy"]),
        ("use_own_knowledge_dataset", ["--documents", "docs.tsv", "--output_dir", "my_index"]),
    ],
)
def test_hub_examples_offline_end_in_one_error_not_a_traceback(name, argv, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the models are not cached
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.tsv").write_text("title\ttext\nParis\tParis is the capital of France.\n")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ": error: " in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert not (tmp_path / "my_index").exists()


def test_generate_names_installable_packages():
    text = (EXAMPLES / "generate.py").read_text()
    assert "ragkit-torch" not in text  # not a distribution on PyPI
    assert "pip install -e '.[cuda]'" in text
