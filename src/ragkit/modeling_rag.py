"""RAG models: a question encoder, a retriever and a seq2seq generator, marginalized over documents.

Drop-in for ``transformers``' ``RagModel``, ``RagSequenceForGeneration`` and ``RagTokenForGeneration``:
same names, arguments, defaults, checkpoint layout (weights under ``rag.question_encoder.`` and
``rag.generator.``) and, in float32, the same numbers. Differences are listed in ``docs/modeling.md``.

Shapes: ``batch_size`` questions, ``n_docs`` documents each; the generator sees
``batch_size * n_docs`` rows, document-major within a question (rows ``i * n_docs ... (i + 1) * n_docs - 1``
belong to question ``i``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import ModelOutput

from ._accelerators import (
    check_bitsandbytes,
    default_dtype_for_quantization,
    is_bitsandbytes_config,
    module_device,
    quantization_config_for_rag,
    resolve_attn_implementation,
    to_device,
)
from ._compat import reorder_document_rows
from ._io import atomic_directory
from .configuration_rag import RagConfig, check_local_location
from .errors import CheckpointError, RagInputError
from .generation.arguments import as_integer
from .generation.calls import RAG_TOKEN_DECODING as _RAG_TOKEN_DECODING
from .generation.contexts import trim_context_padding
from .losses import compute_dtype
from .pooling import pool_hidden_states

logger = logging.getLogger(__name__)

__all__ = [
    "RagModel",
    "RagPreTrainedModel",
    "RagSequenceForGeneration",
    "RagTokenForGeneration",
    "RetrievAugLMMarginOutput",
    "RetrievAugLMOutput",
    "RetrievedContexts",
]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _resolve_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """Merge the documented ``past_key_values`` and transformers 5's ``cache`` argument into one."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise RagInputError("Pass the decoder cache as either `past_key_values` or `cache`, not both.")
    return cache if cache is not None else past_key_values


def _as_rag_config(config: PretrainedConfig) -> RagConfig:
    """Accept a ragkit ``RagConfig`` or any config with ``model_type == "rag"`` (such as transformers')."""
    if isinstance(config, RagConfig):
        return config
    if isinstance(config, PretrainedConfig) and getattr(config, "model_type", None) == "rag":
        return RagConfig(**config.to_dict())
    raise TypeError(
        f"`config` must be a ragkit.RagConfig (or a config with model_type 'rag'), got {type(config).__name__}. "
        "Build one with RagConfig.from_question_encoder_generator_configs(question_encoder_config, generator_config)."
    )


def _rag_config(
    config: PretrainedConfig | None,
    question_encoder: PreTrainedModel | None,
    generator: PreTrainedModel | None,
    config_kwargs: dict[str, Any],
    missing_message: str,
) -> RagConfig:
    """The model's RAG config: ``config``, or one built from the two parts' configs (else ``missing_message``).

    Its ``question_encoder`` and ``generator`` are the given parts' own config objects, so that what changes a
    part's config (``generator.resize_token_embeddings`` setting ``vocab_size``) is what ``save_pretrained``
    writes. A ``config`` whose sub-configs are other objects is copied first: the caller's may serve other
    models.
    """
    if config is None:
        if question_encoder is None or generator is None:
            raise RagInputError(missing_message)
        config = RagConfig.from_question_encoder_generator_configs(
            question_encoder.config, generator.config, **config_kwargs
        )
    config = _as_rag_config(config)
    parts = {"question_encoder": question_encoder, "generator": generator}
    stale = {
        field: part.config
        for field, part in parts.items()
        if part is not None and getattr(config, field) is not part.config
    }
    if stale:
        config = copy.copy(config)
        for field, part_config in stale.items():
            setattr(config, field, part_config)
    return config


def _batch_size_of(
    input_ids: torch.Tensor | None,
    doc_scores: torch.Tensor | None,
    context_input_ids: torch.Tensor | None,
    n_docs: int,
) -> int | None:
    """Number of questions implied by whichever input is present (None if none is)."""
    if doc_scores is not None:
        return doc_scores.shape[0]
    if input_ids is not None:
        return input_ids.shape[0]
    if context_input_ids is not None:
        return context_input_ids.shape[0] // n_docs
    return None


#: Arguments the model itself passes to the question encoder; never taken from a forward's extra kwargs.
_QUESTION_ENCODER_OWN_ARGS = frozenset(
    {"input_ids", "attention_mask", "output_attentions", "output_hidden_states", "return_dict"}
)


def _input_table_sizes(module: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, number of learned positions) of a part's input tables; None where it has none."""
    vocab_size = None
    try:
        embeddings = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        vocab_size = embeddings.num_embeddings
    config = getattr(module, "config", None)
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
    # T5 has relative positions (no table, no limit); BERT/DPR and BART have max_position_embeddings.
    max_positions = getattr(config, "max_position_embeddings", None)
    return vocab_size, max_positions


def _check_token_ids(
    ids: Any,
    name: str,
    vocab_size: int | None,
    max_length: int | None,
    part: str,
    ignore_index: int | None = None,
    table: str = "vocabulary",
) -> None:
    """Raise :class:`RagInputError` naming ``name`` unless ``ids`` is a non-empty `(rows, length)` integer tensor
    of ids in ``[0, vocab_size)`` (or ``ignore_index``) and at most ``max_length`` long. One min/max, no loops."""
    if not isinstance(ids, torch.Tensor):
        raise RagInputError(
            f"`{name}` must be a torch tensor of token ids, got {type(ids).__name__}; tokenize with "
            "return_tensors='pt'."
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise RagInputError(
            f"`{name}` holds {ids.dtype} values; token ids must be integers (torch.long): pass `{name}.long()` "
            "if they are whole numbers, or tokenize with return_tensors='pt'."
        )
    if ids.dim() != 2:
        raise RagInputError(f"`{name}` must have shape (batch_size, length), got {tuple(ids.shape)}.")
    if ids.shape[0] == 0:
        raise RagInputError(f"`{name}` is an empty batch (0 rows); pass at least one sequence.")
    if ids.shape[1] == 0:
        raise RagInputError(
            f"`{name}` has zero-length rows (shape {tuple(ids.shape)}); each row needs at least one token."
        )
    if max_length is not None and ids.shape[1] > max_length:
        raise RagInputError(
            f"`{name}` has length {ids.shape[1]} but the {part} has {max_length} positions "
            f"(max_position_embeddings); truncate it, e.g. tokenizer(..., truncation=True, max_length={max_length})."
        )
    if ids.device.type == "meta":
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if ignore_index is not None and low == ignore_index:
        kept = ids[ids != ignore_index]
        if kept.numel() == 0:
            return
        low = int(kept.min())
    if low < 0:
        allowed = (
            f" (besides {ignore_index}, which marks ignored positions)" if ignore_index is not None else ""
        )
        raise RagInputError(f"`{name}` holds the negative token id {low}; token ids must be >= 0{allowed}.")
    if vocab_size is not None and high >= vocab_size:
        raise RagInputError(
            f"`{name}` holds id {high}, outside the {part}'s {table} of {vocab_size} ids "
            f"(0..{vocab_size - 1}); tokenize with the {part}'s tokenizer (or resize its embeddings)."
        )


def _check_n_docs(n_docs: Any) -> int:
    """``n_docs`` as a Python int; :class:`RagInputError` unless it is a whole number >= 1 of any integer type
    (:func:`~ragkit.generation.arguments.as_integer`)."""
    value = as_integer(n_docs)
    if value is None or value < 1:
        raise RagInputError(f"`n_docs` must be an integer >= 1 (documents per question), got {n_docs!r}.")
    return value


def _check_same_shape(tensor: torch.Tensor | None, name: str, ids: torch.Tensor, ids_name: str) -> None:
    """Raise :class:`RagInputError` when a mask (or token types) does not have the shape of the ids it goes with."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise RagInputError(f"`{name}` must be a torch tensor, got {type(tensor).__name__}.")
    if tuple(tensor.shape) != tuple(ids.shape):
        raise RagInputError(
            f"`{name}` has shape {tuple(tensor.shape)} but `{ids_name}` has shape {tuple(ids.shape)}; they must "
            f"match (one entry per token). Pass the one the tokenizer returned with `{ids_name}`."
        )


def _check_labels(labels: torch.Tensor, batch_size: int | None) -> None:
    """Reject labels whose shape cannot give a meaningful loss (see docs/modeling.md, 'one-token labels')."""
    if labels.dim() != 2:
        raise RagInputError(
            f"`labels` must have shape (batch_size, target_length), got {tuple(labels.shape)}."
        )
    if batch_size is not None and labels.shape[0] != batch_size:
        raise RagInputError(
            f"`labels` has {labels.shape[0]} rows but the batch has {batch_size} questions; pass one label "
            "sequence per question (not one per document)."
        )
    if labels.shape[1] < 2:
        raise RagInputError(
            "`labels` has a single position, which gives a zero loss: RAG scores labels[:, 1:] against the "
            "decoder fed with labels (transformers issue 8863). Labels must start with the decoder start/BOS "
            "token, as the generator tokenizer produces them (e.g. '<s> answer </s>' for BART)."
        )


def _replace_ignore_index(labels: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Map the -100 'ignore' label to the pad token, which RAG's loss masks (the reference crashes on -100)."""
    from .losses import replace_ignore_index

    return replace_ignore_index(labels, pad_token_id)


def _trim_for_generator(
    context_input_ids: torch.Tensor | None,
    context_attention_mask: torch.Tensor | None,
    encoder_outputs: Any,
    decoder_input_ids: torch.Tensor | None,
    output_attentions: bool,
    output_hidden_states: bool,
    use_cache: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The contexts the generator runs on: without the columns that are padding in every row.

    Kept whole when the encoder already ran (``encoder_outputs``), when no ``decoder_input_ids`` are given
    (BART then makes its decoder inputs by shifting the contexts right, so their length is the logits'
    length), when attentions or hidden states are asked for (their shapes are the reference's, over
    ``max_combined_length``), or when the decoder cache is returned (its cross-attention keys must fit the
    full ``context_attention_mask`` of the next steps). Training (``labels``) runs without the cache and
    feeds the labels to the decoder, hence on trimmed contexts.
    """
    if (
        encoder_outputs is not None
        or decoder_input_ids is None
        or use_cache
        or context_input_ids is None
        or context_attention_mask is None
        or output_attentions
        or output_hidden_states
    ):
        return context_input_ids, context_attention_mask
    return trim_context_padding(context_input_ids, context_attention_mask)


def _restore_context_length(
    gen_outputs: ModelOutput,
    context_input_ids: torch.Tensor | None,
    generator_input_ids: torch.Tensor | None,
) -> ModelOutput:
    """Zero-pad ``encoder_last_hidden_state`` back to the contexts' length after trimmed contexts.

    Positions past the longest context are padding: their hidden states are never attended to, and
    the reference's values there (the encoder run on pad tokens) carry no information.
    """
    if context_input_ids is None or generator_input_ids is None:
        return gen_outputs
    missing = context_input_ids.shape[1] - generator_input_ids.shape[1]
    hidden = gen_outputs.encoder_last_hidden_state
    if missing <= 0 or hidden is None:
        return gen_outputs
    gen_outputs.encoder_last_hidden_state = nn.functional.pad(hidden, (0, 0, 0, missing))
    return gen_outputs


def _architecture_mismatch_warning(cls: type, config: PretrainedConfig) -> None:
    """Log a warning when a RAG-Token checkpoint is loaded into the Sequence head or the reverse (Transformers issue 7831)."""
    expected = getattr(cls, "_rag_head", None)
    if expected is None:
        return
    architectures = getattr(config, "architectures", None) or []
    heads = {"RagSequenceForGeneration": "sequence", "RagTokenForGeneration": "token"}
    for name in architectures:
        other = heads.get(name)
        if other is not None and other != expected:
            logger.warning(
                "Loading a checkpoint saved as %s into %s: the weights fit, but the model was trained for "
                "RAG-%s marginalization and will now be used for RAG-%s. Load it with %s if that is not intended.",
                name,
                cls.__name__,
                other.capitalize(),
                expected.capitalize(),
                name,
            )
            return


#: How many missing weight names a :class:`CheckpointError` lists before giving the count of the rest.
_MISSING_KEYS_SHOWN = 5

#: ``from_pretrained`` arguments that locate ``config.json``; the rest are model or config options.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _config_for_checks(
    pretrained_model_name_or_path: str | os.PathLike | None, kwargs: dict[str, Any]
) -> RagConfig:
    """The RAG config ``from_pretrained`` will load, read ahead to decide per-part options (not modified)."""
    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        return _as_rag_config(config)
    source = config if config is not None else pretrained_model_name_or_path
    if source is None:
        raise RagInputError("Pass a checkpoint (Hub id or directory) or `config=` to from_pretrained.")
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    return RagConfig.from_pretrained(source, **hub_kwargs)


def _load_part(
    auto_class: type,
    pretrained_model_name_or_path: str | os.PathLike | None,
    part_kwargs: dict[str, Any],
    missing_message: str,
    what: str,
    allow_missing_weights: bool,
) -> PreTrainedModel:
    """One part for ``from_pretrained_question_encoder_generator``: ``model=`` if given, else loaded (complete)."""
    model = part_kwargs.pop("model", None)
    if model is not None:
        return model
    if pretrained_model_name_or_path is None:
        raise RagInputError(missing_message)
    check_local_location(pretrained_model_name_or_path, f"The {what} checkpoint")
    part_kwargs.pop("output_loading_info", None)
    if "config" not in part_kwargs:
        # Config-level kwargs (e.g. question_encoder_hidden_dropout_prob) update the config; the rest go to
        # from_pretrained.
        part_config, part_kwargs = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **part_kwargs, return_unused_kwargs=True
        )
        part_kwargs["config"] = part_config
    model, info = auto_class.from_pretrained(
        pretrained_model_name_or_path, output_loading_info=True, **part_kwargs
    )
    _check_missing_weights(
        info.get("missing_keys") or [], pretrained_model_name_or_path, what, allow_missing_weights
    )
    return model


def _check_missing_weights(missing_keys: list[str], source: Any, what: str, allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) weights a checkpoint lacks: they would keep random values.

    ``missing_keys`` is transformers' loading report, which already leaves out what it expects to be absent
    (tied copies such as ``lm_head`` tied to the embeddings, buffers it rebuilds).
    """
    if not missing_keys:
        return
    missing = sorted(missing_keys)
    shown = ", ".join(missing[:_MISSING_KEYS_SHOWN])
    if len(missing) > _MISSING_KEYS_SHOWN:
        shown += f", ... ({len(missing) - _MISSING_KEYS_SHOWN} more)"
    unprefixed = [key.removeprefix("rag.") for key in missing]
    per_part = {
        part: sum(key.startswith(f"{part}.") for key in unprefixed)
        for part in ("question_encoder", "generator")
    }
    parts = ", ".join(f"{part.replace('_', ' ')}: {count}" for part, count in per_part.items() if count)
    summary = f"{len(missing)} weight tensor(s) of the {what}" + (f" ({parts})" if parts else "")
    if allow:
        logger.warning(
            "%s lacks %s: %s. They keep their random initial values (allow_missing_weights=True).",
            source,
            summary,
            shown,
        )
        return
    raise CheckpointError(
        f"{source} lacks {summary}: {shown}. Loaded anyway they would keep random values and the model would "
        "produce nonsense. Check that the weights file (model.safetensors or pytorch_model.bin) is complete and "
        "was saved from this kind of model; pass allow_missing_weights=True to load it anyway (for example to "
        "train the missing parts)."
    )


def _prepare_accelerator_kwargs(
    cls: type, pretrained_model_name_or_path: str | os.PathLike | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Check and adapt the CUDA-path options of ``from_pretrained`` before transformers sees them.

    - bitsandbytes without the package or a device: a clear error naming ``pip install -e '.[cuda]'`` (also for a
      checkpoint saved quantized);
    - ``attn_implementation``: decided per part, unsupported choices fall back (see
      :func:`ragkit._accelerators.resolve_attn_implementation`); flash-attention checked before loading;
    - ``quantize_question_encoder`` (ragkit's, default False): the question encoder is added to bitsandbytes'
      skip list unless True;
    - 4-bit without ``dtype``: the unquantized modules take ``bnb_4bit_compute_dtype`` (bf16/fp16) rather
      than transformers' float32.
    """
    quantize_question_encoder = kwargs.pop("quantize_question_encoder", False)
    attn_implementation = kwargs.get("attn_implementation")
    quantization_config = kwargs.get("quantization_config")
    check_bitsandbytes(quantization_config)
    config = _config_for_checks(pretrained_model_name_or_path, kwargs)
    saved_quantization = getattr(config, "quantization_config", None)
    if quantization_config is None and saved_quantization is not None:
        check_bitsandbytes(saved_quantization)
    if quantize_question_encoder and not is_bitsandbytes_config(quantization_config):
        raise RagInputError(
            "`quantize_question_encoder=True` applies to bitsandbytes quantization; pass "
            "quantization_config=BitsAndBytesConfig(load_in_4bit=True) (or load_in_8bit=True) with it."
        )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = resolve_attn_implementation(attn_implementation, config, cls)
    if is_bitsandbytes_config(quantization_config):
        dtype = default_dtype_for_quantization(quantization_config)
        if dtype is not None and "dtype" not in kwargs and "torch_dtype" not in kwargs:
            logger.info("4-bit load without `dtype`: unquantized modules use the compute dtype %s.", dtype)
            kwargs["dtype"] = dtype
        kwargs["quantization_config"] = quantization_config_for_rag(
            quantization_config, cls, copy.deepcopy(config), bool(quantize_question_encoder)
        )
    return kwargs


def _part_devices(model: RagModel) -> tuple[torch.device, torch.device]:
    """Devices where the question encoder and the generator take their inputs (see docs/gpu.md, 'devices')."""
    return module_device(model.question_encoder), module_device(model.generator)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


class _CacheAliasMixin:
    """Expose the decoder cache under the documented name ``past_key_values`` as well as ``cache``, silently."""

    @property
    def past_key_values(self) -> Cache | None:
        """The decoder cache (same object as ``cache``)."""
        return self.cache

    def _replace_old_cache_name(self, key: str) -> str:
        # ``past_key_values`` is the documented name in ragkit's API, so no deprecation warning here.
        return "cache" if key in ("past_key_values", "cache_params") else key


def _accept_past_key_values(cls: type) -> type:
    """Let the dataclass constructor take ``past_key_values=`` for ``cache=`` without a deprecation warning."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, past_key_values: Cache | None = None, **kwargs):
        if past_key_values is not None:
            if kwargs.get("cache") is not None:
                raise RagInputError(
                    "Pass the decoder cache as either `past_key_values` or `cache`, not both."
                )
            kwargs["cache"] = past_key_values
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_accept_past_key_values
@dataclass
class RetrievAugLMMarginOutput(_CacheAliasMixin, ModelOutput):
    """Outputs of :class:`RagSequenceForGeneration` and :class:`RagTokenForGeneration`.

    The cache is the field ``cache`` (transformers 5's name); ``past_key_values`` reads the same object
    and is accepted by the constructor.

    Args:
        loss: `(batch_size,)`, or `()` with ``reduce_loss``; when ``labels`` are given.
        logits: `(batch_size * n_docs, target_length, vocab_size)`, or `(batch_size, target_length, vocab_size)`
            log-probabilities when marginalized (``do_marginalize``).
        doc_scores: `(batch_size, n_docs)` inner products of question and document vectors (float32; float64
            for a float64 model).
        cache: Decoder cache for `batch_size * n_docs` rows.
        retrieved_doc_embeds: `(batch_size, n_docs, dim)`, with ``output_retrieved``.
        retrieved_doc_ids: `(batch_size, n_docs)`, with ``output_retrieved``.
        context_input_ids: `(batch_size * n_docs, max_combined_length)`, with ``output_retrieved``.
        context_attention_mask: `(batch_size * n_docs, max_combined_length)`, with ``output_retrieved``.
        question_encoder_last_hidden_state: `(batch_size, dim)` question vectors (pooled).
        question_enc_hidden_states: Question encoder hidden states, with ``output_hidden_states``.
        question_enc_attentions: Question encoder attentions, with ``output_attentions``.
        generator_enc_last_hidden_state: `(batch_size * n_docs, source_length, d_model)`.
        generator_enc_hidden_states: Generator encoder hidden states, with ``output_hidden_states``.
        generator_enc_attentions: Generator encoder attentions, with ``output_attentions``.
        generator_dec_hidden_states: Generator decoder hidden states, with ``output_hidden_states``.
        generator_dec_attentions: Generator decoder attentions, with ``output_attentions``.
        generator_cross_attentions: Generator cross-attentions, with ``output_attentions``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None
    cache: Cache | None = None
    retrieved_doc_embeds: torch.Tensor | None = None
    retrieved_doc_ids: torch.LongTensor | None = None
    context_input_ids: torch.LongTensor | None = None
    context_attention_mask: torch.LongTensor | None = None
    question_encoder_last_hidden_state: torch.Tensor | None = None
    question_enc_hidden_states: tuple[torch.Tensor, ...] | None = None
    question_enc_attentions: tuple[torch.Tensor, ...] | None = None
    generator_enc_last_hidden_state: torch.Tensor | None = None
    generator_enc_hidden_states: tuple[torch.Tensor, ...] | None = None
    generator_enc_attentions: tuple[torch.Tensor, ...] | None = None
    generator_dec_hidden_states: tuple[torch.Tensor, ...] | None = None
    generator_dec_attentions: tuple[torch.Tensor, ...] | None = None
    generator_cross_attentions: tuple[torch.Tensor, ...] | None = None


@_accept_past_key_values
@dataclass
class RetrievAugLMOutput(_CacheAliasMixin, ModelOutput):
    """Outputs of :class:`RagModel`: the fields of :class:`RetrievAugLMMarginOutput` without ``loss``.

    ``logits`` are the generator's, `(batch_size * n_docs, target_length, vocab_size)`, not marginalized.
    """

    logits: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None
    cache: Cache | None = None
    retrieved_doc_embeds: torch.Tensor | None = None
    retrieved_doc_ids: torch.LongTensor | None = None
    context_input_ids: torch.LongTensor | None = None
    context_attention_mask: torch.LongTensor | None = None
    question_encoder_last_hidden_state: torch.Tensor | None = None
    question_enc_hidden_states: tuple[torch.Tensor, ...] | None = None
    question_enc_attentions: tuple[torch.Tensor, ...] | None = None
    generator_enc_last_hidden_state: torch.Tensor | None = None
    generator_enc_hidden_states: tuple[torch.Tensor, ...] | None = None
    generator_enc_attentions: tuple[torch.Tensor, ...] | None = None
    generator_dec_hidden_states: tuple[torch.Tensor, ...] | None = None
    generator_dec_attentions: tuple[torch.Tensor, ...] | None = None
    generator_cross_attentions: tuple[torch.Tensor, ...] | None = None


def _margin_output(
    outputs: RetrievAugLMOutput, loss: torch.Tensor | None, logits: torch.Tensor
) -> RetrievAugLMMarginOutput:
    """A head's output: ``RagModel``'s fields with the loss and (possibly marginalized) logits."""
    return RetrievAugLMMarginOutput(
        loss=loss,
        logits=logits,
        doc_scores=outputs.doc_scores,
        cache=outputs.cache,
        retrieved_doc_embeds=outputs.retrieved_doc_embeds,
        retrieved_doc_ids=outputs.retrieved_doc_ids,
        context_input_ids=outputs.context_input_ids,
        context_attention_mask=outputs.context_attention_mask,
        question_encoder_last_hidden_state=outputs.question_encoder_last_hidden_state,
        question_enc_hidden_states=outputs.question_enc_hidden_states,
        question_enc_attentions=outputs.question_enc_attentions,
        generator_enc_last_hidden_state=outputs.generator_enc_last_hidden_state,
        generator_enc_hidden_states=outputs.generator_enc_hidden_states,
        generator_enc_attentions=outputs.generator_enc_attentions,
        generator_dec_hidden_states=outputs.generator_dec_hidden_states,
        generator_dec_attentions=outputs.generator_dec_attentions,
        generator_cross_attentions=outputs.generator_cross_attentions,
    )


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


def score_documents(question_vectors: torch.Tensor, doc_embeds: torch.Tensor) -> torch.Tensor:
    """Inner products `(batch_size, n_docs)` of question vectors `(batch_size, dim)` and documents
    `(batch_size, n_docs, dim)`, in float32 for float32, bfloat16 and float16 models (they feed a softmax over
    documents) and in float64 for float64 models (:func:`ragkit.losses.compute_dtype`)."""
    dtype = compute_dtype(question_vectors)
    return torch.bmm(question_vectors.to(dtype).unsqueeze(1), doc_embeds.to(dtype).transpose(1, 2)).squeeze(1)


@dataclass
class RetrievedContexts:
    """What retrieval hands the generator: the contexts of every (question, document) pair and their scores.

    Attributes:
        context_input_ids: `(batch_size * n_docs, length)` generator token ids of ``title / text // question``,
            the documents of each question one after the other, on the generator's device.
        context_attention_mask: `(batch_size * n_docs, length)` mask of ``context_input_ids``.
        doc_scores: `(batch_size, n_docs)` question-document inner products (float32; float64 for a float64
            model).
        doc_ids: `(batch_size, n_docs)` ids of the retrieved documents.
        retrieved_doc_embeds: `(batch_size, n_docs, dim)` the documents' vectors.
    """

    context_input_ids: torch.Tensor
    context_attention_mask: torch.Tensor
    doc_scores: torch.Tensor
    doc_ids: torch.Tensor
    retrieved_doc_embeds: torch.Tensor


class RagPreTrainedModel(PreTrainedModel):
    """Base of the RAG models: config class, checkpoint prefix ``rag`` and the two-checkpoint constructor."""

    config_class = RagConfig
    base_model_prefix = "rag"
    _supports_flash_attn = True
    _supports_sdpa = True
    # Both parts (DPR/BERT, BART/T5) checkpoint their layers; the reference refuses activation checkpointing.
    supports_gradient_checkpointing = True
    #: "sequence" or "token" on the heads; used to warn when a checkpoint of the other head is loaded.
    _rag_head: str | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """Load a RAG checkpoint (facebook/rag-* layout) from the Hub or a local directory.

        Same arguments as ``transformers.PreTrainedModel.from_pretrained`` (``dtype``, ``device_map``,
        ``quantization_config``, ``attn_implementation``, ...), plus ``retriever=`` which is handed to
        the model. Loading a RAG-Token checkpoint into :class:`RagSequenceForGeneration` (or the reverse)
        logs a warning. CUDA paths (docs/gpu.md):

        - ``attn_implementation``: a name is asked of both parts, and a part that lacks it (DPR has no
          flash-attention) uses ``"sdpa"`` with a logged warning; a per-part dict
          (``{"question_encoder": ..., "generator": ..., "": default}``) is followed exactly or fails.
        - ``quantization_config``: bitsandbytes 4/8-bit quantizes the generator only, unless
          ``quantize_question_encoder=True`` (a ragkit argument). Without ``dtype``, a 4-bit load keeps the
          unquantized modules in ``bnb_4bit_compute_dtype`` when that is bf16/fp16.
        - flash-attention or bitsandbytes without CUDA or without their package raise
          :class:`~ragkit._accelerators.AcceleratorUnavailableError` naming ``pip install -e '.[cuda]'``.

        A checkpoint whose weights file lacks tensors of the question encoder or the generator (beyond the
        tied copies transformers expects to be absent) is refused with
        :class:`~ragkit.errors.CheckpointError` naming them; ``allow_missing_weights=True`` (a ragkit
        argument) loads it with a warning, the missing weights keeping random values.

        Returns:
            The model (or ``(model, loading_info)`` with ``output_loading_info=True``).

        Raises:
            MissingFileError: A local directory without ``config.json``.
            CheckpointError: Weights missing from the checkpoint (without ``allow_missing_weights``).
        """
        kwargs = dict(kwargs)
        allow_missing_weights = bool(kwargs.pop("allow_missing_weights", False))
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        kwargs = _prepare_accelerator_kwargs(cls, pretrained_model_name_or_path, kwargs)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _check_missing_weights(
            loading_info.get("missing_keys") or [],
            pretrained_model_name_or_path,
            "RAG model",
            allow_missing_weights,
        )
        _architecture_mismatch_warning(cls, model.config)
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save config and weights (``model.safetensors``, keys ``rag.*``) in the facebook/rag-* layout.

        A new directory is written atomically (a crash leaves no half-written checkpoint). An existing
        directory, or a call with ``push_to_hub=True``, is written in place as transformers does, so files
        already there (such as tokenizers) are kept.

        Raises:
            RagInputError: ``save_directory`` is an existing file (it is left untouched).
        """
        if os.path.isfile(save_directory):
            raise RagInputError(
                f"`save_directory` ({os.fspath(save_directory)}) is a file; give a directory path (the file is "
                "left untouched)."
            )
        if (
            kwargs.get("push_to_hub")
            or not kwargs.get("is_main_process", True)
            or os.path.exists(save_directory)
        ):
            super().save_pretrained(save_directory, *args, **kwargs)
            return
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Resize the generator's vocabulary: token embeddings, LM head and (BART) ``final_logits_bias``.

        The generator's own ``resize_token_embeddings`` does the work, so tied embeddings stay tied; its
        ``config.vocab_size``, which is ``config.generator.vocab_size``, follows, and ``save_pretrained`` then
        ``from_pretrained`` give back the resized model. The question encoder is left alone (its tokenizer is
        another one): resize ``model.question_encoder`` itself for that.

        Args:
            new_num_tokens: The new vocabulary size; None returns the embeddings unchanged.
            pad_to_multiple_of: Round the size up to a multiple of this.
            mean_resizing: Initialize new rows at the mean of the old ones (as Transformers does).

        Returns:
            The generator's input embeddings, `(vocab_size, d_model)`.
        """
        generator = self.generator
        embeddings = generator.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        # The same object as generator.config after construction; set as well in case it was replaced since.
        self.config.generator.vocab_size = embeddings.num_embeddings
        return embeddings

    @classmethod
    def from_pretrained_question_encoder_generator(
        cls,
        question_encoder_pretrained_model_name_or_path: str | os.PathLike | None = None,
        generator_pretrained_model_name_or_path: str | os.PathLike | None = None,
        retriever: Any = None,
        **kwargs: Any,
    ) -> RagPreTrainedModel:
        """Build a RAG model from a question encoder checkpoint and a generator checkpoint.

        Args:
            question_encoder_pretrained_model_name_or_path: Hub id or directory of the question encoder
                (loaded with ``AutoModel``), e.g. ``"facebook/dpr-question_encoder-single-nq-base"``.
            generator_pretrained_model_name_or_path: Hub id or directory of the generator (loaded with
                ``AutoModelForSeq2SeqLM``), e.g. ``"facebook/bart-large"``.
            retriever: Optional :class:`~ragkit.RagRetriever`.
            **kwargs: ``question_encoder_*`` arguments go to the question encoder's ``from_pretrained``
                (``question_encoder_model=`` passes a ready model), ``generator_*`` to the generator's
                (``generator_model=``), ``allow_missing_weights=True`` loads parts whose checkpoint lacks some
                of their weights (with a warning), the rest go to the RAG config (``n_docs``, ``index_name``,
                ...) or ``config=`` for a ready :class:`~ragkit.RagConfig`.

        Returns:
            The model, in evaluation mode.

        Raises:
            CheckpointError: A part's checkpoint lacks weights of that part (without ``allow_missing_weights``).
        """
        question_encoder_kwargs = {
            key[len("question_encoder_") :]: kwargs.pop(key)
            for key in list(kwargs)
            if key.startswith("question_encoder_")
        }
        generator_kwargs = {
            key[len("generator_") :]: kwargs.pop(key) for key in list(kwargs) if key.startswith("generator_")
        }
        allow_missing_weights = bool(kwargs.pop("allow_missing_weights", False))

        question_encoder = _load_part(
            AutoModel,
            question_encoder_pretrained_model_name_or_path,
            question_encoder_kwargs,
            "Pass `question_encoder_pretrained_model_name_or_path` (a Hub id or directory) or a ready "
            "model as `question_encoder_model=`.",
            "question encoder",
            allow_missing_weights,
        )
        generator = _load_part(
            AutoModelForSeq2SeqLM,
            generator_pretrained_model_name_or_path,
            generator_kwargs,
            "Pass `generator_pretrained_model_name_or_path` (a Hub id or directory) or a ready model as "
            "`generator_model=`.",
            "generator",
            allow_missing_weights,
        )

        config = kwargs.pop("config", None)
        if config is None:
            config = RagConfig.from_question_encoder_generator_configs(
                question_encoder.config, generator.config, **kwargs
            )
        model = cls(
            config=config, question_encoder=question_encoder, generator=generator, retriever=retriever
        )
        model.eval()
        return model


# --------------------------------------------------------------------------------------------------
# RagModel
# --------------------------------------------------------------------------------------------------


class RagModel(RagPreTrainedModel):
    """Question encoder + retriever + generator; returns the generator's per-document logits and doc scores.

    Args:
        config: A :class:`~ragkit.RagConfig`; built from the two models' configs when omitted.
        question_encoder: The question encoder (DPR, or any encoder with ``config.question_encoder_pooling``
            "cls"/"mean"); built from ``config.question_encoder`` when omitted.
        generator: A seq2seq LM (BART, T5); built from ``config.generator`` when omitted.
        retriever: A :class:`~ragkit.RagRetriever` (or any object with its call signature); optional.
        **kwargs: RAG config fields, used only when ``config`` is omitted.
    """

    def __init__(
        self,
        config: PretrainedConfig | None = None,
        question_encoder: PreTrainedModel | None = None,
        generator: PreTrainedModel | None = None,
        retriever: Any = None,
        **kwargs: Any,
    ):
        config = _rag_config(
            config,
            question_encoder,
            generator,
            kwargs,
            "RagModel needs a `config`, or both a `question_encoder` and a `generator` to build one from.",
        )
        super().__init__(config)
        if question_encoder is None:
            question_encoder = AutoModel.from_config(config.question_encoder)
        if generator is None:
            generator = AutoModelForSeq2SeqLM.from_config(config.generator)
        # Parts built here from the config normally hold its sub-configs already (see _rag_config for given
        # parts); this keeps the two the same objects should a part have made its own copy.
        self.config.question_encoder = question_encoder.config
        self.config.generator = generator.config
        self.retriever = retriever
        self.question_encoder = question_encoder
        self.generator = generator
        self.ctx_encoder = None
        self.context_encoder_training = False
        self.post_init()

    def _check_questions(
        self, input_ids: Any, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> None:
        """Raise :class:`RagInputError` naming the argument when questions cannot go through the question encoder."""
        vocab_size, max_positions = _input_table_sizes(self.question_encoder)
        _check_token_ids(input_ids, "input_ids", vocab_size, max_positions, "question encoder")
        _check_same_shape(attention_mask, "attention_mask", input_ids, "input_ids")
        if token_type_ids is not None:
            _check_same_shape(token_type_ids, "token_type_ids", input_ids, "input_ids")
            type_vocab_size = getattr(self.question_encoder.config, "type_vocab_size", None)
            _check_token_ids(
                token_type_ids,
                "token_type_ids",
                type_vocab_size,
                None,
                "question encoder",
                table="token types",
            )

    def _question_encoder_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``kwargs`` the question encoder's ``forward`` names (``token_type_ids``, ...).

        ``forward`` receives whatever the question tokenizer returned; what the encoder does not take is
        ignored, as Transformers' RAG ignores unknown arguments.
        """
        parameters = inspect.signature(self.question_encoder.forward).parameters
        return {
            name: value
            for name, value in kwargs.items()
            if value is not None
            and name not in _QUESTION_ENCODER_OWN_ARGS
            and name in parameters
            and parameters[name].kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }

    def _encode_questions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **question_encoder_kwargs: Any,
    ) -> tuple[torch.Tensor, ModelOutput]:
        """Question vectors `(batch_size, dim)` per ``config.question_encoder_pooling``, and the raw outputs."""
        self._check_questions(input_ids, attention_mask, question_encoder_kwargs.get("token_type_ids"))
        device = module_device(self.question_encoder)
        input_ids = to_device(input_ids, device, "input_ids")
        attention_mask = to_device(attention_mask, device, "attention_mask")
        extra = {
            name: to_device(value, device, name) if isinstance(value, torch.Tensor) else value
            for name, value in question_encoder_kwargs.items()
            if value is not None
        }
        outputs = self.question_encoder(
            input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **extra,
        )
        vectors = pool_hidden_states(
            outputs,
            attention_mask,
            pooling=self.config.question_encoder_pooling,
            normalize=self.config.question_encoder_normalize,
        )
        return vectors, outputs

    def encode_questions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **question_encoder_kwargs: Any,
    ) -> torch.Tensor:
        """Encode questions into the vectors the retriever searches with.

        Args:
            input_ids: `(batch_size, question_length)` question token ids (question encoder tokenizer).
            attention_mask: `(batch_size, question_length)` mask of ``input_ids``.
            **question_encoder_kwargs: Further outputs of the question tokenizer (``token_type_ids``), passed
                to the question encoder.

        Returns:
            `(batch_size, dim)` question vectors, pooled per ``config.question_encoder_pooling``, on the
            question encoder's device and differentiable with respect to it.
        """
        return self._encode_questions(input_ids, attention_mask, **question_encoder_kwargs)[0]

    def retrieve_contexts(
        self,
        input_ids: torch.Tensor,
        question_vectors: torch.Tensor,
        n_docs: int | None = None,
    ) -> RetrievedContexts:
        """Retrieve ``n_docs`` documents per question, build the generator's contexts and score the documents.

        Args:
            input_ids: `(batch_size, question_length)` question token ids; the retriever decodes them to
                build each context (``title / text // question``).
            question_vectors: `(batch_size, dim)` from :meth:`encode_questions`.
            n_docs: Documents per question; defaults to ``config.n_docs``.

        Returns:
            :class:`RetrievedContexts`; ``doc_scores`` are float32 (float64 for a float64 model) and
            differentiable with respect to the question encoder (and the context encoder when one is being
            trained).
        """
        if self.retriever is None:
            raise RagInputError(
                "`retrieve_contexts` needs a retriever: set one with `model.set_retriever(retriever)`."
            )
        n_docs = _check_n_docs(n_docs if n_docs is not None else self.config.n_docs)
        generator_device = module_device(self.generator)
        search_vectors = question_vectors.detach()
        search_device = getattr(self.retriever, "search_device", None)
        if not isinstance(search_device, torch.device) or search_device.type == "cpu":
            # faiss searches float32 vectors in host memory, whatever the model's dtype and device.
            search_vectors = search_vectors.to(device="cpu", dtype=torch.float32).numpy()
        retrieved = self.retriever(
            input_ids,
            search_vectors,
            prefix=getattr(self.generator.config, "prefix", None),
            n_docs=n_docs,
            return_tensors="pt",
        )
        context_input_ids = retrieved["context_input_ids"].to(generator_device)
        context_attention_mask = retrieved["context_attention_mask"].to(generator_device)
        if self.context_encoder_training:
            if "tokenized_doc_ids" not in retrieved:
                raise RagInputError(
                    "Training the context encoder needs the retrieved documents tokenized for it: call "
                    "`retriever.set_ctx_encoder_tokenizer(ctx_encoder_tokenizer)` before training."
                )
            ctx_device = module_device(self.ctx_encoder)
            doc_outputs = self.ctx_encoder(
                retrieved["tokenized_doc_ids"].to(ctx_device),
                attention_mask=retrieved["tokenized_doc_attention_mask"].to(ctx_device),
                return_dict=True,
            )
            doc_embeds = pool_hidden_states(
                doc_outputs,
                retrieved["tokenized_doc_attention_mask"].to(ctx_device),
                pooling=self.config.question_encoder_pooling,
                normalize=self.config.question_encoder_normalize,
            ).view(-1, n_docs, question_vectors.shape[-1])
            doc_embeds = doc_embeds.to(question_vectors.device)
        else:
            doc_embeds = retrieved["retrieved_doc_embeds"].to(question_vectors.device)
        return RetrievedContexts(
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            doc_scores=score_documents(question_vectors, doc_embeds),
            doc_ids=retrieved["doc_ids"],
            retrieved_doc_embeds=doc_embeds,
        )

    def _check_contexts(
        self,
        doc_scores: torch.Tensor | None,
        context_input_ids: torch.Tensor | None,
        encoder_outputs: Any,
        n_docs: int,
        context_attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Raise :class:`RagInputError` early, naming the argument, when document inputs disagree with each other
        or with ``n_docs``, or contexts hold ids the generator cannot read (vocabulary, positions)."""
        n_docs = _check_n_docs(n_docs)
        if doc_scores is None:
            raise RagInputError(
                "`doc_scores` of shape (batch_size, n_docs) is needed when no retriever is used (it is also "
                "needed with `encoder_outputs`). Compute it as in the 'use retriever separately' example, or set "
                "a retriever with `model.set_retriever(retriever)`."
            )
        if not isinstance(doc_scores, torch.Tensor):
            given = type(doc_scores).__name__
            if type(doc_scores).__module__.split(".")[0] == "numpy":
                given = f"a NumPy array ({given})"
            raise RagInputError(
                f"`doc_scores` must be a torch tensor of shape (batch_size, n_docs), got {given}; pass a torch "
                "tensor (torch.from_numpy(doc_scores) for a NumPy array)."
            )
        if not doc_scores.dtype.is_floating_point:
            raise RagInputError(
                "`doc_scores` must be a floating-point tensor of shape (batch_size, n_docs), got "
                f"{doc_scores.dtype}."
            )
        if doc_scores.dim() != 2 or doc_scores.shape[1] != n_docs:
            raise RagInputError(
                f"`doc_scores` has shape {tuple(doc_scores.shape)} but n_docs={n_docs}: expected "
                f"(batch_size, {n_docs}). Pass `n_docs` matching the retrieved documents."
            )
        if doc_scores.shape[0] == 0:
            raise RagInputError("`doc_scores` is an empty batch (0 questions); pass at least one question.")
        if context_input_ids is not None:
            vocab_size, max_positions = _input_table_sizes(self.generator)
            _check_token_ids(context_input_ids, "context_input_ids", vocab_size, max_positions, "generator")
            _check_same_shape(
                context_attention_mask, "context_attention_mask", context_input_ids, "context_input_ids"
            )
            rows = context_input_ids.shape[0]
        elif encoder_outputs is not None:
            rows = encoder_outputs[0].shape[0]
        else:
            return
        if rows % n_docs != 0:
            raise RagInputError(
                f"`context_input_ids` has {rows} rows, not a multiple of n_docs={n_docs}; it must hold "
                "batch_size * n_docs rows (the documents of each question, one after the other)."
            )
        if rows != doc_scores.shape[0] * n_docs:
            raise RagInputError(
                f"`context_input_ids` has {rows} rows but `doc_scores` has {doc_scores.shape[0]} questions x "
                f"n_docs={n_docs}; expected {doc_scores.shape[0] * n_docs} rows."
            )

    def _check_target_ids(self, ids: Any, name: str, ignore_index: int | None = None) -> None:
        """Raise :class:`RagInputError` naming ``name`` when decoder-side ids fall outside the generator's tables."""
        vocab_size, max_positions = _input_table_sizes(self.generator)
        _check_token_ids(ids, name, vocab_size, max_positions, "generator", ignore_index=ignore_index)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        past_key_values: Cache | None = None,
        doc_scores: torch.Tensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_retrieved: bool | None = None,
        n_docs: int | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RetrievAugLMOutput | tuple:
        """Retrieve (when needed), encode the contexts and run the generator on every document.

        Args:
            input_ids: `(batch_size, question_length)` question token ids (question encoder tokenizer).
            attention_mask: `(batch_size, question_length)` mask of ``input_ids``.
            encoder_outputs: Precomputed generator encoder outputs `(batch_size * n_docs, length, d_model)`
                (used during decoding); needs ``doc_scores``.
            decoder_input_ids: `(batch_size, target_length)`; repeated for every document.
            decoder_attention_mask: `(batch_size, target_length)`.
            past_key_values: Decoder cache (``cache`` is the same argument under transformers 5's name).
            doc_scores: `(batch_size, n_docs)`; needed without a retriever.
            context_input_ids: `(batch_size * n_docs, length)`; needed without a retriever.
            context_attention_mask: `(batch_size * n_docs, length)`; needed without a retriever.
            use_cache: Return the decoder cache; defaults to ``config.use_cache``.
            output_attentions: Return attention weights of the question encoder and the generator.
            output_hidden_states: Return hidden states of the question encoder and the generator.
            output_retrieved: Return ``retrieved_doc_embeds``, ``retrieved_doc_ids``, ``context_input_ids`` and
                ``context_attention_mask`` (when this call retrieved them).
            n_docs: Documents per question; defaults to ``config.n_docs``.
            cache: Alias of ``past_key_values``.
            return_dict: Return a tuple when False.
            token_type_ids: `(batch_size, question_length)` from a BERT/DPR question tokenizer; passed to the
                question encoder with the other outputs of the question tokenizer it takes (``**kwargs``),
                so ``model(**question_tokenizer(questions, return_tensors="pt"), ...)`` works.

        Returns:
            :class:`RetrievAugLMOutput`.

        Raises:
            RagInputError: Missing or inconsistent inputs (shapes, ``n_docs``, masks), or token ids outside the
                question encoder's or generator's vocabulary or positions.
        """
        cache = _resolve_cache(past_key_values, cache)
        n_docs = _check_n_docs(n_docs if n_docs is not None else self.config.n_docs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_retrieved = output_retrieved if output_retrieved is not None else self.config.output_retrieved
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        has_to_retrieve = (
            self.retriever is not None
            and encoder_outputs is None
            and (context_input_ids is None or context_attention_mask is None or doc_scores is None)
        )
        question_vectors = question_outputs = retrieved = None
        if has_to_retrieve:
            if input_ids is None:
                raise RagInputError(
                    "`input_ids` (the questions) are needed to retrieve documents; or pass `context_input_ids`, "
                    "`context_attention_mask` and `doc_scores`."
                )
            question_vectors, question_outputs = self._encode_questions(
                input_ids,
                attention_mask,
                output_attentions,
                output_hidden_states,
                **self._question_encoder_kwargs({"token_type_ids": token_type_ids, **kwargs}),
            )
            retrieved = self.retrieve_contexts(input_ids, question_vectors, n_docs)
            context_input_ids = retrieved.context_input_ids
            context_attention_mask = retrieved.context_attention_mask
            doc_scores = retrieved.doc_scores
        elif encoder_outputs is None:
            if context_input_ids is None:
                raise RagInputError(
                    "No retriever is set, so `context_input_ids` must be passed (with `context_attention_mask` "
                    "and `doc_scores`); or set one with `model.set_retriever(retriever)`."
                )
            if context_attention_mask is None:
                raise RagInputError(
                    "`context_attention_mask` must be passed with `context_input_ids` when no retriever is set; "
                    "or set one with `model.set_retriever(retriever)`."
                )
        self._check_contexts(doc_scores, context_input_ids, encoder_outputs, n_docs, context_attention_mask)
        if decoder_input_ids is not None:
            self._check_target_ids(decoder_input_ids, "decoder_input_ids")
            if cache is None:
                # With a cache the mask also covers the cached positions, so it is longer than the new ids.
                _check_same_shape(
                    decoder_attention_mask, "decoder_attention_mask", decoder_input_ids, "decoder_input_ids"
                )
        # Every tensor goes to the device of the part that reads it (docs/gpu.md, "devices").
        generator_device = module_device(self.generator)
        context_input_ids = to_device(context_input_ids, generator_device, "context_input_ids")
        context_attention_mask = to_device(context_attention_mask, generator_device, "context_attention_mask")
        decoder_input_ids = to_device(decoder_input_ids, generator_device, "decoder_input_ids")
        decoder_attention_mask = to_device(decoder_attention_mask, generator_device, "decoder_attention_mask")
        doc_scores = to_device(doc_scores, generator_device, "doc_scores")
        batch_size = doc_scores.shape[0]
        if decoder_input_ids is not None:
            if decoder_input_ids.shape[0] != batch_size:
                raise RagInputError(
                    f"`decoder_input_ids` has {decoder_input_ids.shape[0]} rows but the batch has {batch_size} "
                    "questions; pass one target per question (it is repeated for every document)."
                )
            decoder_input_ids = decoder_input_ids.repeat_interleave(n_docs, dim=0)
        if decoder_attention_mask is not None:
            decoder_attention_mask = decoder_attention_mask.repeat_interleave(n_docs, dim=0)

        generator_input_ids, generator_attention_mask = _trim_for_generator(
            context_input_ids,
            context_attention_mask,
            encoder_outputs,
            decoder_input_ids,
            output_attentions,
            output_hidden_states,
            use_cache,
        )
        gen_outputs = self.generator(
            input_ids=generator_input_ids,
            attention_mask=generator_attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

        gen_outputs = _restore_context_length(gen_outputs, context_input_ids, generator_input_ids)
        show_retrieved = has_to_retrieve and output_retrieved
        output = RetrievAugLMOutput(
            logits=gen_outputs.logits,
            doc_scores=doc_scores,
            cache=gen_outputs.cache,
            retrieved_doc_embeds=retrieved.retrieved_doc_embeds if show_retrieved else None,
            retrieved_doc_ids=retrieved.doc_ids if show_retrieved else None,
            context_input_ids=context_input_ids if show_retrieved else None,
            context_attention_mask=context_attention_mask if show_retrieved else None,
            question_encoder_last_hidden_state=question_vectors,
            question_enc_hidden_states=getattr(question_outputs, "hidden_states", None),
            question_enc_attentions=getattr(question_outputs, "attentions", None),
            generator_enc_last_hidden_state=gen_outputs.encoder_last_hidden_state,
            generator_enc_hidden_states=gen_outputs.encoder_hidden_states,
            generator_enc_attentions=gen_outputs.encoder_attentions,
            generator_dec_hidden_states=gen_outputs.decoder_hidden_states,
            generator_dec_attentions=gen_outputs.decoder_attentions,
            generator_cross_attentions=gen_outputs.cross_attentions,
        )
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class _RagHeadMixin:
    """Shared plumbing of the two heads: the constructor (see the heads' Args), the wrapped :class:`RagModel`
    and its parts, and ``forward`` around the head's own loss."""

    rag: RagModel

    def __init__(
        self,
        config: PretrainedConfig | None = None,
        question_encoder: PreTrainedModel | None = None,
        generator: PreTrainedModel | None = None,
        retriever: Any = None,
        **kwargs: Any,
    ):
        config = _rag_config(
            config,
            question_encoder,
            generator,
            kwargs,
            f"{type(self).__name__} needs a `config`, or both a `question_encoder` and a `generator`.",
        )
        super().__init__(config)
        self.rag = RagModel(
            config=config, question_encoder=question_encoder, generator=generator, retriever=retriever
        )
        self.post_init()

    @property
    def retriever(self) -> Any:
        """The retriever of the wrapped :class:`RagModel` (None when retrieval happens outside)."""
        return self.rag.retriever

    @property
    def generator(self) -> PreTrainedModel:
        """The seq2seq generator."""
        return self.rag.generator

    @property
    def question_encoder(self) -> PreTrainedModel:
        """The question encoder."""
        return self.rag.question_encoder

    def set_retriever(self, retriever: Any) -> None:
        """Use ``retriever`` for calls that pass questions (``input_ids``) rather than contexts."""
        self.rag.retriever = retriever

    def set_context_encoder_for_training(self, ctx_encoder: PreTrainedModel) -> None:
        """Train ``ctx_encoder`` end to end: documents are re-embedded with it in every forward pass.

        The retriever must return tokenized documents: call
        ``retriever.set_ctx_encoder_tokenizer(ctx_encoder_tokenizer)`` too.
        """
        self.rag.context_encoder_training = True
        self.rag.ctx_encoder = ctx_encoder

    def _labels_for_loss(self, labels: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """Validate labels, map -100 to pad, and warn once if they do not start with the start token."""
        _check_labels(labels, batch_size)
        labels = _replace_ignore_index(labels, self.config.generator.pad_token_id)
        starts = {
            self.config.bos_token_id,
            getattr(self.config.generator, "bos_token_id", None),
            self.config.decoder_start_token_id,
            getattr(self.config.generator, "decoder_start_token_id", None),
        } - {None}
        if starts and not getattr(self, "_warned_label_start", False):
            first = labels[:, 0]
            if not bool(sum(first.eq(token) for token in starts).bool().all()):
                self._warned_label_start = True
                logger.warning(
                    "`labels` do not start with the BOS/decoder start token (%s). RAG feeds labels as decoder "
                    "inputs and scores labels[:, 1:], so the first label token is never scored. Tokenize targets "
                    "with the generator tokenizer, which adds it.",
                    sorted(starts),
                )
        return labels

    def _head_forward(
        self,
        loss_and_logits: Callable[..., tuple[torch.Tensor | None, torch.Tensor]],
        labels: torch.Tensor | None,
        n_docs: int | None,
        reduce_loss: bool | None,
        label_smoothing: float | None,
        return_dict: bool | None,
        *,
        input_ids: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        context_input_ids: torch.Tensor | None,
        doc_scores: torch.Tensor | None,
        use_cache: bool | None,
        **rag_kwargs: Any,
    ) -> RetrievAugLMMarginOutput | tuple:
        """The heads' ``forward``: config defaults, labels checked, :class:`RagModel` run, output built.

        ``loss_and_logits(outputs, labels, decoder_input_ids, n_docs, reduce_loss, label_smoothing)`` is the
        head's own step, called with the checked labels, the decoder inputs fed and the resolved defaults: it
        returns the loss (None without labels) and the logits of the output.
        """
        n_docs = _check_n_docs(n_docs if n_docs is not None else self.config.n_docs)
        reduce_loss = reduce_loss if reduce_loss is not None else self.config.reduce_loss
        label_smoothing = label_smoothing if label_smoothing is not None else self.config.label_smoothing
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if labels is not None:
            self.rag._check_target_ids(labels, "labels", ignore_index=-100)
            labels = self._labels_for_loss(
                labels, _batch_size_of(input_ids, doc_scores, context_input_ids, n_docs)
            )
            if decoder_input_ids is None:
                decoder_input_ids = labels
            use_cache = False

        outputs = self.rag(
            input_ids=input_ids,
            decoder_input_ids=decoder_input_ids,
            context_input_ids=context_input_ids,
            doc_scores=doc_scores,
            use_cache=use_cache,
            n_docs=n_docs,
            return_dict=True,
            **rag_kwargs,
        )
        loss, logits = loss_and_logits(
            outputs, labels, decoder_input_ids, n_docs, reduce_loss, label_smoothing
        )
        output = _margin_output(outputs, loss, logits)
        return output if return_dict else output.to_tuple()


class RagSequenceForGeneration(_RagHeadMixin, RagPreTrainedModel):
    """RAG-Sequence: one document conditions the whole answer; marginalizes over documents per sequence.

    Args:
        config: A :class:`~ragkit.RagConfig`; built from the two models' configs when omitted.
        question_encoder: The question encoder; built from the config when omitted.
        generator: The seq2seq generator; built from the config when omitted.
        retriever: A :class:`~ragkit.RagRetriever`; optional.
        **kwargs: RAG config fields, used only when ``config`` is omitted.
    """

    _rag_head = "sequence"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        past_key_values: Cache | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        doc_scores: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_retrieved: bool | None = None,
        exclude_bos_score: bool | None = None,
        reduce_loss: bool | None = None,
        labels: torch.LongTensor | None = None,
        n_docs: int | None = None,
        label_smoothing: float | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RetrievAugLMMarginOutput | tuple:
        """Run :class:`RagModel` and, with ``labels``, the RAG-Sequence loss.

        Args:
            input_ids, attention_mask, encoder_outputs, decoder_input_ids, decoder_attention_mask,
            past_key_values, context_input_ids, context_attention_mask, doc_scores, use_cache,
            output_attentions, output_hidden_states, output_retrieved, n_docs, cache, token_type_ids, **kwargs:
                As in :meth:`RagModel.forward`.
            exclude_bos_score: Leave the BOS token's score out of the loss; defaults to the config.
            reduce_loss: Sum the loss over the batch; defaults to the config.
            labels: `(batch_size, target_length)` target ids starting with the BOS/decoder start token
                (as the generator tokenizer makes them); also used as ``decoder_input_ids`` when those are
                not given. -100 is treated as padding.
            label_smoothing: Epsilon of label smoothing; defaults to ``config.label_smoothing``.
            return_dict: Return a tuple when False.

        Returns:
            :class:`RetrievAugLMMarginOutput`; ``loss`` is `(batch_size,)` (a scalar with ``reduce_loss``).
        """
        exclude_bos_score = (
            exclude_bos_score if exclude_bos_score is not None else self.config.exclude_bos_score
        )

        def loss_and_logits(outputs, labels, decoder_input_ids, n_docs, reduce_loss, label_smoothing):
            if labels is None:
                return None, outputs.logits
            # The reference scores `decoder_input_ids` (equal to labels unless both are passed): kept for parity.
            loss = self.get_nll(
                outputs.logits,
                outputs.doc_scores,
                decoder_input_ids,
                reduce_loss=reduce_loss,
                epsilon=label_smoothing,
                exclude_bos_score=exclude_bos_score,
                n_docs=n_docs,
            )
            return loss, outputs.logits

        return self._head_forward(
            loss_and_logits,
            labels,
            n_docs,
            reduce_loss,
            label_smoothing,
            return_dict,
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            past_key_values=past_key_values,
            cache=cache,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            doc_scores=doc_scores,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_retrieved=output_retrieved,
            token_type_ids=token_type_ids,
            **kwargs,
        )

    def get_nll(
        self,
        seq_logits: torch.Tensor,
        doc_scores: torch.Tensor,
        target: torch.Tensor,
        reduce_loss: bool = False,
        epsilon: float = 0.0,
        exclude_bos_score: bool = False,
        n_docs: int | None = None,
    ) -> torch.Tensor:
        """RAG-Sequence negative log-likelihood of ``target``, marginalized over documents per sequence.

        Same numbers as the reference (which scores ``target[:, 1:]``; see docs/modeling.md), computed in
        float32 (float64 for float64 logits) by :func:`ragkit.losses.rag_sequence_nll` without a log-softmax
        of the logits; a row whose labels are all ignored contributes 0 (the reference gives it
        ``-log(n_docs)``).

        Args:
            seq_logits: `(batch_size * n_docs, target_length, vocab_size)` generator logits.
            doc_scores: `(batch_size, n_docs)`.
            target: `(batch_size, target_length)` or `(batch_size * k, ...)`, the decoder inputs.
            reduce_loss: Sum over the batch.
            epsilon: Label smoothing.
            exclude_bos_score: Leave the first target position out when targets start with BOS.
            n_docs: Documents per question; defaults to ``config.n_docs``.

        Returns:
            `(batch_size,)` losses, or a scalar with ``reduce_loss``.
        """
        from .losses import rag_sequence_nll

        # bos_token_id is None for T5
        bos_token_id = self.config.bos_token_id or getattr(self.config.generator, "bos_token_id", None)
        return rag_sequence_nll(
            seq_logits,
            to_device(doc_scores, seq_logits.device, "doc_scores"),
            to_device(target, seq_logits.device, "labels"),
            pad_token_id=self.config.generator.pad_token_id,
            bos_token_id=bos_token_id,
            n_docs=n_docs if n_docs is not None else self.config.n_docs,
            reduce_loss=reduce_loss,
            epsilon=epsilon,
            exclude_bos_score=exclude_bos_score,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        doc_scores: torch.Tensor | None = None,
        do_deduplication: bool | None = None,
        num_return_sequences: int | None = None,
        num_beams: int | None = None,
        n_docs: int | None = None,
        decoding: str = "thorough",
        decoding_options: Any = None,
        **model_kwargs: Any,
    ) -> torch.LongTensor:
        """RAG-Sequence decoding ("thorough" as the reference, or the paper's "fast"), batched.

        Args:
            input_ids: `(batch_size, question_length)` questions (with a retriever).
            attention_mask: `(batch_size, question_length)`.
            context_input_ids: `(batch_size * n_docs, length)` contexts (without a retriever).
            context_attention_mask: `(batch_size * n_docs, length)`.
            doc_scores: `(batch_size, n_docs)`.
            do_deduplication: Drop duplicate hypotheses per question; defaults to the config.
            num_return_sequences: Answers per question.
            num_beams: Beams per document.
            n_docs: Documents per question; defaults to ``config.n_docs``.
            decoding: ``"thorough"`` or ``"fast"``.
            decoding_options: A :class:`ragkit.generation.DecodingOptions` (paths, budgets; ``fast_path=False``
                leaves the generator's modules untouched); defaults when None.
            **model_kwargs: Generation options for the generator (``max_length``, ...); the question tokenizer's
                further outputs (``token_type_ids``) go to the question encoder.

        Returns:
            `(batch_size * num_return_sequences, sequence_length)` token ids.
        """
        from .generation import rag_sequence_generate

        question_device, generator_device = _part_devices(self.rag)
        input_ids = to_device(input_ids, question_device, "input_ids")
        attention_mask = to_device(attention_mask, question_device, "attention_mask")
        context_input_ids = to_device(context_input_ids, generator_device, "context_input_ids")
        context_attention_mask = to_device(context_attention_mask, generator_device, "context_attention_mask")
        doc_scores = to_device(doc_scores, generator_device, "doc_scores")
        return rag_sequence_generate(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            doc_scores=doc_scores,
            do_deduplication=do_deduplication,
            num_return_sequences=num_return_sequences,
            num_beams=num_beams,
            n_docs=n_docs,
            decoding=decoding,
            decoding_options=decoding_options,
            **model_kwargs,
        )

    @staticmethod
    def _cat_and_pad(tensors: list[torch.Tensor], pad_token_id: int) -> torch.Tensor:
        """Stack `(rows_i, length_i)` token-id tensors into one `(sum_i rows_i, max_i length_i)` tensor.

        Shorter rows are right-padded with ``pad_token_id``; the dtype and device are the first tensor's.
        Kept for decoding loops written for Transformers' RAG-Sequence, which call it on their hypotheses.
        """
        first = tensors[0]
        length = max(tensor.shape[1] for tensor in tensors)
        return torch.cat(
            [
                nn.functional.pad(tensor.to(first), (0, length - tensor.shape[1]), value=pad_token_id)
                for tensor in tensors
            ]
        )


def _marginalize_probabilities(seq_logits: torch.Tensor, doc_logprobs: torch.Tensor) -> torch.Tensor:
    """`(batch_size, length, vocab)` log of the document mixture of softmaxes, for decoding steps.

    ``log sum_d p(d) softmax(logits_d)`` is the same quantity as ``logsumexp_d(log p(d) + log_softmax(logits_d))``
    (the training path), computed with one fused softmax and a weighted sum over documents instead of
    a dozen passes over the `(batch_size * n_docs, vocab)` logits. Questions where some token's
    probability underflows float32 under every document are recomputed in log space, so every score
    is finite, as in the reference.

    Args:
        seq_logits: `(batch_size * n_docs, length, vocab)` generator logits.
        doc_logprobs: `(batch_size, n_docs)` log-softmax of the document scores, in the dtype the mixture is
            computed in (float32, or float64 for a float64 model).
    """
    batch_size, n_docs = doc_logprobs.shape
    _, length, vocab = seq_logits.shape
    probs = torch.softmax(seq_logits, dim=-1, dtype=doc_logprobs.dtype).view(
        batch_size, n_docs, length * vocab
    )
    # A weighted sum, not a matmul: TF32 (if enabled) would round the probabilities to 10-bit mantissas.
    mixture = probs.mul_(doc_logprobs.exp().unsqueeze(-1)).sum(dim=1)  # (batch_size, length * vocab)
    del probs
    underflow = mixture.eq(0).any(dim=1)  # (batch_size,)
    marginal = mixture.log_().view(batch_size, length, vocab)
    if bool(underflow.any()):
        # Probabilities below float32's range (log-probability < -103): redo those questions in log space,
        # so that scores stay finite, as in the reference (logits processors may add to any token's score).
        rows = underflow.nonzero().squeeze(1)
        logprobs = (
            torch.log_softmax(
                seq_logits.view(batch_size, n_docs, length, vocab)[rows].to(doc_logprobs.dtype), dim=-1
            )
            + doc_logprobs[rows][:, :, None, None]
        )
        marginal[rows] = torch.logsumexp(logprobs, dim=1)
    return marginal


class RagTokenForGeneration(_RagHeadMixin, RagPreTrainedModel, GenerationMixin):
    """RAG-Token: each generated token marginalizes over the documents.

    Args:
        config: A :class:`~ragkit.RagConfig`; built from the two models' configs when omitted.
        question_encoder: The question encoder; built from the config when omitted.
        generator: The seq2seq generator; built from the config when omitted.
        retriever: A :class:`~ragkit.RagRetriever`; optional.
        **kwargs: RAG config fields, used only when ``config`` is omitted.
    """

    _rag_head = "token"

    def marginalize(
        self, seq_logits: torch.Tensor, doc_scores: torch.Tensor, n_docs: int | None = None
    ) -> torch.Tensor:
        """Per-token log-probabilities marginalized over documents, in float32 (float64 for float64 logits).

        Args:
            seq_logits: `(batch_size * n_docs, length, vocab_size)` generator logits.
            doc_scores: `(batch_size, n_docs)`.
            n_docs: Documents per question; defaults to ``config.n_docs``.

        Returns:
            `(batch_size, length, vocab_size)` log-probabilities (float32, or float64 for float64 logits).
        """
        n_docs = n_docs if n_docs is not None else self.config.n_docs
        doc_scores = to_device(doc_scores, seq_logits.device, "doc_scores")
        dtype = compute_dtype(seq_logits)
        if _RAG_TOKEN_DECODING.get() and not torch.is_grad_enabled():
            return _marginalize_probabilities(seq_logits, torch.log_softmax(doc_scores.to(dtype), dim=1))
        seq_logprobs = nn.functional.log_softmax(seq_logits.to(dtype), dim=-1).view(
            seq_logits.shape[0] // n_docs, n_docs, -1, seq_logits.shape[-1]
        )
        doc_logprobs = torch.log_softmax(doc_scores.to(dtype), dim=1)[:, :, None, None]
        if seq_logprobs.requires_grad:
            seq_logprobs = seq_logprobs + doc_logprobs
        else:
            # Decoding: add the document prior in place rather than allocating another logits-sized tensor.
            seq_logprobs.add_(doc_logprobs)
        return torch.logsumexp(seq_logprobs, dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[tuple[torch.Tensor]] | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.BoolTensor | None = None,
        past_key_values: Cache | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        doc_scores: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_retrieved: bool | None = None,
        do_marginalize: bool | None = None,
        reduce_loss: bool | None = None,
        labels: torch.LongTensor | None = None,
        n_docs: int | None = None,
        label_smoothing: float | None = None,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RetrievAugLMMarginOutput | tuple:
        """Run :class:`RagModel` and, with ``labels``, the RAG-Token loss.

        Args:
            input_ids, attention_mask, encoder_outputs, decoder_input_ids, decoder_attention_mask,
            past_key_values, context_input_ids, context_attention_mask, doc_scores, use_cache,
            output_attentions, output_hidden_states, output_retrieved, n_docs, cache, token_type_ids, **kwargs:
                As in :meth:`RagModel.forward`.
            do_marginalize: Return logits marginalized over documents (log-probabilities in float32, or
                float64 for a float64 model); defaults to the config.
            reduce_loss: Sum the loss over the batch; defaults to the config.
            labels: `(batch_size, target_length)` target ids starting with the BOS/decoder start token; also
                the decoder inputs when ``decoder_input_ids`` are not given. -100 is treated as padding.
            label_smoothing: Epsilon of label smoothing; defaults to ``config.label_smoothing``.
            return_dict: Return a tuple when False.

        Returns:
            :class:`RetrievAugLMMarginOutput`.
        """
        do_marginalize = do_marginalize if do_marginalize is not None else self.config.do_marginalize

        def loss_and_logits(outputs, labels, decoder_input_ids, n_docs, reduce_loss, label_smoothing):
            loss = None
            logits = outputs.logits
            if labels is not None:
                loss = self.get_nll(
                    logits,
                    outputs.doc_scores,
                    labels,
                    reduce_loss=reduce_loss,
                    epsilon=label_smoothing,
                    n_docs=n_docs,
                )
            if do_marginalize:
                logits = self.marginalize(logits, outputs.doc_scores, n_docs)
            return loss, logits

        return self._head_forward(
            loss_and_logits,
            labels,
            n_docs,
            reduce_loss,
            label_smoothing,
            return_dict,
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            past_key_values=past_key_values,
            cache=cache,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            doc_scores=doc_scores,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_retrieved=output_retrieved,
            token_type_ids=token_type_ids,
            **kwargs,
        )

    def get_nll(
        self,
        seq_logits: torch.Tensor,
        doc_scores: torch.Tensor,
        target: torch.Tensor,
        reduce_loss: bool = False,
        epsilon: float = 0.0,
        n_docs: int | None = None,
    ) -> torch.Tensor:
        """RAG-Token negative log-likelihood of ``target[:, 1:]`` (as the reference), in float32 (float64 for
        float64 logits).

        Computed by :func:`ragkit.losses.rag_token_nll`: the document mixture is formed one chunk of
        positions at a time (only for label smoothing), never as a `(batch_size, length, vocab)` tensor.

        Args:
            seq_logits: `(batch_size * n_docs, target_length, vocab_size)` generator logits.
            doc_scores: `(batch_size, n_docs)`.
            target: `(batch_size, target_length)`.
            reduce_loss: Sum over the batch.
            epsilon: Label smoothing.
            n_docs: Documents per question; defaults to ``config.n_docs``.

        Returns:
            `(batch_size,)` losses, or a scalar with ``reduce_loss``.
        """
        from .losses import rag_token_nll

        return rag_token_nll(
            seq_logits,
            to_device(doc_scores, seq_logits.device, "doc_scores"),
            to_device(target, seq_logits.device, "labels"),
            pad_token_id=self.config.generator.pad_token_id,
            n_docs=n_docs if n_docs is not None else self.config.n_docs,
            reduce_loss=reduce_loss,
            epsilon=epsilon,
        )

    # ---- decoding -------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        decoder_input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        encoder_outputs: Any = None,
        doc_scores: torch.Tensor | None = None,
        n_docs: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Inputs of one decoding step: cached encoder outputs, last token, marginalized logits."""
        cache = _resolve_cache(past_key_values, cache)
        if cache is not None:
            decoder_input_ids = decoder_input_ids[:, -1:]
        return {
            "input_ids": None,
            "encoder_outputs": encoder_outputs,
            "doc_scores": doc_scores,
            "context_attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "cache": cache,
            "use_cache": use_cache,
            "do_marginalize": True,
            "n_docs": n_docs,
        }

    @staticmethod
    def _reorder_cache(*args: Any) -> Cache:
        """Follow the chosen beams: one ``index_select`` per self-attention tensor, cache updated in place.

        Called as ``(cache, beam_idx)``: a static method as in Transformers
        (``RagTokenForGeneration._reorder_cache(cache, beam_idx)``) or on a model
        (``model._reorder_cache(cache, beam_idx)``, as beam search calls it). A leading model argument,
        ``(model, cache, beam_idx)``, is accepted and ignored, so code that saved the class attribute and
        calls it as a method keeps working.

        The cache holds `batch_size * num_beams * n_docs` rows; row ``beam * n_docs + d`` moves with its beam.
        Cross-attention states are left alone: they come from the encoder outputs, identical for all beams of
        a question, and beams are only ever reordered within a question.
        """
        if len(args) not in (2, 3):
            raise TypeError(f"_reorder_cache takes (cache, beam_idx), got {len(args)} positional arguments.")
        cache, beam_idx = args[-2:]
        return reorder_document_rows(cache, beam_idx)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        doc_scores: torch.Tensor | None = None,
        n_docs: int | None = None,
        generation_config: GenerationConfig | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """RAG-Token decoding: greedy, beam search or sampling over document-marginalized token scores.

        The generator's encoder runs once on the `batch_size * n_docs` contexts; each step runs the decoder
        on `batch_size * num_beams * n_docs` rows and marginalizes their log-probabilities over documents.

        Args:
            input_ids: `(batch_size, question_length)` questions (with a retriever).
            attention_mask: `(batch_size, question_length)`.
            context_input_ids: `(batch_size * n_docs, length)` contexts (without a retriever).
            context_attention_mask: `(batch_size * n_docs, length)`.
            doc_scores: `(batch_size, n_docs)`.
            n_docs: Documents per question; defaults to ``config.n_docs``.
            generation_config: Base generation parameters; ``kwargs`` override them.
            prefix_allowed_tokens_fn: Constrains each step to the tokens it returns for ``(batch_id, ids)``.
            logits_processor: Extra logits processors.
            stopping_criteria: Extra stopping criteria.
            **kwargs: Generation options (``num_beams``, ``max_length``, ``max_new_tokens``, ``num_return_sequences``,
                ...). ``max_length`` counts the decoder start token (default 20, as in Transformers' RAG-Token);
                ``max_new_tokens`` (honoured here, ignored by Transformers' RAG-Token) counts the tokens after it
                and takes precedence over ``max_length``. The question tokenizer's further outputs
                (``token_type_ids``) go to the question encoder. Counts out of range (``num_beams=0``,
                ``max_length=0``, ``num_return_sequences`` above ``num_beams`` in beam search, ...) raise
                :class:`ragkit.errors.RagInputError`.

        Returns:
            `(batch_size * num_return_sequences, sequence_length)` token ids (or a generate output object with
            ``return_dict_in_generate=True``).
        """
        from .generation import rag_token_generate

        return rag_token_generate(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            doc_scores=doc_scores,
            n_docs=n_docs,
            generation_config=generation_config,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **kwargs,
        )

    # ---- embeddings -------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        """The generator's input embeddings."""
        return self.rag.generator.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The generator's LM head."""
        return self.rag.generator.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Replace the generator's LM head."""
        return self.rag.generator.set_output_embeddings(new_embeddings)

    def shift_tokens_right(self, input_ids: torch.Tensor, start_token_id: int | None = None) -> torch.Tensor:
        """Shift `(batch_size, length)` ids one position right, filling position 0 with ``start_token_id``."""
        if start_token_id is None:
            start_token_id = self.config.decoder_start_token_id
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[:, 1:] = input_ids[:, :-1].clone()
        shifted[:, 0] = start_token_id
        return shifted
