"""EM, F1 and precision@k on hand-checked examples, and the eval file formats."""

from __future__ import annotations

import pytest

from ragkit.evaluation import (
    evaluate_answers,
    evaluate_retrieval,
    exact_match_score,
    f1_score,
    load_gold_answers,
    load_gold_titles,
    load_questions,
    metric_max_over_ground_truths,
    normalize_answer,
    precision_at_k,
)


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an Apple, a day") == "apple day"
    # articles only as whole words: "theatre" keeps its "the"
    assert normalize_answer("Theatre") == "theatre"


def test_exact_match_hand_checked():
    assert exact_match_score("the Paris", "Paris") == 1.0
    assert exact_match_score("Paris, France", "Paris") == 0.0
    assert metric_max_over_ground_truths(exact_match_score, "paris france", ["Paris", "Paris, France"]) == 1.0


def test_f1_hand_checked():
    # prediction "new york city" vs gold "new york": overlap 2, precision 2/3, recall 1 -> F1 0.8
    assert f1_score("New York City", "new york") == pytest.approx(0.8)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("", "") == 1.0
    assert f1_score("the", "Paris") == 0.0  # normalises to empty
    # bag of words: repeated tokens count once per gold occurrence
    assert f1_score("paris paris", "paris") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_evaluate_answers_averages_best_match():
    result = evaluate_answers(["Paris", "Berlin wall", "x"], [["paris"], ["Berlin"], ["Rome", "x"]])
    assert result.metrics["n"] == 3
    assert result.metrics["em"] == pytest.approx(2 / 3)
    # F1: 1, 2/3 (precision 1/2, recall 1), 1
    assert result.metrics["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="one prediction per question"):
        evaluate_answers(["a"], [["a"], ["b"]])


def test_precision_at_k_by_title():
    retrieved = ["Paris", '"Seine"', "Berlin", "Rome"]
    assert precision_at_k(retrieved, ["Seine", "Paris"], k=2) == 1.0
    assert precision_at_k(retrieved, ["Seine", "Paris"]) == 0.5
    assert precision_at_k(retrieved, ["Madrid"], k=3) == 0.0
    result = evaluate_retrieval([retrieved[:2], ["Rome", "Paris"]], [["Paris"], ["Madrid"]], k=2)
    assert result.metrics["precision@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert result.predictions[0] == 'Paris\t"Seine"'


def test_eval_file_formats(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("who?\nwhat?\n")
    qa = tmp_path / "gold.tsv"
    qa.write_text("who?\t['Ann', 'Anna']\nwhat?\tA thing\n")
    ans = tmp_path / "gold.ans"
    ans.write_text("Ann\tAnna\nA thing\n")
    titles = tmp_path / "titles.txt"
    titles.write_text("Paris\tSeine\nBerlin\n")
    assert load_questions(questions) == ["who?", "what?"]
    assert load_gold_answers(qa, "qa") == [["Ann", "Anna"], ["A thing"]]
    assert load_gold_answers(ans, "ans") == [["Ann", "Anna"], ["A thing"]]
    assert load_gold_titles(titles) == [["Paris", "Seine"], ["Berlin"]]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_questions(tmp_path / "missing.txt")
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    with pytest.raises(ValueError, match="gold_data_mode ans"):
        load_gold_answers(bad, "qa")


def test_an_empty_answer_list_is_refused_not_read_as_the_answer_brackets(tmp_path):
    gold = tmp_path / "gold.tsv"
    gold.write_text("who?\t['Ann']\nwhat?\t[]\n")
    with pytest.raises(ValueError, match=r"gold\.tsv, line 2: the list of answers is empty"):
        load_gold_answers(gold, "qa")
    gold.write_text("who?\t[Ann]\n")  # not a list literal: the text itself is the answer
    assert load_gold_answers(gold, "qa") == [["[Ann]"]]


def test_qa_gold_questions_must_be_the_evaluation_sets_in_order(tmp_path):
    questions = ["who?", "what?", "where?"]
    gold = tmp_path / "gold.tsv"
    # Surrounding spaces, a blank line and a CSV-quoted question (as pandas writes one) still match.
    gold.write_text(" who? \t['Ann']\n\n\"what?\"\t['A thing']\nwhere?\tHere\n")
    assert load_gold_answers(gold, "qa", questions) == [["Ann"], ["A thing"], ["Here"]]
    gold.write_text("who?\t['Ann']\n\nwhere?\tHere\nwhat?\t['A thing']\n")
    with pytest.raises(
        ValueError, match=r"gold\.tsv, line 3: gold question 'where\?' is not question 2 of the "
    ):
        load_gold_answers(gold, "qa", questions)
    gold.write_text("who?\t['Ann']\nwhat?\tA thing\nwhere?\tHere\nwhen?\tNow\n")
    with pytest.raises(ValueError, match=r"line 4: gold question 'when\?' is beyond the evaluation set's 3 "):
        load_gold_answers(gold, "qa", questions)
    gold.write_text("who?\t['Ann']\nwhat?\tA thing\n")
    with pytest.raises(
        ValueError, match=r"ends at line 2 after 2 gold questions.* question 3, 'where\?', has no"
    ):
        load_gold_answers(gold, "qa", questions)
    assert load_gold_answers(gold, "qa") == [["Ann"], ["A thing"]]  # without questions: not compared
