"""Evaluate RAG models: end-to-end answers (EM, F1) and retrieval (precision@k by title).

The metrics follow the research project's ``eval_rag.py`` (SQuAD-style answer normalisation:
lower-case, no punctuation, no articles ``a``/``an``/``the``, single spaces) and its file formats:

* questions: one per line (``--evaluation_set``);
* gold answers, ``--gold_data_mode qa``: ``question<TAB>answers`` per line, answers a Python-style
  list (``['Paris', 'paris, france']``) or a single string; ``--gold_data_mode ans``: one line per
  question, alternatives separated by tabs;
* gold titles for ``--eval_mode retrieval``: titles separated by tabs, one line per question;
* predictions: one line per question, written to ``--predictions_path``.
"""

from __future__ import annotations

import ast
import collections
import logging
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import CorruptFileError, MissingFileError, RagInputError

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "evaluate_answers",
    "evaluate_retrieval",
    "exact_match_score",
    "f1_score",
    "generate_answers",
    "load_gold_answers",
    "load_gold_titles",
    "load_questions",
    "metric_max_over_ground_truths",
    "normalize_answer",
    "precision_at_k",
    "question_vectors",
    "retrieve_titles",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# ----------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, strip punctuation and the articles a/an/the, collapse spaces.

    Args:
        text: An answer string.

    Returns:
        The normalised string.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised prediction equals the normalised ground truth, else 0.0.

    Args:
        prediction: Generated answer.
        ground_truth: One gold answer.

    Returns:
        1.0 or 0.0.
    """
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised prediction and ground truth (bag of words).

    Args:
        prediction: Generated answer.
        ground_truth: One gold answer.

    Returns:
        F1 in [0, 1]; two empty answers score 1.0, one empty answer 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(
    metric: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """Best score of ``prediction`` against any of the acceptable answers.

    Args:
        metric: :func:`exact_match_score` or :func:`f1_score`.
        prediction: Generated answer.
        ground_truths: Acceptable answers (at least one).

    Returns:
        The maximum score.
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    if not ground_truths:
        raise RagInputError(
            "metric_max_over_ground_truths: `ground_truths` is empty; give at least one answer."
        )
    return max(metric(prediction, gt) for gt in ground_truths)


def precision_at_k(
    retrieved_titles: Sequence[str], gold_titles: Sequence[str], k: int | None = None
) -> float:
    """Share of the top-``k`` retrieved titles that are among the gold titles (as ``eval_rag.py``).

    Args:
        retrieved_titles: Titles of the retrieved passages, best first.
        gold_titles: Titles of the passages that answer the question.
        k: Number of retrieved titles to look at (defaults to all of them).

    Returns:
        Precision in [0, 1].
    """
    retrieved = list(retrieved_titles)[:k] if k is not None else list(retrieved_titles)
    if not retrieved:
        raise RagInputError(
            "precision_at_k: no retrieved titles; retrieve at least one passage (n_docs >= 1)."
        )
    gold = {_clean_title(t) for t in gold_titles}
    return sum(_clean_title(t) in gold for t in retrieved) / len(retrieved)


def _clean_title(title: str) -> str:
    """Titles compare without surrounding quotes or spaces (wiki_dpr titles carry quotes)."""
    return title.strip().strip('"').strip()


@dataclass
class EvalResult:
    """Scores of one evaluation run.

    Attributes:
        metrics: Metric name -> value in [0, 1] (``em``/``f1`` or ``precision@k``), plus ``n``.
        predictions: One prediction per question (answers, or tab-joined retrieved titles).
    """

    metrics: dict[str, float]
    predictions: list[str] = field(default_factory=list)


def evaluate_answers(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> EvalResult:
    """Exact match and F1 of predictions against gold answers, averaged over questions.

    Args:
        predictions: One generated answer per question.
        gold_answers: One list of acceptable answers per question.

    Returns:
        EvalResult with ``metrics`` ``{"em", "f1", "n"}``.
    """
    if len(predictions) != len(gold_answers):
        raise RagInputError(
            f"evaluate_answers: {len(predictions)} predictions for {len(gold_answers)} gold answers; "
            "give one prediction per question."
        )
    n = len(predictions)
    if n == 0:
        raise RagInputError("evaluate_answers: no predictions; metrics over 0 questions mean nothing.")
    em = sum(
        metric_max_over_ground_truths(exact_match_score, p, g) for p, g in zip(predictions, gold_answers)
    )
    f1 = sum(metric_max_over_ground_truths(f1_score, p, g) for p, g in zip(predictions, gold_answers))
    return EvalResult({"em": em / n, "f1": f1 / n, "n": n}, list(predictions))


def evaluate_retrieval(
    retrieved_titles: Sequence[Sequence[str]], gold_titles: Sequence[Sequence[str]], k: int | None = None
) -> EvalResult:
    """Mean precision@k over questions.

    Args:
        retrieved_titles: Per question, the retrieved titles, best first.
        gold_titles: Per question, the titles that count as relevant.
        k: Cut-off (defaults to the number retrieved).

    Returns:
        EvalResult with ``metrics`` ``{"precision@k", "n"}``; predictions are tab-joined titles.
    """
    if len(retrieved_titles) != len(gold_titles):
        raise RagInputError(
            f"evaluate_retrieval: {len(retrieved_titles)} retrievals for {len(gold_titles)} gold title lines; "
            "give one line of gold titles per question."
        )
    n = len(retrieved_titles)
    if n == 0:
        raise RagInputError("evaluate_retrieval: no retrievals; metrics over 0 questions mean nothing.")
    total = sum(precision_at_k(r, g, k) for r, g in zip(retrieved_titles, gold_titles))
    name = f"precision@{k}" if k is not None else "precision"
    return EvalResult({name: total / n, "n": n}, ["\t".join(r) for r in retrieved_titles])


# ----------------------------------------------------------------------------- files


def load_questions(path: str | os.PathLike) -> list[str]:
    """Questions, one per non-empty line of ``path``.

    Args:
        path: Text file of questions.

    Returns:
        The questions.
    """
    lines = _read_lines(path, "evaluation set")
    return [line for line in lines if line.strip()]


def load_gold_answers(
    path: str | os.PathLike, mode: str = "qa", questions: Sequence[str] | None = None
) -> list[list[str]]:
    """Gold answers per question from a ``qa`` (question<TAB>answers) or ``ans`` (answers<TAB>...) file.

    Args:
        path: Gold data file.
        mode: ``"qa"`` or ``"ans"``.
        questions: The evaluation set's questions. With ``mode="qa"`` the gold file must list the same
            questions in the same order (compared without surrounding spaces; a question quoted as a CSV
            field, ``"..."`` with ``""`` for a quote, counts as its text); an ``ans`` file holds no questions.

    Returns:
        One list of acceptable answers per question.

    Raises:
        RagInputError: A line that is not ``question<TAB>answers`` (``qa``), an empty answer list, or, with
            ``questions``, the first gold line whose question is not the evaluation set's at that position
            (or a gold file with more or fewer questions), naming its line number and both questions.
    """
    if mode not in ("qa", "ans"):
        raise RagInputError(f"`gold_data_mode` must be 'qa' or 'ans', got {mode!r}.")
    lines = _read_lines(path, "gold data")
    answers = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if mode == "ans":
            answers.append([a for a in line.split("\t") if a.strip()])
            continue
        if "\t" not in line:
            raise RagInputError(
                f"{path}, line {number}: expected 'question<TAB>answers' (gold_data_mode 'qa'); "
                "use --gold_data_mode ans for one line of tab-separated answers per question."
            )
        question, raw = line.split("\t", 1)
        if questions is not None:
            _check_gold_question(path, number, question, questions, len(answers))
        parsed = _parse_answer_list(raw.strip())
        if not parsed:
            raise RagInputError(
                f"{path}, line {number}: the list of answers is empty; give at least one answer per question."
            )
        answers.append(parsed)
    if mode == "qa" and questions is not None and len(answers) < len(questions):
        missing = questions[len(answers)].strip()
        raise RagInputError(
            f"{path} ends at line {len(lines)} after {len(answers)} gold questions, but the evaluation set has "
            f"{len(questions)}: question {len(answers) + 1}, {missing!r}, has no gold line. {_SAME_QUESTIONS}"
        )
    return answers


def load_gold_titles(path: str | os.PathLike) -> list[list[str]]:
    """Gold titles per question: one line per question, titles separated by tabs.

    Args:
        path: Gold titles file.

    Returns:
        One list of titles per question.
    """
    return [
        [t for t in line.split("\t") if t.strip()] for line in _read_lines(path, "gold data") if line.strip()
    ]


def _parse_answer_list(raw: str) -> list[str]:
    """A Python/JSON list literal of answers (``[]`` gives no answer), or a single answer string."""
    if raw.startswith("["):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, list):
            return [str(v) for v in value]
    return [raw]


#: What a ``qa`` gold file whose questions differ from the evaluation set's must become.
_SAME_QUESTIONS = (
    "A qa gold file lists the evaluation set's questions in the same order, one per line; give the gold "
    "file made with this evaluation set."
)


def _unquoted(field: str) -> str:
    """A CSV field without its quotes (doubled quotes inside become one); other text as it is."""
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _check_gold_question(
    path: str | os.PathLike, number: int, question: str, questions: Sequence[str], position: int
) -> None:
    """Raise when the question on gold line ``number`` is not ``questions[position]``, naming both."""
    gold = question.strip()
    if position >= len(questions):
        raise RagInputError(
            f"{path}, line {number}: gold question {gold!r} is beyond the evaluation set's {len(questions)} "
            f"questions. {_SAME_QUESTIONS}"
        )
    expected = questions[position].strip()
    if expected not in (gold, _unquoted(gold).strip()):
        raise RagInputError(
            f"{path}, line {number}: gold question {gold!r} is not question {position + 1} of the evaluation "
            f"set, {expected!r}. {_SAME_QUESTIONS}"
        )


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Lines of a UTF-8 text file without their newlines; a clear error if it is missing or not text."""
    path = Path(path)
    if path.is_dir():
        raise RagInputError(
            f"The {what} file {path} is a directory; give the text file itself (one entry per line)."
        )
    if not path.is_file():
        raise MissingFileError(f"The {what} file {path} does not exist; check the path.")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.rstrip("\n").rstrip("\r") for line in f]
    except UnicodeDecodeError as err:
        raise CorruptFileError(
            f"The {what} file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8."
        ) from err


# ----------------------------------------------------------------------------- model-driven evaluation


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    batch_size: int = 16,
    n_docs: int | None = None,
    num_beams: int = 1,
    max_length: int = 32,
    max_source_length: int = 128,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``questions`` with a RAG model (retrieval included) and decode the answers.

    Args:
        model: A :class:`~ragkit.RagSequenceForGeneration` or :class:`~ragkit.RagTokenForGeneration` with a
            retriever.
        tokenizer: The matching :class:`~ragkit.RagTokenizer`.
        questions: Questions to answer.
        batch_size: Questions per generation batch.
        n_docs: Passages retrieved per question (defaults to the model's config).
        num_beams: Beam size.
        max_length: Max generated tokens.
        max_source_length: Questions are truncated to this many tokens.
        show_progress: Show a progress bar.
        **generate_kwargs: Passed on to ``model.generate``.

    Returns:
        One answer per question.
    """
    import torch

    device = next(model.parameters()).device
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(
            _batches(list(questions), batch_size), desc="generating", disable=not show_progress
        ):
            inputs = tokenizer.question_encoder(
                list(batch), max_length=max_source_length, truncation=True, padding=True, return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                output_ids = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    n_docs=n_docs,
                    num_beams=num_beams,
                    max_length=max_length,
                    **generate_kwargs,
                )
            answers.extend(
                a.strip() for a in tokenizer.generator.batch_decode(output_ids, skip_special_tokens=True)
            )
    finally:
        model.train(was_training)
    return answers


def retrieve_titles(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    batch_size: int = 16,
    n_docs: int | None = None,
    max_source_length: int = 128,
    show_progress: bool = True,
) -> list[list[str]]:
    """Titles of the passages the model's retriever returns for each question, best first.

    Args:
        model: A RAG model with a retriever (its question encoder embeds the questions).
        tokenizer: The matching :class:`~ragkit.RagTokenizer`.
        questions: Questions.
        batch_size: Questions per batch.
        n_docs: Passages per question (defaults to the model's config).
        max_source_length: Questions are truncated to this many tokens.
        show_progress: Show a progress bar.

    Returns:
        Per question, the retrieved titles.
    """
    import torch

    retriever = getattr(model, "retriever", None)
    if retriever is None:
        raise RagInputError(
            "retrieve_titles: the model has no retriever; pass one (RagRetriever) to the model."
        )
    n_docs = n_docs or model.config.n_docs
    device = next(model.parameters()).device
    titles: list[list[str]] = []
    for batch in tqdm(_batches(list(questions), batch_size), desc="retrieving", disable=not show_progress):
        inputs = tokenizer.question_encoder(
            list(batch), max_length=max_source_length, truncation=True, padding=True, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            vectors = question_vectors(model, inputs["input_ids"], inputs["attention_mask"])
        _, _, docs = retriever.retrieve(vectors.float().cpu().numpy(), n_docs)
        titles.extend([str(t) for t in doc["title"]] for doc in docs)
    return titles


def question_vectors(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Question vectors exactly as the model retrieves with them (pooling and normalisation per its config).

    Args:
        model: A RAG model (or its ``RagModel``).
        input_ids: `(batch_size, length)` question token ids.
        attention_mask: `(batch_size, length)`.

    Returns:
        `(batch_size, dim)` tensor.
    """
    rag = getattr(model, "rag", model)
    return rag.encode_questions(input_ids, attention_mask)
