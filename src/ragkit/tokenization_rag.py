"""RagTokenizer: the question encoder's tokenizer for questions, the generator's for targets and decoding."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from . import _compat
from ._io import atomic_directory
from .configuration_rag import RagConfig
from .errors import MissingFileError, RagInputError

logger = logging.getLogger(__name__)

__all__ = ["RagTokenizer"]

QUESTION_ENCODER_SUBFOLDER = "question_encoder_tokenizer"
GENERATOR_SUBFOLDER = "generator_tokenizer"


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that locating a Hub file understands."""
    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder")
    return {k: kwargs[k] for k in keys if k in kwargs}


def _length_kwargs(
    tokenizer: PreTrainedTokenizerBase, max_length: int | None, truncation: bool
) -> dict[str, Any]:
    """``max_length``/``truncation`` arguments, defaulting to the tokenizer's limit when it has a real one."""
    if max_length is None:
        limit = tokenizer.model_max_length
        # Tokenizers without a known limit report a huge sentinel that cannot be passed on.
        max_length = limit if limit is not None and limit < 1_000_000 else None
    if max_length is None:
        return {}
    return {"max_length": max_length, "truncation": truncation}


def _check_subfolder(location: str | os.PathLike, subfolder: str) -> None:
    """Raise ``MissingFileError`` when the local checkpoint ``location`` lacks the tokenizer folder ``subfolder``."""
    if os.path.isdir(location) and not os.path.isdir(os.path.join(location, subfolder)):
        raise MissingFileError(
            f"{os.fspath(location)!r} has no {subfolder}/ folder, so its tokenizer cannot be loaded (without it "
            "every word would become an unknown token). Save the tokenizers there with "
            "`RagTokenizer(question_encoder=..., generator=...).save_pretrained(path)`, or copy the folder from "
            "the checkpoint it came from."
        )


def _check_has_vocabulary(tokenizer: PreTrainedTokenizerBase, location: Any, subfolder: str) -> None:
    """Raise ``MissingFileError`` when the loaded tokenizer knows nothing but its special tokens."""
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise MissingFileError(
            f"The tokenizer in {subfolder}/ of {os.fspath(location)!r} has no vocabulary (only "
            f"{len(tokenizer)} special tokens): its vocabulary files are missing. Check that the checkpoint "
            f"holds {subfolder}/ with the tokenizer's files (tokenizer.json, or vocab/merges files)."
        )


def _local_config(location: str | os.PathLike, kwargs: dict[str, Any]) -> RagConfig | None:
    """The RAG config next to the tokenizers, or None for a local directory without ``config.json``."""
    if os.path.isdir(location) and not os.path.isfile(os.path.join(location, "config.json")):
        return None  # saved by RagTokenizer.save_pretrained alone: each tokenizer names its own class
    return RagConfig.from_pretrained(location, **_hub_kwargs(kwargs))


class RagTokenizer:
    """Pair of tokenizers used by RAG, saved as ``question_encoder_tokenizer/`` and ``generator_tokenizer/``.

    Calling the tokenizer tokenizes questions with the question encoder's tokenizer. Targets
    (``text_target=`` or inside :meth:`as_target_tokenizer`) and decoding use the generator's
    tokenizer. Transformers' RAG tokenizes ``text_target`` with the question encoder's tokenizer,
    which gives labels in the wrong vocabulary; ragkit fixes that (see ``docs/migrating.md``).

    Args:
        question_encoder: Tokenizer of the question encoder (for example DPR's).
        generator: Tokenizer of the generator (for example BART's).
    """

    def __init__(self, question_encoder: PreTrainedTokenizerBase, generator: PreTrainedTokenizerBase):
        self.question_encoder = question_encoder
        self.generator = generator
        self.current_tokenizer = self.question_encoder

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write both tokenizers into their subfolders of ``save_directory``.

        Each subfolder is written under a temporary name and then replaces the previous one whole, so an
        interrupted save leaves the previous tokenizer or the new one, never a mix of their files.
        """
        if os.path.isfile(save_directory):
            raise RagInputError(f"`save_directory` ({save_directory}) is a file; give a directory path.")
        os.makedirs(save_directory, exist_ok=True)
        for tokenizer, subfolder in (
            (self.question_encoder, QUESTION_ENCODER_SUBFOLDER),
            (self.generator, GENERATOR_SUBFOLDER),
        ):
            with atomic_directory(os.path.join(save_directory, subfolder)) as tmp:
                tokenizer.save_pretrained(os.fspath(tmp))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> RagTokenizer:
        """Load both tokenizers from a RAG checkpoint (Hub id or local directory).

        A directory written by :meth:`save_pretrained` alone (no ``config.json``) loads too: each
        tokenizer's own files name its class.

        Args:
            pretrained_model_name_or_path: Hub id such as ``"facebook/rag-sequence-nq"`` or a local directory
                holding ``question_encoder_tokenizer/`` and ``generator_tokenizer/``.
            **kwargs: ``config`` (a :class:`RagConfig`) and options forwarded to ``AutoTokenizer.from_pretrained``
                (``revision``, ``cache_dir``, ``token``, ...).

        Returns:
            RagTokenizer

        Raises:
            MissingFileError: A tokenizer folder is missing, or holds no vocabulary.
        """
        config = kwargs.pop("config", None)
        for subfolder in (QUESTION_ENCODER_SUBFOLDER, GENERATOR_SUBFOLDER):
            _check_subfolder(pretrained_model_name_or_path, subfolder)
        if config is None:
            config = _local_config(pretrained_model_name_or_path, kwargs)
        tokenizers = {}
        for part, subfolder in (
            ("question_encoder", QUESTION_ENCODER_SUBFOLDER),
            ("generator", GENERATOR_SUBFOLDER),
        ):
            part_config = None if config is None else getattr(config, part)
            config_kwargs = {} if part_config is None else {"config": part_config}
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **config_kwargs, **kwargs
            )
            _check_has_vocabulary(tokenizer, pretrained_model_name_or_path, subfolder)
            tokenizers[part] = tokenizer
        return cls(**tokenizers)

    def __call__(
        self, *args: Any, text_target: Any = None, text_pair_target: Any = None, **kwargs: Any
    ) -> BatchEncoding:
        """Tokenize questions with the current tokenizer; ``text_target`` with the generator's tokenizer.

        Targets are tokenized in the generator tokenizer's target mode (the language code of an MBart,
        M2M100 or NLLB tokenizer is its target language's), from ``text_target`` and ``text_pair_target``
        only: ``text`` and ``text_pair`` are the questions'. With both ``text`` and ``text_target`` the
        targets' ids are returned as ``labels``.
        """
        has_text = bool(args) or kwargs.get("text") is not None
        if text_target is None:
            if text_pair_target is not None:
                raise RagInputError(
                    "`text_pair_target` needs `text_target`: give the targets as `text_target`."
                )
            return self.current_tokenizer(*args, **kwargs)
        target_kwargs = {k: v for k, v in kwargs.items() if k not in ("text", "text_pair")}
        targets = self.generator(text_target=text_target, text_pair_target=text_pair_target, **target_kwargs)
        if not has_text:
            return targets
        inputs = self.current_tokenizer(*args, **kwargs)
        inputs["labels"] = targets["input_ids"]
        return inputs

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Decode generated ids with the generator's tokenizer."""
        return self.generator.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Decode one sequence of generated ids with the generator's tokenizer."""
        return self.generator.decode(*args, **kwargs)

    @contextlib.contextmanager
    def as_target_tokenizer(self) -> Iterator[RagTokenizer]:
        """Within this context, calling the tokenizer tokenizes targets with the generator's tokenizer."""
        self._switch_to_target_mode()
        try:
            yield self
        finally:
            self._switch_to_input_mode()

    def _switch_to_input_mode(self) -> None:
        """Questions again: the question encoder's tokenizer, and the generator's back in its input mode."""
        self.current_tokenizer = self.question_encoder
        _compat.set_tokenizer_target_mode(self.generator, False)

    def _switch_to_target_mode(self) -> None:
        """Targets: the generator's tokenizer, in its target mode (its special tokens for targets)."""
        self.current_tokenizer = self.generator
        _compat.set_tokenizer_target_mode(self.generator, True)

    def prepare_seq2seq_batch(
        self,
        src_texts: str | list[str],
        tgt_texts: str | list[str] | None = None,
        max_length: int | None = None,
        max_target_length: int | None = None,
        padding: str | bool = "longest",
        return_tensors: str | None = None,
        truncation: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize questions (and optionally targets) into one batch, as the API reference's first example uses it.

        Args:
            src_texts: Question(s), tokenized with the question encoder's tokenizer.
            tgt_texts: Target answer(s), tokenized with the generator's tokenizer into ``labels``.
            max_length: Max length of the questions (defaults to the tokenizer's model max length).
            max_target_length: Max length of the targets (defaults to ``max_length``).
            padding: Padding strategy for both.
            return_tensors: ``"pt"``, ``"np"`` or ``None``.
            truncation: Whether to truncate to the max lengths.
            **kwargs: Forwarded to both tokenizers.

        Returns:
            BatchEncoding with ``input_ids``, ``attention_mask`` and, with targets, ``labels``.
        """
        model_inputs = self.question_encoder(
            src_texts,
            add_special_tokens=True,
            return_tensors=return_tensors,
            padding=padding,
            **_length_kwargs(self.question_encoder, max_length, truncation),
            **kwargs,
        )
        if tgt_texts is None:
            return model_inputs
        labels = self.generator(
            text_target=tgt_texts,
            add_special_tokens=True,
            return_tensors=return_tensors,
            padding=padding,
            **_length_kwargs(self.generator, max_target_length or max_length, truncation),
            **kwargs,
        )
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs
