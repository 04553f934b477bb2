"""RAG configuration: the question encoder and generator configs plus the retrieval settings.

The serialized form is the one of ``transformers.RagConfig`` (``model_type: "rag"``), so a
``config.json`` written here loads there and the reverse.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .pooling import POOLING_MODES

logger = logging.getLogger(__name__)

__all__ = ["INDEX_NAMES", "RagConfig"]

#: Index backends a :class:`~ragkit.RagRetriever` knows how to build from a config.
INDEX_NAMES = ("legacy", "exact", "compressed", "custom")
#: wiki_dpr's own config names (``psgs_w100.nq.exact``, ...) are accepted too, as its loading script did.
_WIKI_DPR_INDEX_NAME = re.compile(r"psgs_w100\.(nq|multiset)\.(exact|compressed)")
#: Embedding sets of wiki_dpr.
EMBEDDINGS_NAMES = ("nq", "multiset")


def _sub_config(value: Any, field: str) -> PretrainedConfig:
    """Turn a sub-config given as a config object or a dict (with ``model_type``) into a config object."""
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                f"RagConfig: the `{field}` dict has no `model_type`; add one (for example 'dpr' or 'bart') "
                "so the right config class can be built."
            )
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(
        f"RagConfig: `{field}` must be a PretrainedConfig or a dict, got {type(value).__name__}. Build the "
        "config with RagConfig.from_question_encoder_generator_configs(question_encoder_config, generator_config)."
    )


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
                raise ValueError(
                    f"RagConfig needs a `{field}` config. Build one with "
                    "RagConfig.from_question_encoder_generator_configs(question_encoder_config, generator_config) "
                    "or load a RAG checkpoint with RagConfig.from_pretrained(path)."
                )
            setattr(self, field, _sub_config(value, field))
        super().__post_init__(**kwargs)
        self.validate_rag_fields()

    def validate_rag_fields(self) -> None:
        """Raise ``ValueError`` naming the first RAG field whose value cannot work."""
        if not isinstance(self.n_docs, int) or self.n_docs < 1:
            raise ValueError(f"RagConfig: `n_docs` must be an integer >= 1, got {self.n_docs!r}.")
        if self.index_name not in INDEX_NAMES and not _WIKI_DPR_INDEX_NAME.fullmatch(str(self.index_name)):
            raise ValueError(
                f"RagConfig: unknown `index_name` {self.index_name!r}; choose one of {', '.join(INDEX_NAMES)} "
                "(or a wiki_dpr config name such as 'psgs_w100.multiset.compressed')."
            )
        if not isinstance(self.max_combined_length, int) or self.max_combined_length < 1:
            raise ValueError(
                f"RagConfig: `max_combined_length` must be an integer >= 1, got {self.max_combined_length!r}."
            )
        if not isinstance(self.retrieval_vector_size, int) or self.retrieval_vector_size < 1:
            raise ValueError(
                f"RagConfig: `retrieval_vector_size` must be an integer >= 1, got {self.retrieval_vector_size!r}."
            )
        if not isinstance(self.retrieval_batch_size, int) or self.retrieval_batch_size < 1:
            raise ValueError(
                f"RagConfig: `retrieval_batch_size` must be an integer >= 1, got {self.retrieval_batch_size!r}."
            )
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"RagConfig: `label_smoothing` must be in [0, 1), got {self.label_smoothing!r}.")
        if self.embeddings_name not in EMBEDDINGS_NAMES:
            raise ValueError(
                f"RagConfig: `embeddings_name` must be one of {EMBEDDINGS_NAMES}, got {self.embeddings_name!r}."
            )
        if self.question_encoder_pooling not in POOLING_MODES:
            raise ValueError(
                f"RagConfig: `question_encoder_pooling` must be one of {POOLING_MODES}, "
                f"got {self.question_encoder_pooling!r}."
            )
        for name in ("index_nprobe", "index_ef_search"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"RagConfig: `{name}` must be None or an integer >= 1, got {value!r}.")

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
