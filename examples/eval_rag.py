"""Evaluate a RAG model: end-to-end EM/F1 or retrieval precision@k (the research project's eval_rag.py).

    python examples/eval_rag.py --model_name_or_path facebook/rag-sequence-nq --index_name exact \
        --evaluation_set nq_test.questions --gold_data_path nq_test.gold --gold_data_mode qa \
        --predictions_path predictions.txt --n_docs 5 --num_beams 4
    python examples/eval_rag.py --local      # a tiny random checkpoint and three questions, offline

Same as ``ragkit eval``; see docs/evaluation.md for the file formats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ragkit.evaluation import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" in argv:
        argv.remove("--local")
        from _local import build_local_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            checkpoint = build_local_checkpoint(scratch)
            (scratch / "questions.txt").write_text("what is the capital of france?\nwhere is the louvre?\n")
            (scratch / "gold.tsv").write_text(
                "what is the capital of france?\t['Paris']\nwhere is the louvre?\t['Paris', 'in Paris']\n"
            )
            return main(
                [
                    "--model_name_or_path", str(checkpoint),
                    "--evaluation_set", str(scratch / "questions.txt"),
                    "--gold_data_path", str(scratch / "gold.tsv"),
                    "--predictions_path", str(scratch / "predictions.txt"),
                    "--n_docs", "2",
                    "--num_beams", "2",
                    "--max_length", "10",
                    *argv,
                ]
            )  # fmt: skip
    parser = argparse.ArgumentParser(prog="eval", description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
