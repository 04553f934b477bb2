"""``ragkit demo``: index the standard library's docstrings, fine-tune a RAG model on them, answer held-out
questions, offline; or (``--model``) answer a few questions with a published checkpoint."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import tempfile
from collections.abc import Callable

from ..errors import RagInputError
from . import hidden_progress_bars, non_negative_int, positive_int, require_source

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit demo`` (each also accepted with dashes: ``--work-dir``)."""
    parser.add_argument("--quick", action="store_true", help="a smaller corpus and run (CI size)")
    parser.add_argument(
        "--work_dir",
        default=None,
        help="keep the index (WORK_DIR/index) and the fine-tuned RAG checkpoint (WORK_DIR/rag, loadable with "
        "from_pretrained and `ragkit eval`) here, with the held-out questions and answers "
        "(default: a temporary directory, deleted at the end)",
    )
    parser.add_argument(
        "--n_docs", type=positive_int, default=None, help="passages per question (2 offline, 5 with --model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the baseline")
    parser.add_argument(
        "--examples", type=non_negative_int, default=3, help="held-out questions shown with their passages"
    )
    parser.add_argument(
        "--max_facts", type=positive_int, default=None, help="corpus size (default: all; 200 with --quick)"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="training epochs (default: 20; 15 with --quick)"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--model", default=None, help="run a published checkpoint instead (needs a network)")
    parser.add_argument(
        "--index", default="wiki_dpr-dummy", help="index for --model (see docs/quickstart.md)"
    )


def _say_where_kept(kept: dict, n_docs: int, say: Callable[[str], None]) -> None:
    """The last lines of a ``--work_dir`` run: where the checkpoint and index are, and how to evaluate them."""
    say(f"\nfine-tuned RAG checkpoint: {kept['checkpoint']} (RagSequenceForGeneration.from_pretrained)")
    say(f"index: {kept['index']} (passages/ and index.faiss; the checkpoint's config points at them)")
    command = ["ragkit", "eval", "--model_name_or_path", kept["checkpoint"], "--evaluation_set"]
    command += [kept["questions"], "--gold_data_path", kept["answers"], "--gold_data_mode", "ans"]
    say(f"evaluate it: {shlex.join([*command, '--n_docs', str(n_docs)])}")


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit demo``."""
    from ..demo import run_offline_demo, run_pretrained_demo

    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise RagInputError(f"--work_dir {args.work_dir!r} is an existing file; give a directory.")
    if not getattr(args, "verbose", False):
        # The demo prints its own progress; INFO logs (faiss probes CPU features with tracebacks) are noise.
        for name in ("faiss", "faiss.loader", "datasets", "ragkit"):
            logging.getLogger(name).setLevel(logging.WARNING)

    say = functools.partial(print, flush=True)  # the command's output

    if args.model:
        require_source(args.model, "--model", hint="`ragkit demo` without --model runs fully offline.")
        run_pretrained_demo(args.model, args.index, n_docs=args.n_docs or 5, say=say)
        return 0
    options = dict(
        quick=args.quick,
        n_docs=args.n_docs or 2,
        seed=args.seed,
        show_examples=args.examples,
        show_progress=not args.no_progress,
        max_facts=args.max_facts,
        epochs=args.epochs,
        say=say,
    )
    with hidden_progress_bars(args.no_progress):
        if args.work_dir:
            _say_where_kept(run_offline_demo(args.work_dir, keep=True, **options), options["n_docs"], say)
            return 0
        with tempfile.TemporaryDirectory(prefix="ragkit-demo-") as work_dir:
            run_offline_demo(work_dir, **options)
    return 0
