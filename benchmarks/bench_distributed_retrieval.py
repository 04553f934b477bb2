"""Distributed retrieval benchmark: per-call latency seen by training workers, per way of serving the index.

Several worker processes (default 2) each call ``retrieve(questions, n_docs)`` with a batch of 8
question vectors, all at the same time, as data-parallel training ranks do. Ways of serving the index:

- ``single``: every worker holds its own ``RagRetriever`` (its own copy of the index): the baseline;
- ``torch``: ``TorchDistributedRetriever``, rank 0 holds the index, gloo collectives;
- ``ray-replicated-A``: ``RayRetriever``, A actors each holding the whole index;
- ``ray-sharded-A``: ``RayRetriever``, A actors each holding 1/A of the passages (exact merge).

The passages (random unit vectors, ~100-character texts) are written once with ``save_to_disk``
with an exact ``IndexFlatIP`` file, and every variant serves that same exact index, so every
variant must return the baseline's doc ids: the script checks it. Ray actors are created by the
driver under a name and found by name by the workers, as training ranks attached to one cluster do.

    python benchmarks/bench_distributed_retrieval.py                       # 1M x 128, 2 workers, batch 8
    python benchmarks/bench_distributed_retrieval.py --num-passages 200000 --dim 768
    python benchmarks/bench_distributed_retrieval.py --variants single,ray-sharded-2 --calls 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VARIANTS = (
    "single,torch,ray-replicated-1,ray-replicated-2,ray-replicated-4,ray-sharded-2,ray-sharded-4"
)


def build_collection(workdir: Path, num_passages: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``num_passages`` random passages (save_to_disk) and their exact faiss index, once."""
    import faiss
    import pyarrow as pa
    from datasets import Dataset

    passages_path, index_path = (
        workdir / f"passages-{num_passages}x{dim}",
        workdir / f"index-{num_passages}x{dim}.faiss",
    )
    if passages_path.exists() and index_path.exists():
        return passages_path, index_path
    rng = np.random.default_rng(seed)
    index = faiss.IndexFlatIP(dim)
    batches = []
    for start in range(0, num_passages, 100_000):
        rows = min(100_000, num_passages - start)
        vectors = rng.standard_normal((rows, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.add(vectors)
        ids = np.arange(start, start + rows)
        batches.append(
            pa.record_batch(
                {
                    "title": pa.array([f"Passage {i}" for i in ids]),
                    "text": pa.array(
                        [
                            f"Passage {i} is about topic {i % 977} and has a hundred characters of text."
                            for i in ids
                        ]
                    ),
                    "embeddings": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                }
            )
        )
    Dataset(pa.Table.from_batches(batches)).save_to_disk(str(passages_path))
    faiss.write_index(index, str(index_path))
    return passages_path, index_path


def _config_and_tokenizers(workdir: Path, dim: int, n_docs: int) -> tuple[Any, Any, Any]:
    """A tiny RAG config of retrieval width ``dim`` and the tiny tokenizers (the contexts are not timed)."""
    from ragkit.testing import (
        tiny_rag_config,
        write_tiny_generator_tokenizer,
        write_tiny_question_encoder_tokenizer,
    )

    config = tiny_rag_config("bart", hidden_size=dim, n_docs=n_docs)
    return (
        config,
        write_tiny_question_encoder_tokenizer(workdir / f"question_tokenizer-{os.getpid()}"),
        write_tiny_generator_tokenizer(workdir / f"generator_tokenizer-{os.getpid()}"),
    )


def _retriever(
    variant: str, paths: tuple[Path, Path], workdir: Path, args: argparse.Namespace, **ray_kwargs: Any
) -> Any:
    """The retriever a worker (or the Ray driver) uses for ``variant``."""
    from ragkit import RagRetriever
    from ragkit.retrieval import CustomHFIndex

    config, question_tokenizer, generator_tokenizer = _config_and_tokenizers(workdir, args.dim, args.n_docs)
    config.passages_path, config.index_path = str(paths[0]), str(paths[1])
    index = CustomHFIndex.load_from_disk(args.dim, paths[0], paths[1])
    if variant == "single":
        return RagRetriever(config, question_tokenizer, generator_tokenizer, index=index)
    if variant == "torch":
        from ragkit.distributed import TorchDistributedRetriever

        return TorchDistributedRetriever(config, question_tokenizer, generator_tokenizer, index=index)
    from ragkit.distributed import RayRetriever

    _, layout, actors = variant.split("-")
    return RayRetriever(
        config,
        question_tokenizer,
        generator_tokenizer,
        index=index,
        num_actors=int(actors),
        layout=layout,
        name=f"bench-{variant}",
        actor_options={"num_cpus": 2 / max(2, int(actors))},
        num_threads=1,
        **ray_kwargs,
    )


def _worker(
    rank: int,
    variant: str,
    paths: tuple,
    workdir: Path,
    args: argparse.Namespace,
    extra: dict,
    barrier: Any,
    out: Any,
) -> None:
    """One training-like process: build the retriever, wait for the others, time ``args.calls`` calls."""
    import faiss
    import torch

    torch.set_num_threads(1)
    # One faiss thread per worker: the machine's cores are shared by all workers, as GPUs' hosts are.
    faiss.omp_set_num_threads(1)
    if variant == "torch":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{extra['port']}", rank=rank, world_size=args.workers
        )
    if variant.startswith("ray"):
        import ray

        ray.init(address=extra["address"], log_to_driver=False)
    retriever = _retriever(variant, paths, workdir, args)
    rng = np.random.default_rng(1000 + rank)
    queries = [
        rng.standard_normal((args.batch, args.dim), dtype=np.float32) for _ in range(args.calls + args.warmup)
    ]
    for q in queries[: args.warmup]:
        retriever.retrieve(q, args.n_docs)
    barrier.wait()
    seconds, ids = [], []
    for q in queries[args.warmup :]:
        start = time.perf_counter()
        _, doc_ids, _ = retriever.retrieve(q, args.n_docs)
        seconds.append(time.perf_counter() - start)
        ids.append(doc_ids)
    out.put((rank, seconds, np.stack(ids)))
    if variant == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()


def run_variant(
    variant: str, paths: tuple[Path, Path], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``args.workers`` workers on ``variant``; per-call latencies and the doc ids they got."""
    context = mp.get_context("spawn")
    extra: dict[str, Any] = {}
    driver_retriever = None
    if variant == "torch":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            extra["port"] = sock.getsockname()[1]
    if variant.startswith("ray"):
        import ray

        if not ray.is_initialized():
            ray.init(
                num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False
            )
        extra["address"] = ray.get_runtime_context().gcs_address
        started = time.perf_counter()
        driver_retriever = _retriever(variant, paths, workdir, args)  # creates the named actors
        extra["actors_ready_s"] = time.perf_counter() - started
    barrier, out = context.Barrier(args.workers), context.Queue()
    procs = [
        context.Process(target=_worker, args=(rank, variant, paths, workdir, args, extra, barrier, out))
        for rank in range(args.workers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
    if driver_retriever is not None:
        driver_retriever.close()
    results.sort(key=lambda item: item[0])
    seconds = [s for _, worker_seconds, _ in results for s in worker_seconds]
    return {
        "variant": variant,
        "median_ms": 1000 * statistics.median(seconds),
        "mean_ms": 1000 * statistics.fmean(seconds),
        "p90_ms": 1000 * float(np.percentile(seconds, 90)),
        "actors_ready_s": extra.get("actors_ready_s"),
        "ids": [worker_ids for _, _, worker_ids in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-passages", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--workdir", default="/tmp/ragkit_bench_distributed")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = build_collection(workdir, args.num_passages, args.dim)
    print(f"collection {args.num_passages} x {args.dim} ready in {time.perf_counter() - started:.0f} s")

    results = []
    for variant in args.variants.split(","):
        result = run_variant(variant, paths, workdir, args)
        results.append(result)
        print(
            f"{variant:18s} median {result['median_ms']:8.1f} ms  mean {result['mean_ms']:8.1f} ms  p90 {result['p90_ms']:8.1f} ms"
        )
    baseline = next((r for r in results if r["variant"] == "single"), results[0])
    print(
        f"\n{args.workers} workers x batch {args.batch}, n_docs {args.n_docs}, {args.num_passages} x {args.dim} exact index"
    )
    print("| variant | median ms/call | ratio to single | same ids as single |")
    print("|---|---|---|---|")
    for result in results:
        same = all(np.array_equal(a, b) for a, b in zip(result["ids"], baseline["ids"]))
        result["same_ids_as_baseline"] = same
        ratio = result["median_ms"] / baseline["median_ms"]
        print(
            f"| {result['variant']} | {result['median_ms']:.1f} | {ratio:.2f} | {'yes' if same else 'NO'} |"
        )
    if args.output:
        for result in results:
            result.pop("ids")
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
