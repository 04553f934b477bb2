"""Beam search set-up and what it records for scoring: shared cross-attention, step hooks, candidates.

Each context's cross-attention keys/values are computed once and read by all its beams (BART family: a
swapped-in cross-attention over the per-context keys/values; other generators: copies per beam that beam
search does not reorder). Beam search then reads the encoder states only for their shape: where the
decoder is known to, generate gets a zero-width stand-in, and its copy of them per beam row is empty.
Hooks keep each step's decoder states and log-normalisers, so every hypothesis's log-likelihood under the
document that generated it, and the log-probability of any token after any prefix beam search expanded
(pruned beams included), come out of generation without another forward pass.
Everything here that touches the generator's internals goes through :mod:`ragkit._compat`; the capability
probe (:mod:`.probe`) runs :func:`search_contexts` with the hooks on a tiny input and checks what they
record against teacher forcing before decoding relies on them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from .. import _compat
from .calls import owned_by_this_call
from .fast import StepScoreRecorder, eos_ids
from .options import DecodingOptions

__all__ = [
    "SharedCrossAttention",
    "StepStates",
    "beam_shared_cross_attention",
    "candidate_groups",
    "expanded_prefix_log_probs",
    "generate_hypotheses",
    "generated_pair_log_likelihoods",
    "known_pairs",
    "producer_rows",
    "search_contexts",
    "searches_with_own_cache",
    "step_states_for",
]


def candidate_groups(sequences: torch.Tensor, rows_per_question: int, deduplicate: bool) -> list[list[int]]:
    """Per question, the row indices of its candidates (first occurrence order when deduplicating)."""
    batch_size = sequences.shape[0] // rows_per_question
    if not deduplicate:
        return [list(range(q * rows_per_question, (q + 1) * rows_per_question)) for q in range(batch_size)]
    as_lists = sequences.tolist()
    groups = []
    for q in range(batch_size):
        first: dict[tuple[int, ...], int] = {}
        for row in range(q * rows_per_question, (q + 1) * rows_per_question):
            first.setdefault(tuple(as_lists[row]), row)
        groups.append(list(first.values()))
    return groups


class SharedCrossAttention:
    """Each context's cross-attention keys/values, computed once, and how beam search reads them.

    BART-family decoders (eager or sdpa attention): ``installed()`` swaps each layer's cross-attention
    for a :class:`ragkit._compat.BeamSharedCrossAttention` over the per-context keys/values, and ``cache``
    holds no cross-attention part. Other generators: ``cache`` holds a copy per beam, which beam search
    does not reorder (:class:`ragkit._compat.BeamSharedCrossCache`).

    Attributes:
        cache: The cache to give ``generate``.
        layers: Per decoder layer, the `(contexts, heads, src_len, head_dim)` keys and values.
        decoder_layers: The decoder layers whose cross-attention is swapped, or None.
    """

    def __init__(self, generator: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], num_beams: int):
        self.layers = layers
        self.num_beams = num_beams
        self.decoder_layers = _compat.shareable_cross_attention_layers(generator)
        self.eager = _compat.attn_implementation(generator.config) == "eager"
        if self.decoder_layers is not None and len(self.decoder_layers) != len(layers):
            self.decoder_layers = None
        cross = DynamicCache()
        if self.decoder_layers is None:
            for layer_idx, (keys, values) in enumerate(layers):
                cross.update(
                    keys.repeat_interleave(num_beams, dim=0),
                    values.repeat_interleave(num_beams, dim=0),
                    layer_idx,
                )
        self.cache = _compat.BeamSharedCrossCache(DynamicCache(), cross)
        self.active = owned_by_this_call()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, beam search reads the per-context keys/values (BART family; else no-op)."""
        if self.decoder_layers is None:
            yield
            return
        replacements = [
            _compat.BeamSharedCrossAttention(
                layer.encoder_attn, keys, values, self.num_beams, self.eager, self.active
            )
            for layer, (keys, values) in zip(self.decoder_layers, self.layers)
        ]
        with _compat.swapped_cross_attention(self.decoder_layers, replacements):
            yield


def searches_with_own_cache(generator: Any, num_beams: int, kwargs: dict[str, Any]) -> bool:
    """Whether ``generate(**kwargs)`` runs a beam search with a cache it builds itself: where the shared
    cross-attention can replace the cache's per-beam keys/values."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(kwargs.get("generation_config") or generator.generation_config, "use_cache", True)
    return bool(num_beams > 1 and use_cache and not {"cache", "past_key_values"} & kwargs.keys())


def beam_shared_cross_attention(
    generator: Any,
    encoder_states: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    num_beams: int,
) -> SharedCrossAttention | None:
    """Each context's cross-attention keys/values, computed once for beam search (and scoring).

    Beam search would compute them once per beam at its first step and reorder them at every step.
    None when the generator's cache is not an encoder-decoder one.

    Args:
        encoder_states: `(contexts, src_len, hidden)` generator encoder outputs.
        context_attention_mask: `(contexts, src_len)` or None.
    """
    selector = _compat.HeadRowSelector(owned_by_this_call(), capture=True)  # first step's logits: not needed
    selector.rows = torch.empty(0, dtype=torch.long, device=encoder_states.device)
    handle = generator.get_output_embeddings().register_forward_pre_hook(selector)
    try:
        start = getattr(generator.config, "decoder_start_token_id", None) or 0
        first = generator(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            attention_mask=context_attention_mask,
            decoder_input_ids=torch.full(
                (encoder_states.shape[0], 1), start, dtype=torch.long, device=encoder_states.device
            ),
            use_cache=True,
            return_dict=True,
        )
    finally:
        handle.remove()
    cache = _compat.output_cache(first)
    if not isinstance(cache, EncoderDecoderCache):
        return None
    return SharedCrossAttention(generator, [(k, v) for _, _, k, v in _compat.cache_layers(cache)], num_beams)


class StepStates:
    """Hooks for ``generate``: each step's decoder states before the output head and the log-normaliser of its logits.

    Together with the chosen tokens they give every generated hypothesis its log-likelihood under the
    document it was generated from (:func:`generated_pair_log_likelihoods`), before any logits processor,
    as scoring defines it: thorough scoring then starts from those pairs instead of recomputing them.
    With the tokens each row read and the beam reordering, every prefix search expanded under a
    context gives the log-probability of any next token there (:func:`expanded_prefix_log_probs`).
    """

    def __init__(
        self, head: tuple[torch.Tensor, torch.Tensor | None], rows_per_context: int, budget: int
    ) -> None:
        self.mine = owned_by_this_call()
        self.head = head
        self.budget = budget
        self.rows_per_context = rows_per_context
        self.beam_orders: list[torch.Tensor] | None = None  # set after generation (None: greedy)
        self.inputs: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.log_normalizers: list[torch.Tensor] = []

    def attach(self, generator: Any) -> list[Any]:
        """Registers the three hooks on ``generator``; returns their handles (to remove after generation)."""
        return [
            generator.register_forward_pre_hook(self.before_model, with_kwargs=True),
            generator.get_output_embeddings().register_forward_pre_hook(self.before_head),
            generator.register_forward_hook(self.after_model),
        ]

    def before_model(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = _compat.decoder_input_ids_of_call(kwargs)
        if ids is not None and self.mine():
            self.inputs.append(ids[:, -1].detach())  # (search_rows,) the token each row reads at this step

    def before_head(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.mine():
            self.states.append(_compat.step_head_states(args).detach())  # (search_rows, hidden)

    def after_model(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.mine():
            return
        logits = _compat.step_logits(output).detach().float()  # (search_rows, vocab)
        # logsumexp is several passes over the logits; one fused log-softmax pass gives the normaliser
        # too (logit minus log-probability, in any column), in half the time on CPU.
        self.log_normalizers.append(logits[:, 0] - torch.log_softmax(logits, dim=-1)[:, 0])

    def log_probs(self, step: torch.Tensor, row: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """`(n,)` float32 log-probability of ``token`` read by search row ``row`` at step ``step``."""
        weight, bias = self.head
        if not isinstance(self.states, torch.Tensor):  # stack once: (steps, search_rows, hidden)
            self.states = torch.stack(self.states)
            self.log_normalizers = torch.stack(self.log_normalizers)
        result = torch.empty(len(step), dtype=torch.float32, device=step.device)
        block = max(1, self.budget // max(1, weight.shape[1]))  # bounded gathered rows
        for first in range(0, len(step), block):
            here = slice(first, first + block)
            at = (step[here].to(self.states.device), row[here].to(self.states.device))
            hidden = self.states[at].to(weight.device, torch.float32)
            tokens = token[here].to(weight.device)
            logits = (hidden * weight[tokens].float()).sum(dim=-1)
            if bias is not None:
                logits += bias[tokens].float()
            result[here] = (logits - self.log_normalizers[at].to(weight.device)).to(result.device)
        return result


def generated_pair_log_likelihoods(
    steps: StepStates,
    sequences: torch.Tensor,
    beam_indices: torch.Tensor | None,
    scored: torch.Tensor,
) -> torch.Tensor:
    """`(rows,)` each returned sequence's log-likelihood under its own context (nan where steps are missing).

    Args:
        sequences: `(rows, tgt_len)` generated sequences, decoder start token first.
        beam_indices: `(rows, steps)` running beam (flattened over the batch) behind each token; None for
            greedy search, whose rows keep their place.
        scored: `(rows, tgt_len)` whether the target at each position (the next token) counts.
    """
    rows, length = sequences.shape
    count = min(len(steps.inputs), length - 1)
    result = torch.full((rows,), float("nan"), dtype=torch.float32, device=sequences.device)
    if count == 0:
        return result
    if beam_indices is None:
        if steps.inputs[0].shape[0] != rows:
            return result
        parents = torch.arange(rows, device=sequences.device).unsqueeze(1).expand(rows, count)
    else:
        parents = beam_indices[:, :count].long()
    counted = scored[:, :count]
    complete = ~(counted & parents.lt(0)).any(1) & ~scored[:, count:].any(1)
    which = counted & parents.ge(0)
    step_ids = torch.arange(count, device=sequences.device).expand(rows, count)
    log_probs = torch.zeros(rows, count, dtype=torch.float32, device=sequences.device)
    log_probs[which] = steps.log_probs(step_ids[which], parents[which], sequences[:, 1 : count + 1][which])
    return torch.where(complete, log_probs.sum(1), result)


def expanded_prefix_log_probs(
    steps: StepStates,
    candidates: torch.Tensor,
    candidate_question: torch.Tensor,
    target: torch.Tensor,
    counted: torch.Tensor,
    n_docs: int,
) -> torch.Tensor | None:
    """`(candidates, n_docs, tgt_len)` log-probabilities of targets whose prefix search expanded there; nan elsewhere.

    Beam search computed the full next-token distribution of every running prefix under its context,
    pruned beams included: where a candidate's prefix was one of them under another document, its
    target's log-probability is a dot product away (no decoder pass or projection needed).

    Args:
        steps: What generation recorded, with ``head``, ``beam_orders`` (per step, the running row each
            row continues; None where rows keep their place, greedy) and ``rows_per_context`` set.
        candidates: `(candidates, tgt_len)` candidate sequences (decoder inputs).
        target: `(candidates, tgt_len)` the token each position scores.
        counted: `(candidates, tgt_len)` whether a position's target counts.
    """
    count, beam_orders, rows_per_context = len(steps.inputs), steps.beam_orders, steps.rows_per_context
    if count == 0:
        return None
    if beam_orders is not None and len(beam_orders) < count - 1:
        return None
    # Prefix trie of every running row at every step, per context: node -> (step, row) that expanded it.
    inputs = [ids.tolist() for ids in steps.inputs]
    orders = [order.tolist() for order in beam_orders[: count - 1]] if beam_orders is not None else None
    rows = len(inputs[0])
    children: dict[tuple[int, int], int] = {}
    expanded: list[tuple[int, int]] = []
    nodes = [-1 - row // rows_per_context for row in range(rows)]  # roots: one per context
    for step in range(count):
        if step > 0:
            parents = nodes if orders is None else [nodes[origin] for origin in orders[step - 1]]
        else:
            parents = nodes
        nodes = []
        for row, (parent, token) in enumerate(zip(parents, inputs[step])):
            node = children.get((parent, token))
            if node is None:
                node = children[(parent, token)] = len(expanded)
                expanded.append((step, row))
            nodes.append(node)
    # Walk each (candidate, document) down its context's trie as far as search went.
    found_candidate, found_doc, found_position, found_step, found_row = [], [], [], [], []
    candidate_list, counted_list = candidates.tolist(), counted.tolist()
    for c, (tokens, question) in enumerate(zip(candidate_list, candidate_question.tolist())):
        for doc in range(n_docs):
            node: int | None = -1 - (question * n_docs + doc)
            for position, token in enumerate(tokens):
                node = children.get((node, token))
                if node is None:
                    break
                if counted_list[c][position]:
                    step, row = expanded[node]
                    found_candidate.append(c)
                    found_doc.append(doc)
                    found_position.append(position)
                    found_step.append(step)
                    found_row.append(row)
    result = torch.full(
        (*candidates.shape[:1], n_docs, candidates.shape[1]),
        float("nan"),
        dtype=torch.float32,
        device=candidates.device,
    )
    if not found_candidate:
        return result
    device = candidates.device
    candidate_t = torch.tensor(found_candidate, dtype=torch.long, device=device)
    position_t = torch.tensor(found_position, dtype=torch.long, device=device)
    log_probs = steps.log_probs(
        torch.tensor(found_step, dtype=torch.long, device=device),
        torch.tensor(found_row, dtype=torch.long, device=device),
        target[candidate_t, position_t],
    )
    result[candidate_t, torch.tensor(found_doc, dtype=torch.long, device=device), position_t] = log_probs
    return result


def producer_rows(
    sequences: torch.Tensor, groups: list[list[int]], rows_per_question: int
) -> list[list[int]]:
    """Per candidate (in ``groups`` order), the rows of its question whose sequence equals it."""
    as_lists = sequences.tolist()
    producers = []
    for q, group in enumerate(groups):
        rows: dict[tuple[int, ...], list[int]] = {}
        for row in range(q * rows_per_question, (q + 1) * rows_per_question):
            rows.setdefault(tuple(as_lists[row]), []).append(row)
        producers.extend(rows[tuple(as_lists[row])] for row in group)
    return producers


def known_pairs(
    producers: list[list[int]], row_ll: torch.Tensor, n_docs: int, rows_per_doc: int
) -> torch.Tensor:
    """`(num_candidates, n_docs)` each candidate's log-likelihood under the documents that generated it, nan elsewhere."""
    candidate_ids = [c for c, rows in enumerate(producers) for _ in rows]
    source_rows = [row for rows in producers for row in rows]
    device = row_ll.device
    known = torch.full((len(producers), n_docs), float("nan"), dtype=torch.float32, device=device)
    source = torch.tensor(source_rows, dtype=torch.long, device=device)
    known[torch.tensor(candidate_ids, dtype=torch.long, device=device), (source // rows_per_doc) % n_docs] = (
        row_ll[source]
    )
    return known


def step_states_for(generator: Any, num_beams: int, options: DecodingOptions) -> StepStates | None:
    """Fresh generation-step hooks for ``generator``, or None where its values would not be exact.

    In half precision, generation's values (a float32 dot product against a normaliser of rounded logits)
    differ from teacher forcing's by rounding, enough to swap near ties: float32 plain linear heads only.

    Args:
        generator: The seq2seq generator.
        num_beams: Search rows per context (1: greedy search).
        options: Decoding options (``scoring_elements_cpu`` bounds the rows the hooks' readers gather at once).

    Returns:
        Hooks to pass to :func:`search_contexts` as ``steps`` (not attached yet), or None.
    """
    head = _compat.gatherable_head(generator)
    if head is None or head[0].dtype != torch.float32:
        return None
    return StepStates(head, num_beams, options.scoring_elements_cpu)


def search_contexts(
    generator: Any,
    encoder_states: torch.Tensor,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    num_beams: int,
    kwargs: dict[str, Any],
    options: DecodingOptions,
    fast_path: bool,
    recorder: StepScoreRecorder | None = None,
    steps: StepStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The generator's beam search (or greedy search) over every context, recording into ``recorder``/``steps``.

    Args:
        generator: The seq2seq generator.
        encoder_states: `(contexts, src_len, hidden)` generator encoder outputs.
        context_input_ids: `(contexts, src_len)` the contexts.
        context_attention_mask: `(contexts, src_len)` or None.
        num_beams: Beams per context (1: greedy search); each context returns all of them.
        kwargs: Generation keyword arguments (a copy: keys are added, the cache given to generate is
            popped again).
        options: Decoding options (a ``trace`` records the shared cross-attention's cache).
        fast_path: Share each context's cross-attention among its beams (beam search with a cache only;
            generate then gets a zero-width stand-in for the encoder states where the decoder reads only
            their shape: :func:`ragkit._compat.encoder_states_stand_in`).
        recorder: A logits processor appended to generation's own (fast decoding), or None.
        steps: Generation-step hooks to attach during generation (``beam_orders`` set after it), or None.

    Returns:
        `(contexts * num_beams, tgt_len)` sequences; `(rows, steps)` beam indices (or None); per decoder
        layer, each context's cross-attention keys and values (CPU) or None.
    """
    shared = cross_attention = None  # per layer, each context's cross-attention keys and values
    search_states = encoder_states  # generate repeats them once per beam row
    cache_key = _compat.cache_argument_name(generator)
    if fast_path and searches_with_own_cache(generator, num_beams, kwargs):
        # Before the hooks below: this first step is not one of generation's.
        shared = beam_shared_cross_attention(generator, encoder_states, context_attention_mask, num_beams)
        if shared is not None:
            if options.trace is not None:
                options.trace.beam_caches.append(weakref.ref(shared.cache))
            kwargs[cache_key], cross_attention = shared.cache, shared.layers
            if context_input_ids.device.type == "cuda":
                cross_attention = None  # the rows path recomputes them on CUDA: less memory
            # The search reads these keys/values, and the encoder states only for their shape where the
            # decoder is known to: generate then repeats a zero-width stand-in per beam row, not them.
            stand_in = _compat.encoder_states_stand_in(
                generator, encoder_states, shared.cache, swapped=shared.decoder_layers is not None
            )
            if stand_in is not None:
                search_states = stand_in
    if recorder is not None:
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), recorder])
    if recorder is not None or steps is not None:
        kwargs["return_dict_in_generate"] = True
    hooks = steps.attach(generator) if steps is not None else []
    try:
        with shared.installed() if shared is not None else contextlib.nullcontext():
            output = generator.generate(
                input_ids=context_input_ids,
                attention_mask=context_attention_mask,
                # A fresh output object: generate expands it for beams in place.
                encoder_outputs=BaseModelOutput(last_hidden_state=search_states),
                num_beams=num_beams,
                num_return_sequences=num_beams,
                **kwargs,
            )
    finally:
        for hook in hooks:
            hook.remove()
    # (batch * n_docs * num_beams, tgt_len); the output object also holds the decoding cache: drop it.
    sequences = output.sequences if kwargs.get("return_dict_in_generate") else output
    beam_indices = _compat.generated_beam_indices(output) if kwargs.get("return_dict_in_generate") else None
    del output
    cache = kwargs.pop(cache_key, None)
    if steps is not None and num_beams > 1:
        steps.beam_orders = cache.beam_orders if isinstance(cache, _compat.BeamSharedCrossCache) else []
    del cache, shared  # beam search's keys/values: not needed any more
    return sequences, beam_indices, cross_attention


def generate_hypotheses(
    model: Any,
    encoder_states: torch.Tensor,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    num_beams: int,
    decoding: str,
    kwargs: dict[str, Any],
    options: DecodingOptions,
    fast_path: bool,
    step_hooks: Callable[[], bool] | None = None,
) -> tuple[
    torch.Tensor,
    torch.Tensor | None,
    StepScoreRecorder | None,
    StepStates | None,
    list[tuple[torch.Tensor, torch.Tensor]] | None,
]:
    """The generator's beam search (or greedy search) over every context, and what scoring reuses of it.

    Args:
        encoder_states: `(contexts, src_len, hidden)` generator encoder outputs.
        kwargs: Generation keyword arguments (a copy: keys are added, the cache given to generate is
            popped again).
        fast_path: Share each context's cross-attention among its beams (the probe's verdict for that
            path); False: the generator's own cross-attention.
        step_hooks: Asked right before generation-step hooks would be attached (thorough decoding with
            pruned scoring, no label smoothing, decoder prompt or autocast, a float32 plain linear head):
            whether they may be (the probe's verdict, checked at its first use). None: never attached.

    Returns:
        `(contexts * num_beams, tgt_len)` sequences; `(rows, steps)` beam indices (or None); the step
        score recorder (fast decoding) or the step states (thorough decoding in float32), each or None;
        per decoder layer, each context's cross-attention keys and values (CPU) or None.
    """
    generator = model.generator
    recorder = steps = None
    if decoding == "fast":
        # Beam search keeps a row's token only if it is among that row's top (eos + 1) * num_beams.
        k = max(2, (len(eos_ids(generator, kwargs)) + 1) * num_beams)
        recorder = StepScoreRecorder(k, normalize=not _compat.processor_scores_are_log_probs(num_beams))
    elif (
        step_hooks is not None
        and options.prune_scoring
        and not float(getattr(model.config, "label_smoothing", 0.0) or 0.0)
        # A decoder prompt shifts steps against positions: not handled, scoring computes those pairs.
        and kwargs.get("decoder_input_ids") is None
        # Under autocast the logits are rounded to half precision (see step_states_for).
        and not _compat.autocast_enabled(context_input_ids.device)
    ):
        # Each hypothesis's log-likelihood under its own document falls out of generation: keep what gives it.
        steps = step_states_for(generator, num_beams, options)
        if steps is not None and not step_hooks():  # the hook check runs here, at its first use
            steps = None
    sequences, beam_indices, cross_attention = search_contexts(
        generator,
        encoder_states,
        context_input_ids,
        context_attention_mask,
        num_beams,
        kwargs,
        options,
        fast_path,
        recorder=recorder,
        steps=steps,
    )
    return sequences, beam_indices, recorder, steps, cross_attention
