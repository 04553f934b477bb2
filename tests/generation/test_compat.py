"""The fast path's reliance on Transformers internals (ragkit._compat) and the capability probe guarding it.

Every allowlisted cross-attention class decodes, with shared cross-attention, exactly as its own model; a
module that passes the allowlist but computes differently is caught by the probe (one warning, the plain
cross-attention, the plain output; packed scoring and the generation-step hooks, whose own checks pass, stay
on); ``DecodingOptions(fast_path=False)`` turns the fast path off.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from generation_helpers import ALLOWLISTED, padded_contexts, plain_and_shared, tiny_seq2seq, widen
from transformers import BartForConditionalGeneration, DPRQuestionEncoder, T5ForConditionalGeneration
from transformers.models.bart import modeling_bart

from rag_helpers import padded_context_inputs
from ragkit import RagSequenceForGeneration, _compat
from ragkit.generation import DecodingOptions, DecodingTrace, fast_path_allowed, probe_fast_path
from ragkit.testing import tiny_rag_config, tiny_t5_config

MAX_LENGTH = 8
DECODE = dict(num_beams=3, num_return_sequences=3, max_length=MAX_LENGTH)


@pytest.mark.parametrize("model_class,config_class,extra", ALLOWLISTED, ids=[c for _, c, _ in ALLOWLISTED])
def test_every_allowlisted_attention_class_takes_the_fast_path_exactly(model_class, config_class, extra):
    generator = tiny_seq2seq(model_class, config_class, extra)
    layers = _compat.shareable_cross_attention_layers(generator)
    assert layers is not None
    assert type(layers[0].encoder_attn).__name__ in _compat.SHAREABLE_CROSS_ATTENTION
    assert probe_fast_path(generator) is None  # one decoder step: fast equals plain
    ids, mask = padded_contexts()
    plain, got, shared = plain_and_shared(generator, ids, mask, **DECODE)
    assert shared.decoder_layers is not None  # the swapped cross-attention ran
    assert torch.equal(got, plain)
    assert len({tuple(row.tolist()) for row in plain}) > 1


def test_only_known_cross_attention_classes_are_shared():
    # MVP's prompt keys and LED's three outputs are not reproduced: those keep per-beam copies.
    tiny = dict(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
    mvp = transformers.MvpForConditionalGeneration(transformers.MvpConfig(**tiny, max_position_embeddings=32))
    led = transformers.LEDForConditionalGeneration(
        transformers.LEDConfig(
            **tiny,
            max_encoder_position_embeddings=32,
            max_decoder_position_embeddings=32,
            attention_window=[4],
        )
    )
    assert _compat.shareable_cross_attention_layers(mvp) is None
    assert _compat.shareable_cross_attention_layers(led) is None
    assert _compat.shareable_cross_attention_layers(T5ForConditionalGeneration(tiny_t5_config())) is None
    bart = BartForConditionalGeneration(transformers.BartConfig(**mvp.config.to_dict()))
    assert _compat.shareable_cross_attention_layers(bart) is not None


class BartAttention(modeling_bart.BartAttention):
    """Passes the allowlist by name, but its cross-attention output is scaled: the swap would not reproduce it."""

    def forward(self, hidden_states, key_value_states=None, **kwargs):
        output, weights = super().forward(hidden_states, key_value_states=key_value_states, **kwargs)
        return (output * 1.5 if key_value_states is not None else output), weights


class _Fragile(modeling_bart.BartAttention):
    """Its output projection is reachable only inside its own forward: the swapped cross-attention raises."""

    def forward(self, *args, **kwargs):
        self.__dict__["inside"] = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["inside"] = False

    @property
    def out_proj(self):
        if not self.__dict__.get("inside"):
            raise RuntimeError("out_proj is private to forward")
        return self._modules["out_proj"]


_Fragile.__name__ = "BartAttention"


def _rag_with_cross_attention(attention_class) -> RagSequenceForGeneration:
    """A tiny RAG-Sequence model whose BART decoder's cross-attention modules are ``attention_class``."""
    config = tiny_rag_config("bart", hidden_size=32)
    reference_config = transformers.RagConfig(**config.to_dict())
    torch.manual_seed(3)
    generator = BartForConditionalGeneration(reference_config.generator)
    widen(generator, 3, eos_bias=4.0)
    if attention_class is not None:
        for layer in generator.get_decoder().layers:
            original = layer.encoder_attn
            replacement = attention_class(
                original.embed_dim,
                original.num_heads,
                dropout=original.dropout,
                is_decoder=True,
                config=generator.config,
                layer_idx=original.layer_idx,
            )
            replacement.load_state_dict(original.state_dict())
            layer.encoder_attn = replacement
    model = RagSequenceForGeneration(
        config=config,
        question_encoder=DPRQuestionEncoder(reference_config.question_encoder),
        generator=generator,
    )
    return model.eval()


def _inputs(seed: int = 5):
    return padded_context_inputs(seed=seed, max_length=MAX_LENGTH)


@pytest.mark.parametrize("attention_class,reason", [(BartAttention, "differs"), (_Fragile, "RuntimeError")])
def test_probe_falls_back_to_the_plain_path_with_one_warning(attention_class, reason, caplog):
    model = _rag_with_cross_attention(attention_class)
    assert (
        _compat.shareable_cross_attention_layers(model.generator) is not None
    )  # the allowlist lets it through
    assert reason in probe_fast_path(model.generator)
    plain = model.generate(**_inputs(), decoding_options=DecodingOptions(fast_path=False))
    trace = DecodingTrace()
    with caplog.at_level(logging.WARNING, logger="ragkit.generation.probe"):
        got = model.generate(**_inputs(), decoding_options=DecodingOptions(trace=trace))
        again = model.generate(**_inputs())
    warnings = [r for r in caplog.records if r.name == "ragkit.generation.probe"]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()  # once per generator, naming the reason
    assert trace.fast_path_fallbacks and trace.beam_caches == []  # the plain cross-attention
    # Only shared cross-attention is off: packed scoring and the hooks passed their own checks.
    assert trace.packed == [True] and trace.scoring_calls[0][1]["known"] is not None
    assert torch.equal(got, plain) and torch.equal(again, plain)
    if attention_class is BartAttention:  # the swap, unguarded, would have decoded otherwise
        ids, mask = _inputs()["context_input_ids"], _inputs()["context_attention_mask"]
        unguarded_plain, unguarded_swap, _ = plain_and_shared(model.generator, ids, mask, **DECODE)
        assert not torch.equal(unguarded_swap, unguarded_plain)


def test_fast_path_switch_turns_the_fast_path_off(caplog):
    model = _rag_with_cross_attention(None)
    assert probe_fast_path(model.generator) is None
    on, off = DecodingTrace(), DecodingTrace()
    with caplog.at_level(logging.WARNING, logger="ragkit.generation.probe"):
        fast = model.generate(**_inputs(), decoding_options=DecodingOptions(trace=on))
        plain = model.generate(**_inputs(), decoding_options=DecodingOptions(fast_path=False, trace=off))
    assert not caplog.records
    assert len(on.beam_caches) == 1 and on.packed == [True] and on.scoring_calls[0][1]["known"] is not None
    assert off.beam_caches == [] and off.packed == [] and off.scoring_calls[0][1]["known"] is None
    assert not off.fast_path_fallbacks  # off by choice, not by the probe
    assert torch.equal(fast, plain)
    assert fast_path_allowed(model.generator, DecodingOptions()) is True
    assert fast_path_allowed(model.generator, DecodingOptions(fast_path=False)) is False


def test_decoding_options_are_checked():
    with pytest.raises(ValueError, match="scoring_path"):
        DecodingOptions(scoring_path="Packed")
    with pytest.raises(ValueError, match="probe_tokens"):
        DecodingOptions(probe_tokens=0)
    with pytest.raises(ValueError, match="decoding_options"):
        _rag_with_cross_attention(None).generate(**_inputs(), decoding_options={"fast_path": False})
