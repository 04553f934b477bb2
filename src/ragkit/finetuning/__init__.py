"""Fine-tune RAG models in plain PyTorch (the research project's ``finetune_rag.py`` without Lightning).

* :mod:`~ragkit.finetuning.data`: question/answer splits and batch encoding;
* :mod:`~ragkit.finetuning.arguments`: :class:`TrainingArguments`, the settings of a run and the flags of
  ``ragkit finetune`` built from them;
* :mod:`~ragkit.finetuning.trainer`: :class:`RagTrainer`, checkpoints and resume, the end2end index refresh.

Loading and consolidating checkpoints live in :mod:`ragkit.loading` and are re-exported here.
"""

from __future__ import annotations

from ..loading import MODEL_TYPES, consolidate_rag_checkpoint, is_rag_checkpoint, load_rag_for_training
from .arguments import TrainingArguments
from .data import QAExample, encode_qa_batch, load_qa_split
from .trainer import RagTrainer, TrainResult, refresh_index

__all__ = [
    "MODEL_TYPES",
    "QAExample",
    "RagTrainer",
    "TrainResult",
    "TrainingArguments",
    "consolidate_rag_checkpoint",
    "encode_qa_batch",
    "is_rag_checkpoint",
    "load_qa_split",
    "load_rag_for_training",
    "refresh_index",
]
