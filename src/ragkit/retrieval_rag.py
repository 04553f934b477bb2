"""RagRetriever: find passages for question vectors and build the generator's contextualized inputs.

Same constructor, methods, attributes and outputs as ``transformers.RagRetriever``; the index backends
live in :mod:`ragkit.retrieval`. Differences, all on the safe side: passages and embeddings are
fetched in bulk; question vectors may be torch tensors on any device or in half precision; the
canonical wiki_dpr index loads without dataset scripts; legacy pickles need an explicit opt-in (or a
one-off conversion); slots faiss cannot fill come back as id -1 with an empty passage and a zero
embedding instead of a repeated passage. The canonical index goes through this module's ``load_dataset``
only when it has been replaced (``patch("ragkit.retrieval_rag.load_dataset")``, as tests written for
Transformers do); otherwise it reads wiki_dpr's parquet and faiss files itself. Search may run on a GPU (``search_device="cuda"``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from datasets import load_dataset
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ._io import atomic_directory, atomic_file, read_json_object
from .configuration_rag import RagConfig
from .errors import RagInputError
from .retrieval.base import Index, as_query_matrix, check_query_shape
from .retrieval.canonical import CanonicalHFIndex
from .retrieval.custom import CustomHFIndex
from .retrieval.legacy import LEGACY_INDEX_PATH, LegacyIndex
from .tokenization_rag import RagTokenizer

logger = logging.getLogger(__name__)

__all__ = ["RagRetriever"]

#: Names ``save_pretrained`` gives a custom index's files inside the retriever directory.
SAVED_INDEX_NAME = "hf_dataset_index.faiss"
SAVED_PASSAGES_NAME = "hf_dataset"
_SAVED_NAMES = {"index_path": SAVED_INDEX_NAME, "passages_path": SAVED_PASSAGES_NAME}
#: Config key (written by ragkit only) naming the files ``save_pretrained`` wrote next to the config,
#: relative to its directory. ``index_path``/``passages_path`` keep absolute paths so that transformers
#: loads the directory too; ragkit prefers these names, so a moved directory never reads files that
#: were later written at its old location.
SAVED_FILES_KEY = "saved_index_files"
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
#: ``datasets.load_dataset`` as imported: the canonical index reads wiki_dpr's files itself unless the
#: module's ``load_dataset`` has been replaced (``patch("ragkit.retrieval_rag.load_dataset")``, as tests
#: written for transformers do), in which case the replacement provides the passages and the index.
_DATASETS_LOAD_DATASET = load_dataset


def _replaced_load_dataset() -> Any:
    """This module's ``load_dataset`` when something replaced it, else None (read the files directly)."""
    return None if load_dataset is _DATASETS_LOAD_DATASET else load_dataset


def _relocated(path: str | None, directory: str | os.PathLike, name: str) -> str | None:
    """``path`` if it exists, else the file of the same name next to the config (a saved retriever that was moved).

    ``name`` is looked for when ``path`` is None.
    """
    if path is not None and os.path.exists(path):
        return path
    if not os.path.isdir(directory):
        return path
    candidate = os.path.abspath(
        os.path.join(directory, name if path is None else os.path.basename(os.path.normpath(path)))
    )
    if os.path.exists(candidate):
        if path is not None:
            logger.info("%s not found; using %s saved next to the retriever.", path, candidate)
        return candidate
    return path


def _is_within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (symlinks resolved)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _same_file(path: str | None, other: str) -> bool:
    """Whether ``path`` and ``other`` both exist and are the same file or directory."""
    return (
        path is not None and os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other)
    )


def _paths_changed_from_saved(config: RagConfig, directory: str) -> set[str]:
    """The custom index fields of a caller's ``config`` whose values differ from ``directory``'s config.json.

    A config passed to ``from_pretrained`` with ``index_path``/``passages_path`` set to other files says
    which files to use, as transformers takes them; unchanged fields may still follow the saved files.
    Without a readable config.json to compare with, every field counts as chosen by the caller.
    """
    stored = read_json_object(os.path.join(directory, "config.json"))
    if stored is None:
        return set(_SAVED_NAMES)
    return {field for field in _SAVED_NAMES if getattr(config, field, None) != stored.get(field)}


def _resolve_custom_paths(
    config: RagConfig, directory: str, saved_files: Any, overridden: Iterable[str]
) -> dict[str, str]:
    """Point ``config``'s custom index paths at the files of the retriever saved in ``directory``.

    A field given as a keyword argument (``overridden``) is left alone. Files ``saved_files`` (the
    ``saved_index_files`` key) names next to the config win; otherwise a stored path that does not exist
    falls back to the file of the same name next to the config (directories saved by transformers).

    Returns:
        The fields whose files belong to ``directory``, with their paths: ``save_pretrained`` writes
        these into every directory it saves to.
    """
    local = os.path.isdir(directory)
    saved_files = saved_files if isinstance(saved_files, dict) else {}
    owned = {}
    for field, default_name in _SAVED_NAMES.items():
        path = getattr(config, field)
        if field not in overridden:
            name = saved_files.get(field)
            candidate = os.path.abspath(os.path.join(directory, name)) if local and name else None
            if candidate is not None and os.path.exists(candidate):
                if path is not None and os.path.abspath(path) != candidate:
                    logger.info("Using %s saved with the retriever (the config names %s).", candidate, path)
                path = candidate
            else:
                path = _relocated(path, directory, default_name)
            setattr(config, field, path)
        if local and path is not None and os.path.exists(path) and _is_within(path, directory):
            path = os.path.abspath(path)
            setattr(config, field, path)
            owned[field] = path
    return owned


def _as_id_lists(question_input_ids: Any) -> list[list[int]]:
    """Question token ids (list, numpy or torch on any device) as a list of lists of ints."""
    if hasattr(question_input_ids, "tolist"):
        question_input_ids = question_input_ids.tolist()
    question_input_ids = list(question_input_ids)
    if question_input_ids and isinstance(question_input_ids[0], (int, np.integer)):
        question_input_ids = [question_input_ids]
    return question_input_ids


def _check_same_rows(n_questions: int, question_hidden_states: Any) -> None:
    """Raise ``RagInputError`` unless there is one question vector per row of question token ids."""
    shape = getattr(question_hidden_states, "shape", None)
    if shape is not None:
        # A single vector or a 3-D array: its first axis is not the batch, so name the shape, not the rows.
        check_query_shape(tuple(shape))
    n_vectors = shape[0] if shape is not None and len(shape) else None
    if n_vectors is None and isinstance(question_hidden_states, (list, tuple)):
        n_vectors = len(question_hidden_states)
    if n_vectors is not None and n_vectors != n_questions:
        raise RagInputError(
            f"`question_input_ids` has {n_questions} row(s) but `question_hidden_states` has {n_vectors}: pass "
            "one question vector per question (the question encoder's output for these same input ids)."
        )


class RagRetriever:
    """Retrieve passages for question vectors and format them for a RAG generator.

    Args:
        config (`RagConfig`): Says which index to build (``index_name``, ``dataset``, ``index_path``,
            ``passages_path``, ``use_dummy_dataset``, ``index_nprobe``, ``index_ef_search``, ...) and how to
            format contexts (``title_sep``, ``doc_sep``, ``max_combined_length``).
        question_encoder_tokenizer: Tokenizer of the question encoder, used to decode the questions.
        generator_tokenizer: Tokenizer of the generator, used to encode the contexts.
        index (`Index`, optional): Use this index instead of building the one the config names.
        init_retrieval (`bool`, defaults to `True`): Load the index now.
        allow_pickle (`bool`, defaults to `False`): Trust and unpickle DPR's legacy files
            (``index_name="legacy"``); ``TRUST_REMOTE_CODE=True`` in the environment does the same.

    Examples:

    ```python
    >>> from ragkit import RagRetriever
    >>> retriever = RagRetriever.from_pretrained("facebook/rag-sequence-nq", index_name="exact",
    ...                                          use_dummy_dataset=True)
    >>> retriever = RagRetriever.from_pretrained("facebook/rag-sequence-nq", index_name="custom",
    ...                                          passages_path="my_index/passages",
    ...                                          index_path="my_index/index.faiss")
    ```
    """

    def __init__(
        self,
        config: RagConfig,
        question_encoder_tokenizer: PreTrainedTokenizerBase,
        generator_tokenizer: PreTrainedTokenizerBase,
        index: Index | None = None,
        init_retrieval: bool = True,
        allow_pickle: bool = False,
    ):
        self._init_retrieval = init_retrieval
        # Custom index files that belong to the directory this retriever was loaded from (field -> path as
        # in the config): save_pretrained writes them again into each new directory.
        self._owned_files: dict[str, str] = {}
        self.index = index or self._build_index(config, allow_pickle=allow_pickle)
        self.generator_tokenizer = generator_tokenizer
        self.question_encoder_tokenizer = question_encoder_tokenizer
        self.n_docs = config.n_docs
        self.batch_size = config.retrieval_batch_size
        self.config = config
        if self._init_retrieval:
            self.init_retrieval()
        self.ctx_encoder_tokenizer: PreTrainedTokenizerBase | None = None
        self.return_tokenized_docs = False

    @staticmethod
    def _build_index(
        config: RagConfig,
        allow_pickle: bool = False,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> Index:
        """The index ``config`` names (not yet initialized)."""
        nprobe = getattr(config, "index_nprobe", None)
        ef_search = getattr(config, "index_ef_search", None)
        if config.index_name == "legacy":
            return LegacyIndex(
                config.retrieval_vector_size,
                config.index_path or LEGACY_INDEX_PATH,
                allow_pickle=allow_pickle,
                ef_search=ef_search,
                revision=config.dataset_revision,
                cache_dir=cache_dir,
                token=token,
            )
        if config.index_name == "custom":
            return CustomHFIndex.load_from_disk(
                vector_size=config.retrieval_vector_size,
                dataset_path=config.passages_path,
                index_path=config.index_path,
                nprobe=nprobe,
                ef_search=ef_search,
            )
        return CanonicalHFIndex(
            vector_size=config.retrieval_vector_size,
            dataset_name=config.dataset,
            dataset_split=config.dataset_split,
            index_name=config.index_name,
            index_path=config.index_path,
            use_dummy_dataset=config.use_dummy_dataset,
            dataset_revision=config.dataset_revision,
            embeddings_name=getattr(config, "embeddings_name", None) or "nq",
            nprobe=nprobe,
            ef_search=ef_search,
            cache_dir=cache_dir,
            token=token,
            load_dataset=_replaced_load_dataset(),
        )

    @classmethod
    def from_pretrained(
        cls, retriever_name_or_path: str | os.PathLike, indexed_dataset: Any = None, **kwargs: Any
    ) -> RagRetriever:
        """Load the config and tokenizers of a RAG checkpoint and build its index.

        Args:
            retriever_name_or_path: Hub id or local directory of a RAG checkpoint or saved retriever.
            indexed_dataset (`datasets.Dataset`, optional): Passages (title, text, embeddings) with a faiss
                index on ``embeddings``; sets ``index_name="custom"``.
            **kwargs: Config overrides (``index_name``, ``passages_path``, ``index_path``,
                ``use_dummy_dataset``, ``dataset``, ``n_docs``, ``index_nprobe``, ``index_ef_search``, ...),
                ``config`` (a ready :class:`RagConfig`; its ``passages_path``/``index_path``, when they differ
                from the directory's config.json, are used as given), ``allow_pickle`` (legacy files),
                ``embeddings_name`` (``"nq"`` or ``"multiset"`` for wiki_dpr), ``init_retrieval``,
                ``search_device`` (``"cuda"``: search on the GPU, see :meth:`to_search_device`; not saved
                with the retriever) and Hub options (``revision``, ``cache_dir``, ``token``, ...).

        Returns:
            RagRetriever
        """
        allow_pickle = kwargs.pop("allow_pickle", False)
        search_device = kwargs.pop("search_device", None)
        embeddings_name = kwargs.pop("embeddings_name", None)
        init_retrieval = kwargs.pop("init_retrieval", True)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.pop("config", None)
        # Fields the caller chose: keyword overrides, and paths a given config sets to other files.
        overridden = set(kwargs)
        if config is None:
            config = RagConfig.from_pretrained(retriever_name_or_path, **kwargs)
            config.validate_rag_fields()  # overrides are set after the constructor's checks
        else:
            overridden |= _paths_changed_from_saved(config, os.fspath(retriever_name_or_path))
        # Only meaningful next to the config.json it was saved in: not kept on the loaded config.
        saved_files = getattr(config, SAVED_FILES_KEY, None)
        if hasattr(config, SAVED_FILES_KEY):
            delattr(config, SAVED_FILES_KEY)
        if embeddings_name is not None:
            config.embeddings_name = embeddings_name
        rag_tokenizer = RagTokenizer.from_pretrained(retriever_name_or_path, config=config, **hub_kwargs)
        owned_files: dict[str, str] = {}
        if indexed_dataset is not None:
            config.index_name = "custom"
            # The given dataset is the index now: paths loaded with the config name other files.
            config.index_path = config.passages_path = None
            index = CustomHFIndex(
                config.retrieval_vector_size,
                indexed_dataset,
                nprobe=getattr(config, "index_nprobe", None),
                ef_search=getattr(config, "index_ef_search", None),
            )
        else:
            if config.index_name == "custom":
                owned_files = _resolve_custom_paths(
                    config, os.fspath(retriever_name_or_path), saved_files, overridden=overridden
                )
            index = cls._build_index(
                config,
                allow_pickle=allow_pickle,
                cache_dir=hub_kwargs.get("cache_dir"),
                token=hub_kwargs.get("token"),
            )
        retriever = cls(
            config,
            question_encoder_tokenizer=rag_tokenizer.question_encoder,
            generator_tokenizer=rag_tokenizer.generator,
            index=index,
            init_retrieval=init_retrieval,
        )
        retriever._owned_files = owned_files
        if search_device is not None:
            retriever.to_search_device(search_device)
        return retriever

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the config and tokenizers, plus the passages and faiss index of a custom index it holds.

        A custom index given in memory (its config path None), or loaded from the files of a saved
        retriever directory, is written to ``save_directory/hf_dataset`` and
        ``save_directory/hf_dataset_index.faiss`` (each atomically): the directory is self-contained, and
        stays loadable once the directory it was loaded from is deleted or after it is moved. The config
        written there records their absolute paths (as transformers does, which can load it while it is not
        moved) and their names relative to the directory (``saved_index_files``, which ragkit prefers).
        Passages and index files the user gave elsewhere (``passages_path``/``index_path``) are referenced,
        not copied. ``self.config`` is not modified. Every file is written under a temporary name and
        renamed into place (the tokenizers folder by folder), so an interrupted save never leaves a
        truncated file.

        Args:
            save_directory: Directory to write to (created if needed).

        Raises:
            RagInputError: ``save_directory`` is an existing file (left untouched), as transformers refuses it.
        """
        if os.path.isfile(save_directory):
            raise RagInputError(
                f"`save_directory` {os.fspath(save_directory)!r} is an existing file, not a directory; it is left "
                "untouched. Give a directory path to save the retriever to."
            )
        os.makedirs(save_directory, exist_ok=True)
        config = copy.deepcopy(self.config)
        if hasattr(config, SAVED_FILES_KEY):
            delattr(config, SAVED_FILES_KEY)
        if isinstance(self.index, CustomHFIndex):
            written = {}
            # Both are complete before either replaces its previous version: an interrupted save leaves the
            # previous pair, not a new index beside old passages of the same size (silently mismatched).
            with contextlib.ExitStack() as commit:
                if self._owns_file("index_path"):
                    config.index_path = self._write_faiss_index(save_directory, commit)
                    written["index_path"] = SAVED_INDEX_NAME
                if self._owns_file("passages_path"):
                    config.passages_path = self._write_passages(save_directory, commit)
                    written["passages_path"] = SAVED_PASSAGES_NAME
            if written:
                setattr(config, SAVED_FILES_KEY, written)
        # config.json as save_pretrained writes it (with its checks), renamed into place: never a truncated file.
        with (
            tempfile.TemporaryDirectory() as staging,
            atomic_file(os.path.join(save_directory, "config.json")) as tmp,
        ):
            config.save_pretrained(staging)
            shutil.copyfile(os.path.join(staging, "config.json"), tmp)
        RagTokenizer(
            question_encoder=self.question_encoder_tokenizer, generator=self.generator_tokenizer
        ).save_pretrained(save_directory)

    def _owns_file(self, field: str) -> bool:
        """Whether the custom index's file ``field`` is the retriever's to save (in memory or its own)."""
        path = getattr(self.config, field)
        return path is None or path == self._owned_files.get(field)

    def _write_faiss_index(self, save_directory: str | os.PathLike, commit: contextlib.ExitStack) -> str:
        """Write the faiss index to ``save_directory`` (unless it is that file already); its absolute path.

        The file is written under a temporary name, renamed into place when ``commit`` closes.
        """
        target = os.path.abspath(os.path.join(save_directory, SAVED_INDEX_NAME))
        source = self.index.index_path
        if _same_file(source, target):
            return target
        copy_source = not self.index.is_initialized() and source is not None and os.path.isfile(source)
        if not copy_source:
            self.index.init_index()  # no-op when loaded; else raises, naming the missing file
        tmp = commit.enter_context(atomic_file(target))
        if copy_source:
            shutil.copyfile(source, tmp)  # not loaded yet: copy the file it would load
        else:
            import faiss

            faiss.write_index(self.index.faiss_index, os.fspath(tmp))
        return target

    def _write_passages(self, save_directory: str | os.PathLike, commit: contextlib.ExitStack) -> str:
        """Write the passages to ``save_directory`` (unless they were loaded from there); their absolute path.

        The directory is written under a temporary name, renamed into place when ``commit`` closes.
        """
        target = os.path.abspath(os.path.join(save_directory, SAVED_PASSAGES_NAME))
        source = self.config.passages_path
        if _same_file(source, target):
            return target
        dataset = self.index.dataset
        # datasets refuses to save a dataset with an index attached: detach it for the write.
        attached = dict(dataset._indexes)
        dataset._indexes.clear()
        try:
            tmp = commit.enter_context(atomic_directory(target))
            dataset.save_to_disk(os.fspath(tmp))
        finally:
            dataset._indexes.update(attached)
        return target

    def init_retrieval(self) -> None:
        """Load the index into memory."""
        logger.info("initializing retrieval")
        self.index.init_index()

    @property
    def search_device(self) -> Any:
        """The ``torch.device`` the index is searched on: ``cpu`` (faiss) unless :meth:`to_search_device` moved it."""
        device = getattr(self.index, "search_device", None)
        if device is None:  # an index object without ragkit's Index base class
            import torch

            device = torch.device("cpu")
        return device

    def to_search_device(self, device: Any) -> RagRetriever:
        """Search the index on ``device`` from now on; ``"cpu"`` goes back to faiss on the CPU.

        On a CUDA device, with faiss built with GPU support, the faiss index is copied there
        (``faiss.index_cpu_to_gpu``; flat and IVF indexes, ``index_nprobe`` kept). Without it, an exact
        index (``IndexFlatIP``, ``IndexFlatL2``, ``IndexFlat``, also in an ``IndexIDMap``) is searched there
        with PyTorch: its vectors are copied once to the device in float32 (``ntotal * dim * 4`` bytes) and
        scored with a matmul + top-k, giving faiss's ids and distances (documents with equal scores may come
        back in another order), and question vectors already on that device are searched in place.
        ``retrieve`` and ``__call__`` return the same types as on the CPU. The setting is not saved by
        :meth:`save_pretrained`. Before :meth:`init_retrieval` the move happens when the index loads.

        Args:
            device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or a ``torch.device``.

        Returns:
            RagRetriever: ``self``.

        Raises:
            AcceleratorUnavailableError: A CUDA device was asked for and PyTorch sees none.
            ValueError: faiss has no GPU support and the index is not exact (the message names the index
                type and the fixes), or the index backend searches on the CPU only (legacy).
        """
        if not hasattr(self.index, "to_search_device"):
            raise RagInputError(
                f"The index {type(self.index).__name__} cannot change its search device: derive it from "
                "ragkit.retrieval.Index (and implement to_search_device) or keep searching on the CPU."
            )
        self.index.to_search_device(device)
        return self

    def postprocess_docs(
        self,
        docs: list[dict],
        input_strings: list[str],
        prefix: str | None,
        n_docs: int,
        return_tensors: str | None = None,
    ) -> tuple[Any, Any]:
        """Join each retrieved passage with its question and tokenize for the generator.

        Each context is ``prefix + title + title_sep + text + doc_sep + question`` with one pair of
        surrounding double quotes stripped from the title and double spaces collapsed, padded and
        truncated to ``config.max_combined_length``, exactly as the reference builds it.

        Args:
            docs: One ``{"title": [...], "text": [...]}`` per question.
            input_strings: The decoded questions.
            prefix: Put before every context (T5 task prefixes); None for none.
            n_docs: Passages per question.
            return_tensors: ``"pt"``, ``"np"`` or None for lists.

        Returns:
            tuple: ``input_ids`` and ``attention_mask`` of shape `(batch_size * n_docs, max_combined_length)`.
        """
        prefix = "" if prefix is None else prefix
        title_sep, doc_sep = self.config.title_sep, self.config.doc_sep
        rag_input_strings = [
            (
                prefix
                + docs[i]["title"][j].removeprefix('"').removesuffix('"')
                + title_sep
                + docs[i]["text"][j]
                + doc_sep
                + input_strings[i]
            ).replace("  ", " ")
            for i in range(len(docs))
            for j in range(n_docs)
        ]
        contextualized_inputs = self.generator_tokenizer(
            rag_input_strings,
            max_length=self.config.max_combined_length,
            return_tensors=return_tensors,
            padding="max_length",
            truncation=True,
        )
        return contextualized_inputs["input_ids"], contextualized_inputs["attention_mask"]

    def _chunk_tensor(self, t: Iterable, chunk_size: int) -> list[Iterable]:
        """Split ``t`` into consecutive pieces of ``chunk_size`` rows."""
        return [t[i : i + chunk_size] for i in range(0, len(t), chunk_size)]

    def _main_retrieve(
        self, question_hidden_states: np.ndarray, n_docs: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search in chunks of ``retrieval_batch_size`` queries; `(batch_size, n_docs)` ids and embeddings."""
        if len(question_hidden_states) <= self.batch_size:
            ids, vectors = self.index.get_top_docs(question_hidden_states, n_docs)
            return np.asarray(ids, dtype=np.int64), np.asarray(vectors, dtype=np.float32)
        ids_batched, vectors_batched = [], []
        for chunk in self._chunk_tensor(question_hidden_states, self.batch_size):
            start_time = time.perf_counter()
            ids, vectors = self.index.get_top_docs(chunk, n_docs)
            logger.debug(
                "index search time: %.4f s, batch size %d", time.perf_counter() - start_time, len(chunk)
            )
            ids_batched.append(np.asarray(ids, dtype=np.int64))
            vectors_batched.append(np.asarray(vectors, dtype=np.float32))
        return np.concatenate(ids_batched), np.concatenate(vectors_batched)

    def retrieve(self, question_hidden_states: Any, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Retrieve passages for a batch of question vectors.

        Args:
            question_hidden_states: `(batch_size, vector_size)` numpy array or torch tensor (any device,
                any float dtype). With the exact search on a GPU (:meth:`to_search_device`), a tensor is
                searched without a copy to the host.
            n_docs: Passages per question.

        Returns:
            tuple: ``retrieved_doc_embeds`` `(batch_size, n_docs, vector_size)` float32, ``doc_ids``
            `(batch_size, n_docs)` int64 (-1 where the index had fewer hits) and ``doc_dicts``, one dict per
            question mapping each column of the passages (``title``, ``text``, ``id``, ...) to its ``n_docs``
            values and ``embeddings`` to an `(n_docs, vector_size)` float32 array, as Transformers returns them.
            With no question (batch_size 0) the arrays are empty, of those shapes, and ``doc_dicts`` is ``[]``.

        Raises:
            RagInputError: The vectors are not `(batch_size, vector_size)`, or hold NaN or infinity.
        """
        queries = question_hidden_states
        on_host = self.search_device.type == "cpu"
        if on_host or not hasattr(queries, "detach") or queries.ndim != 2:  # torch tensors stay as they are
            queries = as_query_matrix(queries)
        doc_ids, retrieved_doc_embeds = self._main_retrieve(queries, n_docs)
        return retrieved_doc_embeds, doc_ids, self.index.get_doc_dicts(doc_ids)

    @classmethod
    def _from_retriever(cls, retriever: RagRetriever, **kwargs: Any) -> RagRetriever:
        """The distributed retrievers' ``from_retriever``: a ``cls`` over ``retriever``'s parts and index."""
        wrapped = cls(
            retriever.config,
            retriever.question_encoder_tokenizer,
            retriever.generator_tokenizer,
            index=retriever.index,
            **kwargs,
        )
        wrapped._owned_files = dict(retriever._owned_files)
        if retriever.return_tokenized_docs:
            wrapped.set_ctx_encoder_tokenizer(retriever.ctx_encoder_tokenizer)
        return wrapped

    def set_ctx_encoder_tokenizer(self, ctx_encoder_tokenizer: PreTrainedTokenizerBase) -> None:
        """Also return the retrieved passages tokenized for a context encoder (end-to-end retriever training)."""
        self.ctx_encoder_tokenizer = ctx_encoder_tokenizer
        self.return_tokenized_docs = True

    def __call__(
        self,
        question_input_ids: Any,
        question_hidden_states: Any,
        prefix: str | None = None,
        n_docs: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Retrieve passages and build the generator inputs.

        Args:
            question_input_ids: `(batch_size, seq_len)` question token ids (list, numpy or torch).
            question_hidden_states: `(batch_size, vector_size)` question vectors (numpy or torch).
            prefix: Put before every context; defaults to ``config.generator.prefix``.
            n_docs: Passages per question; defaults to ``config.n_docs``.
            return_tensors: ``"pt"``, ``"np"`` or None.

        Returns:
            BatchEncoding: ``context_input_ids`` and ``context_attention_mask`` `(batch_size * n_docs,
            max_combined_length)`, ``retrieved_doc_embeds`` `(batch_size, n_docs, dim)`, ``doc_ids``
            `(batch_size, n_docs)`, and ``tokenized_doc_ids`` / ``tokenized_doc_attention_mask`` after
            :meth:`set_ctx_encoder_tokenizer`.

        Raises:
            RagInputError: ``question_input_ids`` is empty, or it and ``question_hidden_states`` have different
                numbers of rows, or the vectors are malformed or not finite.
        """
        n_docs = n_docs if n_docs is not None else self.n_docs
        prefix = prefix if prefix is not None else getattr(self.config.generator, "prefix", None)
        id_lists = _as_id_lists(question_input_ids)
        if not id_lists:
            # The generator's tokenizer cannot encode an empty batch; the models refuse one as well.
            raise RagInputError(
                "`question_input_ids` holds no question (batch size 0): pass at least one question, or skip the "
                "call for an empty batch (`retrieve` accepts one and returns empty arrays)."
            )
        _check_same_rows(len(id_lists), question_hidden_states)
        retrieved_doc_embeds, doc_ids, docs = self.retrieve(question_hidden_states, n_docs)
        input_strings = self.question_encoder_tokenizer.decode(id_lists, skip_special_tokens=True)
        context_input_ids, context_attention_mask = self.postprocess_docs(
            docs, input_strings, prefix, n_docs, return_tensors=return_tensors
        )
        outputs = {
            "context_input_ids": context_input_ids,
            "context_attention_mask": context_attention_mask,
            "retrieved_doc_embeds": retrieved_doc_embeds,
            "doc_ids": doc_ids,
        }
        if self.return_tokenized_docs:
            titles = [title for doc in docs for title in doc["title"][:n_docs]]
            texts = [text for doc in docs for text in doc["text"][:n_docs]]
            tokenized_docs = self.ctx_encoder_tokenizer(
                titles, texts, truncation=True, padding="longest", return_tensors=return_tensors
            )
            outputs["tokenized_doc_ids"] = tokenized_docs["input_ids"]
            outputs["tokenized_doc_attention_mask"] = tokenized_docs["attention_mask"]
        return BatchEncoding(outputs, tensor_type=return_tensors)
