"""A tiny RAG checkpoint and index built on the spot, so every example runs offline with ``--local``.

The weights are random (a 2-layer DPR question encoder and a 2+2-layer BART), so the answers are
noise; what runs is the real code path: tokenizers, retriever, index, model, generation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["build_local_checkpoint", "local_work_dir"]


@contextlib.contextmanager
def local_work_dir(argv: list[str]) -> Iterator[Path]:
    """The directory a ``--local`` run writes to: ``--work_dir DIR`` (removed from ``argv``, kept) or a temporary one.

    A temporary directory is deleted when the run ends, and a last line says so: the paths printed
    before it no longer exist.
    """
    for i, arg in enumerate(argv):
        if arg in ("--work_dir", "--work-dir") and i + 1 < len(argv):
            directory = argv[i + 1]
            del argv[i : i + 2]
            Path(directory).mkdir(parents=True, exist_ok=True)
            yield Path(directory)
            return
    with tempfile.TemporaryDirectory(prefix="ragkit-example-") as scratch:
        yield Path(scratch)
    print(
        "(--local: the files above were in a temporary directory, now deleted; add --work_dir DIR to keep them)"
    )


def build_local_checkpoint(directory: str | os.PathLike, model_type: str = "rag_sequence") -> Path:
    """Write a tiny RAG checkpoint (with a custom index over ragkit.testing.TINY_PASSAGES) into ``directory``.

    Args:
        directory: Where to write; reused when it already holds a checkpoint.
        model_type: ``rag_sequence`` or ``rag_token``.

    Returns:
        The checkpoint directory (``directory/rag``); its config points at ``directory/index``.
    """
    import torch
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    from ragkit.encoders import load_text_encoder
    from ragkit.loading import consolidate_rag_checkpoint
    from ragkit.retrieval.building import build_index
    from ragkit.testing import (
        TINY_PASSAGES,
        tiny_bart_config,
        tiny_dpr_config,
        write_tiny_generator_tokenizer,
        write_tiny_question_encoder_tokenizer,
    )

    directory = Path(directory)
    checkpoint = directory / "rag"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    torch.manual_seed(0)
    question_encoder_dir, generator_dir = directory / "question_encoder", directory / "generator"
    DPRQuestionEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(question_encoder_dir)
    write_tiny_question_encoder_tokenizer(question_encoder_dir).save_pretrained(question_encoder_dir)
    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(generator_dir)
    write_tiny_generator_tokenizer(generator_dir).save_pretrained(generator_dir)
    built = build_index(
        [{"title": title, "text": text} for title, text in TINY_PASSAGES],
        directory / "index",
        encoder=load_text_encoder(str(question_encoder_dir), device="cpu"),
        index_factory="Flat",
        words_per_passage=None,
        show_progress=False,
    )
    return consolidate_rag_checkpoint(
        model_type,
        str(question_encoder_dir),
        str(generator_dir),
        checkpoint,
        index_name="custom",
        passages_path=str(built.passages_path),
        index_path=str(built.index_path),
        n_docs=3,
        max_combined_length=64,
    )
