"""The CPU and GPU loss tests' shared pieces: Transformers' ``get_nll`` and ragkit's losses, bound alike."""

from __future__ import annotations

import functools
import types

import transformers

import ragkit.losses as losses

#: Pad and BOS token ids of the loss tests' targets.
PAD, BOS = 1, 0


def reference_nll(head: str, n_docs: int):
    """Transformers' ``get_nll`` of ``head`` bound to a stand-in with the config fields it reads."""
    config = types.SimpleNamespace(
        generator=types.SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS), bos_token_id=BOS, n_docs=n_docs
    )
    model = types.SimpleNamespace(config=config)
    if head == "sequence":
        return functools.partial(transformers.RagSequenceForGeneration.get_nll, model)
    model.marginalize = functools.partial(transformers.RagTokenForGeneration.marginalize, model)
    return functools.partial(transformers.RagTokenForGeneration.get_nll, model)


def ragkit_nll(head: str):
    """ragkit's loss of ``head`` with the tests' pad (and BOS) ids."""
    if head == "sequence":
        return functools.partial(losses.rag_sequence_nll, pad_token_id=PAD, bos_token_id=BOS)
    return functools.partial(losses.rag_token_nll, pad_token_id=PAD)


def loss_and_grads(n_docs: int, loss_fn, logits, doc_scores, weights, target, **options):
    """Per-question losses and the gradients of ``logits`` and ``doc_scores`` of ``sum(loss * weights)``.

    Weighted so that each row's gradient is checked, not only their sum.
    """
    logits = logits.detach().clone().requires_grad_(True)
    doc_scores = doc_scores.detach().clone().requires_grad_(True)
    loss = loss_fn(logits, doc_scores, target, n_docs=n_docs, **options)
    (loss * weights).sum().backward()
    return loss.detach(), logits.grad, doc_scores.grad
