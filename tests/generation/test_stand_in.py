"""The zero-width encoder states the shared beam search gives ``generate`` (:func:`ragkit._compat.encoder_states_stand_in`).

On the shared cross-attention path every decoder layer reads its keys/values from the per-context ones
(BART family: a swapped-in cross-attention; T5: copies per beam in the cache), and the decoder reads the
encoder states only for their shape: a `(contexts, src_len, 0)` stand-in keeps generate from copying
them per beam row. Only where that is known: an allowlisted decoder, and every layer's keys/values there.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from generation_helpers import ALLOWLISTED, padded_contexts, tiny_seq2seq
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutput

from ragkit import _compat
from ragkit.generation import DecodingOptions, rag_sequence
from ragkit.generation.calls import decoding_call
from ragkit.generation.search import beam_shared_cross_attention, search_contexts
from ragkit.testing import tiny_bart_config, tiny_t5_config

NUM_BEAMS = 3
MAX_LENGTH = 8
T5_FAMILY = [("T5ForConditionalGeneration", "T5Config"), ("MT5ForConditionalGeneration", "MT5Config")]


@pytest.fixture(scope="module", params=["bart", "t5"])
def generator(request):
    """A tiny seq2seq generator: BART (cross-attention swapped on the shared path) or T5 (per-beam copies)."""
    from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

    torch.manual_seed(0)
    if request.param == "bart":
        return BartForConditionalGeneration(tiny_bart_config()).eval()
    return T5ForConditionalGeneration(tiny_t5_config()).eval()


def _shared(generator):
    """Encoder states `(2, 5, hidden)` and the shared cross-attention of a beam search over them."""
    ids = torch.arange(10).view(2, 5) + 3
    with torch.no_grad(), decoding_call():
        states = generator.get_encoder()(input_ids=ids, return_dict=True).last_hidden_state
        shared = beam_shared_cross_attention(generator, states, None, NUM_BEAMS)
    return states, shared


def test_stand_in_keeps_what_the_decoder_reads_of_the_states(generator):
    states, shared = _shared(generator)
    stand_in = _compat.encoder_states_stand_in(
        generator, states, shared.cache, swapped=shared.decoder_layers is not None
    )
    assert stand_in is not None
    assert stand_in.shape == (2, 5, 0)
    assert (stand_in.dtype, stand_in.device) == (states.dtype, states.device)
    assert stand_in.repeat_interleave(NUM_BEAMS, dim=0).untyped_storage().nbytes() == 0


def test_no_stand_in_where_a_layer_would_compute_its_keys_values(generator):
    states, shared = _shared(generator)
    empty = _compat.BeamSharedCrossCache(DynamicCache(), DynamicCache())
    assert _compat.encoder_states_stand_in(generator, states, empty, swapped=False) is None
    if shared.decoder_layers is None:  # T5: per-beam copies of every layer but the last
        cross = DynamicCache()
        for layer_idx, (keys, values) in enumerate(shared.layers[:-1]):
            cross.update(keys, values, layer_idx)
        partial = _compat.BeamSharedCrossCache(DynamicCache(), cross)
        assert _compat.encoder_states_stand_in(generator, states, partial, swapped=False) is None
    assert _compat.encoder_states_stand_in(generator, states[:, :0], shared.cache, swapped=True) is None


def test_no_stand_in_for_a_decoder_not_known_to_read_only_the_shape(generator, monkeypatch):
    states, shared = _shared(generator)
    monkeypatch.setattr(_compat, "SHAPE_ONLY_ENCODER_STATES", frozenset())
    assert not _compat.encoder_states_read_for_shape_only(generator)
    assert _compat.encoder_states_stand_in(generator, states, shared.cache, swapped=True) is None


def test_estimate_counts_the_copy_per_beam_row_only_where_generate_makes_it(generator, monkeypatch):
    n_docs, context_length, budget = 4, 64, 2**50
    rows = n_docs * NUM_BEAMS
    config = generator.config
    copy = rows * context_length * config.d_model * 4  # float32

    def question(shared: bool) -> float:
        fitting = rag_sequence._questions_fitting(
            generator, n_docs, NUM_BEAMS, context_length, {}, budget, shared_cross_attention=shared
        )
        return budget / fitting

    known = question(True)
    monkeypatch.setattr(_compat, "SHAPE_ONLY_ENCODER_STATES", frozenset())
    unknown = question(True)
    assert unknown - known == pytest.approx(copy, rel=1e-3)


def _t5_family_generator(model_class: str, config_class: str):
    fields = tiny_t5_config(vocab_size=64, d_model=16, d_kv=8, d_ff=32).to_dict()
    config = getattr(transformers, config_class)(**{k: v for k, v in fields.items() if k != "model_type"})
    torch.manual_seed(7)
    generator = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # wide random weights: varied hypotheses
        for param in generator.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 1.0)
    return generator


#: Every allowlisted decoder and how its beams read the per-context keys/values: swapped cross-attention
#: (BART family) or per-beam copies in the cache (T5 family, and the BART family with the swap turned off).
ALLOWLISTED_DECODERS = [
    *(
        pytest.param(
            lambda m=model_class, c=config_class, e=extra: tiny_seq2seq(m, c, e),
            swap,
            id=f"{config_class}-{name}",
        )
        for model_class, config_class, extra in ALLOWLISTED
        for swap, name in ((True, "swapped"), (False, "cached"))
    ),
    *(
        pytest.param(
            lambda m=model_class, c=config_class: _t5_family_generator(m, c),
            False,
            id=f"{config_class}-cached",
        )
        for model_class, config_class in T5_FAMILY
    ),
]


@pytest.mark.parametrize("make,swap", ALLOWLISTED_DECODERS)
def test_search_with_the_stand_in_decodes_as_the_generator(make, swap, monkeypatch):
    # Every allowlisted decoder, with its cross-attention swapped (BART family) or reading per-beam copies
    # from the cache (T5 family; BART family where it is not swapped), given the stand-in: its own beam
    # search's sequences.
    generator = make()
    assert _compat.encoder_states_read_for_shape_only(generator)
    if swap:
        assert _compat.shareable_cross_attention_layers(generator) is not None
    else:
        monkeypatch.setattr(_compat, "shareable_cross_attention_layers", lambda generator: None)
    given = []
    stand_in = _compat.encoder_states_stand_in

    def recorded(*args, **kwargs):
        given.append(stand_in(*args, **kwargs))
        return given[-1]

    monkeypatch.setattr(_compat, "encoder_states_stand_in", recorded)
    ids, mask = padded_contexts()
    with torch.no_grad():
        states = generator.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            encoder_outputs=BaseModelOutput(last_hidden_state=states.clone()),
            num_beams=NUM_BEAMS,
            num_return_sequences=NUM_BEAMS,
            max_length=MAX_LENGTH,
        )
        with decoding_call():
            got, _, _ = search_contexts(
                generator, states, ids, mask, NUM_BEAMS, {"max_length": MAX_LENGTH}, DecodingOptions(), True
            )
    assert len(given) == 1 and given[0] is not None and given[0].shape == (*states.shape[:2], 0)
    assert torch.equal(got, plain)
    assert len({tuple(row.tolist()) for row in plain}) > 1
