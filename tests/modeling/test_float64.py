"""float64 models compute in float64, as Transformers' RAG does: doc scores, marginalization and losses.

float32, bfloat16 and float16 models compute them in float32 (``ragkit.losses.compute_dtype``); a float64
model used to be brought down to float32 there too, so its loss and marginalized logits differed from the
reference's by about 1e-6. Here they agree within 1e-10 (absolute; gradients 1e-10 absolute plus 1e-9
relative), the precision of float64 sums taken in another order.
"""

from __future__ import annotations

import pytest
import torch

from rag_helpers import build_pair, retrieved_contexts
from ragkit.losses import compute_dtype, rag_sequence_nll, rag_token_nll

TOL = {"atol": 1e-10, "rtol": 0}
GRAD_TOL = {"atol": 1e-10, "rtol": 1e-9}


@pytest.fixture(scope="module")
def float64_pairs(retrievers, questions):
    """``(pair, contexts)``: a float64 pair and the contexts of ``questions`` (float64 doc scores)."""
    cache = {}

    def get(head: str, generator_kind: str = "bart"):
        key = (head, generator_kind)
        if key not in cache:
            pair = build_pair(head, generator_kind, retrievers)
            contexts = retrieved_contexts(pair, questions)  # computed in float32, as the helper does
            contexts["doc_scores"] = contexts["doc_scores"].double()
            pair.ours.double()  # the reference shares the same modules
            cache[key] = pair, contexts
        return cache[key]

    return get


def _run(pair, model, inputs, **options):
    """Output, and the gradients of the summed loss with respect to every parameter and to ``doc_scores``."""
    model.zero_grad(set_to_none=True)
    inputs = dict(inputs)
    if "doc_scores" in inputs:
        inputs["doc_scores"] = inputs["doc_scores"].detach().clone().requires_grad_(True)
    out = model(**inputs, **options)
    out.loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if "doc_scores" in inputs:
        grads["doc_scores"] = inputs["doc_scores"].grad.clone()
    return out, grads


def _assert_same(pair, inputs, epsilon: float, **options):
    pair.reference.config.label_smoothing = epsilon  # the reference reads it from its config only
    try:
        expected, expected_grads = _run(pair, pair.reference, inputs, **options)
    finally:
        pair.reference.config.label_smoothing = 0.0
    ours, grads = _run(pair, pair.ours, inputs, label_smoothing=epsilon, **options)
    for name in ("loss", "logits", "doc_scores"):
        assert getattr(ours, name).dtype == getattr(expected, name).dtype == torch.float64, name
        torch.testing.assert_close(getattr(ours, name), getattr(expected, name), **TOL)
    assert set(grads) == set(expected_grads) and grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("generator_kind", ["bart", "t5"])
def test_float64_losses_and_gradients_match_the_reference_with_the_retriever(
    float64_pairs, questions, labels, head, generator_kind, epsilon
):
    pair, _ = float64_pairs(head, generator_kind)
    inputs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask, "labels": labels}
    options = {"do_marginalize": True} if head == "token" else {}
    _assert_same(pair, inputs, epsilon, **options)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_float64_losses_and_gradients_match_the_reference_with_given_contexts(
    float64_pairs, labels, head, epsilon
):
    pair, contexts = float64_pairs(head)
    inputs = {**contexts, "labels": labels}
    options = {"do_marginalize": True} if head == "token" else {}
    _assert_same(pair, inputs, epsilon, **options)


def test_float64_marginalized_logits_without_labels(float64_pairs, questions, labels):
    """RAG-Token's marginalization outside training (no gradient), where decoding's form could be used."""
    pair, _ = float64_pairs("token")
    inputs = {"input_ids": questions.input_ids, "attention_mask": questions.attention_mask}
    with torch.no_grad():
        expected = pair.reference(**inputs, decoder_input_ids=labels, do_marginalize=True)
        ours = pair.ours(**inputs, decoder_input_ids=labels, do_marginalize=True)
    assert ours.logits.dtype == torch.float64
    torch.testing.assert_close(ours.logits, expected.logits, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_losses_compute_in_float32_or_float64(dtype):
    logits = torch.randn(6, 4, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    doc_scores = torch.randn(2, 3, dtype=torch.float64)
    target = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert compute_dtype(logits) == expected
    for loss in (rag_sequence_nll, rag_token_nll):
        for epsilon in (0.0, 0.1):
            assert loss(logits, doc_scores, target, pad_token_id=1, epsilon=epsilon).dtype == expected
