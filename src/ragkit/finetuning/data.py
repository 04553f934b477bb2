"""Question/answer data for fine-tuning: reading the splits and encoding batches for the model.

A split is ``{split}.source``/``{split}.target`` line files (one question / one answer per line) or
``{split}.jsonl`` (``{"question": ..., "answer": ...}``; ``"answers": [...]`` lists several acceptable
answers for EM).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, MissingFileError, RagInputError

__all__ = ["QAExample", "encode_qa_batch", "load_qa_split"]


@dataclass
class QAExample:
    """One training or evaluation pair.

    Attributes:
        source: The question (input of the question encoder).
        target: The answer the generator is trained to produce.
        answers: All acceptable answers (for EM/F1); ``[target]`` unless the data lists more.
    """

    source: str
    target: str
    answers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [self.target]


def _not_utf8(path: Path, err: UnicodeDecodeError) -> CorruptFileError:
    """The error for a data file that is not UTF-8 text."""
    return CorruptFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.")


def _numbered_lines(lines: Any, path: Path) -> Any:
    """``(line number, line)`` pairs of an open text file, naming the file when a line is not UTF-8."""
    number = 0
    try:
        for number, line in enumerate(lines, start=1):
            yield number, line
    except UnicodeDecodeError as err:
        raise CorruptFileError(
            f"{path}, line {number + 1}: not UTF-8 text ({err.reason}); save the file as UTF-8."
        ) from err


def _check_not_blank(text: str, where: str, what: str) -> None:
    """Raise naming ``where`` when a question or answer is empty (a slipped line or a missing value)."""
    if not text.strip():
        raise CorruptFileError(
            f"{where}: the {what} is empty; every example needs a question and its answer. Fill it in or remove "
            "the example (from both files, for .source/.target)."
        )


def _read_text_lines(path: Path) -> list[str]:
    """Lines of ``path`` without line endings (a trailing empty line is dropped)."""
    try:
        # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of the first question.
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _read_jsonl(path: Path) -> list[QAExample]:
    """Examples from a JSONL file with ``question``/``source`` and ``answer``/``target``/``answers`` keys."""
    examples = []
    with open(path, encoding="utf-8-sig", errors="strict") as f:
        for number, line in _numbered_lines(f, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorruptFileError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); fix or remove the line."
                ) from err
            if not isinstance(record, dict):
                raise CorruptFileError(
                    f"{path}, line {number}: each line must be a JSON object such as "
                    f'{{"question": ..., "answer": ...}}, got {type(record).__name__}.'
                )
            source = record.get("question", record.get("source"))
            answers = record.get("answers")
            if answers is not None and not isinstance(answers, (str, list)):
                raise CorruptFileError(
                    f"{path}, line {number}: 'answers' must be a string or a list of strings, "
                    f"got {type(answers).__name__}."
                )
            target = record.get("answer", record.get("target"))
            if isinstance(answers, str):
                answers = [answers]
            if target is None and answers:
                target = answers[0]
            if not isinstance(source, str) or not isinstance(target, str):
                raise CorruptFileError(
                    f"{path}, line {number}: each record needs a string 'question' (or 'source') and a string "
                    "'answer' (or 'target', or a non-empty list 'answers')."
                )
            _check_not_blank(source, f"{path}, line {number}", "question")
            _check_not_blank(target, f"{path}, line {number}", "answer")
            examples.append(QAExample(source, target, [str(a) for a in answers] if answers else [target]))
    return examples


def load_qa_split(data_dir: str | os.PathLike, split: str, required: bool = True) -> list[QAExample] | None:
    """Load one split from ``{split}.source``/``{split}.target`` line files or ``{split}.jsonl``.

    Args:
        data_dir: Directory holding the files.
        split: ``"train"``, ``"val"`` or ``"test"``.
        required: Raise when the split has no files (else return ``None``).

    Returns:
        The examples, or ``None`` for a missing optional split.

    Raises:
        MissingFileError: For a required split, ``data_dir`` is not a directory or has no files for it; or
            only one of ``.source``/``.target`` is there.
        CorruptFileError: Source and target line counts differ, a JSONL line is not a record, a question or
            answer is empty, or the split is empty.
    """
    data_dir = Path(data_dir)
    if required and not data_dir.is_dir():
        raise MissingFileError(
            f"The data directory {data_dir} does not exist (or is not a directory); give the directory holding "
            f"{split}.source + {split}.target or {split}.jsonl."
        )
    source, target, jsonl = (data_dir / f"{split}.{ext}" for ext in ("source", "target", "jsonl"))
    if source.is_file() or target.is_file():
        if not (source.is_file() and target.is_file()):
            present, absent = (source, target) if source.is_file() else (target, source)
            raise MissingFileError(
                f"Found {present} but not {absent}: line-file data needs both {split}.source (questions) "
                f"and {split}.target (answers), one per line, in {data_dir}."
            )
        sources, targets = _read_text_lines(source), _read_text_lines(target)
        if len(sources) != len(targets):
            raise CorruptFileError(
                f"{source} has {len(sources)} lines but {target} has {len(targets)}: the files are misaligned. "
                "Line i of the .target file must be the answer to line i of the .source file."
            )
        for number, (question, answer) in enumerate(zip(sources, targets), start=1):
            _check_not_blank(question, f"{source}, line {number}", "question")
            _check_not_blank(answer, f"{target}, line {number}", "answer")
        examples = [QAExample(s, t) for s, t in zip(sources, targets)]
    elif jsonl.is_file():
        examples = _read_jsonl(jsonl)
    elif required:
        # Data in another format (train.csv, train.tsv, train.json) is named, so the message says what to convert.
        others = sorted(path.name for path in data_dir.glob(f"{split}.*") if path.is_file())
        found = f" Found {', '.join(others)}: convert to one of these formats." if others else ""
        raise MissingFileError(
            f"No {split} data in {data_dir}: expected {split}.source + {split}.target (one question / answer "
            f"per line) or {split}.jsonl (records with 'question' and 'answer').{found}"
        )
    else:
        return None
    if not examples:
        raise CorruptFileError(
            f"The {split} split in {data_dir} is empty; add at least one question/answer pair."
        )
    return examples


def encode_qa_batch(
    tokenizer: Any,
    examples: Sequence[QAExample],
    max_source_length: int = 128,
    max_target_length: int = 25,
    decoder_start_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize questions (question encoder) and answers (generator) into model inputs.

    Labels start with the generator's ``decoder_start_token_id`` (prepended when the tokenizer does
    not put it there), so the sequences trained on are the ones ``generate`` produces: the RAG loss
    predicts ``labels[1:]`` from ``labels[:-1]``, and a one-token answer still carries a loss.

    Args:
        tokenizer: A :class:`~ragkit.RagTokenizer`.
        examples: The batch.
        max_source_length: Questions are truncated to this many tokens.
        max_target_length: Answers are truncated to this many tokens.
        decoder_start_token_id: Token generation starts from (the generator config's).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (padded with the generator's pad id).
    """
    inputs = tokenizer.question_encoder(
        [e.source for e in examples],
        max_length=max_source_length,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    targets = tokenizer.generator(
        [e.target for e in examples], max_length=max_target_length, truncation=True, add_special_tokens=True
    )["input_ids"]
    pad_id = tokenizer.generator.pad_token_id
    if pad_id is None:
        raise RagInputError(
            "The generator tokenizer has no pad token; set one (tokenizer.generator.pad_token = ...)."
        )
    if decoder_start_token_id is not None:
        targets = [
            t if t and t[0] == decoder_start_token_id else [decoder_start_token_id, *t] for t in targets
        ]
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
