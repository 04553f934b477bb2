"""DPR's original index files (``index_name="legacy"``) and their conversion to a pickle-free layout.

DPR ships three files: a faiss HNSW index over 769-dim vectors (DPR appends ``sqrt(phi - |x|^2)`` to
each passage vector so that maximum inner product becomes nearest neighbour in L2; queries get a 0
appended), a pickled list mapping index positions to passage ids, and a pickled dict mapping passage
ids to ``(text, title)``. Unpickling runs arbitrary code, so :class:`LegacyIndex` refuses those files
unless the user opts in (``allow_pickle=True`` or ``TRUST_REMOTE_CODE=True`` in the environment).

:func:`convert_legacy_index` (``ragkit convert-legacy SRC DST``) rewrites them once into files that need
no trust: the same faiss index, the id map as ``.npy`` and the passages as a memory-mappable Arrow
file. It reads the pickles with a restricted unpickler that rebuilds plain lists, dicts, strings and
numbers and refuses anything else, so converting is safe without the opt-in. A converted directory
is detected by its ``ragkit_legacy.json`` and loads with no opt-in, giving identical results.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_directory, atomic_file, check_not_inside, check_replaceable
from ..errors import CorruptFileError, RagInputError
from . import _hub
from .base import (
    MISSING_DOC_ID,
    Index,
    PassageTable,
    _warn_missing,
    apply_search_parameters,
    as_query_matrix,
    check_n_docs,
    read_faiss_index,
)
from .canonical import WIKI_DPR_DUMMY_REPO

logger = logging.getLogger(__name__)

__all__ = ["LEGACY_INDEX_PATH", "LegacyIndex", "convert_legacy_index"]

#: Where DPR's legacy files live by default: the Hub dataset repo (the reference's bucket URL is gone).
LEGACY_INDEX_PATH = WIKI_DPR_DUMMY_REPO

INDEX_FILENAME = "hf_bert_base.hnswSQ8_correct_phi_128.c_index"
PASSAGE_FILENAME = "psgs_w100.tsv.pkl"
CONVERTED_MANIFEST = "ragkit_legacy.json"
CONVERTED_INDEX = INDEX_FILENAME + ".faiss"
CONVERTED_ID_MAP = INDEX_FILENAME + ".index_meta.npy"
CONVERTED_PASSAGES = "psgs_w100.arrow"
_FORMAT = "ragkit-legacy"
_PICKLE_REFUSED = (
    "Loading DPR's legacy files runs `pickle.load`, which can execute arbitrary code from the file. Either "
    "convert them once to a pickle-free directory with `ragkit convert-legacy SRC DST` (it reads only plain "
    "data) and use that directory as `index_path`, or, if you trust the files, pass `allow_pickle=True` "
    "(or set the environment variable TRUST_REMOTE_CODE=True)."
)


def _env_trusts_pickle() -> bool:
    """Whether ``TRUST_REMOTE_CODE`` is set to a true value, as the reference honours."""
    return os.environ.get("TRUST_REMOTE_CODE", "False").strip().lower() in (
        "1",
        "true",
        "yes",
        "y",
        "on",
        "t",
    )


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only built-in containers and scalars: any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"the pickle refers to {module}.{name}, which plain DPR files never do; refusing to load it. "
            "If you trust the file, pass allow_pickle=True (--allow_pickle on the command line)."
        )


def _corrupt(path: Any, problem: str) -> CorruptFileError:
    """The error for a legacy file that does not hold what DPR writes."""
    return CorruptFileError(
        f"The legacy DPR file {os.fspath(path)!r} {problem}. Download it again (force_download=True for Hub "
        "files) or restore it from a good copy of DPR's files."
    )


def _load_pickle(path: str, trusted: bool) -> Any:
    """Unpickle ``path``: fully when trusted, else with :class:`_PlainDataUnpickler`."""
    with open(path, "rb") as f:
        try:
            return pickle.load(f) if trusted else _PlainDataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            if "refusing to load it" in str(err):
                raise
            raise _corrupt(path, f"is not a readable pickle ({err})") from err
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
            raise _corrupt(path, f"is truncated or not a pickle ({type(err).__name__}: {err})") from err


def _id_map(meta: Any, path: str) -> np.ndarray:
    """The index-position -> passage-id map of the meta file, checked: a list of integer ids."""
    if isinstance(meta, (str, bytes, dict)) or not hasattr(meta, "__iter__"):
        raise _corrupt(path, f"should hold a list of passage ids, but holds a {type(meta).__name__}")
    try:
        return np.asarray([int(i) for i in meta], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise _corrupt(
            path, f"should hold a list of integer passage ids ({type(err).__name__}: {err})"
        ) from err


def _normalize_location(index_path: str | os.PathLike | None) -> str:
    """Map ``None`` and the reference's dead bucket URL to the Hub repo; keep anything else."""
    if index_path is None:
        return LEGACY_INDEX_PATH
    index_path = os.fspath(index_path)
    if index_path.startswith(("http://", "https://")):
        logger.info(
            "Legacy index URL %s is not served any more; using the Hub repo %s.",
            index_path,
            LEGACY_INDEX_PATH,
        )
        return LEGACY_INDEX_PATH
    return index_path


def _is_converted(location: str, **hub_kwargs: Any) -> bool:
    """Whether ``location`` holds a converted (pickle-free) legacy index."""
    if _hub.is_local(location):
        return os.path.isfile(os.path.join(location, CONVERTED_MANIFEST))
    try:
        _hub.resolve_file(location, CONVERTED_MANIFEST, **hub_kwargs)
    except _hub.LocationNotFoundError:
        raise  # a mistyped directory: say so rather than asking for the pickle opt-in
    except FileNotFoundError:
        return False
    return True


class LegacyIndex(Index):
    """DPR's original index (HNSW over 769-dim phi-trick vectors), pickled or converted.

    Args:
        vector_size: Width of the question vectors (768); the faiss index is one wider.
        index_path: Local directory or Hub dataset repo with DPR's files, or a directory written by
            :func:`convert_legacy_index` (detected by its ``ragkit_legacy.json``). Defaults to
            ``huggingface/wiki_dpr``.
        allow_pickle: Trust and unpickle DPR's pickled files (also enabled by ``TRUST_REMOTE_CODE=True``).
        ef_search: faiss ``efSearch`` (the stored value when None).
        revision: Hub revision.
        cache_dir: Hub cache directory.
        token: Hub token, for a private repository holding the files.
    """

    INDEX_FILENAME = INDEX_FILENAME
    PASSAGE_FILENAME = PASSAGE_FILENAME

    def __init__(
        self,
        vector_size: int,
        index_path: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        ef_search: int | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ):
        self.vector_size = vector_size
        self.index_path = _normalize_location(index_path)
        self.allow_pickle = allow_pickle or _env_trusts_pickle()
        self.ef_search = ef_search
        self._hub_kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
        if token is not None:  # private Hub mirrors of the legacy files
            self._hub_kwargs["token"] = token
        self.converted = _is_converted(self.index_path, **self._hub_kwargs)
        self.index: Any = None
        self.index_id_to_db_id: np.ndarray | None = None
        self._index_initialized = False
        self._passage_ids: np.ndarray | None = None
        self.passages = self._load_passages()

    def _resolve_path(self, filename: str) -> str:
        """Local path of one of the legacy files."""
        return _hub.resolve_file(self.index_path, filename, what="index_path", **self._hub_kwargs)

    def _load_passages(self) -> Any:
        """The id -> (text, title) dict (pickled files) or a memory-mapped :class:`PassageTable` (converted)."""
        logger.info("Loading passages from %s", self.index_path)
        if self.converted:
            import pyarrow as pa

            path = self._resolve_path(CONVERTED_PASSAGES)
            try:
                table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
            except (pa.ArrowInvalid, OSError) as err:
                raise CorruptFileError(
                    f"Could not read the converted passages {path!r} ({err}): the file is truncated or damaged. "
                    "Convert the legacy files again (`ragkit convert-legacy`)."
                ) from err
            self._passage_ids = table.column("id").to_numpy()
            return PassageTable(table, source=f"the converted legacy passages in {self.index_path!r}")
        if not self.allow_pickle:
            raise RagInputError(_PICKLE_REFUSED)
        return _load_pickle(self._resolve_path(PASSAGE_FILENAME), trusted=True)

    def _deserialize_index(self) -> None:
        """Read the faiss index and the index-position -> passage-id map."""
        if self.converted:
            self.index = read_faiss_index(self._resolve_path(CONVERTED_INDEX))
            id_map_path = self._resolve_path(CONVERTED_ID_MAP)
            try:
                self.index_id_to_db_id = np.load(id_map_path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise CorruptFileError(
                    f"Could not read the converted id map {id_map_path!r} ({err}): the file is truncated or "
                    "damaged. Convert the legacy files again (`ragkit convert-legacy`)."
                ) from err
        else:
            if not self.allow_pickle:
                raise RagInputError(_PICKLE_REFUSED)
            self.index = read_faiss_index(self._resolve_path(INDEX_FILENAME + ".index.dpr"))
            meta_path = self._resolve_path(INDEX_FILENAME + ".index_meta.dpr")
            self.index_id_to_db_id = _id_map(_load_pickle(meta_path, trusted=True), meta_path)
        if len(self.index_id_to_db_id) != self.index.ntotal:
            raise RagInputError(
                f"The legacy id map has {len(self.index_id_to_db_id)} entries but the faiss index holds "
                f"{self.index.ntotal} vectors; the files in {self.index_path!r} do not belong together."
            )
        if self.index.d != self.vector_size + 1:
            raise RagInputError(
                f"The legacy faiss index has dimension {self.index.d}; with `retrieval_vector_size`="
                f"{self.vector_size} it must be {self.vector_size + 1} (DPR appends one dimension). Set "
                f"config.retrieval_vector_size={self.index.d - 1} or use the matching index."
            )
        apply_search_parameters(self.index, ef_search=self.ef_search)

    def is_initialized(self) -> bool:
        return self._index_initialized

    def init_index(self) -> None:
        """Load the faiss index and the id map."""
        if self._index_initialized:
            return
        logger.info("Loading index from %s", self.index_path)
        self._deserialize_index()
        self._index_initialized = True

    def _rows_of(self, doc_ids: np.ndarray) -> np.ndarray:
        """Rows of the converted passage table holding passage ids ``doc_ids`` (-1 stays -1)."""
        ids = self._passage_ids
        rows = np.searchsorted(ids, doc_ids)
        valid = doc_ids != MISSING_DOC_ID
        found = valid & (rows < len(ids))
        found[found] = ids[rows[found]] == doc_ids[found]
        if np.any(valid & ~found):
            raise KeyError(f"passage id {int(doc_ids[valid & ~found][0])} is not in the legacy passages.")
        return np.where(valid, rows, MISSING_DOC_ID)

    def get_doc_dicts(self, doc_ids: np.ndarray) -> list[dict]:
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if self.converted:
            dicts = self.passages.doc_dicts(self._rows_of(doc_ids))
            return [{"title": d["title"], "text": d["text"]} for d in dicts]
        doc_dicts = []
        for row in doc_ids.tolist():
            docs = [self.passages[str(i)] if i != MISSING_DOC_ID else ("", "") for i in row]
            doc_dicts.append({"title": [doc[1] for doc in docs], "text": [doc[0] for doc in docs]})
        return doc_dicts

    def get_top_docs(
        self, question_hidden_states: np.ndarray, n_docs: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        self._require_initialized()
        queries = as_query_matrix(question_hidden_states, self.vector_size)
        n_docs = check_n_docs(n_docs, self.index.ntotal)
        # DPR's phi trick: passage vectors carry an extra component, queries a 0 there.
        padded = np.zeros((queries.shape[0], self.vector_size + 1), dtype=np.float32)
        padded[:, :-1] = queries
        _, positions = self.index.search(padded, n_docs)
        flat = positions.reshape(-1)
        valid = flat >= 0
        vectors = np.zeros((flat.size, self.vector_size), dtype=np.float32)
        ids = np.full(flat.size, MISSING_DOC_ID, dtype=np.int64)
        if not valid.all():
            _warn_missing(int((~valid).sum()), flat.size)
        if valid.any():
            vectors[valid] = self.index.reconstruct_batch(flat[valid])[:, :-1]
            ids[valid] = self.index_id_to_db_id[flat[valid]]
        return ids.reshape(positions.shape), vectors.reshape(*positions.shape, self.vector_size)


def _write_passages(passages: dict, path: Path) -> np.ndarray:
    """Write the id -> (text, title) dict as an Arrow IPC file sorted by integer id; return the sorted ids."""
    import pyarrow as pa

    ids = np.fromiter((int(k) for k in passages), dtype=np.int64, count=len(passages))
    keys = list(passages)
    order = np.argsort(ids, kind="stable")
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("title", pa.string())])
    chunk = 100_000
    with pa.OSFile(os.fspath(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            docs = [passages[keys[i]] for i in part.tolist()]
            writer.write_batch(
                pa.record_batch(
                    [pa.array(ids[part]), pa.array([d[0] for d in docs]), pa.array([d[1] for d in docs])],
                    schema=schema,
                )
            )
    return ids[order]


def convert_legacy_index(
    src: str | os.PathLike | None,
    dst: str | os.PathLike,
    allow_pickle: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Rewrite DPR's legacy files into a pickle-free directory that ``index_name="legacy"`` loads as is.

    Args:
        src: Directory or Hub dataset repo with ``hf_bert_base.hnswSQ8_correct_phi_128.c_index.index.dpr``,
            ``...index_meta.dpr`` and ``psgs_w100.tsv.pkl`` (None: ``huggingface/wiki_dpr``).
        dst: Directory to write (replaced atomically: an interrupted conversion leaves nothing loadable).
        allow_pickle: Unpickle with the full pickle machinery (only for files you trust that hold more
            than plain lists and dicts); by default a restricted unpickler refuses any class or function.
        revision: Hub revision of ``src``.
        cache_dir: Hub cache directory.

    Returns:
        Path: ``dst``.
    """
    location = _normalize_location(src)
    hub_kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    if _hub.is_local(location):
        check_not_inside(dst, location, "`src`")
    check_replaceable(
        dst, (CONVERTED_ID_MAP, CONVERTED_PASSAGES, CONVERTED_INDEX, CONVERTED_MANIFEST), "`dst`"
    )
    index_file = _hub.resolve_file(location, INDEX_FILENAME + ".index.dpr", what="src", **hub_kwargs)
    meta_file = _hub.resolve_file(location, INDEX_FILENAME + ".index_meta.dpr", what="src", **hub_kwargs)
    passages_file = _hub.resolve_file(location, PASSAGE_FILENAME, what="src", **hub_kwargs)
    dst = Path(dst)
    with atomic_directory(dst) as tmp:
        logger.info("Reading the id map %s", meta_file)
        id_map = _id_map(_load_pickle(meta_file, trusted=allow_pickle), meta_file)
        np.save(tmp / CONVERTED_ID_MAP, id_map, allow_pickle=False)
        logger.info("Reading the passages %s", passages_file)
        passages = _load_pickle(passages_file, trusted=allow_pickle)
        if not isinstance(passages, dict):
            raise _corrupt(
                passages_file,
                f"should hold a dict id -> (text, title), but holds a {type(passages).__name__}",
            )
        try:
            passage_ids = _write_passages(passages, tmp / CONVERTED_PASSAGES)
        except (TypeError, ValueError, IndexError, KeyError) as err:
            if isinstance(err, RagInputError):
                raise
            raise _corrupt(
                passages_file,
                f"should map integer ids to (text, title) pairs of strings ({type(err).__name__}: {err})",
            ) from err
        del passages
        # Every passage the index can return must be there: else a search fails later, on that passage.
        rows = np.minimum(np.searchsorted(passage_ids, id_map), max(len(passage_ids) - 1, 0))
        absent = id_map[passage_ids[rows] != id_map] if len(passage_ids) else id_map
        if len(absent):
            raise RagInputError(
                f"The legacy id map names {len(absent)} passage id(s) that {passages_file!r} does not hold (for "
                f"example {int(absent[0])}); the files in {location!r} do not belong together."
            )
        logger.info("Copying the faiss index %s", index_file)
        shutil.copyfile(index_file, tmp / CONVERTED_INDEX)
        index = read_faiss_index(tmp / CONVERTED_INDEX, what="src")
        if index.ntotal != len(id_map):
            raise RagInputError(
                f"The legacy id map has {len(id_map)} entries but the faiss index holds {index.ntotal} vectors; "
                f"the files in {location!r} do not belong together."
            )
        manifest = {
            "format": _FORMAT,
            "version": 1,
            "vector_size": int(index.d) - 1,
            "num_vectors": int(index.ntotal),
            "num_passages": len(passage_ids),
            "source": os.fspath(location),
        }
        with atomic_file(tmp / CONVERTED_MANIFEST) as f:
            f.write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Wrote the pickle-free legacy index to %s", dst)
    return dst
