"""Forward passes and losses of ragkit's RAG models against transformers' on the same tiny weights.

Tolerance: 1e-5 absolute on logits, doc scores, hidden states and losses (float32, CPU). The
retriever paths run the full pipeline (question encoder -> retriever -> generator); the
no-retriever paths pass contexts and doc scores computed outside, as in the API reference's example.
"""

from __future__ import annotations

import pytest
import torch

from rag_helpers import build_pair, retrieved_contexts
from ragkit import RetrievAugLMMarginOutput, RetrievAugLMOutput

ATOL = 1e-5
GENERATORS = ["bart", "t5"]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= ATOL, f"{what}: max abs difference {diff}"


def _call_both(pair, **kwargs):
    with torch.no_grad():
        return pair.reference(**kwargs), pair.ours(**kwargs)


def _call_both_with_label_smoothing(pair, epsilon, **kwargs):
    """Both models with label smoothing: the reference reads it from its config only, ragkit as an argument."""
    pair.reference.config.label_smoothing = epsilon
    try:
        return _call_both(pair, **kwargs, label_smoothing=epsilon)
    finally:
        pair.reference.config.label_smoothing = 0.0


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_forward_with_retriever_matches_reference(pairs, questions, labels, head, generator_kind):
    pair = pairs(head, generator_kind)
    kwargs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    kwargs["decoder_input_ids"] = labels
    ref, ours = _call_both(pair, **kwargs)
    assert isinstance(ours, RetrievAugLMOutput if head == "model" else RetrievAugLMMarginOutput)
    _close(ref.logits, ours.logits, "logits")
    _close(ref.doc_scores, ours.doc_scores, "doc_scores")
    _close(
        ref.generator_enc_last_hidden_state,
        ours.generator_enc_last_hidden_state,
        "generator_enc_last_hidden_state",
    )
    _close(
        ref.question_encoder_last_hidden_state,
        ours.question_encoder_last_hidden_state,
        "question_encoder_last_hidden_state",
    )
    assert ours.logits.shape[0] == questions.input_ids.shape[0] * pair.config.n_docs
    # The reference returns context_input_ids=(None,) here; ragkit returns None.
    assert ours.context_input_ids is None and ours.retrieved_doc_ids is None
    # Both names of the decoder cache work, and it is the cache the generator returned.
    assert ours.past_key_values is ours.cache is not None
    assert ours["past_key_values"] is ours.cache


@pytest.mark.parametrize("generator_kind", GENERATORS)
@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_forward_without_retriever_matches_reference(pairs, questions, labels, head, generator_kind):
    pair = pairs(head, generator_kind)
    contexts = retrieved_contexts(pair, questions)
    ref, ours = _call_both(pair, decoder_input_ids=labels, **contexts)
    _close(ref.logits, ours.logits, "logits")
    _close(ref.doc_scores, ours.doc_scores, "doc_scores")
    _close(
        ref.generator_enc_last_hidden_state,
        ours.generator_enc_last_hidden_state,
        "generator_enc_last_hidden_state",
    )
    # Nothing was retrieved in this call, so there is no question vector to report.
    assert ours.question_encoder_last_hidden_state is None


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_sequence_losses_match_reference(pairs, questions, labels, generator_kind):
    pair = pairs("sequence", generator_kind)
    # Contexts retrieved once (the retriever path itself is covered above).
    base = {**retrieved_contexts(pair, questions), "labels": labels}
    for options in (
        {},
        {"reduce_loss": True},
        {"exclude_bos_score": True},
        {"exclude_bos_score": True, "reduce_loss": True},
    ):
        ref, ours = _call_both(pair, **base, **options)
        _close(ref.loss, ours.loss, f"loss {options}")
        _close(ref.logits, ours.logits, f"logits {options}")
        assert ours.loss.shape == (() if options.get("reduce_loss") else (labels.shape[0],))
    ref, ours = _call_both_with_label_smoothing(pair, 0.1, **base)
    _close(ref.loss, ours.loss, "loss with label_smoothing=0.1")
    _, plain = _call_both(pair, **base)
    assert (ours.loss - plain.loss).abs().max() > 1e-3, "label smoothing must change the loss"


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_token_losses_and_marginalization_match_reference(pairs, questions, labels, generator_kind):
    pair = pairs("token", generator_kind)
    base = {**retrieved_contexts(pair, questions), "labels": labels}
    for options in (
        {},
        {"reduce_loss": True},
        {"do_marginalize": True},
        {"do_marginalize": True, "reduce_loss": True},
    ):
        ref, ours = _call_both(pair, **base, **options)
        _close(ref.loss, ours.loss, f"loss {options}")
        _close(ref.logits, ours.logits, f"logits {options}")
    assert ours.logits.shape[0] == labels.shape[0], "marginalized logits have one row per question"
    ref, ours = _call_both_with_label_smoothing(pair, 0.2, **base)
    _close(ref.loss, ours.loss, "loss with label_smoothing=0.2")


def test_marginalized_logits_are_log_probabilities(pairs, questions, labels):
    pair = pairs("token", "bart")
    with torch.no_grad():
        out = pair.ours(input_ids=questions.input_ids, labels=labels, do_marginalize=True)
    total = out.logits.exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


@pytest.mark.parametrize("generator_kind", GENERATORS)
def test_n_docs_override_matches_reference(pairs, questions, labels, generator_kind):
    pair = pairs("token", generator_kind)
    kwargs = {"input_ids": questions.input_ids, "labels": labels, "n_docs": 2}
    ref, ours = _call_both(pair, **kwargs)
    assert ours.doc_scores.shape == (2, 2)
    _close(ref.loss, ours.loss, "loss n_docs=2")
    _close(ref.logits, ours.logits, "logits n_docs=2")


def test_output_retrieved_returns_every_field(pairs, questions):
    pair = pairs("sequence", "bart")
    n_docs = pair.config.n_docs
    ref, ours = _call_both(
        pair,
        input_ids=questions.input_ids,
        attention_mask=questions.attention_mask,
        decoder_input_ids=questions.input_ids[:, :4],
        output_retrieved=True,
        output_hidden_states=True,
    )
    batch = questions.input_ids.shape[0]
    assert ours.retrieved_doc_embeds.shape == (batch, n_docs, pair.config.retrieval_vector_size)
    assert ours.retrieved_doc_ids.shape == (batch, n_docs)
    assert ours.context_input_ids.shape[0] == batch * n_docs
    assert ours.context_attention_mask.shape == ours.context_input_ids.shape
    assert torch.equal(torch.as_tensor(ref.retrieved_doc_ids), torch.as_tensor(ours.retrieved_doc_ids))
    assert torch.equal(ref.context_input_ids, ours.context_input_ids)
    assert torch.equal(ref.context_attention_mask, ours.context_attention_mask)
    _close(ref.retrieved_doc_embeds, ours.retrieved_doc_embeds, "retrieved_doc_embeds")
    # Hidden states of every part are returned (the reference drops the question encoder's and generator's).
    assert len(ours.question_enc_hidden_states) == pair.config.question_encoder.num_hidden_layers + 1
    assert len(ours.generator_enc_hidden_states) == pair.config.generator.encoder_layers + 1
    assert len(ours.generator_dec_hidden_states) == pair.config.generator.decoder_layers + 1
    _close(ours.generator_enc_hidden_states[-1], ours.generator_enc_last_hidden_state, "last encoder state")


def test_output_attentions_of_every_part(retrievers, questions):
    pair = build_pair("token", "bart", retrievers, seed=3)
    # sdpa returns no attention weights; eager does.
    pair.ours.set_attn_implementation("eager")
    with torch.no_grad():
        ref = pair.reference(
            input_ids=questions.input_ids,
            decoder_input_ids=questions.input_ids[:, :4],
            output_attentions=True,
        )
        ours = pair.ours(
            input_ids=questions.input_ids,
            decoder_input_ids=questions.input_ids[:, :4],
            output_attentions=True,
        )
    assert len(ours.question_enc_attentions) == pair.config.question_encoder.num_hidden_layers
    assert len(ours.generator_enc_attentions) == pair.config.generator.encoder_layers
    assert len(ours.generator_dec_attentions) == pair.config.generator.decoder_layers
    assert len(ours.generator_cross_attentions) == pair.config.generator.decoder_layers
    for ref_att, our_att in zip(ref.generator_cross_attentions, ours.generator_cross_attentions):
        _close(ref_att, our_att, "generator_cross_attentions")
    _close(ref.logits, ours.logits, "logits with eager attention")


def test_return_dict_false_and_cache_argument_names(pairs, questions):
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    start = torch.full((2, 1), pair.config.decoder_start_token_id)
    with torch.no_grad():
        first = pair.ours(**contexts, decoder_input_ids=start, use_cache=True)
        as_tuple = pair.ours(**contexts, decoder_input_ids=start, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    _close(as_tuple[0], first.logits, "tuple logits")
    nxt = torch.full((2, 1), 7)
    # The next step with the cache passed under either name gives the same logits.
    with torch.no_grad():
        step_old_name = pair.ours(
            **contexts, decoder_input_ids=nxt, past_key_values=_copy_cache(first.cache), use_cache=True
        )
        step_new_name = pair.ours(
            **contexts, decoder_input_ids=nxt, cache=_copy_cache(first.cache), use_cache=True
        )
        full = pair.ours(**contexts, decoder_input_ids=torch.cat([start, nxt], 1), use_cache=False)
    _close(step_old_name.logits, step_new_name.logits, "cache vs past_key_values")
    _close(step_old_name.logits[:, -1], full.logits[:, -1], "cached step vs full pass")
    with pytest.raises(ValueError, match="either `past_key_values` or `cache`"):
        pair.ours(
            **contexts, decoder_input_ids=nxt, past_key_values=first.cache, cache=_copy_cache(first.cache)
        )


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)


def test_output_classes_accept_both_cache_names():
    marker = object()
    out = RetrievAugLMMarginOutput(logits=torch.zeros(1), past_key_values=marker)
    assert out.cache is marker and out.past_key_values is marker and "past_key_values" in out
    out = RetrievAugLMOutput(logits=torch.zeros(1), cache=marker)
    assert out.past_key_values is marker and out.to_tuple()[1] is marker
