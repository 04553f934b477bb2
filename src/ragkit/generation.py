"""RAG-Sequence decoding: batched "thorough" decoding and the RAG paper's "fast" decoding.

Transformers' ``RagSequenceForGeneration.generate`` handles one question at a time, runs the
generator without the context attention mask, and scores hypotheses by re-running the whole model
(question encoder, retrieval and generator encoder). Here every question of the batch is decoded by
one generator ``generate`` call, the generator's encoder runs once and its outputs are reused to
score hypotheses by teacher forcing, the context attention mask is honoured throughout, and a
non-default ``n_docs`` is used everywhere.

Generation: each context's cross-attention keys/values are computed once and copied to its beams in
a cache that beam search does not reorder (all beams of a context hold the same ones). Hooks keep
each step's decoder states and log-normalisers, so every hypothesis's log-likelihood under the
document that generated it, and the log-probability of any token after any prefix beam search
expanded (pruned beams included), come out of generation without another forward pass.

Scoring (thorough) computes only what can change the output, and each distinct (document, prefix)
at most once:

- Decoder states: BART-family generators (learned positions, eager or sdpa attention) on CPU pack, per
  (question, document), the prefix trie of the candidates whose pair generation did not score into
  one decoder sequence (each node attends to its ancestors through a 4D mask, at its depth as
  position). Other generators (T5, flash-attention), and CUDA, where packing measured slower, run
  one decoder row per (candidate, document), sharing the first step and (on CPU) the
  cross-attention keys/values per document.
- Projection (``_CandidateScores``): every target's log-probability is first bounded from above with
  a slice of the vocabulary (``_log_prob_upper_bounds``); then, position by position, only targets of
  (candidate, document) pairs that may still matter go through the full vocabulary projection. A
  pair whose bound lies ``_NEGLIGIBLE`` nats under its candidate's known part is dropped (it moves
  the score by less than e^-30), a candidate that ``num_return_sequences`` others certainly beat is
  ruled out, and a question stops when one candidate is left. The output is that of exhaustive
  scoring (``_PRUNE_SCORING = False``); survivors keep their exact scores.

Decoding modes:

- ``"thorough"``: every (deduplicated) hypothesis of a question is scored against every document of
  that question, exactly as Transformers' RAG-Sequence loss does (``exclude_bos_score=True``, the
  document prior added at the second target token, label smoothing from the config).
- ``"fast"``: a hypothesis gets probability ~0 under documents whose beam did not produce it, so no
  forward pass is needed after generation: ``score(y) = log sum_{d produced y} p(d|x) p(y|x,d)``
  where ``log p(y|x,d)`` is the sum of the per-token log-probabilities the beam search used.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["DECODING_MODES", "rag_sequence_generate"]

logger = logging.getLogger(__name__)

#: Accepted values of ``decoding``.
DECODING_MODES = ("thorough", "fast")

# Elements one scoring step may hold: a decoder pass (rows path: cross-attention inputs copied per
# scoring row; packed path: attention scores), one round of logits, gathered states. Transformers scores
# a question at once with full logits, ~100M floats for 5 docs x 20 candidates x 20 tokens x 50k words.
_SCORING_ELEMENTS_CPU = 1 << 25
_SCORING_ELEMENTS_CUDA = 1 << 28
# Copy each document's cross-attention keys/values to its candidates (saves compute, costs memory)?
# None: yes on CPU, no on CUDA. Only for the per-candidate scoring path.
_SHARE_CROSS_ATTENTION: bool | None = None
# Scoring path: "packed" (each question's prefix trie in one decoder sequence per document), "rows" (one
# decoder row per candidate and document), or None: packed on CPU where the generator supports it, rows
# on CUDA. Measured on an H200 (bf16, rag-*-nq shapes, batch 32): packed 1.32 s per generate against
# 0.84 s for rows, most of the difference being cuDNN attention building a graph for every new packed
# shape with a 4D mask (benchmarks/results/gpu_scoring_paths_h200.log); on CPU packed scoring is
# about 1.4x faster than rows (docs/performance.md).
_SCORING_PATH: str | None = None
_SCORING_PATHS = (None, "packed", "rows")
# Widest prefix trie (nodes of one question) scored packed; wider questions take the rows path, whose
# self-attention grows with each candidate's length rather than with the trie's width squared (with
# little prefix sharing, e.g. 160 candidates of 40 tokens, packed measured 1.5x slower than rows).
_PACKED_MAX_WIDTH = 1024
# Thorough scoring skips projections that cannot change the output (see _CandidateScores); False scores
# every (document, prefix) pair exhaustively (same output; for tests and benchmarks).
_PRUNE_SCORING = True
# A document whose term is this many nats below its candidate's best is dropped from the candidate's
# score: it changes the score by less than e^-30 relative, far below float32 resolution.
_NEGLIGIBLE = 30.0
# Vocabulary ids whose logits bound every scored log-probability from above before projecting it.
_PROBE_TOKENS = 2048
# Smallest score gap (nats) that rules a candidate out; far above float32 rounding of the sums.
_MARGIN = 1e-3
# Cross-attention classes _BeamSharedCrossAttention reproduces (q/k/v/out projections, scaled dot
# product, no extra keys: not MVP's prompts, not LED's three outputs); checked against each model's
# own beam search.
_SHAREABLE_CROSS_ATTENTION = frozenset(
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


def _autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (torch's signature changed over versions)."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # older torch: one function per device type
        check = getattr(torch, f"is_autocast_{device.type}_enabled", None)
        if check is None:
            return bool(torch.is_autocast_enabled()) if device.type == "cuda" else False
        return bool(check())


# The decoding call running in this context (a fresh object per call; None outside). The hooks and the
# swapped cross-attention of a call act only for it: not for a forward pass that another thread (whose
# context starts empty) runs on the same generator meanwhile, nor for a generate nested in a callback.
_DECODING: contextvars.ContextVar[object | None] = contextvars.ContextVar("ragkit_decoding", default=None)


class _Owned:
    """Base of the hooks one decoding call puts on shared modules: ``mine()`` says whether a call is that one."""

    def __init__(self) -> None:
        self.owner = _DECODING.get()

    def mine(self) -> bool:
        """Whether the running forward belongs to the decoding call that made this hook."""
        return _DECODING.get() is self.owner


_GENERATOR_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _generator_lock(generator: Any) -> threading.RLock:
    """The lock serialising decoding calls on one generator: they hook and swap its modules for a while."""
    with _LOCKS_LOCK:
        lock = _GENERATOR_LOCKS.get(generator)
        if lock is None:
            lock = _GENERATOR_LOCKS[generator] = threading.RLock()
        return lock


def _resolve_decoding_settings(
    model: Any,
    do_deduplication: bool | None,
    num_return_sequences: int | None,
    num_beams: int | None,
    n_docs: int | None,
    decoding: str,
) -> tuple[bool, int, int, int]:
    """Fill defaults from the config (as Transformers does) and validate them."""
    if decoding not in DECODING_MODES:
        raise ValueError(f"`decoding` must be one of {DECODING_MODES}, got {decoding!r}.")
    config = model.config
    n_docs = n_docs if n_docs is not None else config.n_docs
    do_deduplication = do_deduplication if do_deduplication is not None else config.do_deduplication
    num_return_sequences = (
        num_return_sequences
        if num_return_sequences is not None
        else getattr(config, "num_return_sequences", 1)
    )
    num_beams = num_beams if num_beams is not None else getattr(config, "num_beams", 1)
    if n_docs < 1:
        raise ValueError(f"`n_docs` must be at least 1, got {n_docs}.")
    if num_beams < 1:
        raise ValueError(f"`num_beams` must be at least 1, got {num_beams}.")
    if not 1 <= num_return_sequences <= n_docs * num_beams:
        raise ValueError(
            f"`num_return_sequences` must be between 1 and n_docs * num_beams = {n_docs * num_beams}, "
            f"got {num_return_sequences}; raise `num_beams` or `n_docs`."
        )
    return bool(do_deduplication), int(num_return_sequences), int(num_beams), int(n_docs)


def _resolve_contexts(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    context_input_ids: torch.Tensor | None,
    context_attention_mask: torch.Tensor | None,
    doc_scores: torch.Tensor | None,
    n_docs: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Retrieve (once) when no contexts are given; check shapes; return contexts, mask and doc scores."""
    if context_input_ids is None:
        if input_ids is None:
            raise ValueError(
                "Pass `input_ids` (with a retriever set) or `context_input_ids` and `doc_scores`."
            )
        if model.retriever is None:
            raise ValueError(
                "No retriever is set: pass `context_input_ids`, `context_attention_mask` and `doc_scores`, "
                "or set one with `model.set_retriever(...)`."
            )
        # The model's own encoding and retrieval: same pooling, devices and float32 doc scores as forward.
        question_vectors = model.rag.encode_questions(input_ids, attention_mask)
        retrieved = model.rag.retrieve_contexts(input_ids, question_vectors, n_docs)
        context_input_ids = retrieved.context_input_ids
        context_attention_mask = retrieved.context_attention_mask
        doc_scores = retrieved.doc_scores
    elif doc_scores is None:
        raise ValueError(
            "`doc_scores` of shape (batch_size, n_docs) is needed with `context_input_ids`: RAG-Sequence ranks "
            "hypotheses with the document scores (the retriever's output gives them)."
        )
    if context_input_ids.shape[0] % n_docs != 0:
        raise ValueError(
            f"`context_input_ids` has {context_input_ids.shape[0]} rows, not a multiple of n_docs={n_docs}; "
            "pass the `n_docs` the contexts were retrieved with."
        )
    batch_size = context_input_ids.shape[0] // n_docs
    if tuple(doc_scores.shape) != (batch_size, n_docs):
        raise ValueError(
            f"`doc_scores` has shape {tuple(doc_scores.shape)}, expected (batch_size, n_docs) = "
            f"({batch_size}, {n_docs}); pass the `n_docs` the contexts were retrieved with."
        )
    if context_attention_mask is not None and context_attention_mask.shape != context_input_ids.shape:
        raise ValueError(
            f"`context_attention_mask` has shape {tuple(context_attention_mask.shape)}, expected the shape of "
            f"`context_input_ids` {tuple(context_input_ids.shape)}."
        )
    # A mask of ones changes nothing but costs a mask in every attention call: drop it.
    if context_attention_mask is not None and bool(context_attention_mask.bool().all()):
        context_attention_mask = None
    return context_input_ids, context_attention_mask, doc_scores


class _StepScoreRecorder(LogitsProcessor):
    """Keeps, per decoding step, each row's top-k processed log-probabilities (the only tokens search can pick)."""

    def __init__(self, k: int, normalize: bool):
        self.k = k
        # Greedy search hands processors raw logits; beam search hands them log-probabilities.
        self.normalize = normalize
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = scores.float()
        if self.normalize:
            step = torch.log_softmax(step, dim=-1)
        values, indices = step.topk(min(self.k, step.shape[-1]), dim=-1)
        self.values.append(values)
        self.indices.append(indices)
        return scores


def _eos_ids(generator: Any, model_kwargs: dict[str, Any]) -> list[int]:
    """End-of-sequence ids generation stops at."""
    eos = model_kwargs.get("eos_token_id", generator.generation_config.eos_token_id)
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return eos.flatten().tolist()
    return [eos] if isinstance(eos, int) else list(eos)


def _generated_log_likelihoods(
    recorder: _StepScoreRecorder,
    sequences: torch.Tensor,
    beam_indices: torch.Tensor | None,
    eos_ids: list[int],
) -> torch.Tensor:
    """`(rows,)` sum of the log-probabilities search assigned to each returned sequence's tokens."""
    rows, length = sequences.shape
    steps = min(len(recorder.values), length - 1)
    total = torch.zeros(rows, dtype=torch.float32, device=sequences.device)
    if steps == 0:
        return total
    values = torch.stack(recorder.values[:steps], dim=1)  # (search_rows, steps, k)
    indices = torch.stack(recorder.indices[:steps], dim=1)
    tokens = sequences[:, 1 : steps + 1]  # token chosen at step t sits at position t + 1
    if beam_indices is not None:
        # beam_indices[r, t]: the running beam (flattened over the batch) that produced token t of row r; -1 past the end.
        parents = beam_indices[:, :steps]
        valid = parents >= 0
        step_ids = torch.arange(steps, device=sequences.device).expand(rows, steps)
        row_values = values[parents.clamp(min=0), step_ids]  # (rows, steps, k)
        row_indices = indices[parents.clamp(min=0), step_ids]
    else:
        # Greedy: rows keep their place; a row is done after its first end-of-sequence token.
        row_values, row_indices = values, indices
        is_eos = torch.zeros_like(tokens, dtype=torch.bool)
        for eos in eos_ids:
            is_eos |= tokens.eq(eos)
        ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        valid = ~ended_before
    hit = row_indices.eq(tokens.unsqueeze(-1))
    found = hit.any(dim=-1)
    # where, not a product: the other recorded scores may be -inf (forced tokens), and -inf * 0 is nan.
    token_scores = torch.where(hit, row_values, 0.0).sum(dim=-1)
    missing = valid & ~found
    if bool(missing.any()):
        logger.warning(
            "fast decoding: %d generated tokens were not among the recorded top-k scores.", int(missing.sum())
        )
        token_scores = token_scores.masked_fill(missing, float("-inf"))
    return token_scores.masked_fill(~valid, 0.0).sum(dim=1)


def _candidate_groups(sequences: torch.Tensor, rows_per_question: int, deduplicate: bool) -> list[list[int]]:
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


def _prefix_ids(candidates: list[list[int]], candidate_question: list[int]) -> torch.Tensor:
    """`(num_candidates, tgt_len)` id of each prefix ``candidate[: t + 1]``, shared by equal prefixes of a question."""
    ids = torch.empty(len(candidates), len(candidates[0]) if candidates else 0, dtype=torch.long)
    tries: dict[int, dict[tuple[int, int], int]] = {}
    for row, (tokens, question) in enumerate(zip(candidates, candidate_question)):
        trie = tries.setdefault(question, {})
        node = -1
        path = []
        for token in tokens:
            node = trie.setdefault((node, token), len(trie))
            path.append(node)
        ids[row] = torch.tensor(path)
    return ids


class _SelectRows(_Owned):
    """Forward pre-hook for the output projection: project only the selected hidden states.

    With ``capture``, the selected states are kept in ``hidden`` and none is projected: the packed path
    projects them with :func:`_project`, which folds BART's ``final_logits_bias`` into the matrix
    product. The rows path projects through the generator itself, so any head works there.
    """

    def __init__(self, capture: bool = False) -> None:
        super().__init__()
        self.capture = capture
        self.rows: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def __call__(
        self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if self.rows is None or not self.mine():
            return None
        hidden = args[0].reshape(-1, args[0].shape[-1])
        selected = hidden.index_select(0, self.rows)
        if not self.capture:
            return (selected, *args[1:])
        self.hidden = selected
        return (hidden[:0], *args[1:])


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per decoder layer: self-attention keys, values, cross-attention keys, values of an encoder-decoder cache."""
    layers = []
    for own, cross in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        layers.append((own.keys, own.values, cross.keys, cross.values))
    return layers


def _packed_positions_module(generator: Any) -> torch.nn.Module | None:
    """The decoder's learned position embedding if a prefix trie can be packed into one sequence, else None.

    Packing needs positions set per token (a node's depth in the trie, not its place in the packed
    sequence) and a custom 4D self-attention mask: BART-family decoders (learned absolute positions
    with an ``offset``) with eager or sdpa attention. T5's relative position buckets, sinusoidal
    positions and flash-attention (no 4D masks) keep the per-candidate path.
    """
    get_decoder = getattr(generator, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    positions = getattr(decoder, "embed_positions", None)
    implementation = getattr(generator.config, "_attn_implementation", None)
    if not (
        isinstance(positions, torch.nn.Embedding)
        and isinstance(getattr(positions, "offset", None), int)
        and implementation in ("eager", "sdpa")
    ):
        return None
    # The packed path reads the position table itself: weights offloaded by accelerate (meta outside
    # forward) are only reachable through the module's forward, which the rows path uses.
    if positions.weight.is_meta:
        return None
    return positions


def _packed_scoring_positions(generator: Any, device: torch.device) -> torch.nn.Module | None:
    """The position embedding to drive when scoring takes the packed path here, or None for the rows path."""
    if _SCORING_PATH not in _SCORING_PATHS:
        raise ValueError(f"_SCORING_PATH must be one of {_SCORING_PATHS}, got {_SCORING_PATH!r}.")
    path = _SCORING_PATH if _SCORING_PATH is not None else (None if device.type == "cpu" else "rows")
    if path == "rows":
        return None
    positions_module = _packed_positions_module(generator)
    if path == "packed" and positions_module is None:
        raise ValueError(
            "The packed scoring path needs a BART-family generator with eager or sdpa attention."
        )
    return positions_module


def _question_tries(
    candidates: list[list[int]], candidate_question: list[int], needed: list[int]
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """Per question, the trie of its candidates' decoder-input prefixes, parents before children.

    Returns, per question: node tokens, node depths, node parents (-1 for a root) and, per candidate
    (in order), the node of each of its first ``needed`` decoder inputs.
    """
    tokens: dict[int, list[int]] = {}
    depths: dict[int, list[int]] = {}
    parents: dict[int, list[int]] = {}
    paths: list[list[int]] = []
    children: dict[int, dict[tuple[int, int], int]] = {}
    for sequence, question, length in zip(candidates, candidate_question, needed):
        trie = children.setdefault(question, {})
        node_tokens = tokens.setdefault(question, [])
        node_depths = depths.setdefault(question, [])
        node_parents = parents.setdefault(question, [])
        node, path = -1, []
        for depth, token in enumerate(sequence[:length]):
            child = trie.get((node, token))
            if child is None:
                child = trie[(node, token)] = len(node_tokens)
                node_tokens.append(token)
                node_depths.append(depth)
                node_parents.append(node)
            node = child
            path.append(node)
        paths.append(path)
    order = sorted(tokens)
    # Callers index these lists by question: every question of a batch has at least one candidate.
    assert order == list(range(len(order))), "every question needs at least one candidate"
    return [tokens[q] for q in order], [depths[q] for q in order], [parents[q] for q in order], paths


def _ancestor_masks(
    parents: list[list[int]], width: int, max_depth: int, device: torch.device
) -> torch.Tensor:
    """`(num_questions, width, width)` bool: node i may attend node j (j is i or an ancestor); padding sees itself."""
    count = len(parents)
    parent = torch.arange(width).repeat(count, 1)  # padding nodes are their own parents
    for q, node_parents in enumerate(parents):
        own = torch.tensor(node_parents, dtype=torch.long)
        parent[q, : len(own)] = torch.where(own < 0, torch.arange(len(own)), own)  # a root is its own parent
    allowed = torch.zeros(count, width, width, dtype=torch.bool)
    question = torch.arange(count).unsqueeze(1).expand(count, width)
    node = torch.arange(width).expand(count, width)
    current = node.clone()
    for _ in range(max_depth + 1):  # walk up to the root: every ancestor is marked
        allowed[question, node, current] = True
        current = parent.gather(1, current)
    return allowed.to(device)


def _packed_inputs(
    tokens: list[list[int]],
    depths: list[list[int]],
    parents: list[list[int]],
    pad: int,
    mask_dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs of some questions' packed tries, padded to the widest.

    Returns:
        `(num_questions, width)` node tokens, `(num_questions, width)` node depths and the additive
        self-attention mask `(num_questions, width, width)` (0 where a node sees an ancestor or itself,
        the dtype's minimum elsewhere).
    """
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), pad, dtype=torch.long)
    depth_ids = torch.zeros(len(tokens), width, dtype=torch.long)
    for i, (node_tokens, node_depths) in enumerate(zip(tokens, depths)):
        ids[i, : len(node_tokens)] = torch.tensor(node_tokens)
        depth_ids[i, : len(node_depths)] = torch.tensor(node_depths)
    allowed = _ancestor_masks(parents, width, int(depth_ids.max()), device)
    additive = torch.zeros(allowed.shape, dtype=mask_dtype, device=device).masked_fill_(
        ~allowed, torch.finfo(mask_dtype).min
    )
    return ids.to(device), depth_ids.to(device), additive


def _scored_entries(
    paths: list[list[int]], lo: int, hi: int, target: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates ``lo:hi``'s scored (candidate, position) entries: candidate, position, trie node, target.

    The node is the prefix whose hidden state scores the target at that position; pad targets are left out.
    """
    device = target.device
    candidate, position, node = [], [], []
    for c in range(lo, hi):
        path = paths[c]
        candidate.extend([c] * len(path))
        position.extend(range(len(path)))
        node.extend(path)
    candidate_t = torch.tensor(candidate, dtype=torch.long, device=device)
    position_t = torch.tensor(position, dtype=torch.long, device=device)
    node_t = torch.tensor(node, dtype=torch.long, device=device)
    entry_target = target[candidate_t, position_t]
    keep = entry_target.ne(pad)
    return candidate_t[keep], position_t[keep], node_t[keep], entry_target[keep]


def _project(generator: Any, hidden: torch.Tensor) -> torch.Tensor:
    """`(rows, vocab)` logits of `(rows, hidden)` decoder states, as the generator's head computes them."""
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


class _BeamSharedCrossCache(EncoderDecoderCache):
    """Encoder-decoder cache whose cross-attention part beam search leaves alone.

    Beam search reorders beams within a context only, and every beam of a context holds the same
    cross-attention keys/values: reordering them (a copy of every layer's keys and values at every
    step) changes nothing, so only the self-attention part is reordered.
    """

    def __init__(self, *caches: Any) -> None:
        super().__init__(*caches)
        self.beam_orders: list[torch.Tensor] = []  # per step: the running beam each row continues

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.beam_orders.append(beam_idx.detach())
        self.self_attention_cache.reorder_cache(beam_idx)


class _BeamSharedCrossAttention(torch.nn.Module):
    """Stands in for a BART-family decoder layer's cross-attention while beam search runs.

    Each context's keys/values stay `(contexts, heads, src_len, head_dim)`, computed once; the queries of
    its beams attend to them together, as one query sequence of ``num_beams`` times the length. Beam
    search would hold (and reorder) a copy per beam.
    """

    def __init__(
        self,
        attention: torch.nn.Module,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_beams: int,
        eager: bool,
    ):
        super().__init__()
        self.attention, self.keys, self.values = attention, keys, values
        self.num_beams, self.eager = num_beams, eager
        self.owner = _DECODING.get()

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        attention = self.attention
        if _DECODING.get() is not self.owner:  # another forward on this generator meanwhile: the original
            return attention(
                hidden_states,
                key_value_states=key_value_states,
                cache=cache,
                attention_mask=attention_mask,
                **kwargs,
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


def _cross_attention_modules(generator: Any) -> list[Any] | None:
    """Decoder layers whose cross-attention ``_BeamSharedCrossAttention`` can stand in for, or None."""
    get_decoder = getattr(generator, "get_decoder", None)
    layers = getattr(get_decoder() if callable(get_decoder) else None, "layers", None)
    if not layers or getattr(generator.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return None
    for layer in layers:
        if type(getattr(layer, "encoder_attn", None)).__name__ not in _SHAREABLE_CROSS_ATTENTION:
            return None
    return list(layers)


class _SharedCrossAttention:
    """Each context's cross-attention keys/values, computed once, and how beam search reads them.

    BART-family decoders (eager or sdpa attention): ``installed()`` swaps each layer's cross-attention
    for a ``_BeamSharedCrossAttention`` over the per-context keys/values, and ``cache`` holds no
    cross-attention part. Other generators: ``cache`` holds a copy per beam, which beam search does not
    reorder (``_BeamSharedCrossCache``).

    Attributes:
        cache: The cache to give ``generate``.
        layers: Per decoder layer, the `(contexts, heads, src_len, head_dim)` keys and values.
    """

    def __init__(self, generator: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], num_beams: int):
        self.layers = layers
        self.num_beams = num_beams
        self.decoder_layers = _cross_attention_modules(generator)
        self.eager = getattr(generator.config, "_attn_implementation", None) == "eager"
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
        self.cache = _BeamSharedCrossCache(DynamicCache(), cross)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, beam search reads the per-context keys/values (BART family; else no-op)."""
        if self.decoder_layers is None:
            yield
            return
        originals = [layer.encoder_attn for layer in self.decoder_layers]
        try:
            for layer, (keys, values) in zip(self.decoder_layers, self.layers):
                layer.encoder_attn = _BeamSharedCrossAttention(
                    layer.encoder_attn, keys, values, self.num_beams, self.eager
                )
            yield
        finally:
            for layer, original in zip(self.decoder_layers, originals):
                layer.encoder_attn = original


def _beam_shared_cross_attention(
    generator: Any,
    encoder_states: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    num_beams: int,
) -> _SharedCrossAttention | None:
    """Each context's cross-attention keys/values, computed once for beam search (and scoring).

    Beam search would compute them once per beam at its first step and reorder them at every step.
    None when the generator's cache is not an encoder-decoder one.
    """
    selector = _SelectRows(capture=True)  # the first step's logits are not needed: skip the head
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
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    if not isinstance(cache, EncoderDecoderCache):
        return None
    return _SharedCrossAttention(generator, [(k, v) for _, _, k, v in _cache_layers(cache)], num_beams)


def _gatherable_head(generator: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(vocab, hidden)` weight and `(vocab,)` bias of a plain linear output head (BART's bias folded in), or None."""
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


class _StepStates(_Owned):
    """Hooks for ``generate``: each step's decoder states before the output head and the log-normaliser of its logits.

    Together with the chosen tokens they give every generated hypothesis its log-likelihood under the
    document it was generated from (``_generated_pair_log_likelihoods``), before any logits processor,
    as scoring defines it: thorough scoring then starts from those pairs instead of recomputing them.
    With the tokens each row read and the beam reordering, every prefix search expanded under a
    context gives the log-probability of any next token there (``_expanded_prefix_log_probs``).
    """

    def __init__(self, head: tuple[torch.Tensor, torch.Tensor | None], rows_per_context: int) -> None:
        super().__init__()
        self.head = head
        self.rows_per_context = rows_per_context
        self.beam_orders: list[torch.Tensor] | None = None  # set after generation (None: greedy)
        self.inputs: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.log_normalizers: list[torch.Tensor] = []

    def before_model(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("decoder_input_ids")
        if ids is not None and self.mine():
            self.inputs.append(ids[:, -1].detach())  # (search_rows,) the token each row reads at this step

    def before_head(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.mine():
            self.states.append(args[0][:, -1].detach())  # (search_rows, hidden)

    def after_model(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.mine():
            return
        logits = output.logits[:, -1].detach().float()  # (search_rows, vocab)
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
        block = max(1, _SCORING_ELEMENTS_CPU // max(1, weight.shape[1]))  # bounded gathered rows
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


def _generated_pair_log_likelihoods(
    steps: _StepStates,
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


def _expanded_prefix_log_probs(
    steps: _StepStates,
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


def _log_prob_upper_bounds(
    generator: Any, hidden: torch.Tensor, state: torch.Tensor, target: torch.Tensor, budget: int
) -> torch.Tensor:
    """`(entries,)` upper bounds of entries' log-probabilities from the first ``_PROBE_TOKENS`` ids only.

    ``log p(t) = l_t - logsumexp(l) <= l_t - logsumexp(l[:k])`` for any k: k logits per state instead of
    the whole vocabulary. The first ids of BPE and SentencePiece vocabularies are their most frequent
    tokens, which keeps the bound close for trained models. Zeros (the trivial bound) for other heads.
    """
    head = _gatherable_head(generator)
    bounds = torch.zeros(len(state), dtype=torch.float32, device=hidden.device)
    if head is None or len(state) == 0:
        return bounds
    weight, bias = head
    probe = weight[: min(_PROBE_TOKENS, weight.shape[0])].float()  # (k, hidden)
    probe_bias = None if bias is None else bias[: probe.shape[0]].float()
    rows = max(1, budget // probe.shape[0])
    probe_lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for first in range(0, hidden.shape[0], rows):
        block = hidden[first : first + rows].float() @ probe.t()  # (rows, k)
        if probe_bias is not None:
            block += probe_bias
        probe_lse[first : first + rows] = block.logsumexp(dim=-1)
    # Rounding of the head's dtype in the logits the exact path computes: the bound must hold for those.
    rounding = 2 * torch.finfo(hidden.dtype).eps
    rows = max(1, budget // hidden.shape[1])
    for first in range(0, len(state), rows):
        states, targets = state[first : first + rows], target[first : first + rows]
        logits = (hidden[states].float() * weight[targets].float()).sum(dim=-1)
        if bias is not None:
            logits += bias[targets].float()
        normalizers = probe_lse[states]
        bounds[first : first + rows] = (
            logits - normalizers + rounding * (logits.abs() + normalizers.abs()) + 1e-5
        ).clamp(max=0.0)
    return bounds


class _CandidateScores:
    """RAG-Sequence scores of candidates from decoder states added in passes, projected in rounds by position.

    A candidate's score is ``logsumexp_d(prior_d + ll_d)`` over documents, ``ll_d`` the sum of its targets'
    log-probabilities under document ``d``. With ``known`` pairs (generation's own (hypothesis, document)
    log-likelihoods) the projections run position by position and stop where they cannot change the
    output. Each not-yet-projected log-probability is bounded from above (:func:`_log_prob_upper_bounds`,
    at most 0), so a pair's partial sum plus its bounds bounds the pair, and complete pairs bound their
    candidate from below. A pair more than ``_NEGLIGIBLE`` nats below its candidate's lower bound
    changes the score by less than e^-30 (relative) and is dropped; a candidate that ``keep`` others
    certainly beat is out (score -inf); with ``keep == 1`` a question stops once one candidate is left.
    The returned hypotheses are those of exhaustive scoring, and survivors get their exact scores (up
    to dropped pairs) unless a single one is left. Label smoothing (``epsilon > 0``) needs every state's
    full distribution: exhaustive then, in one round.

    Args:
        generator: The generator whose output head projects the states.
        base: `(candidates, n_docs)` log-likelihood counted already (a shared first step), or zeros.
        prior: `(candidates, n_docs)` document log-prior added to each pair.
        question: `(candidates,)` question of each candidate (candidates of a question compete).
        last: `(candidates,)` last position whose target counts (-1: none).
        keep: Hypotheses returned per question.
        vocab: Vocabulary size (label smoothing).
        known: `(candidates, n_docs)` complete pair log-likelihoods, nan where unknown.
        epsilon: Label smoothing of the config.
        smooth_base: `(candidates, n_docs)` smoothing sums counted already (with ``epsilon > 0``).
        start: First position the added entries may hold (earlier ones are in ``base``).
        expanded: `(candidates, n_docs, tgt_len)` target log-probabilities known already, nan elsewhere.
    """

    def __init__(
        self,
        generator: Any,
        base: torch.Tensor,
        prior: torch.Tensor,
        question: torch.Tensor,
        last: torch.Tensor,
        keep: int,
        vocab: int,
        known: torch.Tensor | None = None,
        epsilon: float = 0.0,
        smooth_base: torch.Tensor | None = None,
        start: int = 0,
        expanded: torch.Tensor | None = None,
    ) -> None:
        self.generator, self.keep, self.vocab, self.epsilon = generator, keep, vocab, epsilon
        # (pairs, tgt_len) log-probabilities known already (nan elsewhere); smoothing needs full distributions.
        self.expanded = None if expanded is None or epsilon > 0 else expanded.flatten(0, 1)
        self.num_candidates, self.n_docs = base.shape
        self.device = base.device
        self.question = question
        self.ll = base.flatten().clone()
        self.prior = prior.flatten()
        self.smooth = None
        self.complete = torch.zeros_like(self.ll, dtype=torch.bool)
        if epsilon > 0:
            self.smooth = (
                (smooth_base if smooth_base is not None else torch.zeros_like(base)).flatten().clone()
            )
        elif known is not None:
            is_known = ~known.flatten().isnan()
            self.ll = torch.where(is_known, known.flatten(), self.ll)
            self.complete |= is_known
        self.last = last.repeat_interleave(self.n_docs)  # (pairs,)
        self.complete |= self.last.lt(start)  # nothing left to score
        self.depth = start  # next position to project
        self.prune = _PRUNE_SCORING and epsilon == 0 and bool(self.complete.any())
        self.dead = torch.zeros_like(self.complete)  # negligible pairs
        self.out = torch.zeros(self.num_candidates, dtype=torch.bool, device=self.device)  # never returned
        self.settled = torch.zeros_like(self.out)  # the only candidate left in its question (keep == 1)
        # Candidates come grouped by question: slot = place within its question, for per-question tables.
        sizes = torch.bincount(question)
        starts = torch.cumsum(sizes, 0) - sizes
        self.slot = torch.arange(len(question), device=self.device) - starts[question]
        self.table_shape = (len(sizes), int(sizes.max()) if len(sizes) else 0)
        self.budget = _SCORING_ELEMENTS_CUDA if self.device.type == "cuda" else _SCORING_ELEMENTS_CPU
        self.hidden: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, ...]] = []
        self.states = 0
        self.rounding = 0.0

    def add(
        self,
        hidden: torch.Tensor,
        pair: torch.Tensor,
        state: torch.Tensor,
        target: torch.Tensor,
        position: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Adds `(states, hidden)` decoder states before the head and their `(entries,)` scored targets.

        Each entry: its pair (``candidate * n_docs + doc``), its state (index into ``hidden``), target
        token, position, and whether it counts in the log-likelihood (a left-out BOS still counts in
        smoothing).
        """
        if self.epsilon == 0:  # uncounted targets only matter to smoothing
            pair, state, target, position = pair[counts], state[counts], target[counts], position[counts]
            counts = torch.ones_like(pair, dtype=torch.bool)
        if self.prune:
            bound = _log_prob_upper_bounds(self.generator, hidden, state, target, self.budget)
        else:
            bound = torch.zeros(len(pair), dtype=torch.float32, device=self.device)
        projected = torch.zeros_like(counts)
        if self.expanded is not None and len(pair):
            values = self.expanded[pair, position]
            projected = ~values.isnan() & ~self.complete[pair]  # known: counted as if projected
            self.ll.index_add_(0, pair[projected], values[projected].masked_fill(~counts[projected], 0.0))
        self.entries.append((pair, state + self.states, target, position, counts, bound, projected))
        self.hidden.append(hidden)
        self.states += hidden.shape[0]
        # Float rounding allowed for when comparing bounds (the head's dtype rounds logits; sums round too).
        self.rounding = max(self.rounding, 4 * torch.finfo(hidden.dtype).eps)

    def active(self) -> torch.Tensor:
        """`(pairs,)` pairs whose remaining targets may still matter."""
        return ~(self.complete | self.dead | (self.out | self.settled).repeat_interleave(self.n_docs))

    def run(self) -> None:
        """Projects the added entries position by position, tightening the bounds in between."""
        if len(self.hidden) > 1:  # merge the passes' states and entries once
            self.hidden = [torch.cat(self.hidden)]
            self.entries = [tuple(torch.cat(parts) for parts in zip(*self.entries))]
        if not self.hidden:
            return
        hidden = self.hidden[0]
        pair, state, target, position, counts, bound, projected = self.entries[0]
        if not self.prune:
            active = self.active()
            members = (~projected & active[pair]).nonzero().squeeze(1)
            self._project(hidden, pair, state, target, counts, members)
            projected.fill_(True)
            self.complete |= active
            return
        # Invariants: a pair is complete only once every one of its targets was counted (from generation
        # or projected while the pair was active); dead, out and settled only ever grow.
        end = int(self.last.max())
        for depth in range(self.depth, end + 1):
            self._tighten(pair, bound, projected)
            active = self.active()
            if not bool(active.any()):
                break
            members = (position.eq(depth) & ~projected & active[pair]).nonzero().squeeze(1)
            self._project(hidden, pair, state, target, counts, members)
            projected[members] = True
            # Only pairs that took part: an out candidate's partial sums must not pass for a lower bound.
            self.complete |= active & self.last.le(depth)
        self.depth = max(self.depth, end + 1)
        self._tighten(pair, bound, projected)

    def scores(self) -> torch.Tensor:
        """`(candidates,)` float32 scores, higher is better; -inf for candidates certainly not returned."""
        terms = (self.ll + self.prior).view(self.num_candidates, self.n_docs)
        if self.smooth is not None:
            # Label smoothing, as in the training loss: sum over the vocabulary of the log-probabilities.
            smoothed = (self.smooth + self.vocab * self.prior).view(self.num_candidates, self.n_docs)
            return (1.0 - self.epsilon) * terms.logsumexp(
                dim=1
            ) + self.epsilon / self.vocab * smoothed.logsumexp(dim=1)
        counted = (self.complete & ~self.dead).view(self.num_candidates, self.n_docs)
        scores = terms.masked_fill(~counted, float("-inf")).logsumexp(dim=1)
        return scores.masked_fill(self.out, float("-inf"))

    def _project(
        self,
        hidden: torch.Tensor,
        pair: torch.Tensor,
        state: torch.Tensor,
        target: torch.Tensor,
        counts: torch.Tensor,
        members: torch.Tensor,
    ) -> None:
        """Adds the exact log-probabilities of entries ``members`` (each distinct state projected once)."""
        if len(members) == 0:
            return
        states, inverse = torch.unique(state[members], return_inverse=True)
        picked = torch.empty(len(members), dtype=torch.float32, device=self.device)
        sums = torch.empty_like(picked) if self.smooth is not None else None
        max_rows = max(1, self.budget // self.vocab)
        for first in range(0, len(states), max_rows):  # bounded logits
            log_probs = torch.log_softmax(
                _project(self.generator, hidden[states[first : first + max_rows]]),
                dim=-1,
                dtype=torch.float32,
            )
            mine = (inverse >= first) & (inverse < first + max_rows)
            rows = inverse[mine] - first
            picked[mine] = log_probs[rows, target[members][mine]]
            if sums is not None:
                sums[mine] = log_probs.sum(dim=-1)[rows]
            del log_probs
        self.ll.index_add_(0, pair[members], picked.masked_fill(~counts[members], 0.0))
        if sums is not None:
            self.smooth.index_add_(0, pair[members], sums)

    def _tighten(self, pair: torch.Tensor, bound: torch.Tensor, projected: torch.Tensor) -> None:
        """Marks dead pairs and out and settled candidates from the current bounds."""
        waiting = ~projected
        rest = torch.zeros_like(self.ll).index_add_(0, pair[waiting], bound[waiting])
        shape = (self.num_candidates, self.n_docs)
        terms = (self.ll + self.prior + rest.masked_fill(self.complete, 0.0)).view(shape)
        lower = terms.masked_fill(~self.complete.view(shape), float("-inf")).logsumexp(dim=1)
        upper = terms.logsumexp(dim=1)
        self.dead |= ~self.complete & (terms < (lower - _NEGLIGIBLE).unsqueeze(1)).flatten()
        # Bounds and exact values are float sums of up to a few hundred terms, each rounded: a candidate is
        # ruled out only by a gap of more than _MARGIN nats plus 4 ulps of the head's dtype per unit of
        # score (the float32 rounding of ~100 terms is ~1e-5 nats).
        margin = _MARGIN + self.rounding * upper.abs()
        lowers = torch.full(self.table_shape, float("-inf"), device=self.device)
        lowers[self.question, self.slot] = lower  # (questions, most candidates)
        beaten_by = (lowers[self.question] > (upper + margin).unsqueeze(1)).sum(dim=1)
        self.out |= beaten_by >= self.keep
        if self.keep == 1:
            left = torch.zeros_like(self.question).index_add_(0, self.question, (~self.out).long())
            self.settled |= ~self.out & left[self.question].eq(1) & lower.isfinite()


class _PositionsByDepth(_Owned):
    """Forward hook on a learned position embedding: positions by trie depth instead of sequence place."""

    def __init__(self) -> None:
        super().__init__()
        self.depths: torch.Tensor | None = None

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        if self.depths is None or not self.mine():
            return None
        return torch.nn.functional.embedding(self.depths + module.offset, module.weight)


def _packed_thorough_scores(
    model: Any,
    positions_module: torch.nn.Module,
    encoder_states: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    scoring: _CandidateScores,
    candidates: torch.Tensor,
    candidate_question: torch.Tensor,
    use_bos: torch.Tensor,
    target: torch.Tensor,
    needed: torch.Tensor,
    cross_attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor | None:
    """`(num_candidates,)` thorough scores, each question's candidates packed as one prefix trie per document.

    Returns None (the caller takes the rows path) when a question's trie is wider than
    ``_PACKED_MAX_WIDTH`` or than the position table (the hooked embedding still runs on the packed places).

    A question's candidates share their decoder inputs as a trie: each distinct prefix is one token of
    a packed decoder sequence, attending to its ancestors only (a 4D mask), at its depth as position.
    One decoder row per (question, document) context then computes every hidden state scoring needs,
    each distinct (document, prefix) once: no per-candidate rows, and the cross-attention keys/values
    are computed once per context. Same numbers as teacher forcing each candidate, up to float rounding.
    """
    generator = model.generator
    pad = model.config.generator.pad_token_id
    n_docs = scoring.n_docs
    device = candidates.device
    mask_dtype = generator.get_input_embeddings().weight.dtype
    heads = getattr(generator.config, "decoder_attention_heads", 1)
    source_length = encoder_states.shape[1]
    candidate_list, question_list, needed_list = (
        candidates.tolist(),
        candidate_question.tolist(),
        needed.tolist(),
    )
    # One trie per (question, document) context, of the candidates whose pair scoring still needs (not
    # known from generation): a document's own hypotheses are left out of its trie unless shared.
    needs = (~scoring.complete).view(-1, n_docs).tolist()
    member_candidate, member_row = [], []
    first = 0
    for q, count in sorted(Counter(question_list).items()):  # candidates come grouped by question, in order
        for doc in range(n_docs):
            for c in range(first, first + count):
                if needs[c][doc]:
                    member_candidate.append(c)
                    member_row.append(q * n_docs + doc)
        first += count
    if not member_candidate:
        scoring.run()
        return scoring.scores()
    rows = sorted(set(member_row))  # contexts with a trie
    local_row = {row: i for i, row in enumerate(rows)}
    node_tokens, node_depths, node_parents, paths = _question_tries(
        [candidate_list[c] for c in member_candidate],
        [local_row[row] for row in member_row],
        [needed_list[c] for c in member_candidate],
    )
    limit = min(_PACKED_MAX_WIDTH, positions_module.num_embeddings - positions_module.offset)
    widest = max(len(tokens) for tokens in node_tokens)
    if widest > limit:
        logger.debug("Prefix trie of %d nodes is wider than %d: scoring per candidate.", widest, limit)
        return None

    first_member = [0]
    for count in Counter(member_row).values():  # members come grouped by row, in order
        first_member.append(first_member[-1] + count)
    # Chunks of whole rows, sized by their attention scores (projection comes later, in rounds).
    chunks: list[tuple[int, int]] = []
    cost = 0
    for r, tokens in enumerate(node_tokens):
        row_cost = len(tokens) * heads * (len(tokens) + source_length)
        if chunks and cost + row_cost <= scoring.budget:
            chunks[-1] = (chunks[-1][0], r + 1)
            cost += row_cost
        else:
            chunks.append((r, r + 1))
            cost = row_cost

    member_candidate_t = torch.tensor(member_candidate, dtype=torch.long, device=device)
    member_row_t = torch.tensor(member_row, dtype=torch.long, device=device)
    local_of_member = torch.tensor([local_row[row] for row in member_row], dtype=torch.long, device=device)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    member_target = target[member_candidate_t]
    selector, replace = _SelectRows(capture=True), _PositionsByDepth()
    handles = []
    try:
        handles.append(generator.get_output_embeddings().register_forward_pre_hook(selector))
        handles.append(positions_module.register_forward_hook(replace))
        for first_row, end_row in chunks:
            chunk_rows = range(first_row, end_row)
            ids, depths, additive = _packed_inputs(
                [node_tokens[r] for r in chunk_rows],
                [node_depths[r] for r in chunk_rows],
                [node_parents[r] for r in chunk_rows],
                pad,
                mask_dtype,
                device,
            )
            width = ids.shape[1]
            contexts = rows_t[first_row:end_row]  # global (question, doc) rows
            lo, hi = first_member[first_row], first_member[end_row]
            entry_member, entry_position, entry_node, entry_target = _scored_entries(
                paths, lo, hi, member_target, pad
            )
            # Hidden-state index: local row * width + node.
            flat = (local_of_member[entry_member] - first_row) * width + entry_node
            unique_flat, inverse = torch.unique(flat, return_inverse=True)
            selector.rows = unique_flat
            replace.depths = depths
            cache = None
            if cross_attention is not None:  # reuse the contexts' cross-attention keys/values
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                for layer_idx, (keys, values) in enumerate(cross_attention):
                    cache.cross_attention_cache.update(keys[contexts], values[contexts], layer_idx)
                    cache.is_updated[layer_idx] = True
            generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[contexts]),
                attention_mask=None if context_attention_mask is None else context_attention_mask[contexts],
                decoder_input_ids=ids,
                decoder_attention_mask=additive.unsqueeze(1),
                cache=cache,
                use_cache=cache is not None,
                return_dict=True,
            )
            del cache
            hidden, selector.hidden = selector.hidden, None
            selector.rows = replace.depths = None
            entry_candidate = member_candidate_t[entry_member]
            # The leading BOS target is left out of a question's scores (use_bos), but not out of smoothing.
            skip = entry_position.eq(0) & use_bos[candidate_question[entry_candidate]]
            scoring.add(
                hidden,
                entry_candidate * n_docs + member_row_t[entry_member] % n_docs,
                inverse,
                entry_target,
                entry_position,
                ~skip,
            )
            del hidden
        scoring.run()
    finally:
        for handle in handles:
            handle.remove()
        selector.rows = selector.hidden = replace.depths = None
    return scoring.scores()


def _thorough_scores(
    model: Any,
    encoder_states: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    doc_logprobs: torch.Tensor,
    sequences: torch.Tensor,
    candidate_rows: torch.Tensor,
    candidate_question: torch.Tensor,
    use_bos: torch.Tensor,
    share_cross_attention: bool | None = None,
    keep: int = 1,
    known: torch.Tensor | None = None,
    cross_attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    search: _StepStates | None = None,
) -> torch.Tensor:
    """`(num_candidates,)` RAG-Sequence scores (minus the loss) of every candidate against every document.

    Work that Transformers repeats per (candidate, document) pair is done once here: the encoder
    runs once per document, the first decoder step too, and the vocabulary projection (the largest
    matrix of the decoder) runs once per distinct (document, prefix) pair whose next token is scored
    rather than once per candidate position. With ``share_cross_attention`` (default on CPU, where
    compute is the bottleneck) each document's cross-attention keys and values are also computed
    once and copied to its candidates through the cache; on GPU they are recomputed per layer,
    which costs less memory.

    Args:
        encoder_states: `(batch_size * n_docs, src_len, hidden)` generator encoder outputs, reused.
        context_attention_mask: `(batch_size * n_docs, src_len)` or None for no padding.
        doc_logprobs: `(batch_size, n_docs)` log-softmax of the document scores.
        sequences: `(rows, tgt_len)` generated sequences, decoder start token first.
        candidate_rows: `(num_candidates,)` rows of ``sequences`` to score, grouped by question.
        candidate_question: `(num_candidates,)` question index of each candidate (non-decreasing).
        use_bos: `(batch_size,)` whether a question's leading BOS target is excluded from the score.
        share_cross_attention: See above; None picks by device.
        keep: Hypotheses returned per question: candidates that ``keep`` others certainly beat need no
            exact score (see :class:`_CandidateScores`).
        known: `(num_candidates, n_docs)` log-likelihoods of (candidate, document) pairs that generation
            computed already, nan elsewhere.
        cross_attention: Per decoder layer, the contexts' cross-attention keys and values, if computed
            already (the packed path reuses them).
        search: What generation recorded: targets whose prefix it expanded under a document are taken
            from there (see :func:`_expanded_prefix_log_probs`).

    Returns:
        `(num_candidates,)` float32 scores, higher is better; -inf for candidates certainly not returned.
    """
    generator = model.generator
    pad = model.config.generator.pad_token_id
    epsilon = float(getattr(model.config, "label_smoothing", 0.0) or 0.0)
    n_docs = doc_logprobs.shape[1]
    full_length = sequences.shape[1]
    device = sequences.device
    if share_cross_attention is None:
        share_cross_attention = _SHARE_CROSS_ATTENTION
    if share_cross_attention is None:
        share_cross_attention = device.type != "cuda"

    candidates = sequences[candidate_rows]
    if not bool(candidates[:, 0].eq(candidates[0, 0]).all()):
        raise ValueError(
            "RAG-Sequence scoring expects every hypothesis to start with the decoder start token."
        )
    # target[t] = sequence[t + 1]; a pad target scores nothing (as in the training loss), so columns after
    # a candidate's last non-pad target are never needed (the decoder is causal).
    target = torch.cat([candidates[:, 1:], candidates.new_full((candidates.shape[0], 1), pad)], dim=1)
    nonpad = target.ne(pad)
    needed = torch.where(nonpad.any(1), full_length - nonpad.flip(1).int().argmax(1), 1)
    # The document prior sits on the second target token and is lost with it when that token is a pad.
    has_prior = nonpad[:, 1] if full_length > 1 else torch.zeros_like(nonpad[:, 0])
    prior = doc_logprobs[candidate_question] * has_prior.unsqueeze(1)  # (candidates, n_docs)
    # Last position whose target counts: not a pad, nor the leading BOS left out (use_bos).
    counted = nonpad.clone()
    counted[:, 0] &= ~use_bos[candidate_question]
    last = torch.where(counted.any(1), full_length - 1 - counted.flip(1).int().argmax(1), -1)
    head = generator.get_output_embeddings()
    vocab = int(getattr(head, "out_features", None) or generator.config.vocab_size)

    expanded = None
    if search is not None and epsilon == 0:
        expanded = _expanded_prefix_log_probs(search, candidates, candidate_question, target, counted, n_docs)

    def scoring(base: torch.Tensor, smooth_base: torch.Tensor | None, start: int) -> _CandidateScores:
        return _CandidateScores(
            generator,
            base,
            prior,
            candidate_question,
            last,
            keep,
            vocab,
            known=known,
            epsilon=epsilon,
            smooth_base=smooth_base,
            start=start,
            expanded=expanded,
        )

    positions_module = _packed_scoring_positions(generator, device)
    if positions_module is not None:
        packed = _packed_thorough_scores(
            model,
            positions_module,
            encoder_states,
            context_attention_mask,
            scoring(torch.zeros_like(prior), None, 0),
            candidates,
            candidate_question,
            use_bos,
            target,
            needed,
            cross_attention,
        )
        if packed is not None:
            return packed
    prefix_ids = _prefix_ids(candidates.tolist(), candidate_question.tolist()).to(device)
    prefix_count = int(prefix_ids.max()) + 1

    # First decoder step, once per document: its logits score target 0 of every candidate (all start
    # with the decoder start token); with sharing, its cache carries the cross-attention keys/values.
    num_contexts = encoder_states.shape[0]
    first = generator(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
        attention_mask=context_attention_mask,
        decoder_input_ids=candidates[:1, :1].expand(num_contexts, 1),
        use_cache=share_cross_attention,
        return_dict=True,
    )
    # One fused float32 log-softmax pass: logsumexp is several passes over the (rows, vocab) logits and
    # dominated scoring time on CPU.
    first_logprobs = torch.log_softmax(
        first.logits[:, 0], dim=-1, dtype=torch.float32
    )  # (batch_size * n_docs, vocab)
    first_smooth = first_logprobs.sum(dim=-1) if epsilon > 0 else None
    cache_layers = []
    if share_cross_attention:
        cache_layers = _cache_layers(getattr(first, "cache", None) or first.past_key_values)
        per_row = sum(k[0].numel() + v[0].numel() for _, _, k, v in cache_layers)
    else:
        per_row = encoder_states[0].numel()
    del first

    # Chunks of whole questions, so that equal prefixes of a question share decoder states; sized by the
    # cross-attention inputs copied per row (projection comes later, in bounded rounds).
    budget = _SCORING_ELEMENTS_CUDA if device.type == "cuda" else _SCORING_ELEMENTS_CPU
    counts = torch.bincount(candidate_question, minlength=doc_logprobs.shape[0]).tolist()
    chunks, start, cost = [], 0, 0
    for count in counts:
        question_cost = n_docs * count * per_row
        if chunks and chunks[-1][1] == start and cost + question_cost <= budget:
            chunks[-1] = (chunks[-1][0], start + count)
            cost += question_cost
        else:
            chunks.append((start, start + count))
            cost = question_cost
        start += count

    passes: list[tuple[torch.Tensor, ...]] = []  # (states, entry pair, state, target, position, counts)
    base = torch.zeros(candidates.shape[0] * n_docs, dtype=torch.float32, device=device)
    smooth_base = torch.zeros_like(base) if epsilon > 0 else None
    doc_range = torch.arange(n_docs, device=device)
    offset = 1 if share_cross_attention else 0  # first decoder input column fed to the chunk pass
    selector = _SelectRows(capture=True)
    handle = generator.get_output_embeddings().register_forward_pre_hook(selector)
    try:
        for first_candidate, end in chunks:
            if first_candidate == end:
                continue
            chunk = torch.arange(first_candidate, end, device=device)
            length = int(needed[first_candidate:end].max())
            question = candidate_question[chunk]
            contexts = (
                (question * n_docs).unsqueeze(1) + doc_range
            ).flatten()  # row (candidate, doc) -> context
            chunk_target = target[chunk, :length].repeat_interleave(n_docs, dim=0)  # (rows, length)
            pad_target = chunk_target.eq(pad)

            # Target 0 comes from the shared first step.
            first_ll = first_logprobs[contexts, chunk_target[:, 0]]
            skip_first = use_bos[question].repeat_interleave(n_docs) | pad_target[:, 0]
            row_ll = first_ll.masked_fill(skip_first, 0.0)
            row_smooth = first_smooth[contexts].masked_fill(pad_target[:, 0], 0.0) if epsilon > 0 else None

            if length > 1:
                width = length - offset  # decoder positions run in this pass
                later = ~pad_target[:, 1:]  # (rows, length - 1): targets 1.. that are scored
                # One vocabulary projection per distinct (context, prefix): equal prefixes share hidden states.
                keys = contexts.unsqueeze(1) * prefix_count + prefix_ids[chunk, 1:length].repeat_interleave(
                    n_docs, dim=0
                )
                entries = later.flatten().nonzero().squeeze(1)  # index into (rows, length - 1)
                entry_row = entries // (length - 1)
                positions = entry_row * width + entries % (length - 1) + (1 - offset)  # into (rows, width)
                unique_keys, inverse = torch.unique(keys.flatten()[entries], return_inverse=True)
                selector.rows = torch.empty(len(unique_keys), dtype=torch.long, device=device).scatter_(
                    0, inverse, positions
                )
                cache = None
                if share_cross_attention:
                    cache = EncoderDecoderCache(
                        [
                            (sk[contexts], sv[contexts], ck[contexts], cv[contexts])
                            for sk, sv, ck, cv in cache_layers
                        ]
                    )
                generator(
                    encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[contexts]),
                    attention_mask=None
                    if context_attention_mask is None
                    else context_attention_mask[contexts],
                    decoder_input_ids=candidates[chunk, offset:length].repeat_interleave(n_docs, dim=0),
                    cache=cache,
                    use_cache=share_cross_attention,
                    return_dict=True,
                )
                hidden, selector.hidden = selector.hidden, None  # (distinct prefixes, hidden)
                selector.rows = None
                del cache
                passes.append(
                    (
                        hidden,
                        entry_row + first_candidate * n_docs,
                        inverse,
                        chunk_target[:, 1:].flatten()[entries],
                        entries % (length - 1) + 1,
                        torch.ones_like(entries, dtype=torch.bool),
                    )
                )
                del hidden
            pairs = slice(first_candidate * n_docs, end * n_docs)
            base[pairs] = row_ll
            if smooth_base is not None:
                smooth_base[pairs] = row_smooth
    finally:
        handle.remove()
        selector.rows = selector.hidden = None
    # Target 0 of every pair is in the base already (the shared first step).
    rows_scoring = scoring(
        base.view(-1, n_docs), None if smooth_base is None else smooth_base.view(-1, n_docs), 1
    )
    for one_pass in passes:
        rows_scoring.add(*one_pass)
    del passes
    rows_scoring.run()
    return rows_scoring.scores()


def _producer_rows(
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


def _known_pairs(
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


def _fast_scores(
    generated_ll: torch.Tensor, producers: list[list[int]], doc_logprobs: torch.Tensor, rows_per_doc: int
) -> torch.Tensor:
    """`(num_candidates,)` log of sum over the documents that produced each candidate of p(d|x) p(y|x,d)."""
    # Each row's own joint score: document prior plus what beam search gave the sequence.
    row_joint = doc_logprobs.flatten().repeat_interleave(rows_per_doc) + generated_ll
    return torch.stack([row_joint[rows].logsumexp(dim=0) for rows in producers])


def _generate_hypotheses(
    model: Any,
    encoder_states: torch.Tensor,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    num_beams: int,
    decoding: str,
    kwargs: dict[str, Any],
) -> tuple[
    torch.Tensor,
    torch.Tensor | None,
    _StepScoreRecorder | None,
    _StepStates | None,
    list[tuple[torch.Tensor, torch.Tensor]] | None,
]:
    """The generator's beam search (or greedy search) over every context, and what scoring reuses of it.

    Args:
        encoder_states: `(contexts, src_len, hidden)` generator encoder outputs.
        kwargs: Generation keyword arguments (a copy: keys are added, the cache given to generate is
            popped again).

    Returns:
        `(contexts * num_beams, tgt_len)` sequences; `(rows, steps)` beam indices (or None); the step
        score recorder (fast decoding) or the step states (thorough decoding in float32), each or None;
        per decoder layer, each context's cross-attention keys and values (CPU) or None.
    """
    generator = model.generator
    shared = cross_attention = None  # per layer, each context's cross-attention keys and values
    # Transformers renamed the cache argument from past_key_values to cache (5.x).
    cache_key = "cache" if "cache" in inspect.signature(generator.forward).parameters else "past_key_values"
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(kwargs.get("generation_config") or generator.generation_config, "use_cache", True)
    if num_beams > 1 and use_cache and not {"cache", "past_key_values"} & kwargs.keys():
        # Before the hooks below: this first step is not one of generation's.
        shared = _beam_shared_cross_attention(generator, encoder_states, context_attention_mask, num_beams)
        if shared is not None:
            kwargs[cache_key], cross_attention = shared.cache, shared.layers
            if context_input_ids.device.type == "cuda":
                cross_attention = None  # the rows path recomputes them on CUDA: less memory
    recorder = steps = head = None
    hooks = []
    if decoding == "fast":
        # Beam search keeps a row's token only if it is among that row's top (eos + 1) * num_beams.
        k = max(2, (len(_eos_ids(generator, kwargs)) + 1) * num_beams)
        recorder = _StepScoreRecorder(k, normalize=num_beams == 1)
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), recorder])
        kwargs["return_dict_in_generate"] = True
    elif (
        _PRUNE_SCORING
        and not float(getattr(model.config, "label_smoothing", 0.0) or 0.0)
        # A decoder prompt shifts steps against positions: not handled, scoring computes those pairs.
        and kwargs.get("decoder_input_ids") is None
        # Under autocast the logits are rounded to half precision (see below).
        and not _autocast_enabled(context_input_ids.device)
    ):
        # Each hypothesis's log-likelihood under its own document falls out of generation: keep what gives it.
        head = _gatherable_head(generator)
        # In half precision, generation's values (a float32 dot product against a normaliser of rounded
        # logits) differ from teacher forcing's by rounding, enough to swap near ties: float32 only.
        if head is not None and head[0].dtype == torch.float32:
            steps = _StepStates(head, num_beams)
            hooks.append(generator.register_forward_pre_hook(steps.before_model, with_kwargs=True))
            hooks.append(generator.get_output_embeddings().register_forward_pre_hook(steps.before_head))
            hooks.append(generator.register_forward_hook(steps.after_model))
            kwargs["return_dict_in_generate"] = True
    try:
        with shared.installed() if shared is not None else contextlib.nullcontext():
            output = generator.generate(
                input_ids=context_input_ids,
                attention_mask=context_attention_mask,
                # A fresh output object: generate expands it for beams in place.
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                num_beams=num_beams,
                num_return_sequences=num_beams,
                **kwargs,
            )
    finally:
        for hook in hooks:
            hook.remove()
    # (batch * n_docs * num_beams, tgt_len); the output object also holds the decoding cache: drop it.
    sequences = output.sequences if kwargs.get("return_dict_in_generate") else output
    beam_indices = getattr(output, "beam_indices", None)
    del output
    cache = kwargs.pop(cache_key, None)
    if steps is not None and num_beams > 1:
        steps.beam_orders = cache.beam_orders if isinstance(cache, _BeamSharedCrossCache) else []
    del cache, shared  # beam search's keys/values: not needed any more
    return sequences, beam_indices, recorder, steps, cross_attention


def _decode_questions(
    model: Any,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    doc_scores: torch.Tensor,
    deduplicate: bool,
    num_return_sequences: int,
    num_beams: int,
    n_docs: int,
    decoding: str,
    model_kwargs: dict[str, Any],
) -> torch.Tensor:
    """`(batch_size, num_return_sequences, tgt_len)` best hypotheses (pad rows where fewer candidates exist)."""
    generator = model.generator
    pad = model.config.generator.pad_token_id
    batch_size = doc_scores.shape[0]

    # The generator's encoder runs once; generation and scoring both read its outputs.
    encoder_states = generator.get_encoder()(
        input_ids=context_input_ids, attention_mask=context_attention_mask, return_dict=True
    ).last_hidden_state

    kwargs = dict(model_kwargs)
    sequences, beam_indices, recorder, steps, cross_attention = _generate_hypotheses(
        model, encoder_states, context_input_ids, context_attention_mask, num_beams, decoding, kwargs
    )
    rows_per_question = n_docs * num_beams
    groups = _candidate_groups(sequences, rows_per_question, deduplicate)
    candidate_rows = torch.tensor([r for g in groups for r in g], device=sequences.device)
    candidate_question = torch.tensor([q for q, g in enumerate(groups) for _ in g], device=sequences.device)
    doc_logprobs = torch.log_softmax(doc_scores.float(), dim=-1)

    if recorder is None:
        # As Transformers: the leading BOS target is left out of a question's scores when all its candidates have it.
        # T5 configs have no bos_token_id attribute at all (Transformers' own scoring crashes there).
        bos = getattr(model.config, "bos_token_id", None) or getattr(
            model.config.generator, "bos_token_id", None
        )
        if bos is None or sequences.shape[1] < 2:
            use_bos = torch.zeros(batch_size, dtype=torch.bool, device=sequences.device)
        else:
            not_bos = sequences[candidate_rows, 1].ne(bos).long()
            use_bos = torch.zeros(batch_size, dtype=torch.long, device=sequences.device)
            use_bos = use_bos.index_add_(0, candidate_question, not_bos).eq(0)
        known = None
        if steps is not None and (num_beams == 1 or beam_indices is not None):
            # Targets scored: the next token unless it is a pad, the leading BOS left out where use_bos.
            scored = torch.cat(
                [sequences[:, 1:].ne(pad), sequences.new_zeros(sequences.shape[0], 1).bool()], 1
            )
            scored[:, 0] &= ~use_bos.repeat_interleave(rows_per_question)
            row_ll = _generated_pair_log_likelihoods(
                steps, sequences, beam_indices if num_beams > 1 else None, scored
            )
            known = _known_pairs(
                _producer_rows(sequences, groups, rows_per_question), row_ll, n_docs, num_beams
            )
        scores = _thorough_scores(
            model,
            encoder_states,
            context_attention_mask,
            doc_logprobs,
            sequences,
            candidate_rows,
            candidate_question,
            use_bos,
            keep=num_return_sequences,
            known=known,
            cross_attention=cross_attention,
            search=steps if known is not None else None,
        )
        del steps
    else:
        generated_ll = _generated_log_likelihoods(
            recorder, sequences, beam_indices, _eos_ids(generator, kwargs)
        )
        producers = _producer_rows(sequences, groups, rows_per_question)
        scores = _fast_scores(generated_ll, producers, doc_logprobs, num_beams)

    best = sequences.new_full((batch_size, num_return_sequences, sequences.shape[1]), pad)
    offset = 0
    for q, group in enumerate(groups):
        group_scores = scores[offset : offset + len(group)]
        k = min(num_return_sequences, len(group))
        if k < num_return_sequences:
            logger.warning(
                "Question %d has %d distinct hypotheses, fewer than num_return_sequences=%d: padding the rest.",
                q,
                len(group),
                num_return_sequences,
            )
        top = group_scores.topk(k).indices
        best[q, :k] = sequences[candidate_rows[offset + top]]
        offset += len(group)
    return best


def _questions_fitting(
    generator: Any,
    n_docs: int,
    num_beams: int,
    context_length: int,
    model_kwargs: dict[str, Any],
    budget_bytes: int,
) -> int:
    """How many questions one generator call may decode within ``budget_bytes`` (at least 1).

    Beam search keeps, per beam row, the cross-attention keys/values of its context and the
    self-attention cache of every layer, plus float32 logits over the vocabulary: that dominates the
    peak (about 14 MiB per row for BART-large at 300 tokens in bf16, so about 0.3 GiB per question at 5
    documents x 4 beams), which is why an unbounded batch can exhaust a GPU that decodes question by
    question comfortably.
    """
    config = generator.config
    layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or 1
    hidden = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 1
    vocab = getattr(config, "vocab_size", 1)
    # The embeddings' dtype is the caches' (quantized linear layers would report their packed storage).
    element = generator.get_input_embeddings().weight.element_size()
    if "max_new_tokens" in model_kwargs:
        length = int(model_kwargs["max_new_tokens"]) + 1
    else:
        length = int(model_kwargs.get("max_length") or generator.generation_config.max_length or 20)
    rows = n_docs * max(num_beams, 1)
    per_row = layers * 2 * (context_length + length) * hidden * element  # caches
    per_row += context_length * hidden * element  # encoder states expanded to the beams
    per_row += 3 * vocab * 4  # float32 logits, their log-softmax and the processed scores of one step
    return max(1, int(budget_bytes // (rows * per_row)))


@torch.no_grad()
def rag_sequence_generate(
    model: Any,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.LongTensor | None = None,
    context_input_ids: torch.LongTensor | None = None,
    context_attention_mask: torch.LongTensor | None = None,
    doc_scores: torch.FloatTensor | None = None,
    do_deduplication: bool | None = None,
    num_return_sequences: int | None = None,
    num_beams: int | None = None,
    n_docs: int | None = None,
    decoding: str = "thorough",
    **model_kwargs: Any,
) -> torch.LongTensor:
    """RAG-Sequence generation for a whole batch at once (backs ``RagSequenceForGeneration.generate``).

    Args:
        model: A RAG-Sequence model: ``config``, ``generator``, ``question_encoder`` and ``retriever``.
        input_ids: `(batch_size, question_len)` question ids; used to retrieve when no contexts are given.
        attention_mask: `(batch_size, question_len)` question mask.
        context_input_ids: `(batch_size * n_docs, context_len)` retrieved contexts (skips retrieval).
        context_attention_mask: `(batch_size * n_docs, context_len)` their mask (None: no padding).
        doc_scores: `(batch_size, n_docs)` question-document scores; required with ``context_input_ids``.
        do_deduplication: Drop repeated hypotheses of a question (default ``config.do_deduplication``).
        num_return_sequences: Hypotheses returned per question (default 1).
        num_beams: Beams per (question, document) (default 1: greedy).
        n_docs: Documents per question (default ``config.n_docs``).
        decoding: ``"thorough"`` (score every hypothesis under every document) or ``"fast"`` (a
            hypothesis counts only under the documents whose beam produced it; no extra forward pass).
        **model_kwargs: Passed to the generator's ``generate`` (``max_length``, ``min_length``, ...).
            ``questions_per_batch`` (ragkit only) decodes that many questions per generator call to
            cap memory; by default the whole batch goes at once, except on CUDA where as many questions
            go together as fit in half the free GPU memory (same output either way).

    Returns:
        `(batch_size * num_return_sequences, tgt_len)` token ids, best first per question, padded
        with the generator's pad token.
    """
    do_deduplication, num_return_sequences, num_beams, n_docs = _resolve_decoding_settings(
        model, do_deduplication, num_return_sequences, num_beams, n_docs, decoding
    )
    questions_per_batch = model_kwargs.pop("questions_per_batch", None)
    for key in ("num_return_sequences", "num_beams", "return_dict_in_generate", "output_scores"):
        if key in model_kwargs:
            raise ValueError(f"`{key}` cannot be passed to RAG-Sequence generate through **kwargs here.")
    model_kwargs.pop("attention_mask", None)  # the context mask is used instead
    if decoding == "fast":
        do_sample = model_kwargs.get("do_sample", model.generator.generation_config.do_sample)
        if do_sample:
            raise ValueError(
                "decoding='fast' needs greedy or beam search; pass do_sample=False or decoding='thorough'."
            )

    context_input_ids, context_attention_mask, doc_scores = _resolve_contexts(
        model, input_ids, attention_mask, context_input_ids, context_attention_mask, doc_scores, n_docs
    )
    batch_size = doc_scores.shape[0]
    if questions_per_batch is None:
        step = batch_size
        if context_input_ids.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(context_input_ids.device)
            step = _questions_fitting(
                model.generator, n_docs, num_beams, context_input_ids.shape[1], model_kwargs, free // 2
            )
            if step < batch_size:
                logger.info(
                    "Decoding %d questions per generator call (of %d) to stay within half the free GPU memory; "
                    "pass questions_per_batch to choose.",
                    step,
                    batch_size,
                )
    else:
        step = int(questions_per_batch)
    if step < 1:
        raise ValueError(f"`questions_per_batch` must be a positive integer, got {questions_per_batch}.")

    parts = []
    for first in range(0, batch_size, step):
        last = min(batch_size, first + step)
        rows = slice(first * n_docs, last * n_docs)
        with _generator_lock(model.generator):
            decoding_call = _DECODING.set(object())
            try:
                decoded = _decode_questions(
                    model,
                    context_input_ids[rows],
                    None if context_attention_mask is None else context_attention_mask[rows],
                    doc_scores[first:last],
                    do_deduplication,
                    num_return_sequences,
                    num_beams,
                    n_docs,
                    decoding,
                    model_kwargs,
                )
            finally:
                _DECODING.reset(decoding_call)
        parts.append(decoded)
    pad = model.config.generator.pad_token_id
    width = max(part.shape[-1] for part in parts)
    output = parts[0].new_full((batch_size, num_return_sequences, width), pad)
    first = 0
    for part in parts:
        output[first : first + part.shape[0], :, : part.shape[-1]] = part
        first += part.shape[0]
    return output.view(batch_size * num_return_sequences, width)
