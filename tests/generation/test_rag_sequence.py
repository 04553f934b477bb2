"""RAG-Sequence decoding (ragkit.generation) against Transformers' reference and brute-force definitions.

Weights are random but drawn wide (normal, std 1) so that greedy and beam outputs vary from token
to token, and the end-of-sequence logit is raised so hypotheses end at different lengths.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import transformers
from generation_helpers import EOS, plain_and_shared, widen
from transformers import BartForConditionalGeneration, DPRQuestionEncoder, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.rag.retrieval_rag import CustomHFIndex

from ragkit import RagSequenceForGeneration, _compat
from ragkit.generation import (
    DECODING_MODES,
    DecodingOptions,
    DecodingTrace,
    packing,
    rag_sequence,
    rag_sequence_generate,
    scoring,
    search,
)
from ragkit.retrieval.custom import CustomHFIndex as RagkitCustomHFIndex
from ragkit.retrieval_rag import RagRetriever as RagkitRetriever
from ragkit.testing import tiny_rag_config

MAX_LENGTH = 10


def _build(kind: str, seed: int = 0, **rag_fields):
    """(reference model, ragkit model) sharing one set of random weights."""
    config = tiny_rag_config(kind, hidden_size=32, **rag_fields)
    reference_config = transformers.RagConfig(**config.to_dict())
    torch.manual_seed(seed)
    question_encoder = DPRQuestionEncoder(reference_config.question_encoder)
    generator_cls = BartForConditionalGeneration if kind == "bart" else T5ForConditionalGeneration
    generator = generator_cls(reference_config.generator)
    widen(generator, seed, eos_row_scale=2.5)
    reference = transformers.RagSequenceForGeneration(
        config=reference_config, question_encoder=question_encoder, generator=generator
    ).eval()
    if kind == "t5":
        # The reference reads config.generator.bos_token_id, which T5Config lacks in Transformers 5.
        reference.config.generator.bos_token_id = None
    ours = RagSequenceForGeneration(
        config=config, question_encoder=question_encoder, generator=generator
    ).eval()
    return reference, ours


def _contexts(batch_size: int, n_docs: int, length: int = 9, seed: int = 1, pads: list[int] | None = None):
    """Random contexts `(batch_size * n_docs, length)`, their mask, and doc scores; ``pads[i]`` right pads row i."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (batch_size * n_docs, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate(pads or []):
        if n_pad:
            ids[row, -n_pad:] = 1
            mask[row, -n_pad:] = 0
    scores = torch.randn(batch_size, n_docs, generator=generator)
    return ids, mask, scores


def _context_inputs(**kwargs) -> dict[str, torch.Tensor]:
    """``_contexts(**kwargs)`` as ``generate`` keyword arguments."""
    return dict(zip(("context_input_ids", "context_attention_mask", "doc_scores"), _contexts(**kwargs)))


def _strip(row: torch.Tensor, pad: int) -> tuple[int, ...]:
    """Token ids without trailing padding."""
    ids = row.tolist()
    while ids and ids[-1] == pad:
        ids.pop()
    return tuple(ids)


@pytest.fixture(scope="module")
def bart_models():
    return _build("bart")


@pytest.fixture(scope="module")
def t5_models():
    return _build("t5")


# --- thorough decoding: token-identical to the reference on contexts without padding ----------------


@pytest.mark.parametrize(
    "num_beams,num_return_sequences,do_deduplication,extra",
    [
        (1, 1, True, {}),
        (3, 1, True, {}),
        (3, 2, True, {"forced_bos_token_id": 0}),
        (2, 3, False, {}),
        (3, 2, True, {"min_length": 4, "forced_eos_token_id": EOS}),
    ],
)
@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_thorough_matches_reference(kind, num_beams, num_return_sequences, do_deduplication, extra, request):
    reference, ours = request.getfixturevalue(f"{kind}_models")
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3),
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        do_deduplication=do_deduplication,
        max_length=MAX_LENGTH,
        **extra,
    )
    expected = reference.generate(**kwargs)
    got = ours.generate(**kwargs)
    assert got.shape == expected.shape == (3 * num_return_sequences, expected.shape[1])
    assert torch.equal(got, expected)
    # Not a degenerate case: hypotheses differ across questions, and some end before the others.
    assert len({_strip(row, 1) for row in got}) > 1
    if num_beams > 1 and kind == "bart":
        assert len({len(_strip(row, 1)) for row in got}) > 1


@pytest.mark.parametrize(
    "path,share", [("packed", None), ("rows", False), ("rows", True)], ids=["packed", "rows", "rows-shared"]
)
def test_every_scoring_path_matches_reference(path, share, bart_models):
    # BART scores each question's prefix trie packed in one decoder row per document ("packed"); other
    # generators score one row per (candidate, document) ("rows"), where CPU shares each document's
    # cross-attention keys/values through the cache and CUDA recomputes them.
    options = DecodingOptions(scoring_path=path, share_cross_attention=share)
    reference, ours = bart_models
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=23),
        num_beams=3,
        num_return_sequences=2,
        max_length=MAX_LENGTH,
        forced_bos_token_id=0,
    )
    assert torch.equal(ours.generate(**kwargs, decoding_options=options), reference.generate(**kwargs))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_packed_and_per_candidate_scores_agree(label_smoothing):
    # Same scores from both paths, candidate by candidate (not just the same winners), with padded
    # contexts, hypotheses of different lengths, a tiny chunk budget (many chunks) and label smoothing.
    _, ours = _build("bart", seed=23, label_smoothing=label_smoothing)
    ids, mask, scores = _contexts(batch_size=3, n_docs=3, seed=13, pads=[0, 3, 0, 0, 5, 0, 1, 0, 0])
    trace = DecodingTrace()
    ours.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        num_beams=3,
        max_length=MAX_LENGTH,
        decoding_options=DecodingOptions(trace=trace),
    )
    ((args, kwargs),) = trace.scoring_calls
    candidates = args[4][args[5]]
    assert len({len(_strip(row, 1)) for row in candidates}) > 1  # some end early: pad targets are skipped
    results = {}
    for path in ("packed", "rows"):
        # Every candidate's exact score; one question per chunk.
        options = DecodingOptions(prune_scoring=False, scoring_path=path, scoring_elements_cpu=1)
        results[path] = scoring.thorough_scores(*args, **kwargs, options=options)
    assert results["packed"].shape == (len(candidates),)
    assert bool(results["packed"].isfinite().all())
    torch.testing.assert_close(results["packed"], results["rows"], rtol=1e-5, atol=1e-5)


def test_packed_path_is_refused_where_positions_are_relative(t5_models):
    # T5's relative position buckets cannot express a trie's depths: auto picks the per-candidate path,
    # and asking for the packed one is an error rather than wrong scores.
    reference, ours = t5_models
    kwargs = dict(**_context_inputs(batch_size=2, n_docs=3, seed=17), num_beams=2, max_length=6)
    assert _compat.learned_positions(ours.generator) is None
    assert torch.equal(ours.generate(**kwargs), reference.generate(**kwargs))
    with pytest.raises(ValueError, match="packed scoring path needs a BART-family generator"):
        ours.generate(**kwargs, decoding_options=DecodingOptions(scoring_path="packed"))


def test_scoring_path_defaults_packed_on_cpu_rows_on_cuda(bart_models, t5_models):
    # Packed scoring measured slower on an H200 (cuDNN rebuilds its attention graph per packed shape).
    bart, t5 = bart_models[1].generator, t5_models[1].generator
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default, packed, rows = (
        DecodingOptions(),
        DecodingOptions(scoring_path="packed"),
        DecodingOptions(scoring_path="rows"),
    )
    assert packing.packed_scoring_positions(bart, cpu, default) is bart.get_decoder().embed_positions
    assert packing.packed_scoring_positions(bart, cuda, default) is None
    assert packing.packed_scoring_positions(t5, cpu, default) is None
    assert packing.packed_scoring_positions(bart, cuda, packed) is bart.get_decoder().embed_positions
    assert packing.packed_scoring_positions(bart, cpu, rows) is None


def test_wide_prefix_tries_take_the_rows_path(bart_models):
    # A trie wider than the position table (or _PACKED_MAX_WIDTH) cannot be packed: the hooked position
    # embedding still runs on the packed places. Such calls are scored per candidate, same output.
    reference, ours = bart_models
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=23),
        num_beams=3,
        max_length=MAX_LENGTH,
    )
    trace = DecodingTrace()
    options = DecodingOptions(packed_max_width=4, trace=trace)
    assert torch.equal(ours.generate(**kwargs, decoding_options=options), reference.generate(**kwargs))
    assert trace.packed == [False]  # tried packed, scored by rows


def test_packed_path_needs_real_position_weights():
    # Weights offloaded by accelerate are meta tensors outside forward: the rows path, which only calls
    # the modules, is used then.
    config = tiny_rag_config("bart", hidden_size=32)
    with torch.device("meta"):
        generator = BartForConditionalGeneration(transformers.RagConfig(**config.to_dict()).generator)
    assert generator.get_decoder().embed_positions.weight.is_meta
    assert _compat.learned_positions(generator) is None


def test_unknown_scoring_path_is_an_error():
    with pytest.raises(ValueError, match="scoring_path must be one of"):
        DecodingOptions(scoring_path="Packed")
    with pytest.raises(ValueError, match="decoding_options"):
        rag_sequence_generate(None, decoding_options={"fast_path": False})


def test_questions_per_call_estimate_matches_the_h200_measurement():
    # On CUDA, without questions_per_batch, generate decodes as many questions per call as fit in half the
    # free memory. The estimate per question, for BART-large in bf16 with 5 docs x 4 beams, contexts of 300
    # tokens and max_length 21, should match the H200 run: 10716 MiB peak for 32 questions at once
    # (benchmarks/results/bench_generation_gpu_bf16_h200.json), a run whose beam search held the
    # cross-attention keys/values once per beam row: sharing off. Measured on CPU against live tensors:
    # tests/generation/test_memory.py.
    with torch.device("meta"):
        generator = BartForConditionalGeneration(transformers.BartConfig()).to(torch.bfloat16)

    def fitting(kwargs, budget, shared=False):
        return rag_sequence._questions_fitting(
            generator, 5, 4, 300, kwargs, budget, shared_cross_attention=shared
        )

    per_beam = fitting({"max_length": 21}, 10716 * 2**20)
    assert 29 <= per_beam <= 35
    assert fitting({"max_new_tokens": 20}, 10716 * 2**20) == per_beam
    # Keys/values once per context (14 MiB each) instead of per beam row, and no copy of the encoder
    # states per beam row: about 3.2 times the questions.
    assert 2.9 <= fitting({"max_length": 21}, 10716 * 2**20, shared=True) / per_beam <= 3.5
    assert fitting({}, 0) == fitting({}, 0, shared=True) == 1  # always at least one question


def test_label_smoothing_is_part_of_the_score_as_in_reference():
    reference, ours = _build("bart", seed=3, label_smoothing=0.3)
    kwargs = dict(
        **_context_inputs(batch_size=2, n_docs=3, seed=5),
        num_beams=3,
        max_length=MAX_LENGTH,
    )
    assert torch.equal(ours.generate(**kwargs), reference.generate(**kwargs))


# --- pruned thorough scoring: exhaustive output, fewer projections -----------------------------------


def _thorough_call(ours, options=None, **kwargs):
    """(output, arguments and keywords of the thorough scoring call, projected rows) of one generate call."""
    trace = DecodingTrace()
    options = (options or DecodingOptions()).replace(trace=trace)
    output = ours.generate(**kwargs, decoding_options=options)
    return output, trace.scoring_calls[0], trace.projected_rows


def _default_init_model(kind: str, seed: int) -> RagSequenceForGeneration:
    """A ragkit RAG-Sequence model with the sub-models' own (narrow) initialisation."""
    config = tiny_rag_config(kind, hidden_size=32)
    reference_config = transformers.RagConfig(**config.to_dict())
    torch.manual_seed(seed)
    generator_cls = BartForConditionalGeneration if kind == "bart" else T5ForConditionalGeneration
    return RagSequenceForGeneration(
        config=config,
        question_encoder=DPRQuestionEncoder(reference_config.question_encoder),
        generator=generator_cls(reference_config.generator),
    ).eval()


@pytest.mark.parametrize(
    "kind,path,num_beams,num_return_sequences,do_deduplication,pads,seed",
    [
        ("bart", None, 3, 1, True, None, 31),
        ("bart", None, 3, 2, True, [0, 3, 0, 0, 5, 0, 1, 0, 0], 37),
        ("bart", "rows", 3, 1, True, [2, 0, 0, 4, 0, 0, 0, 0, 3], 41),
        ("bart", None, 2, 4, False, None, 43),
        ("bart", None, 1, 1, True, None, 47),
        ("t5", None, 3, 1, True, None, 53),
        ("t5", None, 2, 3, True, [0, 0, 2, 0, 0, 0, 4, 0, 0], 59),
    ],
)
@pytest.mark.parametrize("probe", [16, None], ids=["probe16", "probe-all"])
@pytest.mark.parametrize("wide", [True, False], ids=["wide", "default-init"])
def test_pruned_scoring_returns_the_exhaustive_output(
    kind, path, num_beams, num_return_sequences, do_deduplication, pads, seed, wide, probe
):
    # Pruning skips projections that bounds prove cannot change the output: same hypotheses, same order,
    # as scoring every (document, prefix) pair, with wide random weights (hypotheses far apart) and with
    # the default initialisation (near ties). The tiny vocabulary fits in the default probe (tight bounds);
    # a probe of 16 ids leaves loose ones, so more rounds of projections run.
    ours = _build(kind, seed=seed)[1] if wide else _default_init_model(kind, seed)
    options = DecodingOptions(scoring_path=path, **({} if probe is None else {"probe_tokens": probe}))
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=seed, pads=pads),
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        do_deduplication=do_deduplication,
        max_length=MAX_LENGTH,
    )
    pruned, (_, keywords), pruned_rows = _thorough_call(ours, options, **kwargs)
    assert keywords["known"] is not None  # generation handed its own (hypothesis, document) pairs over
    exhaustive, _, exhaustive_rows = _thorough_call(ours, options.replace(prune_scoring=False), **kwargs)
    assert torch.equal(pruned, exhaustive)
    assert pruned_rows <= exhaustive_rows
    if wide and num_beams > 1:
        assert pruned_rows < exhaustive_rows / 2


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_generation_gives_each_hypothesis_its_own_document_log_likelihood(kind, request):
    # The log-likelihood generation hands over for (hypothesis, its own document) is the one teacher
    # forcing computes: the same targets (BOS left out, pads skipped), before any logits processor.
    _, ours = request.getfixturevalue(f"{kind}_models")
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=61),
        num_beams=3,
        max_length=MAX_LENGTH,
        forced_eos_token_id=EOS,
        no_repeat_ngram_size=2,
    )
    _, (args, keywords), _ = _thorough_call(ours, **kwargs)
    known = keywords["known"]
    assert known.shape[0] == args[5].shape[0] and bool((~known.isnan()).any(dim=1).all())
    # Exhaustive pair log-likelihoods, without the document prior: zero doc scores, one document at a time.
    model, encoder_states, mask, doc_logprobs, sequences, rows, questions, use_bos = args
    n_docs = doc_logprobs.shape[1]
    for doc in range(n_docs):
        contexts = torch.arange(doc, encoder_states.shape[0], n_docs)
        per_doc = scoring.thorough_scores(
            model,
            encoder_states[contexts],
            None if mask is None else mask[contexts],
            torch.zeros(doc_logprobs.shape[0], 1),
            sequences,
            rows,
            questions,
            use_bos,
            options=DecodingOptions(prune_scoring=False),
        )
        have = ~known[:, doc].isnan()
        torch.testing.assert_close(known[have, doc], per_doc[have], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_prob_upper_bounds_hold(dtype):
    # The bound from a slice of the vocabulary is never below the log-probability scoring computes.
    _, ours = _build("bart", seed=67)
    generator = ours.generator.to(dtype)
    torch.manual_seed(0)
    hidden = torch.randn(50, generator.config.d_model).to(dtype)
    state = torch.randint(0, 50, (400,))
    target = torch.randint(0, generator.config.vocab_size, (400,))
    with torch.no_grad():
        bounds = scoring.log_prob_upper_bounds(generator, hidden, state, target, 1 << 12, probe_tokens=64)
        exact = torch.log_softmax(_compat.project(generator, hidden), dim=-1, dtype=torch.float32)
    assert bool((bounds >= exact[state, target]).all())
    assert bool((bounds <= 0).all()) and float(bounds.min()) < -1  # not the trivial bound


def test_pruned_scores_of_survivors_are_exact():
    # Candidates that are returned keep their exact score (up to pairs e^-30 below); the others are -inf.
    _, ours = _build("bart", seed=71)
    kwargs = dict(**_context_inputs(batch_size=3, n_docs=3, seed=71), num_beams=3, max_length=MAX_LENGTH)
    _, (args, keywords), _ = _thorough_call(ours, **kwargs)
    pruned = scoring.thorough_scores(*args, keep=2, known=keywords["known"])
    exhaustive = scoring.thorough_scores(*args, options=DecodingOptions(prune_scoring=False))
    questions = args[6]
    kept = pruned.isfinite()
    for q in range(3):
        mine = questions.eq(q)
        best = exhaustive[mine].topk(2).indices
        assert bool(kept[mine][best].all())
        torch.testing.assert_close(pruned[mine][best], exhaustive[mine][best], rtol=1e-5, atol=1e-4)
    assert int(kept.sum()) < len(kept)  # some were ruled out unscored


def _eager_bart(seed: int) -> BartForConditionalGeneration:
    """A tiny BART generator with eager attention and wide random weights."""
    generator_config = transformers.RagConfig(**tiny_rag_config("bart", hidden_size=32).to_dict()).generator
    generator_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    generator = BartForConditionalGeneration(generator_config).eval()
    widen(generator, seed)
    return generator


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_beams_sharing_cross_attention_decode_as_the_generator_does(kind, request):
    # Each context's cross-attention keys/values computed once: BART's beams attend to them together (no
    # copy per beam), T5's beams get copies that are never reordered. Beam search returns what the
    # generator's own generate returns, with padded contexts too.
    _, ours = request.getfixturevalue(f"{kind}_models")
    generator = ours.generator
    ids, mask, _ = _contexts(batch_size=3, n_docs=3, seed=73, pads=[0, 2, 0, 4, 0, 0, 1, 0, 3])
    originals = [type(layer) for layer in generator.modules()]
    plain, got, shared = plain_and_shared(
        generator, ids, mask, num_beams=3, num_return_sequences=3, max_length=MAX_LENGTH
    )
    assert torch.equal(got, plain)
    assert [type(layer) for layer in generator.modules()] == originals  # put back
    assert shared.layers[0][0].shape[0] == ids.shape[0]  # once per context, not per beam
    cross = shared.cache.cross_attention_cache
    if kind == "bart":
        assert shared.decoder_layers is not None and cross.get_seq_length() == 0  # no copies at all
    else:
        assert shared.decoder_layers is None and cross.layers[0].keys.shape[0] == 3 * ids.shape[0]
    # Reordering touched the self-attention part only, after every step.
    assert len(shared.cache.beam_orders) == plain.shape[1] - 1


def test_shared_cross_attention_with_eager_attention_and_a_prompt():
    # Eager attention (additive float masks) and a decoder prompt (queries longer than one token).
    ids, mask, _ = _contexts(batch_size=2, n_docs=2, seed=89, pads=[0, 3, 1, 0])
    plain, got, shared = plain_and_shared(
        _eager_bart(3),
        ids,
        mask,
        num_beams=2,
        num_return_sequences=2,
        max_length=MAX_LENGTH,
        decoder_input_ids=torch.tensor([[2, 0, 7]] * 4),
    )
    assert shared.decoder_layers is not None
    assert torch.equal(got, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_cross_attention_keeps_eager_arithmetic_in_half_precision(dtype):
    # Eager models round as eager attention does (sdpa would swap beams on near ties in half precision).
    for seed in range(4):
        generator = _eager_bart(seed)
        with torch.no_grad():
            for param in generator.parameters():
                if param.dim() > 1:
                    param.mul_(0.5)
        generator.to(dtype)
        ids, mask, _ = _contexts(batch_size=3, n_docs=2, seed=seed, pads=[0, 2, 0, 3, 1, 0])
        plain, got, shared = plain_and_shared(
            generator, ids, mask, num_beams=4, num_return_sequences=4, max_length=MAX_LENGTH
        )
        assert shared.decoder_layers is not None
        assert torch.equal(got, plain), seed


def test_pruned_scoring_under_autocast_returns_the_exhaustive_output():
    # float32 weights, bf16 autocast: logits are rounded like half precision, so generation's values are
    # not taken and the output stays exhaustive scoring's.
    _, ours = _build("bart", seed=105)
    options = DecodingOptions(probe_tokens=16)
    kwargs = dict(
        **_context_inputs(batch_size=4, n_docs=3, seed=5), num_beams=2, num_return_sequences=2, max_length=10
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pruned, (_, keywords), _ = _thorough_call(ours, options, **kwargs)
        exhaustive = ours.generate(**kwargs, decoding_options=options.replace(prune_scoring=False))
    assert keywords["known"] is None
    assert torch.equal(pruned, exhaustive)


def test_concurrent_generate_calls_on_one_model(bart_models):
    # Decoding hooks and swaps the generator's modules for a while: calls on one model are serialised.
    _, ours = bart_models
    inputs = [
        dict(**_context_inputs(batch_size=2, n_docs=3, seed=seed), num_beams=3, max_length=MAX_LENGTH)
        for seed in range(6)
    ]
    expected = [ours.generate(**kwargs) for kwargs in inputs]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def run(i):
        try:
            results[i] = ours.generate(**inputs[i], decoding="fast" if i % 2 else "thorough")
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(0, 6, 2):
        assert torch.equal(results[i], expected[i])
    assert all(
        type(layer.encoder_attn).__name__ == "BartAttention" for layer in ours.generator.get_decoder().layers
    )


class _Nested(transformers.LogitsProcessor):
    """A logits processor that, once, runs ``action`` in the middle of a beam search."""

    def __init__(self, action):
        self.action, self.result = action, None

    def __call__(self, input_ids, scores):
        if self.result is None:
            self.result = self.action()
        return scores


def test_generate_nested_in_a_callback(bart_models):
    # A generate call run from inside another's beam search (same thread) is not served by the outer
    # call's swapped cross-attention or hooks; both return what they return alone.
    _, ours = bart_models
    outer = dict(**_context_inputs(batch_size=2, n_docs=3, seed=3), num_beams=3, max_length=MAX_LENGTH)
    inner = dict(**_context_inputs(batch_size=3, n_docs=3, seed=4), num_beams=2, max_length=MAX_LENGTH)
    expected_outer, expected_inner = ours.generate(**outer), ours.generate(**inner)
    nested = _Nested(lambda: ours.generate(**inner))
    got = ours.generate(**outer, logits_processor=transformers.LogitsProcessorList([nested]))
    assert torch.equal(nested.result, expected_inner)
    assert torch.equal(got, expected_outer)


def test_forward_from_another_thread_during_generate(bart_models):
    # A forward pass another thread runs on the same model while a beam search is under way sees the
    # generator's own modules, not the decoding call's swapped cross-attention or hooks.
    _, ours = bart_models
    inputs = _context_inputs(batch_size=2, n_docs=3, seed=5)
    labels = torch.tensor([[2, 0, 7, 9, 2], [2, 0, 11, 2, 1]])
    with torch.no_grad():
        expected = ours(**inputs, labels=labels).loss

    def forward_elsewhere():
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("loss", ours(**inputs, labels=labels).loss.detach())
        )
        thread.start()
        thread.join()
        return result["loss"]

    nested = _Nested(forward_elsewhere)
    with torch.no_grad():
        ours.generate(
            **inputs,
            num_beams=3,
            max_length=MAX_LENGTH,
            logits_processor=transformers.LogitsProcessorList([nested]),
        )
    torch.testing.assert_close(nested.result, expected)


def test_expanded_prefixes_give_teacher_forced_log_probs():
    # Where a candidate's prefix was expanded by beam search under another document, the log-probability
    # scoring reads from generation is the one teacher forcing that candidate under that document gives.
    ours = _default_init_model("bart", 5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # wider than the default, narrower than the other tests: some projections run
        for param in ours.generator.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.25)
    options = DecodingOptions(probe_tokens=16)
    kwargs = dict(**_context_inputs(batch_size=3, n_docs=3, seed=83), num_beams=3, max_length=MAX_LENGTH)
    output, (args, keywords), pruned_rows = _thorough_call(ours, options, **kwargs)
    model, encoder_states, mask, _, sequences, rows, questions, _ = args
    candidates = sequences[rows]
    pad = model.config.generator.pad_token_id
    target = torch.cat([candidates[:, 1:], candidates.new_full((len(candidates), 1), pad)], dim=1)
    expanded = search.expanded_prefix_log_probs(
        keywords["search"], candidates, questions, target, target.ne(pad), 3
    )
    found = ~expanded.isnan()
    assert int(found.sum()) > len(candidates) * 3  # more than the decoder start of every pair
    with torch.no_grad():
        for doc in range(3):
            contexts = questions * 3 + doc
            logits = model.generator(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[contexts]),
                attention_mask=None if mask is None else mask[contexts],
                decoder_input_ids=candidates,
            ).logits
            exact = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            here = found[:, doc]
            torch.testing.assert_close(expanded[:, doc][here], exact[here], rtol=1e-5, atol=1e-4)
    # Scoring used them: fewer projections than without, same output.
    output_without, _, rows_without = _thorough_call(
        ours, options.replace(reuse_expanded_prefixes=False), **kwargs
    )
    assert 0 < pruned_rows < rows_without
    assert torch.equal(output, output_without)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_pruned_scoring_with_a_decoder_prompt(num_beams):
    # A decoder prompt shifts generation's steps against target positions: generation's own values are
    # not used then, and the output stays exhaustive scoring's.
    _, ours = _build("bart", seed=31)
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=0),
        num_beams=num_beams,
        max_length=MAX_LENGTH,
        decoder_input_ids=torch.tensor([[2, 0]] * 9),
    )
    pruned, (_, keywords), _ = _thorough_call(ours, **kwargs)
    assert keywords["known"] is None
    assert torch.equal(pruned, ours.generate(**kwargs, decoding_options=DecodingOptions(prune_scoring=False)))


def test_generation_config_without_cache_is_respected():
    # use_cache=False in the generator's generation config: no beam-shared cache is forced on generate.
    reference, ours = _build("bart", seed=31)
    ours.generator.generation_config.use_cache = False
    try:
        kwargs = dict(**_context_inputs(batch_size=3, n_docs=3, seed=0), num_beams=3, max_length=MAX_LENGTH)
        assert torch.equal(ours.generate(**kwargs), reference.generate(**kwargs))
    finally:
        ours.generator.generation_config.use_cache = True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_scoring_in_half_precision_returns_the_exhaustive_output(dtype):
    # Generation's values are float32 dot products against normalisers of rounded logits: in half
    # precision they differ from teacher forcing by rounding, so scoring does not take them there.
    _, ours = _build("bart", seed=105)
    ours.generator.to(dtype)
    options = DecodingOptions(probe_tokens=16)
    kwargs = dict(
        **_context_inputs(batch_size=4, n_docs=3, seed=5), num_beams=1, num_return_sequences=2, max_length=10
    )
    pruned, (_, keywords), _ = _thorough_call(ours, options, **kwargs)
    assert keywords["known"] is None
    assert torch.equal(pruned, ours.generate(**kwargs, decoding_options=options.replace(prune_scoring=False)))


def test_beam_search_cache_is_released_before_scoring(bart_models):
    # The beam search's keys/values (up to half the free GPU memory on CUDA) are gone while scoring runs.
    _, ours = bart_models
    alive = []
    trace = DecodingTrace()

    def check():
        gc.collect()
        alive.append(trace.beam_caches[-1]() is not None)

    trace.before_scoring = check
    ours.generate(
        **_context_inputs(batch_size=2, n_docs=3, seed=3),
        num_beams=3,
        max_length=MAX_LENGTH,
        decoding_options=DecodingOptions(trace=trace),
    )
    assert len(trace.beam_caches) == 1 and alive == [False]


def test_questions_per_batch_does_not_change_output(bart_models):
    _, ours = bart_models
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=7),
        num_beams=2,
        num_return_sequences=2,
        max_length=MAX_LENGTH,
    )
    assert torch.equal(ours.generate(**kwargs, questions_per_batch=1), ours.generate(**kwargs))


@pytest.mark.parametrize("decoding", ["thorough", "fast"])
def test_max_new_tokens_is_forwarded_to_the_generator(bart_models, decoding):
    # RAG-Sequence passes generation options to the generator's generate, so max_new_tokens counts the
    # tokens after the decoder start token there (as in the reference): max_length = max_new_tokens + 1.
    reference, ours = bart_models
    new_tokens = 3
    kwargs = dict(
        **_context_inputs(batch_size=3, n_docs=3, seed=29),
        num_beams=3,
        num_return_sequences=2,
    )
    got = ours.generate(**kwargs, max_new_tokens=new_tokens, decoding=decoding)
    assert got.shape[1] == new_tokens + 1
    assert torch.equal(got, ours.generate(**kwargs, max_length=new_tokens + 1, decoding=decoding))
    assert ours.generate(**kwargs, max_length=MAX_LENGTH, decoding=decoding).shape[1] > new_tokens + 1
    if decoding == "thorough":
        assert torch.equal(got, reference.generate(**kwargs, max_new_tokens=new_tokens))


# --- with a retriever -------------------------------------------------------------------------------


def _retriever(flavour, config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    """The reference RagRetriever over Transformers' index, or ragkit's over ragkit's own index (no fallback)."""
    if flavour == "reference":
        return transformers.RagRetriever(
            transformers.RagConfig(**config.to_dict()),
            question_encoder_tokenizer=question_encoder_tokenizer,
            generator_tokenizer=generator_tokenizer,
            index=CustomHFIndex(32, indexed_dataset),
        )
    return RagkitRetriever(
        config,
        question_encoder_tokenizer=question_encoder_tokenizer,
        generator_tokenizer=generator_tokenizer,
        index=RagkitCustomHFIndex(32, indexed_dataset),
    )


@pytest.mark.parametrize("flavour", ["reference", "ragkit"])
def test_matches_reference_with_retriever(
    flavour, question_encoder_tokenizer, generator_tokenizer, indexed_dataset
):
    # Contexts are truncated to 16 tokens, all longer than that: no padding, where the reference is right.
    reference, ours = _build("bart", seed=2, max_combined_length=16)
    reference_retriever = _retriever(
        "reference", reference.config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset
    )
    reference.set_retriever(reference_retriever)
    ours.set_retriever(
        _retriever(flavour, ours.config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
    )
    # Questions of equal length: the reference's scoring pass re-encodes them without their mask.
    encoded = question_encoder_tokenizer(["where is paris", "where is london"], return_tensors="pt")
    questions = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    contexts = reference_retriever(
        questions["input_ids"],
        reference.question_encoder(**questions)[0].detach().numpy(),
        prefix=getattr(reference.generator.config, "prefix", None),
        return_tensors="pt",
    )
    assert bool(contexts["context_attention_mask"].bool().all())
    kwargs = dict(**questions, num_beams=3, num_return_sequences=2, max_length=MAX_LENGTH)
    expected = reference.generate(**kwargs)
    assert torch.equal(ours.generate(**kwargs), expected)
    assert torch.equal(ours.generate(**kwargs, questions_per_batch=1), expected)


# --- where ragkit fixes the reference: context padding and a non-default n_docs -----------------------


def _explicit_thorough(reference, ids, mask, scores, n_docs, num_beams, num_return_sequences):
    """Per question: beams per document with the mask, dedup, each candidate scored against each document
    by a masked forward pass and the reference's own ``get_nll`` given the right ``n_docs``."""
    generator, pad = reference.generator, reference.config.generator.pad_token_id
    best = []
    for q in range(scores.shape[0]):
        rows = slice(q * n_docs, (q + 1) * n_docs)
        beams = generator.generate(
            ids[rows],
            attention_mask=mask[rows],
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_length=MAX_LENGTH,
        )
        candidates = torch.stack(list({str(k.tolist()): k for k in beams}.values()))
        count = candidates.shape[0]
        logits = generator(
            input_ids=ids[rows].repeat(count, 1),
            attention_mask=mask[rows].repeat(count, 1),
            decoder_input_ids=candidates.repeat_interleave(n_docs, dim=0),
        ).logits
        loss = reference.get_nll(
            logits, scores[q : q + 1].repeat(count, 1), candidates, exclude_bos_score=True, n_docs=n_docs
        )
        best.extend(_strip(candidates[i], pad) for i in (-loss).topk(num_return_sequences).indices)
    return best


def test_thorough_uses_context_mask_and_n_docs(bart_models):
    reference, ours = bart_models
    n_docs = 2  # the config says 3
    ids, mask, scores = _contexts(batch_size=3, n_docs=n_docs, seed=11, pads=[0, 4, 2, 0, 5, 3])
    kwargs = dict(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        num_beams=3,
        num_return_sequences=2,
        n_docs=n_docs,
        max_length=MAX_LENGTH,
    )
    got = ours.generate(**kwargs)
    expected = _explicit_thorough(reference, ids, mask, scores, n_docs, num_beams=3, num_return_sequences=2)
    assert [_strip(row, 1) for row in got] == expected
    # The reference cannot score with n_docs != config.n_docs (transformers issue 14394).
    with pytest.raises((AssertionError, RuntimeError)):
        reference.generate(**kwargs)


def test_context_padding_is_masked_unlike_reference(bart_models):
    reference, ours = bart_models
    ids, mask, scores = _contexts(batch_size=2, n_docs=3, seed=13, pads=[3, 0, 5, 2, 4, 0])
    kwargs = dict(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        num_beams=3,
        num_return_sequences=2,
        max_length=MAX_LENGTH,
    )
    got = ours.generate(**kwargs)
    expected = _explicit_thorough(reference, ids, mask, scores, 3, num_beams=3, num_return_sequences=2)
    assert [_strip(row, 1) for row in got] == expected
    # More padding changes nothing for ragkit; the reference attends to it while generating.
    wide_ids = torch.cat([ids, torch.ones(ids.shape[0], 6, dtype=ids.dtype)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros_like(wide_ids[:, :6])], dim=1)
    wide = dict(kwargs, context_input_ids=wide_ids, context_attention_mask=wide_mask)
    assert torch.equal(ours.generate(**wide), got)
    assert [_strip(row, 1) for row in reference.generate(**wide)] != expected


# --- fast decoding -------------------------------------------------------------------------------


def _brute_force_fast(generator, ids, mask, scores, n_docs, num_beams, num_return_sequences, extra):
    """log sum over the (document, beam) pairs that produced y of p(d|x) * exp(beam's summed token scores)."""
    doc_logprobs = torch.log_softmax(scores, dim=-1)
    best = []
    for q in range(scores.shape[0]):
        joint: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for d in range(n_docs):
            row = q * n_docs + d
            out = generator.generate(
                ids[row : row + 1],
                attention_mask=mask[row : row + 1],
                num_beams=num_beams,
                num_return_sequences=num_beams,
                max_length=MAX_LENGTH,
                output_scores=True,
                return_dict_in_generate=True,
                **extra,
            )
            transition = generator.compute_transition_scores(
                out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=num_beams == 1
            )
            for seq, token_scores in zip(out.sequences, transition):
                # Forced tokens score 0 after processing; past the end, transition scores are 0 too.
                joint.setdefault(_strip(seq, 1), []).append(doc_logprobs[q, d] + token_scores.sum())
        totals = {y: torch.stack(v).logsumexp(0).item() for y, v in joint.items()}
        assert all(torch.isfinite(torch.tensor(list(totals.values()))))
        ranked = sorted(totals, key=lambda y: -totals[y])
        best.extend(ranked[:num_return_sequences])
    return best


@pytest.mark.parametrize(
    "num_beams,num_return_sequences,extra",
    [
        (1, 1, {}),
        (1, 2, {"forced_bos_token_id": 0}),
        (3, 2, {}),
        (3, 3, {"forced_bos_token_id": 0, "min_length": 4}),
    ],
)
def test_fast_matches_its_definition(bart_models, num_beams, num_return_sequences, extra):
    _, ours = bart_models
    ids, mask, scores = _contexts(batch_size=2, n_docs=3, seed=17, pads=[0, 3, 0, 2, 0, 0])
    got = ours.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        max_length=MAX_LENGTH,
        decoding="fast",
        **extra,
    )
    assert got.shape[0] == 2 * num_return_sequences
    expected = _brute_force_fast(ours.generator, ids, mask, scores, 3, num_beams, num_return_sequences, extra)
    assert [_strip(row, 1) for row in got] == expected


def test_fast_and_thorough_agree_with_a_single_document(bart_models):
    # With one document both modes rank the same beams by (nearly) the same log-likelihood.
    _, ours = bart_models
    kwargs = dict(**_context_inputs(batch_size=3, n_docs=1, seed=19), n_docs=1, max_length=MAX_LENGTH)
    assert torch.equal(ours.generate(**kwargs, decoding="fast"), ours.generate(**kwargs))


# --- argument errors ----------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(bart_models):
    _, ours = bart_models
    ids, mask, scores = _contexts(batch_size=2, n_docs=3)
    base = dict(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, max_length=MAX_LENGTH)
    assert DECODING_MODES == ("thorough", "fast")
    with pytest.raises(ValueError, match="decoding"):
        ours.generate(**base, decoding="beam")
    with pytest.raises(ValueError, match="do_sample"):
        ours.generate(**base, decoding="fast", do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(**base, num_beams=1, num_return_sequences=4)
    with pytest.raises(ValueError, match="n_docs"):
        ours.generate(**base, n_docs=4)
    with pytest.raises(ValueError, match="doc_scores"):
        rag_sequence_generate(ours, context_input_ids=ids, context_attention_mask=mask)
    with pytest.raises(ValueError, match="retriever"):
        rag_sequence_generate(ours, input_ids=ids[:2])
    for bad in (0, -1):  # 0 used to be taken as "unset" and decode the whole batch at once
        with pytest.raises(ValueError, match="questions_per_batch"):
            ours.generate(**base, questions_per_batch=bad)


def test_padded_question_batch_matches_questions_one_at_a_time(
    question_encoder_tokenizer, generator_tokenizer, indexed_dataset
):
    # Questions of different lengths are padded; ragkit encodes them with their mask for retrieval and
    # scoring alike, and masks the padded retrieved contexts, so batching changes nothing.
    _, ours = _build("bart", seed=4)
    ours.set_retriever(
        _retriever("ragkit", ours.config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset)
    )
    texts = ["where is paris", "what is the capital of germany", "which river flows through london"]
    batch = question_encoder_tokenizer(texts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].bool().all())
    kwargs = dict(num_beams=2, num_return_sequences=2, max_length=MAX_LENGTH)
    together = ours.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    alone = []
    for text in texts:
        single = question_encoder_tokenizer([text], return_tensors="pt")
        alone += [_strip(row, 1) for row in ours.generate(input_ids=single["input_ids"], **kwargs)]
    assert [_strip(row, 1) for row in together] == alone
