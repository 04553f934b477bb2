"""Incomplete or misplaced checkpoints are refused with an error naming what is missing.

- weights missing from ``model.safetensors``/``pytorch_model.bin`` (they would stay random);
- a directory without ``config.json``;
- ``save_pretrained`` onto an existing file.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import ragkit.modeling_rag as rk
from ragkit.errors import CheckpointError, LocationNotFoundError, MissingFileError, RagInputError
from ragkit.testing import tiny_rag_config

CLASSES = {
    "model": rk.RagModel,
    "sequence": rk.RagSequenceForGeneration,
    "token": rk.RagTokenForGeneration,
}


def _contexts() -> dict:
    ids = torch.randint(5, 400, (6, 7), generator=torch.Generator().manual_seed(0))
    return {
        "context_input_ids": ids,
        "context_attention_mask": torch.ones_like(ids),
        "doc_scores": torch.zeros(2, 3),
        "decoder_input_ids": torch.tensor([[0, 11, 12, 2], [0, 13, 2, 1]]),
    }


def _save(directory, head: str, generator_kind: str, library=rk) -> None:
    torch.manual_seed(0)
    config = tiny_rag_config(generator_kind)
    if library is transformers:
        config = transformers.RagConfig(**config.to_dict())
    getattr(library, CLASSES[head].__name__)(config=config).save_pretrained(directory)


def _drop(directory, part: str, filename: str = "model.safetensors") -> int:
    """Remove every tensor of ``part`` from the weights file; returns how many were removed."""
    path = os.path.join(directory, filename)
    weights = load_file(path) if filename.endswith(".safetensors") else torch.load(path)
    kept = {k: v for k, v in weights.items() if f"{part}." not in k}
    if filename.endswith(".safetensors"):
        save_file(kept, path, metadata={"format": "pt"})
    else:
        torch.save(kept, path)
    return len(weights) - len(kept)


@pytest.mark.parametrize("library", [rk, transformers], ids=["saved_by_ragkit", "saved_by_transformers"])
@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_complete_checkpoints_load_without_complaint(tmp_path, head, generator_kind, library, caplog):
    """Tied copies (lm_head, embed_tokens tied to shared) and final_logits_bias absent from the file are fine."""
    _save(tmp_path, head, generator_kind, library)
    saved = set(load_file(tmp_path / "model.safetensors"))
    assert not any("lm_head" in key for key in saved)  # tied: transformers does not write it
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        _, info = CLASSES[head].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert "lacks" not in caplog.text


@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
@pytest.mark.parametrize("head", ["model", "sequence", "token"])
@pytest.mark.parametrize("part", ["generator", "question_encoder"])
def test_missing_part_weights_are_refused(tmp_path, head, generator_kind, part):
    _save(tmp_path, head, generator_kind)
    removed = _drop(tmp_path, part)
    assert removed > 5
    with pytest.raises(CheckpointError) as raised:
        CLASSES[head].from_pretrained(tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message and "allow_missing_weights=True" in message
    assert f"{part.replace('_', ' ')}: " in message
    assert "more)" in message  # first few names, then the count of the others
    assert f"{part}." in message  # a tensor name is shown


def test_a_single_missing_tensor_is_named(tmp_path):
    _save(tmp_path, "sequence", "bart")
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    name = "rag.generator.model.decoder.layers.1.fc2.weight"
    del weights[name]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"lacks 1 weight tensor\(s\) of the RAG model \(generator: 1\): " + name
    ):
        rk.RagSequenceForGeneration.from_pretrained(tmp_path)


def test_missing_weights_in_pytorch_model_bin(tmp_path):
    config = tiny_rag_config("bart")
    source = rk.RagTokenForGeneration(config=config)
    source.config.save_pretrained(tmp_path)
    state = {k: v for k, v in source.state_dict().items() if "question_encoder" not in k}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="question encoder"):
        rk.RagTokenForGeneration.from_pretrained(tmp_path)


def test_allow_missing_weights_loads_with_a_warning(tmp_path, caplog):
    _save(tmp_path, "token", "bart")
    _drop(tmp_path, "generator")
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        model, info = rk.RagTokenForGeneration.from_pretrained(
            tmp_path, allow_missing_weights=True, output_loading_info=True
        )
    assert "lacks" in caplog.text and "random initial values" in caplog.text
    assert info["missing_keys"]
    # The option is ragkit's: it does not end up in the config (nor in a config.json saved later).
    assert not hasattr(model.config, "allow_missing_weights")
    model.save_pretrained(tmp_path / "resaved")
    assert "allow_missing_weights" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    with torch.no_grad():
        assert model(**_contexts()).logits.shape[0] == 6  # batch_size * n_docs


def test_output_loading_info_is_still_honoured(tmp_path):
    _save(tmp_path, "sequence", "t5")
    loaded = rk.RagSequenceForGeneration.from_pretrained(tmp_path)
    assert isinstance(loaded, rk.RagSequenceForGeneration)
    loaded, info = rk.RagSequenceForGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, rk.RagSequenceForGeneration) and "missing_keys" in info


def _part_checkpoints(tmp_path):
    config = tiny_rag_config("bart")
    torch.manual_seed(0)
    transformers.DPRQuestionEncoder(config.question_encoder).save_pretrained(tmp_path / "qe")
    transformers.BartForConditionalGeneration(config.generator).save_pretrained(tmp_path / "gen")
    return tmp_path / "qe", tmp_path / "gen"


def test_from_pretrained_question_encoder_generator_refuses_incomplete_parts(tmp_path, caplog):
    question_encoder, generator = _part_checkpoints(tmp_path)
    model = rk.RagTokenForGeneration.from_pretrained_question_encoder_generator(question_encoder, generator)
    assert isinstance(model, rk.RagTokenForGeneration)
    path = generator / "model.safetensors"
    weights = load_file(path)
    del weights["model.encoder.layers.0.fc1.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"lacks 1 weight tensor\(s\) of the generator: model.encoder.layers"
    ):
        rk.RagTokenForGeneration.from_pretrained_question_encoder_generator(question_encoder, generator)
    with caplog.at_level(logging.WARNING, logger="ragkit.modeling_rag"):
        model = rk.RagTokenForGeneration.from_pretrained_question_encoder_generator(
            question_encoder, generator, allow_missing_weights=True
        )
    assert "model.encoder.layers.0.fc1.weight" in caplog.text
    assert not hasattr(model.config, "allow_missing_weights")


@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_directory_without_config_json_names_the_file(tmp_path, head):
    _save(tmp_path / "ckpt", head, "bart")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(
        MissingFileError, match=r"config\.json does not exist.*is not a RAG checkpoint"
    ) as raised:
        CLASSES[head].from_pretrained(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(raised.value)
    assert "question_encoder_tokenizer" in str(raised.value)  # says what a RAG checkpoint holds
    with pytest.raises(MissingFileError, match=r"config\.json"):
        rk.RagConfig.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(MissingFileError, match=r"config\.json"):
        rk.RagConfig.from_pretrained(tmp_path, subfolder="ckpt")


@pytest.mark.parametrize("head", ["model", "sequence", "token"])
def test_save_pretrained_onto_a_file_raises_and_keeps_it(tmp_path, head):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    model = CLASSES[head](config=tiny_rag_config("bart"))
    with pytest.raises(RagInputError, match=r"`save_directory` .*notes\.txt\) is a file"):
        model.save_pretrained(target)
    assert target.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize("location", ["/no/such/rag-checkpoint", "./no-such-dir", "../x/y/z"])
def test_missing_local_checkpoint_is_named(location):
    """A path that cannot be a Hub id used to give huggingface_hub's 'Repo id must be in the form ...'."""
    with pytest.raises(
        LocationNotFoundError, match=rf"The checkpoint '{re.escape(location)}' does not exist"
    ):
        rk.RagSequenceForGeneration.from_pretrained(location)


def test_missing_part_checkpoint_is_named(tmp_path):
    question_encoder, _ = _part_checkpoints(tmp_path)
    with pytest.raises(
        LocationNotFoundError, match=r"The generator checkpoint .*missing-generator' does not exist"
    ):
        rk.RagTokenForGeneration.from_pretrained_question_encoder_generator(
            question_encoder, tmp_path / "missing-generator"
        )


@pytest.mark.parametrize("head", ["model", "sequence", "token"])
@pytest.mark.parametrize(
    ("part", "model_type", "role"), [("gen", "bart", "generator"), ("qe", "dpr", "question encoder")]
)
def test_a_part_checkpoint_is_named_with_its_model_type(tmp_path, head, part, model_type, role):
    """A bare BART or DPR checkpoint given to a RAG class: the error names the path, the model_type found and
    the constructor that builds a RAG model from separate parts."""
    location = _part_checkpoints(tmp_path)[0 if part == "qe" else 1]
    for load in (CLASSES[head].from_pretrained, rk.RagConfig.from_pretrained):
        with pytest.raises(RagInputError) as raised:
            load(location)
        message = str(raised.value)
        assert f"{location} is not a RAG checkpoint" in message
        assert f"model_type '{model_type}'" in message
        assert "from_pretrained_question_encoder_generator" in message
        assert f"as the {role}" in message
