"""Bad tensors get a RagInputError naming the argument and the limit, on every model entry point.

Without these checks the same inputs crash deep in torch (IndexError in an embedding, a shape error in
attention) or, for a context mask of the wrong shape, silently compute the all-ones-mask loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ragkit.modeling_rag as rk
from ragkit.errors import RagInputError
from ragkit.testing import tiny_rag_config

N_DOCS = 3
QUESTION_VOCAB = 256  # tiny DPR
QUESTION_POSITIONS = 128
GENERATOR_VOCAB = 400  # tiny BART
GENERATOR_POSITIONS = 512
HEADS = ["model", "sequence", "token"]


class _FixedRetriever:
    """Returns fixed contexts for any questions, so the question path runs without an index."""

    def __call__(
        self, question_input_ids, question_hidden_states, prefix=None, n_docs=None, return_tensors=None
    ):
        n_docs = n_docs or N_DOCS
        batch = len(question_input_ids)
        ids = torch.arange(5, 5 + 6).repeat(batch * n_docs, 1)
        return {
            "context_input_ids": ids,
            "context_attention_mask": torch.ones_like(ids),
            "retrieved_doc_embeds": torch.ones(batch, n_docs, question_hidden_states.shape[-1]),
            "doc_ids": torch.zeros(batch, n_docs, dtype=torch.long),
        }


@pytest.fixture(scope="module")
def models():
    """The three classes with a fixed-context retriever, sharing one tiny DPR + BART."""
    config = tiny_rag_config("bart", n_docs=N_DOCS)
    torch.manual_seed(0)
    model = rk.RagModel(config=config, retriever=_FixedRetriever()).eval()
    parts = dict(
        question_encoder=model.question_encoder, generator=model.generator, retriever=_FixedRetriever()
    )
    return {
        "model": model,
        "sequence": rk.RagSequenceForGeneration(config=config, **parts).eval(),
        "token": rk.RagTokenForGeneration(config=config, **parts).eval(),
    }


def _contexts(batch_size: int = 2, length: int = 6) -> dict:
    ids = torch.randint(
        5, GENERATOR_VOCAB, (batch_size * N_DOCS, length), generator=torch.Generator().manual_seed(0)
    )
    return {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.zeros(batch_size, N_DOCS),
    }


DECODER = torch.tensor([[0, 10, 11, 2], [0, 12, 2, 1]])
QUESTIONS = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])


def _call(models, head, **inputs):
    with torch.no_grad():
        return models[head](**inputs)


# ---- contexts (no retrieval) --------------------------------------------------------------------------


def _bad_contexts(case: str) -> tuple[dict, str]:
    inputs = _contexts()
    ids = inputs["context_input_ids"]
    if case == "out_of_vocab":
        ids[1, 2] = GENERATOR_VOCAB
        return inputs, r"`context_input_ids` holds id 400, outside the generator's vocabulary of 400 ids"
    if case == "negative":
        ids[0, 0] = -7
        return inputs, r"`context_input_ids` holds the negative token id -7"
    if case == "float":
        inputs["context_input_ids"] = ids.float()
        return inputs, r"`context_input_ids` holds torch.float32 values; token ids must be integers"
    if case == "too_long":
        inputs = _contexts(length=GENERATOR_POSITIONS + 1)
        return inputs, r"`context_input_ids` has length 513 but the generator has 512 positions"
    if case == "zero_length":
        inputs = _contexts(length=0)
        return inputs, r"`context_input_ids` has zero-length rows"
    if case == "empty_batch":
        inputs = _contexts(batch_size=0)
        return inputs, r"empty batch"
    if case == "mask_shape":
        inputs["context_attention_mask"] = inputs["context_attention_mask"][:, :-2]
        return (
            inputs,
            r"`context_attention_mask` has shape \(6, 4\) but `context_input_ids` has shape \(6, 6\)",
        )
    if case == "int_doc_scores":
        inputs["doc_scores"] = inputs["doc_scores"].long()
        return inputs, r"`doc_scores` must be a floating-point tensor"
    raise AssertionError(case)


CONTEXT_CASES = [
    "out_of_vocab",
    "negative",
    "float",
    "too_long",
    "zero_length",
    "empty_batch",
    "mask_shape",
    "int_doc_scores",
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", CONTEXT_CASES)
def test_bad_contexts_are_refused_by_forward(models, head, case):
    inputs, message = _bad_contexts(case)
    with pytest.raises(RagInputError, match=message):
        _call(models, head, **inputs, decoder_input_ids=DECODER[: inputs["doc_scores"].shape[0]])


@pytest.mark.parametrize("case", ["out_of_vocab", "negative", "float", "too_long", "empty_batch"])
def test_bad_contexts_are_refused_by_token_generate(models, case):
    inputs, message = _bad_contexts(case)
    with pytest.raises(RagInputError, match=message):
        models["token"].generate(**inputs, max_length=4)


def test_mismatched_context_mask_is_not_ignored(models):
    """The planted bug: a mask of another shape used to be dropped silently (loss of the all-ones mask)."""
    inputs = _contexts()
    inputs["context_attention_mask"] = torch.ones(inputs["context_input_ids"].shape[0], 3, dtype=torch.long)
    with pytest.raises(RagInputError, match="`context_attention_mask` has shape"):
        _call(models, "sequence", **inputs, labels=DECODER)


# ---- decoder inputs and labels ------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_decoder_input_ids_out_of_range(models, head):
    with pytest.raises(
        RagInputError, match=r"`decoder_input_ids` holds id 400, outside the generator's vocabulary"
    ):
        _call(models, head, **_contexts(), decoder_input_ids=torch.tensor([[0, 400, 2], [0, 5, 2]]))
    with pytest.raises(RagInputError, match=r"`decoder_input_ids` holds the negative token id -100"):
        _call(models, head, **_contexts(), decoder_input_ids=torch.tensor([[0, 7, -100], [0, 5, 2]]))
    with pytest.raises(RagInputError, match=r"`decoder_input_ids` holds torch.float32"):
        _call(models, head, **_contexts(), decoder_input_ids=DECODER.float())
    with pytest.raises(RagInputError, match=r"`decoder_attention_mask` has shape \(2, 3\)"):
        _call(models, head, **_contexts(), decoder_input_ids=DECODER, decoder_attention_mask=DECODER[:, :3])


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_labels_out_of_range(models, head):
    with pytest.raises(
        RagInputError, match=r"`labels` holds id 401, outside the generator's vocabulary of 400"
    ):
        _call(models, head, **_contexts(), labels=torch.tensor([[0, 401, 2], [0, 5, 2]]))
    with pytest.raises(RagInputError, match=r"`labels` holds the negative token id -1; .*besides -100"):
        _call(models, head, **_contexts(), labels=torch.tensor([[0, -1, 2], [0, 5, -100]]))
    with pytest.raises(RagInputError, match=r"`labels` holds torch.float32"):
        _call(models, head, **_contexts(), labels=DECODER.float())
    with pytest.raises(RagInputError, match=r"`labels` has length 513 but the generator has 512 positions"):
        _call(models, head, **_contexts(), labels=torch.full((2, GENERATOR_POSITIONS + 1), 5))
    # -100 (ignored positions) stays accepted, including a row that is all -100 but its start token.
    loss = _call(models, head, **_contexts(), labels=torch.tensor([[0, 7, 2], [0, -100, -100]])).loss
    assert torch.isfinite(loss).all()


# ---- questions (retrieval path: forward, both generates, encode_questions) ---------------------------


def _bad_questions(case: str) -> tuple[dict, str]:
    ids = QUESTIONS.clone()
    mask = torch.ones_like(ids)
    if case == "out_of_vocab":
        ids[0, 1] = QUESTION_VOCAB + 4
        return {
            "input_ids": ids
        }, r"`input_ids` holds id 260, outside the question encoder's vocabulary of 256"
    if case == "negative":
        ids[1, 1] = -2
        return {"input_ids": ids}, r"`input_ids` holds the negative token id -2"
    if case == "float":
        return {"input_ids": ids.double()}, r"`input_ids` holds torch.float64 values"
    if case == "too_long":
        long = torch.full((2, QUESTION_POSITIONS + 1), 10)
        return {"input_ids": long}, r"`input_ids` has length 129 but the question encoder has 128 positions"
    if case == "zero_length":
        return {"input_ids": ids[:, :0]}, r"`input_ids` has zero-length rows"
    if case == "empty_batch":
        return {"input_ids": ids[:0]}, r"`input_ids` is an empty batch"
    if case == "one_dimensional":
        return {"input_ids": ids[0]}, r"`input_ids` must have shape \(batch_size, length\)"
    if case == "list":
        return {"input_ids": ids.tolist()}, r"`input_ids` must be a torch tensor of token ids"
    if case == "mask_shape":
        return {"input_ids": ids, "attention_mask": mask[:1]}, r"`attention_mask` has shape \(1, 4\)"
    if case == "token_types":
        types = torch.zeros_like(ids)
        types[0, 0] = 2
        return (
            {"input_ids": ids, "token_type_ids": types},
            r"`token_type_ids` holds id 2, outside the question encoder's token types of 2 ids",
        )
    raise AssertionError(case)


QUESTION_CASES = [
    "out_of_vocab",
    "negative",
    "float",
    "too_long",
    "zero_length",
    "empty_batch",
    "one_dimensional",
    "list",
    "mask_shape",
    "token_types",
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", QUESTION_CASES)
def test_bad_questions_are_refused_by_forward(models, head, case):
    inputs, message = _bad_questions(case)
    with pytest.raises(RagInputError, match=message):
        _call(models, head, **inputs, decoder_input_ids=DECODER)


@pytest.mark.parametrize("case", QUESTION_CASES)
def test_bad_questions_are_refused_by_encode_questions(models, case):
    inputs, message = _bad_questions(case)
    with pytest.raises(RagInputError, match=message):
        models["model"].encode_questions(**inputs)


@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("case", ["out_of_vocab", "float", "too_long", "empty_batch"])
def test_bad_questions_are_refused_by_generate(models, head, case):
    inputs, message = _bad_questions(case)
    with pytest.raises(RagInputError, match=message):
        models[head].generate(**inputs, max_length=4, num_beams=1)


def test_input_errors_are_value_and_assertion_errors(models):
    """Code written for Transformers' RAG catches AssertionError where it asserts (doc_scores vs n_docs)."""
    inputs = _contexts()
    inputs["doc_scores"] = torch.zeros(2, N_DOCS + 1)
    with pytest.raises(AssertionError):
        _call(models, "token", **inputs, decoder_input_ids=DECODER)
    with pytest.raises(ValueError):
        _call(models, "token", **inputs, decoder_input_ids=DECODER)


def test_valid_inputs_still_run(models):
    """The checks refuse nothing that works: ids at the edges of the tables, int32 ids, a padded mask."""
    inputs = _contexts()
    inputs["context_input_ids"][0, 0] = GENERATOR_VOCAB - 1
    inputs["context_input_ids"][1, 0] = 0
    inputs["context_input_ids"] = inputs["context_input_ids"].int()
    inputs["context_attention_mask"][0, -2:] = 0
    out = _call(models, "token", **inputs, labels=DECODER)
    assert torch.isfinite(out.loss).all()
    questions = torch.full((2, QUESTION_POSITIONS), QUESTION_VOCAB - 1)
    out = _call(models, "sequence", input_ids=questions, labels=DECODER)
    assert out.doc_scores.shape == (2, N_DOCS)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n_docs", [0, -1, 1.5, "3"])
def test_bad_n_docs_is_named(models, head, n_docs):
    """n_docs=0 used to be a ZeroDivisionError; a float a TypeError deep in reshape."""
    with pytest.raises(RagInputError, match=r"`n_docs` must be an integer >= 1"):
        _call(models, head, **_contexts(), decoder_input_ids=DECODER, n_docs=n_docs)
    with pytest.raises(RagInputError, match=r"`n_docs` must be an integer >= 1"):
        _call(models, head, input_ids=QUESTIONS, decoder_input_ids=DECODER, n_docs=n_docs)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_mismatched_context_mask_is_refused_by_generate(models, head):
    """generate of either head must not decode with a mask of another shape (RAG-Token used to ignore it)."""
    inputs = _contexts()
    inputs["context_attention_mask"] = torch.ones(inputs["context_input_ids"].shape[0], 3, dtype=torch.long)
    with pytest.raises(RagInputError, match="`context_attention_mask` has shape"):
        models[head].generate(**inputs, max_length=4, num_beams=1)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n_docs", [np.int64(N_DOCS), np.int32(N_DOCS), torch.tensor(N_DOCS)])
def test_integer_n_docs_of_any_type_is_accepted(models, head, n_docs):
    """numpy integers (``np.arange``, pandas) and 0-d integer tensors count documents as a Python int does."""
    expected = _call(models, head, **_contexts(), decoder_input_ids=DECODER, n_docs=N_DOCS)
    out = _call(models, head, **_contexts(), decoder_input_ids=DECODER, n_docs=n_docs)
    torch.testing.assert_close(out.logits, expected.logits, atol=0, rtol=0)
    out = _call(models, head, input_ids=QUESTIONS, decoder_input_ids=DECODER, n_docs=n_docs)
    assert out.doc_scores.shape == (2, N_DOCS)
    if head != "model":
        with_labels = _call(models, head, **_contexts(), labels=DECODER, n_docs=n_docs)
        expected = _call(models, head, **_contexts(), labels=DECODER, n_docs=N_DOCS)
        torch.testing.assert_close(with_labels.loss, expected.loss, atol=0, rtol=0)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n_docs", [True, np.float64(3.0), torch.tensor(3.0)])
def test_bools_and_floats_are_not_counts(models, head, n_docs):
    with pytest.raises(RagInputError, match=r"`n_docs` must be an integer >= 1"):
        _call(models, head, **_contexts(), decoder_input_ids=DECODER, n_docs=n_docs)


@pytest.mark.parametrize("head", HEADS)
def test_numpy_doc_scores_are_named_as_such(models, head):
    """A NumPy array is not a tensor of the wrong dtype: the message says so and how to convert it."""
    inputs = _contexts()
    inputs["doc_scores"] = inputs["doc_scores"].numpy()
    with pytest.raises(
        RagInputError, match=r"got a NumPy array \(ndarray\); pass a torch tensor \(torch\.from_numpy"
    ):
        _call(models, head, **inputs, decoder_input_ids=DECODER)
    inputs["doc_scores"] = inputs["doc_scores"].tolist()
    with pytest.raises(RagInputError, match=r"`doc_scores` must be a torch tensor .* got list"):
        _call(models, head, **inputs, decoder_input_ids=DECODER)


def test_numpy_doc_scores_are_named_by_token_generate(models):
    inputs = _contexts()
    inputs["doc_scores"] = inputs["doc_scores"].numpy()
    with pytest.raises(RagInputError, match=r"got a NumPy array"):
        models["token"].generate(**inputs, max_length=4, num_beams=1)
