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

from ..demo import MIN_FACTS
from ..errors import RagInputError
from . import hidden_progress_bars, non_negative_int, positive_int, require_source

__all__ = ["configure_parser", "run"]

#: The indexes ``--index`` names (the first is the default with --model).
_WIKI_DPR = ("wiki_dpr-dummy", "wiki_dpr-exact", "wiki_dpr-compressed")
#: Held-out questions shown by default.
_EXAMPLES = 3


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
    # The offline demo's options default to None so that one given with --model (where it does nothing)
    # can be refused; the defaults they stand for are applied in run().
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the split, the model and the baseline (default: 0)"
    )
    parser.add_argument(
        "--examples",
        type=non_negative_int,
        default=None,
        help=f"held-out questions shown with their passages (default: {_EXAMPLES})",
    )
    parser.add_argument(
        "--max_facts",
        type=_max_facts,
        default=None,
        help=f"corpus size, at least {MIN_FACTS} (default: all; 200 with --quick)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="training epochs (default: 20; 15 with --quick)"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--model",
        default=None,
        help="answer a few questions with a published checkpoint instead (needs a network); the options "
        "above but --n_docs and --no_progress are for the offline demo",
    )
    parser.add_argument(
        "--index",
        default=None,
        help=f"index for --model: {', '.join(_WIKI_DPR)} or a `ragkit build-index` directory "
        f"(default: {_WIKI_DPR[0]}; see docs/quickstart.md)",
    )


def _max_facts(text: str) -> int:
    """An argparse type: a corpus size the demo can split (at least :data:`~ragkit.demo.MIN_FACTS`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < MIN_FACTS:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= {MIN_FACTS} (whole modules are kept, and the split needs 10 facts), "
            f"got {text!r}"
        )
    return value


def _check_mode(args: argparse.Namespace) -> None:
    """Refuse options that the chosen mode would ignore: --index without --model, offline ones with it."""
    if args.model is None:
        if args.index is not None:
            raise RagInputError(
                "--index chooses the index of a published checkpoint: give --model too (for example --model "
                "facebook/rag-sequence-nq); the offline demo builds its own index."
            )
        return
    ignored = [
        flag
        for flag, value in (
            ("--quick", args.quick or None),
            ("--work_dir", args.work_dir),
            ("--epochs", args.epochs),
            ("--max_facts", args.max_facts),
            ("--seed", args.seed),
            ("--examples", args.examples),
        )
        if value is not None
    ]
    if ignored:
        raise RagInputError(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} for the offline demo and would be "
            "ignored with --model; leave out --model to train one, or these options to run the checkpoint."
        )


def _say_where_kept(kept: dict, n_docs: int, say: Callable[[str], None]) -> None:
    """The last lines of a ``--work_dir`` run: where the checkpoint and index are, and how to evaluate them."""
    say(f"\nfine-tuned RAG checkpoint: {kept['checkpoint']} (RagSequenceForGeneration.from_pretrained)")
    say(f"index: {kept['index']} (passages/ and index.faiss; the checkpoint's config points at them)")
    command = ["ragkit", "eval", "--model_name_or_path", kept["checkpoint"], "--evaluation_set"]
    command += [kept["questions"], "--gold_data_path", kept["answers"], "--gold_data_mode", "ans"]
    # Beside the held-out files: following the command writes nothing in the current directory.
    predictions = os.path.join(os.path.dirname(kept["questions"]), "held_out.predictions")
    say(f"evaluate it: {shlex.join([*command, '--n_docs', str(n_docs), '--predictions_path', predictions])}")


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit demo``."""
    from ..demo import run_offline_demo, run_pretrained_demo

    _check_mode(args)
    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise RagInputError(f"--work_dir {args.work_dir!r} is an existing file; give a directory.")
    if not getattr(args, "verbose", False):
        # The demo prints its own progress; INFO logs (faiss probes CPU features with tracebacks) are noise.
        for name in ("faiss", "faiss.loader", "datasets", "ragkit"):
            logging.getLogger(name).setLevel(logging.WARNING)

    say = functools.partial(print, flush=True)  # the command's output

    if args.model:
        require_source(args.model, "--model", hint="`ragkit demo` without --model runs fully offline.")
        with hidden_progress_bars(args.no_progress):
            run_pretrained_demo(args.model, args.index or _WIKI_DPR[0], n_docs=args.n_docs or 5, say=say)
        return 0
    options = dict(
        quick=args.quick,
        n_docs=args.n_docs or 2,
        seed=0 if args.seed is None else args.seed,
        show_examples=_EXAMPLES if args.examples is None else args.examples,
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
