"""Evaluate a RAG model: end-to-end EM/F1 or retrieval precision@k (the research project's eval_rag.py).

    python examples/eval_rag.py --model_name_or_path facebook/rag-sequence-nq --index_name exact \
        --evaluation_set nq_test.questions --gold_data_path nq_test.gold --gold_data_mode qa \
        --predictions_path predictions.txt --n_docs 5 --num_beams 4
    python examples/eval_rag.py --local      # a tiny random checkpoint and three questions, offline
    python examples/eval_rag.py --local --work_dir DIR    # the same, keeping the checkpoint and predictions

Same as ``ragkit eval``; see docs/evaluation.md for the file formats.
"""

from __future__ import annotations

import sys

from ragkit.cli import main as ragkit

#: The ``--local`` questions and their gold answers (``qa`` mode: question<TAB>answers).
LOCAL_QUESTIONS = {
    "what is the capital of france?": ["Paris"],
    "where is the louvre?": ["Paris", "in Paris"],
    "who wrote hamlet?": ["Shakespeare", "William Shakespeare"],
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" not in argv:
        return ragkit(["eval", *argv])
    argv.remove("--local")
    from _local import build_local_checkpoint, local_work_dir

    with local_work_dir(argv) as work_dir:
        checkpoint = build_local_checkpoint(work_dir)
        (work_dir / "questions.txt").write_text("".join(q + "\n" for q in LOCAL_QUESTIONS))
        (work_dir / "gold.tsv").write_text("".join(f"{q}\t{a!r}\n" for q, a in LOCAL_QUESTIONS.items()))
        return ragkit(
            [
                "eval",
                "--model_name_or_path", str(checkpoint),
                "--evaluation_set", str(work_dir / "questions.txt"),
                "--gold_data_path", str(work_dir / "gold.tsv"),
                "--predictions_path", str(work_dir / "predictions.txt"),
                "--metrics_path", str(work_dir / "metrics.json"),
                "--n_docs", "2",
                "--num_beams", "2",
                "--max_length", "10",
                *argv,
            ]
        )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
