"""``ragkit build-index SOURCE OUTPUT_DIR``: split, embed and index your own documents.

The default passage encoder is DPR's context encoder from the Hub, the one RAG's published models
retrieve with; ``--encoder all-MiniLM-L6-v2`` embeds with a copy shipped as a package, fully offline.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import MissingFileError, RagInputError
from . import (
    OFFLINE_ENCODER_HINT,
    check_device,
    hidden_progress_bars,
    non_negative_int,
    positive_int,
    require_source,
)

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit build-index`` (each also accepted with dashes: ``--words-per-passage``)."""
    # The library's default sample, said in --help (None is passed on, so build_index applies it).
    from ..retrieval.building import DEFAULT_ENCODER, DEFAULT_TRAIN_SIZE

    parser.add_argument("source", help="documents: .csv/.tsv (title, text), .jsonl or .parquet")
    parser.add_argument(
        "output_dir", help="directory to write passages/, index.faiss and ragkit_index.json to"
    )
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help="passage encoder: Hub id or directory (default: %(default)s, needs the Hub once; "
        "all-MiniLM-L6-v2 works offline)",
    )
    parser.add_argument(
        "--index_factory", default="HNSW64", help="faiss factory string (HNSW64, Flat, IVF1024,PQ64)"
    )
    parser.add_argument(
        "--metric", default="ip", choices=("ip", "l2"), help="similarity: inner product or L2"
    )
    parser.add_argument(
        "--words_per_passage", type=non_negative_int, default=100, help="words per passage (0: no split)"
    )
    parser.add_argument("--batch_size", type=positive_int, default=32, help="passages per encoder batch")
    parser.add_argument("--device", default=None, help="encoder device (default: cuda if available)")
    parser.add_argument(
        "--pooling",
        default="auto",
        choices=("auto", "pooler", "cls", "mean"),
        help="how token vectors become one vector (auto: as the encoder declares)",
    )
    parser.add_argument(
        "--normalize", default="auto", choices=("auto", "yes", "no"), help="L2-normalize passage vectors"
    )
    parser.add_argument("--max_length", type=positive_int, default=None, help="encoder truncation length")
    parser.add_argument(
        "--train_size",
        type=positive_int,
        default=None,
        help=f"vectors used to train IVF/PQ indexes (default: {DEFAULT_TRAIN_SIZE:,})",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def _check_paths(source: str, output_dir: str) -> None:
    """Refuse a missing source and an output that is an existing file before anything is loaded."""
    if os.path.isdir(source):
        raise RagInputError(
            f"SOURCE {source!r} is a directory; give the documents file inside it (.csv/.tsv with title and "
            "text columns, .jsonl or .parquet)."
        )
    if not os.path.isfile(source):
        raise MissingFileError(
            f"SOURCE {source!r} does not exist; give the documents file (.csv/.tsv, .jsonl or .parquet)."
        )
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise RagInputError(
            f"OUTPUT_DIR {output_dir!r} is an existing file, not a directory; give a new or empty directory "
            "(the index is written as a directory of several files)."
        )


@contextlib.contextmanager
def _warnings_as_messages() -> Iterator[None]:
    """Show the library's warnings (a header row indexed as a passage, ...) as the command's own lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, UserWarning):
                    print(f"ragkit build-index: warning: {warning.message}", file=sys.stderr)  # noqa: T201 (command output)


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit build-index``."""
    from ..encoders import resolve_encoder_name
    from ..retrieval.building import build_index

    _check_paths(args.source, args.output_dir)
    encoder = resolve_encoder_name(args.encoder)
    # Before torch is imported (seconds on a busy machine): a Hub that cannot serve the encoder fails fast.
    require_source(encoder, "--encoder", hint=OFFLINE_ENCODER_HINT)
    check_device(args.device)
    with _warnings_as_messages(), hidden_progress_bars(args.no_progress):
        built = build_index(
            args.source,
            args.output_dir,
            encoder=encoder,
            index_factory=args.index_factory,
            metric=args.metric,
            words_per_passage=args.words_per_passage or None,
            batch_size=args.batch_size,
            device=args.device,
            pooling=args.pooling,
            normalize={"auto": None, "yes": True, "no": False}[args.normalize],
            max_length=args.max_length,
            train_size=args.train_size,
            show_progress=not args.no_progress,
        )
    print(  # noqa: T201 (command output)
        f"Indexed {built.num_passages} passages (dim {built.dim}).\n"
        f"  passages_path={built.passages_path}\n  index_path={built.index_path}"
    )
    return 0
