"""Private helpers of Transformers' RAG heads that code outside the library calls, against the reference.

Custom RAG-Sequence decoding loops written for Transformers call ``model._cat_and_pad(hypos, pad_token_id=...)``;
beam-search code calls ``RagTokenForGeneration._reorder_cache(cache, beam_idx)`` as a static method. Both must
give the reference's results (exact: they only move token ids and cached states).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import ragkit
from rag_helpers import retrieved_contexts

HYPOTHESES = [
    [torch.tensor([[2, 5, 6]]), torch.tensor([[2, 7], [2, 8]])],
    [torch.tensor([[2, 5]]), torch.tensor([[2, 7, 9, 4]]), torch.tensor([[3, 3, 3], [2, 2, 2]])],
    [torch.tensor([[4, 4]], dtype=torch.int32)],
]


@pytest.mark.parametrize("hypotheses", HYPOTHESES)
@pytest.mark.parametrize("pad_token_id", [0, 1])
def test_cat_and_pad_gives_the_references_tensor(hypotheses, pad_token_id):
    expected = transformers.RagSequenceForGeneration._cat_and_pad(hypotheses, pad_token_id=pad_token_id)
    for call in (
        lambda: ragkit.RagSequenceForGeneration._cat_and_pad(hypotheses, pad_token_id=pad_token_id),
        lambda: ragkit.RagSequenceForGeneration._cat_and_pad(hypotheses, pad_token_id),
    ):
        out = call()
        assert out.dtype == expected.dtype
        assert torch.equal(out, expected)


def test_cat_and_pad_on_a_model(pairs):
    model = pairs("sequence", "bart").ours
    out = model._cat_and_pad(HYPOTHESES[0], pad_token_id=model.config.generator.pad_token_id)
    assert out.tolist() == [[2, 5, 6], [2, 7, 1], [2, 8, 1]]


def _beam_cache(pair, questions, decoder_input_ids):
    """A decoder cache for one question's beams: the same contexts in every beam, other decoder tokens."""
    contexts = retrieved_contexts(pair, questions)
    n_docs = pair.config.n_docs
    beams = decoder_input_ids.shape[0]
    first = {
        "context_input_ids": contexts["context_input_ids"][:n_docs].repeat(beams, 1),
        "context_attention_mask": contexts["context_attention_mask"][:n_docs].repeat(beams, 1),
        "doc_scores": contexts["doc_scores"][:1].repeat(beams, 1),
    }
    with torch.no_grad():
        return pair.ours(**first, decoder_input_ids=decoder_input_ids, use_cache=True).cache


def _states(cache):
    return [
        (layer.keys.clone(), layer.values.clone())
        for part in (cache.self_attention_cache, cache.cross_attention_cache)
        for layer in part.layers
    ]


@pytest.mark.parametrize("call", ["static", "model", "unbound-with-model"])
def test_reorder_cache_gives_the_references_states(pairs, questions, call):
    pair = pairs("token", "bart")
    decoder_input_ids = torch.tensor([[2, 10], [2, 20], [2, 30]])
    beam_idx = torch.tensor([2, 0, 0])
    expected = transformers.RagTokenForGeneration._reorder_cache(
        _beam_cache(pair, questions, decoder_input_ids), beam_idx
    )
    cache = _beam_cache(pair, questions, decoder_input_ids)
    before = _states(cache)
    if call == "static":
        out = ragkit.RagTokenForGeneration._reorder_cache(cache, beam_idx)
    elif call == "model":
        out = pair.ours._reorder_cache(cache, beam_idx)
    else:  # a wrapper that saved the class attribute and calls it as a method
        out = ragkit.RagTokenForGeneration._reorder_cache(pair.ours, cache, beam_idx)
    assert len(_states(out)) == len(_states(expected))
    for (keys, values), (ref_keys, ref_values) in zip(_states(out), _states(expected)):
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    # The beams really moved: the self-attention states differ from the cache before the reorder.
    assert not torch.equal(_states(out)[0][0], before[0][0])


def test_reorder_cache_refuses_other_arguments():
    with pytest.raises(TypeError, match=r"_reorder_cache takes \(cache, beam_idx\)"):
        ragkit.RagTokenForGeneration._reorder_cache(object())
