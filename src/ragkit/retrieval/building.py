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
from ..errors import CorruptFileError, MissingFileError, RagInputError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_TRAIN_SIZE",
    "BuiltIndex",
    "build_faiss_index",
    "build_index",
    "build_passages_index",
    "passages_dataset",
    "read_documents",
    "split_text",
]

DEFAULT_ENCODER = "facebook/dpr-ctx_encoder-multiset-base"
PASSAGES_DIRNAME = "passages"
INDEX_FILENAME = "index.faiss"
MANIFEST_FILENAME = "ragkit_index.json"
_METRICS = ("ip", "l2")
#: Vectors used to train a trainable index (IVF, PQ); the size wiki_dpr's indexes were trained on.
DEFAULT_TRAIN_SIZE = 262_144
#: Rows added to a faiss index at a time (bounds the memory of a memory-mapped source).
_ADD_CHUNK_ROWS = 65_536


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


def _decode_error(path: Path, line: int | None, err: UnicodeDecodeError) -> RagInputError:
    """The error for a file that is not UTF-8 text."""
    where = f"{path}" if line is None else f"{path}, line {line}"
    return RagInputError(
        f"{where}: the file is not UTF-8 text ({err.reason} at byte {err.start} of the line's chunk). Re-save it "
        "as UTF-8 (for example `iconv -f latin1 -t utf-8 in.csv > out.csv`)."
    )


def _delimited_documents(path: Path, delimiter: str) -> Iterator[tuple[str, str]]:
    """(title, text) rows of a CSV/TSV file, with a ``title``/``text`` header or two header-less columns."""
    csv.field_size_limit(sys.maxsize)
    # utf-8-sig: a byte-order mark written by spreadsheet programs is not part of the first header name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            first = next(reader, None)
            if first is None:
                return
            names = [c.strip().lower() for c in first]
            if "title" in names and "text" in names:
                title_col, text_col = names.index("title"), names.index("text")
            elif len(first) == 2 and "text" not in names:
                title_col, text_col = 0, 1
                logger.warning(
                    "%s has no 'title','text' header: its first row %r is indexed as a passage. Add the header "
                    "'title%stext' if that row is one.",
                    path,
                    first,
                    delimiter,
                )
                yield first[0], first[1]
            else:
                raise RagInputError(
                    f"{path}: expected a header with 'title' and 'text' columns (or exactly two columns, title "
                    f"then text, without header); got {first[:5]}. Add the header or reorder the columns."
                )
            for row in reader:
                if not row:
                    continue
                if len(row) <= max(title_col, text_col):
                    raise RagInputError(
                        f"{path}, line {reader.line_num}: expected at least {max(title_col, text_col) + 1} "
                        f"columns, got {len(row)}."
                    )
                yield row[title_col], row[text_col]
        except UnicodeDecodeError as err:
            raise _decode_error(path, reader.line_num + 1, err) from err
        except csv.Error as err:
            raise RagInputError(f"{path}, line {reader.line_num}: not valid CSV ({err}).") from err


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(title, text) of each JSON object of a JSON Lines file."""
    line_number = 0
    with open(path, encoding="utf-8-sig") as f:
        try:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RagInputError(
                        f"{path}, line {line_number}: not valid JSON ({err.msg} at column {err.colno}). Each line "
                        'must be one object such as {"title": "...", "text": "..."}.'
                    ) from err
                yield _title_text(document, f"{path}, line {line_number}")
        except UnicodeDecodeError as err:
            raise _decode_error(path, line_number + 1, err) from err


def _parquet_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(title, text) rows of a parquet file, read by record batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorruptFileError(f"{path}: not a readable parquet file ({err}); write it again.") from err
    missing = {"title", "text"} - set(parquet.schema_arrow.names)
    if missing:
        raise RagInputError(
            f"{path}: missing column(s) {sorted(missing)}; the file has {parquet.schema_arrow.names}."
        )
    for name in ("title", "text"):
        arrow_type = parquet.schema_arrow.field(name).type
        if not (
            pa.types.is_string(arrow_type)
            or pa.types.is_large_string(arrow_type)
            or pa.types.is_null(arrow_type)
        ):
            raise RagInputError(f"{path}: column {name!r} must hold strings, but its type is {arrow_type}.")
    for batch in parquet.iter_batches(columns=["title", "text"], batch_size=10_000):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def _title_text(document: Any, where: str) -> tuple[str, str]:
    """The (title, text) of a mapping, with an error naming ``where`` if ``text`` is missing or not a string."""
    if not isinstance(document, dict) or "text" not in document:
        raise RagInputError(
            f"{where}: each document needs a 'text' field (and a 'title'); got {document!r:.100}."
        )
    title, text = document.get("title"), document["text"]
    for name, value in (("text", text), ("title", title)):
        if value is not None and not isinstance(value, str):
            raise RagInputError(
                f"{where}: '{name}' must be a string, got {type(value).__name__} {value!r:.60}. Quote it in the "
                'source (for example "1984" instead of 1984).'
            )
    return title or "", text


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
            raise MissingFileError(f"`source` {os.fspath(path)!r} does not exist.")
        suffix = path.suffix.lower()
        readers = {
            ".csv": lambda: _delimited_documents(path, ","),
            ".tsv": lambda: _delimited_documents(path, "\t"),
            ".jsonl": lambda: _jsonl_documents(path),
            ".json": lambda: _jsonl_documents(path),
            ".parquet": lambda: _parquet_documents(path),
        }
        if suffix not in readers:
            raise RagInputError(
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


def _new_faiss_index(dim: int, index_factory: str, metric: str) -> Any:
    """An empty faiss index of width ``dim`` from a factory string, with errors naming the argument."""
    from ._devices import import_faiss

    faiss = import_faiss()
    if metric not in _METRICS:
        raise RagInputError(f"`metric` must be one of {_METRICS}, got {metric!r}.")
    if index_factory == "Flat":
        return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    try:
        return faiss.index_factory(dim, index_factory, faiss_metric)
    except RuntimeError as err:
        raise RagInputError(
            f"faiss cannot build `index_factory`={index_factory!r} for dimension {dim}: "
            f"{str(err).strip().splitlines()[-1]}. Try 'Flat', 'HNSW64' or 'IVF1024,PQ64'."
        ) from err


def _check_trainable(index: Any, index_factory: str, num_train: int) -> None:
    """Refuse an index that needs more training vectors than ``num_train`` (IVF lists, PQ centroids)."""
    from ._devices import import_faiss

    if index.is_trained:
        return
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and num_train < ivf.nlist:
        raise RagInputError(
            f"`index_factory`={index_factory!r} has {ivf.nlist} IVF lists but only {num_train} passages "
            "to train on (at most `train_size`); use fewer lists (about sqrt(n_passages)) or 'HNSW64'/'Flat'."
        )
    for part in (index, ivf):
        pq = None if part is None else getattr(faiss.downcast_index(part), "pq", None)
        if pq is not None and num_train < pq.ksub:
            raise RagInputError(
                f"`index_factory`={index_factory!r} trains {pq.ksub} centroids per product-quantizer code but has "
                f"only {num_train} passages to train on (at most `train_size`); use 'HNSW64' or 'Flat' for a "
                "corpus this small (or fewer bits per code, e.g. 'PQ8x4')."
            )


def build_faiss_index(
    embeddings: Any,
    index_factory: str = "Flat",
    metric: str = "ip",
    train_size: int | None = None,
    seed: int = 0,
    fill: bool = True,
) -> Any:
    """Create, train (if needed) and fill a faiss index from a factory string.

    Args:
        embeddings: `(n_passages, dim)` float32 vectors: a numpy array, or any object with ``shape`` and
            numpy-style row indexing (``embeddings[rows]``, ``embeddings[a:b]``), e.g. a memory-mapped view;
            rows are read in chunks.
        index_factory: faiss factory string: ``"Flat"`` (exact), ``"HNSW64"``, ``"IVF1024,PQ64"``, ...
        metric: ``"ip"`` (inner product, as DPR and RAG score) or ``"l2"``.
        train_size: Vectors sampled (seeded, in row order) to train IVF/PQ indexes (default 262,144).
        seed: Seed of that sample.
        fill: Add the rows; False returns the trained, empty index (for ``Dataset.add_faiss_index``,
            which adds them itself).

    Returns:
        faiss.Index: holding every row, in order (faiss id ``i`` is row ``i``), or empty without ``fill``.
    """
    num_rows, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    index = _new_faiss_index(dim, index_factory, metric)
    if not index.is_trained:
        size = min(num_rows, train_size or DEFAULT_TRAIN_SIZE)
        _check_trainable(index, index_factory, size)
        rows = np.arange(num_rows)
        if size < num_rows:
            rows = np.sort(np.random.default_rng(seed).choice(num_rows, size, replace=False))
        logger.info("Training the %s index on %d vectors", index_factory, len(rows))
        try:
            index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        except RuntimeError as err:  # faiss's own checks of the training set
            raise RagInputError(
                f"faiss cannot train `index_factory`={index_factory!r} on {len(rows)} vectors: "
                f"{str(err).strip().splitlines()[-1]}. Use 'HNSW64' or 'Flat', or index more passages."
            ) from err
    for start in range(0, num_rows if fill else 0, _ADD_CHUNK_ROWS):
        index.add(np.ascontiguousarray(embeddings[start : start + _ADD_CHUNK_ROWS], dtype=np.float32))
        if num_rows > _ADD_CHUNK_ROWS:  # adding millions of vectors to a graph index takes a while
            logger.info(
                "Added %d of %d vectors to the index", min(start + _ADD_CHUNK_ROWS, num_rows), num_rows
            )
    return index


def passages_dataset(titles: list[str], texts: list[str], embeddings: np.ndarray) -> Any:
    """A ``datasets.Dataset`` (title, text, embeddings) built column-wise from Arrow arrays.

    Args:
        titles: One title per passage.
        texts: One text per passage.
        embeddings: `(n_passages, dim)` float32.

    Returns:
        datasets.Dataset: in memory, the layout ``index_name="custom"`` reads.
    """
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or not (len(titles) == len(texts) == len(embeddings)):
        raise RagInputError(
            f"Need one title, text and embedding row per passage: got {len(titles)} titles, {len(texts)} texts "
            f"and embeddings of shape {embeddings.shape}."
        )
    vectors = pa.FixedSizeListArray.from_arrays(
        pa.array(embeddings.reshape(-1), pa.float32()), embeddings.shape[1]
    )
    table = pa.table(
        {
            "title": _string_column(titles, "titles"),
            "text": _string_column(texts, "texts"),
            "embeddings": vectors,
        }
    )
    return Dataset(InMemoryTable(table))


def _string_column(values: Any, name: str) -> Any:
    """``values`` as an Arrow string array; None or a non-string is refused (the retriever could not load it)."""
    import pyarrow as pa

    try:
        array = pa.array(values, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid) as err:
        raise RagInputError(f"`{name}` must all be strings: {err}. Convert them with str() first.") from err
    if array.null_count:
        first = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise RagInputError(
            f"`{name}` holds {array.null_count} None value(s) (the first at position {first}); every passage "
            "needs one, use '' for none."
        )
    return array


def build_passages_index(
    titles: list[str],
    texts: list[str],
    embeddings: np.ndarray,
    output_dir: str | os.PathLike,
    index_factory: str = "HNSW64",
    metric: str = "ip",
    train_size: int | None = None,
    manifest: dict[str, Any] | None = None,
) -> BuiltIndex:
    """Write embedded passages and their faiss index as a custom index directory, atomically.

    The directory (``passages/``, ``index.faiss``, ``ragkit_index.json``) is written under a temporary
    name and renamed into place, so a reader never sees a half-written index and an interrupted write
    keeps the previous one. It is what :func:`build_index` writes, and what an index refresh (re-embedded
    passages during end-to-end training) should write.

    Args:
        titles: One title per passage.
        texts: One text per passage.
        embeddings: `(n_passages, dim)` float32 passage vectors.
        output_dir: Directory to write (replaced when it holds a previous index; a directory holding
            other files is refused).
        index_factory: faiss factory string (see :func:`build_faiss_index`).
        metric: ``"ip"`` or ``"l2"``.
        train_size: Vectors sampled to train IVF/PQ indexes.
        manifest: Extra fields for ``ragkit_index.json`` (encoder, pooling, ...).

    Returns:
        BuiltIndex: paths, passage count and dimension.
    """
    from ._devices import import_faiss

    check_replaceable(output_dir, (PASSAGES_DIRNAME, INDEX_FILENAME, MANIFEST_FILENAME), "`output_dir`")
    if not len(texts):
        raise RagInputError(
            "No passages to index (`texts` is empty): a retriever cannot load an empty index."
        )
    dataset = passages_dataset(titles, texts, embeddings)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = build_faiss_index(embeddings, index_factory, metric, train_size)
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        dataset.save_to_disk(os.fspath(tmp / PASSAGES_DIRNAME))
        import_faiss().write_index(index, os.fspath(tmp / INDEX_FILENAME))
        fields = {
            **(manifest or {}),
            "index_factory": index_factory,
            "metric": metric,
            "num_passages": len(texts),
            "dim": int(embeddings.shape[1]),
        }
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(fields, indent=2) + "\n")
    logger.info("Wrote %d passages and a %s index to %s", len(texts), index_factory, output_dir)
    return BuiltIndex(
        passages_path=output_dir / PASSAGES_DIRNAME,
        index_path=output_dir / INDEX_FILENAME,
        num_passages=len(texts),
        dim=int(embeddings.shape[1]),
    )


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
    if words_per_passage is not None and (
        isinstance(words_per_passage, bool) or not isinstance(words_per_passage, int) or words_per_passage < 0
    ):
        raise RagInputError(
            f"`words_per_passage` must be a positive number of words (or 0/None to keep documents whole), got "
            f"{words_per_passage!r}."
        )
    titles, texts = _split_documents(read_documents(source), words_per_passage)
    if not texts:
        raise RagInputError(f"`source` {source!r:.100} holds no text to index.")
    if not isinstance(encoder, TextEncoder):
        encoder_name = os.fspath(encoder)
        encoder = load_text_encoder(
            encoder_name, pooling=pooling, normalize=normalize, device=device, max_length=max_length
        )
    else:
        encoder_name = getattr(encoder.model, "name_or_path", type(encoder.model).__name__)
    # A mistyped factory or metric, or too few passages for its IVF lists, fails now, not after the embedding.
    num_train = min(len(texts), train_size or DEFAULT_TRAIN_SIZE)
    _check_trainable(_new_faiss_index(encoder.dim, index_factory, metric), index_factory, num_train)
    logger.info("Embedding %d passages with %s", len(texts), encoder_name)
    embeddings = encoder.encode(titles, batch_size=batch_size, show_progress=show_progress, text_pairs=texts)
    manifest = {
        "encoder": encoder_name,
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "words_per_passage": words_per_passage,
    }
    return build_passages_index(
        titles, texts, embeddings, output_dir, index_factory, metric, train_size=train_size, manifest=manifest
    )
