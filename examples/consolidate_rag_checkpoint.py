"""Build a RAG checkpoint from a question encoder and a generator (the research project's script).

    python examples/consolidate_rag_checkpoint.py --model_type rag_sequence \
        --question_encoder_name_or_path facebook/dpr-question_encoder-single-nq-base \
        --generator_name_or_path facebook/bart-large --dest my_rag
    python examples/consolidate_rag_checkpoint.py --local     # tiny random parts, offline

Same as ``ragkit consolidate``; the options are those of ragkit.commands.consolidate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ragkit.commands.consolidate import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" in argv:
        argv.remove("--local")
        from _local import build_local_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            build_local_checkpoint(scratch)  # writes the tiny question encoder and generator it consolidates
            parts = Path(scratch)
            return main(
                [
                    "--question_encoder_name_or_path", str(parts / "question_encoder"),
                    "--generator_name_or_path", str(parts / "generator"),
                    "--dest", str(parts / "consolidated"),
                    *argv,
                ]
            )  # fmt: skip
    parser = argparse.ArgumentParser(prog="consolidate", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    args.command = "consolidate"
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
