"""RAG-Token decoding: Transformers' search loops (greedy, sampling, beam search) over document-marginalized
token scores, behind ``RagTokenForGeneration.generate``.

The generator's encoder runs once on the `batch_size * n_docs` contexts (without their trailing padding);
each step runs the decoder on `batch_size * num_beams * n_docs` rows and the model's ``marginalize`` mixes
their distributions over documents (``prepare_inputs_for_generation`` asks for it). The search loops are
``GenerationMixin``'s own, reached through :mod:`ragkit._compat`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerationMode

from .. import _compat
from .._accelerators import module_device, to_device
from ..errors import RagInputError
from .arguments import check_count, check_generation_kwargs
from .calls import RAG_TOKEN_DECODING
from .contexts import pop_question_encoder_kwargs, require_context_mask, retrieve_for_generate, trimmed

__all__ = ["rag_token_generate"]

# Generation modes RAG-Token decoding supports: the ones whose step is "score the next token".
_RAG_TOKEN_MODES = (
    GenerationMode.SAMPLE,
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
)
_BEAM_MODES = (GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)


def _check_generation_config(generation_config: GenerationConfig, generation_mode: GenerationMode) -> None:
    """Counts of the final generation config (the caller's and the model's defaults merged), with their limits."""
    for name, least in (
        ("num_beams", 1),
        ("num_return_sequences", 1),
        ("max_length", 1),
        ("max_new_tokens", 1),
        ("min_length", 0),
    ):
        check_count(name, getattr(generation_config, name, None), least)
    if (
        generation_mode in _BEAM_MODES
        and generation_config.num_return_sequences > generation_config.num_beams
    ):
        raise RagInputError(
            f"`num_return_sequences` ({generation_config.num_return_sequences}) must be at most `num_beams` "
            f"({generation_config.num_beams}) for beam search; raise `num_beams`."
        )


def _check_supported_options(generation_config: GenerationConfig) -> None:
    """Refuse the options RAG-Token decoding cannot honour, naming them (Transformers fails deep in its loop)."""
    # Each step's inputs hold n_docs contexts per hypothesis, so "the encoder input" of a hypothesis is not
    # one sequence: the processors that compare generated tokens with it cannot line rows up.
    if getattr(generation_config, "encoder_repetition_penalty", None) not in (None, 1.0):
        raise RagInputError(
            "`encoder_repetition_penalty` is not supported by RagTokenForGeneration.generate: each hypothesis "
            "reads n_docs contexts, not one encoder input. Leave it at 1.0 (use `repetition_penalty` instead)."
        )
    if getattr(generation_config, "encoder_no_repeat_ngram_size", None):
        raise RagInputError(
            "`encoder_no_repeat_ngram_size` is not supported by RagTokenForGeneration.generate: each hypothesis "
            "reads n_docs contexts, not one encoder input. Leave it at 0 (use `no_repeat_ngram_size` instead)."
        )
    if getattr(generation_config, "return_dict_in_generate", False):
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, name, False):
                raise RagInputError(
                    f"`{name}=True` with `return_dict_in_generate=True` is not supported by "
                    "RagTokenForGeneration.generate (its steps mix n_docs generator rows per hypothesis). Call "
                    f"the model's forward on the generated ids with `{name}=True` to inspect them."
                )


def _refuse_decoder_prompt(kwargs: dict[str, Any]) -> None:
    """Refuse a decoder prompt, naming it (Transformers' RAG-Token fails with a TypeError deep in its loop)."""
    if kwargs.get("decoder_input_ids") is not None:
        raise RagInputError(
            "`decoder_input_ids` is not supported by RagTokenForGeneration.generate: decoding always starts "
            "from the generator's decoder start token (no decoder prompt). Leave it out; to score given "
            "answers, call the model with `labels` instead."
        )


def _contexts(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    context_input_ids: torch.Tensor | None,
    context_attention_mask: torch.Tensor | None,
    doc_scores: torch.Tensor | None,
    n_docs: int,
    question_encoder_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contexts, their mask and doc scores on the generator's device, retrieved when not given."""
    if context_input_ids is None:
        context_input_ids, context_attention_mask, doc_scores = retrieve_for_generate(
            model, input_ids, attention_mask, n_docs, question_encoder_kwargs
        )
    else:
        require_context_mask(context_attention_mask)
    model.rag._check_contexts(
        doc_scores, context_input_ids, None, n_docs, context_attention_mask=context_attention_mask
    )
    generator_device = module_device(model.rag.generator)
    context_input_ids = to_device(context_input_ids, generator_device, "context_input_ids")
    context_attention_mask = to_device(context_attention_mask, generator_device, "context_attention_mask")
    doc_scores = to_device(doc_scores, generator_device, "doc_scores")
    return context_input_ids, context_attention_mask, doc_scores


@torch.no_grad()
def rag_token_generate(
    model: Any,
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
    """RAG-Token decoding for a whole batch (backs ``RagTokenForGeneration.generate``; same arguments).

    Args:
        model: A :class:`~ragkit.RagTokenForGeneration`.
        input_ids, attention_mask, context_input_ids, context_attention_mask, doc_scores, n_docs,
        generation_config, prefix_allowed_tokens_fn, logits_processor, stopping_criteria: As in
            :meth:`ragkit.RagTokenForGeneration.generate`.
        **kwargs: Generation options; the question tokenizer's further outputs (``token_type_ids``) go to
            the question encoder. ``decoding_options`` is accepted (and unused: RAG-Token has no fast path).

    Returns:
        `(batch_size * num_return_sequences, sequence_length)` token ids (or a generate output object with
        ``return_dict_in_generate=True``).

    Raises:
        RagInputError: ``decoder_input_ids`` (decoding starts from the decoder start token), contexts without
            ``context_attention_mask`` or that ``forward`` would refuse, counts out of range, generation
            modes or options RAG-Token decoding cannot honour.
    """
    kwargs.pop("decoding_options", None)
    _refuse_decoder_prompt(kwargs)
    question_encoder_kwargs = pop_question_encoder_kwargs(model.rag.question_encoder, kwargs)
    n_docs = check_count("n_docs", n_docs, 1)
    check_generation_kwargs(kwargs)
    base_config = generation_config if generation_config is not None else model.generation_config
    num_beams = kwargs.get("num_beams", getattr(base_config, "num_beams", None)) or 1
    num_return_sequences = (
        kwargs.get("num_return_sequences", getattr(base_config, "num_return_sequences", None)) or 1
    )
    if num_beams > 1 and num_return_sequences > num_beams:
        raise RagInputError(
            f"`num_return_sequences` ({num_return_sequences}) must be at most `num_beams` ({num_beams}) for "
            "beam search; raise `num_beams`."
        )
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    mode_kwargs = _compat.generation_mode_kwargs(model, kwargs)
    # As GenerationMixin.generate, before defaults are filled in: did the caller (or a generation config)
    # set max_length / min_length? Decides whether `max_new_tokens` overriding them warns.
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    generation_config, model_kwargs = _compat.prepare_generation_config(model, generation_config, kwargs)
    generation_mode = generation_config.get_generation_mode()
    if generation_mode not in _RAG_TOKEN_MODES:
        raise RagInputError(
            f"RagTokenForGeneration.generate supports greedy, sampling and beam search, not {generation_mode}; "
            "check `num_beam_groups`, `penalty_alpha`, `assistant_model` and similar options."
        )
    _check_generation_config(generation_config, generation_mode)
    _check_supported_options(generation_config)
    decoding_method = _compat.decoding_method(model, generation_mode)
    _compat.validate_generation(model, model_kwargs, generation_mode, generation_config, mode_kwargs)

    n_docs = n_docs if n_docs is not None else model.config.n_docs
    context_input_ids, context_attention_mask, doc_scores = _contexts(
        model,
        input_ids,
        attention_mask,
        context_input_ids,
        context_attention_mask,
        doc_scores,
        n_docs,
        question_encoder_kwargs,
    )
    batch_size = context_input_ids.shape[0] // n_docs
    # The encoder and cross-attention run on the longest real context, not on max_combined_length; logits
    # processors that read the encoder ids still see them as given.
    trimmed_ids, trimmed_mask = trimmed(context_input_ids, context_attention_mask)
    encoder_outputs = model.rag.generator.get_encoder()(
        input_ids=trimmed_ids, attention_mask=trimmed_mask, return_dict=True
    )
    # Beam modes keep num_beams hypotheses per question; sampling draws num_return_sequences of them.
    if generation_mode in _BEAM_MODES:
        expand = generation_config.num_beams
    elif generation_mode == GenerationMode.SAMPLE:
        expand = generation_config.num_return_sequences or 1
    else:
        expand = 1

    def _expand(tensor: torch.Tensor) -> torch.Tensor:
        # (batch * n_docs, ...) -> (batch * expand * n_docs, ...): each hypothesis sees all its documents.
        if expand == 1:
            return tensor
        tensor = tensor.reshape((batch_size, 1, n_docs, *tensor.shape[1:]))
        tensor = tensor.expand((batch_size, expand, n_docs, *tensor.shape[3:]))
        return tensor.reshape((batch_size * expand * n_docs, *tensor.shape[3:]))

    encoder_outputs["last_hidden_state"] = _expand(encoder_outputs["last_hidden_state"])
    model_kwargs["attention_mask"] = _expand(trimmed_mask)
    model_kwargs["doc_scores"] = doc_scores.repeat_interleave(expand, dim=0)
    model_kwargs["encoder_outputs"] = encoder_outputs
    model_kwargs["n_docs"] = n_docs
    model_kwargs["use_cache"] = generation_config.use_cache

    decoder_input_ids = torch.full(
        (batch_size * expand, 1),
        generation_config.decoder_start_token_id,
        dtype=torch.long,
        device=context_input_ids.device,
    )
    if generation_config.max_new_tokens is not None:
        # Transformers' RAG-Token generate ignores max_new_tokens (it decodes up to max_length, 20 by default).
        # Here it counts the tokens after the decoder start token, as in a bare encoder-decoder's generate:
        # max_length becomes max_new_tokens + 1 (min_new_tokens likewise), and max_new_tokens wins over an
        # explicit max_length, with Transformers' warning. Without max_new_tokens the lengths stay the
        # reference's: a default max_length is not extended by the start token as GenerationMixin.generate does.
        generation_config = _compat.apply_max_new_tokens(
            model,
            generation_config,
            has_default_max_length,
            has_default_min_length,
            context_input_ids,
            decoder_input_ids.shape[-1],
        )
    prepared_logits_processor, prepared_stopping_criteria = _compat.logits_processors_and_stopping(
        model,
        generation_config,
        decoder_input_ids.shape[-1],
        context_input_ids,
        prefix_allowed_tokens_fn,
        logits_processor,
        stopping_criteria,
        decoder_input_ids.device,
    )
    _compat.prepare_cache(model, generation_config, model_kwargs, decoder_input_ids.shape[0])
    # A context variable, not a model attribute: another thread's forward on this model meanwhile keeps the
    # log-space marginalization, and a generate nested in a callback restores the outer state on exit.
    token = RAG_TOKEN_DECODING.set(True)
    try:
        return decoding_method(
            model,
            decoder_input_ids,
            logits_processor=prepared_logits_processor,
            stopping_criteria=prepared_stopping_criteria,
            generation_config=generation_config,
            **mode_kwargs,
            **model_kwargs,
        )
    finally:
        RAG_TOKEN_DECODING.reset(token)
