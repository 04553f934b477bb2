"""Checkpoints in the facebook/rag-* layout: ragkit <-> transformers, safetensors and .bin, head mismatch."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file

import ragkit.modeling_rag as rk
from ragkit.testing import tiny_rag_config

HEADS = {"model": "RagModel", "sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}


def _contexts(n_docs: int = 3, batch_size: int = 2):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (batch_size * n_docs, 7), generator=generator)
    return {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.randn(batch_size, n_docs, generator=generator),
        "decoder_input_ids": torch.tensor([[0, 11, 12, 2], [0, 13, 2, 1]]),
    }


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_round_trips_with_transformers(tmp_path, head, generator_kind):
    config = tiny_rag_config(generator_kind)
    torch.manual_seed(0)
    ours = getattr(rk, HEADS[head])(config=config).eval()
    inputs = _contexts()
    expected = _logits(ours, **inputs)

    # ragkit -> transformers
    ours.save_pretrained(tmp_path / "ragkit")
    weights = load_file(tmp_path / "ragkit" / "model.safetensors")
    # Heads keep the parts under `rag.` (facebook/rag-* layout); RagModel, the base model, has no prefix.
    prefix = "" if head == "model" else "rag."
    assert weights and all(
        k.startswith((f"{prefix}question_encoder.", f"{prefix}generator.")) for k in weights
    )
    saved_config = json.loads((tmp_path / "ragkit" / "config.json").read_text())
    assert saved_config["model_type"] == "rag" and saved_config["architectures"] == [HEADS[head]]
    theirs = getattr(transformers, HEADS[head]).from_pretrained(tmp_path / "ragkit").eval()
    _assert_same_weights(ours, theirs)
    torch.testing.assert_close(_logits(theirs, **inputs), expected, atol=1e-6, rtol=0)

    # transformers -> ragkit
    with torch.no_grad():
        for param in theirs.parameters():
            param.mul_(1.5)
    theirs.save_pretrained(tmp_path / "transformers")
    back = getattr(rk, HEADS[head]).from_pretrained(tmp_path / "transformers").eval()
    _assert_same_weights(theirs, back)
    torch.testing.assert_close(_logits(back, **inputs), _logits(theirs, **inputs), atol=1e-6, rtol=0)
    # Tied embeddings stay tied after loading.
    assert back.generator.get_input_embeddings().weight is back.generator.get_output_embeddings().weight


@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
def test_loads_pytorch_model_bin_with_every_key(tmp_path, generator_kind):
    """Older Hub repos (facebook/rag-*-nq) hold pytorch_model.bin with tied copies spelled out."""
    config = tiny_rag_config(generator_kind)
    torch.manual_seed(1)
    source = rk.RagSequenceForGeneration(config=config).eval()
    source.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in source.state_dict().items()}  # includes the tied duplicates
    assert any("lm_head" in k for k in state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    for cls in (rk.RagSequenceForGeneration, rk.RagTokenForGeneration, rk.RagModel):
        loaded = cls.from_pretrained(tmp_path).eval()
        inputs = _contexts()
        torch.testing.assert_close(
            _logits(loaded, **inputs), _logits(source.rag, **inputs), atol=1e-6, rtol=0
        )


def test_head_mismatch_logs_a_warning(tmp_path, caplog):
    config = tiny_rag_config("bart")
    transformers.RagTokenForGeneration(config=transformers.RagConfig(**config.to_dict())).save_pretrained(
        tmp_path / "token"
    )
    rk.RagSequenceForGeneration(config=config).save_pretrained(tmp_path / "sequence")
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        rk.RagSequenceForGeneration.from_pretrained(tmp_path / "token")
    assert "RagTokenForGeneration" in caplog.text and "RAG-Token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        rk.RagTokenForGeneration.from_pretrained(tmp_path / "sequence")
    assert "RagSequenceForGeneration" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        rk.RagSequenceForGeneration.from_pretrained(tmp_path / "sequence")
        rk.RagModel.from_pretrained(tmp_path / "token")
    assert "RAG-" not in caplog.text


def test_from_pretrained_with_retriever_and_dtype(tmp_path, retrievers, questions, labels):
    config = tiny_rag_config("bart")
    rk.RagTokenForGeneration(config=config).save_pretrained(tmp_path)
    retriever = retrievers["bart"][1]
    model = rk.RagTokenForGeneration.from_pretrained(tmp_path, retriever=retriever).eval()
    assert model.retriever is retriever and model.rag.retriever is retriever
    with torch.no_grad():
        out = model(input_ids=questions.input_ids, labels=labels)
    assert out.doc_scores.shape == (2, config.n_docs) and torch.isfinite(out.loss).all()

    half = rk.RagTokenForGeneration.from_pretrained(
        tmp_path, retriever=retriever, dtype=torch.bfloat16
    ).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out16 = half(input_ids=questions.input_ids, labels=labels, do_marginalize=True)
    # Doc scores, marginalization and loss run in float32 even for a bf16 model.
    assert out16.doc_scores.dtype == torch.float32
    assert out16.logits.dtype == torch.float32 and out16.loss.dtype == torch.float32
    torch.testing.assert_close(out16.doc_scores, out.doc_scores, atol=0.1, rtol=0.05)


def test_from_pretrained_question_encoder_generator(tmp_path):
    config = tiny_rag_config("bart")
    torch.manual_seed(2)
    question_encoder = transformers.DPRQuestionEncoder(config.question_encoder)
    generator = transformers.BartForConditionalGeneration(config.generator)
    question_encoder.save_pretrained(tmp_path / "qe")
    generator.save_pretrained(tmp_path / "gen")
    model = rk.RagSequenceForGeneration.from_pretrained_question_encoder_generator(
        tmp_path / "qe", tmp_path / "gen", n_docs=2, question_encoder_hidden_dropout_prob=0.3
    )
    assert isinstance(model, rk.RagSequenceForGeneration) and not model.training
    assert model.config.n_docs == 2
    assert model.config.question_encoder.hidden_dropout_prob == 0.3
    _assert_same_weights(model.question_encoder, question_encoder)
    _assert_same_weights(model.generator, generator)
    # Ready models can be passed instead of paths; a path is needed otherwise.
    again = rk.RagTokenForGeneration.from_pretrained_question_encoder_generator(
        question_encoder_model=question_encoder, generator_model=generator
    )
    assert again.question_encoder is question_encoder
    with pytest.raises(ValueError, match="generator_pretrained_model_name_or_path"):
        rk.RagModel.from_pretrained_question_encoder_generator(question_encoder_model=question_encoder)


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    config = tiny_rag_config("bart")
    model = rk.RagModel(config=config)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "generator_tokenizer").mkdir()
    (target / "generator_tokenizer" / "vocab.json").write_text("{}")
    model.save_pretrained(target)
    assert (target / "generator_tokenizer" / "vocab.json").exists()
    assert (target / "model.safetensors").exists()
    # A new directory is written atomically: nothing but the final directory is left behind.
    model.save_pretrained(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fresh"]
