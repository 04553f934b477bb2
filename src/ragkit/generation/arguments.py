"""Checks of the generation arguments both heads take: a clear, early error naming the argument and its limit."""

from __future__ import annotations

from typing import Any

from ..errors import RagInputError

__all__ = ["check_count", "check_generation_kwargs"]

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


def check_count(name: str, value: Any, least: int) -> None:
    """Raise unless ``value`` is None or an int of at least ``least``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RagInputError(f"`{name}` must be an integer of at least {least}, got {value!r}.")
    if value < least:
        raise RagInputError(f"`{name}` must be at least {least}, got {value}.")


def check_generation_kwargs(values: dict[str, Any]) -> None:
    """Checks every count among ``values`` (generation keyword arguments) against its limit."""
    for name, least in _LEAST.items():
        if name in values:
            check_count(name, values[name], least)
