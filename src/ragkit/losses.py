"""RAG's marginalized training losses as pure tensor functions, computed without vocabulary-sized copies.

Both losses score ``target[:, 1:]`` (the decoder is fed the target, so position ``t`` predicts ``t + 1``)
and give the numbers of Transformers' ``get_nll``, computed in float32 (float64 for float64 logits, as the
reference computes in the model's dtype), with two differences (docs/modeling.md):
a RAG-Sequence row whose labels are all ignored (padding or -100) contributes 0 instead of
``-log(n_docs)``, and -100 labels are read as padding.

The reference builds a float32 log-softmax of the `(batch_size * n_docs, length, vocab)` logits, a second
copy with the document prior added, and several more of that size in the backward pass. Here the
forward pass keeps only per-position scalars (the log-normalizer, the target's logit, the sum of the
logits) and the backward pass writes the gradient of the logits once, in place, one chunk of positions
at a time. RAG-Token's smoothing term needs the document mixture ``m(v) = sum_d p(d) p_d(v)`` at every
vocabulary entry: it is formed, one question and a few positions at a time, from the exponentials the
log-normalizer computes anyway (``n_docs`` exponentials and one log per entry), with the exact
log-sum-exp over documents as the fallback where ``m`` underflows in float32. Exponentials are taken
as ``exp2``, which is about twice as fast as ``exp`` on CPU.

Shapes: ``batch_size`` questions with ``n_docs`` documents each; logits rows are document-major within
a question (rows ``i * n_docs ... (i + 1) * n_docs - 1`` belong to question ``i``).
"""

from __future__ import annotations

import torch

__all__ = [
    "IGNORE_INDEX",
    "compute_dtype",
    "rag_sequence_nll",
    "rag_token_nll",
    "replace_ignore_index",
    "sequence_target_rules",
    "shift_targets_left",
    "smoothed_loss",
]

#: The label value that means "not scored" (PyTorch's and Transformers' convention).
IGNORE_INDEX = -100

#: Float32 elements of vocabulary-sized work per chunk (about 16 MiB): bounds the temporaries.
_CHUNK_ELEMENTS = 1 << 22
#: Float32 elements of a buffer meant to stay in cache (about 1 MiB).
_CACHE_ELEMENTS = 1 << 18
#: ``log2(e)``: ``exp(x) == exp2(x * _LOG2E)``.
_LOG2E = 1.4426950408889634
#: The smallest normal float32: below it a sum of exponentials has lost relative precision.
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype RAG's scores, log-probabilities and losses are computed in for ``tensor``'s values.

    float32 for float32 and the narrower floats (bfloat16, float16: their log-softmax would lose the
    small probabilities), float64 for float64 (the precision the reference keeps).

    Args:
        tensor: Logits or scores (any float dtype).

    Returns:
        ``torch.promote_types(tensor.dtype, torch.float32)``.
    """
    return torch.promote_types(tensor.dtype, torch.float32)


def replace_ignore_index(labels: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Map the -100 'ignore' label to the pad token, which RAG's losses mask.

    Args:
        labels: `(batch_size, target_length)` label ids.
        pad_token_id: The generator's pad token; labels are returned unchanged when None.

    Returns:
        `(batch_size, target_length)` labels without -100 (the same tensor when there was none).
    """
    if pad_token_id is None or not bool((labels == IGNORE_INDEX).any()):
        return labels
    return labels.masked_fill(labels == IGNORE_INDEX, pad_token_id)


def shift_targets_left(target: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``target[:, 1:]`` right-padded to full length: the tokens the decoder fed ``target`` predicts.

    Args:
        target: `(batch_size, target_length)` decoder inputs (labels).
        pad_token_id: Fills the last column.

    Returns:
        `(batch_size, target_length)` targets of each position.
    """
    return torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), pad_token_id)], 1)


def sequence_target_rules(
    sequences: torch.Tensor, pad: int, exclude_leading_bos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RAG-Sequence loss rules for decoder sequences, as Transformers' ``get_nll`` applies them.

    A sequence ``y`` (decoder start token first) scores, under document ``d``,
    ``log p(d|x) * [target 1 is not pad] + sum_t log p(target_t | y_<=t, d) * counted_t``, where
    ``target_t = y_{t+1}``, ``counted_t`` is false for pad targets and, where ``exclude_leading_bos``, for
    target 0 (the BOS after the decoder start). The document prior sits on the second target token and is
    lost with it when that token is a pad. The score is ``logsumexp_d`` of those terms. With label
    smoothing ``eps``, it is ``(1 - eps) * that + eps / vocab * logsumexp_d(vocab * log p(d|x) + sum over
    non-pad targets (BOS included) of the sum over the vocabulary of the log-probabilities)``.

    Args:
        sequences: `(rows, tgt_len)` decoder sequences, decoder start token first, right-padded.
        pad: The generator's pad token id.
        exclude_leading_bos: `(rows,)` bool, whether each row's target 0 is left out.

    Returns:
        `(rows, tgt_len)` targets (pad after the end), `(rows, tgt_len)` bool counted targets, and
        `(rows,)` bool whether the document prior is added.
    """
    target = shift_targets_left(sequences, pad)
    nonpad = target.ne(pad)
    counted = nonpad.clone()
    counted[:, 0] &= ~exclude_leading_bos
    has_prior = nonpad[:, 1] if target.shape[1] > 1 else torch.zeros_like(nonpad[:, 0])
    return target, counted, has_prior


def smoothed_loss(
    nll_loss: torch.Tensor, smooth_loss: torch.Tensor, epsilon: float, vocab_size: int, reduce_loss: bool
) -> torch.Tensor:
    """Label-smoothed loss ``(1 - epsilon) * nll + epsilon / vocab_size * smooth``, as the reference mixes them.

    Args:
        nll_loss: `(batch_size,)` negative log-likelihoods.
        smooth_loss: `(batch_size,)` negated sums of log-probabilities over the vocabulary.
        epsilon: Label smoothing.
        vocab_size: Size of the vocabulary.
        reduce_loss: Sum over the batch.

    Returns:
        `(batch_size,)`, or a scalar with ``reduce_loss``.
    """
    if reduce_loss:
        nll_loss = nll_loss.sum()
        smooth_loss = smooth_loss.sum()
    return (1.0 - epsilon) * nll_loss + (epsilon / vocab_size) * smooth_loss


def _chunks(total: int, step: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``step`` over ``range(total)``."""
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _rows_per_chunk(vocab: int) -> int:
    """Rows of a vocabulary-wide float32 buffer that fit in about ``_CACHE_ELEMENTS``."""
    return max(1, _CACHE_ELEMENTS // vocab)


def _scored_lengths(scored: torch.Tensor) -> list[int]:
    """Per row of `(rows, length)` bool ``scored``: one past its last scored position (0 when none is)."""
    positions = torch.arange(1, scored.shape[1] + 1, device=scored.device)
    return (scored * positions).amax(dim=1).tolist() if scored.numel() else [0] * scored.shape[0]


def _exp_difference(values: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp(values - shift)`` written into ``out`` (returned; float32 or float64), whatever ``values``' dtype.

    As ``exp2((values - shift) * log2(e))``: on CPU ``exp2`` takes about half the time of ``exp``.
    """
    return torch.sub(values, shift, out=out).mul_(_LOG2E).exp2_()


def _log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """`(positions,)` ``logsumexp`` of `(positions, vocab)` logits, a few rows at a time, in
    :func:`compute_dtype` (float32 unless the logits are float64).

    ``torch.logsumexp`` allocates logits-sized temporaries; a reused, cache-sized buffer is about twice
    as fast on CPU and needs no memory of the logits' size.
    """
    positions, vocab = logits.shape
    rows = _rows_per_chunk(vocab)
    dtype = compute_dtype(logits)
    lse = logits.new_empty((positions,), dtype=dtype)
    scratch = logits.new_empty((min(rows, positions), vocab), dtype=dtype)
    for start, stop in _chunks(positions, rows):
        chunk = logits[start:stop]
        peak = chunk.amax(dim=1, keepdim=True).to(dtype)
        buffer = scratch[: stop - start]
        lse[start:stop] = _exp_difference(chunk, peak, buffer).sum(dim=1).log_().add_(peak.squeeze(1))
    return lse


# --------------------------------------------------------------------------------------------------
# Token log-probabilities (RAG-Sequence)
# --------------------------------------------------------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    """Per position: ``log softmax(logits)[target]`` and ``sum_v log softmax(logits)[v]``, without the softmax.

    Forward: `(positions, vocab)` logits (any float dtype, contiguous) and `(positions,)` targets -> two
    `(positions,)` tensors in :func:`compute_dtype` (float32 unless the logits are float64). The
    log-normalizer is computed a few rows at a time in a reused buffer that stays in cache; the backward
    pass writes the logits' gradient once, in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, with_sum: bool):
        vocab = logits.shape[1]
        lse = _log_normalizer(logits)
        dtype = lse.dtype
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, target, lse)
        ctx.with_sum = with_sum
        if not with_sum:
            return picked - lse, torch.zeros_like(lse)
        total = logits.sum(dim=1, dtype=dtype)
        # sum_v (logit_v - lse): the large cancellation is done in float64.
        return picked - lse, (total.double() - vocab * lse.double()).to(dtype)

    @staticmethod
    def backward(ctx, grad_token: torch.Tensor, grad_sum: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        positions, vocab = logits.shape
        dtype = lse.dtype
        grad_token = grad_token.to(dtype)
        # d/dlogits of logp[y] is onehot(y) - softmax; of sum_v logp[v] it is 1 - vocab * softmax.
        weight = grad_token
        if ctx.with_sum:
            grad_sum = grad_sum.to(dtype)
            weight = grad_token + vocab * grad_sum
        grad_logits = torch.empty_like(logits)
        in_place = logits.dtype == dtype
        scratch = None if in_place else logits.new_empty((_rows_per_chunk(vocab), vocab), dtype=dtype)
        for start, stop in _chunks(positions, _rows_per_chunk(vocab)):
            out = grad_logits[start:stop] if in_place else scratch[: stop - start]
            _exp_difference(logits[start:stop], lse[start:stop, None], out).mul_(-weight[start:stop, None])
            if ctx.with_sum:
                out.add_(grad_sum[start:stop, None])
            out.scatter_add_(1, target[start:stop, None], grad_token[start:stop, None])
            if not in_place:
                grad_logits[start:stop] = out
        return grad_logits, None, None


def _token_logprobs(
    seq_logits: torch.Tensor, target: torch.Tensor, n_docs: int, with_sum: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch_size, n_docs, length)` log-probabilities of the targets under each document, and their sums
    over the vocabulary (zeros without ``with_sum``), from `(batch_size * n_docs, length, vocab)` logits."""
    rows, length, vocab = seq_logits.shape
    rows_target = target.repeat_interleave(n_docs, dim=0).reshape(-1)  # each question's target per document
    token_lp, sum_lp = _TokenLogProbs.apply(seq_logits.reshape(-1, vocab), rows_target, with_sum)
    shape = (rows // n_docs, n_docs, length)
    return token_lp.view(shape), sum_lp.view(shape)


# --------------------------------------------------------------------------------------------------
# Document-marginalized log-probabilities (RAG-Token)
# --------------------------------------------------------------------------------------------------


def _question_chunks(stops: list[int], step: int) -> list[tuple[int, int, int]]:
    """``(question, start, stop)`` ranges of ``step`` positions over each question's ``range(stops[i])``."""
    return [(row, start, stop) for row, end in enumerate(stops) for start, stop in _chunks(end, step)]


def _mixture_chunk_positions(n_docs: int, vocab: int, device: torch.device) -> int:
    """Positions of one question per RAG-Token chunk (``n_docs * vocab`` float32 elements each).

    On CPU a chunk holds about four cache-sized buffers: it and the backward pass's scratch stay in the
    last-level cache, so only the first of the passes over the logits reads memory, and the Python
    overhead per chunk is shared by several positions (one position per chunk is about 10 % slower).
    Elsewhere chunks hold about ``_CHUNK_ELEMENTS``: few kernel launches.
    """
    budget = 4 * _CACHE_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS
    return max(1, budget // (n_docs * vocab))


def _exact_mixture_sum(logits: torch.Tensor, lse: torch.Tensor, doc_logprobs: torch.Tensor) -> torch.Tensor:
    """Scalar ``sum_v log sum_d p(d) p_d(v)`` of one position by log-sum-exp over documents (exact at any
    logits), from its `(n_docs, vocab)` logits, `(n_docs,)` log-normalizers and document log-priors."""
    joint = (logits.to(lse.dtype) - lse[:, None]).add_(doc_logprobs[:, None])
    return torch.logsumexp(joint, dim=0).sum()


def _exact_mixture_grad(
    logits: torch.Tensor,
    lse: torch.Tensor,
    doc_logprobs: torch.Tensor,
    target: int,
    weight_token: torch.Tensor,
    grad_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One position's `(n_docs, vocab)` logits gradient (in ``lse``'s dtype) and `(n_docs,)` ``sum_v r_d(v)``,
    computed in log space (exact at any logits), from its `(n_docs, vocab)` logits, `(n_docs,)`
    log-normalizers, document log-priors and token weights (upstream gradient times the posterior given the
    target) and the upstream gradient of ``sum_v log m(v)``."""
    logprobs = logits.to(lse.dtype) - lse[:, None]
    softmax = logprobs.exp()
    joint = logprobs.add_(doc_logprobs[:, None])
    # Posterior of each document at every v: p(d) p_d(v) / sum_d' p(d') p_d'(v).
    responsibility = joint.sub_(torch.logsumexp(joint, dim=0, keepdim=True)).exp_()
    mass = responsibility.sum(dim=1)
    grad = responsibility.mul_(grad_sum).sub_(softmax.mul_((weight_token + grad_sum * mass)[:, None]))
    grad[:, target] += weight_token
    return grad, mass


class _MarginalLogProbs(torch.autograd.Function):
    """Per position: ``log sum_d p(d) p_d(target)`` and ``sum_v log sum_d p(d) p_d(v)``.

    Forward: `(batch_size, n_docs, length, vocab)` logits (any float dtype), `(batch_size, n_docs)`
    document log-priors, `(batch_size, length)` targets and `(batch_size, length)` bool scored positions
    -> two `(batch_size, length)` tensors in :func:`compute_dtype` (float32 unless the logits are float64),
    0 at unscored positions (which get no gradient);
    positions after a question's last scored one are not computed at all.

    The mixture ``m(v) = sum_d p(d) p_d(v)`` is formed from the normalizer's exponentials, one question
    and a few positions at a time (a chunk that stays in cache on CPU): ``e_d(v) = exp(logit_d(v) -
    max_d)``, ``S_d = sum_v e_d(v)``, ``m(v) = sum_d (p(d) / S_d) e_d(v)``, so each v costs ``n_docs``
    exponentials and one log, and no log-sum-exp over documents. The backward pass recomputes ``p_d(v)``
    and takes the responsibilities ``r_d(v) = p(d) p_d(v) / m(v)`` from the same values, writing the
    gradient in place. Where ``m(v)`` falls below float32's smallest normal number (a vocabulary entry
    about 87 or more below every document's largest logit) it has lost relative precision or is 0: such
    a position is computed again by log-sum-exp over documents (``_exact_mixture_*``).
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, doc_logprobs: torch.Tensor, target: torch.Tensor, scored: torch.Tensor
    ):
        batch_size, n_docs, length, vocab = logits.shape
        stops = _scored_lengths(scored)
        step = min(_mixture_chunk_positions(n_docs, vocab, logits.device), max(stops, default=1) or 1)
        dtype = compute_dtype(logits)
        prior = doc_logprobs.to(dtype)  # (batch_size, n_docs)
        lse = logits.new_zeros((batch_size, n_docs, length), dtype=dtype)
        total = logits.new_zeros((batch_size, length), dtype=dtype)
        lowest = logits.new_ones((batch_size, length), dtype=dtype)  # smallest m(v) per position
        scratch = logits.new_empty((n_docs * step * vocab,), dtype=dtype)
        for row, start, stop in _question_chunks(stops, step):
            chunk = logits[row, :, start:stop]  # (n_docs, positions, vocab)
            peak = chunk.amax(dim=-1, keepdim=True).to(dtype)
            exps = _exp_difference(chunk, peak, scratch[: chunk.numel()].view(chunk.shape))
            log_norm = exps.sum(dim=-1).log_()  # (n_docs, positions): log S_d
            lse[row, :, start:stop] = log_norm + peak.squeeze(-1)
            weight = (prior[row, :, None] - log_norm).exp_()  # p(d) / S_d
            mixture = torch.matmul(weight.T.unsqueeze(1), exps.transpose(0, 1))  # (positions, 1, vocab)
            lowest[row, start:stop] = mixture.amin(dim=-1).squeeze(-1)
            total[row, start:stop] = mixture.log_().sum(dim=-1).squeeze(-1)
        for row, position in (lowest < _FLOAT32_TINY).nonzero().tolist():
            total[row, position] = _exact_mixture_sum(
                logits[row, :, position], lse[row, :, position], prior[row]
            )
        index = target[:, None, :, None].expand(-1, n_docs, -1, 1)
        picked = logits.gather(-1, index).squeeze(-1).to(dtype)
        token_joint = picked - lse + prior[:, :, None]  # (batch_size, n_docs, length): log p(d) p_d(target)
        token_lp = torch.logsumexp(token_joint, dim=1).masked_fill_(~scored, 0.0)
        ctx.save_for_backward(logits, doc_logprobs, target, scored, lse, token_joint)
        ctx.stops, ctx.step = stops, step  # the backward pass walks the same chunks
        return token_lp, total.masked_fill_(~scored, 0.0)

    @staticmethod
    def backward(ctx, grad_token: torch.Tensor | None, grad_sum: torch.Tensor | None):
        logits, doc_logprobs, target, scored, lse, token_joint = ctx.saved_tensors
        batch_size, n_docs, length, vocab = logits.shape
        stops, step = ctx.stops, ctx.step
        dtype = lse.dtype
        grad_token = grad_token.to(dtype) if grad_token is not None else lse.new_zeros((batch_size, length))
        grad_sum = grad_sum.to(dtype) if grad_sum is not None else lse.new_zeros((batch_size, length))
        grad_token = grad_token.masked_fill(~scored, 0.0)
        grad_sum = grad_sum.masked_fill(~scored, 0.0)
        # Posterior of each document given the target token: the weight of its log-softmax gradient.
        posterior = (token_joint - torch.logsumexp(token_joint, dim=1, keepdim=True)).exp()
        weight_token = grad_token[:, None, :] * posterior  # (batch_size, n_docs, length)
        prior = doc_logprobs.to(dtype)
        prior_prob = prior.exp()
        mass = lse.new_zeros((batch_size, n_docs, length))  # sum_v r_d(v), the prior's share of the sum
        lowest = lse.new_ones((batch_size, length))
        grad_logits = torch.empty_like(logits)
        in_place = logits.dtype == dtype
        elements = n_docs * step * vocab
        factor_scratch = logits.new_empty((elements,), dtype=dtype)
        scratch = None if in_place else logits.new_empty((elements,), dtype=dtype)
        for row, start, stop in _question_chunks(stops, step):
            chunk = logits[row, :, start:stop]  # (n_docs, positions, vocab)
            out = grad_logits[row, :, start:stop] if in_place else scratch[: chunk.numel()].view(chunk.shape)
            probs = _exp_difference(chunk, lse[row, :, start:stop, None], out)  # p_d(v)
            docs = probs.transpose(0, 1)  # (positions, n_docs, vocab)
            mixture = torch.matmul(prior_prob[row].view(1, 1, n_docs).expand(stop - start, 1, n_docs), docs)
            lowest[row, start:stop] = mixture.amin(dim=-1).squeeze(-1)
            inverse = mixture.reciprocal_()  # (positions, 1, vocab): 1 / m(v)
            ratio_sum = torch.matmul(docs, inverse.transpose(1, 2)).squeeze(-1)  # (positions, n_docs)
            chunk_mass = ratio_sum.T * prior_prob[row, :, None]  # (n_docs, positions): sum_v r_d(v)
            mass[row, :, start:stop] = chunk_mass
            g_sum = grad_sum[row, start:stop]
            w_token = weight_token[row, :, start:stop]  # (n_docs, positions)
            # d/dlogits_d(v) = g_sum r_d(v) - p_d(v) (w_token + g_sum sum_v' r_d(v')) + w_token [v = target]
            #               = p_d(v) (g_sum p(d) / m(v) - w_token - g_sum sum_v' r_d(v')) + w_token [v = target].
            factor = factor_scratch[: chunk.numel()].view(chunk.shape)
            torch.mul(inverse.transpose(0, 1), (g_sum * prior_prob[row, :, None]).unsqueeze(-1), out=factor)
            probs.mul_(factor.sub_((w_token + g_sum * chunk_mass).unsqueeze(-1)))
            index = target[row, start:stop].expand(n_docs, -1).unsqueeze(-1)
            probs.scatter_add_(-1, index, w_token.unsqueeze(-1))
            if not in_place:
                grad_logits[row, :, start:stop] = probs
        for row, stop in enumerate(stops):
            grad_logits[row, :, stop:] = 0.0
        for row, position in (lowest < _FLOAT32_TINY).nonzero().tolist():
            grad, mass[row, :, position] = _exact_mixture_grad(
                logits[row, :, position],
                lse[row, :, position],
                prior[row],
                int(target[row, position]),
                weight_token[row, :, position],
                grad_sum[row, position],
            )
            grad_logits[row, :, position] = grad
        grad_prior = weight_token.sum(dim=2) + (grad_sum[:, None, :] * mass).sum(dim=2)
        return grad_logits, grad_prior.to(doc_logprobs.dtype), None, None


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def rag_sequence_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    pad_token_id: int,
    bos_token_id: int | None = None,
    n_docs: int | None = None,
    reduce_loss: bool = False,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
) -> torch.Tensor:
    """RAG-Sequence negative log-likelihood: ``-log sum_d p(d) prod_t p_d(y_t)`` per question.

    The rules are the reference's: ``target[:, 1:]`` is scored; padding positions count 0; the document
    prior enters at the second scored position (and is lost with it when that position is padding);
    with ``exclude_bos_score`` the first scored position is left out when it is ``bos_token_id`` in every
    row; label smoothing mixes in ``-log sum_d exp(sum_t (sum_v log p_d(v) + vocab * [t = 1] log p(d)))``.
    Unlike the reference, a row with no scored token (all labels ignored) has loss 0, not ``-log(n_docs)``.

    Args:
        seq_logits: `(batch_size * n_docs, target_length, vocab_size)` generator logits (any float dtype).
        doc_scores: `(batch_size, n_docs)` document scores (the prior is their softmax).
        target: `(batch_size, target_length)` decoder inputs; -100 is read as padding.
        pad_token_id: The generator's pad token.
        bos_token_id: The BOS token ``exclude_bos_score`` looks for (None: never excluded).
        n_docs: Documents per question; defaults to ``seq_logits.shape[0] // batch_size``.
        reduce_loss: Sum over the batch.
        epsilon: Label smoothing.
        exclude_bos_score: Leave the BOS token's score out.

    Returns:
        `(batch_size,)` losses in :func:`compute_dtype` (float32, or float64 for float64 logits), or a
        scalar with ``reduce_loss``.
    """
    batch_size = doc_scores.shape[0]
    n_docs = n_docs if n_docs is not None else seq_logits.shape[0] // batch_size
    decoder_inputs = replace_ignore_index(target, pad_token_id).to(seq_logits.device)
    target = shift_targets_left(decoder_inputs, pad_token_id)
    vocab_size = seq_logits.shape[-1]
    use_bos = bos_token_id is not None and bool(target[:, 0].eq(bos_token_id).all())
    with_sum = epsilon != 0.0

    token_lp, sum_lp = _token_logprobs(seq_logits, target, n_docs, with_sum)
    dtype = compute_dtype(seq_logits)
    doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, dtype), dim=1)  # (batch_size, n_docs)

    exclude = torch.full((target.shape[0],), exclude_bos_score and use_bos, device=target.device)
    _, scored, has_prior = sequence_target_rules(decoder_inputs, pad_token_id, exclude)
    prior = doc_logprobs * has_prior[:, None]  # (batch_size, n_docs)
    ll = (token_lp * scored[:, None, :].to(token_lp.dtype)).sum(dim=2) + prior
    # A row with nothing to score has probability 1, loss 0 (a log-sum-exp over n_docs zeros, as the
    # reference takes, would give -log(n_docs) and lower the batch's loss).
    nll_loss = (-ll.logsumexp(dim=1)).masked_fill(~scored.any(dim=1), 0.0)
    if with_sum:
        not_pad = target.ne(pad_token_id)
        smooth = (sum_lp * not_pad[:, None, :].to(sum_lp.dtype)).sum(dim=2) + vocab_size * prior
        smooth_loss = (-smooth.logsumexp(dim=1)).masked_fill(~not_pad.any(dim=1), 0.0)
    else:
        smooth_loss = torch.zeros_like(nll_loss)
    return smoothed_loss(nll_loss, smooth_loss, epsilon, vocab_size, reduce_loss)


def rag_token_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.Tensor,
    pad_token_id: int,
    n_docs: int | None = None,
    reduce_loss: bool = False,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """RAG-Token negative log-likelihood: ``-sum_t log sum_d p(d) p_d(y_t)`` per question.

    ``target[:, 1:]`` is scored and padding positions count 0, as in the reference; label smoothing
    mixes in ``-sum_t sum_v log sum_d p(d) p_d(v)``.

    Args:
        seq_logits: `(batch_size * n_docs, target_length, vocab_size)` generator logits (any float dtype).
        doc_scores: `(batch_size, n_docs)` document scores (the prior is their softmax).
        target: `(batch_size, target_length)` decoder inputs; -100 is read as padding.
        pad_token_id: The generator's pad token.
        n_docs: Documents per question; defaults to ``seq_logits.shape[0] // batch_size``.
        reduce_loss: Sum over the batch.
        epsilon: Label smoothing.

    Returns:
        `(batch_size,)` losses in :func:`compute_dtype` (float32, or float64 for float64 logits), or a
        scalar with ``reduce_loss``.
    """
    batch_size = doc_scores.shape[0]
    n_docs = n_docs if n_docs is not None else seq_logits.shape[0] // batch_size
    decoder_inputs = replace_ignore_index(target, pad_token_id).to(seq_logits.device)
    target = shift_targets_left(decoder_inputs, pad_token_id)
    vocab_size = seq_logits.shape[-1]
    scored = target.ne(pad_token_id)
    doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, compute_dtype(seq_logits)), dim=1)
    if epsilon == 0.0:
        # Without smoothing only the targets' probabilities are mixed: per-document scalars, no vocabulary.
        doc_token_lp, _ = _token_logprobs(seq_logits, target, n_docs, False)
        token_lp = torch.logsumexp(doc_token_lp + doc_logprobs[:, :, None], dim=1)
        sum_lp = torch.zeros_like(token_lp)
    else:
        logits = seq_logits.reshape(batch_size, n_docs, -1, vocab_size)
        token_lp, sum_lp = _MarginalLogProbs.apply(logits, doc_logprobs, target, scored)
    weight = scored.to(token_lp.dtype)
    nll_loss = -(token_lp * weight).sum(dim=1)
    smooth_loss = -(sum_lp * weight).sum(dim=1)
    return smoothed_loss(nll_loss, smooth_loss, epsilon, vocab_size, reduce_loss)
