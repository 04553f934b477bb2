"""RAG-Sequence generate's questions-per-call estimate against the memory a real generate holds.

On CUDA, without ``questions_per_batch``, generate decodes as many questions per generator call as
``_questions_fitting`` estimates fit in half the free GPU memory. Here the estimate is checked on CPU
against the peak bytes of tensors alive at once during a ragkit generate (:class:`LiveTensorBytes`), on
the shared cross-attention path (BART: each context's keys/values read by all its beams; T5: copies per
beam next to them) and off it (``DecodingOptions(fast_path=False)``: a copy per beam row), at shapes where
those keys/values dominate as they do for BART-large at 300-token contexts. On the shared path the search
reads the encoder states only for their shape: generate must not hold a copy of them per beam row.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ragkit import _compat
from ragkit.generation import DecodingOptions, DecodingTrace, rag_sequence
from ragkit.testing import tiny_bart_config, tiny_rag_config, tiny_rag_model, tiny_t5_config

N_DOCS, NUM_BEAMS, CONTEXT_LENGTH, QUESTIONS, MAX_LENGTH = 3, 4, 256, 2, 12
#: The estimate must lie within this factor of the measured peak, either way.
FACTOR = 4 / 3


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that operators allocate inside the mode, alive now and at most.

    A storage counts from the operator call that returns it (outputs the schema marks as aliasing an
    input, such as views and in-place results, allocate nothing) until it is freed (a finalizer on the
    storage tells). Storages allocated before the mode (weights, inputs) are not counted, so
    ``peak`` is the peak above that baseline.

    Attributes:
        live: Bytes of the counted storages alive now.
        peak: Largest ``live`` so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()  # the storages alive, by their C++ object

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for returned, tensor in zip(func._schema.returns, outputs):
            if returned.alias_info is None and isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._counted:
            return
        size = storage.nbytes()
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


class AllocatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns inside the mode (views and in-place results too).

    Attributes:
        shapes: The shapes seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.shapes.add(tuple(tensor.shape))
        return out


def test_live_tensor_bytes_counts_allocations_until_freed():
    before = torch.ones(1000)
    with LiveTensorBytes() as tracker:
        doubled = before * 2  # 4000 bytes
        view = doubled[:10]
        doubled.add_(1)
        assert tracker.live == tracker.peak == 4000  # neither the view, the in-place result nor `before`
        del doubled
        assert tracker.live == 4000  # the view keeps the storage
        del view
        assert tracker.live == 0
        joined = torch.cat([before, before])
        assert (tracker.live, tracker.peak) == (8000, 8000)
        del joined
    assert tracker.live == 0


def _memory_model(kind: str):
    """A RAG-Sequence model whose generator has 4 decoder layers of width 128 (fast path on).

    BART's beams read each context's cross-attention keys/values on the shared path; T5's get copies per
    beam next to them.
    """
    config = tiny_rag_config(kind, n_docs=N_DOCS)
    if kind == "bart":
        config.generator = tiny_bart_config(
            vocab_size=1000,
            d_model=128,
            encoder_layers=1,
            decoder_layers=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
        )
    else:  # as many encoder layers: Transformers sizes T5's generation cache by them
        config.generator = tiny_t5_config(
            vocab_size=1000, d_model=128, d_kv=32, num_layers=4, num_decoder_layers=4, d_ff=128
        )
    return tiny_rag_model(config).eval()


@pytest.fixture(scope="module", params=["bart", "t5"])
def model(request):
    """:func:`_memory_model` of each generator kind."""
    return _memory_model(request.param)


@pytest.fixture(scope="module")
def bart_model():
    """:func:`_memory_model` with the BART generator alone."""
    return _memory_model("bart")


def _generate_kwargs(decoding: str, options: DecodingOptions) -> dict[str, Any]:
    draw = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (QUESTIONS * N_DOCS, CONTEXT_LENGTH), generator=draw)
    return dict(
        context_input_ids=ids,
        context_attention_mask=torch.ones_like(ids),
        doc_scores=torch.randn(QUESTIONS, N_DOCS, generator=draw),
        num_beams=NUM_BEAMS,
        max_length=MAX_LENGTH,
        min_length=MAX_LENGTH,  # every beam runs to max_length, as the estimate assumes
        decoding=decoding,
        decoding_options=options,
    )


def _estimated_bytes(generator: Any, shared: bool) -> float:
    """What ``_questions_fitting`` budgets for QUESTIONS questions."""
    budget = 2**62
    fitting = rag_sequence._questions_fitting(
        generator,
        N_DOCS,
        NUM_BEAMS,
        CONTEXT_LENGTH,
        {"max_length": MAX_LENGTH},
        budget,
        shared_cross_attention=shared,
    )
    return QUESTIONS * budget / fitting


@pytest.mark.parametrize("decoding", ["fast", "thorough"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["shared", "per_beam"])
def test_questions_per_call_estimate_matches_the_measured_peak(model, decoding, fast_path):
    # Fast decoding has no pass after the search: its peak is the search's. Thorough decoding is measured up
    # to its scoring pass, which DecodingOptions.scoring_elements_* bounds, not the questions per call.
    search_peaks = []
    tracker = LiveTensorBytes()
    trace = DecodingTrace(before_scoring=lambda: search_peaks.append(tracker.peak))
    options = DecodingOptions(fast_path=fast_path, trace=trace)
    kwargs = _generate_kwargs(decoding, options)
    model.generate(**_generate_kwargs(decoding, DecodingOptions(fast_path=fast_path)))  # probe, warm-up
    with tracker:
        model.generate(**kwargs)
    assert tracker.live < tracker.peak
    measured = search_peaks[0] if decoding == "thorough" else tracker.peak
    assert len(search_peaks) == (decoding == "thorough")

    # The search took the path the estimate is told of.
    shared = rag_sequence._shared_cross_attention(model.generator, NUM_BEAMS, {}, options)
    assert shared == fast_path == bool(trace.beam_caches)
    if decoding == "thorough" and fast_path:  # the generation-step hooks' states were kept
        assert trace.scoring_calls[0][1]["search"] is not None

    estimated = _estimated_bytes(model.generator, shared)
    assert 1 / FACTOR <= estimated / measured <= FACTOR, (estimated / 2**20, measured / 2**20)
    if shared and model.config.generator.model_type == "bart":  # copies per beam row: well over twice as much
        assert _estimated_bytes(model.generator, False) > 2 * measured


def test_shared_cross_attention_as_the_search_decides(model):
    generator, options = model.generator, DecodingOptions()
    assert rag_sequence._shared_cross_attention(generator, NUM_BEAMS, {}, options)
    assert not rag_sequence._shared_cross_attention(generator, 1, {}, options)  # greedy search
    assert not rag_sequence._shared_cross_attention(generator, NUM_BEAMS, {"use_cache": False}, options)
    assert not rag_sequence._shared_cross_attention(
        generator, NUM_BEAMS, {}, DecodingOptions(fast_path=False)
    )


def _encoder_states_per_beam_row(model: Any) -> tuple[int, int, int]:
    """The shape of generate's copy of the encoder states per beam row: `(rows, src_len, hidden)`."""
    return (QUESTIONS * N_DOCS * NUM_BEAMS, CONTEXT_LENGTH, model.config.generator.d_model)


@pytest.mark.parametrize("decoding", ["fast", "thorough"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["shared", "per_beam"])
def test_shared_search_makes_no_encoder_states_per_beam_row(model, decoding, fast_path):
    # On the shared path every cross-attention layer reads its keys/values, and the decoder the encoder
    # states only for their shape: generate repeats a zero-width stand-in per beam row. Off it, the copy
    # (and the keys/values the first step projects from it) are the generator's own.
    model.generate(**_generate_kwargs(decoding, DecodingOptions(fast_path=fast_path)))  # probe, warm-up
    recorder = AllocatedShapes()
    with recorder:
        model.generate(**_generate_kwargs(decoding, DecodingOptions(fast_path=fast_path)))
    rows, src_len, _ = _encoder_states_per_beam_row(model)
    assert (_encoder_states_per_beam_row(model) in recorder.shapes) == (not fast_path)
    assert ((rows, src_len, 0) in recorder.shapes) == fast_path


def test_shared_search_peak_is_lower_by_the_encoder_states_per_beam_row(bart_model, monkeypatch):
    # BART's search peaks with generate's copy of the encoder states alive: without it, by its size less.
    # (T5's peak comes before the search, when the keys/values are copied per beam.)
    model = bart_model
    kwargs = _generate_kwargs("fast", DecodingOptions())
    model.generate(**kwargs)  # probe, warm-up
    peaks, outputs = [], []
    for stand_in in (True, False):
        with monkeypatch.context() as patched:
            if not stand_in:  # the encoder states themselves to generate, as off the shared path
                patched.setattr(_compat, "encoder_states_stand_in", lambda *args, **kwargs: None)
            with LiveTensorBytes() as tracker:
                outputs.append(model.generate(**kwargs))
        peaks.append(tracker.peak)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    copy = torch.Size(_encoder_states_per_beam_row(model)).numel() * 4  # float32
    assert 0.9 * copy <= peaks[1] - peaks[0] <= 1.1 * copy, (peaks, copy)
