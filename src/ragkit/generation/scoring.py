"""RAG-Sequence "thorough" scoring: every hypothesis of a question against every document of that question.

Scores are minus Transformers' RAG-Sequence loss (:func:`ragkit.losses.sequence_target_rules`: the leading BOS left out,
the document prior at the second target token, label smoothing from the config), and each distinct
(document, prefix) is computed at most once:

- Decoder states: BART-family generators (learned positions, eager or sdpa attention) on CPU pack, per
  (question, document), the prefix trie of the candidates whose pair generation did not score into one
  decoder sequence (:mod:`.packing`). Other generators (T5, flash-attention), and CUDA, where packing
  measured slower, run one decoder row per (candidate, document) (:func:`thorough_scores`, "rows"),
  sharing the first step and (on CPU) the cross-attention keys/values per document.
- Projection (:class:`CandidateScores`): every target's log-probability is first bounded from above with
  a slice of the vocabulary (:func:`log_prob_upper_bounds`); then, position by position, only targets of
  (candidate, document) pairs that may still matter go through the full vocabulary projection. A pair
  whose bound lies ``negligible`` nats under its candidate's known part is dropped (it moves the score by
  less than e^-30), a candidate that ``num_return_sequences`` others certainly beat is ruled out, and a
  question stops when one candidate is left. The output is that of exhaustive scoring
  (``DecodingOptions(prune_scoring=False)``); survivors keep their exact scores.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from .. import _compat
from ..losses import sequence_target_rules
from .calls import owned_by_this_call
from .options import DecodingOptions
from .packing import packed_scoring_positions, packed_thorough_scores
from .search import StepStates, expanded_prefix_log_probs

__all__ = ["CandidateScores", "log_prob_upper_bounds", "thorough_scores"]


def prefix_ids(candidates: list[list[int]], candidate_question: list[int]) -> torch.Tensor:
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


def log_prob_upper_bounds(
    generator: Any,
    hidden: torch.Tensor,
    state: torch.Tensor,
    target: torch.Tensor,
    budget: int,
    probe_tokens: int,
) -> torch.Tensor:
    """`(entries,)` upper bounds of entries' log-probabilities from the first ``probe_tokens`` ids only.

    ``log p(t) = l_t - logsumexp(l) <= l_t - logsumexp(l[:k])`` for any k: k logits per state instead of
    the whole vocabulary. The first ids of BPE and SentencePiece vocabularies are their most frequent
    tokens, which keeps the bound close for trained models. Zeros (the trivial bound) for other heads.
    """
    head = _compat.gatherable_head(generator)
    bounds = torch.zeros(len(state), dtype=torch.float32, device=hidden.device)
    if head is None or len(state) == 0:
        return bounds
    weight, bias = head
    probe = weight[: min(probe_tokens, weight.shape[0])].float()  # (k, hidden)
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


class CandidateScores:
    """RAG-Sequence scores of candidates from decoder states added in passes, projected in rounds by position.

    A candidate's score is ``logsumexp_d(prior_d + ll_d)`` over documents, ``ll_d`` the sum of its targets'
    log-probabilities under document ``d``. With ``known`` pairs (generation's own (hypothesis, document)
    log-likelihoods) the projections run position by position and stop where they cannot change the
    output. Each not-yet-projected log-probability is bounded from above (:func:`log_prob_upper_bounds`,
    at most 0), so a pair's partial sum plus its bounds bounds the pair, and complete pairs bound their
    candidate from below. A pair more than ``options.negligible`` nats below its candidate's lower bound
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
        options: Pruning thresholds, budgets and the trace.
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
        options: DecodingOptions | None = None,
    ) -> None:
        self.options = options if options is not None else DecodingOptions()
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
        self.prune = options.prune_scoring and epsilon == 0 and bool(self.complete.any())
        self.dead = torch.zeros_like(self.complete)  # negligible pairs
        self.out = torch.zeros(self.num_candidates, dtype=torch.bool, device=self.device)  # never returned
        self.settled = torch.zeros_like(self.out)  # the only candidate left in its question (keep == 1)
        # Candidates come grouped by question: slot = place within its question, for per-question tables.
        sizes = torch.bincount(question)
        starts = torch.cumsum(sizes, 0) - sizes
        self.slot = torch.arange(len(question), device=self.device) - starts[question]
        self.table_shape = (len(sizes), int(sizes.max()) if len(sizes) else 0)
        self.budget = options.scoring_budget(self.device)
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
            bound = log_prob_upper_bounds(
                self.generator, hidden, state, target, self.budget, self.options.probe_tokens
            )
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
        if self.options.trace is not None:
            self.options.trace.projected_rows += len(states)
        picked = torch.empty(len(members), dtype=torch.float32, device=self.device)
        sums = torch.empty_like(picked) if self.smooth is not None else None
        max_rows = max(1, self.budget // self.vocab)
        for first in range(0, len(states), max_rows):  # bounded logits
            log_probs = torch.log_softmax(
                _compat.project(self.generator, hidden[states[first : first + max_rows]]),
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
        self.dead |= ~self.complete & (terms < (lower - self.options.negligible).unsqueeze(1)).flatten()
        # Bounds and exact values are float sums of up to a few hundred terms, each rounded: a candidate is
        # ruled out only by a gap of more than ``margin`` nats plus 4 ulps of the head's dtype per unit of
        # score (the float32 rounding of ~100 terms is ~1e-5 nats).
        margin = self.options.margin + self.rounding * upper.abs()
        lowers = torch.full(self.table_shape, float("-inf"), device=self.device)
        lowers[self.question, self.slot] = lower  # (questions, most candidates)
        beaten_by = (lowers[self.question] > (upper + margin).unsqueeze(1)).sum(dim=1)
        self.out |= beaten_by >= self.keep
        if self.keep == 1:
            left = torch.zeros_like(self.question).index_add_(0, self.question, (~self.out).long())
            self.settled |= ~self.out & left[self.question].eq(1) & lower.isfinite()


def thorough_scores(
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
    search: StepStates | None = None,
    options: DecodingOptions | None = None,
    fast_path: bool = True,
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
            exact score (see :class:`CandidateScores`).
        known: `(num_candidates, n_docs)` log-likelihoods of (candidate, document) pairs that generation
            computed already, nan elsewhere.
        cross_attention: Per decoder layer, the contexts' cross-attention keys and values, if computed
            already (the packed path reuses them).
        search: What generation recorded: targets whose prefix it expanded under a document are taken
            from there (see :func:`expanded_prefix_log_probs`).
        options: Paths, budgets and pruning thresholds (defaults: ``DecodingOptions()``).
        fast_path: Whether the packed path (hooks on the generator's modules) may be used.

    Returns:
        `(num_candidates,)` float32 scores, higher is better; -inf for candidates certainly not returned.
    """
    generator = model.generator
    pad = model.config.generator.pad_token_id
    epsilon = float(getattr(model.config, "label_smoothing", 0.0) or 0.0)
    n_docs = doc_logprobs.shape[1]
    full_length = sequences.shape[1]
    device = sequences.device
    options = options if options is not None else DecodingOptions()
    if share_cross_attention is None:
        share_cross_attention = options.share_cross_attention
    if share_cross_attention is None:
        share_cross_attention = device.type != "cuda"

    candidates = sequences[candidate_rows]
    if not bool(candidates[:, 0].eq(candidates[0, 0]).all()):
        raise ValueError(
            "RAG-Sequence scoring expects every hypothesis to start with the decoder start token."
        )
    target, counted, has_prior = sequence_target_rules(candidates, pad, use_bos[candidate_question])
    # Columns after a candidate's last non-pad target are never needed (the decoder is causal).
    nonpad = target.ne(pad)
    needed = torch.where(nonpad.any(1), full_length - nonpad.flip(1).int().argmax(1), 1)
    prior = doc_logprobs[candidate_question] * has_prior.unsqueeze(1)  # (candidates, n_docs)
    # Last position whose target counts.
    last = torch.where(counted.any(1), full_length - 1 - counted.flip(1).int().argmax(1), -1)
    head = generator.get_output_embeddings()
    vocab = int(getattr(head, "out_features", None) or generator.config.vocab_size)

    expanded = None
    if search is not None and epsilon == 0 and options.reuse_expanded_prefixes:
        expanded = expanded_prefix_log_probs(search, candidates, candidate_question, target, counted, n_docs)

    def scoring(base: torch.Tensor, smooth_base: torch.Tensor | None, start: int) -> CandidateScores:
        return CandidateScores(
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
            options=options,
        )

    positions_module = packed_scoring_positions(generator, device, options) if fast_path else None
    if positions_module is not None:
        packed = packed_thorough_scores(
            model,
            positions_module,
            encoder_states,
            context_attention_mask,
            scoring(torch.zeros_like(prior), None, 0),
            candidates,
            candidate_question,
            counted,
            target,
            needed,
            options,
            cross_attention,
        )
        if options.trace is not None:
            options.trace.packed.append(packed is not None)
        if packed is not None:
            return packed
    prefixes = prefix_ids(candidates.tolist(), candidate_question.tolist()).to(device)
    prefix_count = int(prefixes.max()) + 1

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
        cache_layers = _compat.cache_layers(_compat.output_cache(first))
        per_row = sum(k[0].numel() + v[0].numel() for _, _, k, v in cache_layers)
    else:
        per_row = encoder_states[0].numel()
    del first

    # Chunks of whole questions, so that equal prefixes of a question share decoder states; sized by the
    # cross-attention inputs copied per row (projection comes later, in bounded rounds).
    budget = options.scoring_budget(device)
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
    cache_key = _compat.cache_argument_name(generator)
    selector = _compat.HeadRowSelector(owned_by_this_call(), capture=True)
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
            row_ll = first_ll.masked_fill(~counted[chunk, 0].repeat_interleave(n_docs), 0.0)
            row_smooth = first_smooth[contexts].masked_fill(pad_target[:, 0], 0.0) if epsilon > 0 else None

            if length > 1:
                width = length - offset  # decoder positions run in this pass
                later = ~pad_target[:, 1:]  # (rows, length - 1): targets 1.. that are scored
                # One vocabulary projection per distinct (context, prefix): equal prefixes share hidden states.
                keys = contexts.unsqueeze(1) * prefix_count + prefixes[chunk, 1:length].repeat_interleave(
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
                    cache = _compat.encoder_decoder_cache(
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
                    use_cache=share_cross_attention,
                    **{cache_key: cache},
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
