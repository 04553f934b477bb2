"""Both heads' generate: the question tokenizer's whole output, generation options kept from the question
encoder, counts (numpy integers, out of range), given contexts (their mask, bad ids and scores), padded
contexts, and the RAG-Sequence options the reference hands to its generator.

Models are the shared reference/ragkit pairs (tiny DPR + BART, shared random weights, ragkit's retriever).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import ragkit
from rag_helpers import QUESTIONS, retrieved_contexts
from ragkit.errors import RagInputError
from ragkit.generation.arguments import check_count
from ragkit.testing import tiny_bart_config

MAX_LENGTH = 8
HEADS = ["sequence", "token"]


def _question_encoder_calls(model):
    """Records every question-encoder call's keyword arguments (a forward pre-hook: a public seam)."""
    calls = []
    handle = model.rag.question_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("head", HEADS)
def test_generate_takes_the_question_tokenizers_whole_output(pairs, question_encoder_tokenizer, head):
    # model.generate(**tokenizer(questions, return_tensors="pt")): a DPR/BERT tokenizer also returns
    # token_type_ids, which go to the question encoder (Transformers rejects them as unused model_kwargs).
    pair = pairs(head, "bart")
    encoded = question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    assert "token_type_ids" in encoded
    calls, handle = _question_encoder_calls(pair.ours)
    try:
        ones = torch.ones_like(encoded["token_type_ids"])
        got = pair.ours.generate(**{**encoded, "token_type_ids": ones}, num_beams=2, max_length=MAX_LENGTH)
    finally:
        handle.remove()
    assert got.shape[0] == len(QUESTIONS)
    assert len(calls) == 1 and torch.equal(calls[0]["token_type_ids"], ones)
    # Without token_type_ids the encoder takes its default (zeros): the same output as passing zeros.
    without = pair.ours.generate(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        num_beams=2,
        max_length=MAX_LENGTH,
    )
    assert torch.equal(pair.ours.generate(**encoded, num_beams=2, max_length=MAX_LENGTH), without)


def test_token_type_ids_change_the_retrieval_scores(pairs, question_encoder_tokenizer):
    # The token types reach the encoder's embeddings: other types, other question vectors, other doc scores
    # (seen in RAG-Token's marginalized step scores).
    pair = pairs("token", "bart")
    encoded = question_encoder_tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    kwargs = dict(max_length=4, return_dict_in_generate=True, output_scores=True)
    zeros = pair.ours.generate(**encoded, **kwargs)
    ones = pair.ours.generate(
        **{**encoded, "token_type_ids": torch.ones_like(encoded["token_type_ids"])}, **kwargs
    )
    assert not torch.allclose(zeros.scores[0], ones.scores[0])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(
    "bad,name",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": -2}, "num_beams"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": -1}, "max_length"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_length": -1}, "min_length"),
        ({"n_docs": 0}, "n_docs"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_beams": 2.0}, "num_beams"),
    ],
)
def test_counts_out_of_range_are_refused_naming_the_argument(pairs, questions, head, bad, name):
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    if head == "sequence" and name == "num_return_sequences" and "num_beams" in bad:
        bad = {
            "num_beams": 1,
            "num_return_sequences": 4,
            "n_docs": 3,
        }  # RAG-Sequence: at most n_docs * num_beams
    kwargs = {"max_length": MAX_LENGTH, **contexts, **bad}
    with pytest.raises(RagInputError, match=name) as caught:
        pair.ours.generate(**kwargs)
    assert "at least" in str(caught.value) or "at most" in str(caught.value) or "between" in str(caught.value)


def _right_padded(contexts: dict, extra: int, pad: int) -> dict:
    """``contexts`` with ``extra`` trailing all-padding columns (as a retriever padding to a longer length)."""
    ids, mask = contexts["context_input_ids"], contexts["context_attention_mask"]
    return dict(
        contexts,
        context_input_ids=torch.cat([ids, torch.full((ids.shape[0], extra), pad, dtype=ids.dtype)], dim=1),
        context_attention_mask=torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1),
    )


def _encoder_widths(model):
    """Records the width of every input the generator's encoder runs on."""
    widths = []
    handle = model.rag.generator.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(
            (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        ),
        with_kwargs=True,
    )
    return widths, handle


@pytest.mark.parametrize("head", HEADS)
def test_heavily_padded_contexts_decode_as_the_reference_on_the_real_ones(pairs, questions, head):
    # Contexts padded far beyond their real length decode as the reference decodes the real contexts (for
    # RAG-Token the reference masks the padding too): the encoder runs on the real width only.
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    real = contexts["context_input_ids"].shape[1]
    pad = pair.config.generator.pad_token_id
    padded = _right_padded(contexts, 250, pad)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_length=MAX_LENGTH)
    with torch.no_grad():
        expected = pair.reference.generate(**contexts, **kwargs)
        if head == "token":
            assert torch.equal(pair.reference.generate(**padded, **kwargs), expected)
    widths, handle = _encoder_widths(pair.ours)
    try:
        got = pair.ours.generate(**padded, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    assert widths and max(widths) <= real  # trimmed: never the padded width


def _unpadded(contexts: dict) -> dict:
    """``contexts`` cut to the shortest real context, mask all ones: the reference's RAG-Sequence generator
    runs without the mask, so outputs compare only where no context has padding."""
    length = int(contexts["context_attention_mask"].sum(1).min())
    ids = contexts["context_input_ids"][:, :length].clone()
    return dict(contexts, context_input_ids=ids, context_attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("head", HEADS)
def test_given_contexts_without_their_mask_are_refused(pairs, questions, head):
    # The planted bug: RAG-Sequence decoded padded contexts without their mask, attending to the padding
    # (the reference asserts; RAG-Token refused already).
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    assert bool((contexts["context_attention_mask"] == 0).any())  # the retrieved contexts are padded
    del contexts["context_attention_mask"]
    with pytest.raises(
        RagInputError, match="`context_attention_mask` must be passed with `context_input_ids`"
    ):
        pair.ours.generate(**contexts, max_length=MAX_LENGTH)


def _bad_given_contexts(pair, questions, case: str) -> tuple[dict, str]:
    """Given contexts ``forward`` refuses, and the message naming what is wrong."""
    contexts = retrieved_contexts(pair, questions)
    ids = contexts["context_input_ids"]
    vocab = pair.config.generator.vocab_size
    positions = pair.config.generator.max_position_embeddings
    if case == "out_of_vocab":
        ids[1, 2] = vocab
        return contexts, f"`context_input_ids` holds id {vocab}, outside the generator's vocabulary"
    if case == "negative":
        ids[0, 0] = -3
        return contexts, "`context_input_ids` holds the negative token id -3"
    if case == "float_ids":
        contexts["context_input_ids"] = ids.float()
        return contexts, "`context_input_ids` holds torch.float32 values"
    if case == "too_long":
        long_ids = torch.full((ids.shape[0], positions + 1), 5, dtype=ids.dtype)
        contexts.update(context_input_ids=long_ids, context_attention_mask=torch.ones_like(long_ids))
        return contexts, f"`context_input_ids` has length {positions + 1} but the generator has {positions}"
    if case == "zero_length":
        contexts.update(context_input_ids=ids[:, :0], context_attention_mask=ids[:, :0])
        return contexts, "`context_input_ids` has zero-length rows"
    if case == "int_doc_scores":
        contexts["doc_scores"] = contexts["doc_scores"].long()
        return contexts, "`doc_scores` must be a floating-point tensor"
    if case == "numpy_doc_scores":
        contexts["doc_scores"] = contexts["doc_scores"].numpy()
        return contexts, "`doc_scores` must be a torch tensor.*NumPy array.*torch.from_numpy"
    if case == "numpy_ids":
        contexts["context_input_ids"] = ids.numpy()
        return contexts, "`context_input_ids` must be a torch tensor"
    raise AssertionError(case)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(
    "case",
    [
        "out_of_vocab",
        "negative",
        "float_ids",
        "too_long",
        "zero_length",
        "int_doc_scores",
        "numpy_doc_scores",
        "numpy_ids",
    ],
)
def test_bad_given_contexts_are_refused_as_forward_refuses_them(pairs, questions, head, case):
    # The planted bug: RAG-Sequence generate skipped forward's checks (IndexError, RuntimeError or
    # AttributeError deep in the generator; integer doc scores were taken).
    pair = pairs(head, "bart")
    contexts, message = _bad_given_contexts(pair, questions, case)
    with pytest.raises(RagInputError, match=message):
        pair.ours.generate(**contexts, max_length=MAX_LENGTH)


@pytest.mark.parametrize("head", HEADS)
def test_numpy_and_tensor_integer_counts_are_taken_as_the_reference_takes_them(pairs, questions, head):
    # The planted bug: np.int64 counts (np.arange, a data frame, a sweep) were refused as non-integers.
    pair = pairs(head, "bart")
    contexts = retrieved_contexts(pair, questions)
    if head == "sequence":
        contexts = _unpadded(contexts)  # the reference's RAG-Sequence generator reads no context mask
    plain = dict(n_docs=3, num_beams=2, num_return_sequences=2, max_length=MAX_LENGTH)
    with torch.no_grad():
        expected = pair.reference.generate(**contexts, **plain)
    assert torch.equal(pair.ours.generate(**contexts, **plain), expected)
    numpy_counts = {name: np.int64(value) for name, value in plain.items()}
    assert torch.equal(pair.ours.generate(**contexts, **numpy_counts), expected)
    tensor_counts = {name: torch.tensor(value) for name, value in plain.items()}
    assert torch.equal(pair.ours.generate(**contexts, **tensor_counts), expected)


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 2.0, torch.tensor(2.0), "2"])
def test_counts_that_are_not_integers_are_refused(value):
    with pytest.raises(RagInputError, match="`num_beams` must be an integer of at least 1"):
        check_count("num_beams", value, 1)


def test_integer_counts_become_python_ints():
    for value in (3, np.int64(3), np.int32(3), torch.tensor(3), torch.tensor([3])):
        count = check_count("n_docs", value, 1)
        assert count == 3 and type(count) is int
    assert check_count("n_docs", None, 1) is None


def _halves_by_batch_id(seen: set, vocab: int):
    """A ``prefix_allowed_tokens_fn`` allowing one half of the vocabulary to even ``batch_id`` s and the
    other half to odd ones, recording every ``batch_id`` into ``seen``."""

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        seen.add(batch_id)
        return list(range(2, vocab // 3)) if batch_id % 2 == 0 else list(range(vocab // 3, vocab))

    return allowed


@pytest.mark.parametrize("num_beams", [1, 2])
def test_sequence_prefix_allowed_tokens_fn_sees_document_ids_as_the_reference(pairs, questions, num_beams):
    # The reference decodes one question per generator call, so `batch_id` is the document index within the
    # question. The planted bug: the batched search handed the row over the whole batch (0..batch * n_docs - 1),
    # constraining the second question's documents differently.
    pair = pairs("sequence", "bart")
    contexts = _unpadded(retrieved_contexts(pair, questions))
    vocab = pair.config.generator.vocab_size
    kwargs = dict(num_beams=num_beams, max_length=MAX_LENGTH)
    reference_ids, our_ids, one_per_call_ids = set(), set(), set()
    with torch.no_grad():
        expected = pair.reference.generate(
            **contexts, prefix_allowed_tokens_fn=_halves_by_batch_id(reference_ids, vocab), **kwargs
        )
    got = pair.ours.generate(
        **contexts, prefix_allowed_tokens_fn=_halves_by_batch_id(our_ids, vocab), **kwargs
    )
    one_per_call = pair.ours.generate(
        **contexts,
        prefix_allowed_tokens_fn=_halves_by_batch_id(one_per_call_ids, vocab),
        questions_per_batch=1,
        **kwargs,
    )
    assert reference_ids == our_ids == one_per_call_ids == set(range(pair.config.n_docs))
    assert torch.equal(got, expected)
    assert torch.equal(one_per_call, expected)


@pytest.mark.parametrize("option", ["output_scores", "output_logits"])
def test_sequence_generate_ignores_output_scores_as_the_reference(pairs, questions, option):
    # The reference hands them to its generator, which returns ids without return_dict_in_generate.
    # The planted bug: output_scores=True was refused.
    pair = pairs("sequence", "bart")
    contexts = _unpadded(retrieved_contexts(pair, questions))
    kwargs = {option: True, "num_beams": 2, "max_length": MAX_LENGTH}
    with torch.no_grad():
        expected = pair.reference.generate(**contexts, **kwargs)
    got = pair.ours.generate(**contexts, **kwargs)
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
    assert torch.equal(got, pair.ours.generate(**contexts, num_beams=2, max_length=MAX_LENGTH))


@pytest.fixture(scope="module")
def bert_question_encoder_config():
    """A RAG config with a plain BERT question encoder (its forward names `use_cache` and `cache`)."""
    bert = transformers.BertConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    return ragkit.RagConfig.from_question_encoder_generator_configs(
        bert,
        tiny_bart_config(),
        n_docs=3,
        retrieval_vector_size=32,
        index_name="custom",
        max_combined_length=48,
        question_encoder_pooling="mean",
    )


@pytest.mark.parametrize("head", ["RagSequenceForGeneration", "RagTokenForGeneration"])
def test_use_cache_reaches_the_generator_not_a_bert_question_encoder(
    bert_question_encoder_config, retrievers, questions, head
):
    # The planted bug: generation options the question encoder's forward also names (BERT's `use_cache`)
    # went to the question encoder, so RAG-Token decoded with the cache it was told not to use.
    torch.manual_seed(0)
    model = getattr(ragkit, head)(config=bert_question_encoder_config, retriever=retrievers["bart"][1]).eval()
    assert isinstance(model.question_encoder, transformers.BertModel)
    question_calls, question_handle = _question_encoder_calls(model)
    generator_use_cache = []
    generator_handle = model.generator.register_forward_pre_hook(
        lambda module, args, kwargs: generator_use_cache.append(kwargs.get("use_cache")), with_kwargs=True
    )
    try:
        model.generate(**questions, use_cache=False, num_beams=2, max_length=5)
    finally:
        question_handle.remove()
        generator_handle.remove()
    assert len(question_calls) == 1
    assert not {"use_cache", "cache", "past_key_values"} & question_calls[0].keys()
    assert False in generator_use_cache
    if head == "RagTokenForGeneration":  # RAG-Sequence's capability probe runs its own tiny searches
        assert set(generator_use_cache) == {False}


def test_token_generate_refuses_a_decoder_prompt(pairs, questions):
    # Transformers' RAG-Token fails with a TypeError (decoder_input_ids given twice to
    # prepare_inputs_for_generation); ragkit names the argument before any model runs.
    pair = pairs("token", "bart")
    contexts = retrieved_contexts(pair, questions)
    prompt = torch.full((len(QUESTIONS), 1), pair.config.generator.decoder_start_token_id)
    with pytest.raises(RagInputError, match="`decoder_input_ids` is not supported by RagTokenForGeneration"):
        pair.ours.generate(**contexts, decoder_input_ids=prompt, max_length=MAX_LENGTH)
