"""ragkit.losses with chunk sizes that leave a partial last chunk: the same losses and gradients as one chunk.

Every chunked loop (the log-normalizer's rows, the backward pass's rows, RAG-Token's positions) must
cover the remainder that does not fill a whole chunk; sizes that divide the work evenly never test it.
"""

from __future__ import annotations

import pytest
import torch

import ragkit.losses as losses

PAD, BOS = 1, 0
BATCH, N_DOCS, LENGTH, VOCAB = 3, 4, 7, 97
TOL = {"atol": 1e-6, "rtol": 1e-6}


def _targets() -> torch.Tensor:
    return torch.tensor(
        [
            [2, BOS, 11, 12, 13, 2, PAD],
            [2, BOS, 21, 2, PAD, PAD, PAD],
            [2, BOS, 31, 32, 33, 34, 2],
        ]
    )


def _loss_and_grads(head: str, epsilon: float):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(BATCH * N_DOCS, LENGTH, VOCAB, generator=generator) * 3).requires_grad_(True)
    doc_scores = torch.randn(BATCH, N_DOCS, generator=generator).requires_grad_(True)
    weights = torch.rand(BATCH, generator=generator) + 0.5
    if head == "sequence":
        loss = losses.rag_sequence_nll(logits, doc_scores, _targets(), PAD, BOS, N_DOCS, epsilon=epsilon)
    else:
        loss = losses.rag_token_nll(logits, doc_scores, _targets(), PAD, N_DOCS, epsilon=epsilon)
    (loss * weights).sum().backward()
    return loss.detach(), logits.grad, doc_scores.grad


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_partial_last_chunks_give_the_one_chunk_results(monkeypatch, head, epsilon):
    whole = _loss_and_grads(head, epsilon)
    # 5 rows per cache-sized buffer: 84 rows leave 4 over. 2 positions per chunk: 7 positions leave 1.
    rows = 5
    assert (BATCH * N_DOCS * LENGTH) % rows and LENGTH % 2
    monkeypatch.setattr(losses, "_CACHE_ELEMENTS", rows * VOCAB)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 2 * BATCH * N_DOCS * VOCAB + 1)
    chunked = _loss_and_grads(head, epsilon)
    for name, a, b in zip(("loss", "logits gradient", "doc_scores gradient"), chunked, whole):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
