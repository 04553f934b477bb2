"""Pooling of encoder hidden states into one vector per text, shared by question and passage encoders."""

from __future__ import annotations

import torch

from .errors import RagInputError

__all__ = ["POOLING_MODES", "pool_hidden_states"]

#: ``"pooler"``: the model's own pooled output (DPR); ``"cls"``: first token; ``"mean"``: masked mean
#: over tokens, as sentence encoders such as all-MiniLM-L6-v2 use.
POOLING_MODES = ("pooler", "cls", "mean")


def pool_hidden_states(
    outputs,
    attention_mask: torch.Tensor | None,
    pooling: str = "pooler",
    normalize: bool = False,
) -> torch.Tensor:
    """Reduce encoder outputs to `(batch_size, dim)` vectors.

    Args:
        outputs: A model output (``pooler_output``/``last_hidden_state``) or a tuple whose first
            element is either a pooled `(batch_size, dim)` tensor or hidden states `(batch_size, seq_len, dim)`.
        attention_mask: `(batch_size, seq_len)`, 1 for real tokens; needed for ``"mean"``.
        pooling: One of :data:`POOLING_MODES`.
        normalize: L2-normalize the vectors (sentence-transformers models end with this).

    Returns:
        `(batch_size, dim)` tensor.
    """
    if pooling not in POOLING_MODES:
        raise RagInputError(f"`pooling` must be one of {POOLING_MODES}, got {pooling!r}.")
    first = outputs[0]
    if pooling == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            pooled = first
        if pooled.dim() != 2:
            raise RagInputError(
                "pooling='pooler' needs an encoder whose first output is pooled `(batch_size, dim)` (such as DPR); "
                f"got shape {tuple(pooled.shape)}. Use pooling='mean' or 'cls' for plain encoders."
            )
    else:
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            hidden = first
        if hidden.dim() != 3:
            raise RagInputError(
                f"pooling={pooling!r} needs hidden states `(batch_size, seq_len, dim)`, got {tuple(hidden.shape)}."
            )
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.long)
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
