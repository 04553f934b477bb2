"""The capability probe covers the generation-step hooks RAG-Sequence scoring reads from beam search.

Each test plants one breakage of a hook's reliance on Transformers (through the ``ragkit._compat`` function
the hook goes through, or the cache's ``reorder_cache``) and checks that decoding notices: one warning
naming the reason, the plain path's output, and the hooks not attached, while shared cross-attention and
packed scoring (their own checks pass) stay on. Without a breakage the probe passes, runs the hooks on its
tiny searches, and decoding takes the fast path with them. The hook check runs only where decoding would
attach the hooks, holds the generator's lock, and sees none of the generator's own generation settings.
"""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch
import transformers
from transformers import BartForConditionalGeneration, DPRQuestionEncoder, T5ForConditionalGeneration

from rag_helpers import padded_context_inputs
from ragkit import RagSequenceForGeneration, _compat
from ragkit.generation import (
    DecodingOptions,
    DecodingTrace,
    fast_path_allowed,
    probe_fast_path,
    probe_step_hooks,
    search,
)
from ragkit.generation.calls import generator_lock
from ragkit.testing import tiny_rag_config

PROBE = "ragkit.generation.probe"
PROBE_ROWS = {4, 2}  # the probe's beam search (2 contexts x 2 beams) and greedy search (2 rows)


def _tiny_rag(kind: str = "bart", seed: int = 3) -> RagSequenceForGeneration:
    """A tiny RAG-Sequence model with wide random generator weights (varied hypotheses)."""
    config = tiny_rag_config(kind, hidden_size=32)
    reference_config = transformers.RagConfig(**config.to_dict())
    torch.manual_seed(seed)
    generator_class = BartForConditionalGeneration if kind == "bart" else T5ForConditionalGeneration
    generator = generator_class(reference_config.generator)
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in generator.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=draw))
    model = RagSequenceForGeneration(
        config=config,
        question_encoder=DPRQuestionEncoder(reference_config.question_encoder),
        generator=generator,
    )
    return model.eval()


def _inputs(num_beams: int = 3, seed: int = 5) -> dict:
    return padded_context_inputs(num_beams=num_beams, seed=seed)


# --- planted breakages: each a change of Transformers the hooks rely on ----------------------------


def _stale_logits(monkeypatch):
    """The model output's logits lag one step behind (a cache of the previous step's output)."""
    original, previous = _compat.step_logits, {}

    def stale(output):
        logits = original(output)
        last = previous.get(logits.shape)
        previous[logits.shape] = logits
        return logits if last is None else last

    monkeypatch.setattr(_compat, "step_logits", stale)


def _shifted_logits(monkeypatch):
    """Each row's logits are another row's (rows reordered before the output reaches the hook)."""
    original = _compat.step_logits
    monkeypatch.setattr(_compat, "step_logits", lambda output: torch.roll(original(output), 1, dims=0))


def _shifted_states(monkeypatch):
    """The output head sees the decoder states in another row order than the logits come out in."""
    original = _compat.step_head_states
    monkeypatch.setattr(_compat, "step_head_states", lambda args: torch.roll(original(args), 1, dims=0))


def _offset_beam_indices(monkeypatch):
    """beam_indices point at the running row one step late (an off-by-one of their layout)."""
    original = _compat.generated_beam_indices

    def offset(output):
        indices = original(output)
        return None if indices is None else torch.cat([indices[:, :1], indices[:, :-1]], dim=1)

    monkeypatch.setattr(_compat, "generated_beam_indices", offset)


def _stale_beam_orders(monkeypatch):
    """Beam search stops telling the cache how it reorders rows (the cache reorders, the record does not)."""
    original = _compat.BeamSharedCrossCache.reorder_cache

    def unrecorded(self, beam_idx):
        original(self, beam_idx)
        self.beam_orders[-1] = torch.arange(len(beam_idx), device=beam_idx.device)

    monkeypatch.setattr(_compat.BeamSharedCrossCache, "reorder_cache", unrecorded)


def _raising_hook(monkeypatch):
    """The model call's keywords changed shape: reading the decoder ids raises."""

    def raises(kwargs):
        raise RuntimeError("decoder ids are not a keyword any more")

    monkeypatch.setattr(_compat, "decoder_input_ids_of_call", raises)


def _silent_hook(monkeypatch):
    """The decoder ids are no longer seen by the hook: nothing is recorded (scoring would recompute silently)."""
    monkeypatch.setattr(_compat, "decoder_input_ids_of_call", lambda kwargs: None)


BREAKAGES = [
    (_stale_logits, "log-likelihoods differ from teacher forcing"),
    (_shifted_logits, "log-likelihoods differ from teacher forcing"),
    (_shifted_states, "log-likelihoods differ from teacher forcing"),
    (_offset_beam_indices, "beam search hooks"),
    (_stale_beam_orders, "beam search hooks miss"),
    (_raising_hook, "RuntimeError: decoder ids are not a keyword any more"),
    (_silent_hook, "recorded 0 decoder inputs"),
]


@pytest.mark.parametrize("plant,reason", BREAKAGES, ids=[plant.__name__.strip("_") for plant, _ in BREAKAGES])
def test_broken_step_hooks_fall_back_with_one_warning(plant, reason, monkeypatch, caplog):
    model = _tiny_rag()
    plain = model.generate(**_inputs(), decoding_options=DecodingOptions(fast_path=False))
    plant(monkeypatch)
    trace = DecodingTrace()
    with caplog.at_level(logging.WARNING, logger=PROBE):
        got = model.generate(**_inputs(), decoding_options=DecodingOptions(trace=trace))
        again = model.generate(**_inputs())
    warnings = [record.getMessage() for record in caplog.records if record.name == PROBE]
    assert len(warnings) == 1 and reason in warnings[0], warnings  # once per generator, naming the reason
    assert "generation-step hooks" in warnings[0]
    assert len(trace.fast_path_fallbacks) == 1 and reason in trace.fast_path_fallbacks[0]
    # Only the hooks are off: nothing taken from generation, but shared cross-attention and packed scoring
    # (their own checks pass) still run.
    assert trace.scoring_calls[0][1]["known"] is None and trace.scoring_calls[0][1]["search"] is None
    assert len(trace.beam_caches) == 1 and trace.packed == [True]
    assert torch.equal(got, plain) and torch.equal(again, plain)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_greedy_and_beam_decoding_fall_back_on_stale_logits(num_beams, monkeypatch, caplog):
    model = _tiny_rag(seed=4)
    plain = model.generate(**_inputs(num_beams), decoding_options=DecodingOptions(fast_path=False))
    _stale_logits(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=PROBE):
        got = model.generate(**_inputs(num_beams))
    assert [record.name for record in caplog.records].count(PROBE) == 1
    assert torch.equal(got, plain)


def test_probe_names_the_search_whose_hooks_broke(monkeypatch):
    # Stale beam orders leave greedy search's records intact: the reason is beam search's.
    generator = _tiny_rag().generator
    _stale_beam_orders(monkeypatch)
    assert probe_step_hooks(generator).startswith("beam search hooks miss")
    assert probe_fast_path(generator).startswith("beam search hooks miss")


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_sound_hooks_pass_the_probe_and_decoding_uses_them(kind, monkeypatch, caplog):
    model = _tiny_rag(kind)
    plain = model.generate(**_inputs(), decoding_options=DecodingOptions(fast_path=False))
    # A spy on the hooks' reading of each step's logits: which searches ran with the hooks attached.
    original, rows_seen = _compat.step_logits, []

    def spy(output):
        logits = original(output)
        rows_seen.append(logits.shape[0])
        return logits

    monkeypatch.setattr(_compat, "step_logits", spy)
    trace = DecodingTrace()
    with caplog.at_level(logging.WARNING, logger=PROBE):
        got = model.generate(**_inputs(), decoding_options=DecodingOptions(trace=trace))
        again = model.generate(**_inputs())
    assert not [record for record in caplog.records if record.name == PROBE]
    assert trace.fast_path_fallbacks == []
    # The probe ran the hooks on its tiny searches (3 steps each), once for both calls...
    assert sorted(rows for rows in rows_seen if rows in PROBE_ROWS) == [2, 2, 2, 4, 4, 4]
    # ...and both decoding calls hooked their own search (2 questions x 3 documents x 3 beams).
    assert rows_seen.count(18) >= 2
    # Scoring took each hypothesis's pair log-likelihood and the expanded prefixes from generation.
    keywords = trace.scoring_calls[0][1]
    assert len(trace.beam_caches) == 1
    assert keywords["search"] is not None and keywords["known"] is not None
    assert bool((~keywords["known"].isnan()).any())
    assert torch.equal(got, plain) and torch.equal(again, plain)


def test_a_hook_failure_leaves_the_other_fast_paths_on(monkeypatch):
    # The verdicts are separate: stale logits fail only the hook check.
    model = _tiny_rag()
    _stale_logits(monkeypatch)
    assert probe_fast_path(model.generator).startswith("beam search hooks")
    trace = DecodingTrace()
    model.generate(**_inputs(), decoding_options=DecodingOptions(trace=trace))
    assert len(trace.beam_caches) == 1  # shared cross-attention still used
    assert trace.packed == [True] and trace.scoring_calls[0][1]["fast_path"] is True
    assert trace.scoring_calls[0][1]["search"] is None  # the hooks were not attached
    assert fast_path_allowed(model.generator, DecodingOptions()) is False  # not every path passes


def test_the_hook_check_runs_only_where_decoding_attaches_the_hooks(monkeypatch, caplog):
    model = _tiny_rag()
    checks = []
    original = search.step_states_for

    def counting(*args, **kwargs):
        checks.append(args[1])
        return original(*args, **kwargs)

    # The probe builds its hooks through its own import of step_states_for: count those.
    monkeypatch.setattr("ragkit.generation.probe.step_states_for", counting)
    _stale_logits(monkeypatch)  # a hook check, were it run, would warn
    with caplog.at_level(logging.WARNING, logger=PROBE):
        fast = model.generate(**_inputs(), decoding="fast")
        model.generate(**_inputs(), decoding_options=DecodingOptions(prune_scoring=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(**_inputs())
    assert checks == [] and not caplog.records  # fast decoding and the others never attach the hooks
    assert fast.shape[0] == 4
    with caplog.at_level(logging.WARNING, logger=PROBE):
        model.generate(**_inputs())
    assert checks == [2]  # at their first use: the beam search (whose failure ends the check)
    assert len(caplog.records) == 1 and "generation-step hooks" in caplog.records[0].getMessage()


def test_beam_search_without_a_shared_cache_still_passes_the_hook_check(monkeypatch, caplog):
    # A generator whose cache is not an encoder-decoder one gets no shared cross-attention; beam search
    # then records no reordering and scoring recomputes the expanded prefixes, but the hypotheses'
    # own log-likelihoods still come from the hooks.
    model = _tiny_rag()
    plain = model.generate(**_inputs(), decoding_options=DecodingOptions(fast_path=False))
    monkeypatch.setattr(search, "beam_shared_cross_attention", lambda *args: None)
    assert probe_step_hooks(model.generator) is None
    trace = DecodingTrace()
    with caplog.at_level(logging.WARNING, logger=PROBE):
        got = model.generate(**_inputs(), decoding_options=DecodingOptions(trace=trace))
    assert not caplog.records and trace.fast_path_fallbacks == []
    assert trace.beam_caches == [] and trace.scoring_calls[0][1]["search"] is not None
    assert bool((~trace.scoring_calls[0][1]["known"].isnan()).any())
    assert torch.equal(got, plain)


def test_the_probes_hold_the_generator_lock():
    generator = _tiny_rag().generator
    lock = generator_lock(generator)
    free_elsewhere = []

    def lock_free_in_another_thread() -> bool:
        got = []

        def try_lock() -> None:
            got.append(lock.acquire(blocking=False))
            if got[0]:
                lock.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
        return got[0]

    handle = generator.register_forward_pre_hook(
        lambda module, args: free_elsewhere.append(lock_free_in_another_thread())
    )
    try:
        assert probe_step_hooks(generator) is None
        hooks_forwards = len(free_elsewhere)
        assert probe_fast_path(generator) is None
    finally:
        handle.remove()
    assert hooks_forwards > 0 and len(free_elsewhere) > hooks_forwards
    assert not any(free_elsewhere)  # every forward of either probe ran with the lock held
    assert lock_free_in_another_thread()  # and released after


def test_the_probe_ignores_the_generators_own_generation_settings(caplog):
    model = _tiny_rag()
    config = model.generator.generation_config
    config.max_length, config.repetition_penalty, config.min_new_tokens = 20, 2.0, 5
    config.renormalize_logits = True
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert probe_step_hooks(model.generator) is None
    assert [record.getMessage() for record in caplog.records] == []  # no "Both `max_new_tokens` ..."
    assert [str(warning.message) for warning in caught] == []
    assert model.generator.generation_config is config and config.repetition_penalty == 2.0  # restored


def test_the_hook_check_runs_where_autocast_does_not_know_the_device(monkeypatch):
    generator = _tiny_rag().generator
    with torch.autocast("cpu", dtype=torch.bfloat16):  # called under autocast: turned off for the check
        assert probe_step_hooks(generator) is None

    def unsupported(device_type, *args, **kwargs):
        raise RuntimeError(f"autocast does not support device type {device_type}")

    monkeypatch.setattr(torch, "autocast", unsupported)
    assert probe_step_hooks(generator) is None
