"""The fused losses and the questions-per-call memory estimate on a real GPU.

Skipped without a CUDA device. The losses run other kernels on CUDA than on CPU (position chunks of
about 2**22 elements instead of cache-sized ones, one synchronisation to find the underflowing
positions): they are compared with Transformers' ``get_nll`` on the same CUDA tensors, TF32 off. Losses
within 1e-4 absolute and 1e-6 relative, logit and ``doc_scores`` gradients within 1e-5 (float32; CUDA's
reductions sum in another order than the CPU's); bf16 logits against the reference on the same logits
in float32, gradients also 2**-8 relative.

The memory estimate (``rag_sequence._questions_fitting``) is checked against
``torch.cuda.max_memory_allocated`` over one fast-decoding generate call (the beam search: scoring has
its own bound) of BART-base shapes in bf16: within 0.6x to 1.6x of the measured peak above the weights
and inputs, with and without the shared cross-attention.
"""

from __future__ import annotations

import functools

import pytest
import torch
from gpu_helpers import random_contexts

from loss_helpers import BOS, PAD, loss_and_grads, ragkit_nll, reference_nll
from ragkit import RagSequenceForGeneration
from ragkit.generation import DecodingOptions, rag_sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("exact_float32"),  # float32 references without TF32
]

CUDA = "cuda"
EOS, START = 2, 2
BATCH, N_DOCS, LENGTH, VOCAB = 3, 5, 16, 50265
LOSS_TOL = {"atol": 1e-4, "rtol": 1e-6}
GRAD_TOL = {"atol": 1e-5, "rtol": 0}
BF16_GRAD_TOL = {"atol": 1e-5, "rtol": 2**-8}
#: Allowed measured/estimated band of the questions-per-call estimate.
ESTIMATE_BAND = (0.6, 1.6)


def loss_inputs(device: str, dtype: torch.dtype = torch.float32, extreme: bool = False):
    """Logits `(BATCH * N_DOCS, LENGTH, VOCAB)`, doc scores, per-row weights and padded targets on ``device``.

    ``extreme`` puts most of one position's vocabulary 150 below every document's top logit, so that
    RAG-Token's smoothing mixture underflows in float32 there (the log-sum-exp fallback).
    """
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH * N_DOCS, LENGTH, VOCAB, generator=generator) * 3
    if extreme:
        logits[:N_DOCS, 3, 10:] -= 150.0
    doc_scores = torch.randn(BATCH, N_DOCS, generator=generator)
    weights = torch.rand(BATCH, generator=generator) + 0.5
    target = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=generator)
    target[:, 0], target[:, 1] = START, BOS
    for row, end in enumerate((LENGTH - 1, 6, 9)):  # EOS, then right padding
        target[row, end] = EOS
        target[row, end + 1 :] = PAD
    to = functools.partial(torch.Tensor.to, device=device)
    return to(logits.to(dtype)), to(doc_scores), to(weights), to(target)


def check_loss_parity(
    device: str, head: str, epsilon: float, dtype: torch.dtype, extreme: bool = False
) -> None:
    """ragkit's loss and gradients against the reference's on the same ``device`` tensors."""
    logits, doc_scores, weights, target = loss_inputs(device, dtype, extreme)
    options = {"epsilon": epsilon}
    if head == "sequence":
        options["exclude_bos_score"] = True
    ours = loss_and_grads(N_DOCS, ragkit_nll(head), logits, doc_scores, weights, target, **options)
    reference = loss_and_grads(
        N_DOCS, reference_nll(head, N_DOCS), logits.float(), doc_scores, weights, target, **options
    )
    assert all(torch.isfinite(x).all() for x in ours)
    torch.testing.assert_close(ours[0], reference[0], **LOSS_TOL)
    grad_tol = GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    torch.testing.assert_close(ours[1].float(), reference[1], **grad_tol)
    torch.testing.assert_close(ours[2], reference[2], **GRAD_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("head", ["sequence", "token"])
def test_losses_on_cuda_match_the_reference(head, epsilon, dtype):
    check_loss_parity(CUDA, head, epsilon, dtype)


def test_smoothed_token_loss_underflow_fallback_on_cuda():
    check_loss_parity(CUDA, "token", 0.1, torch.float32, extreme=True)


# --------------------------------------------------------------------------------------------------
# The questions-per-call estimate against the CUDA peak
# --------------------------------------------------------------------------------------------------


def measured_and_estimated(model, inputs: dict, options: DecodingOptions, shared: bool, device: str = CUDA):
    """Peak bytes one fast-decoding generate call allocates above what was allocated before it, and the
    estimate for the same call (all the batch's questions in one generator call)."""
    decode = dict(num_beams=4, num_return_sequences=1, max_length=21, min_length=21, decoding="fast")
    batch_size = inputs["doc_scores"].shape[0]
    estimate = batch_size * (
        2**40
        // rag_sequence._questions_fitting(
            model.generator,
            model.config.n_docs,
            4,
            inputs["context_input_ids"].shape[1],
            {"max_length": 21},
            2**40,
            shared_cross_attention=shared,
        )
    )
    model.generate(**inputs, **decode, decoding_options=options)  # warm-up: the probe, cuBLAS workspaces
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model.generate(**inputs, **decode, questions_per_batch=batch_size, decoding_options=options)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, estimate


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-beam"])
def test_questions_per_call_estimate_matches_the_cuda_peak(base_checkpoint, shared):
    model = RagSequenceForGeneration.from_pretrained(base_checkpoint, dtype=torch.bfloat16).to(CUDA).eval()
    inputs = random_contexts(model.config, batch_size=8, length=300, device=CUDA)
    options = DecodingOptions() if shared else DecodingOptions(fast_path=False)
    measured, estimate = measured_and_estimated(model, inputs, options, shared)
    ratio = measured / estimate
    print(
        f"shared={shared}: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB ({ratio:.2f})"
    )
    assert ESTIMATE_BAND[0] <= ratio <= ESTIMATE_BAND[1]
