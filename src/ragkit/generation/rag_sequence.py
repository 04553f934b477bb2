"""RAG-Sequence decoding: batched "thorough" decoding and the RAG paper's "fast" decoding.

Transformers' ``RagSequenceForGeneration.generate`` handles one question at a time, runs the generator
without the context attention mask, and scores hypotheses by re-running the whole model (question encoder,
retrieval and generator encoder). Here every question of the batch is decoded by one generator ``generate``
call (:func:`ragkit.generation.search.generate_hypotheses`), the generator's encoder runs once on the
contexts without their trailing padding and its outputs are reused to score hypotheses by teacher forcing
(:mod:`.scoring`), the context attention mask is honoured throughout, and a non-default ``n_docs`` is used
everywhere.

Decoding modes:

- ``"thorough"``: every (deduplicated) hypothesis of a question is scored against every document of that
  question, exactly as Transformers' RAG-Sequence loss does (:func:`ragkit.losses.sequence_target_rules`).
- ``"fast"``: a hypothesis counts only under the documents whose beam produced it (:mod:`.fast`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from ..errors import RagInputError
from ..losses import sequence_target_rules
from .arguments import check_count, check_generation_kwargs
from .calls import decoding_call, generator_lock
from .contexts import pop_question_encoder_kwargs, resolve_contexts, trimmed
from .fast import eos_ids, fast_scores, generated_log_likelihoods
from .options import DecodingOptions, resolve_options
from .probe import FastPathVerdicts, fast_path_verdicts
from .scoring import thorough_scores
from .search import (
    candidate_groups,
    generate_hypotheses,
    generated_pair_log_likelihoods,
    known_pairs,
    producer_rows,
    searches_with_own_cache,
)

__all__ = ["DECODING_MODES", "rag_sequence_generate"]

logger = logging.getLogger(__name__)

#: Accepted values of ``decoding``.
DECODING_MODES = ("thorough", "fast")


def _resolve_decoding_settings(
    model: Any,
    do_deduplication: bool | None,
    num_return_sequences: int | None,
    num_beams: int | None,
    n_docs: int | None,
    decoding: str,
) -> tuple[bool, int, int, int]:
    """Fill defaults from the config (as Transformers does) and validate them."""
    if decoding not in DECODING_MODES:
        raise RagInputError(f"`decoding` must be one of {DECODING_MODES}, got {decoding!r}.")
    config = model.config
    n_docs = n_docs if n_docs is not None else config.n_docs
    do_deduplication = do_deduplication if do_deduplication is not None else config.do_deduplication
    num_return_sequences = (
        num_return_sequences
        if num_return_sequences is not None
        else getattr(config, "num_return_sequences", 1)
    )
    num_beams = num_beams if num_beams is not None else getattr(config, "num_beams", 1)
    n_docs = check_count("n_docs", n_docs, 1)
    num_beams = check_count("num_beams", num_beams, 1)
    num_return_sequences = check_count("num_return_sequences", num_return_sequences, 1)
    if not 1 <= num_return_sequences <= n_docs * num_beams:
        raise RagInputError(
            f"`num_return_sequences` must be between 1 and n_docs * num_beams = {n_docs * num_beams}, "
            f"got {num_return_sequences}; raise `num_beams` or `n_docs`."
        )
    return bool(do_deduplication), int(num_return_sequences), int(num_beams), int(n_docs)


def _per_document(
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]], n_docs: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """``prefix_allowed_tokens_fn`` called with the document's index within its question as ``batch_id``.

    The reference runs one generator ``generate`` per question on its `n_docs` contexts, so ``batch_id`` is
    the document index (0..n_docs-1); here one call decodes the `(questions * n_docs)` contexts of many
    questions, question after question, so the context row modulo ``n_docs`` is that index.
    """

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        return prefix_allowed_tokens_fn(batch_id % n_docs, ids)

    return allowed


def _decode_questions(
    model: Any,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    doc_scores: torch.Tensor,
    deduplicate: bool,
    num_return_sequences: int,
    num_beams: int,
    n_docs: int,
    decoding: str,
    model_kwargs: dict[str, Any],
    options: DecodingOptions,
    verdicts: FastPathVerdicts,
) -> torch.Tensor:
    """`(batch_size, num_return_sequences, tgt_len)` best hypotheses (pad rows where fewer candidates exist)."""
    generator = model.generator
    pad = model.config.generator.pad_token_id
    batch_size = doc_scores.shape[0]
    # The encoder and cross-attention run on the longest real context, not on max_combined_length.
    context_input_ids, context_attention_mask = trimmed(context_input_ids, context_attention_mask)
    if context_attention_mask is not None and bool(context_attention_mask.bool().all()):
        context_attention_mask = None

    # The generator's encoder runs once; generation and scoring both read its outputs.
    encoder_states = generator.get_encoder()(
        input_ids=context_input_ids, attention_mask=context_attention_mask, return_dict=True
    ).last_hidden_state

    kwargs = dict(model_kwargs)
    sequences, beam_indices, recorder, steps, cross_attention = generate_hypotheses(
        model,
        encoder_states,
        context_input_ids,
        context_attention_mask,
        num_beams,
        decoding,
        kwargs,
        options,
        verdicts.shared_cross_attention,
        step_hooks=verdicts.step_hooks,
    )
    rows_per_question = n_docs * num_beams
    groups = candidate_groups(sequences, rows_per_question, deduplicate)
    candidate_rows = torch.tensor([r for g in groups for r in g], device=sequences.device)
    candidate_question = torch.tensor([q for q, g in enumerate(groups) for _ in g], device=sequences.device)
    doc_logprobs = torch.log_softmax(doc_scores.float(), dim=-1)

    if recorder is None:
        # As Transformers: the leading BOS target is left out of a question's scores when all its candidates have it.
        # T5 configs have no bos_token_id attribute at all (Transformers' own scoring crashes there).
        bos = getattr(model.config, "bos_token_id", None) or getattr(
            model.config.generator, "bos_token_id", None
        )
        if bos is None or sequences.shape[1] < 2:
            use_bos = torch.zeros(batch_size, dtype=torch.bool, device=sequences.device)
        else:
            not_bos = sequences[candidate_rows, 1].ne(bos).long()
            use_bos = torch.zeros(batch_size, dtype=torch.long, device=sequences.device)
            use_bos = use_bos.index_add_(0, candidate_question, not_bos).eq(0)
        known = None
        if steps is not None and (num_beams == 1 or beam_indices is not None):
            _, scored, _ = sequence_target_rules(sequences, pad, use_bos.repeat_interleave(rows_per_question))
            row_ll = generated_pair_log_likelihoods(
                steps, sequences, beam_indices if num_beams > 1 else None, scored
            )
            known = known_pairs(
                producer_rows(sequences, groups, rows_per_question), row_ll, n_docs, num_beams
            )
        args = (
            model,
            encoder_states,
            context_attention_mask,
            doc_logprobs,
            sequences,
            candidate_rows,
            candidate_question,
            use_bos,
        )
        keywords = dict(
            keep=num_return_sequences,
            known=known,
            cross_attention=cross_attention,
            search=steps if known is not None else None,
            fast_path=verdicts.packed_scoring,
        )
        if options.trace is not None:
            options.trace.scoring_calls.append((args, dict(keywords)))
            if options.trace.before_scoring is not None:
                options.trace.before_scoring()
        scores = thorough_scores(*args, **keywords, options=options)
        del steps, args, keywords
    else:
        generated_ll = generated_log_likelihoods(
            recorder, sequences, beam_indices, eos_ids(generator, kwargs)
        )
        producers = producer_rows(sequences, groups, rows_per_question)
        scores = fast_scores(generated_ll, producers, doc_logprobs, num_beams)

    best = sequences.new_full((batch_size, num_return_sequences, sequences.shape[1]), pad)
    offset = 0
    for q, group in enumerate(groups):
        group_scores = scores[offset : offset + len(group)]
        k = min(num_return_sequences, len(group))
        if k < num_return_sequences:
            logger.warning(
                "Question %d has %d distinct hypotheses, fewer than num_return_sequences=%d: padding the rest.",
                q,
                len(group),
                num_return_sequences,
            )
        top = group_scores.topk(k).indices
        best[q, :k] = sequences[candidate_rows[offset + top]]
        offset += len(group)
    return best


def _shared_cross_attention(
    generator: Any, num_beams: int, model_kwargs: dict[str, Any], options: DecodingOptions
) -> bool:
    """Whether beam search will compute each context's cross-attention keys/values once (the shared path).

    Decided as :func:`~ragkit.generation.search.search_contexts` decides it: the shared path's verdict and
    beam search with a cache of its own. The verdict is kept per generator; it is looked up here without
    the trace, which records decoding's own look-ups.
    """
    return searches_with_own_cache(generator, num_beams, model_kwargs) and bool(
        fast_path_verdicts(generator, options.replace(trace=None)).shared_cross_attention
    )


def _questions_fitting(
    generator: Any,
    n_docs: int,
    num_beams: int,
    context_length: int,
    model_kwargs: dict[str, Any],
    budget_bytes: int,
    *,
    shared_cross_attention: bool,
) -> int:
    """How many questions one generator call may decode within ``budget_bytes`` (at least 1).

    Budgets what beam search holds at once, per question: with ``D`` documents, ``B`` beams, ``R = D * B``
    beam rows, ``L`` decoder layers of width ``h``, ``e`` bytes per element, ``S`` context tokens, ``T``
    generated tokens and a vocabulary of ``V``::

          D * L * 2 * S * h * e          cross-attention keys/values on the shared path (BART family:
                                         each context's, read by all its beams; other decoders
                                         also get copies per beam row, never reordered: R * (L + 1)
                                         more)
      (or R * (L + 1) * 2 * S * h * e    a copy per beam row, ``shared_cross_attention=False``)
        + R * (L + 1) * 2 * T * h * e    self-attention cache
        + D * S * h * e                  encoder states: the contexts' (on the shared path the search
                                         reads only their shape where the decoder is known to, and
                                         generate's copy per beam row is of a zero-width stand-in;
                                         else R * S * h * e more: that copy)
        + R * V * (e + 4 * 4)            one step's logits: the model's, then a float32 copy, its
                                         log-softmax and the logits processors' outputs
        + R * T * h * e                  decoder states the generation-step hooks keep (thorough decoding)

    A cache search extends or reorders counts one layer more than the model has: the new tensor of a
    layer is made before the old one is freed (the shared keys/values are made once, before the search;
    the cache's copy of a layer's per-beam keys/values is made before the repeated ones are freed).
    The cross-attention keys/values dominate (14 MiB per context for BART-large at 300 tokens in bf16):
    a copy per beam row instead of per context (and generate's copy of the encoder states) makes a
    question 3.2 times bigger at 5 documents and 4 beams, and an unbounded batch can exhaust a GPU that
    decodes question by question comfortably. The transients do not all peak at the same step: the sum
    errs high, by under 10% at the shapes measured.
    """
    config = generator.config
    layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or 1
    hidden = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 1
    vocab = getattr(config, "vocab_size", 1)
    # The embeddings' dtype is the caches' (quantized linear layers would report their packed storage).
    element = generator.get_input_embeddings().weight.element_size()
    if "max_new_tokens" in model_kwargs:
        length = int(model_kwargs["max_new_tokens"]) + 1
    else:
        length = int(model_kwargs.get("max_length") or generator.generation_config.max_length or 20)
    rows = n_docs * max(num_beams, 1)
    if not shared_cross_attention:  # Transformers' cache: a copy per row, reordered at each step
        cross_layers = rows * (layers + 1)
    elif _compat.shareable_cross_attention_layers(generator) is not None:
        cross_layers = n_docs * layers
    else:
        cross_layers = n_docs * layers + rows * (layers + 1)
    question = cross_layers * 2 * context_length * hidden * element
    question += rows * (layers + 1) * 2 * length * hidden * element
    # Generate's copy of the encoder states per beam row: empty where the search reads only their shape.
    unread = shared_cross_attention and _compat.encoder_states_read_for_shape_only(generator)
    question += (n_docs if unread else n_docs + rows) * context_length * hidden * element
    question += rows * vocab * (element + 4 * 4)
    question += rows * length * hidden * element
    return max(1, int(budget_bytes // question))


@torch.no_grad()
def rag_sequence_generate(
    model: Any,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.LongTensor | None = None,
    context_input_ids: torch.LongTensor | None = None,
    context_attention_mask: torch.LongTensor | None = None,
    doc_scores: torch.FloatTensor | None = None,
    do_deduplication: bool | None = None,
    num_return_sequences: int | None = None,
    num_beams: int | None = None,
    n_docs: int | None = None,
    decoding: str = "thorough",
    decoding_options: DecodingOptions | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """RAG-Sequence generation for a whole batch at once (backs ``RagSequenceForGeneration.generate``).

    Args:
        model: A RAG-Sequence model: ``config``, ``generator``, ``question_encoder`` and ``retriever``.
        input_ids: `(batch_size, question_len)` question ids; used to retrieve when no contexts are given.
        attention_mask: `(batch_size, question_len)` question mask.
        context_input_ids: `(batch_size * n_docs, context_len)` retrieved contexts (skips retrieval).
        context_attention_mask: `(batch_size * n_docs, context_len)` their mask; required with
            ``context_input_ids`` (``torch.ones_like(context_input_ids)`` for contexts without padding).
        doc_scores: `(batch_size, n_docs)` question-document scores; required with ``context_input_ids``.
        do_deduplication: Drop repeated hypotheses of a question (default ``config.do_deduplication``).
        num_return_sequences: Hypotheses returned per question (default 1).
        num_beams: Beams per (question, document) (default 1: greedy).
        n_docs: Documents per question (default ``config.n_docs``).
        decoding: ``"thorough"`` (score every hypothesis under every document) or ``"fast"`` (a
            hypothesis counts only under the documents whose beam produced it; no extra forward pass).
        decoding_options: Paths and budgets (:class:`~ragkit.generation.DecodingOptions`); defaults when None.
            ``DecodingOptions(fast_path=False)`` leaves the generator's modules untouched.
        **model_kwargs: Passed to the generator's ``generate`` (``max_length``, ``min_length``, ...), except
            the question tokenizer's further outputs (``token_type_ids``), which go to the question encoder.
            ``questions_per_batch`` (ragkit only) decodes that many questions per generator call to
            cap memory; by default the whole batch goes at once, except on CUDA where as many questions
            go together as fit in half the free GPU memory (same output either way).
            ``prefix_allowed_tokens_fn(batch_id, ids)`` gets, as in the reference, the document's index
            within its question as ``batch_id`` (0..n_docs-1). Custom ``logits_processor`` and
            ``stopping_criteria`` see the rows of a generator call over several questions: `(questions *
            n_docs * num_beams, length)` ids, question after question, each question's documents in order
            and each document's beams together (the reference's calls hold one question's
            `(n_docs * num_beams, length)` rows). ``output_scores`` and ``output_logits`` are accepted and
            ignored, as in the reference (token ids are returned); ``return_dict_in_generate`` is refused.

    Returns:
        `(batch_size * num_return_sequences, tgt_len)` token ids, best first per question, padded
        with the generator's pad token.

    Raises:
        RagInputError: Contexts without ``context_attention_mask`` or ``doc_scores``, contexts ``forward``
            would refuse (ids outside the generator's vocabulary or positions, float ids, zero-length rows,
            non-float or numpy ``doc_scores``, shapes that disagree with ``n_docs``), counts out of range.
    """
    options = resolve_options(decoding_options)
    do_deduplication, num_return_sequences, num_beams, n_docs = _resolve_decoding_settings(
        model, do_deduplication, num_return_sequences, num_beams, n_docs, decoding
    )
    questions_per_batch = model_kwargs.pop("questions_per_batch", None)
    question_encoder_kwargs = pop_question_encoder_kwargs(model.question_encoder, model_kwargs)
    if "return_dict_in_generate" in model_kwargs:
        raise RagInputError(
            "`return_dict_in_generate` is not supported by RagSequenceForGeneration.generate: it returns the "
            "best hypotheses' token ids. Leave it out."
        )
    # As in the reference, whose generator returns ids without return_dict_in_generate: accepted and ignored
    # (dropped, so that the search does not keep per-step scores for nothing).
    model_kwargs.pop("output_scores", None)
    model_kwargs.pop("output_logits", None)
    check_generation_kwargs(model_kwargs)
    if model_kwargs.get("prefix_allowed_tokens_fn") is not None:
        model_kwargs["prefix_allowed_tokens_fn"] = _per_document(
            model_kwargs["prefix_allowed_tokens_fn"], n_docs
        )
    model_kwargs.pop("attention_mask", None)  # the context mask is used instead
    if decoding == "fast":
        do_sample = model_kwargs.get("do_sample", model.generator.generation_config.do_sample)
        if do_sample:
            raise RagInputError(
                "decoding='fast' needs greedy or beam search; pass do_sample=False or decoding='thorough'."
            )

    context_input_ids, context_attention_mask, doc_scores = resolve_contexts(
        model,
        input_ids,
        attention_mask,
        context_input_ids,
        context_attention_mask,
        doc_scores,
        n_docs,
        question_encoder_kwargs,
    )
    context_input_ids, context_attention_mask = trimmed(context_input_ids, context_attention_mask)
    batch_size = doc_scores.shape[0]
    if questions_per_batch is None:
        step = batch_size
        if context_input_ids.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(context_input_ids.device)
            step = _questions_fitting(
                model.generator,
                n_docs,
                num_beams,
                context_input_ids.shape[1],
                model_kwargs,
                free // 2,
                shared_cross_attention=_shared_cross_attention(
                    model.generator, num_beams, model_kwargs, options
                ),
            )
            if step < batch_size:
                logger.info(
                    "Decoding %d questions per generator call (of %d) to stay within half the free GPU memory; "
                    "pass questions_per_batch to choose.",
                    step,
                    batch_size,
                )
    else:
        step = int(questions_per_batch)
    if step < 1:
        raise RagInputError(f"`questions_per_batch` must be a positive integer, got {questions_per_batch}.")

    parts = []
    for first in range(0, batch_size, step):
        last = min(batch_size, first + step)
        rows = slice(first * n_docs, last * n_docs)
        with generator_lock(model.generator):
            verdicts = fast_path_verdicts(model.generator, options)
            with decoding_call():
                decoded = _decode_questions(
                    model,
                    context_input_ids[rows],
                    None if context_attention_mask is None else context_attention_mask[rows],
                    doc_scores[first:last],
                    do_deduplication,
                    num_return_sequences,
                    num_beams,
                    n_docs,
                    decoding,
                    model_kwargs,
                    options,
                    verdicts,
                )
        parts.append(decoded)
    pad = model.config.generator.pad_token_id
    width = max(part.shape[-1] for part in parts)
    output = parts[0].new_full((batch_size, num_return_sequences, width), pad)
    first = 0
    for part in parts:
        output[first : first + part.shape[0], :, : part.shape[-1]] = part
        first += part.shape[0]
    return output.view(batch_size * num_return_sequences, width)
