"""Helpers for the decoding tests: generators whose beams diverge, and beam search with shared cross-attention.

The sub-models' own initialization (std 0.02) makes a tiny generator repeat one token; :func:`widen`
redraws it wide so that greedy and beam outputs vary from token to token and end at different lengths.
"""

from __future__ import annotations

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutput

from ragkit import _compat
from ragkit.generation.calls import decoding_call
from ragkit.generation.search import SharedCrossAttention, beam_shared_cross_attention

EOS = 2
#: A BART-family generator config of vocabulary 64, width 16, 1 encoder and 2 decoder layers.
TINY_BART_FAMILY = dict(
    vocab_size=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=64,
    pad_token_id=1,
    eos_token_id=EOS,
    decoder_start_token_id=EOS,
)

#: The allowlisted BART-family generators: (model class, config class, extra config fields).
ALLOWLISTED = [
    ("BartForConditionalGeneration", "BartConfig", {}),
    ("MBartForConditionalGeneration", "MBartConfig", {}),
    ("MarianMTModel", "MarianConfig", {}),
    ("PegasusForConditionalGeneration", "PegasusConfig", {}),
    ("PegasusXForConditionalGeneration", "PegasusXConfig", {"num_global_tokens": 2, "block_size": 4}),
    ("BlenderbotForConditionalGeneration", "BlenderbotConfig", {}),
    ("BlenderbotSmallForConditionalGeneration", "BlenderbotSmallConfig", {}),
    ("M2M100ForConditionalGeneration", "M2M100Config", {}),
    ("PLBartForConditionalGeneration", "PLBartConfig", {}),
    ("BigBirdPegasusForConditionalGeneration", "BigBirdPegasusConfig", {"attention_type": "original_full"}),
]


def widen(
    module: torch.nn.Module, seed: int, eos_bias: float = 10.0, eos_row_scale: float | None = None
) -> None:
    """Redraw weight matrices from N(0, 1), seeded, and favour EOS so hypotheses end at different lengths.

    EOS is favoured through the output bias (``final_logits_bias``, BART family) or, where a generator
    has none (T5), by scaling the EOS row of its head by ``eos_row_scale`` when given.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator))
        if hasattr(module, "final_logits_bias"):
            module.final_logits_bias[0, EOS] = eos_bias
        elif eos_row_scale is not None:
            module.lm_head.weight[EOS] *= eos_row_scale


def tiny_seq2seq(model_class: str, config_class: str, extra: dict | None = None, seed: int = 7):
    """A widened tiny generator of a BART-family class named in ``transformers``, in eval mode."""
    config = getattr(transformers, config_class)(**TINY_BART_FAMILY, **(extra or {}))
    torch.manual_seed(seed)
    generator = getattr(transformers, model_class)(config).eval()
    widen(generator, seed, eos_bias=4.0)
    return generator


def padded_contexts(rows: int = 6, length: int = 9, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contexts `(rows, length)` over a vocabulary of 64, rows 1 and 4 right-padded, and their mask."""
    ids = torch.randint(5, 64, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = mask[4, -2:] = 0
    ids[mask == 0] = 1
    return ids, mask


def plain_and_shared(
    generator, ids: torch.Tensor, mask: torch.Tensor, **decode
) -> tuple[torch.Tensor, torch.Tensor, SharedCrossAttention]:
    """The generator's own beam search, and the same search with each context's cross-attention shared.

    Args:
        ids, mask: `(contexts, src_len)` contexts and their mask.
        **decode: ``generate`` keywords; ``num_beams`` is required.

    Returns:
        (plain sequences, sequences with shared cross-attention, the shared state after the search).
    """
    with torch.no_grad():
        states = generator.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = generator.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states.clone()), attention_mask=mask, **decode
        )
        with decoding_call():
            shared = beam_shared_cross_attention(generator, states, mask, num_beams=decode["num_beams"])
            with shared.installed():
                got = generator.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states.clone()),
                    attention_mask=mask,
                    **{_compat.cache_argument_name(generator): shared.cache},
                    **decode,
                )
    return plain, got, shared
