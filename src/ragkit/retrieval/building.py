"""Build a custom index from your own documents: the library side of ``ragkit build-index``: :func:`build_index`.

Documents (title, text) are read from CSV, TSV, JSON Lines or parquet, split into passages of 100
words (as the RAG research project's ``use_own_knowledge_dataset.py`` does: split on spaces, join
runs of ``words_per_passage`` words), embedded as ``(title, passage)`` pairs with a DPR context
encoder or any encoder :func:`~ragkit.encoders.load_text_encoder` loads, and indexed with faiss. The
output directory holds::

    passages/         datasets.Dataset (title, text, embeddings), written with save_to_disk
    index.faiss       the faiss index (faiss.write_index)
    ragkit_index.json how it was built (encoder, pooling, factory, metric, counts)

and loads with ``RagRetriever.from_pretrained(..., index_name="custom", passages_path=<dir>/passages,
index_path=<dir>/index.faiss)``. The directory is written under a temporary name and renamed into
place at the end, so an interrupted build leaves nothing loadable behind (and keeps a previous
index intact).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_directory, check_not_inside, check_replaceable

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENCODER",
    "BuiltIndex",
    "build_index",
    "read_documents",
    "split_text",
]

DEFAULT_ENCODER = "facebook/dpr-ctx_encoder-multiset-base"
PASSAGES_DIRNAME = "passages"
INDEX_FILENAME = "index.faiss"
MANIFEST_FILENAME = "ragkit_index.json"
_METRICS = ("ip", "l2")
#: Vectors used to train a trainable index (IVF, PQ); the size wiki_dpr's indexes were trained on.
_DEFAULT_TRAIN_SIZE = 262_144


@dataclass(frozen=True)
class BuiltIndex:
    """Where :func:`build_index` wrote the index.

    Attributes:
        passages_path: Directory of the passages dataset (``passages_path`` for the retriever).
        index_path: The faiss index file (``index_path`` for the retriever).
        num_passages: Number of passages indexed.
        dim: Width of the embeddings (``retrieval_vector_size``).
    """

    passages_path: Path
    index_path: Path
    num_passages: int
    dim: int


def split_text(text: str, words_per_passage: int = 100, character: str = " ") -> list[str]:
    """Split ``text`` into passages of ``words_per_passage`` words (empty passages dropped)."""
    words = text.split(character)
    passages = (
        character.join(words[i : i + words_per_passage]).strip()
        for i in range(0, len(words), words_per_passage)
    )
    return [p for p in passages if p]


def _delimited_documents(path: Path, delimiter: str) -> Iterator[tuple[str, str]]:
    """(title, text) rows of a CSV/TSV file, with a ``title``/``text`` header or two header-less columns."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        first = next(reader, None)
        if first is None:
            return
        names = [c.strip().lower() for c in first]
        if "title" in names and "text" in names:
            title_col, text_col = names.index("title"), names.index("text")
        elif len(first) == 2 and "text" not in names:
            title_col, text_col = 0, 1
            yield first[0], first[1]
        else:
            raise ValueError(
                f"{path}: expected a header with 'title' and 'text' columns (or exactly two columns, title then "
                f"text, without header); got {first[:5]}. Add the header or reorder the columns."
            )
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(title_col, text_col):
                raise ValueError(
                    f"{path}, line {line}: expected at least {max(title_col, text_col) + 1} columns."
                )
            yield row[title_col], row[text_col]


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(title, text) of each JSON object of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield _title_text(json.loads(line), f"{path}, line {line_number}")


def _parquet_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(title, text) rows of a parquet file, read by record batch."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = {"title", "text"} - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {sorted(missing)}; the file has {parquet.schema_arrow.names}."
        )
    for batch in parquet.iter_batches(columns=["title", "text"], batch_size=10_000):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def _title_text(document: Any, where: str) -> tuple[str, str]:
    """The (title, text) of a mapping, with an error naming ``where`` if ``text`` is missing."""
    if not isinstance(document, dict) or "text" not in document:
        raise ValueError(
            f"{where}: each document needs a 'text' field (and a 'title'); got {document!r:.100}."
        )
    return document.get("title") or "", document["text"]


def read_documents(source: str | os.PathLike | Iterable[dict]) -> Iterator[tuple[str, str]]:
    """Yield (title, text) from a CSV/TSV/JSON Lines/parquet file or an iterable of dicts.

    Args:
        source: A path (by extension: ``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``) or an
            iterable of ``{"title": ..., "text": ...}`` mappings.

    Returns:
        Iterator of ``(title, text)`` strings.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"`source` {os.fspath(path)!r} does not exist.")
        suffix = path.suffix.lower()
        readers = {
            ".csv": lambda: _delimited_documents(path, ","),
            ".tsv": lambda: _delimited_documents(path, "\t"),
            ".jsonl": lambda: _jsonl_documents(path),
            ".json": lambda: _jsonl_documents(path),
            ".parquet": lambda: _parquet_documents(path),
        }
        if suffix not in readers:
            raise ValueError(
                f"`source` {os.fspath(path)!r}: unsupported extension {suffix!r}; use .csv, .tsv, .jsonl or .parquet."
            )
        yield from readers[suffix]()
        return
    for number, document in enumerate(source):
        yield _title_text(document, f"document {number}")


def _split_documents(
    documents: Iterable[tuple[str, str]], words_per_passage: int | None
) -> tuple[list[str], list[str]]:
    """Titles and passages after splitting each document's text."""
    titles, texts = [], []
    for title, text in documents:
        if text is None:
            continue
        pieces = (
            split_text(text, words_per_passage)
            if words_per_passage
            else ([text.strip()] if text.strip() else [])
        )
        titles.extend([title or ""] * len(pieces))
        texts.extend(pieces)
    return titles, texts


def _make_faiss_index(
    embeddings: np.ndarray, index_factory: str, metric: str, train_size: int | None, seed: int = 0
) -> Any:
    """Create, train (if needed) and fill a faiss index from a factory string."""
    import faiss

    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {_METRICS}, got {metric!r}.")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    dim = embeddings.shape[1]
    try:
        index = faiss.index_factory(dim, index_factory, faiss_metric)
    except RuntimeError as err:
        raise ValueError(
            f"faiss cannot build `index_factory`={index_factory!r} for dimension {dim}: "
            f"{str(err).strip().splitlines()[-1]}. Try 'Flat', 'HNSW64' or 'IVF1024,PQ64'."
        ) from err
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(embeddings) < ivf.nlist:
            raise ValueError(
                f"`index_factory`={index_factory!r} has {ivf.nlist} IVF lists but only {len(embeddings)} passages "
                "to train on; use fewer lists (about sqrt(n_passages)) or 'HNSW64'/'Flat'."
            )
        size = min(len(embeddings), train_size or _DEFAULT_TRAIN_SIZE)
        sample = embeddings
        if size < len(embeddings):
            sample = embeddings[np.random.default_rng(seed).choice(len(embeddings), size, replace=False)]
        logger.info("Training the %s index on %d vectors", index_factory, len(sample))
        index.train(sample)
    index.add(embeddings)
    return index


def _passages_dataset(titles: list[str], texts: list[str], embeddings: np.ndarray) -> Any:
    """A ``datasets.Dataset`` (title, text, embeddings) built column-wise from Arrow arrays."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    vectors = pa.FixedSizeListArray.from_arrays(
        pa.array(embeddings.reshape(-1), pa.float32()), embeddings.shape[1]
    )
    table = pa.table(
        {"title": pa.array(titles, pa.string()), "text": pa.array(texts, pa.string()), "embeddings": vectors}
    )
    return Dataset(InMemoryTable(table))


def build_index(
    source: str | os.PathLike | Iterable[dict],
    output_dir: str | os.PathLike,
    encoder: Any = DEFAULT_ENCODER,
    index_factory: str = "HNSW64",
    metric: str = "ip",
    words_per_passage: int | None = 100,
    batch_size: int = 32,
    device: str | None = None,
    pooling: str = "auto",
    normalize: bool | None = None,
    max_length: int | None = None,
    train_size: int | None = None,
    show_progress: bool = True,
) -> BuiltIndex:
    """Split, embed and index documents into a custom index directory.

    Args:
        source: CSV/TSV (``title``, ``text`` header, or two header-less columns title then text), JSON
            Lines, parquet, or an iterable of ``{"title", "text"}`` dicts.
        output_dir: Directory to write; replaced atomically when the build succeeds.
        encoder: Hub id or directory of a passage encoder, or a loaded
            :class:`~ragkit.encoders.TextEncoder`.
        index_factory: faiss factory string: ``"HNSW64"`` (default: fast, accurate, no training),
            ``"Flat"`` (exact), ``"IVF1024,Flat"``, ``"IVF4096,PQ64"``, ...
        metric: ``"ip"`` (inner product, as DPR and RAG score) or ``"l2"``.
        words_per_passage: Words per passage; None or 0 keeps documents whole.
        batch_size: Passages per encoder forward pass.
        device: Encoder device; None picks CUDA when available.
        pooling: Encoder pooling (see :func:`~ragkit.encoders.load_text_encoder`).
        normalize: L2-normalize passage vectors; None follows the encoder.
        max_length: Encoder truncation length.
        train_size: Vectors sampled to train IVF/PQ indexes (default 262,144).
        show_progress: Show progress bars.

    Returns:
        BuiltIndex: paths, passage count and dimension.
    """
    from ..encoders import TextEncoder, load_text_encoder

    if isinstance(source, (str, os.PathLike)):
        check_not_inside(output_dir, source, "`source`")
    check_replaceable(output_dir, (PASSAGES_DIRNAME, INDEX_FILENAME, MANIFEST_FILENAME), "`output_dir`")
    titles, texts = _split_documents(read_documents(source), words_per_passage)
    if not texts:
        raise ValueError(f"`source` {source!r:.100} holds no text to index.")
    if not isinstance(encoder, TextEncoder):
        encoder_name = os.fspath(encoder)
        encoder = load_text_encoder(
            encoder_name, pooling=pooling, normalize=normalize, device=device, max_length=max_length
        )
    else:
        encoder_name = getattr(encoder.model, "name_or_path", type(encoder.model).__name__)
    logger.info("Embedding %d passages with %s", len(texts), encoder_name)
    embeddings = encoder.encode(titles, batch_size=batch_size, show_progress=show_progress, text_pairs=texts)
    index = _make_faiss_index(embeddings, index_factory, metric, train_size)
    output_dir = Path(output_dir)
    import faiss

    with atomic_directory(output_dir) as tmp:
        _passages_dataset(titles, texts, embeddings).save_to_disk(os.fspath(tmp / PASSAGES_DIRNAME))
        faiss.write_index(index, os.fspath(tmp / INDEX_FILENAME))
        manifest = {
            "encoder": encoder_name,
            "pooling": encoder.pooling,
            "normalize": encoder.normalize,
            "index_factory": index_factory,
            "metric": metric,
            "words_per_passage": words_per_passage,
            "num_passages": len(texts),
            "dim": int(embeddings.shape[1]),
        }
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Wrote %d passages and a %s index to %s", len(texts), index_factory, output_dir)
    return BuiltIndex(
        passages_path=output_dir / PASSAGES_DIRNAME,
        index_path=output_dir / INDEX_FILENAME,
        num_passages=len(texts),
        dim=int(embeddings.shape[1]),
    )
