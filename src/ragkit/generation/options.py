"""Decoding options (one frozen object passed explicitly) and an optional trace of what a call did."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RagInputError

__all__ = ["DEFAULT_OPTIONS", "DecodingOptions", "DecodingTrace"]

#: Accepted values of ``DecodingOptions.scoring_path``.
SCORING_PATHS = (None, "packed", "rows")


@dataclasses.dataclass
class DecodingTrace:
    """What one decoding call did, recorded when passed as ``DecodingOptions(trace=...)`` (diagnostics, tests).

    Attributes:
        scoring_calls: Per thorough scoring call, its positional arguments and keywords (options left out).
        projected_rows: Decoder states projected onto the whole vocabulary by thorough scoring.
        packed: Per thorough scoring call that tried the packed path, whether it scored there (False: the
            trie was too wide and the rows path scored).
        beam_caches: Weak references to the caches beam search ran with (shared cross-attention).
        before_scoring: Called (no arguments) right before each thorough scoring call.
        fast_path_fallbacks: Reasons the capability probe gave for turning a fast path off (one per
            failed check consulted).
    """

    scoring_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = dataclasses.field(default_factory=list)
    projected_rows: int = 0
    packed: list[bool] = dataclasses.field(default_factory=list)
    beam_caches: list[weakref.ref] = dataclasses.field(default_factory=list)
    before_scoring: Callable[[], None] | None = None
    fast_path_fallbacks: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """How ragkit decodes: paths and budgets. The defaults are what ``generate`` uses.

    Pass one as ``generate(..., decoding_options=DecodingOptions(...))`` (both heads).

    Attributes:
        fast_path: Use the paths that reach into the generator's modules (each context's cross-attention
            computed once and shared by its beams, packed prefix-trie scoring, scores read from generation's
            own steps). A capability probe checks each once per generator (one decoder step of each
            swapped path; the generation-step hooks, on a tiny beam search and greedy search against
            teacher forcing, only when decoding is first about to attach them) and turns off, with one
            warning, only a path that would differ; False always takes the plain path.
        scoring_path: ``"packed"`` (each question's prefix trie in one decoder sequence per document),
            ``"rows"`` (one decoder row per candidate and document) or None: packed on CPU where the
            generator supports it, rows on CUDA (packed measured slower there: cuDNN builds an attention
            graph per packed shape).
        share_cross_attention: Rows path: copy each document's cross-attention keys/values to its
            candidates (less compute, more memory); None: on CPU, not on CUDA.
        prune_scoring: Skip projections that cannot change the output (False: exhaustive, same output).
        packed_max_width: Widest prefix trie (nodes of one question) scored packed; wider go by rows.
        scoring_elements_cpu: Elements one scoring step may hold on CPU (a decoder pass, a round of logits).
        scoring_elements_cuda: The same on CUDA.
        negligible: A document term this many nats below its candidate's best is dropped (< e^-30 relative).
        probe_tokens: Vocabulary ids whose logits bound every scored log-probability from above.
        margin: Smallest score gap (nats) that rules a candidate out.
        reuse_expanded_prefixes: Take log-probabilities of prefixes beam search expanded from generation.
        trace: A :class:`DecodingTrace` to record into, or None.
    """

    fast_path: bool = True
    scoring_path: str | None = None
    share_cross_attention: bool | None = None
    prune_scoring: bool = True
    packed_max_width: int = 1024
    scoring_elements_cpu: int = 1 << 25
    scoring_elements_cuda: int = 1 << 28
    negligible: float = 30.0
    probe_tokens: int = 2048
    margin: float = 1e-3
    reuse_expanded_prefixes: bool = True
    trace: DecodingTrace | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.scoring_path not in SCORING_PATHS:
            raise RagInputError(
                f"DecodingOptions.scoring_path must be one of {SCORING_PATHS}, got {self.scoring_path!r}."
            )
        for name in ("packed_max_width", "scoring_elements_cpu", "scoring_elements_cuda", "probe_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RagInputError(f"DecodingOptions.{name} must be a positive integer, got {value!r}.")

    def scoring_budget(self, device: torch.device) -> int:
        """Elements one scoring step may hold on ``device``."""
        return self.scoring_elements_cuda if device.type == "cuda" else self.scoring_elements_cpu

    def replace(self, **changes: Any) -> DecodingOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = DecodingOptions()


def resolve_options(options: DecodingOptions | None) -> DecodingOptions:
    """``options``, or the defaults; a clear error for anything else."""
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, DecodingOptions):
        raise RagInputError(
            f"`decoding_options` must be a ragkit.generation.DecodingOptions, got {type(options).__name__}."
        )
    return options
