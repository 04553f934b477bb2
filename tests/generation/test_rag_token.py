"""RagTokenForGeneration.generate: token-identical to transformers' RAG-Token decoding, and lean.

Both models share weights (redrawn so that outputs vary); every comparison is exact (token ids).
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rag_helpers import retrieved_contexts
from ragkit.modeling_rag import _RAG_TOKEN_DECODING

MAX_LENGTH = 9
GENERATORS = ["bart", "t5"]


def _generate_both(pair, **kwargs):
    with torch.no_grad():
        return pair.reference.generate(**kwargs), pair.ours.generate(**kwargs)


def _assert_same(ref: torch.Tensor, ours: torch.Tensor) -> None:
    assert ref.shape == ours.shape, f"shape {tuple(ref.shape)} != {tuple(ours.shape)}"
    assert torch.equal(ref, ours), f"\nreference {ref.tolist()}\nragkit    {ours.tolist()}"


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_greedy_with_retriever(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    ref, ours = _generate_both(
        pair, input_ids=questions.input_ids, attention_mask=questions.attention_mask, max_length=MAX_LENGTH
    )
    _assert_same(ref, ours)
    assert ours.shape[0] == questions.input_ids.shape[0]
    assert len(set(ours[0].tolist())) > 2, "decoding should not be degenerate for the test to mean anything"


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_beam_search_without_retriever(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    for num_beams, num_return_sequences in ((3, 1), (3, 3), (4, 2)):
        ref, ours = _generate_both(
            pair,
            **contexts,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            max_length=MAX_LENGTH,
        )
        _assert_same(ref, ours)
        assert ours.shape[0] == questions.input_ids.shape[0] * num_return_sequences
    assert not torch.equal(ours[0], ours[1]), "returned beams should differ"


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_n_docs_override(pairs, questions, generator_kind):
    pair = pairs("token", generator_kind)
    # With the retriever (it fetches n_docs documents) and with contexts of n_docs documents.
    ref, ours = _generate_both(
        pair, input_ids=questions.input_ids, n_docs=2, num_beams=2, max_length=MAX_LENGTH
    )
    _assert_same(ref, ours)
    contexts = retrieved_contexts(pair, questions, n_docs=1)
    ref, ours = _generate_both(pair, **contexts, n_docs=1, max_length=MAX_LENGTH)
    _assert_same(ref, ours)


class _BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token] = -float("inf")
        return scores


class _StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.length, dtype=torch.bool)


def test_generation_options_match_reference(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    plain = pair.ours.generate(**contexts, max_length=6)
    banned = int(plain[0, 2])
    allowed = list(range(3, 200))

    def prefix_allowed_tokens_fn(batch_id: int, ids: torch.Tensor) -> list[int]:
        return allowed

    cases = [
        {"logits_processor": LogitsProcessorList([_BanToken(banned)])},
        {"stopping_criteria": StoppingCriteriaList([_StopAfter(4)])},
        {"prefix_allowed_tokens_fn": prefix_allowed_tokens_fn, "num_beams": 2},
        {
            "generation_config": GenerationConfig(
                max_length=6, num_beams=2, decoder_start_token_id=2, eos_token_id=2
            )
        },
        {"no_repeat_ngram_size": 1, "min_length": 5},
    ]
    for options in cases:
        options = dict(options)
        if "generation_config" not in options:
            options["max_length"] = 6
        ref, ours = _generate_both(pair, **contexts, **options)
        _assert_same(ref, ours)
        if "logits_processor" in options:
            assert banned not in ours.tolist()[0]
        if "stopping_criteria" in options:
            assert ours.shape[1] == 4
        if "prefix_allowed_tokens_fn" in options:
            assert all(t in allowed for t in ours[:, 1:].flatten().tolist())


def test_sampling_matches_reference_with_same_seed(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        torch.manual_seed(123)
        ref = pair.reference.generate(**contexts, do_sample=True, top_k=20, max_length=MAX_LENGTH)
        torch.manual_seed(123)
        ours = pair.ours.generate(**contexts, do_sample=True, top_k=20, max_length=MAX_LENGTH)
        # Sampling several answers per question draws num_return_sequences of them (the reference returns one).
        many = pair.ours.generate(**contexts, do_sample=True, num_return_sequences=3, max_length=MAX_LENGTH)
    _assert_same(ref, ours)
    assert many.shape[0] == 2 * 3


def test_encoder_runs_once_and_cache_is_reordered_in_place(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    encoder = pair.ours.generator.get_encoder()
    calls = []
    hook = encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    reorder = type(pair.ours)._reorder_cache
    seen = []

    def spy(self, cache, beam_idx):
        cross = [layer.keys for layer in cache.cross_attention_cache.layers]
        out = reorder(self, cache, beam_idx)
        seen.append((cache, out, all(a is b.keys for a, b in zip(cross, cache.cross_attention_cache.layers))))
        return out

    type(pair.ours)._reorder_cache = spy
    try:
        with torch.no_grad():
            pair.ours.generate(**contexts, num_beams=3, max_length=MAX_LENGTH)
    finally:
        type(pair.ours)._reorder_cache = reorder
        hook.remove()
    assert len(calls) == 1, "the generator's encoder must run once per generate call"
    assert seen, "beam search must reorder the cache"
    assert all(cache is out for cache, out, _ in seen), "the cache is updated in place, not rebuilt"
    assert all(kept for _, _, kept in seen), "cross-attention states are not copied on reorder"


def test_reorder_cache_follows_beams_with_their_documents(pairs):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    pair = pairs("token", "bart")
    n_docs, beams, heads, dim = 3, 2, 1, 1
    rows = torch.arange(beams * n_docs, dtype=torch.float).view(-1, heads, 1, dim)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    cache.self_attention_cache.update(rows.clone(), rows.clone() + 100, 0)
    beam_idx = torch.tensor([1, 1])  # both beams continue beam 1
    out = pair.ours._reorder_cache(cache, beam_idx)
    keys = out.self_attention_cache.layers[0].keys.flatten().tolist()
    assert keys == [3.0, 4.0, 5.0, 3.0, 4.0, 5.0]
    assert out.self_attention_cache.layers[0].values.flatten().tolist() == [103.0, 104.0, 105.0] * 2


# --- max_new_tokens: honoured by ragkit, ignored by the reference (a deliberate difference) -----------

NEW_TOKENS = MAX_LENGTH - 1  # the equivalent max_length counts the decoder start token


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_max_new_tokens_limits_new_tokens_as_a_bare_generator(pairs, questions, generator_kind, num_beams):
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        # The convention: a bare encoder-decoder's generate returns the decoder start token + max_new_tokens.
        bare = pair.ours.generator.generate(
            contexts["context_input_ids"],
            attention_mask=contexts["context_attention_mask"],
            num_beams=num_beams,
            max_new_tokens=NEW_TOKENS,
        )
        ours = pair.ours.generate(**contexts, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
        same_length = pair.ours.generate(**contexts, num_beams=num_beams, max_length=NEW_TOKENS + 1)
        ref = pair.reference.generate(**contexts, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
        ref_same_length = pair.reference.generate(**contexts, num_beams=num_beams, max_length=NEW_TOKENS + 1)
    assert bare.shape[1] == NEW_TOKENS + 1
    assert ours.shape[1] == NEW_TOKENS + 1, "RAG-Token decodes max_new_tokens after the decoder start token"
    _assert_same(same_length, ours)
    _assert_same(ref_same_length, ours)
    # The reference ignores max_new_tokens and decodes up to its default max_length of 20.
    assert ref.shape[1] > NEW_TOKENS + 1
    assert ref.shape[1] == 20


def test_max_new_tokens_from_generation_configs(pairs, questions, monkeypatch):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    with torch.no_grad():
        expected = pair.ours.generate(**contexts, num_beams=2, max_length=NEW_TOKENS + 1)
        passed = pair.ours.generate(
            **contexts, generation_config=GenerationConfig(num_beams=2, max_new_tokens=NEW_TOKENS)
        )
        monkeypatch.setattr(pair.ours.generation_config, "max_new_tokens", NEW_TOKENS)
        from_model = pair.ours.generate(**contexts, num_beams=2)
    _assert_same(expected, passed)
    _assert_same(expected, from_model)


def test_max_new_tokens_takes_precedence_over_max_length_with_transformers_warning(pairs, questions):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    expected = pair.ours.generate(**contexts, max_length=NEW_TOKENS + 1)
    with CaptureLogger(transformers_logging.get_logger("transformers.generation.utils")) as captured:
        ours = pair.ours.generate(**contexts, max_length=4, max_new_tokens=NEW_TOKENS)
    _assert_same(expected, ours)
    assert "`max_new_tokens` will take precedence" in captured.out
    # max_length alone, or max_new_tokens alone, does not warn.
    with CaptureLogger(transformers_logging.get_logger("transformers.generation.utils")) as captured:
        pair.ours.generate(**contexts, max_new_tokens=NEW_TOKENS)
        pair.ours.generate(**contexts, max_length=NEW_TOKENS + 1)
    assert "take precedence" not in captured.out


def test_cache_is_sized_for_max_new_tokens(pairs, questions, monkeypatch):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    prepare = type(pair.ours)._prepare_cache_for_generation
    sizes = []

    def spy(self, generation_config, model_kwargs, *args, **kwargs):
        sizes.append(kwargs["max_cache_length"])
        return prepare(self, generation_config, model_kwargs, *args, **kwargs)

    monkeypatch.setattr(type(pair.ours), "_prepare_cache_for_generation", spy)
    with torch.no_grad():
        dynamic = pair.ours.generate(**contexts, max_new_tokens=NEW_TOKENS)
        pair.ours.generate(**contexts, max_length=20, max_new_tokens=NEW_TOKENS)
        pair.ours.generate(**contexts, max_length=NEW_TOKENS + 1)
        # A static cache is allocated at that size up front: too small would fail, and the tokens must not change.
        static = pair.ours.generate(**contexts, max_new_tokens=NEW_TOKENS, cache_implementation="static")
    # Every decoder position but the last is cached: the start token and max_new_tokens - 1 generated ones.
    assert sizes == [NEW_TOKENS] * 4
    _assert_same(dynamic, static)


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_default_length_is_still_the_reference_max_length(pairs, questions, generator_kind):
    # Without max_new_tokens nothing changes: max_length counts the start token (20 by default), unlike a
    # bare generator's generate, which extends its default max_length by the start token (21).
    pair = pairs("token", generator_kind)
    contexts = retrieved_contexts(pair, questions)
    ref, ours = _generate_both(pair, **contexts, num_beams=2)
    _assert_same(ref, ours)
    assert ours.shape[1] == 20


def _marginalize_as_in_generate(model, logits, doc_scores, n_docs):
    """``model.marginalize`` as generate() calls it (the decoding state set in this context)."""
    token = _RAG_TOKEN_DECODING.set(True)
    try:
        return model.marginalize(logits, doc_scores, n_docs)
    finally:
        _RAG_TOKEN_DECODING.reset(token)


class _OnFirstStep(LogitsProcessor):
    """Runs ``action`` at the first decoding step (inside generate) and keeps its result."""

    def __init__(self, action):
        self.action, self.result = action, None

    def __call__(self, input_ids, scores):
        if self.result is None:
            self.result = self.action()
        return scores


def test_decoding_marginalization_equals_the_log_space_one(pairs, questions):
    # During generate, marginalize() mixes softmaxes (one fused pass and a batched matmul) instead of the
    # log-space logsumexp used for training; both are log sum_d p(d) p(token | d). Tolerance 1e-5 (float32).
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    n_docs = pair.ours.config.n_docs
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(contexts["doc_scores"].shape[0] * n_docs, 3, 50, generator=generator)
    with torch.no_grad():
        log_space = pair.ours.marginalize(logits, contexts["doc_scores"], n_docs)
        mixed = _marginalize_as_in_generate(pair.ours, logits, contexts["doc_scores"], n_docs)
        reference = pair.reference.marginalize(logits, contexts["doc_scores"], n_docs)
    torch.testing.assert_close(mixed, log_space, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-5)


def test_decoding_marginalization_is_only_used_inside_generate(pairs, questions):
    # Training and plain forward keep the log-space path (gradients, finite values for every token), also
    # after a generate call that failed half-way.
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)

    def fail():
        raise RuntimeError("stopped half-way")

    inside = _OnFirstStep(lambda: _RAG_TOKEN_DECODING.get())
    pair.ours.generate(
        **contexts, num_beams=2, max_length=MAX_LENGTH, logits_processor=LogitsProcessorList([inside])
    )
    assert inside.result is True and _RAG_TOKEN_DECODING.get() is False
    with pytest.raises(RuntimeError, match="half-way"):
        pair.ours.generate(
            **contexts,
            num_beams=2,
            max_length=MAX_LENGTH,
            logits_processor=LogitsProcessorList([_OnFirstStep(fail)]),
        )
    assert _RAG_TOKEN_DECODING.get() is False
    with torch.no_grad():
        outputs = pair.ours(
            **contexts,
            decoder_input_ids=torch.zeros(contexts["doc_scores"].shape[0], 2, dtype=torch.long),
            do_marginalize=True,
        )
    assert torch.isfinite(outputs.logits).all()


def test_marginalization_in_another_thread_during_generate_is_log_space(pairs, questions):
    # generate() switches marginalize() to the probability mixture for its own calls only: a marginalize
    # another thread runs on the same model meanwhile gives the log-space numbers, bit for bit.
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    n_docs = pair.ours.config.n_docs
    logits = 6 * torch.randn(
        contexts["doc_scores"].shape[0] * n_docs, 4, 300, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        log_space = pair.ours.marginalize(logits, contexts["doc_scores"], n_docs)
        mixed = _marginalize_as_in_generate(pair.ours, logits, contexts["doc_scores"], n_docs)
    assert not torch.equal(mixed, log_space)  # the two paths are told apart by their rounding

    def other_thread():
        seen = {}

        def run():
            with torch.no_grad():
                seen["flag"] = _RAG_TOKEN_DECODING.get()
                seen["result"] = pair.ours.marginalize(logits, contexts["doc_scores"], n_docs)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return seen

    during = _OnFirstStep(other_thread)
    pair.ours.generate(**contexts, num_beams=2, max_length=4, logits_processor=LogitsProcessorList([during]))
    assert during.result["flag"] is False
    assert torch.equal(during.result["result"], log_space)


def test_decoding_marginalization_stays_finite_where_probabilities_underflow(pairs, questions):
    # Log-probabilities below -103 underflow float32 in probability space: those questions are redone in
    # log space, so no score is -inf (logits processors may add to any token's score, as in the reference).
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    n_docs = pair.ours.config.n_docs
    batch_size = contexts["doc_scores"].shape[0]
    logits = torch.randn(batch_size * n_docs, 2, 50, generator=torch.Generator().manual_seed(1))
    logits[:n_docs] *= 200  # the first question's distributions underflow
    with torch.no_grad():
        reference = pair.reference.marginalize(logits, contexts["doc_scores"], n_docs)
        mixed = _marginalize_as_in_generate(pair.ours, logits, contexts["doc_scores"], n_docs)
    assert torch.isfinite(reference).all() and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-5)


def test_nested_generate_keeps_the_outer_decoding_state(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    token = _RAG_TOKEN_DECODING.set(True)  # as inside an outer generate()
    try:
        pair.ours.generate(**contexts, num_beams=2, max_length=4)
        assert _RAG_TOKEN_DECODING.get() is True
    finally:
        _RAG_TOKEN_DECODING.reset(token)
    assert _RAG_TOKEN_DECODING.get() is False
