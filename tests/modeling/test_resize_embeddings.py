"""Resizing the generator's vocabulary, through the RAG model or through ``model.generator``, then saving.

- ``config.question_encoder`` and ``config.generator`` are the parts' own config objects however the model
  was built, so ``model.generator.resize_token_embeddings(n)`` updates what ``save_pretrained`` writes and
  the checkpoint loads back (it used to fail with a size mismatch after
  ``from_pretrained_question_encoder_generator``).
- ``model.resize_token_embeddings(n)`` resizes the generator's embeddings, LM head and ``final_logits_bias``
  together (it used to raise ``NotImplementedError`` after resizing half of them, leaving a broken model).

After a resize the model must compute what Transformers' RAG computes over the same resized generator
(1e-5, as every float32 parity test), generate, and survive a save/load round trip unchanged (exact).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import ragkit.modeling_rag as rk
from rag_helpers import build_pair, retrieved_contexts
from ragkit.testing import tiny_rag_config

CLASSES = {"model": rk.RagModel, "sequence": rk.RagSequenceForGeneration, "token": rk.RagTokenForGeneration}
VOCAB = 400  # tiny BART and T5
NEW_VOCAB = 410


def _inputs(n_docs: int = 3, batch_size: int = 2, high: int = VOCAB) -> dict:
    draw = torch.Generator().manual_seed(0)
    ids = torch.randint(5, high, (batch_size * n_docs, 7), generator=draw)
    return {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.randn(batch_size, n_docs, generator=draw),
        "decoder_input_ids": torch.tensor([[0, 11, 12, 2], [0, 13, 2, 1]]),
    }


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _part_checkpoints(tmp_path, generator_kind: str = "bart"):
    config = tiny_rag_config(generator_kind)
    torch.manual_seed(0)
    transformers.DPRQuestionEncoder(config.question_encoder).save_pretrained(tmp_path / "qe")
    transformers.AutoModelForSeq2SeqLM.from_config(config.generator).save_pretrained(tmp_path / "gen")
    return tmp_path / "qe", tmp_path / "gen"


def _built(how: str, head: str, tmp_path):
    """A model of ``head`` built one of the ways a user builds one."""
    cls = CLASSES[head]
    if how == "two_checkpoints":
        question_encoder, generator = _part_checkpoints(tmp_path)
        return cls.from_pretrained_question_encoder_generator(
            question_encoder, generator, index_name="custom", retrieval_vector_size=32, n_docs=3
        )
    if how == "two_checkpoints_with_config":
        question_encoder, generator = _part_checkpoints(tmp_path)
        return cls.from_pretrained_question_encoder_generator(
            question_encoder, generator, config=tiny_rag_config("bart")
        )
    config = tiny_rag_config("bart")
    question_encoder = transformers.DPRQuestionEncoder(config.question_encoder)
    generator = transformers.BartForConditionalGeneration(config.generator)
    if how == "parts":
        return cls(question_encoder=question_encoder, generator=generator, index_name="custom", n_docs=3)
    if how == "parts_with_config":
        return cls(config=tiny_rag_config("bart"), question_encoder=question_encoder, generator=generator)
    if how == "config":
        return cls(config=config)
    if how == "from_pretrained":
        cls(config=config).save_pretrained(tmp_path / "rag")
        return cls.from_pretrained(tmp_path / "rag")
    raise AssertionError(how)


HOWS = [
    "two_checkpoints",
    "two_checkpoints_with_config",
    "parts",
    "parts_with_config",
    "config",
    "from_pretrained",
]


@pytest.mark.parametrize("head", list(CLASSES))
@pytest.mark.parametrize("how", HOWS)
def test_the_rag_config_holds_the_parts_own_configs(tmp_path, how, head):
    model = _built(how, head, tmp_path)
    assert model.config.question_encoder is model.question_encoder.config
    assert model.config.generator is model.generator.config
    if head != "model":
        assert model.rag.config is model.config


@pytest.mark.parametrize("head", list(CLASSES))
@pytest.mark.parametrize("how", HOWS)
def test_generator_resized_directly_saves_and_loads(tmp_path, how, head):
    """The workaround Transformers' users know: resize ``model.generator`` itself, then save."""
    model = _built(how, head, tmp_path).eval()
    model.generator.resize_token_embeddings(NEW_VOCAB)
    assert model.config.generator.vocab_size == NEW_VOCAB
    model.save_pretrained(tmp_path / "resized")
    loaded = CLASSES[head].from_pretrained(tmp_path / "resized").eval()
    assert loaded.generator.get_input_embeddings().weight.shape[0] == NEW_VOCAB
    inputs = _inputs(high=NEW_VOCAB)
    torch.testing.assert_close(_logits(loaded, **inputs), _logits(model, **inputs), atol=0, rtol=0)


def _resized_parts(model) -> tuple:
    generator = model.generator
    bias = getattr(generator, "final_logits_bias", None)
    return (
        generator.get_input_embeddings().weight.shape[0],
        generator.get_output_embeddings().weight.shape[0],
        None if bias is None else bias.shape[-1],
        model.config.generator.vocab_size,
    )


@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_resize_token_embeddings_matches_the_reference_and_round_trips(
    tmp_path, retrievers, questions, labels, head, generator_kind
):
    pair = build_pair(head, generator_kind, retrievers)  # a fresh pair: the resize changes its generator
    model = pair.ours
    tied = model.generator.config.tie_word_embeddings
    embeddings = model.resize_token_embeddings(NEW_VOCAB)
    assert embeddings is model.generator.get_input_embeddings()
    bias = NEW_VOCAB if generator_kind == "bart" else None
    assert _resized_parts(model) == (NEW_VOCAB, NEW_VOCAB, bias, NEW_VOCAB)
    if tied:
        assert model.generator.get_output_embeddings().weight is embeddings.weight

    # Transformers' RAG over the very same resized generator computes the same numbers.
    contexts = retrieved_contexts(pair, questions)
    contexts["context_input_ids"] = contexts["context_input_ids"].clone()
    contexts["context_input_ids"][0, 0] = NEW_VOCAB - 1  # a new token id is accepted
    with torch.no_grad():
        expected = pair.reference(**contexts, labels=labels)
        ours = model(**contexts, labels=labels)
    assert ours.logits.shape[-1] == NEW_VOCAB
    torch.testing.assert_close(ours.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, expected.loss, atol=1e-5, rtol=1e-6)
    generated = model.generate(**contexts, max_length=6, num_beams=2)
    assert generated.shape[0] == labels.shape[0] and int(generated.max()) < NEW_VOCAB

    model.save_pretrained(tmp_path / "resized")
    loaded = type(model).from_pretrained(tmp_path / "resized").eval()
    assert _resized_parts(loaded) == _resized_parts(model)
    with torch.no_grad():
        again = loaded(**contexts, labels=labels)
    torch.testing.assert_close(again.logits, ours.logits, atol=0, rtol=0)
    torch.testing.assert_close(again.loss, ours.loss, atol=0, rtol=0)
    assert torch.equal(loaded.generate(**contexts, max_length=6, num_beams=2), generated)


def test_resize_token_embeddings_on_rag_model_and_options(tmp_path):
    model = rk.RagModel(config=tiny_rag_config("bart")).eval()
    questions = model.question_encoder.get_input_embeddings().weight.shape
    assert model.resize_token_embeddings().weight.shape[0] == VOCAB  # None: unchanged
    model.resize_token_embeddings(NEW_VOCAB, pad_to_multiple_of=16)
    assert _resized_parts(model) == (416, 416, 416, 416)
    assert model.question_encoder.get_input_embeddings().weight.shape == questions  # left alone
    model.resize_token_embeddings(VOCAB - 8)  # shrinking works too
    assert _resized_parts(model) == (392, 392, 392, 392)
    model.save_pretrained(tmp_path / "shrunk")
    loaded = rk.RagModel.from_pretrained(tmp_path / "shrunk").eval()
    inputs = _inputs(high=392)
    torch.testing.assert_close(_logits(loaded, **inputs), _logits(model, **inputs), atol=0, rtol=0)


def test_a_config_given_with_other_parts_is_not_changed():
    """The caller's config may serve other models: a model built with other parts uses a copy."""
    config = tiny_rag_config("bart")
    generators = [
        transformers.BartForConditionalGeneration(tiny_rag_config("bart").generator) for _ in range(2)
    ]
    question_encoder = transformers.DPRQuestionEncoder(config.question_encoder)
    first, second = (
        rk.RagTokenForGeneration(config=config, question_encoder=question_encoder, generator=generator)
        for generator in generators
    )
    assert config.generator is not generators[0].config and config.generator is not generators[1].config
    assert config.question_encoder is question_encoder.config  # already the part's own: no copy needed
    for model, generator in zip((first, second), generators):
        assert model.config.generator is generator.config and model.rag.config is model.config
        assert model.config.n_docs == config.n_docs
    first.generator.resize_token_embeddings(NEW_VOCAB)
    assert first.config.generator.vocab_size == NEW_VOCAB
    assert second.config.generator.vocab_size == config.generator.vocab_size == VOCAB
