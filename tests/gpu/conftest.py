"""Fixtures of the GPU tests: random-weight RAG checkpoints of a few sizes, written once per session.

The tests in this folder skip without a CUDA device (module-level ``skipif``); these fixtures build
nothing until a test asks for them, so collecting the folder on a CPU machine costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_helpers import base_rag_config, mid_rag_config, write_random_checkpoint


@pytest.fixture(scope="session")
def mid_checkpoint(tmp_path_factory) -> Path:
    """A "mid" random RAG-Token checkpoint (see :func:`mid_rag_config`)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("gpu") / "mid", mid_rag_config())


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """A bert-base + BART-base shaped random RAG-Token checkpoint (see :func:`base_rag_config`)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("gpu") / "base", base_rag_config(), std=0.02)


@pytest.fixture
def exact_float32():
    """float32 references without TF32, so half-precision errors are measured against exact float32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
