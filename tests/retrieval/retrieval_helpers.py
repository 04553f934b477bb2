"""Helpers shared by the retrieval tests (imported by name: the tests folder is not a package)."""

from __future__ import annotations

from ragkit.testing import tiny_indexed_dataset as make_indexed_dataset

__all__ = ["DIM", "QUESTIONS", "make_indexed_dataset"]

DIM = 32

QUESTIONS = ["where is paris?", "what is the capital of germany", "which river flows through rome", "danube"]
