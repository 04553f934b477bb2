"""Which decoding call is running: hooks and swapped modules act only for their own call.

A decoding call hooks and swaps the generator's modules for a while. The call running in this context
(a fresh object per call; None outside) is a context variable, so the hooks of a call act neither for a
forward pass another thread (whose context starts empty) runs on the same generator meanwhile, nor for a
generate nested in a callback. Calls on one generator are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["RAG_TOKEN_DECODING", "decoding_call", "generator_lock", "owned_by_this_call"]

_DECODING: contextvars.ContextVar[object | None] = contextvars.ContextVar("ragkit_decoding", default=None)
# True while RagTokenForGeneration.generate runs in this context (thread, task): marginalize() then mixes
# probabilities. A context variable, so that a forward another thread runs on the same model meanwhile
# keeps the log-space marginalization.
RAG_TOKEN_DECODING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ragkit_rag_token_decoding", default=False
)
_GENERATOR_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def generator_lock(generator: Any) -> threading.RLock:
    """The lock serialising decoding calls on one generator: they hook and swap its modules for a while."""
    with _LOCKS_LOCK:
        lock = _GENERATOR_LOCKS.get(generator)
        if lock is None:
            lock = _GENERATOR_LOCKS[generator] = threading.RLock()
        return lock


@contextlib.contextmanager
def decoding_call() -> Iterator[None]:
    """Marks the block as one decoding call (for the hooks and swapped modules it creates)."""
    token = _DECODING.set(object())
    try:
        yield
    finally:
        _DECODING.reset(token)


def owned_by_this_call() -> Callable[[], bool]:
    """A check, for a hook made now, of whether a running forward belongs to the current decoding call."""
    owner = _DECODING.get()
    return lambda: _DECODING.get() is owner
