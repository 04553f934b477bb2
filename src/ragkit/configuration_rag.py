"""RAG configuration: the question encoder and generator configs plus the retrieval settings.

The serialized form is the one of ``transformers.RagConfig`` (``model_type: "rag"``), so a
``config.json`` written here loads there and the reverse.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .errors import (
    HubUnreachableError,
    LocationNotFoundError,
    MissingFileError,
    OfflineFileError,
    RagInputError,
)
from .pooling import POOLING_MODES

logger = logging.getLogger(__name__)

__all__ = ["INDEX_NAMES", "RagConfig", "check_local_location"]

#: Index backends a :class:`~ragkit.RagRetriever` knows how to build from a config.
INDEX_NAMES = ("legacy", "exact", "compressed", "custom")
#: wiki_dpr's own config names (``psgs_w100.nq.exact``, ...) are accepted too, as its loading script did.
_WIKI_DPR_INDEX_NAME = re.compile(r"psgs_w100\.(nq|multiset)\.(exact|compressed)")
#: Embedding sets of wiki_dpr.
EMBEDDINGS_NAMES = ("nq", "multiset")
#: RAG fields by the type their value must have (beyond the fields with a fixed set of values).
_POSITIVE_INT_FIELDS = ("n_docs", "max_combined_length", "retrieval_vector_size", "retrieval_batch_size")
_OPTIONAL_POSITIVE_INT_FIELDS = ("index_nprobe", "index_ef_search")
_STRING_FIELDS = ("title_sep", "doc_sep", "dataset_split")
_OPTIONAL_STRING_FIELDS = ("dataset_revision",)
_PATH_FIELDS = ("dataset",)
_OPTIONAL_PATH_FIELDS = ("index_path", "passages_path")
_BOOL_FIELDS = (
    "use_dummy_dataset",
    "reduce_loss",
    "do_deduplication",
    "exclude_bos_score",
    "do_marginalize",
    "output_retrieved",
    "use_cache",
    "question_encoder_normalize",
)
CONFIG_NAME = "config.json"


#: What a Hub repository id can look like (``name`` or ``namespace/name``); anything else can only be a path.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def check_local_location(location: str | os.PathLike, what: str) -> None:
    """Raise ``LocationNotFoundError`` when ``location`` can only be a local path (not a Hub repo id) and does not
    exist, rather than letting huggingface_hub call it an invalid repo id."""
    path = os.fspath(location)
    if os.path.exists(path):
        return
    if isinstance(location, os.PathLike) or not _HUB_REPO_ID.fullmatch(path):
        raise LocationNotFoundError(
            f"{what} {path!r} does not exist: there is no such directory (and it cannot be a Hub repository id, "
            "which looks like 'name' or 'namespace/name'). Check the path."
        )


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(field: str, expected: str, value: Any) -> RagInputError:
    """The error for a RAG field whose value is of the wrong type or out of range."""
    return RagInputError(f"RagConfig: `{field}` must be {expected}, got {value!r} ({type(value).__name__}).")


def _sub_config(value: Any, field: str) -> PretrainedConfig:
    """Turn a sub-config given as a config object or a dict (with ``model_type``) into a config object."""
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise RagInputError(
                f"RagConfig: the `{field}` dict has no `model_type`; add one (for example 'dpr' or 'bart') "
                "so the right config class can be built."
            )
        return AutoConfig.for_model(model_type, **value)
    raise RagInputError(
        f"RagConfig: `{field}` must be a PretrainedConfig or a dict, got {type(value).__name__}. Build the "
        "config with RagConfig.from_question_encoder_generator_configs(question_encoder_config, generator_config)."
    )


def _part_role(model_type: str | None) -> str:
    """Which part of a RAG model a checkpoint of ``model_type`` can be: ``"generator"`` for seq2seq models,
    ``"question encoder"`` for encoders, ``"question encoder or generator"`` when unknown."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "generator"
    if model_type in ("dpr", "bert", "roberta", "distilbert", "electra", "xlm-roberta", "mpnet"):
        return "question encoder"
    return "question encoder or generator"


def _hub_error(repo_id: str, err: OSError, unreachable: str) -> OSError:
    """The ragkit error for a Hub checkpoint whose config could not be had, or ``err`` itself if it is another
    failure (a private repository, a missing file in the repository)."""
    from huggingface_hub import constants

    text = str(err)
    if constants.HF_HUB_OFFLINE:
        return OfflineFileError(
            f"{repo_id!r} is not in the local Hugging Face cache and downloads are disabled (HF_HUB_OFFLINE=1). "
            "Download it once with network access (unset HF_HUB_OFFLINE), or pass a local checkpoint directory."
        )
    if unreachable or "connect" in text.lower():
        return HubUnreachableError(
            f"{repo_id!r} could not be downloaded: the Hugging Face Hub cannot be reached (no network connection) "
            "and it is not in the local cache. Connect to the network once, set HF_HUB_OFFLINE=1 to use only "
            "cached files, or pass a local checkpoint directory."
        )
    return err


class RagConfig(PretrainedConfig):
    r"""Configuration of a :class:`~ragkit.RagModel` and its heads.

    Same fields and defaults as ``transformers.RagConfig``. Five fields are ragkit's own and are
    ignored by transformers when it reads the file: ``index_nprobe``, ``index_ef_search``, ``embeddings_name``,
    ``question_encoder_pooling`` and ``question_encoder_normalize``.

    Args:
        question_encoder (`PretrainedConfig | dict`): Config of the question encoder (DPR, BERT, ...).
        generator (`PretrainedConfig | dict`): Config of the generator (BART, T5, ...).
        title_sep (`str`, defaults to ``" / "``): Put between a retrieved document's title and text.
        doc_sep (`str`, defaults to ``" // "``): Put between a retrieved document's text and the question.
        n_docs (`int`, defaults to 5): Number of documents to retrieve.
        max_combined_length (`int`, defaults to 300): Max length of the contextualized generator input.
        retrieval_vector_size (`int`, defaults to 768): Width of the indexed document embeddings.
        retrieval_batch_size (`int`, defaults to 8): Number of queries sent to the index at once.
        dataset (`str`, defaults to ``"wiki_dpr"``): Indexed dataset: ``"wiki_dpr"`` (the Hub) or a local
            directory with the same layout.
        dataset_split (`str`, defaults to ``"train"``): Split of ``dataset`` to load.
        index_name (`str`, defaults to ``"compressed"``): One of ``"legacy"``, ``"exact"``, ``"compressed"``,
            ``"custom"``.
        index_path (`str`, optional): Path of the serialized faiss index.
        passages_path (`str`, optional): Path of the passages that go with the index.
        use_dummy_dataset (`bool`, defaults to `False`): Load the dummy variant (first 10,000 passages).
        reduce_loss (`bool`, defaults to `False`): Sum the NLL loss over the batch.
        label_smoothing (`float`, defaults to 0.0): Epsilon of label smoothing in the loss.
        do_deduplication (`bool`, defaults to `True`): Deduplicate RAG-Sequence hypotheses per question.
        exclude_bos_score (`bool`, defaults to `False`): Leave the BOS token out of the RAG-Sequence loss.
        do_marginalize (`bool`, defaults to `False`): Return logits marginalized over the documents.
        output_retrieved (`bool`, defaults to `False`): Return retrieved embeddings, ids and contexts.
        use_cache (`bool`, defaults to `True`): Return the decoder cache.
        forced_eos_token_id (`int`, optional): Token forced last when ``max_length`` is reached.
        dataset_revision (`str`, optional): Revision of the Hub dataset used for retrieval.
        index_nprobe (`int`, optional): faiss ``nprobe`` for IVF indexes (the compressed index).
        index_ef_search (`int`, optional): faiss ``efSearch`` for HNSW indexes (the exact index).
        embeddings_name (`str`, defaults to ``"nq"``): wiki_dpr embedding set, ``"nq"`` or ``"multiset"``.
        question_encoder_pooling (`str`, defaults to ``"pooler"``): How question vectors are read from the
            question encoder: ``"pooler"`` (its first output, as DPR), ``"cls"`` or ``"mean"`` (masked mean, as
            sentence encoders such as all-MiniLM-L6-v2).
        question_encoder_normalize (`bool`, defaults to `False`): L2-normalize question vectors.
    """

    model_type = "rag"
    # Sub-configs are mandatory, so the base class must not build a default instance to diff against.
    has_no_defaults_at_init = True
    # Declared so that from_pretrained's per-model options (attn_implementation, dtype) reach both parts.
    sub_configs_defaults = {
        "question_encoder": SubConfigSpec(config_class=AutoConfig, model_type="dpr"),
        "generator": SubConfigSpec(config_class=AutoConfig, model_type="bart"),
    }

    question_encoder: PretrainedConfig | dict | None = None
    generator: PretrainedConfig | dict | None = None
    vocab_size: int | None = None
    is_encoder_decoder: bool = True
    prefix: str | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None
    title_sep: str = " / "
    doc_sep: str = " // "
    n_docs: int = 5
    max_combined_length: int = 300
    retrieval_vector_size: int = 768
    retrieval_batch_size: int = 8
    dataset: str = "wiki_dpr"
    dataset_split: str = "train"
    index_name: str = "compressed"
    index_path: str | None = None
    passages_path: str | None = None
    use_dummy_dataset: bool = False
    reduce_loss: bool = False
    label_smoothing: float = 0.0
    do_deduplication: bool = True
    exclude_bos_score: bool = False
    do_marginalize: bool = False
    output_retrieved: bool = False
    use_cache: bool = True
    forced_eos_token_id: int | None = None
    dataset_revision: str | None = None
    index_nprobe: int | None = None
    index_ef_search: int | None = None
    embeddings_name: str = "nq"
    question_encoder_pooling: str = "pooler"
    question_encoder_normalize: bool = False

    def __post_init__(self, **kwargs):
        for field in ("question_encoder", "generator"):
            value = getattr(self, field)
            if value is None:
                raise RagInputError(
                    f"RagConfig needs a `{field}` config. Build one with "
                    "RagConfig.from_question_encoder_generator_configs(question_encoder_config, generator_config) "
                    "or load a RAG checkpoint with RagConfig.from_pretrained(path)."
                )
            setattr(self, field, _sub_config(value, field))
        super().__post_init__(**kwargs)
        self.validate_rag_fields()

    def validate_rag_fields(self) -> None:
        """Raise :class:`~ragkit.errors.RagInputError` naming the first RAG field whose value cannot work."""
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _field_error(name, "an integer >= 1", value)
        for name in _OPTIONAL_POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise _field_error(name, "None or an integer >= 1", value)
        for name in _STRING_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise _field_error(name, "a string", getattr(self, name))
        for name in _OPTIONAL_STRING_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise _field_error(name, "None or a string", value)
        for name in _PATH_FIELDS + _OPTIONAL_PATH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) and not (
                value is None and name in _OPTIONAL_PATH_FIELDS
            ):
                raise _field_error(name, "a string or path", value)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            # 0/1 are accepted as JSON files written by hand sometimes hold them.
            if not isinstance(value, bool) and not (_is_int(value) and value in (0, 1)):
                raise _field_error(name, "True or False", value)
        forced_eos = self.forced_eos_token_id
        if forced_eos is not None and not (
            _is_int(forced_eos) or (isinstance(forced_eos, (list, tuple)) and all(map(_is_int, forced_eos)))
        ):
            raise _field_error(
                "forced_eos_token_id", "None or a token id (an integer, or a list of them)", forced_eos
            )
        smoothing = self.label_smoothing
        if (
            not isinstance(smoothing, (int, float))
            or isinstance(smoothing, bool)
            or not 0.0 <= smoothing < 1.0
        ):
            raise _field_error("label_smoothing", "a number in [0, 1), such as 0.1", smoothing)
        if self.index_name not in INDEX_NAMES and not _WIKI_DPR_INDEX_NAME.fullmatch(str(self.index_name)):
            raise RagInputError(
                f"RagConfig: unknown `index_name` {self.index_name!r}; choose one of {', '.join(INDEX_NAMES)} "
                "(or a wiki_dpr config name such as 'psgs_w100.multiset.compressed')."
            )
        if self.embeddings_name not in EMBEDDINGS_NAMES:
            raise RagInputError(
                f"RagConfig: `embeddings_name` must be one of {EMBEDDINGS_NAMES}, got {self.embeddings_name!r}."
            )
        if self.question_encoder_pooling not in POOLING_MODES:
            raise RagInputError(
                f"RagConfig: `question_encoder_pooling` must be one of {POOLING_MODES}, "
                f"got {self.question_encoder_pooling!r}."
            )

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields ``config.json`` holds: those that differ from the defaults, and both parts in full.

        Returns:
            dict: as ``PretrainedConfig.to_diff_dict``, with ``question_encoder`` and ``generator`` complete
            (as Transformers' RagConfig and the facebook/rag-* checkpoints write them), so a checkpoint does not
            depend on the sub-config defaults of the library version that reads it.
        """
        diff = super().to_diff_dict()
        full = self.to_dict()
        for field in ("question_encoder", "generator"):
            if field in diff:
                diff[field] = full[field]
        return diff

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> RagConfig:
        """Load the config of a RAG checkpoint (Hub id or local directory), as ``PretrainedConfig.from_pretrained``.

        Raises:
            MissingFileError: A local directory without ``config.json`` (it is not a RAG checkpoint).
            LocationNotFoundError: A path that does not exist (and cannot be a Hub repository id).
        """
        check_local_location(pretrained_model_name_or_path, "The checkpoint")
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            folder = os.path.join(path, kwargs.get("subfolder") or "")
            if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
                raise MissingFileError(
                    f"{os.path.join(folder, CONFIG_NAME)} does not exist: the directory {folder} is not a RAG "
                    "checkpoint. A RAG checkpoint holds config.json (model_type 'rag', with the question_encoder "
                    "and generator configs), the weights (model.safetensors or pytorch_model.bin) and the "
                    "tokenizers in question_encoder_tokenizer/ and generator_tokenizer/. Save one with "
                    "model.save_pretrained(directory), or build a model from two checkpoints with "
                    "from_pretrained_question_encoder_generator()."
                )
        if os.path.isdir(path):
            return cls._from_rag_checkpoint(pretrained_model_name_or_path, **kwargs)
        from .retrieval._hub import _hub_offline, _unreachable_reason

        unreachable = "" if _hub_offline() else _unreachable_reason()
        if unreachable:
            # One quick probe instead of five retries per file: only the local cache can answer.
            kwargs = {**kwargs, "local_files_only": True}
        try:
            return cls._from_rag_checkpoint(pretrained_model_name_or_path, **kwargs)
        except OSError as err:
            raise _hub_error(path, err, unreachable) from err

    @classmethod
    def _from_rag_checkpoint(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> RagConfig:
        """``PretrainedConfig.from_pretrained``, refusing a checkpoint of another model type (a bare BART or
        DPR model) with a :class:`~ragkit.errors.RagInputError` that names it and what to load instead."""
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type and not (
            config_dict.get("question_encoder") and config_dict.get("generator")
        ):
            path = os.fspath(pretrained_model_name_or_path)
            raise RagInputError(
                f"{path} is not a RAG checkpoint: its config.json has model_type {model_type!r}, not 'rag' (a RAG "
                "config holds a `question_encoder` and a `generator` config). To build a RAG model from a "
                "separate question encoder and generator, use "
                "RagTokenForGeneration.from_pretrained_question_encoder_generator(question_encoder_path, "
                f"generator_path) (or RagSequenceForGeneration's, RagModel's), with {path} as the "
                f"{_part_role(model_type)}; to load a RAG model, point at a directory or Hub id saved with "
                "save_pretrained from a RAG model (such as facebook/rag-token-nq)."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_question_encoder_generator_configs(
        cls, question_encoder_config: PretrainedConfig, generator_config: PretrainedConfig, **kwargs
    ) -> RagConfig:
        """Build a RAG config from a question encoder config and a generator config.

        Args:
            question_encoder_config: Config of the question encoder (for example a ``DPRConfig``).
            generator_config: Config of the generator (for example a ``BartConfig`` or ``T5Config``).
            **kwargs: RAG fields (``n_docs``, ``index_name``, ...).

        Returns:
            RagConfig: the combined configuration.
        """
        return cls(
            question_encoder=question_encoder_config.to_dict(), generator=generator_config.to_dict(), **kwargs
        )
