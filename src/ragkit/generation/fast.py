"""RAG-Sequence "fast" decoding (the RAG paper's): no forward pass after generation.

A hypothesis gets probability ~0 under documents whose beam did not produce it, so
``score(y) = log sum_{d produced y} p(d|x) p(y|x,d)``, where ``log p(y|x,d)`` is the sum of the per-token
log-probabilities beam search used (recorded by a logits processor).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import LogitsProcessor

__all__ = ["StepScoreRecorder", "eos_ids", "fast_scores", "generated_log_likelihoods"]

logger = logging.getLogger(__name__)


class StepScoreRecorder(LogitsProcessor):
    """Keeps, per decoding step, each row's top-k processed log-probabilities (the only tokens search can pick)."""

    def __init__(self, k: int, normalize: bool):
        self.k = k
        # Greedy search hands processors raw logits; beam search hands them log-probabilities.
        self.normalize = normalize
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = scores.float()
        if self.normalize:
            step = torch.log_softmax(step, dim=-1)
        values, indices = step.topk(min(self.k, step.shape[-1]), dim=-1)
        self.values.append(values)
        self.indices.append(indices)
        return scores


def eos_ids(generator: Any, model_kwargs: dict[str, Any]) -> list[int]:
    """End-of-sequence ids generation stops at."""
    eos = model_kwargs.get("eos_token_id", generator.generation_config.eos_token_id)
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return eos.flatten().tolist()
    return [eos] if isinstance(eos, int) else list(eos)


def generated_log_likelihoods(
    recorder: StepScoreRecorder,
    sequences: torch.Tensor,
    beam_indices: torch.Tensor | None,
    eos_ids: list[int],
) -> torch.Tensor:
    """`(rows,)` sum of the log-probabilities search assigned to each returned sequence's tokens."""
    rows, length = sequences.shape
    steps = min(len(recorder.values), length - 1)
    total = torch.zeros(rows, dtype=torch.float32, device=sequences.device)
    if steps == 0:
        return total
    values = torch.stack(recorder.values[:steps], dim=1)  # (search_rows, steps, k)
    indices = torch.stack(recorder.indices[:steps], dim=1)
    tokens = sequences[:, 1 : steps + 1]  # token chosen at step t sits at position t + 1
    if beam_indices is not None:
        # beam_indices[r, t]: the running beam (flattened over the batch) that produced token t of row r; -1 past the end.
        parents = beam_indices[:, :steps]
        valid = parents >= 0
        step_ids = torch.arange(steps, device=sequences.device).expand(rows, steps)
        row_values = values[parents.clamp(min=0), step_ids]  # (rows, steps, k)
        row_indices = indices[parents.clamp(min=0), step_ids]
    else:
        # Greedy: rows keep their place; a row is done after its first end-of-sequence token.
        row_values, row_indices = values, indices
        is_eos = torch.zeros_like(tokens, dtype=torch.bool)
        for eos in eos_ids:
            is_eos |= tokens.eq(eos)
        ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        valid = ~ended_before
    hit = row_indices.eq(tokens.unsqueeze(-1))
    found = hit.any(dim=-1)
    # where, not a product: the other recorded scores may be -inf (forced tokens), and -inf * 0 is nan.
    token_scores = torch.where(hit, row_values, 0.0).sum(dim=-1)
    missing = valid & ~found
    if bool(missing.any()):
        logger.warning(
            "fast decoding: %d generated tokens were not among the recorded top-k scores.", int(missing.sum())
        )
        token_scores = token_scores.masked_fill(missing, float("-inf"))
    return token_scores.masked_fill(~valid, 0.0).sum(dim=1)


def fast_scores(
    generated_ll: torch.Tensor, producers: list[list[int]], doc_logprobs: torch.Tensor, rows_per_doc: int
) -> torch.Tensor:
    """`(num_candidates,)` log of sum over the documents that produced each candidate of p(d|x) p(y|x,d)."""
    # Each row's own joint score: document prior plus what beam search gave the sequence.
    row_joint = doc_logprobs.flatten().repeat_interleave(rows_per_doc) + generated_ll
    return torch.stack([row_joint[rows].logsumexp(dim=0) for rows in producers])
