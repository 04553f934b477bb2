"""Fine-tune a RAG model on question/answer pairs (the research project's finetune_rag.py, in plain PyTorch).

    python examples/finetune_rag.py --model_name_or_path facebook/rag-sequence-base \
        --data_dir data --output_dir out --index_name custom \
        --passages_path my_index/passages --index_path my_index/index.faiss \
        --n_docs 5 --learning_rate 3e-5 --num_train_epochs 3 --train_batch_size 8
    python examples/finetune_rag.py --local      # a tiny checkpoint and the tiny capital questions, offline

The data directory holds train.source/train.target (and val.*) line files or train.jsonl/val.jsonl.
Same as ``ragkit finetune``; see docs/finetuning.md for every option.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ragkit.commands.finetune import configure_parser, run

_CAPITALS = {"france": "Paris", "germany": "Berlin", "england": "London", "spain": "Madrid", "italy": "Rome"}


def _write_local_data(directory: Path) -> None:
    """Capital questions as train.{source,target} and val.{source,target}."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"train": "what is the capital of {}?", "val": "capital city of {}?"}
    for split, template in splits.items():
        (directory / f"{split}.source").write_text("".join(template.format(c) + "\n" for c in _CAPITALS))
        (directory / f"{split}.target").write_text("".join(city + "\n" for city in _CAPITALS.values()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" in argv:
        argv.remove("--local")
        from _local import build_local_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = build_local_checkpoint(scratch)
            _write_local_data(Path(scratch) / "data")
            return main(
                [
                    "--model_name_or_path", str(checkpoint),
                    "--data_dir", str(Path(scratch) / "data"),
                    "--output_dir", str(Path(scratch) / "out"),
                    "--num_train_epochs", "2",
                    "--train_batch_size", "2",
                    "--learning_rate", "1e-3",
                    *argv,
                ]
            )  # fmt: skip
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    args.command = "finetune"
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
