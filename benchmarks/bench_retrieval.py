"""Retrieval overhead benchmark: ``RagRetriever.retrieve`` against the raw faiss search it wraps.

One passage set (random unit vectors, ~600-character texts) and one faiss index are built once and
shared by ragkit's retriever and Transformers' reference retriever, so the three timed calls do the
same search:

- ``faiss``: ``index.search(queries, k)``, the floor;
- ``ragkit``: ``RagRetriever.retrieve(queries, k)`` (search + embeddings + titles/texts);
- ``reference``: ``transformers.RagRetriever.retrieve(queries, k)``.

Every call gets a new batch of questions (cycling through ``--query-pool`` batches, the same sequence
for every variant): repeating one batch would keep its IVF lists in cache for the raw search only.
Each step times the three variants back to back on the same batch, in an order that rotates every
step, so load spikes from other processes hit all variants alike; the median per call is reported,
and each retriever's ratio to the raw search (ratio of medians, and median of per-step ratios). ``--retrieval-batch-size`` sets ``config.retrieval_batch_size`` (queries per
faiss call) for both retrievers; the default equals the batch, so both issue one faiss call, as the
raw search does. ids and embeddings of ragkit and the reference are checked for equality.

    python benchmarks/bench_retrieval.py                                # IVF256,Flat, 50,000 x 768, batch 32, k 5
    python benchmarks/bench_retrieval.py --retrieval-batch-size 8       # the config default: 4 faiss calls
    python benchmarks/bench_retrieval.py --torch-half                   # questions as a float16 torch tensor
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np
import pyarrow as pa
import torch
import transformers
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers.models.rag.retrieval_rag import CustomHFIndex as RefCustomHFIndex

from ragkit import RagRetriever
from ragkit.retrieval import CustomHFIndex
from ragkit.testing import tiny_rag_config

_WORDS = [
    "the",
    "of",
    "and",
    "in",
    "to",
    "a",
    "was",
    "is",
    "for",
    "on",
    "as",
    "by",
    "with",
    "from",
    "his",
    "at",
    "that",
    "it",
    "an",
    "were",
    "which",
    "are",
]


def _passages(n: int, dim: int, seed: int) -> tuple[Dataset, np.ndarray]:
    """A ``datasets.Dataset`` of n passages (title, ~600-char text, unit embeddings) and the embeddings."""
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    words = np.asarray(_WORDS)[rng.integers(0, len(_WORDS), size=(n, 100))]
    texts = [" ".join(row) for row in words.tolist()]
    table = pa.table(
        {
            "title": pa.array([f"Article {i}" for i in range(n)]),
            "text": pa.array(texts),
            "embeddings": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
        }
    )
    return Dataset(InMemoryTable(table)), embeddings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-passages", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--index-factory", default="IVF256,Flat")
    parser.add_argument("--nprobe", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--retrieval-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--steps", type=int, default=600, help="timed calls per variant")
    parser.add_argument("--query-pool", type=int, default=64, help="distinct question batches cycled through")
    parser.add_argument("--torch-half", action="store_true", help="give ragkit a float16 torch tensor")
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    dataset, embeddings = _passages(args.n_passages, args.dim, seed=0)
    index = faiss.index_factory(args.dim, args.index_factory, faiss.METRIC_INNER_PRODUCT)
    index.train(embeddings)
    dataset.add_faiss_index("embeddings", custom_index=index)  # adds the vectors
    faiss.extract_index_ivf(index).nprobe = args.nprobe

    config = tiny_rag_config(
        hidden_size=args.dim, n_docs=args.k, retrieval_batch_size=args.retrieval_batch_size or args.batch_size
    )
    ours = RagRetriever(config, None, None, index=CustomHFIndex(args.dim, dataset))
    reference = transformers.RagRetriever(
        transformers.RagConfig(**config.to_dict()), None, None, index=RefCustomHFIndex(args.dim, dataset)
    )
    rng = np.random.default_rng(1)
    batches = [
        rng.standard_normal((args.batch_size, args.dim), dtype=np.float32) for _ in range(args.query_pool)
    ]
    to_ours = (lambda q: torch.from_numpy(q).half()) if args.torch_half else (lambda q: q)
    ours_batches = [to_ours(q) for q in batches]

    ours_out, ref_out = ours.retrieve(ours_batches[0], args.k), reference.retrieve(batches[0], args.k)
    if not args.torch_half:
        np.testing.assert_array_equal(ours_out[1], ref_out[1])
        np.testing.assert_array_equal(ours_out[0], ref_out[0])
        assert [d["text"] for d in ours_out[2]] == [list(d["text"]) for d in ref_out[2]]

    variants = {
        "faiss": (lambda q: index.search(q, args.k), batches),
        "ragkit": (lambda q: ours.retrieve(q, args.k), ours_batches),
        "reference": (lambda q: reference.retrieve(q, args.k), batches),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for step in range(args.steps):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            fn, inputs = variants[name]
            queries = inputs[step % len(inputs)]
            start = time.perf_counter()
            fn(queries)
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    faiss_times = np.asarray(samples["faiss"])
    result = {
        "setup": {
            "n_passages": args.n_passages,
            "dim": args.dim,
            "index_factory": args.index_factory,
            "nprobe": args.nprobe,
            "batch_size": args.batch_size,
            "k": args.k,
            "retrieval_batch_size": config.retrieval_batch_size,
            "torch_half": args.torch_half,
            "query_pool": args.query_pool,
            "faiss_threads": faiss.omp_get_max_threads(),
        },
        "median_ms": {name: round(value, 3) for name, value in medians.items()},
        "ratio_to_faiss": {
            name: round(medians[name] / medians["faiss"], 3) for name in ("ragkit", "reference")
        },
        "median_step_overhead_ms": {
            name: round(float(np.median(np.asarray(samples[name]) - faiss_times)) * 1000, 3)
            for name in ("ragkit", "reference")
        },
        "median_step_ratio_to_faiss": {
            name: round(float(np.median(np.asarray(samples[name]) / faiss_times)), 3)
            for name in ("ragkit", "reference")
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
