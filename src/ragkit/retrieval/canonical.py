"""The canonical ``wiki_dpr`` index (``index_name="exact"`` or ``"compressed"``), read without dataset scripts.

``datasets`` >= 4 no longer runs loading scripts, so the reference's ``load_dataset("wiki_dpr", ...)``
fails. This backend reads the repository's files directly: parquet shards of passages with their
embeddings and a faiss index file, from the Hub (``facebook/wiki_dpr``) or from a local directory with
the same layout::

    data/psgs_w100/{nq,multiset}/train-00000-of-00157.parquet ...      id, text, title, embeddings
    data/psgs_w100/dummy.{nq,multiset}/train-00000-of-00001.parquet    the first 10,000 passages
    index/psgs_w100.{nq,multiset}.HNSW128_SQ8-IP-train.faiss           "exact"
    index/psgs_w100.{nq,multiset}.IVF4096_HNSW128_PQ128-IP-train.faiss "compressed"
    index/dummy.psgs_w100.nq.IndexHNSWFlat-IP-train.faiss              dummy (also looked for at the root)

The shards are converted once by ``datasets`` into memory-mapped Arrow files in its cache, so the
passages cost disk, not RAM. As in the reference, the embeddings default to ``"nq"``
(``psgs_w100.nq.*``); pass ``embeddings_name="multiset"`` or an ``index_name`` such as
``"psgs_w100.multiset.compressed"`` for the other set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import CorruptFileError, MissingFileError, RagInputError
from . import _hub
from ._devices import import_faiss
from .base import HFIndexBase, _attached_faiss_index, read_faiss_index

logger = logging.getLogger(__name__)

__all__ = ["WIKI_DPR_DUMMY_REPO", "WIKI_DPR_REPO", "CanonicalHFIndex"]

#: Hub dataset repo with the passages, embeddings and full-size indexes.
WIKI_DPR_REPO = "facebook/wiki_dpr"
#: Hub dataset repo with the indexes of the dummy (10,000 passages) variant and the legacy DPR files.
WIKI_DPR_DUMMY_REPO = "huggingface/wiki_dpr"

_WIKI_SPLIT = "psgs_w100"
_EMBEDDINGS_NAMES = ("nq", "multiset")
_INDEX_KINDS = ("exact", "compressed")
_INDEX_FILES = {
    "exact": "{wiki}.{emb}.HNSW128_SQ8-IP-{split}.faiss",
    "compressed": "{wiki}.{emb}.IVF4096_HNSW128_PQ128-IP-{split}.faiss",
}
_DUMMY_INDEX_FILES = (
    "dummy.{wiki}.{emb}.IndexHNSWFlat-IP-{split}.faiss",
    "dummy_{wiki}_with_{emb}_embeddings_IndexFlatIP-{split}.faiss",
)


def _parse_index_name(index_name: str, embeddings_name: str, dummy: bool) -> tuple[str, str, bool]:
    """Split ``"exact"`` / ``"psgs_w100.multiset.compressed"`` / ``"dummy.psgs_w100.nq.exact"`` into parts."""
    parts = index_name.split(".")
    if parts[0] == "dummy":
        dummy, parts = True, parts[1:]
    if len(parts) == 3 and parts[0] == _WIKI_SPLIT:
        embeddings_name, parts = parts[1], parts[2:]
    kind = parts[0] if len(parts) == 1 else None
    if kind not in _INDEX_KINDS:
        raise RagInputError(
            f"Unknown wiki_dpr `index_name` {index_name!r}: use 'exact' or 'compressed' (optionally written "
            "'psgs_w100.<nq|multiset>.<exact|compressed>'), 'legacy' for DPR's files or 'custom' for your own."
        )
    if embeddings_name not in _EMBEDDINGS_NAMES:
        raise RagInputError(
            f"Unknown wiki_dpr embeddings {embeddings_name!r}: use one of {_EMBEDDINGS_NAMES} "
            "(`embeddings_name=`)."
        )
    return kind, embeddings_name, dummy


def _hub_repos(dataset_name: str) -> tuple[str, str]:
    """(passages repo, dummy-index repo) for a dataset name or a local directory."""
    if _hub.is_local(dataset_name):
        return dataset_name, dataset_name
    if dataset_name in ("wiki_dpr", WIKI_DPR_REPO):
        return WIKI_DPR_REPO, WIKI_DPR_DUMMY_REPO
    return dataset_name, dataset_name


def _damaged_parquet(files: list[str]) -> str | None:
    """The first of ``files`` whose parquet footer cannot be read, if any."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            pq.read_metadata(path)
        except Exception:
            return path
    return None


class CanonicalHFIndex(HFIndexBase):
    """wiki_dpr's passages and faiss index, from the Hub or a local mirror.

    Args:
        vector_size: Width of the embeddings (768 for wiki_dpr).
        dataset_name: ``"wiki_dpr"`` (the Hub repos), another Hub dataset repo with the same layout, or a
            local directory with that layout.
        dataset_split: Split named in the file names (``"train"``).
        index_name: ``"exact"`` or ``"compressed"`` (or ``"psgs_w100.<emb>.<kind>"``).
        index_path: A faiss index file to use instead of the repository's.
        use_dummy_dataset: Use the first 10,000 passages and the dummy index.
        dataset_revision: Hub revision.
        embeddings_name: ``"nq"`` (default, as the reference) or ``"multiset"``.
        nprobe: faiss ``nprobe`` (the compressed IVF index; higher is more accurate and slower).
        ef_search: faiss ``efSearch`` (HNSW graphs).
        cache_dir: Hub and ``datasets`` cache directory.
        token: Hub token for private mirrors.
        load_dataset: A ``datasets.load_dataset``-like callable to get the passages and the indexed
            dataset from instead of the files, called with the reference's arguments (``with_index``,
            ``dummy``, ``index_name``, ...); :class:`~ragkit.RagRetriever` passes
            ``ragkit.retrieval_rag.load_dataset`` when it has been replaced (a test's patch).
    """

    def __init__(
        self,
        vector_size: int,
        dataset_name: str = "wiki_dpr",
        dataset_split: str = "train",
        index_name: str | None = None,
        index_path: str | None = None,
        use_dummy_dataset: bool = False,
        dataset_revision: str | None = None,
        embeddings_name: str = "nq",
        nprobe: int | None = None,
        ef_search: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        load_dataset: Callable[..., Any] | None = None,
    ):
        if index_name is None and index_path is None:
            raise RagInputError(
                "CanonicalHFIndex needs `index_name` ('exact' or 'compressed') or `index_path`."
            )
        kind, embeddings_name, use_dummy_dataset = _parse_index_name(
            index_name or "exact", embeddings_name, use_dummy_dataset
        )
        self.dataset_name = os.fspath(dataset_name)
        self.dataset_split = dataset_split
        self.index_name = index_name
        self.index_kind = kind
        self.index_path = index_path
        self.use_dummy_dataset = use_dummy_dataset
        self.dataset_revision = dataset_revision
        self.embeddings_name = embeddings_name
        self.cache_dir = cache_dir
        self._hub_kwargs: dict[str, Any] = {} if token is None else {"token": token}
        self._repo, self._dummy_repo = _hub_repos(self.dataset_name)
        self._load_dataset = load_dataset
        logger.info("Loading passages from %s", self.dataset_name)
        if load_dataset is not None:
            dataset = load_dataset(
                self.dataset_name,
                with_index=False,
                split=self.dataset_split,
                dummy=self.use_dummy_dataset,
                revision=dataset_revision,
            )
        else:
            dataset = self._load_passages()
        super().__init__(
            vector_size,
            dataset,
            index_initialized=False,
            nprobe=nprobe,
            ef_search=ef_search,
            source=f"The wiki_dpr passages of {self.dataset_name!r}",
        )

    def _load_passages(self) -> Any:
        """Memory-mapped ``datasets.Dataset`` over the parquet shards of the chosen variant."""
        from datasets import Dataset

        variant = f"dummy.{self.embeddings_name}" if self.use_dummy_dataset else self.embeddings_name
        pattern = f"data/{_WIKI_SPLIT}/{variant}/{self.dataset_split}-*.parquet"
        files = _hub.list_files(
            self._repo,
            pattern,
            revision=self.dataset_revision,
            cache_dir=self.cache_dir,
            what="dataset",
            **self._hub_kwargs,
        )
        if not files:
            raise MissingFileError(
                f"No passages matching {pattern!r} in {self._repo!r} (`dataset`). A wiki_dpr mirror needs the "
                "parquet shards under data/psgs_w100/<variant>/ (see docs/retrieval.md)."
            )
        cache_dir = (
            None if self.cache_dir is None else os.path.join(os.fspath(self.cache_dir), "ragkit-datasets")
        )
        try:
            return Dataset.from_parquet(files, split="train", cache_dir=cache_dir)
        except Exception as err:
            bad = _damaged_parquet(files)
            if bad is None:
                raise
            raise CorruptFileError(
                f"The wiki_dpr passages file {bad!r} cannot be read: it is truncated or damaged ({err}). Delete it "
                "and download it again (force_download=True, or remove it from the Hub cache), or copy it "
                "again into your mirror."
            ) from err

    def _index_file(self) -> str:
        """Local path of the faiss index, downloading it when needed; '' when a dummy index must be built."""
        if self.index_path is not None:
            return os.fspath(self.index_path)
        names = dict(wiki=_WIKI_SPLIT, emb=self.embeddings_name, split=self.dataset_split)
        if not self.use_dummy_dataset:
            filename = "index/" + _INDEX_FILES[self.index_kind].format(**names)
            return _hub.resolve_file(
                self._repo,
                filename,
                revision=self.dataset_revision,
                cache_dir=self.cache_dir,
                what="index_name",
                **self._hub_kwargs,
            )
        if self.index_kind == "compressed":
            logger.warning("wiki_dpr has no compressed dummy index; using the dummy exact index instead.")
        offline_error = None
        for template in _DUMMY_INDEX_FILES:
            for filename in (template.format(**names), "index/" + template.format(**names)):
                try:
                    return _hub.resolve_file(
                        self._dummy_repo,
                        filename,
                        cache_dir=self.cache_dir,
                        what="index_name",
                        **self._hub_kwargs,
                    )
                except (_hub.OfflineFileError, _hub.HubUnreachableError) as err:
                    offline_error = err  # another candidate may be cached
                except FileNotFoundError:
                    continue
        if offline_error is not None:
            raise offline_error
        return ""

    def init_index(self) -> None:
        """Load the faiss index (downloading it once), or build an exact one for a dummy set without one."""
        if self.is_initialized():
            return
        if self._load_dataset is not None and self.index_path is None:
            self._init_from_load_dataset()
            return
        path = self._index_file()
        if path:
            logger.info("Loading index from %s", path)
            index = read_faiss_index(path, what="index_path" if self.index_path else "index_name")
        else:
            faiss = import_faiss()
            logger.info("No dummy index file for %s embeddings: building an exact one.", self.embeddings_name)
            index = faiss.IndexFlatIP(self.vector_size)
            index.add(self.passages.all_embeddings())
        self._set_faiss_index(index)
        self._index_initialized = True

    def _init_from_load_dataset(self) -> None:
        """Take the passages and their faiss index from the ``load_dataset`` callable, as the reference does."""
        logger.info("Loading index from %s with index name %s", self.dataset_name, self.index_name)
        dataset = self._load_dataset(
            self.dataset_name,
            with_embeddings=True,
            with_index=True,
            split=self.dataset_split,
            index_name=self.index_name,
            dummy=self.use_dummy_dataset,
            revision=self.dataset_revision,
        )
        self._set_dataset(dataset, with_index=True)
        self._set_faiss_index(_attached_faiss_index(dataset))
        self._index_initialized = True
