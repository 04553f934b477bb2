"""``ragkit eval``: answer (EM, F1) or retrieve (precision@k) over a question file with a RAG checkpoint.

The arguments are those of the research project's ``eval_rag.py``; the file formats are described in
:mod:`ragkit.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os

from .._io import read_json_object
from ..errors import RagInputError
from . import check_device, check_outputs, positive_int, require_source

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit eval`` (each also accepted with dashes: ``--model-name-or-path``)."""
    parser.add_argument("--model_name_or_path", required=True, help="RAG checkpoint (directory or Hub id)")
    parser.add_argument(
        "--model_type",
        choices=["rag_sequence", "rag_token", "auto"],
        default="auto",
        help="head to load; 'auto' reads it from the checkpoint's architectures",
    )
    parser.add_argument("--evaluation_set", required=True, help="questions, one per line")
    parser.add_argument(
        "--gold_data_path", required=True, help="gold answers (e2e) or gold titles (retrieval)"
    )
    parser.add_argument(
        "--gold_data_mode",
        choices=["qa", "ans"],
        default="qa",
        help="qa: question<TAB>answers per line; ans: one line of tab-separated answers per question",
    )
    parser.add_argument(
        "--predictions_path",
        default="predictions.txt",
        help="where predictions are written (an existing file only with --overwrite)",
    )
    parser.add_argument(
        "--eval_mode",
        choices=["e2e", "retrieval"],
        default="e2e",
        help="e2e: generate answers, EM/F1; retrieval: precision@k of the retrieved titles",
    )
    parser.add_argument("--n_docs", type=positive_int, default=5, help="passages retrieved per question")
    parser.add_argument("--num_beams", type=positive_int, default=4, help="beam size")
    parser.add_argument("--min_length", type=int, default=1, help="min generated tokens")
    parser.add_argument("--max_length", type=positive_int, default=50, help="max generated tokens")
    parser.add_argument("--eval_batch_size", type=positive_int, default=8, help="questions per batch")
    parser.add_argument(
        "--k", type=positive_int, default=None, help="precision@k cut-off (defaults to --n_docs)"
    )
    parser.add_argument(
        "--index_name", default=None, help="override the checkpoint's index: custom|exact|..."
    )
    parser.add_argument(
        "--index_path", default=None, help="override the checkpoint's index file or directory"
    )
    parser.add_argument("--passages_path", default=None, help="override the checkpoint's passages directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (defaults to cuda when available)")
    parser.add_argument(
        "--metrics_path",
        default=None,
        help="also write the metrics as JSON here (an existing file only if eval wrote it, or with --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --predictions_path or --metrics_path file (never the inputs or the index)",
    )


def _checkpoint_index_files(model_name_or_path: str) -> dict[str, str]:
    """The index files a local checkpoint's config.json points at (what errors call each -> path), to protect.

    ``index_path`` and ``passages_path`` are read as the retriever reads them (relative to the current
    directory); files ``save_pretrained`` wrote next to the config lie inside the checkpoint, which is
    protected as a whole. The config's paths are protected even when --index_path/--passages_path replace
    them for this run: they are still the user's index.
    """
    config_file = os.path.join(model_name_or_path, "config.json")
    config = read_json_object(config_file)
    if config is None:
        return {}  # not a local checkpoint (a Hub id), or one the loader reports on
    from ..retrieval.building import MANIFEST_FILENAME

    protected = {}
    for field in ("index_path", "passages_path"):
        value = config.get(field)
        if isinstance(value, str) and value:
            protected[f"the {field} of {config_file}"] = value
    index_path = protected.get(f"the index_path of {config_file}")
    if index_path is not None:
        # The description `ragkit build-index` writes beside index.faiss belongs to the index too.
        manifest = os.path.join(os.path.dirname(index_path), MANIFEST_FILENAME)
        protected[f"the index of {config_file}"] = manifest
    return protected


def _is_metrics_file(path: str) -> bool:
    """Whether ``path`` holds metrics as eval writes them: a JSON object of ``n`` and em/f1 or precision@k."""
    content = read_json_object(path)
    if content is None or "n" not in content:
        return False
    names = set(content) - {"n"}
    return names == {"em", "f1"} or (len(names) == 1 and next(iter(names)).startswith("precision"))


def _check_replaceable_outputs(args: argparse.Namespace) -> None:
    """Refuse existing output files eval did not write (a predictions file cannot be told apart: any needs
    --overwrite); a metrics file eval wrote is replaced."""
    if args.overwrite:
        return
    if os.path.lexists(args.predictions_path):
        raise RagInputError(
            f"--predictions_path {args.predictions_path!r} already exists; give a new file, or add --overwrite "
            "to replace it."
        )
    if args.metrics_path and os.path.lexists(args.metrics_path) and not _is_metrics_file(args.metrics_path):
        raise RagInputError(
            f"--metrics_path {args.metrics_path!r} already exists and does not hold metrics eval wrote; give a "
            "new file, or add --overwrite to replace it."
        )


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse outputs that overwrite inputs and values that cannot work, before the model is loaded."""
    if args.min_length < 0 or args.min_length > args.max_length:
        raise RagInputError(
            f"--min_length {args.min_length} must be between 0 and --max_length ({args.max_length})."
        )
    if args.k is not None and args.k > args.n_docs:
        raise RagInputError(
            f"--k {args.k} is larger than --n_docs {args.n_docs}; at most n_docs are retrieved."
        )
    check_outputs(
        {"--predictions_path": args.predictions_path, "--metrics_path": args.metrics_path},
        {
            "--evaluation_set": args.evaluation_set,
            "--gold_data_path": args.gold_data_path,
            "--model_name_or_path": args.model_name_or_path,
            "--index_path": args.index_path,
            "--passages_path": args.passages_path,
            **_checkpoint_index_files(args.model_name_or_path),
        },
    )
    _check_replaceable_outputs(args)
    check_device(args.device)


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit eval``: load the model, answer or retrieve, print the metrics, write the predictions."""
    from .._io import atomic_file
    from ..evaluation import (
        evaluate_answers,
        evaluate_retrieval,
        generate_answers,
        load_gold_answers,
        load_gold_titles,
        load_questions,
        retrieve_titles,
    )
    from ..loading import load_rag_for_training

    _check_arguments(args)
    questions = load_questions(args.evaluation_set)
    if not questions:
        raise RagInputError(
            f"--evaluation_set {args.evaluation_set!r} holds no questions (one per line); nothing to evaluate."
        )
    if args.eval_mode == "e2e":
        # A qa gold file names its questions: they must be the evaluation set's, in its order.
        gold: list[list[str]] = load_gold_answers(args.gold_data_path, args.gold_data_mode, questions)
    else:
        gold = load_gold_titles(args.gold_data_path)
    if len(gold) != len(questions):
        raise RagInputError(
            f"--evaluation_set {args.evaluation_set!r} has {len(questions)} questions but --gold_data_path "
            f"{args.gold_data_path!r} has {len(gold)} gold lines; give exactly one gold line per question."
        )
    require_source(args.model_name_or_path, "--model_name_or_path")
    model, tokenizer = load_rag_for_training(
        args.model_name_or_path,
        model_type=None if args.model_type == "auto" else args.model_type,
        index_name=args.index_name,
        index_path=args.index_path,
        passages_path=args.passages_path,
        n_docs=args.n_docs,
        device=args.device,
    )
    if args.eval_mode == "e2e":
        predictions = generate_answers(
            model,
            tokenizer,
            questions,
            batch_size=args.eval_batch_size,
            n_docs=args.n_docs,
            num_beams=args.num_beams,
            max_length=args.max_length,
            min_length=args.min_length,
        )
        result = evaluate_answers(predictions, gold)
    else:
        retrieved = retrieve_titles(
            model, tokenizer, questions, batch_size=args.eval_batch_size, n_docs=args.n_docs
        )
        result = evaluate_retrieval(retrieved, gold, k=args.k or args.n_docs)
    # Atomic: an interrupted run never leaves a truncated predictions file that looks complete. One line per
    # question: every line break (\r, \u2028, ... too) becomes a space, which leaves EM/F1 unchanged.
    with atomic_file(args.predictions_path) as tmp:
        tmp.write_text("".join(" ".join(p.splitlines()) + "\n" for p in result.predictions), encoding="utf-8")
    if args.metrics_path:
        with atomic_file(args.metrics_path) as tmp:
            tmp.write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
    for name, value in result.metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")  # noqa: T201 (command output)
    print(f"predictions written to {args.predictions_path}")  # noqa: T201 (command output)
    return 0
