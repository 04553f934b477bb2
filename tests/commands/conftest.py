"""Fixtures for the command tests: a tiny RAG checkpoint over the tiny passages, written by the commands, and a
Hub that refuses connections."""

from __future__ import annotations

import socket

import pytest
import torch

from ragkit import commands
from ragkit.cli import main
from ragkit.testing import TINY_PASSAGES, tiny_bart_config, tiny_dpr_config


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, question_encoder_tokenizer, generator_tokenizer):
    """A tiny RAG-Sequence checkpoint (random weights) with a custom index, written by ``ragkit consolidate``."""
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    from ragkit.encoders import load_text_encoder
    from ragkit.retrieval.building import build_index

    root = tmp_path_factory.mktemp("command_checkpoint")
    torch.manual_seed(0)
    DPRQuestionEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(root / "qe")
    question_encoder_tokenizer.save_pretrained(root / "qe")
    BartForConditionalGeneration(tiny_bart_config()).save_pretrained(root / "gen")
    generator_tokenizer.save_pretrained(root / "gen")
    built = build_index(
        [{"title": t, "text": x} for t, x in TINY_PASSAGES],
        root / "index",
        encoder=load_text_encoder(str(root / "qe"), device="cpu"),
        index_factory="Flat",
        words_per_passage=None,
        show_progress=False,
    )
    code = main(
        [
            "consolidate",
            "--model_type", "rag_sequence",
            "--question_encoder_name_or_path", str(root / "qe"),
            "--generator_name_or_path", str(root / "gen"),
            "--dest", str(root / "rag"),
            "--index_name", "custom",
            "--passages_path", str(built.passages_path),
            "--index_path", str(built.index_path),
            "--n_docs", "2",
        ]
    )  # fmt: skip
    assert code == 0
    return root / "rag"


def _closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online_without_network(monkeypatch):
    """Downloads allowed (HF_HUB_OFFLINE unset) but the Hub endpoint refuses connections."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    commands._can_connect.cache_clear()
    yield
    commands._can_connect.cache_clear()
