"""``ragkit finetune``: fine-tune a RAG model on question/answer pairs.

The training flags are the fields of :class:`~ragkit.finetuning.TrainingArguments` (defaults and help
declared there once); this module adds where the model, the data and the index come from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..configuration_rag import RagConfig
from ..distributed import add_distributed_retriever_arguments, distributed_retriever_from_args
from ..encoders import resolve_encoder_name
from ..errors import RagInputError
from ..finetuning.arguments import (
    TrainingArguments,
    UnderscoreHelpFormatter,
    add_dataclass_arguments,
    add_flag,
    dataclass_from_namespace,
)
from ..finetuning.data import load_qa_split
from ..finetuning.trainer import (
    CHECKPOINT_DIRNAME,
    TRAINER_STATE_FILE,
    RagTrainer,
    TrainResult,
    check_checkpoint_files,
    check_output_dir,
)
from ..loading import (
    MODEL_TYPES,
    consolidate_rag_checkpoint,
    load_rag_for_training,
    resolve_device,
)
from . import check_device, hidden_progress_bars
from .consolidate import (
    add_rag_field_arguments,
    check_generator,
    check_index_fields,
    check_model_sources,
    rag_fields,
)

__all__ = ["configure_parser", "run"]

#: Where a run that starts from a question encoder and a generator writes the RAG checkpoint it builds.
CONSOLIDATED_DIRNAME = "consolidated"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit finetune`` (the research project's finetune_rag.py flags that apply)."""
    parser.formatter_class = UnderscoreHelpFormatter
    add_flag(parser, "data_dir", required=True, help="{train,val}.{source,target} or {train,val}.jsonl")
    model = parser.add_argument_group("model (a RAG checkpoint, or a question encoder and a generator)")
    add_flag(model, "model_name_or_path", default=None, help="RAG checkpoint to start from")
    add_flag(model, "model_type", choices=MODEL_TYPES, default=None, help="default: the checkpoint's")
    add_flag(
        model,
        "question_encoder_name_or_path",
        default=None,
        help="or: a question encoder (all-MiniLM-L6-v2 works offline) ...",
    )
    add_flag(model, "generator_name_or_path", default=None, help="... and a generator")
    add_flag(
        model,
        "context_encoder_name_or_path",
        default=None,
        help="context encoder the index was built with (--end2end)",
    )
    add_flag(model, "device", default=None, help="default: cuda when available, else cpu")
    add_rag_field_arguments(model, n_docs=False)
    add_dataclass_arguments(parser.add_argument_group("training"), TrainingArguments)
    add_distributed_retriever_arguments(parser)


def _loads_index_locally(args: argparse.Namespace) -> bool:
    """Whether this process loads the index itself (not when Ray actors or rank 0 serve it)."""
    return args.distributed_retriever == "none"


def _load_starting_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """The model to fine-tune: a RAG checkpoint, or one consolidated from a question encoder and a generator."""
    if args.model_name_or_path:
        return load_rag_for_training(
            args.model_name_or_path,
            model_type=args.model_type,
            device=device,
            init_retrieval=_loads_index_locally(args),
            **rag_fields(args),
        )
    if not (args.question_encoder_name_or_path and args.generator_name_or_path):
        raise RagInputError(
            "Give --model_name_or_path (a RAG checkpoint), or both --question_encoder_name_or_path and "
            "--generator_name_or_path to start from a question encoder and a generator."
        )
    question_encoder = resolve_encoder_name(args.question_encoder_name_or_path)
    check_generator(args.generator_name_or_path)
    staging = Path(args.output_dir) / CONSOLIDATED_DIRNAME
    consolidate_rag_checkpoint(
        args.model_type or "rag_sequence",
        question_encoder,
        args.generator_name_or_path,
        staging,
        **rag_fields(args),
    )
    return load_rag_for_training(
        staging,
        model_type=args.model_type or "rag_sequence",
        device=device,
        init_retrieval=_loads_index_locally(args),
    )


def _load_context_encoder(name_or_path: str, device: torch.device) -> tuple[Any, Any]:
    """A context encoder and its tokenizer (DPR context encoder or any AutoModel encoder)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, DPRContextEncoder

    name_or_path = resolve_encoder_name(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    model_class = DPRContextEncoder if config.model_type == "dpr" else AutoModel
    return model_class.from_pretrained(name_or_path).to(device), AutoTokenizer.from_pretrained(name_or_path)


def _check_model_flags(args: argparse.Namespace) -> None:
    """Index flags, model locations (the Hub within seconds) and the generator's kind, before anything loads."""
    from_parts = not args.model_name_or_path
    # From parts, the RAG config starts as RagConfig's; a checkpoint's own config names its index.
    check_index_fields(args, index_name=RagConfig.index_name if from_parts else None)
    generator = args.generator_name_or_path
    if generator and resolve_encoder_name(generator) != generator:
        check_generator(generator)  # the packaged sentence encoder: not a generator
    question_encoder = args.question_encoder_name_or_path
    check_model_sources(
        (
            ("--model_name_or_path", args.model_name_or_path, "checkpoint"),
            (
                "--question_encoder_name_or_path",
                question_encoder and resolve_encoder_name(question_encoder),
                "model",
            ),
            ("--generator_name_or_path", generator, "model"),
            (
                "--context_encoder_name_or_path",
                args.context_encoder_name_or_path and resolve_encoder_name(args.context_encoder_name_or_path),
                "model",
            ),
        )
    )


def _train(args: argparse.Namespace, training_args: TrainingArguments) -> TrainResult:
    """Load the data, the model (and the context encoder with end2end) and train."""
    train_examples = load_qa_split(args.data_dir, "train")
    val_examples = load_qa_split(args.data_dir, "val", required=False)
    device = resolve_device(args.device)
    resume_dir = Path(args.output_dir) / CHECKPOINT_DIRNAME
    if args.resume and (resume_dir / TRAINER_STATE_FILE).is_file():
        # Before the loader reads them: a damaged file is named with what to do about the checkpoint.
        check_checkpoint_files(resume_dir)
        index = {
            k: v for k, v in rag_fields(args).items() if k in ("index_name", "index_path", "passages_path")
        }
        model, tokenizer = load_rag_for_training(
            resume_dir,
            model_type=args.model_type,
            device=device,
            init_retrieval=_loads_index_locally(args),
            **index,
        )
    else:
        model, tokenizer = _load_starting_model(args, device)
    if not _loads_index_locally(args):
        model.set_retriever(distributed_retriever_from_args(model.retriever, args))
    context_encoder = context_tokenizer = None
    if args.end2end:
        context_encoder, context_tokenizer = _load_context_encoder(args.context_encoder_name_or_path, device)
    trainer = RagTrainer(
        model,
        tokenizer,
        training_args,
        train_examples,
        val_examples,
        context_encoder=context_encoder,
        context_encoder_tokenizer=context_tokenizer,
    )
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit finetune``."""
    # Checked first: a bad setting is reported before any model is loaded.
    training_args = dataclass_from_namespace(TrainingArguments, args)
    if args.end2end and not args.context_encoder_name_or_path:
        raise RagInputError(
            "--end2end needs --context_encoder_name_or_path (the encoder the index was built with)."
        )
    if args.context_encoder_name_or_path and not args.end2end:
        raise RagInputError(
            "--context_encoder_name_or_path is used only with --end2end (training the context encoder too); "
            "add --end2end, or leave it out."
        )
    if args.end2end and not _loads_index_locally(args):
        # Rebuilding the index swaps it in this process only; actors or rank 0 would serve the old one.
        raise RagInputError("--end2end cannot be combined with --distributed_retriever; use 'none'.")
    if args.model_name_or_path and (args.question_encoder_name_or_path or args.generator_name_or_path):
        raise RagInputError(
            "--model_name_or_path (a RAG checkpoint) and --question_encoder_name_or_path/--generator_name_or_path "
            "(parts to build one from) are two ways to give the model; give one of them."
        )
    check_device(args.device)
    check_output_dir(training_args)
    _check_model_flags(args)
    # --no_progress hides transformers' bars too (loading weights, writing every checkpoint).
    with hidden_progress_bars(not training_args.show_progress):
        result = _train(args, training_args)
    print(f"steps: {result.global_step}  epochs: {result.epoch}  last loss: {result.losses[-1]:.4f}")  # noqa: T201 (command output)
    if result.val_em:
        print("validation EM per epoch: " + ", ".join(f"{em:.4f}" for em in result.val_em))  # noqa: T201 (command output)
    if result.final_dir is not None:
        print(f"fine-tuned model written to {result.final_dir}")  # noqa: T201 (command output)
    else:
        print(  # noqa: T201 (command output)
            f"stopped at step {result.global_step} (--max_steps); continue with --resume and a larger or no "
            f"--max_steps (checkpoint: {result.checkpoint_dir})"
        )
    return 0
