"""``ragkit convert-legacy SRC DST``: rewrite DPR's pickled legacy index into a pickle-free directory."""

from __future__ import annotations

import argparse
import os

from . import require_source

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ragkit convert-legacy`` (each also accepted with dashes: ``--allow-pickle``)."""
    parser.add_argument(
        "src", help="directory or Hub dataset repo with DPR's legacy files (e.g. huggingface/wiki_dpr)"
    )
    parser.add_argument("dst", help="directory to write the pickle-free index to")
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="fully unpickle the source (only for trusted files that hold more than plain lists and dicts)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument("--cache_dir", default=None, help="Hub cache directory")


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit convert-legacy``."""
    from ..errors import RagInputError
    from ..retrieval.legacy import INDEX_FILENAME, LEGACY_INDEX_PATH, PASSAGE_FILENAME, convert_legacy_index

    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        raise RagInputError(f"DST {args.dst!r} is an existing file; give a new or empty directory.")
    # The reference's bucket URL is not served any more; the library reads the Hub repo instead.
    location = LEGACY_INDEX_PATH if args.src.startswith(("http://", "https://")) else args.src
    require_source(
        location,
        "SRC",
        filenames=(INDEX_FILENAME + ".index.dpr", INDEX_FILENAME + ".index_meta.dpr", PASSAGE_FILENAME),
        repo_type="dataset",
        revision=args.revision,
        cache_dir=args.cache_dir,
        hint="Or pass a local directory holding DPR's three legacy files.",
    )
    dst = convert_legacy_index(
        args.src,
        args.dst,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        cache_dir=args.cache_dir,
    )
    print(f"Converted legacy index written to {dst}; load it with index_name='legacy', index_path='{dst}'.")  # noqa: T201 (command output)
    return 0
