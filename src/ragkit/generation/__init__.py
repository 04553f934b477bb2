"""ragkit's decoding, behind both heads' ``generate``. Read top to bottom from the entry points:

- :mod:`.rag_sequence`: ``RagSequenceForGeneration.generate`` (:func:`rag_sequence_generate`): settings,
  contexts, one generator beam search per batch of questions, then scoring.
- :mod:`.rag_token`: ``RagTokenForGeneration.generate`` (:func:`rag_token_generate`): Transformers' search
  loops over document-marginalized token scores.
- :mod:`.options`: :class:`DecodingOptions` (paths, budgets, the fast-path switch), passed explicitly, and
  :class:`DecodingTrace`.
- :mod:`.arguments`: checks of counts (``num_beams``, ``max_length``, ...) shared by both heads.
- :mod:`.contexts`: question -> contexts (``RagModel.encode_questions`` / ``retrieve_contexts``), trimming.
- :mod:`.calls`: which decoding call a hook belongs to; one lock per generator.
- :mod:`.probe`: checks once per generator that each fast path reproduces the plain one.
- :mod:`.search`: the generator's beam search with shared cross-attention, and what it records.
- :mod:`.scoring`: "thorough" scoring (the RAG-Sequence loss rules, bounded projections), rows path.
- :mod:`.packing`: packed prefix-trie scoring.
- :mod:`.fast`: the RAG paper's "fast" decoding.

Transformers internals are used only through :mod:`ragkit._compat`.
"""

from __future__ import annotations

from .options import DecodingOptions, DecodingTrace
from .probe import fast_path_allowed, probe_fast_path, probe_step_hooks
from .rag_sequence import DECODING_MODES, rag_sequence_generate
from .rag_token import rag_token_generate

__all__ = [
    "DECODING_MODES",
    "DecodingOptions",
    "DecodingTrace",
    "fast_path_allowed",
    "probe_fast_path",
    "probe_step_hooks",
    "rag_sequence_generate",
    "rag_token_generate",
]
