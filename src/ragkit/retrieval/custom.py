"""The user's own index over a ``datasets.Dataset`` of passages (title, text, embeddings) and a faiss index.

The shared search and fetch logic is :class:`~ragkit.retrieval.base.HFIndexBase`; :class:`CustomHFIndex` is
the user's own index (``index_name="custom"``), given in memory or as ``passages_path`` (``dataset.save_to_disk``)
plus ``index_path`` (``faiss.write_index`` / ``dataset.get_index("embeddings").save``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import CorruptFileError, MissingFileError, RagInputError, RagkitError
from .base import HFIndexBase, read_faiss_index
from .building import INDEX_FILENAME, PASSAGES_DIRNAME

logger = logging.getLogger(__name__)

__all__ = ["CustomHFIndex", "HFIndexBase", "load_passages_from_disk"]  # HFIndexBase: defined in base


def _corrupt_passages(path: str | os.PathLike, err: BaseException) -> CorruptFileError:
    """The error for a passages directory whose files cannot be read."""
    detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CorruptFileError(
        f"The passages at {os.fspath(path)!r} (`passages_path`) cannot be read: a file in it is truncated, "
        f"empty or damaged ({type(err).__name__}: {detail}). Rebuild them (`ragkit build-index`, or "
        "`dataset.save_to_disk(path)` again) or restore the directory from a good copy."
    )


def load_passages_from_disk(path: str | os.PathLike) -> Any:
    """``datasets.load_from_disk(path)`` with damaged files reported as :class:`CorruptFileError` naming ``path``.

    Args:
        path: Directory written by ``dataset.save_to_disk``.

    Returns:
        datasets.Dataset: memory-mapped passages (a ``DatasetDict`` when that is what was saved).

    Raises:
        MissingFileError: ``path`` holds no saved dataset.
        CorruptFileError: Its ``state.json``, ``dataset_info.json`` or Arrow files cannot be read.
    """
    import json

    import pyarrow as pa
    from datasets import load_from_disk

    path = os.fspath(path)
    try:
        dataset = load_from_disk(path)
    except FileNotFoundError as err:
        raise MissingFileError(
            f"`passages_path` {path!r} is not a dataset saved with `save_to_disk` ({err}). Save the passages "
            "with `dataset.save_to_disk(path)`."
        ) from err
    except (json.JSONDecodeError, pa.ArrowException, OSError, KeyError, TypeError, ValueError) as err:
        raise _corrupt_passages(path, err) from err
    return dataset


class CustomHFIndex(HFIndexBase):
    """The user's own passages and faiss index (``index_name="custom"``).

    Args:
        vector_size: Width of the embeddings.
        dataset: ``datasets.Dataset`` with ``title``, ``text``, ``embeddings`` (and a faiss index on
            ``embeddings`` when ``index_path`` is None).
        index_path: faiss index file to load in :meth:`init_index`.
        nprobe: faiss ``nprobe`` for IVF indexes.
        ef_search: faiss ``efSearch`` for HNSW indexes.
        source: Where the passages come from, for error messages.
    """

    def __init__(
        self,
        vector_size: int,
        dataset: Any,
        index_path: str | os.PathLike | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        source: str = "The dataset",
    ):
        super().__init__(
            vector_size,
            dataset,
            index_initialized=index_path is None,
            nprobe=nprobe,
            ef_search=ef_search,
            source=source,
        )
        self.index_path = None if index_path is None else os.fspath(index_path)

    @classmethod
    def load_from_disk(
        cls,
        vector_size: int,
        dataset_path: str | os.PathLike | None,
        index_path: str | os.PathLike | None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> CustomHFIndex:
        """Load passages saved with ``dataset.save_to_disk(dataset_path)`` (memory-mapped) and the index path.

        Args:
            vector_size: Width of the embeddings.
            dataset_path: Directory written by ``save_to_disk``.
            index_path: faiss index file.
            nprobe: faiss ``nprobe`` for IVF indexes.
            ef_search: faiss ``efSearch`` for HNSW indexes.

        Returns:
            CustomHFIndex: not yet initialized (the faiss file is read by :meth:`init_index`).
        """
        if dataset_path is None or index_path is None:
            raise RagInputError(
                "index_name='custom' needs `passages_path` (a directory written by `dataset.save_to_disk`) and "
                "`index_path` (a file written by `dataset.get_index('embeddings').save(path)`), or pass "
                "`indexed_dataset=` to RagRetriever.from_pretrained. `ragkit build-index` writes both."
            )
        if not os.path.isdir(dataset_path):
            raise MissingFileError(
                f"`passages_path` {os.fspath(dataset_path)!r} is not a directory. Give the directory written by "
                "`dataset.save_to_disk(passages_path)`."
            )
        built_passages = os.path.join(dataset_path, PASSAGES_DIRNAME)
        if os.path.isdir(built_passages) and not os.path.isfile(os.path.join(dataset_path, "state.json")):
            # The output directory of `ragkit build-index` given instead of the passages in it.
            raise MissingFileError(
                f"`passages_path` {os.fspath(dataset_path)!r} is not a saved dataset but holds one: give "
                f"passages_path={built_passages!r}."
            )
        if os.path.isdir(index_path):
            built_index = os.path.join(index_path, INDEX_FILENAME)
            fix = (
                f"give index_path={built_index!r}"
                if os.path.isfile(built_index)
                else "give the file written by `dataset.get_index('embeddings').save(index_path)` or "
                "`ragkit build-index`"
            )
            raise MissingFileError(
                f"`index_path` {os.fspath(index_path)!r} is a directory, not a faiss index file: {fix}."
            )
        if not os.path.isfile(index_path):
            raise MissingFileError(
                f"`index_path` {os.fspath(index_path)!r} does not exist. Give the file written by "
                "`dataset.get_index('embeddings').save(index_path)` or `ragkit build-index`."
            )
        logger.info("Loading passages from %s", dataset_path)
        dataset = load_passages_from_disk(dataset_path)
        if not hasattr(dataset, "list_indexes"):
            raise TypeError(
                f"`passages_path` {os.fspath(dataset_path)!r} holds a DatasetDict; save a single split "
                "(`dataset_dict['train'].save_to_disk(path)`)."
            )
        source = f"The passages at {os.fspath(dataset_path)!r} (`passages_path`)"
        try:
            return cls(
                vector_size=vector_size,
                dataset=dataset,
                index_path=index_path,
                nprobe=nprobe,
                ef_search=ef_search,
                source=source,
            )
        except CorruptFileError:
            raise
        except (OSError, ValueError, TypeError, IndexError) as err:
            if isinstance(err, RagkitError):
                raise
            raise _corrupt_passages(dataset_path, err) from err

    def init_index(self) -> None:
        """Read the faiss index from ``index_path`` (no-op when already initialized)."""
        if self.is_initialized():
            return
        logger.info("Loading index from %s", self.index_path)
        self._set_faiss_index(read_faiss_index(self.index_path))
        self._index_initialized = True
