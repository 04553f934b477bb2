"""Every place ragkit's decoding relies on a Transformers (or torch) internal, each with what it relies on.

pyproject allows a range of Transformers versions; these are the spots a new version may break. Decoding's
fast path (shared cross-attention, packed scoring, generation-step hooks) is guarded by a capability probe
(``ragkit.generation.probe``): at first use on a generator it compares one decoder step of the fast path
with the plain one, and what the generation-step hooks record during a tiny beam search and greedy search
with teacher forcing, and falls back to the plain path, with one warning, on any difference or exception.
RAG-Token decoding drives ``GenerationMixin``'s private steps directly (bottom of this module).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMode
from transformers.generation.utils import GENERATION_MODES_MAPPING

__all__ = [
    "SHAPE_ONLY_ENCODER_STATES",
    "SHAREABLE_CROSS_ATTENTION",
    "BeamSharedCrossAttention",
    "BeamSharedCrossCache",
    "HeadRowSelector",
    "attn_implementation",
    "autocast_enabled",
    "cache_argument_name",
    "cache_layers",
    "cross_attention_cache",
    "decoder_input_ids_of_call",
    "encoder_decoder_cache",
    "encoder_states_read_for_shape_only",
    "encoder_states_stand_in",
    "gatherable_head",
    "generated_beam_indices",
    "learned_positions",
    "output_cache",
    "position_offset",
    "processor_scores_are_log_probs",
    "project",
    "reorder_document_rows",
    "set_tokenizer_target_mode",
    "shareable_cross_attention_layers",
    "step_head_states",
    "step_logits",
    "swapped_cross_attention",
]

# Cross-attention classes BeamSharedCrossAttention reproduces (q/k/v/out projections, ``scaling``, ``dropout``,
# scaled dot product, no extra keys: not MVP's prompts, not LED's three outputs). Relies on: these class
# names meaning that arithmetic; the probe checks it per model.
SHAREABLE_CROSS_ATTENTION = frozenset(
    {
        "BartAttention",
        "BigBirdPegasusDecoderAttention",
        "BlenderbotAttention",
        "BlenderbotSmallAttention",
        "M2M100Attention",
        "MBartAttention",
        "MarianAttention",
        "PLBartAttention",
        "PegasusAttention",
        "PegasusXAttention",
    }
)

# Decoders that read ``encoder_hidden_states`` only for its batch size, length and dtype (the cross-attention
# mask) besides handing it to their layers' cross-attention, which computes keys/values from it only where
# the cache holds none yet (``cache.is_updated[layer]`` unset). Relies on: these class names meaning that code.
SHAPE_ONLY_ENCODER_STATES = frozenset(
    {
        "BartDecoder",
        "BigBirdPegasusDecoder",
        "BlenderbotDecoder",
        "BlenderbotSmallDecoder",
        "M2M100Decoder",
        "MBartDecoder",
        "MarianDecoder",
        "MT5Stack",
        "PLBartDecoder",
        "PegasusDecoder",
        "PegasusXDecoder",
        "T5Stack",
    }
)


# --- configuration and modules -------------------------------------------------------------------


def attn_implementation(config: Any) -> str | None:
    """The attention backend of a model. Relies on: the private ``config._attn_implementation``."""
    return getattr(config, "_attn_implementation", None)


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type. Relies on: torch's signature (changed over versions)."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # older torch: one function per device type
        check = getattr(torch, f"is_autocast_{device.type}_enabled", None)
        if check is None:
            return bool(torch.is_autocast_enabled()) if device.type == "cuda" else False
        return bool(check())


def _decoder(generator: Any) -> Any:
    """The generator's decoder, or None. Relies on: ``get_decoder()``."""
    get_decoder = getattr(generator, "get_decoder", None)
    return get_decoder() if callable(get_decoder) else None


def shareable_cross_attention_layers(generator: Any) -> list[Any] | None:
    """Decoder layers whose ``encoder_attn`` BeamSharedCrossAttention can stand in for, or None.

    Relies on: ``decoder.layers[i].encoder_attn`` holding an allowlisted class, eager or sdpa attention.
    """
    layers = getattr(_decoder(generator), "layers", None)
    if not layers or attn_implementation(generator.config) not in ("eager", "sdpa"):
        return None
    for layer in layers:
        if type(getattr(layer, "encoder_attn", None)).__name__ not in SHAREABLE_CROSS_ATTENTION:
            return None
    return list(layers)


def encoder_states_read_for_shape_only(generator: Any) -> bool:
    """Whether the decoder reads the encoder states only for their shape once its cross-attention has its keys/values.

    Relies on: ``get_decoder()`` returning a decoder of :data:`SHAPE_ONLY_ENCODER_STATES`.
    """
    return type(_decoder(generator)).__name__ in SHAPE_ONLY_ENCODER_STATES


def learned_positions(generator: Any) -> torch.nn.Embedding | None:
    """The decoder's learned position table if positions can be set per token, else None.

    Relies on: BART-family ``decoder.embed_positions`` (an ``nn.Embedding`` with an int ``offset``) and
    4D self-attention masks (eager or sdpa, not flash-attention). Weights offloaded by accelerate (meta
    outside forward) are only reachable through the module's forward: None then.
    """
    positions = getattr(_decoder(generator), "embed_positions", None)
    if not (
        isinstance(positions, torch.nn.Embedding)
        and isinstance(getattr(positions, "offset", None), int)
        and attn_implementation(generator.config) in ("eager", "sdpa")
    ):
        return None
    if positions.weight.is_meta:
        return None
    return positions


def position_offset(positions: torch.nn.Embedding) -> int:
    """Rows of the table before position 0. Relies on: BART's ``embed_positions.offset`` (2)."""
    return int(positions.offset)


def gatherable_head(generator: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(vocab, hidden)` weight and `(vocab,)` bias of a plain linear output head, or None.

    Relies on: BART's ``final_logits_bias`` buffer being added to the head's output (folded in here).
    """
    head = generator.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.is_meta:
        return None
    bias = head.bias
    final = getattr(generator, "final_logits_bias", None)
    if isinstance(final, torch.Tensor):
        if final.is_meta or final.device != head.weight.device:
            return None
        final = final.reshape(-1)
        bias = final if bias is None else bias + final
    return head.weight, bias


def project(generator: Any, hidden: torch.Tensor) -> torch.Tensor:
    """`(rows, vocab)` logits of `(rows, hidden)` decoder states. Relies on: ``final_logits_bias`` as above."""
    head = generator.get_output_embeddings()
    bias = getattr(generator, "final_logits_bias", None)
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and isinstance(bias, torch.Tensor)
        and not head.weight.is_meta
        and head.weight.device == hidden.device == bias.device
    ):
        return torch.addmm(bias.to(hidden.dtype).reshape(1, -1), hidden, head.weight.t())
    logits = head(hidden)
    return logits if bias is None else logits + bias.to(logits.device)


# --- caches ----------------------------------------------------------------------------------------


def cache_argument_name(generator: Any) -> str:
    """The generator's cache keyword. Relies on: the 5.x rename of ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(generator.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache of a model output. Relies on: ``cache`` (5.x) or ``past_key_values`` (older) on outputs."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per decoder layer: self-attention keys, values, cross-attention keys, values.

    Relies on: ``EncoderDecoderCache.{self,cross}_attention_cache.layers[i].{keys,values}``.
    """
    layers = []
    for own, cross in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        layers.append((own.keys, own.values, cross.keys, cross.values))
    return layers


def encoder_decoder_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> EncoderDecoderCache:
    """A cache holding these per-layer tensors. Relies on: ``EncoderDecoderCache``'s legacy-tuple constructor."""
    return EncoderDecoderCache(layers)


def cross_attention_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> EncoderDecoderCache:
    """A cache holding only cross-attention keys/values, marked as computed.

    Relies on: ``cache.is_updated[layer] = True`` telling the attention not to recompute them.
    """
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for layer_idx, (keys, values) in enumerate(layers):
        cache.cross_attention_cache.update(keys, values, layer_idx)
        cache.is_updated[layer_idx] = True
    return cache


class BeamSharedCrossCache(EncoderDecoderCache):
    """Encoder-decoder cache whose cross-attention part beam search leaves alone.

    Relies on: beam search calling ``cache.reorder_cache(beam_idx)`` (overridden here) once after each
    step, before the next model call, with ``beam_idx[r]`` the running row (flattened over the batch)
    that row ``r`` of the next step continues. Every beam of a context holds the same cross-attention
    keys/values, so only the self-attention part is reordered; ``beam_orders`` keeps each step's order
    (the generation-step hooks read it to know which prefix every row expanded; the probe checks it).
    """

    def __init__(self, *caches: Any) -> None:
        super().__init__(*caches)
        self.beam_orders: list[torch.Tensor] = []  # per step: the running beam each row continues

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.beam_orders.append(beam_idx.detach())
        self.self_attention_cache.reorder_cache(beam_idx)


def encoder_states_stand_in(
    generator: Any, encoder_states: torch.Tensor, cache: EncoderDecoderCache, swapped: bool
) -> torch.Tensor | None:
    """`(contexts, src_len, 0)` encoder states for a beam search that reads only their shape, or None.

    ``generate`` repeats the encoder states it is given once per beam row, `(contexts * num_beams, src_len,
    hidden)`, at the start of beam search. Where every cross-attention layer already has its keys/values
    (``cache``, or swapped for a :class:`BeamSharedCrossAttention`), the decoder reads only their batch
    size, length, dtype and device: a zero-width stand-in makes that copy empty, and a read of the values
    would fail on its shape instead of giving other numbers.

    Relies on: ``generate`` reading nothing of ``encoder_outputs`` but ``last_hidden_state``'s first two
    sizes, expanding it per beam row and handing it to every model call as ``encoder_hidden_states``;
    :func:`encoder_states_read_for_shape_only`; the cache's keys/values being read where
    ``cache.is_updated[layer]`` is set (every decoder layer's: ``decoder.layers`` or T5's ``decoder.block``).

    Args:
        generator: The seq2seq generator.
        encoder_states: `(contexts, src_len, hidden)` encoder outputs.
        cache: The cache beam search starts from.
        swapped: Whether every decoder layer's cross-attention is a :class:`BeamSharedCrossAttention`
            during the search (it reads none of the states).
    """
    if not encoder_states_read_for_shape_only(generator) or encoder_states.shape[1] == 0:
        return None
    if not swapped:
        decoder = _decoder(generator)
        layers = getattr(decoder, "layers", None) or getattr(decoder, "block", None) or ()
        if not layers or not all(cache.is_updated.get(layer_idx) for layer_idx in range(len(layers))):
            return None
    return encoder_states.new_empty((*encoder_states.shape[:2], 0))


# --- modules swapped in and hooks ------------------------------------------------------------------


class BeamSharedCrossAttention(torch.nn.Module):
    """Stands in for a BART-family decoder layer's cross-attention while beam search runs.

    Relies on: the attention's ``q_proj``, ``out_proj``, ``scaling`` and ``dropout``, and the decoder layer
    calling it as ``encoder_attn(hidden_states, key_value_states=..., attention_mask=..., cache=...)`` (or
    ``past_key_values=``, deprecated in 5.24). Each context's keys/values stay `(contexts, heads, src_len,
    head_dim)`; the queries of its beams attend to them together. ``active()`` says whether the running
    forward is the decoding call's own; other forwards get the original attention.
    """

    def __init__(
        self,
        attention: torch.nn.Module,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_beams: int,
        eager: bool,
        active: Callable[[], bool],
    ):
        super().__init__()
        self.attention, self.keys, self.values = attention, keys, values
        self.num_beams, self.eager, self.active = num_beams, eager, active

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        attention = self.attention
        if not self.active():  # another forward on this generator meanwhile: the original
            return attention(
                hidden_states, key_value_states=key_value_states, attention_mask=attention_mask, **kwargs
            )
        rows, length, _ = hidden_states.shape
        contexts, heads, _, dim = self.keys.shape
        dropout = getattr(attention, "dropout", 0.0) if attention.training else 0.0
        query = attention.q_proj(hidden_states).view(contexts, self.num_beams, length, heads, dim)
        query = query.permute(0, 3, 1, 2, 4).reshape(contexts, heads, self.num_beams * length, dim)
        mask = attention_mask
        if mask is not None:
            if mask.dim() == 2:  # (rows, src_len) padding mask
                mask = mask[:, None, None, :].bool()
            # A context's beams share its encoder mask, and no query position changes it.
            mask = mask.view(contexts, self.num_beams, *mask.shape[1:])[:, 0, :, :1]
        if (
            self.eager
        ):  # the model's eager arithmetic, in its dtype (sdpa rounds differently in half precision)
            weights = torch.matmul(query, self.keys.transpose(2, 3)) * attention.scaling
            if mask is not None:
                weights = weights + mask
            weights = torch.nn.functional.dropout(
                torch.softmax(weights, dim=-1), p=dropout, training=dropout > 0
            )
            out = torch.matmul(weights, self.values)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, self.keys, self.values, attn_mask=mask, dropout_p=dropout, scale=attention.scaling
            )  # (contexts, heads, num_beams * length, head_dim)
        out = out.view(contexts, heads, self.num_beams, length, dim).permute(0, 2, 3, 1, 4)
        return attention.out_proj(out.reshape(rows, length, heads * dim)), None


@contextlib.contextmanager
def swapped_cross_attention(layers: list[Any], replacements: list[torch.nn.Module]) -> Iterator[None]:
    """Within the block each layer's ``encoder_attn`` is its replacement. Relies on: that attribute name."""
    originals = [layer.encoder_attn for layer in layers]
    try:
        for layer, replacement in zip(layers, replacements):
            layer.encoder_attn = replacement
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.encoder_attn = original


class HeadRowSelector:
    """Forward pre-hook for the output head: project only the selected hidden states.

    Relies on: the head being called once per forward with the decoder states as its first argument,
    and the model accepting logits of fewer rows (with ``capture``, zero rows: the states are kept in
    ``hidden`` and projected by the caller). ``active()`` says whether the running forward is the
    decoding call's own.
    """

    def __init__(self, active: Callable[[], bool], capture: bool = False) -> None:
        self.active = active
        self.capture = capture
        self.rows: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def __call__(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if self.rows is None or not self.active():
            return None
        hidden = args[0].reshape(-1, args[0].shape[-1])
        selected = hidden.index_select(0, self.rows)
        if not self.capture:
            return (selected, *args[1:])
        self.hidden = selected
        return (hidden[:0], *args[1:])


def decoder_input_ids_of_call(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The decoder ids of a model call made by ``generate``.

    Relies on: ``generate`` calling the model with ``decoder_input_ids`` as a keyword (seen by a forward
    pre-hook registered ``with_kwargs=True``). Relies on (generation-step hooks): greedy and beam search
    calling the model through its module call (module hooks run: no compiled or bypassing call) exactly
    once per step (the first step included, no other call meanwhile), every row's last decoder id being
    the token it reads at that step, and greedy search keeping each row in its place (finished rows
    stay, padded).
    """
    return kwargs.get("decoder_input_ids")


def step_head_states(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`(rows, hidden)` decoder states of a generation step, as the output head gets them.

    Relies on (generation-step hooks): the output head being called once per model call with the
    `(rows, length, hidden)` final decoder states as its first argument, whatever the model does to them
    before (T5's rescaling) included, the step's position last, and the head computing
    ``states @ weight.T + bias`` there (plus ``final_logits_bias``: :func:`gatherable_head`).
    """
    return args[0][:, -1]


def step_logits(output: Any) -> torch.Tensor:
    """`(rows, vocab)` next-token logits of a generation step's model call.

    Relies on (generation-step hooks): ``output.logits[:, -1]`` being the model's own logits of the step's
    position (``final_logits_bias`` added, before any logits processor, also when ``generate`` passes
    ``logits_to_keep``); their log-normaliser is the one teacher forcing gives.
    """
    return output.logits[:, -1]


def generated_beam_indices(output: Any) -> torch.Tensor | None:
    """`(rows, steps)` beam indices of a ``generate`` output, or None (greedy search, or not returned).

    Relies on (generation-step hooks): beam search returning ``beam_indices`` with
    ``return_dict_in_generate=True`` (no ``output_scores`` needed), ``beam_indices[r, t]`` being the
    running row, flattened over the batch, whose step-``t`` distribution chose token ``t + 1`` of
    returned row ``r``, and -1 past a row's end.
    """
    return getattr(output, "beam_indices", None)


def processor_scores_are_log_probs(num_beams: int) -> bool:
    """Whether ``generate``'s logits processors get log-probabilities (else raw logits).

    Relies on (fast decoding's :class:`~ragkit.generation.fast.StepScoreRecorder`): beam search applying
    ``log_softmax`` before the processors, greedy search handing them the raw logits, each once per step,
    and beam search choosing among each row's top ``max(2, 1 + eos ids) * num_beams`` processed scores.
    """
    return num_beams > 1


# --- RAG-Token decoding: GenerationMixin's private steps ------------------------------------------------


def reorder_document_rows(cache: Any, beam_idx: torch.LongTensor) -> Any:
    """RAG-Token's ``_reorder_cache``: rows ``beam * n_docs + d`` move with their beam; cross-attention stays.

    Relies on: beam search calling ``model._reorder_cache(cache, beam_idx)`` when the model defines it, and
    ``DynamicCache.layers[i].{keys,values}`` (updated in place).
    """
    self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer in self_cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        n_docs = keys.shape[0] // beam_idx.shape[0]
        beam_idx = beam_idx.to(keys.device)
        rows = (beam_idx[:, None] * n_docs + torch.arange(n_docs, device=keys.device)).reshape(-1)
        layer.keys = keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
    return cache


def generation_mode_kwargs(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Mode-specific keywords popped from ``kwargs``. Relies on: ``GenerationMixin._extract_generation_mode_kwargs``."""
    return model._extract_generation_mode_kwargs(None, kwargs, False, None, None)


def prepare_generation_config(model: Any, generation_config: Any, kwargs: dict[str, Any]) -> tuple[Any, dict]:
    """(generation config, model kwargs). Relies on: ``GenerationMixin._prepare_generation_config``."""
    return model._prepare_generation_config(generation_config, **kwargs)


def decoding_method(model: Any, generation_mode: GenerationMode) -> Callable[..., Any]:
    """The search loop of a mode. Relies on: ``GENERATION_MODES_MAPPING`` naming ``GenerationMixin`` methods."""
    return getattr(type(model), GENERATION_MODES_MAPPING[generation_mode])


def validate_generation(
    model: Any, model_kwargs: dict[str, Any], generation_mode: Any, generation_config: Any, mode_kwargs: dict
) -> None:
    """Transformers' own checks. Relies on: ``_validate_model_kwargs``, ``_validate_generation_mode``,
    ``_prepare_special_tokens``."""
    model._validate_model_kwargs(model_kwargs.copy())
    model._validate_generation_mode(generation_mode, generation_config, mode_kwargs)
    model._prepare_special_tokens(generation_config, model_kwargs.get("attention_mask") is not None)


def apply_max_new_tokens(
    model: Any,
    generation_config: Any,
    has_default_max_length: bool,
    has_default_min_length: bool,
    inputs_tensor: torch.Tensor,
    input_ids_length: int,
) -> Any:
    """Lengths from ``max_new_tokens``. Relies on: ``_prepare_generated_length``, ``_validate_generated_length``."""
    generation_config = model._prepare_generated_length(
        generation_config=generation_config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name=model.main_input_name,
        inputs_tensor=inputs_tensor,
        input_ids_length=input_ids_length,
    )
    model._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
    return generation_config


def logits_processors_and_stopping(
    model: Any,
    generation_config: Any,
    input_ids_length: int,
    encoder_input_ids: torch.Tensor,
    prefix_allowed_tokens_fn: Any,
    logits_processor: Any,
    stopping_criteria: Any,
    device: torch.device,
) -> tuple[Any, Any]:
    """Prepared processors and criteria. Relies on: ``_get_logits_processor``, ``_get_stopping_criteria``."""
    processors = model._get_logits_processor(
        generation_config=generation_config,
        input_ids_seq_length=input_ids_length,
        encoder_input_ids=encoder_input_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor,
        device=device,
    )
    criteria = model._get_stopping_criteria(
        generation_config=generation_config, stopping_criteria=stopping_criteria
    )
    return processors, criteria


def prepare_cache(model: Any, generation_config: Any, model_kwargs: dict[str, Any], batch_size: int) -> None:
    """Puts generate's cache in ``model_kwargs``. Relies on: ``_prepare_cache_for_generation``."""
    model._prepare_cache_for_generation(
        generation_config,
        model_kwargs,
        generation_mode=None,
        batch_size=batch_size,
        # max_length is final here (max_new_tokens already applied): the cache holds every decoder position.
        max_cache_length=generation_config.max_length - 1,
    )


# --- tokenizers --------------------------------------------------------------------------------------


def set_tokenizer_target_mode(tokenizer: Any, target: bool) -> None:
    """Put ``tokenizer`` in its target mode (``target=True``) or back in its input mode, for plain calls.

    Relies on: ``_switch_to_target_mode``/``_switch_to_input_mode`` setting a tokenizer's special tokens for
    targets or inputs (MBart, M2M100, NLLB: the language code), and ``_in_target_context_manager`` keeping a
    call with ``text`` from switching back to input mode, as ``PreTrainedTokenizerBase.__call__`` does.
    """
    if hasattr(tokenizer, "_in_target_context_manager"):
        tokenizer._in_target_context_manager = target
    switch = getattr(tokenizer, "_switch_to_target_mode" if target else "_switch_to_input_mode", None)
    if switch is not None:
        switch()
