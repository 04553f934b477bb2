"""Bad input fails early with ValueError/TypeError naming the argument (the reference uses asserts)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import ragkit.modeling_rag as rk
from ragkit.testing import tiny_rag_config

N_DOCS = 3


@pytest.fixture(scope="module")
def models():
    """The three classes without a retriever, on one tiny BART config."""
    config = tiny_rag_config("bart", n_docs=N_DOCS)
    torch.manual_seed(0)
    model = rk.RagModel(config=config).eval()
    return {
        "model": model,
        "sequence": rk.RagSequenceForGeneration(
            config=config, question_encoder=model.question_encoder, generator=model.generator
        ).eval(),
        "token": rk.RagTokenForGeneration(
            config=config, question_encoder=model.question_encoder, generator=model.generator
        ).eval(),
    }


def _contexts(batch_size: int = 2, n_docs: int = N_DOCS) -> dict:
    ids = torch.randint(5, 400, (batch_size * n_docs, 6), generator=torch.Generator().manual_seed(0))
    return {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.zeros(batch_size, n_docs),
    }


DECODER = torch.tensor([[0, 10, 11, 2], [0, 12, 2, 1]])
HEADS = ["model", "sequence", "token"]


@pytest.mark.parametrize("head", HEADS)
def test_no_retriever_and_no_contexts(models, head):
    with pytest.raises(ValueError, match="`context_input_ids` must be passed"):
        models[head](input_ids=torch.tensor([[2, 10, 3]]), decoder_input_ids=DECODER[:1])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("missing", ["context_attention_mask", "doc_scores"])
def test_missing_context_inputs(models, head, missing):
    inputs = _contexts()
    del inputs[missing]
    with pytest.raises(ValueError, match=f"`{missing}`"):
        models[head](**inputs, decoder_input_ids=DECODER)


@pytest.mark.parametrize("head", HEADS)
def test_doc_scores_disagree_with_n_docs(models, head):
    inputs = _contexts()
    inputs["doc_scores"] = torch.zeros(2, N_DOCS + 1)
    with pytest.raises(ValueError, match=r"`doc_scores` has shape \(2, 4\) but n_docs=3"):
        models[head](**inputs, decoder_input_ids=DECODER)
    # The same contexts with an explicit n_docs that disagrees with doc_scores.
    with pytest.raises(ValueError, match="`doc_scores`"):
        models[head](**_contexts(), decoder_input_ids=DECODER, n_docs=2)


@pytest.mark.parametrize("head", HEADS)
def test_context_rows(models, head):
    inputs = _contexts()
    inputs["context_input_ids"] = inputs["context_input_ids"][:-1]
    inputs["context_attention_mask"] = inputs["context_attention_mask"][:-1]
    with pytest.raises(ValueError, match="`context_input_ids` has 5 rows, not a multiple of n_docs=3"):
        models[head](**inputs, decoder_input_ids=DECODER)
    inputs = _contexts(batch_size=3)
    inputs["doc_scores"] = inputs["doc_scores"][:2]
    with pytest.raises(ValueError, match="`context_input_ids` has 9 rows but `doc_scores` has 2 questions"):
        models[head](**inputs, decoder_input_ids=DECODER)


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_labels_of_wrong_batch_size(models, head):
    with pytest.raises(ValueError, match="`labels` has 3 rows but the batch has 2 questions"):
        models[head](**_contexts(), labels=torch.tensor([[0, 5, 2]] * 3))
    with pytest.raises(ValueError, match="`decoder_input_ids` has 1 rows"):
        models[head](**_contexts(), decoder_input_ids=DECODER[:1])


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_single_position_labels_are_refused(models, head):
    # The reference returns a zero loss here (labels are shifted left; transformers issue 8863).
    with pytest.raises(ValueError, match=r"single position.*decoder start/BOS"):
        models[head](**_contexts(), labels=torch.tensor([[5], [6]]))


def test_labels_without_start_token_warn_once(models, caplog):
    model = rk.RagTokenForGeneration(config=models["token"].config, generator=models["token"].generator)
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"), torch.no_grad():
        model(**_contexts(), labels=torch.tensor([[10, 11, 2], [12, 2, 1]]))
        model(**_contexts(), labels=torch.tensor([[10, 11, 2], [12, 2, 1]]))
        model(**_contexts(), labels=DECODER)
    assert caplog.text.count("do not start with the BOS/decoder start token") == 1


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_ignore_index_labels_count_as_padding(models, head):
    with torch.no_grad():
        padded = models[head](**_contexts(), labels=DECODER).loss
        ignored = models[head](**_contexts(), labels=DECODER.masked_fill(DECODER == 1, -100)).loss
    torch.testing.assert_close(padded, ignored, atol=0, rtol=0)


def test_token_generate_needs_contexts_or_retriever(models):
    with pytest.raises(ValueError, match="`context_input_ids`"):
        models["token"].generate(input_ids=torch.tensor([[2, 10, 3]]), max_length=4)
    inputs = _contexts()
    del inputs["context_attention_mask"]
    with pytest.raises(ValueError, match="`context_attention_mask`"):
        models["token"].generate(**inputs, max_length=4)
    inputs = _contexts()
    inputs["doc_scores"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="`doc_scores`"):
        models["token"].generate(**inputs, max_length=4)


def test_token_generate_refuses_unsupported_modes(models):
    with pytest.raises(ValueError, match="greedy, sampling and beam search"):
        models["token"].generate(**_contexts(), max_length=4, penalty_alpha=0.5, top_k=3)


def test_constructor_errors():
    with pytest.raises(ValueError, match="needs a `config`"):
        rk.RagModel()
    with pytest.raises(ValueError, match="needs a `config`"):
        rk.RagTokenForGeneration(question_encoder=None, generator=None)
    with pytest.raises(TypeError, match=r"`config` must be a ragkit\.RagConfig"):
        rk.RagSequenceForGeneration(config=transformers.BartConfig())


def test_transformers_rag_config_is_accepted():
    config = tiny_rag_config("bart")
    model = rk.RagModel(config=transformers.RagConfig(**config.to_dict()))
    assert isinstance(model.config, rk.RagConfig) and model.config.n_docs == config.n_docs


def test_context_encoder_training_needs_tokenized_docs(retrievers):
    config = tiny_rag_config("bart")
    model = rk.RagTokenForGeneration(config=config, retriever=_FakeRetriever())
    model.set_context_encoder_for_training(transformers.DPRContextEncoder(config.question_encoder))
    with pytest.raises(ValueError, match="set_ctx_encoder_tokenizer"):
        model(input_ids=torch.tensor([[2, 10, 3]]), labels=torch.tensor([[0, 5, 2]]))


class _FakeRetriever:
    """Returns fixed contexts and no tokenized documents (as a retriever without a ctx tokenizer)."""

    def __call__(
        self, question_input_ids, question_hidden_states, prefix=None, n_docs=None, return_tensors=None
    ):
        n_docs = n_docs or 3
        batch = len(question_input_ids)
        ids = torch.full((batch * n_docs, 4), 7)
        return {
            "context_input_ids": ids,
            "context_attention_mask": torch.ones_like(ids),
            "retrieved_doc_embeds": torch.zeros(batch, n_docs, question_hidden_states.shape[-1]),
            "doc_ids": torch.zeros(batch, n_docs, dtype=torch.long),
        }
