"""Load RAG checkpoints for training or evaluation, and build one from a question encoder and a generator.

Loading is shared by fine-tuning, evaluation and the demo, so it lives here rather than with any of them
(and imports none of them).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_directory, check_not_inside, check_replaceable, read_json_object
from .encoders import declared_pooling, resolve_encoder_name, vector_width
from .errors import CorruptFileError, MissingFileError, RagInputError

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_TYPES",
    "RAG_CHECKPOINT_ENTRIES",
    "check_model_location",
    "check_safetensors_file",
    "consolidate_rag_checkpoint",
    "faiss_index_width",
    "is_rag_checkpoint",
    "load_rag_for_training",
    "resolve_device",
]

MODEL_TYPES = ("rag_sequence", "rag_token")

#: What ``save_pretrained`` of a RAG model and its tokenizer writes: a directory holding only these (and
#: ragkit's own training outputs) may be replaced by a new checkpoint.
RAG_CHECKPOINT_ENTRIES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "question_encoder_tokenizer",
    "generator_tokenizer",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "context_encoder",
    "trainer_state.pt",
)

# `namespace/name` or `name`: what the Hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``name`` or ``namespace/name``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def check_model_location(name_or_path: str | os.PathLike, what: str) -> None:
    """Raise :class:`~ragkit.errors.MissingFileError` when ``name_or_path`` is neither a local path nor a Hub id.

    A name that exists locally or has the form of a Hub id (``name`` or ``namespace/name``) passes; the
    Hub is not contacted here.

    Args:
        name_or_path: A model directory or Hub id.
        what: The argument or flag it came from, named in the message (``"--generator_name_or_path"``).
    """
    name = os.fspath(name_or_path)
    if os.path.exists(name) or _looks_like_hub_id(name):
        return
    raise MissingFileError(
        f"{what} {name!r} does not exist and is not a Hub model id (`name` or `namespace/name`): give a model "
        "directory written by save_pretrained, or a Hub id such as facebook/bart-large."
    )


def check_safetensors_file(path: str | os.PathLike, advice: str | None = None) -> None:
    """Raise :class:`~ragkit.errors.CorruptFileError` when a ``.safetensors`` file is truncated or not one.

    Reads only the header (8-byte length, JSON) and checks that the file holds every byte it announces, so a
    damaged file is named before it is loaded.

    Args:
        path: The file.
        advice: What the user should do, when not "write the checkpoint again".
    """
    path = Path(path)
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_length < 2 or 8 + header_length > size:
                problem = "its header is missing or cut off"
            else:
                header = json.loads(f.read(header_length))
                ends = [
                    int(entry["data_offsets"][1])
                    for name, entry in header.items()
                    if name != "__metadata__" and isinstance(entry, dict)
                ]
                expected = 8 + header_length + max(ends, default=0)
                if size < expected:
                    problem = f"it holds {size} bytes but its header announces {expected}"
    except (ValueError, KeyError, TypeError, IndexError):
        problem = "its header is not valid safetensors JSON"
    if problem is not None:
        raise CorruptFileError(
            f"{path} is damaged ({problem}): the file was truncated or overwritten, e.g. by an interrupted copy. "
            + (advice or "Copy or write the checkpoint again (rerun the command that wrote it).")
        )


def is_rag_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local directory whose ``config.json`` has ``model_type: "rag"``."""
    config = read_json_object(Path(path) / "config.json")
    return config is not None and config.get("model_type") == "rag"


def _check_rag_checkpoint(path: str | os.PathLike) -> None:
    """Raise a clear error when a local ``path`` is not a RAG checkpoint (Hub ids pass through)."""
    path = Path(path)
    if not path.exists():
        if os.path.isabs(path) or str(path).startswith(".") or not _looks_like_hub_id(str(path)):
            raise MissingFileError(
                f"RAG checkpoint {path} does not exist; give a directory written by save_pretrained / "
                "`ragkit consolidate`, or a Hub id such as facebook/rag-sequence-nq."
            )
        return  # a Hub id: from_pretrained downloads it (or finds it in the cache)
    if not is_rag_checkpoint(path):
        config_file = path / "config.json"
        if config_file.is_file():
            try:
                with open(config_file, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
                raise CorruptFileError(
                    f"{config_file} cannot be read ({type(err).__name__}: {err}): the file is truncated or damaged. "
                    "Copy or write the checkpoint again (rerun the command that wrote it)."
                ) from err
        found = (
            "no config.json" if not config_file.is_file() else "a config.json whose model_type is not 'rag'"
        )
        raise RagInputError(
            f"{path} is not a RAG checkpoint ({found}). Build one from a question encoder and a generator with "
            "`ragkit consolidate --model_type rag_sequence --question_encoder_name_or_path QE "
            "--generator_name_or_path GEN --dest DIR`, or pass them to `ragkit finetune` with "
            "--question_encoder_name_or_path/--generator_name_or_path."
        )
    weights = path / "model.safetensors"
    if weights.is_file():
        check_safetensors_file(weights)


def _model_class(model_type: str) -> Any:
    """The ragkit head class for ``rag_sequence`` or ``rag_token``."""
    from .modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

    if model_type == "rag_sequence":
        return RagSequenceForGeneration
    if model_type == "rag_token":
        return RagTokenForGeneration
    raise RagInputError(f"`model_type` must be one of {MODEL_TYPES}, got {model_type!r}.")


def _model_type_of_checkpoint(path: str | os.PathLike) -> str | None:
    """``rag_sequence``/``rag_token`` from a local checkpoint's ``architectures`` field, if present."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    with open(config_file, encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    for name in architectures:
        if "Token" in name:
            return "rag_token"
        if "Sequence" in name:
            return "rag_sequence"
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_rag_for_training(
    model_name_or_path: str | os.PathLike,
    model_type: str | None = None,
    index_name: str | None = None,
    index_path: str | None = None,
    passages_path: str | None = None,
    n_docs: int | None = None,
    device: str | torch.device | None = None,
    retriever: Any = None,
    init_retrieval: bool = True,
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """Load a RAG checkpoint with its tokenizer and retriever, optionally pointing it at another index.

    Args:
        model_name_or_path: A RAG checkpoint directory or Hub id.
        model_type: ``rag_sequence`` or ``rag_token``; read from the checkpoint when ``None``.
        index_name: Override the checkpoint's ``index_name`` (``custom``, ``exact``, ``compressed``, ``legacy``).
        index_path: Override the faiss index path (custom/legacy indexes).
        passages_path: Override the passages path.
        n_docs: Override ``n_docs``.
        device: Where to put the model (defaults to CUDA when available).
        retriever: A ready :class:`~ragkit.RagRetriever`; skips building one from the config.
        init_retrieval: Load the index now; ``False`` when a distributed retriever will serve it instead.
        **config_overrides: Other RAG config fields to set (``label_smoothing``, ``max_combined_length``, ...).

    Returns:
        ``(model, tokenizer)``, the model on ``device`` with the retriever attached.

    Raises:
        MissingFileError: A local checkpoint path that does not exist.
        RagInputError: A directory that is not a RAG checkpoint.
        CorruptFileError: A truncated ``model.safetensors``.
    """
    from .configuration_rag import RagConfig
    from .retrieval_rag import RagRetriever
    from .tokenization_rag import RagTokenizer

    _check_rag_checkpoint(model_name_or_path)
    model_type = model_type or _model_type_of_checkpoint(model_name_or_path) or "rag_sequence"
    config = RagConfig.from_pretrained(model_name_or_path)
    for name, value in {
        "index_name": index_name,
        "index_path": index_path,
        "passages_path": passages_path,
        "n_docs": n_docs,
        **config_overrides,
    }.items():
        if value is not None:
            setattr(config, name, value)
    config.validate_rag_fields()
    tokenizer = RagTokenizer.from_pretrained(model_name_or_path, config=config)
    if retriever is None:
        retriever = RagRetriever.from_pretrained(
            model_name_or_path, config=config, init_retrieval=init_retrieval
        )
    model = _model_class(model_type).from_pretrained(model_name_or_path, config=config, retriever=retriever)
    return model.to(resolve_device(device)), tokenizer


def _check_consolidate_destination(dest: Path, inputs: dict[str, str | None]) -> None:
    """Refuse a ``dest`` that holds a user's files or one of the inputs (it is replaced whole)."""
    for what, name in inputs.items():
        if name is not None and os.path.exists(name):
            check_not_inside(dest, name, what)
    check_replaceable(dest, RAG_CHECKPOINT_ENTRIES, "`dest`")


def faiss_index_width(path: str | os.PathLike) -> int | None:
    """The vector width ``d`` of a faiss index file, read from its header (the index itself is not loaded).

    Every float index that ``faiss.write_index`` writes starts with a four-letter type code followed by
    ``d`` as a 32-bit integer. Returns None for a file that does not start that way (so callers skip
    the check rather than refuse an index faiss itself may read).
    """
    with open(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8 or not header[:4].isalnum():
        return None
    width = int.from_bytes(header[4:], "little", signed=True)
    return width if width > 0 else None


def _check_index_width(
    rag_fields: dict[str, Any], question_encoder: str, pooling: str, normalize: bool
) -> None:
    """Refuse an index file whose vectors are not as wide as the question vectors (``retrieval_vector_size``)."""
    index_path = rag_fields.get("index_path")
    if index_path is None or not os.path.isfile(index_path):
        return
    index_width = faiss_index_width(index_path)
    width = rag_fields["retrieval_vector_size"]
    if index_width is not None and index_width != width:
        raise RagInputError(
            f"The index {os.fspath(index_path)!r} holds vectors of width {index_width}, but the question encoder "
            f"{question_encoder!r} gives vectors of width {width} (pooling {pooling!r}, normalize {normalize}): "
            "retrieval would fail. Use the question encoder of the encoder family the index was built with, or "
            "rebuild the index with `ragkit build-index --encoder` of the question encoder's family."
        )


def consolidate_rag_checkpoint(
    model_type: str,
    question_encoder_name_or_path: str,
    generator_name_or_path: str,
    dest: str | os.PathLike,
    question_encoder_tokenizer_name_or_path: str | None = None,
    generator_tokenizer_name_or_path: str | None = None,
    config_name_or_path: str | None = None,
    **rag_fields: Any,
) -> Path:
    """Write a RAG checkpoint (model, config, both tokenizers) built from a question encoder and a generator.

    Same job as the research project's ``consolidate_rag_checkpoint.py``. The directory is written
    atomically and replaced whole, so ``dest`` must be new, empty or an earlier RAG checkpoint, and must not
    hold any of the inputs.

    Args:
        model_type: ``rag_sequence`` or ``rag_token``.
        question_encoder_name_or_path: Question encoder (DPR, a sentence-transformers model or another
            BERT-like encoder); ``all-MiniLM-L6-v2`` resolves as in every command
            (:func:`~ragkit.encoders.resolve_encoder_name`). Unless ``question_encoder_pooling`` /
            ``question_encoder_normalize`` are given, they are what the encoder declares, as
            :func:`~ragkit.encoders.load_text_encoder` reads it for an index (DPR: pooler; all-MiniLM-L6-v2:
            mean, L2-normalized; other encoders: first token).
        generator_name_or_path: Seq2seq generator (BART, T5, ...).
        dest: Output directory.
        question_encoder_tokenizer_name_or_path: Defaults to ``question_encoder_name_or_path``.
        generator_tokenizer_name_or_path: Defaults to ``generator_name_or_path``.
        config_name_or_path: A RAG config to start from (its sub-configs, and what describes its question
            encoder's vectors, pooling, normalization and width, are replaced by the models').
        **rag_fields: RAG config fields (``n_docs``, ``index_name``, ``passages_path``, ``index_path``,
            ``retrieval_vector_size``, ``question_encoder_pooling``, ...).

    Returns:
        The checkpoint directory.

    Raises:
        MissingFileError: A model path that does not exist and is not a Hub id.
        ValueError: ``dest`` holds files ragkit did not write, or one of the inputs.
        RagInputError: ``index_path`` is a faiss index whose width differs from the question vectors'.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .configuration_rag import RagConfig
    from .tokenization_rag import RagTokenizer

    model_class = _model_class(model_type)
    question_encoder_name_or_path = resolve_encoder_name(question_encoder_name_or_path)
    question_encoder_tokenizer_name_or_path = resolve_encoder_name(
        question_encoder_tokenizer_name_or_path or question_encoder_name_or_path
    )
    generator_tokenizer_name_or_path = generator_tokenizer_name_or_path or generator_name_or_path
    inputs = {
        "`question_encoder_name_or_path`": question_encoder_name_or_path,
        "`generator_name_or_path`": os.fspath(generator_name_or_path),
        "`question_encoder_tokenizer_name_or_path`": question_encoder_tokenizer_name_or_path,
        "`generator_tokenizer_name_or_path`": os.fspath(generator_tokenizer_name_or_path),
        "`config_name_or_path`": None if config_name_or_path is None else os.fspath(config_name_or_path),
    }
    for what, name in inputs.items():
        if name is not None:
            check_model_location(name, what)
    dest = Path(dest)
    _check_consolidate_destination(dest, inputs)

    question_encoder_config = AutoConfig.from_pretrained(question_encoder_name_or_path)
    generator_config = AutoConfig.from_pretrained(generator_name_or_path)
    if config_name_or_path is not None:
        base = RagConfig.from_pretrained(config_name_or_path).to_dict()
        # The base's question encoder is replaced, and with it what describes its vectors.
        for key in (
            "question_encoder",
            "generator",
            "model_type",
            "architectures",
            "transformers_version",
            "question_encoder_pooling",
            "question_encoder_normalize",
            "retrieval_vector_size",
        ):
            base.pop(key, None)
        rag_fields = {**base, **rag_fields}
    # Questions must be read as the index was built from this encoder (`ragkit build-index` reads what the
    # encoder declares), not with RagConfig's DPR default.
    if (
        rag_fields.get("question_encoder_pooling") is None
        or rag_fields.get("question_encoder_normalize") is None
    ):
        pooling, normalize, _ = declared_pooling(question_encoder_name_or_path, question_encoder_config)
        if rag_fields.get("question_encoder_pooling") is None:
            rag_fields["question_encoder_pooling"] = pooling
        if rag_fields.get("question_encoder_normalize") is None:
            rag_fields["question_encoder_normalize"] = normalize
    if rag_fields.get("retrieval_vector_size") is None:
        rag_fields["retrieval_vector_size"] = vector_width(
            question_encoder_config, rag_fields["question_encoder_pooling"]
        )
    logger.info(
        "Question encoder %s: pooling=%s, normalize=%s, vectors of width %d",
        question_encoder_name_or_path,
        rag_fields["question_encoder_pooling"],
        rag_fields["question_encoder_normalize"],
        rag_fields["retrieval_vector_size"],
    )
    _check_index_width(
        rag_fields,
        question_encoder_name_or_path,
        rag_fields["question_encoder_pooling"],
        rag_fields["question_encoder_normalize"],
    )
    for key in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
        if getattr(generator_config, key, None) is not None:
            rag_fields.setdefault(key, getattr(generator_config, key))
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder_config, generator_config, **rag_fields
    )
    model = model_class.from_pretrained_question_encoder_generator(
        question_encoder_name_or_path, generator_name_or_path, config=config
    )
    tokenizer = RagTokenizer(
        question_encoder=AutoTokenizer.from_pretrained(question_encoder_tokenizer_name_or_path),
        generator=AutoTokenizer.from_pretrained(generator_tokenizer_name_or_path),
    )
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("RAG checkpoint (%s) written to %s", model_type, dest)
    return dest
