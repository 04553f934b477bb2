"""Fine-tune RAG models in plain PyTorch, and build RAG checkpoints from a question encoder and a generator.

This is the research project's ``finetune_rag.py`` / ``consolidate_rag_checkpoint.py`` without
PyTorch Lightning:

* data: ``{train,val,test}.{source,target}`` line files (one question / one answer per line) or
  ``{train,val,test}.jsonl`` (``{"question": ..., "answer": ...}``; ``"answers": [...]`` lists several
  acceptable answers for EM);
* the loss is the RAG marginal likelihood, so gradients reach the question encoder through
  ``doc_scores``; with ``end2end`` the context encoder is trained too and the passages are
  re-embedded and the index rebuilt every ``index_rebuild_steps`` steps;
* mixed precision on GPU (bf16 where supported, else fp16 with loss scaling);
* validation EM after every epoch, checkpoints written atomically to ``<output_dir>/checkpoint-last``
  holding everything a resumed run needs (model, optimizer, scheduler, loss scaler, step, position
  in the epoch, RNG states), so ``resume=True`` continues as if never interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_directory, atomic_file
from .distributed import add_distributed_retriever_arguments, distributed_retriever_from_args
from .evaluation import evaluate_answers, generate_answers

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_TYPES",
    "QAExample",
    "RagTrainer",
    "TrainResult",
    "TrainingArguments",
    "configure_parser",
    "consolidate_rag_checkpoint",
    "encode_qa_batch",
    "is_rag_checkpoint",
    "load_qa_split",
    "load_rag_for_training",
    "refresh_index",
    "run",
]

MODEL_TYPES = ("rag_sequence", "rag_token")
CHECKPOINT_DIRNAME = "checkpoint-last"
FINAL_DIRNAME = "final"
TRAINER_STATE_FILE = "trainer_state.pt"
CONTEXT_ENCODER_DIRNAME = "context_encoder"

# ----------------------------------------------------------------------------- data


@dataclass
class QAExample:
    """One training or evaluation pair.

    Attributes:
        source: The question (input of the question encoder).
        target: The answer the generator is trained to produce.
        answers: All acceptable answers (for EM/F1); ``[target]`` unless the data lists more.
    """

    source: str
    target: str
    answers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [self.target]


def _read_text_lines(path: Path) -> list[str]:
    """Lines of ``path`` without line endings (a trailing empty line is dropped)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _read_jsonl(path: Path) -> list[QAExample]:
    """Examples from a JSONL file with ``question``/``source`` and ``answer``/``target``/``answers`` keys."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); fix or remove the line."
                ) from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {number}: each line must be a JSON object such as "
                    f'{{"question": ..., "answer": ...}}, got {type(record).__name__}.'
                )
            source = record.get("question", record.get("source"))
            answers = record.get("answers")
            if answers is not None and not isinstance(answers, (str, list)):
                raise ValueError(
                    f"{path}, line {number}: 'answers' must be a string or a list of strings, "
                    f"got {type(answers).__name__}."
                )
            target = record.get("answer", record.get("target"))
            if isinstance(answers, str):
                answers = [answers]
            if target is None and answers:
                target = answers[0]
            if not isinstance(source, str) or not isinstance(target, str):
                raise ValueError(
                    f"{path}, line {number}: each record needs a string 'question' (or 'source') and a string "
                    "'answer' (or 'target', or a non-empty list 'answers')."
                )
            examples.append(QAExample(source, target, [str(a) for a in answers] if answers else [target]))
    return examples


def load_qa_split(data_dir: str | os.PathLike, split: str, required: bool = True) -> list[QAExample] | None:
    """Load one split from ``{split}.source``/``{split}.target`` line files or ``{split}.jsonl``.

    Args:
        data_dir: Directory holding the files.
        split: ``"train"``, ``"val"`` or ``"test"``.
        required: Raise when the split has no files (else return ``None``).

    Returns:
        The examples, or ``None`` for a missing optional split.

    Raises:
        FileNotFoundError: No files for a required split, or only one of ``.source``/``.target``.
        ValueError: Source and target line counts differ, or the split is empty.
    """
    data_dir = Path(data_dir)
    source, target, jsonl = (data_dir / f"{split}.{ext}" for ext in ("source", "target", "jsonl"))
    if source.is_file() or target.is_file():
        if not (source.is_file() and target.is_file()):
            present, absent = (source, target) if source.is_file() else (target, source)
            raise FileNotFoundError(
                f"Found {present} but not {absent}: line-file data needs both {split}.source (questions) "
                f"and {split}.target (answers), one per line, in {data_dir}."
            )
        sources, targets = _read_text_lines(source), _read_text_lines(target)
        if len(sources) != len(targets):
            raise ValueError(
                f"{source} has {len(sources)} lines but {target} has {len(targets)}: the files are misaligned. "
                "Line i of the .target file must be the answer to line i of the .source file."
            )
        examples = [QAExample(s, t) for s, t in zip(sources, targets)]
    elif jsonl.is_file():
        examples = _read_jsonl(jsonl)
    elif required:
        raise FileNotFoundError(
            f"No {split} data in {data_dir}: expected {split}.source + {split}.target (one question / answer "
            f"per line) or {split}.jsonl (records with 'question' and 'answer')."
        )
    else:
        return None
    if not examples:
        raise ValueError(f"The {split} split in {data_dir} is empty; add at least one question/answer pair.")
    return examples


def encode_qa_batch(
    tokenizer: Any,
    examples: Sequence[QAExample],
    max_source_length: int = 128,
    max_target_length: int = 25,
    decoder_start_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize questions (question encoder) and answers (generator) into model inputs.

    Labels start with the generator's ``decoder_start_token_id`` (prepended when the tokenizer does
    not put it there), so the sequences trained on are the ones ``generate`` produces: the RAG loss
    predicts ``labels[1:]`` from ``labels[:-1]``, and a one-token answer still carries a loss.

    Args:
        tokenizer: A :class:`~ragkit.RagTokenizer`.
        examples: The batch.
        max_source_length: Questions are truncated to this many tokens.
        max_target_length: Answers are truncated to this many tokens.
        decoder_start_token_id: Token generation starts from (the generator config's).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (padded with the generator's pad id).
    """
    inputs = tokenizer.question_encoder(
        [e.source for e in examples],
        max_length=max_source_length,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    targets = tokenizer.generator(
        [e.target for e in examples], max_length=max_target_length, truncation=True, add_special_tokens=True
    )["input_ids"]
    pad_id = tokenizer.generator.pad_token_id
    if pad_id is None:
        raise ValueError(
            "The generator tokenizer has no pad token; set one (tokenizer.generator.pad_token = ...)."
        )
    if decoder_start_token_id is not None:
        targets = [
            t if t and t[0] == decoder_start_token_id else [decoder_start_token_id, *t] for t in targets
        ]
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}


# ----------------------------------------------------------------------------- checkpoints and models


def is_rag_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local directory whose ``config.json`` has ``model_type: "rag"``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "rag"
    except (OSError, json.JSONDecodeError):
        return False


def _check_rag_checkpoint(path: str | os.PathLike) -> None:
    """Raise a clear error when a local ``path`` is not a RAG checkpoint (Hub ids pass through)."""
    path = Path(path)
    if not path.exists():
        if os.path.isabs(path) or str(path).startswith(".") or str(path).count("/") != 1:
            raise FileNotFoundError(
                f"RAG checkpoint {path} does not exist; give a directory written by save_pretrained / "
                "`ragkit consolidate`, or a Hub id such as facebook/rag-sequence-nq."
            )
        return  # a Hub id: from_pretrained downloads it (or finds it in the cache)
    if not is_rag_checkpoint(path):
        found = (
            "no config.json"
            if not (path / "config.json").is_file()
            else "a config.json whose model_type is not 'rag'"
        )
        raise ValueError(
            f"{path} is not a RAG checkpoint ({found}). Build one from a question encoder and a generator with "
            "`ragkit consolidate --model_type rag_sequence --question_encoder_name_or_path QE "
            "--generator_name_or_path GEN --dest DIR`, or pass them to `ragkit finetune` with "
            "--question_encoder_name_or_path/--generator_name_or_path."
        )


def _model_class(model_type: str) -> Any:
    """The ragkit head class for ``rag_sequence`` or ``rag_token``."""
    from .modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

    if model_type == "rag_sequence":
        return RagSequenceForGeneration
    if model_type == "rag_token":
        return RagTokenForGeneration
    raise ValueError(f"`model_type` must be one of {MODEL_TYPES}, got {model_type!r}.")


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
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
    return model.to(_resolve_device(device)), tokenizer


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

    Same job as the research project's ``consolidate_rag_checkpoint.py``; the directory is written
    atomically.

    Args:
        model_type: ``rag_sequence`` or ``rag_token``.
        question_encoder_name_or_path: Question encoder (DPR, or a BERT-like encoder with
            ``question_encoder_pooling="mean"``).
        generator_name_or_path: Seq2seq generator (BART, T5, ...).
        dest: Output directory.
        question_encoder_tokenizer_name_or_path: Defaults to ``question_encoder_name_or_path``.
        generator_tokenizer_name_or_path: Defaults to ``generator_name_or_path``.
        config_name_or_path: A RAG config to start from (its sub-configs are replaced by the models').
        **rag_fields: RAG config fields (``n_docs``, ``index_name``, ``passages_path``, ``index_path``,
            ``retrieval_vector_size``, ``question_encoder_pooling``, ...).

    Returns:
        The checkpoint directory.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .configuration_rag import RagConfig
    from .tokenization_rag import RagTokenizer

    model_class = _model_class(model_type)
    question_encoder_config = AutoConfig.from_pretrained(question_encoder_name_or_path)
    generator_config = AutoConfig.from_pretrained(generator_name_or_path)
    if config_name_or_path is not None:
        base = RagConfig.from_pretrained(config_name_or_path).to_dict()
        for key in ("question_encoder", "generator", "model_type", "architectures", "transformers_version"):
            base.pop(key, None)
        rag_fields = {**base, **rag_fields}
    # The question vectors' width: DPR's projection when it has one, else the hidden size.
    width = getattr(question_encoder_config, "projection_dim", 0) or getattr(
        question_encoder_config, "hidden_size", 768
    )
    rag_fields.setdefault("retrieval_vector_size", width)
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
        question_encoder=AutoTokenizer.from_pretrained(
            question_encoder_tokenizer_name_or_path or question_encoder_name_or_path
        ),
        generator=AutoTokenizer.from_pretrained(generator_tokenizer_name_or_path or generator_name_or_path),
    )
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("RAG checkpoint (%s) written to %s", model_type, dest)
    return Path(dest)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainingArguments:
    """Settings of a fine-tuning run (the flags of ``ragkit finetune``).

    Attributes:
        output_dir: Where checkpoints (``checkpoint-last/``), the final model (``final/``) and
            ``metrics.json`` go.
        num_train_epochs: Passes over the training data.
        train_batch_size: Questions per forward pass.
        eval_batch_size: Questions per generation batch during validation.
        gradient_accumulation_steps: Forward passes per optimizer step.
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_steps: Linear warm-up steps, then linear decay to 0.
        max_grad_norm: Gradient clipping norm (0 disables clipping).
        label_smoothing: Epsilon of label smoothing in the RAG loss.
        n_docs: Passages retrieved per question (defaults to the model's config).
        max_source_length: Questions are truncated to this many tokens.
        max_target_length: Answers are truncated to this many tokens for training.
        val_max_target_length: Max generated tokens at validation.
        num_beams: Beam size at validation.
        precision: ``"auto"`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        seed: Seed of data order, dropout and initialisation.
        save_steps: Also write a checkpoint every this many optimizer steps (0: only after each epoch).
        max_steps: Stop after this many optimizer steps (the schedule still spans all epochs), with a
            checkpoint, as an interrupted run would leave it.
        resume: Continue from ``output_dir/checkpoint-last`` when it exists.
        freeze_question_encoder: Keep the question encoder fixed (no gradient through ``doc_scores``).
        freeze_generator: Keep the generator fixed (train retrieval only).
        cache_retrieval: Retrieve once per training question and reuse the contexts and document scores
            every epoch. Only valid with ``freeze_question_encoder`` and without ``end2end`` (retrieval
            is then a constant); saves the question encoder and retrieval cost of every step.
        end2end: Also train the context encoder and refresh the index every ``index_rebuild_steps``.
        index_rebuild_steps: Optimizer steps between two index refreshes with ``end2end``.
        do_validation: Compute validation EM after each epoch when validation data is given.
        save_checkpoints: Write ``checkpoint-last`` after each epoch (and every ``save_steps``) and the
            final model; off for throw-away runs such as the demo.
        show_progress: Show progress bars.
    """

    output_dir: str
    num_train_epochs: int = 3
    train_batch_size: int = 8
    eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    n_docs: int | None = None
    max_source_length: int = 128
    max_target_length: int = 25
    val_max_target_length: int = 25
    num_beams: int = 1
    precision: str = "auto"
    seed: int = 42
    save_steps: int = 0
    max_steps: int | None = None
    resume: bool = False
    freeze_question_encoder: bool = False
    freeze_generator: bool = False
    cache_retrieval: bool = False
    end2end: bool = False
    index_rebuild_steps: int = 500
    do_validation: bool = True
    save_checkpoints: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "num_train_epochs",
            "train_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"`precision` must be auto, fp32, bf16 or fp16, got {self.precision!r}.")
        if self.cache_retrieval and (self.end2end or not self.freeze_question_encoder):
            raise ValueError(
                "`cache_retrieval` reuses retrieval results, so it needs a fixed retriever: set "
                "`freeze_question_encoder=True` and `end2end=False`, or turn `cache_retrieval` off."
            )
        if self.end2end and self.index_rebuild_steps < 1:
            raise ValueError(
                f"`index_rebuild_steps` must be >= 1 with end2end, got {self.index_rebuild_steps!r}."
            )


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        global_step: Optimizer steps taken so far (over all resumed runs).
        epoch: Epochs completed.
        losses: Mean training loss of each optimizer step, in order (resumed runs included).
        val_em: Validation EM after each completed epoch.
        checkpoint_dir: The last checkpoint written.
        final_dir: The final model, when the run completed all epochs.
        interrupted: True when the run stopped at ``max_steps`` before the end.
    """

    global_step: int
    epoch: int
    losses: list[float]
    val_em: list[float]
    checkpoint_dir: Path | None = None
    final_dir: Path | None = None
    interrupted: bool = False


def _check_index_width(model: Any) -> None:
    """Raise early, naming the index, when question vectors and indexed passages differ in width."""
    retriever = getattr(model, "retriever", None)
    index = getattr(retriever, "index", None)
    faiss_index = getattr(index, "faiss_index", None)
    index_width = getattr(faiss_index, "d", None) or getattr(index, "vector_size", None)
    if index_width is None:
        return
    rag = getattr(model, "rag", model)
    encoder_config = rag.question_encoder.config
    width = getattr(encoder_config, "projection_dim", 0) or getattr(encoder_config, "hidden_size", None)
    if width and int(width) != int(index_width):
        where = getattr(model.config, "index_path", None) or "the retriever's index"
        raise ValueError(
            f"The question encoder makes {width}-dim vectors but {where} holds {index_width}-dim passages: the "
            "index was built with a different encoder. Rebuild it with an encoder of the same width "
            "(`ragkit build-index --encoder ...`, the context encoder that goes with your question encoder), "
            "or start from a question encoder that matches the index."
        )


def _capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states."""
    # numpy's key array as a tensor, so the checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (
        name,
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached_gaussian),
    )
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`_capture_rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """Shuffled example order of one epoch, a function of (seed, epoch) only so resumes see the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: full precision)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _load_model_weights(model: torch.nn.Module, directory: Path, device: torch.device) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model`` in place; tied copies may be absent."""
    from safetensors.torch import load_file

    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{directory} has no model.safetensors; the checkpoint is incomplete, resume cannot work."
        )
    result = model.load_state_dict(load_file(str(weights), device=str(device)), strict=False)
    owners: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        owners.setdefault(tensor.data_ptr(), []).append(name)
    missing = set(result.missing_keys)
    # A missing key is fine when it shares storage with a loaded one (tied embeddings are saved once).
    lost = [k for k in missing if all(o in missing for o in owners[model.state_dict()[k].data_ptr()])]
    if lost or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match the model: missing {sorted(lost)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}. Resume with the same model type and configuration."
        )


def refresh_index(
    retriever: Any,
    context_encoder: Any,
    context_encoder_tokenizer: Any,
    config: Any,
    batch_size: int = 32,
    show_progress: bool = False,
) -> None:
    """Re-embed every passage of ``retriever``'s index with ``context_encoder`` and swap in a rebuilt faiss index.

    Args:
        retriever: A :class:`~ragkit.RagRetriever` over a custom index (passages held in a ``datasets.Dataset``).
        context_encoder: The passage encoder being trained.
        context_encoder_tokenizer: Its tokenizer.
        config: The RAG config: pooling and normalisation (``question_encoder_pooling``/``_normalize``,
            the same the model scores documents with) and faiss search settings.
        batch_size: Passages per encoder forward pass.
        show_progress: Show a progress bar.
    """
    import faiss
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from .encoders import TextEncoder
    from .retrieval.custom import CustomHFIndex

    dataset = getattr(retriever.index, "dataset", None)
    if dataset is None:
        raise ValueError(
            "end2end training re-embeds the passages of a custom index (index_name='custom', built with "
            "`ragkit build-index`); this retriever's index has no passages dataset to re-embed."
        )
    encoder = TextEncoder(
        model=context_encoder,
        tokenizer=context_encoder_tokenizer,
        pooling=config.question_encoder_pooling,
        normalize=config.question_encoder_normalize,
        device=next(context_encoder.parameters()).device,
    )
    titles, texts = dataset["title"], dataset["text"]
    embeddings = encoder.encode(titles, batch_size=batch_size, show_progress=show_progress, text_pairs=texts)
    dim = embeddings.shape[1]
    # Exact search for small corpora (the usual end2end scale), an HNSW graph beyond.
    if len(embeddings) <= 50_000:
        faiss_index = faiss.IndexFlatIP(dim)
    else:
        faiss_index = faiss.IndexHNSWFlat(dim, 64, faiss.METRIC_INNER_PRODUCT)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)
    table = pa.table(
        {"title": pa.array(titles, pa.string()), "text": pa.array(texts, pa.string()), "embeddings": vectors}
    )
    refreshed = Dataset(InMemoryTable(table))
    refreshed.add_faiss_index("embeddings", custom_index=faiss_index)  # fills the (empty) index
    retriever.index = CustomHFIndex(
        config.retrieval_vector_size,
        refreshed,
        nprobe=getattr(config, "index_nprobe", None),
        ef_search=getattr(config, "index_ef_search", None),
    )
    retriever.init_retrieval()
    logger.info("index rebuilt: %d passages re-embedded with the trained context encoder", len(titles))


class RagTrainer:
    """Plain-PyTorch training loop for :class:`~ragkit.RagSequenceForGeneration` / :class:`~ragkit.RagTokenForGeneration`.

    Args:
        model: The RAG model, with its retriever attached.
        tokenizer: Its :class:`~ragkit.RagTokenizer`.
        args: The run's :class:`TrainingArguments`.
        train_examples: Training pairs.
        val_examples: Validation pairs (EM after each epoch), optional.
        context_encoder: With ``args.end2end``: the passage encoder to train (a DPR context encoder or
            a BERT-like encoder read with the question encoder's pooling).
        context_encoder_tokenizer: Its tokenizer.
        index_refresher: With ``args.end2end``: callable ``(context_encoder) -> None`` that re-embeds the
            passages and swaps the retriever's index (defaults to :func:`refresh_index`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        args: TrainingArguments,
        train_examples: Sequence[QAExample],
        val_examples: Sequence[QAExample] | None = None,
        context_encoder: Any = None,
        context_encoder_tokenizer: Any = None,
        index_refresher: Callable[[Any], None] | None = None,
    ):
        if not train_examples:
            raise ValueError("RagTrainer: no training examples; give at least one question/answer pair.")
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.train_examples = list(train_examples)
        self.val_examples = list(val_examples) if val_examples else []
        self.device = next(model.parameters()).device
        self.output_dir = Path(args.output_dir)
        self.context_encoder = context_encoder
        self.index_refresher = index_refresher
        if args.end2end:
            self._setup_end2end(context_encoder, context_encoder_tokenizer)
        _check_index_width(model)
        model.config.label_smoothing = args.label_smoothing
        if args.n_docs is not None:
            model.config.n_docs = args.n_docs
        self._apply_freezing()
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = math.ceil(
            math.ceil(len(self.train_examples) / args.train_batch_size) / args.gradient_accumulation_steps
        )
        self.total_steps = self.steps_per_epoch * args.num_train_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.autocast_dtype = _autocast_dtype(args.precision, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.autocast_dtype == torch.float16 and self.device.type == "cuda"
        )
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.losses: list[float] = []
        self.val_em: list[float] = []
        self._retrieval_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- setup helpers

    def _setup_end2end(self, context_encoder: Any, context_encoder_tokenizer: Any) -> None:
        """Attach the trainable context encoder to the model and tokenized passages to retrieval."""
        if context_encoder is None or context_encoder_tokenizer is None:
            raise ValueError(
                "end2end training needs a context encoder and its tokenizer "
                "(--context_encoder_name_or_path); the index's passages are re-embedded with it."
            )
        self.context_encoder = context_encoder.to(self.device)
        self.model.set_context_encoder_for_training(self.context_encoder)
        self.model.retriever.set_ctx_encoder_tokenizer(context_encoder_tokenizer)
        if self.index_refresher is None:
            self.index_refresher = lambda encoder: refresh_index(
                self.model.retriever, encoder, context_encoder_tokenizer, self.model.config
            )

    def _apply_freezing(self) -> None:
        """Turn off gradients of the parts the arguments keep fixed."""
        rag = getattr(self.model, "rag", self.model)
        if self.args.freeze_question_encoder:
            rag.question_encoder.requires_grad_(False)
        if self.args.freeze_generator:
            rag.generator.requires_grad_(False)

    def _trainable_modules(self) -> list[torch.nn.Module]:
        """The model and, with end2end, the context encoder (shared parameters are deduplicated later)."""
        return [self.model] if self.context_encoder is None else [self.model, self.context_encoder]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW without weight decay on biases and LayerNorm weights."""
        decay, no_decay, seen = [], [], set()
        for module in self._trainable_modules():
            for name, param in module.named_parameters():
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (
                    no_decay
                    if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
                    else decay
                ).append(param)
        if not decay and not no_decay:
            raise ValueError("Nothing to train: every parameter is frozen (check the freeze_* options).")
        groups = [
            {"params": decay, "weight_decay": self.args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.args.learning_rate)

    def _lr_lambda(self, step: int) -> float:
        """Linear warm-up then linear decay to zero at the last step."""
        warmup = self.args.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

    # -- checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        """``<output_dir>/checkpoint-last``."""
        return self.output_dir / CHECKPOINT_DIRNAME

    def save_checkpoint(self) -> Path:
        """Write model, tokenizer and trainer state to ``checkpoint-last`` atomically (old one kept until done)."""
        with atomic_directory(self.checkpoint_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.context_encoder is not None:
                self.context_encoder.save_pretrained(tmp / CONTEXT_ENCODER_DIRNAME)
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "losses": self.losses,
                "val_em": self.val_em,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _capture_rng_state(),
                "args": dataclasses.asdict(self.args),
            }
            torch.save(state, tmp / TRAINER_STATE_FILE)
        logger.info("checkpoint at step %d written to %s", self.global_step, self.checkpoint_dir)
        return self.checkpoint_dir

    def load_checkpoint(self, directory: str | os.PathLike | None = None) -> None:
        """Restore weights, optimizer, scheduler, scaler, counters and RNG states from a checkpoint.

        Args:
            directory: Checkpoint directory (defaults to ``<output_dir>/checkpoint-last``).
        """
        directory = Path(directory or self.checkpoint_dir)
        state_file = directory / TRAINER_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no {TRAINER_STATE_FILE}: it is not a checkpoint written by `ragkit finetune`. "
                "Resume from <output_dir>/checkpoint-last, or start without --resume."
            )
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code.
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        _load_model_weights(self.model, directory, self.device)
        if self.context_encoder is not None and (directory / CONTEXT_ENCODER_DIRNAME).is_dir():
            reloaded = type(self.context_encoder).from_pretrained(directory / CONTEXT_ENCODER_DIRNAME)
            self.context_encoder.load_state_dict(reloaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.losses = list(state["losses"])
        self.val_em = list(state["val_em"])
        _restore_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d)", directory, self.global_step, self.epoch)

    def save_final(self) -> Path:
        """Write the trained model and tokenizer (a plain RAG checkpoint) to ``<output_dir>/final``."""
        final_dir = self.output_dir / FINAL_DIRNAME
        with atomic_directory(final_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.context_encoder is not None:
                self.context_encoder.save_pretrained(tmp / CONTEXT_ENCODER_DIRNAME)
        return final_dir

    # -- the loop

    def _build_retrieval_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per training example: its retrieved contexts `(n_docs, length)` and document scores `(n_docs,)`."""
        from .evaluation import question_vectors

        n_docs = self.model.config.n_docs
        prefix = getattr(self.model.config.generator, "prefix", None)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        size = self.args.eval_batch_size
        for start in tqdm(
            range(0, len(self.train_examples), size), desc="retrieving", disable=not self.args.show_progress
        ):
            examples = self.train_examples[start : start + size]
            inputs = self.tokenizer.question_encoder(
                [e.source for e in examples],
                max_length=self.args.max_source_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                vectors = question_vectors(self.model, inputs["input_ids"], inputs["attention_mask"]).float()
            retrieved = self.model.retriever(
                inputs["input_ids"].cpu(),
                vectors.cpu().numpy(),
                prefix=prefix,
                n_docs=n_docs,
                return_tensors="pt",
            )
            embeds = torch.as_tensor(retrieved["retrieved_doc_embeds"], dtype=torch.float32)
            scores = torch.bmm(vectors.cpu().unsqueeze(1), embeds.transpose(1, 2)).squeeze(1)
            contexts = retrieved["context_input_ids"].view(len(examples), n_docs, -1)
            masks = retrieved["context_attention_mask"].view(len(examples), n_docs, -1)
            for row in range(len(examples)):
                width = int(masks[row].sum(-1).max())
                cache.append((contexts[row, :, :width].clone(), scores[row].clone()))
        return cache

    def _cached_inputs(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Contexts, their mask and document scores of examples ``ids`` from the retrieval cache."""
        pad_id = self.tokenizer.generator.pad_token_id
        rows = [self._retrieval_cache[i] for i in ids]
        n_docs, width = rows[0][0].shape[0], max(r[0].shape[1] for r in rows)
        contexts = torch.full((len(rows), n_docs, width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n_docs, width), dtype=torch.long)
        for i, (ctx, _) in enumerate(rows):
            contexts[i, :, : ctx.shape[1]] = ctx
            mask[i, :, : ctx.shape[1]] = ctx.ne(pad_id).long()
        return {
            "context_input_ids": contexts.view(len(rows) * n_docs, width),
            "context_attention_mask": mask.view(len(rows) * n_docs, width),
            "doc_scores": torch.stack([r[1] for r in rows]),
        }

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean RAG loss of one batch (marginalised over the retrieved passages)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "context_input_ids" in batch:  # cached retrieval: no question encoder pass, no retriever call
            inputs = {k: batch[k] for k in ("context_input_ids", "context_attention_mask", "doc_scores")}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            outputs = self.model(
                **inputs,
                labels=batch["labels"],
                n_docs=self.model.config.n_docs,
                reduce_loss=False,
                use_cache=False,
            )
        return outputs.loss.float().mean()

    def validate(self) -> float:
        """Validation exact match (generation with the model's retriever).

        Returns:
            EM in [0, 1].
        """
        predictions = generate_answers(
            self.model,
            self.tokenizer,
            [e.source for e in self.val_examples],
            batch_size=self.args.eval_batch_size,
            n_docs=self.model.config.n_docs,
            num_beams=self.args.num_beams,
            max_length=self.args.val_max_target_length,
            max_source_length=self.args.max_source_length,
            show_progress=self.args.show_progress,
        )
        return evaluate_answers(predictions, [e.answers for e in self.val_examples]).metrics["em"]

    def train(self) -> TrainResult:
        """Run (or, with ``resume``, continue) training; validate and checkpoint after each epoch.

        Returns:
            TrainResult
        """
        args = self.args
        if args.resume and (self.checkpoint_dir / TRAINER_STATE_FILE).is_file():
            self.load_checkpoint()
            if args.end2end:
                self._refresh_index()
        else:
            if args.resume:
                logger.warning("--resume: no checkpoint in %s, starting from scratch.", self.checkpoint_dir)
            random.seed(args.seed)
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if args.cache_retrieval and self._retrieval_cache is None:
            self._retrieval_cache = self._build_retrieval_cache()
        micro_batches = math.ceil(len(self.train_examples) / args.train_batch_size)
        interrupted = False
        self.model.train()
        progress = tqdm(
            total=self.total_steps, initial=self.global_step, desc="training", disable=not args.show_progress
        )
        started = time.perf_counter()
        while self.epoch < args.num_train_epochs and not interrupted:
            order = _epoch_order(len(self.train_examples), args.seed, self.epoch)
            first_micro = self.step_in_epoch * args.gradient_accumulation_steps
            for start in range(first_micro, micro_batches, args.gradient_accumulation_steps):
                chunk = range(start, min(start + args.gradient_accumulation_steps, micro_batches))
                step_loss = 0.0
                for micro in chunk:
                    ids = order[micro * args.train_batch_size : (micro + 1) * args.train_batch_size]
                    batch = encode_qa_batch(
                        self.tokenizer,
                        [self.train_examples[i] for i in ids],
                        args.max_source_length,
                        args.max_target_length,
                        self.model.config.generator.decoder_start_token_id,
                    )
                    if self._retrieval_cache is not None:
                        batch.update(self._cached_inputs(ids))
                    loss = self._loss(batch) / len(chunk)
                    self.scaler.scale(loss).backward()
                    step_loss += loss.item()
                self._optimizer_step()
                self.global_step += 1
                self.step_in_epoch += 1
                self.losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(epoch=self.epoch, loss=f"{step_loss:.3f}")
                if args.end2end and self.global_step % args.index_rebuild_steps == 0:
                    self._refresh_index()
                if args.max_steps is not None and self.global_step >= args.max_steps:
                    interrupted = self.global_step < self.total_steps
                    break
                if args.save_checkpoints and args.save_steps and self.global_step % args.save_steps == 0:
                    self.save_checkpoint()
            if not interrupted:
                self.epoch += 1
                self.step_in_epoch = 0
                if args.do_validation and self.val_examples:
                    em = self.validate()
                    self.val_em.append(em)
                    logger.info("epoch %d: validation EM %.4f", self.epoch, em)
                    progress.set_postfix(epoch=self.epoch, loss=f"{self.losses[-1]:.3f}", val_em=f"{em:.3f}")
                    self.model.train()
            if args.save_checkpoints:
                self.save_checkpoint()
        progress.close()
        final_dir = None if interrupted or not args.save_checkpoints else self.save_final()
        self._write_metrics(time.perf_counter() - started)
        return TrainResult(
            self.global_step,
            self.epoch,
            list(self.losses),
            list(self.val_em),
            self.checkpoint_dir,
            final_dir,
            interrupted,
        )

    def _optimizer_step(self) -> None:
        """Unscale, clip, step optimizer and scheduler, zero gradients."""
        if self.args.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _refresh_index(self) -> None:
        """Re-embed the passages with the current context encoder and swap the retriever's index."""
        if self.index_refresher is None or self.context_encoder is None:
            return
        was_training = self.context_encoder.training
        self.context_encoder.eval()
        with torch.no_grad():
            self.index_refresher(self.context_encoder)
        self.context_encoder.train(was_training)

    def _write_metrics(self, seconds: float) -> None:
        """``metrics.json``: step, epoch, losses, validation EM and wall time of this run."""
        metrics = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "train_loss": self.losses,
            "val_em": self.val_em,
            "seconds": seconds,
        }
        with atomic_file(self.output_dir / "metrics.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)


# ----------------------------------------------------------------------------- command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``ragkit finetune`` or ``ragkit consolidate`` (``parser.prog`` tells which)."""
    if parser.prog.split()[-1] == "consolidate":
        _configure_consolidate(parser)
    else:
        _configure_finetune(parser)


def _add_rag_field_arguments(parser: argparse.ArgumentParser) -> None:
    """Index and retrieval overrides shared by both commands."""
    parser.add_argument("--index_name", default=None, help="custom, exact, compressed or legacy")
    parser.add_argument("--index_path", default=None, help="faiss index file (custom/legacy indexes)")
    parser.add_argument("--passages_path", default=None, help="passages saved with datasets.save_to_disk")
    parser.add_argument("--n_docs", type=int, default=None, help="passages retrieved per question")


def _configure_consolidate(parser: argparse.ArgumentParser) -> None:
    """``ragkit consolidate``: the research project's consolidate_rag_checkpoint.py flags."""
    parser.add_argument("--model_type", choices=MODEL_TYPES, default="rag_sequence")
    parser.add_argument("--question_encoder_name_or_path", required=True)
    parser.add_argument("--generator_name_or_path", required=True)
    parser.add_argument("--dest", required=True, help="output directory of the RAG checkpoint")
    parser.add_argument("--question_encoder_tokenizer_name_or_path", default=None)
    parser.add_argument("--generator_tokenizer_name_or_path", default=None)
    parser.add_argument(
        "--config_name_or_path", default=None, help="a RAG config to take the RAG fields from"
    )
    parser.add_argument("--question_encoder_pooling", choices=["pooler", "cls", "mean"], default=None)
    parser.add_argument("--question_encoder_normalize", action="store_true", default=None)
    _add_rag_field_arguments(parser)


def _configure_finetune(parser: argparse.ArgumentParser) -> None:
    """``ragkit finetune``: the research project's finetune_rag.py flags (those that apply)."""
    parser.add_argument("--data_dir", required=True, help="{train,val}.{source,target} or {train,val}.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--model_type", choices=MODEL_TYPES, default=None, help="defaults to the checkpoint's"
    )
    parser.add_argument("--model_name_or_path", default=None, help="RAG checkpoint to start from")
    parser.add_argument("--question_encoder_name_or_path", default=None, help="or: a question encoder ...")
    parser.add_argument("--generator_name_or_path", default=None, help="... and a generator")
    parser.add_argument("--question_encoder_pooling", choices=["pooler", "cls", "mean"], default=None)
    parser.add_argument("--question_encoder_normalize", action="store_true", default=None)
    _add_rag_field_arguments(parser)
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--label_smoothing", type=float, default=0.0)
    parser.add_argument("--max_source_length", type=int, default=128)
    parser.add_argument("--max_target_length", type=int, default=25)
    parser.add_argument("--val_max_target_length", type=int, default=25)
    parser.add_argument("--max_combined_length", type=int, default=None)
    parser.add_argument("--num_beams", type=int, default=1, help="beam size for validation")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: each epoch)")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint-last")
    parser.add_argument("--freeze_question_encoder", action="store_true")
    parser.add_argument("--freeze_generator", action="store_true")
    parser.add_argument("--end2end", action="store_true", help="train the context encoder, rebuild the index")
    parser.add_argument("--context_encoder_name_or_path", default=None, help="context encoder for --end2end")
    parser.add_argument("--index_rebuild_steps", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_distributed_retriever_arguments(parser)


def _pooling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Question-encoder pooling fields given on the command line."""
    fields = {}
    if args.question_encoder_pooling is not None:
        fields["question_encoder_pooling"] = args.question_encoder_pooling
    if args.question_encoder_normalize:
        fields["question_encoder_normalize"] = True
    return fields


def _index_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Index fields given on the command line."""
    names = ("index_name", "index_path", "passages_path", "n_docs")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _loads_index_locally(args: argparse.Namespace) -> bool:
    """Whether this process loads the index itself (not when Ray actors or rank 0 serve it)."""
    return args.distributed_retriever == "none"


def _load_starting_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """The model to fine-tune: a RAG checkpoint, or one consolidated in memory from encoder + generator."""
    if args.model_name_or_path:
        overrides = {**_pooling_fields(args)}
        if args.max_combined_length is not None:
            overrides["max_combined_length"] = args.max_combined_length
        return load_rag_for_training(
            args.model_name_or_path,
            model_type=args.model_type,
            device=device,
            init_retrieval=_loads_index_locally(args),
            **_index_fields(args),
            **overrides,
        )
    if not (args.question_encoder_name_or_path and args.generator_name_or_path):
        raise ValueError(
            "Give --model_name_or_path (a RAG checkpoint), or both --question_encoder_name_or_path and "
            "--generator_name_or_path to start from a question encoder and a generator."
        )
    fields = {**_pooling_fields(args), **_index_fields(args)}
    if args.max_combined_length is not None:
        fields["max_combined_length"] = args.max_combined_length
    staging = Path(args.output_dir) / "consolidated"
    consolidate_rag_checkpoint(
        args.model_type or "rag_sequence",
        args.question_encoder_name_or_path,
        args.generator_name_or_path,
        staging,
        **fields,
    )
    return load_rag_for_training(
        staging,
        model_type=args.model_type or "rag_sequence",
        device=device,
        init_retrieval=_loads_index_locally(args),
    )


def _load_context_encoder(name_or_path: str, device: torch.device) -> tuple[Any, Any]:
    """A context encoder and its tokenizer (DPR context encoder or any AutoModel encoder)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, DPRContextEncoder

    config = AutoConfig.from_pretrained(name_or_path)
    model_class = DPRContextEncoder if config.model_type == "dpr" else AutoModel
    return model_class.from_pretrained(name_or_path).to(device), AutoTokenizer.from_pretrained(name_or_path)


def run(args: argparse.Namespace) -> int:
    """Run ``ragkit consolidate`` or ``ragkit finetune``."""
    if args.command == "consolidate":
        fields = {**_pooling_fields(args), **_index_fields(args)}
        dest = consolidate_rag_checkpoint(
            args.model_type,
            args.question_encoder_name_or_path,
            args.generator_name_or_path,
            args.dest,
            question_encoder_tokenizer_name_or_path=args.question_encoder_tokenizer_name_or_path,
            generator_tokenizer_name_or_path=args.generator_tokenizer_name_or_path,
            config_name_or_path=args.config_name_or_path,
            **fields,
        )
        print(f"RAG checkpoint written to {dest}")  # noqa: T201 (command output)
        return 0

    train_examples = load_qa_split(args.data_dir, "train")
    val_examples = load_qa_split(args.data_dir, "val", required=False)
    device = _resolve_device(args.device)
    resume_dir = Path(args.output_dir) / CHECKPOINT_DIRNAME
    if args.resume and (resume_dir / TRAINER_STATE_FILE).is_file():
        model, tokenizer = load_rag_for_training(
            resume_dir,
            model_type=args.model_type,
            device=device,
            init_retrieval=_loads_index_locally(args),
            **_index_fields(args),
        )
    else:
        model, tokenizer = _load_starting_model(args, device)
    if not _loads_index_locally(args):
        if args.end2end:
            # Rebuilding the index swaps it in this process only; actors or rank 0 would serve the old one.
            raise ValueError("--end2end cannot be combined with --distributed_retriever; use 'none'.")
        model.set_retriever(distributed_retriever_from_args(model.retriever, args))
    context_encoder = context_tokenizer = None
    if args.end2end:
        if not args.context_encoder_name_or_path:
            raise ValueError(
                "--end2end needs --context_encoder_name_or_path (the encoder the index was built with)."
            )
        context_encoder, context_tokenizer = _load_context_encoder(args.context_encoder_name_or_path, device)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        train_batch_size=args.train_batch_size,
        eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        label_smoothing=args.label_smoothing,
        n_docs=args.n_docs,
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        val_max_target_length=args.val_max_target_length,
        num_beams=args.num_beams,
        precision=args.precision,
        seed=args.seed,
        save_steps=args.save_steps,
        max_steps=args.max_steps,
        resume=args.resume,
        freeze_question_encoder=args.freeze_question_encoder,
        freeze_generator=args.freeze_generator,
        end2end=args.end2end,
        index_rebuild_steps=args.index_rebuild_steps,
        show_progress=not args.no_progress,
    )
    trainer = RagTrainer(
        model,
        tokenizer,
        training_args,
        train_examples,
        val_examples,
        context_encoder=context_encoder,
        context_encoder_tokenizer=context_tokenizer,
    )
    result = trainer.train()
    print(f"steps: {result.global_step}  epochs: {result.epoch}  last loss: {result.losses[-1]:.4f}")  # noqa: T201 (command output)
    if result.val_em:
        print("validation EM per epoch: " + ", ".join(f"{em:.4f}" for em in result.val_em))  # noqa: T201 (command output)
    if result.final_dir is not None:
        print(f"fine-tuned model written to {result.final_dir}")  # noqa: T201 (command output)
    else:
        print(  # noqa: T201 (command output)
            f"stopped at step {result.global_step}; continue with --resume (checkpoint: {result.checkpoint_dir})"
        )
    return 0
