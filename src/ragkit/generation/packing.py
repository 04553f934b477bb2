"""Packed scoring: a question's candidates as one prefix trie per document, in one decoder sequence.

Each distinct prefix is one token of a packed decoder sequence, attending to its ancestors only (a 4D
self-attention mask), at its depth as position (a hook on the learned position table). One decoder row per
(question, document) context then computes every hidden state scoring needs, each distinct (document,
prefix) once. BART-family generators (learned positions, eager or sdpa attention) only; the rest score by
rows (:func:`ragkit.generation.scoring.thorough_scores`).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

import torch
from transformers.modeling_outputs import BaseModelOutput

from .. import _compat
from ..errors import RagInputError
from .calls import owned_by_this_call
from .options import DecodingOptions

__all__ = ["PositionsByDepth", "packed_inputs", "packed_scoring_positions", "packed_thorough_scores"]

logger = logging.getLogger(__name__)


class _Scores(Protocol):
    """What packing needs of :class:`ragkit.generation.scoring.CandidateScores` (which imports this module)."""

    n_docs: int
    complete: torch.Tensor
    budget: int

    def add(self, *args: Any) -> None: ...

    def run(self) -> None: ...

    def scores(self) -> torch.Tensor: ...


def packed_scoring_positions(
    generator: Any, device: torch.device, options: DecodingOptions
) -> torch.nn.Embedding | None:
    """The position table to drive when scoring takes the packed path here, or None for the rows path.

    Packing needs positions set per token (a node's depth in the trie, not its place in the packed
    sequence) and a custom 4D self-attention mask (:func:`ragkit._compat.learned_positions`). T5's
    relative position buckets, sinusoidal positions and flash-attention keep the rows path.
    """
    path = options.scoring_path
    if path is None:
        path = None if device.type == "cpu" else "rows"
    if path == "rows":
        return None
    positions_module = _compat.learned_positions(generator)
    if path == "packed" and positions_module is None:
        raise RagInputError(
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


def packed_inputs(
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


class PositionsByDepth:
    """Forward hook on a learned position embedding: positions by trie depth instead of sequence place."""

    def __init__(self) -> None:
        self.mine = owned_by_this_call()
        self.depths: torch.Tensor | None = None

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        if self.depths is None or not self.mine():
            return None
        return torch.nn.functional.embedding(self.depths + _compat.position_offset(module), module.weight)


def packed_thorough_scores(
    model: Any,
    positions_module: torch.nn.Module,
    encoder_states: torch.Tensor,
    context_attention_mask: torch.Tensor | None,
    scoring: _Scores,
    candidates: torch.Tensor,
    candidate_question: torch.Tensor,
    counted: torch.Tensor,
    target: torch.Tensor,
    needed: torch.Tensor,
    options: DecodingOptions,
    cross_attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor | None:
    """`(num_candidates,)` thorough scores, each question's candidates packed as one prefix trie per document.

    Returns None (the caller takes the rows path) when a question's trie is wider than
    ``options.packed_max_width`` or than the position table (the hooked embedding still runs on the packed places).

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
    limit = min(
        options.packed_max_width, positions_module.num_embeddings - _compat.position_offset(positions_module)
    )
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
    selector, replace = _compat.HeadRowSelector(owned_by_this_call(), capture=True), PositionsByDepth()
    cache_key = _compat.cache_argument_name(generator)
    handles = []
    try:
        handles.append(generator.get_output_embeddings().register_forward_pre_hook(selector))
        handles.append(positions_module.register_forward_hook(replace))
        for first_row, end_row in chunks:
            chunk_rows = range(first_row, end_row)
            ids, depths, additive = packed_inputs(
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
                cache = _compat.cross_attention_cache(
                    [(k[contexts], v[contexts]) for k, v in cross_attention]
                )
            generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[contexts]),
                attention_mask=None if context_attention_mask is None else context_attention_mask[contexts],
                decoder_input_ids=ids,
                decoder_attention_mask=additive.unsqueeze(1),
                use_cache=cache is not None,
                **{cache_key: cache},
                return_dict=True,
            )
            del cache
            hidden, selector.hidden = selector.hidden, None
            selector.rows = replace.depths = None
            entry_candidate = member_candidate_t[entry_member]
            # Uncounted targets (the leading BOS left out) still count in smoothing.
            counts = counted[entry_candidate, entry_position]
            scoring.add(
                hidden,
                entry_candidate * n_docs + member_row_t[entry_member] % n_docs,
                inverse,
                entry_target,
                entry_position,
                counts,
            )
            del hidden
        scoring.run()
    finally:
        for handle in handles:
            handle.remove()
        selector.rows = selector.hidden = replace.depths = None
    return scoring.scores()
