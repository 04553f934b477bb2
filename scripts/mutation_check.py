#!/usr/bin/env python
"""Mutation check of ragkit's core math: plant one realistic bug at a time, see whether the tests notice.

Each mutant in ``MUTANTS`` names an exact source snippet, its replacement and the fast test files that
should catch it. For every mutant the script copies ``src/`` to a temporary directory, applies the edit
there (the working tree is never touched), puts the copy first on ``PYTHONPATH`` and runs

    python -m pytest -q -x -p no:cacheprovider <the mutant's tests>

with a timeout. A failing run means the mutant was *killed*; a passing run means it *survived*: the
tests would not notice that bug. Snippets are looked up in every ``.py`` file under ``src/ragkit/``, so a
function may move between modules; a snippet found nowhere (or in more than one place) is reported as
*stale*: update the table.

Exit status: 0 when every mutant was killed or survived with a written ``reason``; 1 when a mutant
survived without one, is stale or timed out; 2 when the unmutated tests fail (the baseline) or the setup
is broken.

Usage (from the repository root, in the project's virtual environment):

    python scripts/mutation_check.py                 # baseline, then every mutant
    python scripts/mutation_check.py --list          # the table
    python scripts/mutation_check.py --only seq-exclude-bos-ignored trainer-accumulation-divisor
    python scripts/mutation_check.py --no-baseline --timeout 300 --json results.json

See docs/testing.md for how to add a mutant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "ragkit"

# Test selections, named once: several mutants share them. Only fast unit tests: each mutant's
# selection runs in well under a minute when nothing fails.
LOSSES = "tests/test_losses.py"
LOSS_PARITY = "tests/modeling/test_loss_parity.py"
MARGINALIZE_GRADIENTS = (
    "tests/modeling/test_loss_parity.py::test_marginalized_logits_have_the_reference_gradients"
)
PARITY = "tests/modeling/test_modeling_parity.py"
TOKEN_DECODING = "tests/generation/test_rag_token.py"
THOROUGH = "tests/generation/test_rag_sequence.py::test_thorough_matches_reference"
CUSTOM_INDEX = "tests/retrieval/test_custom_index.py"
TRAINING_LOOP = "tests/finetuning/test_training_loop.py"
ACCUMULATION = "tests/finetuning/test_training_loop.py::test_accumulation_gives_the_unaccumulated_steps"
TRAINING_ARGUMENTS = "tests/finetuning/test_training_arguments.py"
PARTIAL_CHUNKS = "tests/test_mutation_kills_partial_chunks.py"
RETRIEVAL_CHUNKS = "tests/retrieval/test_mutation_kills_retrieval_chunks.py"
MAX_COMBINED_FLAG = "tests/finetuning/test_mutation_kills_max_combined_length.py"
PROBE_HOOKS = "tests/generation/test_probe_hooks.py"
STAND_IN = "tests/generation/test_stand_in.py"
NO_COPY_PER_BEAM_ROW = (
    "tests/generation/test_memory.py::test_shared_search_makes_no_encoder_states_per_beam_row"
)


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    Attributes:
        name: Short unique id (``area-what``).
        where: ``file: function`` the bug was written for, for the report; the snippet search decides
            where it is planted, so a function that moved to another module is still found.
        edits: ``(snippet, replacement)`` pairs; each snippet must occur exactly once under ``src/ragkit/``.
        tests: Test files or node ids that should catch it (few and fast); a leading ``?`` marks one
            that is run only when its file exists.
        reason: Why surviving is accepted; set only for mutants the tests cannot or need not kill.
    """

    name: str
    where: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    reason: str | None = None
    description: str = ""


def _m(name, where, description, edits, tests, reason=None) -> Mutant:
    return Mutant(name, where, tuple(edits), tuple(tests), reason, description)


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ RAG-Sequence loss
    _m(
        "seq-exclude-bos-ignored",
        "losses.py: rag_sequence_nll",
        "exclude_bos_score has no effect: the BOS target is always scored",
        [("exclude_bos_score and use_bos, device=target.device", "False, device=target.device")],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "seq-exclude-bos-any-row",
        "losses.py: rag_sequence_nll",
        "exclude_bos_score drops the first position when any row (not every row) starts with BOS",
        [
            (
                "bool(target[:, 0].eq(bos_token_id).all())",
                "bool(target[:, 0].eq(bos_token_id).any())",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "seq-doc-prior-dropped",
        "losses.py: rag_sequence_nll",
        "the document prior is left out of the sequence log-likelihood",
        [
            (
                "ll = (token_lp * scored[:, None, :].to(token_lp.dtype)).sum(dim=2) + prior",
                "ll = (token_lp * scored[:, None, :].to(token_lp.dtype)).sum(dim=2)",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-doc-softmax-axis",
        "losses.py: rag_sequence_nll",
        "document scores normalized over the batch instead of over documents",
        [
            (
                "doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, dtype), dim=1)  # (batch_size, n_docs)",
                "doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, dtype), dim=0)  # (batch_size, n_docs)",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-n-docs-reshape-order",
        "losses.py: _token_logprobs",
        "generator rows read as (n_docs, batch) instead of (batch, n_docs)",
        [
            (
                "return token_lp.view(shape), sum_lp.view(shape)",
                "return (\n        token_lp.view(n_docs, rows // n_docs, length).transpose(0, 1),\n"
                "        sum_lp.view(n_docs, rows // n_docs, length).transpose(0, 1),\n    )",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "loss-target-row-order",
        "losses.py: _token_logprobs",
        "each question's target repeated batch-major, so a row is scored against another question's target",
        [("rows_target = target.repeat_interleave(n_docs, dim=0)", "rows_target = target.repeat(n_docs, 1)")],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-max-instead-of-logsumexp",
        "losses.py: rag_sequence_nll",
        "the best document only instead of the marginal over documents",
        [("nll_loss = (-ll.logsumexp(dim=1))", "nll_loss = (-ll.max(dim=1).values)")],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-padding-scored",
        "losses.py: rag_sequence_nll",
        "padding positions count in the sequence log-likelihood",
        [
            (
                "counted = nonpad.clone()",
                "counted = torch.ones_like(nonpad)",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-logsumexp-over-positions",
        "losses.py: rag_sequence_nll",
        "sequence scores reduced with logsumexp over positions instead of a sum",
        [
            (
                "ll = (token_lp * scored[:, None, :].to(token_lp.dtype)).sum(dim=2) + prior",
                "ll = (token_lp * scored[:, None, :].to(token_lp.dtype)).logsumexp(dim=2) + prior",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "seq-smoothing-prior-unscaled",
        "losses.py: rag_sequence_nll",
        "label smoothing's term adds the document prior once instead of vocab_size times",
        [
            (
                "smooth = (sum_lp * not_pad[:, None, :].to(sum_lp.dtype)).sum(dim=2) + vocab_size * prior",
                "smooth = (sum_lp * not_pad[:, None, :].to(sum_lp.dtype)).sum(dim=2) + prior",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    # ------------------------------------------------------------------ fused gradients (RAG-Sequence)
    _m(
        "seq-grad-target-onehot-missing",
        "losses.py: _TokenLogProbs.backward",
        "the backward pass leaves out the target's one-hot term of the log-softmax gradient",
        [
            (
                "out.scatter_add_(1, target[start:stop, None], grad_token[start:stop, None])",
                "out.scatter_add_(1, target[start:stop, None], 0.0 * grad_token[start:stop, None])",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "seq-grad-smoothing-term-missing",
        "losses.py: _TokenLogProbs.backward",
        "with label smoothing, the gradient of the vocabulary sum misses its constant term",
        [("out.add_(grad_sum[start:stop, None])", "out.add_(0.0 * grad_sum[start:stop, None])")],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "loss-chunks-last-partial-dropped",
        "losses.py: _chunks",
        "the chunked log-normalizer and gradients skip the last, partial chunk of positions",
        [
            (
                "for start in range(0, total, step)]",
                "for start in range(0, max(1, total - step + 1), step)]",
            )
        ],
        [PARTIAL_CHUNKS, LOSSES],
    ),
    # ------------------------------------------------------------------ shared loss helpers
    _m(
        "loss-label-shift-missing",
        "losses.py: shift_targets_left",
        "targets not shifted: position t is scored against its own input token",
        [
            (
                "return torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), pad_token_id)], 1)",
                "return target",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "loss-label-shift-off-by-one",
        "losses.py: shift_targets_left",
        "targets shifted by two positions: each position is scored against the token after next",
        [
            (
                "return torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), pad_token_id)], 1)",
                "return torch.cat([target[:, 2:], target.new_full((target.shape[0], 2), pad_token_id)], 1)",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "loss-smoothing-weight",
        "losses.py: smoothed_loss",
        "label smoothing's per-token weight is epsilon instead of epsilon / vocab_size",
        [("+ (epsilon / vocab_size) * smooth_loss", "+ epsilon * smooth_loss")],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "loss-smoothing-nll-unweighted",
        "losses.py: smoothed_loss",
        "the NLL term is not down-weighted by 1 - epsilon",
        [("return (1.0 - epsilon) * nll_loss + ", "return nll_loss + ")],
        [LOSSES, LOSS_PARITY],
    ),
    # ------------------------------------------------------------------ RAG-Token marginalization and loss
    _m(
        "token-grad-branch-prior-detached",
        "modeling_rag.py: RagTokenForGeneration.marginalize",
        "with gradients on, the document prior is detached: no gradient reaches the question encoder",
        [
            (
                "if seq_logprobs.requires_grad:\n            seq_logprobs = seq_logprobs + doc_logprobs\n",
                "if seq_logprobs.requires_grad:\n            seq_logprobs = seq_logprobs + doc_logprobs.detach()\n",
            )
        ],
        [MARGINALIZE_GRADIENTS],
    ),
    _m(
        "token-grad-branch-prior-as-probability",
        "modeling_rag.py: RagTokenForGeneration.marginalize",
        "with gradients on, the prior is added as a probability instead of a log-probability",
        [
            (
                "if seq_logprobs.requires_grad:\n            seq_logprobs = seq_logprobs + doc_logprobs\n",
                "if seq_logprobs.requires_grad:\n            seq_logprobs = seq_logprobs + doc_logprobs.exp()\n",
            )
        ],
        [MARGINALIZE_GRADIENTS],
    ),
    _m(
        "token-no-grad-prior-dropped",
        "modeling_rag.py: RagTokenForGeneration.marginalize",
        "without gradients, the document prior is not added",
        [("seq_logprobs.add_(doc_logprobs)", "seq_logprobs.add_(torch.zeros_like(doc_logprobs))")],
        [PARITY],
    ),
    _m(
        "token-doc-softmax-axis",
        "modeling_rag.py: RagTokenForGeneration.marginalize",
        "document scores normalized over the batch instead of over documents",
        [
            (
                "doc_logprobs = torch.log_softmax(doc_scores.to(dtype), dim=1)[:, :, None, None]",
                "doc_logprobs = torch.log_softmax(doc_scores.to(dtype), dim=0)[:, :, None, None]",
            )
        ],
        [MARGINALIZE_GRADIENTS, PARITY],
    ),
    _m(
        "token-mean-instead-of-logsumexp",
        "modeling_rag.py: RagTokenForGeneration.marginalize",
        "documents averaged in log space instead of marginalized",
        [("return torch.logsumexp(seq_logprobs, dim=1)", "return seq_logprobs.mean(dim=1)")],
        [MARGINALIZE_GRADIENTS, PARITY],
    ),
    _m(
        "token-decoding-mixture-unweighted",
        "modeling_rag.py: _marginalize_probabilities",
        "decoding's mixture of softmaxes ignores the document prior (uniform weights)",
        [
            (
                "mixture = probs.mul_(doc_logprobs.exp().unsqueeze(-1)).sum(dim=1)",
                "mixture = probs.mean(dim=1)",
            )
        ],
        [TOKEN_DECODING],
    ),
    _m(
        "token-beam-doc-scores-order",
        "generation/rag_token.py: rag_token_generate",
        "beam search gives each hypothesis the document scores of the question it is tiled with, not its own",
        [
            (
                'model_kwargs["doc_scores"] = doc_scores.repeat_interleave(expand, dim=0)',
                'model_kwargs["doc_scores"] = doc_scores.repeat(expand, 1)',
            )
        ],
        [TOKEN_DECODING],
    ),
    _m(
        "token-loss-doc-softmax-axis",
        "losses.py: rag_token_nll",
        "the RAG-Token loss normalizes document scores over the batch instead of over documents",
        [
            (
                "doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, compute_dtype(seq_logits)), dim=1)\n"
                "    if epsilon",
                "doc_logprobs = torch.log_softmax(doc_scores.to(seq_logits.device, compute_dtype(seq_logits)), dim=0)\n"
                "    if epsilon",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "token-loss-prior-detached",
        "losses.py: rag_token_nll",
        "without smoothing, the RAG-Token loss detaches the document prior: the question encoder gets no gradient",
        [
            (
                "token_lp = torch.logsumexp(doc_token_lp + doc_logprobs[:, :, None], dim=1)",
                "token_lp = torch.logsumexp(doc_token_lp + doc_logprobs[:, :, None].detach(), dim=1)",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-padding-scored",
        "losses.py: rag_token_nll",
        "padding positions count in the RAG-Token log-likelihood",
        [
            (
                "scored = target.ne(pad_token_id)",
                "scored = torch.ones_like(target, dtype=torch.bool)",
            )
        ],
        [LOSSES, LOSS_PARITY, PARITY],
    ),
    _m(
        "token-grad-prior-missing",
        "losses.py: _MarginalLogProbs.backward",
        "with label smoothing, the fused RAG-Token backward returns no gradient for the document prior",
        [
            (
                "return grad_logits, grad_prior.to(doc_logprobs.dtype), None, None",
                "return grad_logits, None, None, None",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-grad-posterior-unnormalized",
        "losses.py: _MarginalLogProbs.backward",
        "the fused RAG-Token backward weighs documents by the joint, not the posterior given the target",
        [
            (
                "posterior = (token_joint - torch.logsumexp(token_joint, dim=1, keepdim=True)).exp()",
                "posterior = token_joint.exp()",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-grad-smoothing-prior-term-missing",
        "losses.py: _MarginalLogProbs.backward",
        "the smoothing term's gradient never reaches the document prior",
        [
            (
                "grad_prior = weight_token.sum(dim=2) + (grad_sum[:, None, :] * mass).sum(dim=2)",
                "grad_prior = weight_token.sum(dim=2) + 0.0 * (grad_sum[:, None, :] * mass).sum(dim=2)",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-grad-responsibility-mass-missing",
        "losses.py: _MarginalLogProbs.backward",
        "the smoothing term's gradient of the logits leaves out -p_d(v) sum_v' r_d(v')",
        [
            (
                "probs.mul_(factor.sub_((w_token + g_sum * chunk_mass).unsqueeze(-1)))",
                "probs.mul_(factor.sub_(w_token.unsqueeze(-1)))",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-mixture-prior-unnormalized",
        "losses.py: _MarginalLogProbs.forward",
        "the smoothing term mixes the exponentials with weights p(d), not p(d) / S_d (unnormalized p_d)",
        [
            (
                "weight = (prior[row, :, None] - log_norm).exp_()",
                "weight = prior[row, :, None].exp().expand_as(log_norm)",
            )
        ],
        [LOSSES, LOSS_PARITY],
    ),
    _m(
        "token-fallback-zero-only",
        "losses.py: _MarginalLogProbs.forward",
        "the forward pass recomputes only positions whose mixture is 0, not subnormal ones (imprecise logs)",
        [
            (
                "for row, position in (lowest < _FLOAT32_TINY).nonzero().tolist():\n            total[row, position]",
                "for row, position in (lowest <= 0.0).nonzero().tolist():\n            total[row, position]",
            )
        ],
        [LOSSES],
    ),
    _m(
        "token-fallback-backward-missing",
        "losses.py: _MarginalLogProbs.backward",
        "the backward pass never recomputes a position whose mixture underflows (infinite responsibilities)",
        [
            (
                "for row, position in (lowest < _FLOAT32_TINY).nonzero().tolist():\n            grad, mass",
                "for row, position in (lowest < 0.0).nonzero().tolist():\n            grad, mass",
            )
        ],
        [LOSSES],
    ),
    _m(
        "token-fallback-grad-mass-missing",
        "losses.py: _exact_mixture_grad",
        "the log-sum-exp fallback's logits gradient leaves out the smoothing term's -p_d(v) sum_v' r_d(v')",
        [
            (
                "softmax.mul_((weight_token + grad_sum * mass)[:, None])",
                "softmax.mul_(weight_token[:, None])",
            )
        ],
        [LOSSES],
    ),
    # ------------------------------------------------------------------ retrieval post-processing
    _m(
        "retrieval-last-chunk-dropped",
        "retrieval_rag.py: RagRetriever._chunk_tensor",
        "the last, partial chunk of retrieval_batch_size questions is dropped",
        [
            (
                "return [t[i : i + chunk_size] for i in range(0, len(t), chunk_size)]",
                "return [t[i : i + chunk_size] for i in range(0, len(t) - chunk_size + 1, chunk_size)]",
            )
        ],
        [RETRIEVAL_CHUNKS, CUSTOM_INDEX],
    ),
    _m(
        "retrieval-doc-question-order",
        "retrieval_rag.py: RagRetriever.postprocess_docs",
        "contexts ordered document-major instead of question-major",
        [
            (
                "for i in range(len(docs))\n            for j in range(n_docs)",
                "for j in range(n_docs)\n            for i in range(len(docs))",
            )
        ],
        [CUSTOM_INDEX],
    ),
    _m(
        "retrieval-title-quotes-kept",
        "retrieval_rag.py: RagRetriever.postprocess_docs",
        "surrounding quotes of titles are not stripped",
        [
            (
                """docs[i]["title"][j].removeprefix('"').removesuffix('"')""",
                """docs[i]["title"][j]""",
            )
        ],
        [CUSTOM_INDEX],
    ),
    _m(
        "retrieval-doc-scores-sign",
        "modeling_rag.py: score_documents",
        "question-document scores negated",
        [
            (
                "return torch.bmm(question_vectors.to(dtype).unsqueeze(1), doc_embeds.to(dtype).transpose(1, 2)).squeeze(1)",
                "return -torch.bmm(question_vectors.to(dtype).unsqueeze(1), doc_embeds.to(dtype).transpose(1, 2)).squeeze(1)",
            )
        ],
        [PARITY],
    ),
    _m(
        "generation-dedup-off",
        "generation/search.py: candidate_groups",
        "do_deduplication=True keeps repeated hypotheses",
        [("    if not deduplicate:\n", "    if True:\n")],
        [THOROUGH],
    ),
    _m(
        "generation-encoder-states-per-beam-row",
        "generation/search.py: search_contexts",
        "the shared search gives generate the encoder states, which it copies once per beam row, unread",
        [
            (
                "encoder_outputs=BaseModelOutput(last_hidden_state=search_states)",
                "encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states)",
            )
        ],
        [NO_COPY_PER_BEAM_ROW],
    ),
    _m(
        "generation-stand-in-unfilled-cache",
        "_compat.py: encoder_states_stand_in",
        "the zero-width stand-in is given where a layer's cross-attention would compute keys/values from it",
        [
            (
                "        if not layers or not all(cache.is_updated",
                "        if False and not all(cache.is_updated",
            )
        ],
        [STAND_IN],
    ),
    _m(
        "generation-estimate-copy-per-beam-row",
        "generation/rag_sequence.py: _questions_fitting",
        "the questions-per-call estimate counts generate's copy of the encoder states where it is empty",
        [("(n_docs if unread else n_docs + rows)", "(n_docs + rows)")],
        [STAND_IN],
    ),
    _m(
        "probe-step-hooks-unchecked",
        "generation/probe.py: FastPathVerdicts.step_hooks",
        "the capability probe leaves the generation-step hooks unchecked",
        [
            (
                "reason = probe_step_hooks(generator, share_cross_attention=self.shared_cross_attention)",
                "reason = None",
            )
        ],
        [PROBE_HOOKS],
    ),
    _m(
        "probe-step-hooks-unlocked",
        "generation/probe.py: probe_step_hooks",
        "the hook check swaps and hooks the shared generator without holding its lock",
        [
            (
                "    with generator_lock(generator):\n        training = generator.training\n",
                "    with contextlib.nullcontext():\n        training = generator.training\n",
            )
        ],
        [PROBE_HOOKS],
    ),
    _m(
        "probe-step-hooks-user-settings",
        "generation/probe.py: _probe_step_hooks",
        "the hook check's search runs under the generator's own generation settings",
        [
            (
                "            with _generation_config(generator, config):\n",
                "            with contextlib.nullcontext():\n",
            )
        ],
        [PROBE_HOOKS],
    ),
    _m(
        "probe-step-hooks-coverage-unchecked",
        "generation/probe.py: _check_step_records",
        "prefixes search expanded but the hooks did not record pass the probe",
        [
            (
                '    if bool(missing.any()):\n        return f"{search} hooks miss',
                '    if False:\n        return f"{search} hooks miss',
            )
        ],
        [PROBE_HOOKS],
    ),
    # ------------------------------------------------------------------ training loop
    _m(
        "trainer-accumulation-divisor",
        "finetuning/trainer.py: RagTrainer.train",
        "gradient accumulation divides by gradient_accumulation_steps, also for a partial last chunk",
        [
            (
                "loss = self._loss(batch) * (len(ids) / chunk_examples)",
                "loss = self._loss(batch) / args.gradient_accumulation_steps",
            )
        ],
        [ACCUMULATION],
    ),
    _m(
        "trainer-accumulation-micro-batch-count",
        "finetuning/trainer.py: RagTrainer.train",
        "gradient accumulation weighs every micro-batch equally, also a smaller last one",
        [("loss = self._loss(batch) * (len(ids) / chunk_examples)", "loss = self._loss(batch) / len(chunk)")],
        [ACCUMULATION],
    ),
    _m(
        "trainer-loss-summed",
        "finetuning/trainer.py: RagTrainer._loss",
        "the batch loss is summed over questions instead of averaged",
        [("return outputs.loss.float().mean()", "return outputs.loss.float().sum()")],
        [ACCUMULATION],
    ),
    _m(
        "trainer-label-smoothing-ignored",
        "finetuning/trainer.py: RagTrainer.__init__",
        "--label_smoothing / TrainingArguments.label_smoothing never reaches the loss",
        [
            (
                "model.config.label_smoothing = args.label_smoothing",
                "model.config.label_smoothing = model.config.label_smoothing",
            )
        ],
        [TRAINING_LOOP],
    ),
    _m(
        "finetune-max-combined-length-ignored",
        "finetuning/trainer.py: RagTrainer.__init__",
        "ragkit finetune --max_combined_length has no effect",
        [
            (
                "self._set_max_combined_length(args.max_combined_length)",
                "pass",
            )
        ],
        [MAX_COMBINED_FLAG, TRAINING_LOOP],
    ),
    _m(
        "finetune-max-combined-length-retriever-config",
        "finetuning/trainer.py: RagTrainer._set_max_combined_length",
        "--max_combined_length reaches the model config but not the retriever's own config",
        [("retriever_config.max_combined_length = length", "pass")],
        [MAX_COMBINED_FLAG, TRAINING_LOOP],
    ),
]


# ---------------------------------------------------------------------------- locating and planting


@dataclass
class Located:
    """Where one edit applies: a file relative to ``src/`` and the snippet's character offset."""

    path: Path
    offset: int
    line: int


@dataclass
class Result:
    """The outcome of one mutant."""

    name: str
    status: str  # killed | survived | accepted | stale | timeout | error
    where: str
    location: str = ""
    seconds: float = 0.0
    detail: str = ""
    tests: list[str] = field(default_factory=list)


def _source_files(src: Path) -> list[Path]:
    """Every ``.py`` file of the package, sorted (relative to ``src``)."""
    return sorted(p.relative_to(src) for p in (src / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def locate(src: Path, snippet: str) -> list[Located]:
    """Every occurrence of ``snippet`` in the package's source files."""
    found = []
    for rel in _source_files(src):
        text = (src / rel).read_text(encoding="utf-8")
        start = text.find(snippet)
        while start != -1:
            found.append(Located(rel, start, text.count("\n", 0, start) + 1))
            start = text.find(snippet, start + 1)
    return found


def plant(src: Path, mutant: Mutant) -> tuple[list[str], str | None]:
    """Apply ``mutant`` to the tree under ``src``; returns its locations, or a reason the table is stale."""
    locations = []
    planned: list[tuple[Located, str, str]] = []
    for snippet, replacement in mutant.edits:
        if snippet == replacement:
            return [], "an edit replaces a snippet with itself"
        hits = locate(src, snippet)
        if not hits:
            return [], f"snippet not found under src/{PACKAGE}: {snippet.splitlines()[0].strip()!r}"
        if len(hits) > 1:
            where = ", ".join(f"{h.path}:{h.line}" for h in hits)
            return [], f"snippet found {len(hits)} times ({where}): make it longer"
        planned.append((hits[0], snippet, replacement))
        locations.append(f"{hits[0].path}:{hits[0].line}")
    for hit, snippet, replacement in planned:
        path = src / hit.path
        text = path.read_text(encoding="utf-8")
        start = text.find(snippet)  # edits of one mutant may share a file: look the snippet up again
        text = text[:start] + replacement + text[start + len(snippet) :]
        try:
            compile(text, str(path), "exec")
        except SyntaxError as error:
            return locations, f"the mutated file does not compile: {error}"
        path.write_text(text, encoding="utf-8")
    return locations, None


# ---------------------------------------------------------------------------- running the tests


def _copy_source(workdir: Path) -> Path:
    """A fresh copy of ``src/`` under ``workdir``; returns the copy's ``src``."""
    target = workdir / "src"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(REPO / "src", target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return target


def _environment(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(name, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _exists(test: str) -> bool:
    return (REPO / test.lstrip("?").split("::")[0]).is_file()


def _missing_tests(tests: tuple[str, ...] | list[str]) -> list[str]:
    """Required tests whose file is gone (the table is stale)."""
    return [t for t in tests if not t.startswith("?") and not _exists(t)]


def _selected(tests: tuple[str, ...] | list[str]) -> list[str]:
    """The tests to run: required ones and the optional ones whose file exists."""
    return [t.lstrip("?") for t in tests if _exists(t)]


def _first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's summary, or its last line."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _outcome(code: int, output: str, seconds: float) -> tuple[str, float, str]:
    if code == 0:
        return "passed", seconds, _last_line(output)
    if code in (1, 2):  # tests failed / collection or import failed (a mutant that breaks an import)
        return "failed", seconds, _first_failure(output)
    return "error", seconds, f"pytest exit {code}: {_last_line(output)}"


def _pytest_arguments(tests: list[str], stop_first: bool) -> list[str]:
    return ["-q", *(["-x"] if stop_first else []), "-p", "no:cacheprovider", *tests]


def run_tests(
    src: Path, tests: list[str], timeout: float, stop_first: bool = True, fork: bool = False
) -> tuple[str, float, str]:
    """Run pytest on ``tests`` with ``src`` first on the path: (outcome, seconds, detail).

    outcome: ``passed``, ``failed`` (tests failed or could not be collected), ``timeout`` or ``error``.
    With ``fork``, pytest runs in a fork of this process (see :func:`preload`) instead of a new interpreter.
    """
    if fork:
        return _run_forked(src, _pytest_arguments(tests, stop_first), timeout)
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", *_pytest_arguments(tests, stop_first)],
            cwd=REPO,
            env=_environment(src),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started, f"no result after {timeout:.0f} s"
    return _outcome(completed.returncode, completed.stdout + completed.stderr, time.perf_counter() - started)


# Imported once by the parent with --fork, so that each mutant's pytest starts without paying for them.
# The package under test is never among them: each fork imports it from its own mutated copy.
_PRELOAD = (
    "numpy",
    "torch",
    "faiss",
    "datasets",
    "pytest",
    "transformers",
    "transformers.generation.utils",
    "transformers.models.bart.modeling_bart",
    "transformers.models.t5.modeling_t5",
    "transformers.models.bert.modeling_bert",
    "transformers.models.dpr.modeling_dpr",
    "transformers.models.rag.modeling_rag",
    "transformers.models.rag.retrieval_rag",
)
_WRONG_COPY = 97  # a fork's exit status when it imported the package from elsewhere than its copy


def preload() -> None:
    """Import the heavy dependencies in this process (for ``--fork``); never the package under test."""
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if PACKAGE in sys.modules:
        raise SystemExit(f"--fork: {PACKAGE} was imported by the parent process; run without --fork")


def _run_forked(src: Path, arguments: list[str], timeout: float) -> tuple[str, float, str]:
    """``pytest.main(arguments)`` in a forked child with ``src`` first on ``sys.path``, killed after ``timeout``."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="pytest-", suffix=".log", delete=False) as log:
        log_path = log.name
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.setpgrp()  # its own process group: a timeout ends the child and whatever it started
            fd = os.open(log_path, os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(REPO)
            os.environ.update(_environment(src))
            sys.path.insert(0, str(src))
            import pytest

            code = int(pytest.main(arguments))
            module = sys.modules.get(PACKAGE)
            if module is not None and not Path(module.__file__).resolve().is_relative_to(src.resolve()):
                print(f"{PACKAGE} was imported from {module.__file__}, not from the mutated copy")
                code = _WRONG_COPY
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = started + timeout
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.perf_counter() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.unlink(log_path)
            return "timeout", time.perf_counter() - started, f"no result after {timeout:.0f} s"
        else:
            time.sleep(0.2)
    seconds = time.perf_counter() - started
    output = Path(log_path).read_text(encoding="utf-8", errors="replace")
    os.unlink(log_path)
    code = os.waitstatus_to_exitcode(status)
    if code == _WRONG_COPY:
        return "error", seconds, _last_line(output)
    return _outcome(code, output, seconds)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _union(tests: list[str]) -> list[str]:
    """The tests of several mutants, each once (a whole file covers its node ids)."""
    files = {t for t in tests if "::" not in t}
    out: list[str] = []
    for t in tests:
        if t not in out and t.split("::")[0] not in files - {t}:
            out.append(t)
    return out


def check_import_path(src: Path) -> str | None:
    """Make sure the tests will import the copy; a reason when they would not."""
    completed = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=REPO,
        env=_environment(src),
        capture_output=True,
        text=True,
    )
    found = completed.stdout.strip()
    if completed.returncode != 0:
        return f"cannot import {PACKAGE}: {_last_line(completed.stderr)}"
    if not Path(found).resolve().is_relative_to(src.resolve()):
        return f"{PACKAGE} is imported from {found}, not from the copy under {src}"
    return None


def run_mutant(workdir: Path, mutant: Mutant, timeout: float, fork: bool = False) -> Result:
    """Plant ``mutant`` in a fresh copy of ``src/`` and run its tests."""
    result = Result(mutant.name, "error", mutant.where, tests=_selected(mutant.tests))
    missing = _missing_tests(mutant.tests)
    if missing:
        result.status, result.detail = "stale", f"test file(s) missing: {', '.join(missing)}"
        return result
    src = _copy_source(workdir)
    locations, problem = plant(src, mutant)
    result.location = ", ".join(locations)
    if problem:
        result.status, result.detail = "stale", problem
        return result
    outcome, result.seconds, result.detail = run_tests(src, _selected(mutant.tests), timeout, fork=fork)
    if outcome == "failed":
        result.status = "killed"
    elif outcome == "passed":
        result.status = "accepted" if mutant.reason else "survived"
        if mutant.reason:
            result.detail = mutant.reason
    else:
        result.status = outcome
    return result


# ---------------------------------------------------------------------------- command line

_GOOD = {"killed", "accepted"}


def _print_table(mutants: list[Mutant]) -> None:
    for m in mutants:
        print(f"{m.name:42s} {m.where:40s} {m.description}")
        for t in m.tests:
            print(f"{'':42s}   test: {t}")
        if m.reason:
            print(f"{'':42s}   accepted survivor: {m.reason}")


def _check_table(mutants: list[Mutant]) -> None:
    names = [m.name for m in mutants]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"duplicate mutant names: {sorted(duplicates)}")
    for m in mutants:
        if not re.fullmatch(r"[a-z0-9-]+", m.name):
            raise SystemExit(f"mutant name {m.name!r}: use lower-case letters, digits and dashes")
        if not m.edits or not m.tests:
            raise SystemExit(f"mutant {m.name}: needs at least one edit and one test")


def _locate_only(mutants: list[Mutant]) -> int:
    """Plant every mutant in a scratch copy without running tests: finds stale table entries fast."""
    stale = 0
    with tempfile.TemporaryDirectory(prefix="ragkit-mutants-") as tmp:
        for mutant in mutants:
            src = _copy_source(Path(tmp))
            locations, problem = plant(src, mutant)
            missing = _missing_tests(mutant.tests)
            if missing:
                problem = f"test file(s) missing: {', '.join(missing)}"
            stale += problem is not None
            status = f"STALE   {problem}" if problem else "found"
            print(f"{mutant.name:42s} {', '.join(locations):34s} {status}")
    print(f"{len(mutants) - stale} found, {stale} stale")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutant table and exit")
    parser.add_argument(
        "--locate",
        action="store_true",
        help="only check that every snippet and test file is found (no tests)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--fork",
        action="store_true",
        help="import torch/transformers once and fork a pytest per mutant (POSIX; much faster on a busy machine)",
    )
    args = parser.parse_args(argv)

    _check_table(MUTANTS)
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        _print_table(mutants)
        return 0

    if args.locate:
        return _locate_only(mutants)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ragkit-mutants-") as tmp:
        workdir = Path(tmp)
        src = _copy_source(workdir)
        problem = check_import_path(src)
        if args.fork:
            preload()
        if problem:
            print(f"setup: {problem}", file=sys.stderr)
            return 2
        if not args.no_baseline:
            tests = _union([t for m in mutants for t in _selected(m.tests)])
            print(f"baseline: {len(tests)} test selection(s) on the unmutated copy ...", flush=True)
            outcome, seconds, detail = run_tests(
                src, tests, args.timeout * 2, stop_first=False, fork=args.fork
            )
            print(f"baseline: {outcome} in {seconds:.0f} s ({detail})", flush=True)
            if outcome != "passed":
                print(
                    "The unmutated tests do not pass: fix them before reading mutant results.",
                    file=sys.stderr,
                )
                return 2
        results = []
        for index, mutant in enumerate(mutants, 1):
            result = run_mutant(workdir, mutant, args.timeout, fork=args.fork)
            results.append(result)
            print(
                f"[{index:2d}/{len(mutants)}] {result.status.upper():8s} {result.name:42s} "
                f"{result.seconds:5.0f} s  {result.location}  {result.detail}",
                flush=True,
            )

    counts = {
        s: sum(r.status == s for r in results)
        for s in ("killed", "accepted", "survived", "stale", "timeout", "error")
    }
    print()
    print(
        f"{counts['killed']} killed, {counts['survived']} survived, {counts['accepted']} accepted survivors, "
        f"{counts['stale']} stale, {counts['timeout']} timed out, {counts['error']} errors "
        f"({len(results)} mutants, {time.perf_counter() - started:.0f} s)"
    )
    for r in results:
        if r.status == "survived":
            print(
                f"  SURVIVED {r.name}: no test in {', '.join(r.tests)} notices it ({r.where}, {r.location})"
            )
        elif r.status == "stale":
            print(f"  STALE {r.name}: {r.detail}: update the table")
        elif r.status in ("timeout", "error"):
            print(f"  {r.status.upper()} {r.name}: {r.detail}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([r.__dict__ for r in results], indent=2) + "\n", encoding="utf-8"
        )
    return 0 if all(r.status in _GOOD for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
