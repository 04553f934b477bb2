"""Capability probe: is the fast path exact on this generator? Checked once per generator, by running it.

The fast path reaches into the generator's modules (:mod:`ragkit._compat`): a cross-attention swapped for
one over per-context keys/values, packed scoring (positions by trie depth, a 4D self-attention mask), and
generation-step hooks (each step's decoder states, log-normalisers, decoder inputs and beam reordering,
from which scoring takes every hypothesis's log-likelihood under its own document and the
log-probabilities after the prefixes beam search expanded). Each has its own verdict, kept per generator
(and again if its dtype, device type or attention backend changes). At first use, one decoder step of each
swapped path runs next to the plain path on a tiny input; the hooks are checked only when decoding is about
to attach them (thorough decoding with pruned scoring, float32 plain linear head, no autocast), on a tiny
beam search and greedy search steered through reordered beams, a pruned beam and an early end, against
teacher forcing. On any difference beyond float tolerance, missing record, or exception, one warning names
the reason and only that path is turned off: the plain cross-attention, rows scoring, or scoring
recomputing every pair exactly instead of reading the hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from .. import _compat
from .calls import decoding_call, generator_lock
from .fast import eos_ids
from .options import DecodingOptions, DecodingTrace
from .packing import PositionsByDepth, packed_inputs
from .search import (
    StepStates,
    beam_shared_cross_attention,
    expanded_prefix_log_probs,
    generated_pair_log_likelihoods,
    search_contexts,
    step_states_for,
)

__all__ = [
    "FastPathVerdicts",
    "fast_path_allowed",
    "fast_path_verdicts",
    "probe_fast_path",
    "probe_step_hooks",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Reasons:
    """Why each fast path is off on one generator (None: exact), as the probe found."""

    shared_cross_attention: str | None
    packed_scoring: str | None
    hooks_probed: bool = False  # the hook check runs at first use
    step_hooks: str | None = None


_VERDICTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], _Reasons]] = weakref.WeakKeyDictionary()
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


class _SteeredSearch(LogitsProcessor):
    """Overrides generation's scores (never what the hooks record) to walk a search of a known shape.

    Beam search (``num_beams > 1``): at each step one beam of each context gets the good continuations,
    the first at even steps, the last at odd ones, so every beam continues the same one and which one
    changes (rows reordered, beams pruned; a returned hypothesis's prefix sits in another row at each
    step), and at the second step the second-best continuation is an end of sequence (a hypothesis that
    ends early). Greedy search: the first row ends at the second step and then stays in place, padded.
    """

    def __init__(self, num_beams: int, tokens: tuple[int, int], eos: int | None) -> None:
        self.num_beams, self.tokens, self.eos = num_beams, tokens, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - 1
        steered = torch.full_like(scores, -1e4)
        first, second = self.tokens
        if self.num_beams == 1:
            steered[:, first] = 0.0
            if step == 1 and self.eos is not None:
                steered[0, self.eos] = 1.0
            return steered
        winner = (self.num_beams - 1) * (step % 2)
        wins = torch.arange(scores.shape[0], device=scores.device) % self.num_beams == winner
        steered[:, first] = torch.where(wins, 0.0, -50.0)
        steered[:, second] = torch.where(wins, -1.0, -51.0)
        if step == 1 and self.eos is not None:
            steered[wins, self.eos] = -0.5
        return steered


def _steering_tokens(generator: Any, vocab: int) -> tuple[tuple[int, int], int | None]:
    """Two ordinary token ids (no start, pad, BOS or EOS) and the first EOS id (or None)."""
    config = generator.config
    ends = eos_ids(generator, {})
    special = {*ends}
    for name in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            special.add(value)
    ordinary = [token for token in range(3, vocab) if token not in special][:2]
    return (ordinary[0], ordinary[1]), (ends[0] if ends else None)


def _check_step_records(
    generator: Any,
    steps: StepStates,
    sequences: torch.Tensor,
    beam_indices: torch.Tensor | None,
    states: torch.Tensor,
    mask: torch.Tensor,
    num_beams: int,
    reorders_recorded: bool,
) -> str | None:
    """Reason what the hooks recorded differs from teacher forcing (or is missing), or None.

    Args:
        sequences: `(contexts * num_beams, tgt_len)` what the search returned.
        states: `(contexts, src_len, hidden)` encoder outputs; ``mask`` their `(contexts, src_len)` mask.
        reorders_recorded: Beam search ran with the cache that records its reordering (shared
            cross-attention): the prefixes it expanded must come out of the hooks. Else only the
            hypotheses' own log-likelihoods are checked (scoring recomputes the rest).
    """
    rows, length = sequences.shape
    contexts = states.shape[0]
    search = "beam search" if num_beams > 1 else "greedy search"
    recorded = (len(steps.inputs), len(steps.states), len(steps.log_normalizers))
    if recorded != (length - 1,) * 3 or any(
        len(step) != rows
        for records in (steps.inputs, steps.states, steps.log_normalizers)
        for step in records
    ):
        return (
            f"{search} hooks recorded {recorded[0]} decoder inputs, {recorded[1]} head inputs and "
            f"{recorded[2]} logits for {length - 1} steps of {rows} rows"
        )
    if num_beams > 1 and beam_indices is None:
        return "beam search returned no beam_indices"
    if num_beams > 1 and reorders_recorded and len(steps.beam_orders or []) < length - 2:
        return f"beam search reordered its cache {len(steps.beam_orders or [])} times in {length - 1} steps"
    # Targets up to each row's first end of sequence (what search generated; the padding after it is
    # whatever generate fills in).
    target = torch.cat([sequences[:, 1:], sequences[:, :1]], dim=1)
    ended = torch.zeros_like(target, dtype=torch.bool)
    for eos in eos_ids(generator, {}):
        ended |= target.eq(eos)
    counted = (ended.long().cumsum(dim=1) - ended.long()).eq(0)
    counted[:, -1] = False
    # Teacher forcing: every returned sequence under every context, in one plain forward.
    logits = generator(
        encoder_outputs=BaseModelOutput(last_hidden_state=states.repeat_interleave(rows, dim=0)),
        attention_mask=mask.repeat_interleave(rows, dim=0),
        decoder_input_ids=sequences.repeat(contexts, 1),
        use_cache=False,
        return_dict=True,
    ).logits
    exact = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.repeat(contexts, 1).unsqueeze(-1))
    exact = exact.view(contexts, rows, length).transpose(0, 1)  # (rows, contexts, tgt_len)
    own = torch.arange(rows, device=sequences.device) // num_beams
    # Each hypothesis's log-likelihood under its own context (the pairs scoring takes as known).
    pair = generated_pair_log_likelihoods(steps, sequences, beam_indices if num_beams > 1 else None, counted)
    if bool(pair.isnan().any()):
        return (
            f"{search} hooks left {int(pair.isnan().sum())} of {rows} hypotheses without their log-likelihood"
        )
    expected = torch.where(counted, exact[torch.arange(rows), own], 0.0).sum(dim=-1)
    difference = _differs(pair, expected)
    if difference is not None:
        return f"{search} hooks' hypothesis log-likelihoods differ from teacher forcing by {difference:.3g}"
    if num_beams > 1 and not reorders_recorded:
        return None
    # Log-probabilities after every prefix search expanded, under any context (pruned beams included).
    expanded = expanded_prefix_log_probs(
        steps,
        sequences,
        torch.zeros(rows, dtype=torch.long, device=sequences.device),
        target,
        counted,
        contexts,
    )
    if expanded is None:
        return f"{search} hooks gave no prefix log-probabilities"
    found = ~expanded.isnan()
    missing = counted & ~found[torch.arange(rows), own]
    if bool(missing.any()):
        return f"{search} hooks miss {int(missing.sum())} prefixes that search expanded"
    difference = _differs(expanded[found], exact[found])
    if difference is not None:
        return f"{search} hooks' prefix log-probabilities differ from teacher forcing by {difference:.3g}"
    return None


def _probe_generation_config(generator: Any, num_beams: int) -> GenerationConfig:
    """The probe's own generation settings: the generator's special ids, nothing else of its settings."""
    own = generator.generation_config
    special: dict[str, Any] = {}
    for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(own, name, None)
        if value is None:
            value = getattr(generator.config, name, None)
        if value is not None:
            special[name] = value
    settings: dict[str, Any] = dict(
        max_new_tokens=3, min_length=0, do_sample=False, num_beams=num_beams, use_cache=True
    )
    if num_beams > 1:  # raw sums: the hypothesis that ends early is among those returned
        settings.update(length_penalty=0.0, early_stopping=False)
    return GenerationConfig(**special, **settings)


@contextlib.contextmanager
def _generation_config(generator: Any, config: GenerationConfig) -> Iterator[None]:
    """Within the block, ``generator.generation_config`` is ``config``.

    ``generate`` fills every setting a ``generation_config`` argument leaves unset from the generator's own
    (and warns where its ``max_length`` meets the probe's ``max_new_tokens``, or where that argument comes
    with keywords such as ``num_beams``): the probe's search must see none of the user's settings. The
    generator lock is held, so no decoding call of ragkit sees this config.
    """
    own = generator.generation_config
    generator.generation_config = config
    try:
        yield
    finally:
        generator.generation_config = own


def _probe_step_hooks(generator: Any, share_cross_attention: bool) -> str | None:
    """Reason the generation-step hooks' records differ from teacher forcing, or None (also where not used)."""
    ids, mask, _, vocab = _tiny_inputs(generator)
    tokens, eos = _steering_tokens(generator, vocab)
    # Decoding never hooks generation's steps under autocast: turned off where it is on (autocast(...,
    # enabled=False) raises on device types autocast does not know).
    no_autocast = (
        torch.autocast(ids.device.type, enabled=False)
        if _compat.autocast_enabled(ids.device)
        else contextlib.nullcontext()
    )
    with no_autocast:
        states = generator.get_encoder()(
            input_ids=ids, attention_mask=mask, return_dict=True
        ).last_hidden_state
        for num_beams in (2, 1):
            steps = step_states_for(generator, num_beams, DecodingOptions())
            if steps is None:
                return None  # decoding never hooks this generator's steps
            config = _probe_generation_config(generator, num_beams)
            kwargs: dict[str, Any] = dict(
                logits_processor=LogitsProcessorList([_SteeredSearch(num_beams, tokens, eos)])
            )
            trace = DecodingTrace()
            with _generation_config(generator, config):
                sequences, beam_indices, _ = search_contexts(
                    generator,
                    states,
                    ids,
                    mask,
                    num_beams,
                    kwargs,
                    DecodingOptions(trace=trace),
                    share_cross_attention,
                    steps=steps,
                )
            # Beam search records its reordering only through the shared cross-attention's cache; without
            # it (not shared, or no encoder-decoder cache) scoring recomputes the prefixes it would give.
            reorders_recorded = bool(trace.beam_caches)
            reason = _check_step_records(
                generator, steps, sequences, beam_indices, states, mask, num_beams, reorders_recorded
            )
            if reason is not None:
                return reason
    return None


@torch.no_grad()
def probe_step_hooks(generator: Any, share_cross_attention: bool = True) -> str | None:
    """Checks the generation-step hooks on a tiny beam search and greedy search against teacher forcing.

    Decoding runs it (through :class:`FastPathVerdicts`) only when it is about to attach the hooks; on its
    own for diagnostics. Holds the generator's lock (:func:`ragkit.generation.calls.generator_lock`).

    Args:
        generator: The seq2seq generator (in eval mode for the probe; its mode is restored).
        share_cross_attention: Run the beam search with each context's cross-attention shared among its
            beams (as decoding does where that path's own check passes).

    Returns:
        None where the hooks' records give teacher forcing's log-probabilities (or decoding never hooks
        this generator: not a float32 plain linear head), else why not (an exception's text included).
    """
    with generator_lock(generator):
        training = generator.training
        generator.eval()
        try:
            with decoding_call():
                return _probe_step_hooks(generator, share_cross_attention)
        except Exception as error:  # any failure of the hooks means scoring recomputes every pair
            return f"{type(error).__name__}: {error}"
        finally:
            generator.train(training)


def _guarded(check: Callable[..., str | None], *args: Any) -> str | None:
    """``check(*args)``, or the text of the exception it raised."""
    try:
        return check(*args)
    except Exception as error:  # any failure of a fast path means its plain path
        return f"{type(error).__name__}: {error}"


def _probe_modules(generator: Any) -> tuple[str | None, str | None]:
    """Reasons shared cross-attention and packed scoring differ from the plain path (each None if exact)."""
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
            return (
                _guarded(_probe_shared_cross_attention, generator, states, mask, tokens),
                _guarded(_probe_packed, generator, states, mask, start, vocab),
            )
    except Exception as error:  # the tiny input itself failed: neither path is checked
        reason = f"{type(error).__name__}: {error}"
        return reason, reason
    finally:
        generator.train(training)


@torch.no_grad()
def probe_fast_path(generator: Any) -> str | None:
    """Runs one decoder step of each swapped path next to the plain path, and checks the generation-step
    hooks (:func:`probe_step_hooks`); the first reason the fast path differs, or None.

    For diagnostics (decoding keeps a verdict per path: :func:`fast_path_verdicts`). Holds the generator's
    lock (:func:`ragkit.generation.calls.generator_lock`).

    Args:
        generator: The seq2seq generator (in eval mode for the probe; its mode is restored).

    Returns:
        None where the fast path gives the plain path's numbers, else why not (an exception's text included).
    """
    with generator_lock(generator):
        shared, packed = _probe_modules(generator)
        return shared or packed or probe_step_hooks(generator, share_cross_attention=shared is None)


def _verdict_key(generator: Any) -> tuple[str, ...]:
    """What the verdict depends on besides the generator itself."""
    weight = generator.get_input_embeddings().weight
    return (str(weight.dtype), weight.device.type, str(_compat.attn_implementation(generator.config)))


class FastPathVerdicts:
    """Which fast paths decoding may take on one generator, as the capability probe found.

    Attributes:
        shared_cross_attention: Each context's cross-attention computed once and shared by its beams.
        packed_scoring: Packed prefix-trie scoring.
    """

    def __init__(self, generator: Any, options: DecodingOptions, reasons: _Reasons | None) -> None:
        self._generator, self._options, self._reasons = generator, options, reasons
        self.shared_cross_attention = reasons is not None and reasons.shared_cross_attention is None
        self.packed_scoring = reasons is not None and reasons.packed_scoring is None

    def step_hooks(self) -> bool:
        """Whether decoding may attach the generation-step hooks; runs their check at its first use.

        Returns:
            False where the fast path is off or the hook check failed (one warning per generator, naming
            the reason: scoring then recomputes every pair exactly).
        """
        reasons = self._reasons
        if reasons is None:
            return False
        generator = self._generator
        with generator_lock(generator):
            if not reasons.hooks_probed:
                reason = probe_step_hooks(generator, share_cross_attention=self.shared_cross_attention)
                reasons.step_hooks, reasons.hooks_probed = reason, True
                if reason is not None:
                    logger.warning(
                        "ragkit decoding does not read hypothesis log-likelihoods from generation on this %s: "
                        "its generation-step hooks do not reproduce teacher forcing (%s). Outputs are "
                        "unaffected; scoring recomputes every pair (slower).",
                        type(generator).__name__,
                        reason,
                    )
        if reasons.step_hooks is not None and self._options.trace is not None:
            self._options.trace.fast_path_fallbacks.append(reasons.step_hooks)
        return reasons.step_hooks is None


def fast_path_verdicts(generator: Any, options: DecodingOptions) -> FastPathVerdicts:
    """Which fast paths decoding may take on ``generator``: each on in ``options`` and passing its check.

    Shared cross-attention and packed scoring are checked here, once per generator (and dtype, device type,
    attention backend); the generation-step hooks at :meth:`FastPathVerdicts.step_hooks`. A failing check
    logs one warning naming the reason and turns off only its own path.

    Args:
        generator: The seq2seq generator.
        options: Decoding options (``fast_path=False``: every path off, nothing probed; a ``trace`` gets the
            reasons of failed checks).

    Returns:
        The verdicts.
    """
    if not options.fast_path:
        return FastPathVerdicts(generator, options, None)
    key = _verdict_key(generator)
    with generator_lock(generator):
        with _VERDICTS_LOCK:
            reasons = _VERDICTS.setdefault(generator, {}).get(key)
        if reasons is None:
            reasons = _Reasons(*_probe_modules(generator))
            with _VERDICTS_LOCK:
                _VERDICTS.setdefault(generator, {})[key] = reasons
            failed = [
                f"{path} ({reason})"
                for path, reason in (
                    ("shared cross-attention", reasons.shared_cross_attention),
                    ("packed scoring", reasons.packed_scoring),
                )
                if reason is not None
            ]
            if failed:
                logger.warning(
                    "ragkit decoding turns off %s on this %s: the fast path does not reproduce the model's "
                    "own computation there, the plain path runs instead. Outputs are unaffected; decoding is "
                    "slower.",
                    "; ".join(failed),
                    type(generator).__name__,
                )
    if options.trace is not None:
        for reason in (reasons.shared_cross_attention, reasons.packed_scoring):
            if reason is not None:
                options.trace.fast_path_fallbacks.append(reason)
    return FastPathVerdicts(generator, options, reasons)


def fast_path_allowed(generator: Any, options: DecodingOptions) -> bool:
    """Whether every fast path passes its check on ``generator`` (and ``options`` turns it on).

    Runs the probe where it has not run (the hook check included), once per generator; each failing check
    logs one warning naming the reason. Decoding itself consults each path's verdict on its own
    (:func:`fast_path_verdicts`).

    Args:
        generator: The seq2seq generator.
        options: Decoding options.

    Returns:
        True where shared cross-attention, packed scoring and the generation-step hooks all reproduce the
        plain path.
    """
    verdicts = fast_path_verdicts(generator, options)
    return verdicts.shared_cross_attention and verdicts.packed_scoring and verdicts.step_hooks()
