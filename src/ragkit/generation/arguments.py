"""Checks of the generation arguments both heads take: a clear, early error naming the argument and its limit."""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..errors import RagInputError

__all__ = ["as_integer", "check_count", "check_generation_kwargs"]

# Generation options that are counts, and the least value each may take.
_LEAST = {
    "max_length": 1,  # counts the decoder start token
    "max_new_tokens": 1,
    "min_length": 0,
    "min_new_tokens": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "n_docs": 1,
    "top_k": 0,
    "no_repeat_ngram_size": 0,
}


def as_integer(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer, else None (booleans and floats included).

    Any integer is accepted, as Transformers does: a Python int, a numpy integer (``np.int64`` from
    ``np.arange`` or a data frame) or a one-element integer tensor. ``True`` is an int to Python, never a
    count here.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):  # floats, arrays, tensors of several elements
        return None


def check_count(name: str, value: Any, least: int) -> int | None:
    """``value`` as an int of at least ``least`` (None stays None); a :class:`RagInputError` otherwise."""
    if value is None:
        return None
    count = as_integer(value)
    if count is None:
        raise RagInputError(f"`{name}` must be an integer of at least {least}, got {value!r}.")
    if count < least:
        raise RagInputError(f"`{name}` must be at least {least}, got {count}.")
    return count


def check_generation_kwargs(values: dict[str, Any]) -> None:
    """Checks every count among ``values`` (generation keyword arguments) against its limit, and makes it an
    ``int`` in place (generation compares and stores counts as Python ints)."""
    for name, least in _LEAST.items():
        if name in values and values[name] is not None:
            values[name] = check_count(name, values[name], least)
