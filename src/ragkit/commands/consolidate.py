"""``ragkit consolidate``: write a RAG checkpoint built from a question encoder and a generator."""

from __future__ import annotations

import argparse
from typing import Any

from ..encoders import resolve_encoder_name
from ..errors import RagInputError
from ..finetuning.arguments import UnderscoreHelpFormatter, add_flag
from ..loading import MODEL_TYPES, check_model_location, consolidate_rag_checkpoint

__all__ = [
    "add_rag_field_arguments",
    "check_generator",
    "configure_parser",
    "pooling_fields",
    "rag_fields",
    "run",
]


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
        help="how question vectors are pooled (default: the encoder's: pooler for DPR, mean otherwise)",
    )
    add_flag(
        parser,
        "question_encoder_normalize",
        action="store_true",
        default=None,
        help="L2-normalize question vectors",
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
    """Index and pooling fields given on the command line."""
    names = ("index_name", "index_path", "passages_path", "n_docs")
    index = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return {**pooling_fields(args), **index}


def check_generator(name_or_path: str, flag: str = "--generator_name_or_path") -> None:
    """Raise :class:`RagInputError` when ``name_or_path`` (a checked location) is not an encoder-decoder model.

    Args:
        name_or_path: Directory or Hub id of the generator.
        flag: The option named in the error.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
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
    for flag, value in (
        ("--question_encoder_name_or_path", question_encoder),
        ("--generator_name_or_path", args.generator_name_or_path),
        ("--question_encoder_tokenizer_name_or_path", question_encoder_tokenizer),
        ("--generator_tokenizer_name_or_path", args.generator_tokenizer_name_or_path),
        ("--config_name_or_path", args.config_name_or_path),
    ):
        if value is not None:
            check_model_location(value, flag)
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
