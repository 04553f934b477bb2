"""ragkit.losses against Transformers' ``get_nll``: losses and gradients, chunked or not, and the rules.

Tolerances (float32, CPU): losses 1e-5 absolute (1e-6 relative), gradients 2e-6 absolute. The
reference runs on the same tensors through its own ``get_nll`` (called on a stand-in holding only the
config fields it reads), with gradients enabled. bf16 logits are compared with the reference on the same
logits in float32: losses as above, logit gradients also 2**-8 relative (bf16 rounding of the gradient).
RAG-Token logits hundreds apart (the smoothing term's document mixture underflows in float32) are
compared with the reference in float32 and in float64: losses as above, gradients 1e-5 absolute and
relative (the float32 reference is itself up to 6e-6 from float64 there).
"""

from __future__ import annotations

import math

import pytest
import torch

import ragkit.losses as losses
from loss_helpers import BOS, PAD, loss_and_grads, ragkit_nll, reference_nll

EOS, START = 2, 2
BATCH, N_DOCS, VOCAB = 3, 4, 97
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-6}
GRAD_TOL = {"atol": 2e-6, "rtol": 0}
BF16_GRAD_TOL = {"atol": 2e-6, "rtol": 2**-8}
EXTREME_GRAD_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _targets() -> torch.Tensor:
    """Targets shaped as ``generate`` and the QA batch encoder make them: decoder start, BOS, answer, EOS, pad."""
    return torch.tensor(
        [
            [START, BOS, 11, 12, 13, EOS, PAD],
            [START, BOS, 21, EOS, PAD, PAD, PAD],
            [START, BOS, 31, 32, 33, 34, EOS],
        ]
    )


def _inputs(seed: int, length: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(BATCH * N_DOCS, length, VOCAB, generator=generator) * 3).to(dtype)
    doc_scores = torch.randn(BATCH, N_DOCS, generator=generator)
    weights = torch.rand(BATCH, generator=generator) + 0.5
    return logits, doc_scores, weights


@pytest.fixture(params=[False, True], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    """Run with the default chunk sizes, or with tiny ones so every loop runs many times."""
    if request.param:
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 2 * N_DOCS * VOCAB + 1)
        # Also 3 positions per RAG-Token chunk (4 cache-sized buffers of 4 documents): partial chunks.
        monkeypatch.setattr(losses, "_CACHE_ELEMENTS", 3 * VOCAB)
    return request.param


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_loss_and_gradients_match_reference(head, epsilon, chunking):
    target = _targets()
    logits, doc_scores, weights = _inputs(0, target.shape[1])
    options = {"epsilon": epsilon}
    for exclude_bos_score in [False, True] if head == "sequence" else [None]:
        if exclude_bos_score is not None:
            options["exclude_bos_score"] = exclude_bos_score
        expected = loss_and_grads(
            N_DOCS, reference_nll(head, N_DOCS), logits, doc_scores, weights, target, **options
        )
        actual = loss_and_grads(N_DOCS, ragkit_nll(head), logits, doc_scores, weights, target, **options)
        torch.testing.assert_close(actual[0], expected[0], **LOSS_TOL)
        torch.testing.assert_close(actual[1], expected[1], **GRAD_TOL)
        torch.testing.assert_close(actual[2], expected[2], **GRAD_TOL)
        reduced = ragkit_nll(head)(logits, doc_scores, target, n_docs=N_DOCS, reduce_loss=True, **options)
        torch.testing.assert_close(reduced, expected[0].sum(), **LOSS_TOL)


def test_exclude_bos_score_changes_the_sequence_loss_as_in_the_reference():
    target = _targets()
    logits, doc_scores, _ = _inputs(1, target.shape[1])
    with_bos = losses.rag_sequence_nll(logits, doc_scores, target, PAD, BOS, N_DOCS, exclude_bos_score=False)
    without_bos = losses.rag_sequence_nll(
        logits, doc_scores, target, PAD, BOS, N_DOCS, exclude_bos_score=True
    )
    # The BOS token's log-probability (negative) is what separates them.
    assert (with_bos - without_bos).min() > 0.1
    reference = reference_nll("sequence", N_DOCS)
    torch.testing.assert_close(
        with_bos, reference(logits, doc_scores, target, exclude_bos_score=False), **LOSS_TOL
    )
    torch.testing.assert_close(
        without_bos, reference(logits, doc_scores, target, exclude_bos_score=True), **LOSS_TOL
    )
    # BOS is only left out when every row has it first, as in the reference.
    mixed = target.clone()
    mixed[0, 1] = 40
    torch.testing.assert_close(
        losses.rag_sequence_nll(logits, doc_scores, mixed, PAD, BOS, N_DOCS, exclude_bos_score=True),
        losses.rag_sequence_nll(logits, doc_scores, mixed, PAD, BOS, N_DOCS, exclude_bos_score=False),
    )


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("ignored", [-100, PAD])
def test_row_with_all_labels_ignored_contributes_nothing(head, epsilon, ignored):
    target = _targets()
    target[1, 1:] = ignored  # the decoder start stays: every scored label is ignored
    logits, doc_scores, weights = _inputs(2, target.shape[1])
    loss, logit_grads, score_grads = loss_and_grads(
        N_DOCS, ragkit_nll(head), logits, doc_scores, weights, target, epsilon=epsilon
    )
    assert loss[1].item() == 0.0
    assert logit_grads[N_DOCS : 2 * N_DOCS].abs().max().item() == 0.0
    assert score_grads[1].abs().max().item() == 0.0
    # The other rows are the reference's, and the reduced loss is their sum.
    expected = reference_nll(head, N_DOCS)(
        logits, doc_scores, target.masked_fill(target == -100, PAD), epsilon=epsilon
    )
    if head == "sequence":
        # The reference gives the empty row -log(n_docs) in both terms.
        mixed = 1.0 - epsilon + epsilon / VOCAB
        assert expected[1].item() == pytest.approx(-math.log(N_DOCS) * mixed, abs=1e-6)
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(loss[keep], expected[keep], **LOSS_TOL)
    reduced = ragkit_nll(head)(logits, doc_scores, target, n_docs=N_DOCS, reduce_loss=True, epsilon=epsilon)
    torch.testing.assert_close(reduced, expected[keep].sum(), **LOSS_TOL)


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_half_precision_logits_are_scored_in_float32(head, epsilon, chunking):
    target = _targets()
    logits, doc_scores, weights = _inputs(3, target.shape[1], dtype=torch.bfloat16)
    half = loss_and_grads(N_DOCS, ragkit_nll(head), logits, doc_scores, weights, target, epsilon=epsilon)
    upcast = loss_and_grads(
        N_DOCS, ragkit_nll(head), logits.float(), doc_scores, weights, target, epsilon=epsilon
    )
    assert half[0].dtype == torch.float32 and half[1].dtype == torch.bfloat16
    torch.testing.assert_close(half[0], upcast[0], atol=0, rtol=0)
    torch.testing.assert_close(half[1], upcast[1].to(torch.bfloat16), atol=0, rtol=0)
    # The reference would take its log-softmax in bf16: it runs on the same logits in float32.
    expected = loss_and_grads(
        N_DOCS, reference_nll(head, N_DOCS), logits.float(), doc_scores, weights, target, epsilon=epsilon
    )
    torch.testing.assert_close(half[0], expected[0], **LOSS_TOL)
    torch.testing.assert_close(half[1].float(), expected[1], **BF16_GRAD_TOL)
    torch.testing.assert_close(half[2], expected[2], **GRAD_TOL)


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("drop", [101.0, 150.0], ids=["subnormal-mixture", "zero-mixture"])
def test_token_smoothing_is_exact_where_the_document_mixture_underflows(drop, epsilon, chunking):
    """Most of the vocabulary ``drop`` below every document's top logit at one position: the mixture
    ``sum_d p(d) p_d(v)`` there is subnormal (101) or 0 (150) in float32; the loss stays finite and exact."""
    target = _targets()
    logits, doc_scores, weights = _inputs(5, target.shape[1])
    position = logits.view(BATCH, N_DOCS, -1, VOCAB)[1, :, 1]  # question 1, position 1: scored
    position[:, 8:] = position.amax(dim=-1, keepdim=True) - drop
    actual = loss_and_grads(N_DOCS, ragkit_nll("token"), logits, doc_scores, weights, target, epsilon=epsilon)
    assert all(bool(torch.isfinite(tensor).all()) for tensor in actual)
    reference = reference_nll("token", N_DOCS)
    expected = loss_and_grads(N_DOCS, reference, logits, doc_scores, weights, target, epsilon=epsilon)
    exact = loss_and_grads(
        N_DOCS, reference, logits.double(), doc_scores.double(), weights, target, epsilon=epsilon
    )
    for wanted in (expected, exact):
        torch.testing.assert_close(actual[0].double(), wanted[0].double(), **LOSS_TOL)
        torch.testing.assert_close(actual[1].double(), wanted[1].double(), **EXTREME_GRAD_TOL)
        torch.testing.assert_close(actual[2].double(), wanted[2].double(), **EXTREME_GRAD_TOL)


def test_logits_are_not_modified():
    target = _targets()
    logits, doc_scores, weights = _inputs(4, target.shape[1])
    before = logits.clone()
    for head in ("sequence", "token"):
        for epsilon in (0.0, 0.1):
            leaf = logits.requires_grad_(True)
            (
                ragkit_nll(head)(leaf, doc_scores, target, n_docs=N_DOCS, epsilon=epsilon) * weights
            ).sum().backward()
            logits = leaf.detach()
    assert torch.equal(logits, before)
