"""RagTokenizer: same files and calls as transformers.RagTokenizer, targets tokenized by the generator's tokenizer."""

from __future__ import annotations

import pytest
import torch
import transformers

from ragkit import RagConfig, RagTokenizer
from ragkit.errors import RagInputError

QUESTIONS = ["How many people live in Paris?", "What is the capital of Germany?"]
ANSWERS = ["about 2.1 million residents", "Berlin"]


@pytest.fixture(scope="module")
def tokenizer(question_encoder_tokenizer, generator_tokenizer):
    return RagTokenizer(question_encoder=question_encoder_tokenizer, generator=generator_tokenizer)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tokenizer, rag_config):
    path = tmp_path_factory.mktemp("rag_tokenizer")
    tokenizer.save_pretrained(path)
    rag_config.save_pretrained(path)
    return path


def test_save_pretrained_writes_the_hub_layout(saved_checkpoint):
    assert (saved_checkpoint / "question_encoder_tokenizer").is_dir()
    assert (saved_checkpoint / "generator_tokenizer").is_dir()


def test_from_pretrained_round_trip_matches_the_originals(saved_checkpoint, tokenizer):
    loaded = RagTokenizer.from_pretrained(saved_checkpoint)
    assert loaded(QUESTIONS)["input_ids"] == tokenizer(QUESTIONS)["input_ids"]
    ids = tokenizer.generator(ANSWERS)["input_ids"]
    assert loaded.batch_decode(ids, skip_special_tokens=True) == ANSWERS


def test_loads_the_same_files_as_transformers(saved_checkpoint):
    ours = RagTokenizer.from_pretrained(saved_checkpoint)
    reference = transformers.RagTokenizer.from_pretrained(saved_checkpoint)
    assert ours(QUESTIONS, padding=True)["input_ids"] == reference(QUESTIONS, padding=True)["input_ids"]
    ids = ours.generator(ANSWERS)["input_ids"]
    assert ours.batch_decode(ids) == reference.batch_decode(ids)
    assert ours.decode(ids[0], skip_special_tokens=True) == reference.decode(ids[0], skip_special_tokens=True)


def test_transformers_loads_what_ragkit_saved(tmp_path, saved_checkpoint):
    RagTokenizer.from_pretrained(saved_checkpoint).save_pretrained(tmp_path)
    RagConfig.from_pretrained(saved_checkpoint).save_pretrained(tmp_path)
    reference = transformers.RagTokenizer.from_pretrained(tmp_path)
    assert reference.generator.batch_decode(
        reference.generator(ANSWERS)["input_ids"], skip_special_tokens=True
    ) == (ANSWERS)


def test_questions_use_the_question_encoder_tokenizer(tokenizer, question_encoder_tokenizer):
    assert tokenizer(QUESTIONS[0])["input_ids"] == question_encoder_tokenizer(QUESTIONS[0])["input_ids"]


def test_text_target_uses_the_generator_tokenizer(tokenizer, generator_tokenizer, question_encoder_tokenizer):
    targets = tokenizer(text_target=ANSWERS)
    assert targets["input_ids"] == generator_tokenizer(ANSWERS)["input_ids"]
    # The reference tokenizes targets with the question encoder's vocabulary: a bug ragkit fixes.
    assert targets["input_ids"] != question_encoder_tokenizer(ANSWERS)["input_ids"]


def test_text_and_text_target_together_give_labels(
    tokenizer, generator_tokenizer, question_encoder_tokenizer
):
    batch = tokenizer(QUESTIONS, text_target=ANSWERS, padding=True, return_tensors="pt")
    assert torch.equal(
        batch["input_ids"],
        question_encoder_tokenizer(QUESTIONS, padding=True, return_tensors="pt")["input_ids"],
    )
    assert torch.equal(
        batch["labels"], generator_tokenizer(ANSWERS, padding=True, return_tensors="pt")["input_ids"]
    )


def test_as_target_tokenizer_switches_and_restores(
    tokenizer, generator_tokenizer, question_encoder_tokenizer
):
    with tokenizer.as_target_tokenizer():
        assert tokenizer(ANSWERS)["input_ids"] == generator_tokenizer(ANSWERS)["input_ids"]
    assert tokenizer(QUESTIONS)["input_ids"] == question_encoder_tokenizer(QUESTIONS)["input_ids"]


def test_as_target_tokenizer_restores_after_an_error(tokenizer, question_encoder_tokenizer):
    with pytest.raises(RuntimeError), tokenizer.as_target_tokenizer():
        raise RuntimeError("boom")
    assert tokenizer.current_tokenizer is question_encoder_tokenizer


def test_prepare_seq2seq_batch_as_the_seed_uses_it(tokenizer, question_encoder_tokenizer):
    batch = tokenizer.prepare_seq2seq_batch("How many people live in Paris?", return_tensors="pt")
    expected = question_encoder_tokenizer("How many people live in Paris?", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert "labels" not in batch


def test_prepare_seq2seq_batch_with_targets(tokenizer, generator_tokenizer):
    batch = tokenizer.prepare_seq2seq_batch(QUESTIONS, ANSWERS, max_target_length=4, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    assert batch["labels"].shape == (2, 4)
    assert (
        batch["labels"][1].tolist()
        == generator_tokenizer("Berlin", padding="max_length", max_length=4)["input_ids"]
    )


def test_save_pretrained_to_a_file_path_is_refused(tmp_path, tokenizer):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="save_directory"):
        tokenizer.save_pretrained(target)


def test_text_pair_stays_with_the_questions(tokenizer, generator_tokenizer, question_encoder_tokenizer):
    # The questions' second segment (a context) must not reach the targets: labels are the answers alone.
    contexts = ["paris is a city", "berlin is a city"]
    out = tokenizer(QUESTIONS, text_pair=contexts, text_target=ANSWERS)
    assert out["labels"] == generator_tokenizer(text_target=ANSWERS)["input_ids"]
    assert out["input_ids"] == question_encoder_tokenizer(QUESTIONS, text_pair=contexts)["input_ids"]
    with pytest.raises(RagInputError, match="text_pair_target"):
        tokenizer(QUESTIONS, text_pair_target=contexts)


@pytest.fixture
def mbart_rag_tokenizer(question_encoder_tokenizer):
    """A RagTokenizer whose generator tokenizer ends inputs with en_XX and targets with ro_RO."""
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    generator = transformers.MBartTokenizer(vocab=vocab, src_lang="en_XX", tgt_lang="ro_RO")
    return RagTokenizer(question_encoder=question_encoder_tokenizer, generator=generator)


def _last_tokens(tokenizer, ids):
    return [tokenizer.convert_ids_to_tokens(row)[-1] for row in ids]


def test_targets_are_tokenized_in_the_generators_target_mode(mbart_rag_tokenizer):
    generator = mbart_rag_tokenizer.generator
    expected = generator(text_target=["hello"])["input_ids"]
    assert _last_tokens(generator, expected) == ["ro_RO"]
    assert mbart_rag_tokenizer(text_target=["hello"])["input_ids"] == expected
    assert mbart_rag_tokenizer(QUESTIONS[:1], text_target=["hello"])["labels"] == expected
    with mbart_rag_tokenizer.as_target_tokenizer():
        assert mbart_rag_tokenizer(["hello"])["input_ids"] == expected
    # Back in input mode, for the generator's own plain calls too.
    assert _last_tokens(generator, generator(["hello"])["input_ids"]) == ["en_XX"]
    assert mbart_rag_tokenizer.current_tokenizer is mbart_rag_tokenizer.question_encoder
