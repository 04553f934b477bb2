"""Build a custom index from your own documents and answer questions over it.

Input: a TSV (or CSV, JSON Lines, parquet) with ``title`` and ``text`` columns. Documents are split
into 100-word passages, embedded with a DPR context encoder and indexed with faiss; the RAG model's
question encoder must come from the same family (DPR question encoder for DPR passages).

    python examples/use_own_knowledge_dataset.py --documents my_docs.tsv --output_dir my_index
    python examples/use_own_knowledge_dataset.py --local     # tiny random encoder and model, offline
    python examples/use_own_knowledge_dataset.py --local --work_dir DIR    # the same, keeping DIR/my_index
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenizer
from ragkit.commands import require_source
from ragkit.errors import RagkitError
from ragkit.retrieval.building import build_index


def _index_and_answer(
    documents: str | Path,
    output_dir: str | Path,
    model_name: str,
    encoder: str,
    index_factory: str,
    questions,
) -> None:
    """Index ``documents`` into ``output_dir`` and answer ``questions`` with ``model_name`` over that index."""
    # 1. Split, embed and index the documents (what `ragkit build-index` does).
    built = build_index(documents, output_dir, encoder=encoder, index_factory=index_factory)
    print(f"indexed {built.num_passages} passages ({built.dim} dims) in {output_dir}")

    # 2. Point a RAG model's retriever at the new index and ask.
    retriever = RagRetriever.from_pretrained(
        model_name,
        index_name="custom",
        passages_path=str(built.passages_path),
        index_path=str(built.index_path),
        retrieval_vector_size=built.dim,
    )
    model = RagSequenceForGeneration.from_pretrained(model_name, retriever=retriever)
    tokenizer = RagTokenizer.from_pretrained(model_name)
    inputs = tokenizer(questions, padding=True, return_tensors="pt")
    generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    for question, answer in zip(questions, tokenizer.batch_decode(generated, skip_special_tokens=True)):
        print(f"Q: {question}\nA: {answer}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", help="TSV/CSV/JSONL/parquet with title and text")
    parser.add_argument("--output_dir", help="where the passages and the index are written")
    parser.add_argument("--rag_model_name", default="facebook/rag-sequence-nq")
    parser.add_argument("--context_encoder", default="facebook/dpr-ctx_encoder-multiset-base")
    parser.add_argument("--index_factory", default="HNSW64", help="faiss factory: HNSW64, Flat, IVF1024,PQ64")
    parser.add_argument("--question", action="append", help="question to answer (repeatable)")
    parser.add_argument(
        "--local", action="store_true", help="tiny random models and the tiny passages (offline)"
    )
    parser.add_argument("--work_dir", help="with --local: keep the tiny model, documents and index here")
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except RagkitError as err:  # offline, no network, a missing file: what to do, not a traceback
        parser.error(str(err))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Index the documents ``args`` names (or the tiny ones with ``--local``) and answer the questions."""
    questions = args.question or ["What does Moses' rod turn into ?", "What is the capital of France?"]
    if not args.local:
        if not args.documents or not args.output_dir:
            parser.error("give --documents and --output_dir (or --local)")
        # Offline or without a network, say so now (as `ragkit build-index` does), not after a traceback.
        require_source(args.context_encoder, "--context_encoder")
        require_source(args.rag_model_name, "--rag_model_name")
        _index_and_answer(
            args.documents,
            args.output_dir,
            args.rag_model_name,
            args.context_encoder,
            args.index_factory,
            questions,
        )
        return 0

    from _local import build_local_checkpoint, local_work_dir

    from ragkit.testing import TINY_PASSAGES

    with local_work_dir(["--work_dir", args.work_dir] if args.work_dir else []) as work_dir:
        model_name = str(build_local_checkpoint(work_dir))
        encoder = str(work_dir / "question_encoder")  # the tiny DPR encoder embeds passages too
        documents = work_dir / "documents.tsv"
        with open(documents, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["title", "text"])
            writer.writerows(TINY_PASSAGES)
        _index_and_answer(
            documents, args.output_dir or work_dir / "my_index", model_name, encoder, "Flat", questions
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
