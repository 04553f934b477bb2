"""Capability probe: is the fast path exact on this generator? Checked once per generator, by running it.

The fast path reaches into the generator's modules (:mod:`ragkit._compat`): a cross-attention swapped for
one over per-context keys/values, and packed scoring (positions by trie depth, a 4D self-attention mask).
At first use on a generator (and again if its dtype, device type or attention backend changes), one
decoder step of each fast path runs next to the plain path on a tiny input; on any difference beyond
float tolerance, or any exception, one warning names the reason and decoding takes the plain path.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from .. import _compat
from .calls import decoding_call
from .options import DecodingOptions
from .packing import PositionsByDepth, packed_inputs
from .search import beam_shared_cross_attention

__all__ = ["fast_path_allowed", "probe_fast_path"]

logger = logging.getLogger(__name__)

_VERDICTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], str | None]] = weakref.WeakKeyDictionary()
_VERDICTS_LOCK = threading.Lock()


def _tolerance(dtype: torch.dtype) -> float:
    """Largest difference of logits taken as float rounding."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def _differs(fast: torch.Tensor, plain: torch.Tensor) -> float | None:
    """Largest absolute difference, relative to the logits' scale, if beyond tolerance; else None."""
    fast, plain = fast.float(), plain.float()
    if fast.shape != plain.shape:
        return float("inf")
    scale = max(1.0, float(plain.abs().max()))
    difference = float((fast - plain).abs().max()) / scale
    return (
        difference
        if not difference <= _tolerance(plain.dtype if plain.is_floating_point() else torch.float32)
        else None
    )


def _tiny_inputs(generator: Any) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Two tiny contexts (one padded), their mask, the decoder start id and a vocabulary size."""
    device = generator.get_input_embeddings().weight.device
    vocab = int(generator.get_input_embeddings().num_embeddings)
    start = getattr(generator.config, "decoder_start_token_id", None) or 0
    pad = getattr(generator.config, "pad_token_id", None)
    ids = (torch.arange(8, device=device).view(2, 4) * 7 + 3) % vocab
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    if pad is not None:
        ids[1, -1] = pad
    return ids, mask, int(start), vocab


def _probe_shared_cross_attention(
    generator: Any, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor
) -> str | None:
    """Reason the swapped cross-attention differs from the generator's own on one step, or None."""
    num_beams = tokens.shape[0] // states.shape[0]
    shared = beam_shared_cross_attention(generator, states, mask, num_beams)
    if shared is None or shared.decoder_layers is None:
        return None  # nothing swapped: per-beam copies read by the generator's own attention
    expanded_states = states.repeat_interleave(num_beams, dim=0)
    expanded_mask = mask.repeat_interleave(num_beams, dim=0)
    plain = generator(
        encoder_outputs=BaseModelOutput(last_hidden_state=expanded_states),
        attention_mask=expanded_mask,
        decoder_input_ids=tokens,
        use_cache=False,
        return_dict=True,
    ).logits
    with shared.installed():
        fast = generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=expanded_states),
            attention_mask=expanded_mask,
            decoder_input_ids=tokens,
            use_cache=True,
            return_dict=True,
            **{_compat.cache_argument_name(generator): shared.cache},
        ).logits
    difference = _differs(fast, plain)
    if difference is not None:
        return f"shared cross-attention differs from {type(shared.decoder_layers[0].encoder_attn).__name__} by {difference:.3g}"
    return None


def _probe_packed(
    generator: Any, states: torch.Tensor, mask: torch.Tensor, start: int, vocab: int
) -> str | None:
    """Reason packed scoring's decoder states differ from teacher forcing's, or None (also where not used)."""
    positions = _compat.learned_positions(generator)
    if positions is None:
        return None
    a, b, c = 5 % vocab, 6 % vocab, 9 % vocab
    # Trie of [start, a, b] and [start, a, c]: nodes start(0), a(1), b(2), c(2).
    dtype = generator.get_input_embeddings().weight.dtype
    ids, depths, additive = packed_inputs(
        [[start, a, b, c]], [[0, 1, 2, 2]], [[-1, 0, 1, 1]], 0, dtype, states.device
    )
    hook = PositionsByDepth()
    hook.depths = depths
    handle = positions.register_forward_hook(hook)
    try:
        packed = generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=states[:1]),
            attention_mask=mask[:1],
            decoder_input_ids=ids,
            decoder_attention_mask=additive.unsqueeze(1),
            use_cache=False,
            return_dict=True,
        ).logits[0]
    finally:
        handle.remove()
    plain = generator(
        encoder_outputs=BaseModelOutput(last_hidden_state=states[:1].expand(2, -1, -1)),
        attention_mask=mask[:1].expand(2, -1),
        decoder_input_ids=torch.tensor([[start, a, b], [start, a, c]], device=states.device),
        use_cache=False,
        return_dict=True,
    ).logits
    expected = torch.stack([plain[0, 0], plain[0, 1], plain[0, 2], plain[1, 2]])
    difference = _differs(packed, expected)
    if difference is not None:
        return f"packed scoring differs from teacher forcing by {difference:.3g}"
    return None


@torch.no_grad()
def probe_fast_path(generator: Any) -> str | None:
    """Runs one decoder step of each fast path and of the plain path; the reason they differ, or None.

    Args:
        generator: The seq2seq generator (in eval mode for the probe; its mode is restored).

    Returns:
        None where the fast path gives the plain path's numbers, else why not (an exception's text included).
    """
    training = generator.training
    generator.eval()
    try:
        with decoding_call():
            ids, mask, start, vocab = _tiny_inputs(generator)
            states = generator.get_encoder()(
                input_ids=ids, attention_mask=mask, return_dict=True
            ).last_hidden_state
            tokens = torch.tensor(
                [[start, 5 % vocab], [start, 6 % vocab], [start, 7 % vocab], [start, 5 % vocab]],
                device=ids.device,
            )
            return _probe_shared_cross_attention(generator, states, mask, tokens) or _probe_packed(
                generator, states, mask, start, vocab
            )
    except Exception as error:  # any failure of the fast path means the plain path
        return f"{type(error).__name__}: {error}"
    finally:
        generator.train(training)


def _verdict_key(generator: Any) -> tuple[str, ...]:
    """What the verdict depends on besides the generator itself."""
    weight = generator.get_input_embeddings().weight
    return (str(weight.dtype), weight.device.type, str(_compat.attn_implementation(generator.config)))


def fast_path_allowed(generator: Any, options: DecodingOptions) -> bool:
    """Whether decoding may take the fast path on ``generator``: on in ``options`` and the probe agrees.

    The probe runs once per generator (and dtype, device type, attention backend); a failing probe logs
    one warning naming the reason.
    """
    if not options.fast_path:
        return False
    key = _verdict_key(generator)
    with _VERDICTS_LOCK:
        known = _VERDICTS.setdefault(generator, {})
        probed = key in known
        reason = known.get(key)
    if not probed:
        reason = probe_fast_path(generator)
        with _VERDICTS_LOCK:
            _VERDICTS.setdefault(generator, {})[key] = reason
        if reason is not None:
            logger.warning(
                "ragkit decoding takes the plain path on this %s: its fast path (shared cross-attention, packed "
                "scoring) does not reproduce the model's own computation (%s). Outputs are unaffected; decoding "
                "is slower.",
                type(generator).__name__,
                reason,
            )
    if reason is not None and options.trace is not None:
        options.trace.fast_path_fallbacks.append(reason)
    return reason is None
