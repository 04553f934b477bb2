"""Build a RAG checkpoint from a question encoder and a generator (the research project's script).

    python examples/consolidate_rag_checkpoint.py --model_type rag_sequence \
        --question_encoder_name_or_path facebook/dpr-question_encoder-single-nq-base \
        --generator_name_or_path facebook/bart-large --dest my_rag
    python examples/consolidate_rag_checkpoint.py --local     # tiny random parts, offline
    python examples/consolidate_rag_checkpoint.py --local --work_dir DIR    # the same, keeping DIR/consolidated

Same as ``ragkit consolidate`` (``ragkit consolidate --help`` lists the options).
"""

from __future__ import annotations

import sys

from ragkit.cli import main as ragkit


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" not in argv:
        return ragkit(["consolidate", *argv])
    argv.remove("--local")
    from _local import build_local_checkpoint, local_work_dir

    with local_work_dir(argv) as parts:
        build_local_checkpoint(parts)  # writes the tiny question encoder and generator it consolidates
        return ragkit(
            [
                "consolidate",
                "--question_encoder_name_or_path", str(parts / "question_encoder"),
                "--generator_name_or_path", str(parts / "generator"),
                "--dest", str(parts / "consolidated"),
                *argv,
            ]
        )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
