"""The fine-tuning loop: :class:`RagTrainer`, plain PyTorch, and the end2end index refresh.

* the loss is the RAG marginal likelihood, so gradients reach the question encoder through
  ``doc_scores``; with ``end2end`` the context encoder is trained too and the passages are
  re-embedded and the index rebuilt every ``index_rebuild_steps`` steps;
* an optimizer step averages the loss over the examples of its micro-batches, so gradient accumulation
  (a last chunk shorter than the others included) gives the step an unaccumulated batch would;
* mixed precision on GPU (bf16 where supported, else fp16 with loss scaling), and on request on CPU
  (``precision="bf16"``, or ``"fp16"`` with loss scaling);
* validation EM after every epoch, checkpoints written atomically to ``<output_dir>/checkpoint-last``
  holding everything a resumed run needs (model, optimizer, scheduler, loss scaler, step, position
  in the epoch, RNG states), so ``resume=True`` continues as if never interrupted, and refuses settings
  that would change the schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_directory, atomic_file, check_replaceable, read_json_object
from ..errors import CheckpointError, CorruptFileError, MissingFileError, RagInputError
from ..evaluation import evaluate_answers, generate_answers
from ..loading import RAG_CHECKPOINT_ENTRIES, check_safetensors_file
from ..modeling_rag import trim_context_padding
from .arguments import TrainingArguments
from .data import QAExample, encode_qa_batch

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_DIRNAME",
    "CONTEXT_ENCODER_DIRNAME",
    "FINAL_DIRNAME",
    "INDEX_ENCODER_FILE",
    "METRICS_FILE",
    "SCHEDULE_FIELDS",
    "TRAINER_STATE_FILE",
    "RagTrainer",
    "TrainResult",
    "check_checkpoint_files",
    "check_output_dir",
    "is_training_metrics",
    "refresh_index",
]

CHECKPOINT_DIRNAME = "checkpoint-last"
FINAL_DIRNAME = "final"
TRAINER_STATE_FILE = "trainer_state.pt"
CONTEXT_ENCODER_DIRNAME = "context_encoder"
METRICS_FILE = "metrics.json"
#: With end2end, the context encoder's weights when the index was last rebuilt (when that was before the
#: checkpoint's step): a resume rebuilds the index the run was using from them.
INDEX_ENCODER_FILE = "context_encoder_at_index_refresh.pt"

# Weight shards save_pretrained writes for a large model (``model-00001-of-00003.safetensors``).
_WEIGHT_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")

#: Settings a resumed run must share with its checkpoint: each changes the data order, the steps, the
#: learning-rate schedule, the optimizer state the checkpoint holds, or the loss and gradients (a flag left
#: out on ``--resume`` falls back to its default, which would silently change them).
SCHEDULE_FIELDS = (
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "warmup_steps",
    "learning_rate",
    "weight_decay",
    "freeze_question_encoder",
    "freeze_generator",
    "end2end",
    "label_smoothing",
    "max_grad_norm",
    "max_source_length",
    "max_target_length",
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
        raise RagInputError(
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


def _resume_advice(directory: Path) -> str:
    """What to do about a damaged checkpoint ``directory``."""
    return f"Delete {directory} and resume from an earlier copy, or start without --resume."


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Raise :class:`~ragkit.errors.CorruptFileError` naming the first damaged file of a checkpoint to resume from.

    Every file that can be checked without loading it is: JSON files (the config, the tokenizers' files,
    the index of weight shards) must parse, and ``.safetensors`` files (the weights, each shard, the context
    encoder's) must hold every byte their header announces. The loaders would report such a file with
    advice for a model checkpoint (write it again), or without naming it; a resume names it and says
    which checkpoint to delete.

    Args:
        directory: The checkpoint (``<output_dir>/checkpoint-last``).

    Raises:
        CorruptFileError: Naming the file, the problem and what to do.
    """
    directory = Path(directory)
    advice = _resume_advice(directory)
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            check_safetensors_file(path, advice)
        elif path.suffix == ".json":
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
                raise CorruptFileError(
                    f"{path} is damaged and cannot be read ({type(err).__name__}: {err}): the file was truncated "
                    f"or overwritten, e.g. by an interrupted copy. {advice}"
                ) from err


def _load_model_weights(model: torch.nn.Module, directory: Path, device: torch.device) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model`` in place; tied copies may be absent."""
    from safetensors.torch import load_file

    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(
            f"{directory} has no model.safetensors; the checkpoint is incomplete, resume cannot work. Resume "
            "from a complete checkpoint, or start without --resume."
        )
    advice = _resume_advice(directory)
    check_safetensors_file(weights, advice)
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CorruptFileError(
            f"{weights} cannot be read ({err}); the checkpoint is damaged. {advice}"
        ) from err
    result = model.load_state_dict(tensors, strict=False)
    owners: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        owners.setdefault(tensor.data_ptr(), []).append(name)
    missing = set(result.missing_keys)
    # A missing key is fine when it shares storage with a loaded one (tied embeddings are saved once).
    lost = [k for k in missing if all(o in missing for o in owners[model.state_dict()[k].data_ptr()])]
    if lost or result.unexpected_keys:
        raise CheckpointError(
            f"{weights} does not match the model: missing {sorted(lost)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}. Resume with the same model type and configuration."
        )


def _load_trainer_state(state_file: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, as plain data; a damaged or tampered file is named."""
    what_to_do = _resume_advice(state_file.parent)
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects from it could run code.
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CorruptFileError(
            f"{state_file} holds objects other than tensors and plain data, which ragkit refuses to load (they "
            f"could run code): it was not written by ragkit or was tampered with. {what_to_do}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptFileError(
            f"{state_file} is damaged and cannot be read ({str(err).splitlines()[0]}); it was truncated or "
            f"overwritten, e.g. by a run killed while copying it. {what_to_do}"
        ) from err
    missing = [
        key for key in ("global_step", "epoch", "step_in_epoch", "optimizer", "rng") if key not in state
    ]
    if not isinstance(state, dict) or missing:
        raise CorruptFileError(
            f"{state_file} is not a ragkit trainer state (missing {missing}). {what_to_do}"
        )
    return state


def _check_checkpoint_dir_replaceable(directory: Path) -> None:
    """Raise when ``directory`` exists but is not a checkpoint ragkit wrote (it is replaced as a whole)."""
    check_replaceable(
        directory,
        (*RAG_CHECKPOINT_ENTRIES, INDEX_ENCODER_FILE),
        "fine-tuning output",
        owned_pattern=_WEIGHT_SHARD,
        advice="Give a new or empty --output_dir, or one written earlier by `ragkit finetune`.",
        file_advice="Move it away or give another --output_dir.",
    )


def is_training_metrics(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``metrics.json`` a training run wrote (its ``global_step`` and ``train_loss``)."""
    content = read_json_object(path)
    return content is not None and {"global_step", "train_loss"} <= content.keys()


def _check_metrics_file_replaceable(path: Path) -> None:
    """Raise when ``path`` exists but is not a ``metrics.json`` a training run wrote."""
    if not path.exists() and not path.is_symlink():
        return
    if not is_training_metrics(path):
        raise RagInputError(
            f"{path} exists and was not written by a training run; it would be overwritten. Move it away, or "
            "give a new or empty --output_dir."
        )


def check_output_dir(args: TrainingArguments) -> None:
    """Refuse an output directory whose files a run would overwrite but did not write, before any work.

    ``checkpoint-last/`` and ``final/`` are replaced as a whole and ``metrics.json`` is rewritten, so each
    must be absent or written by an earlier run; other files in the directory are left alone.

    Args:
        args: The run's settings (``output_dir``, ``save_checkpoints``).

    Raises:
        RagInputError: Naming the path and what to do.
    """
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RagInputError(f"--output_dir {args.output_dir!r} is an existing file; give a directory path.")
    if args.save_checkpoints:
        _check_checkpoint_dir_replaceable(output_dir / CHECKPOINT_DIRNAME)
        _check_checkpoint_dir_replaceable(output_dir / FINAL_DIRNAME)
    _check_metrics_file_replaceable(output_dir / METRICS_FILE)


def _load_index_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The context encoder weights of the last index rebuild, saved with an end2end checkpoint."""
    what_to_do = _resume_advice(path.parent)
    if not path.is_file():
        raise MissingFileError(
            f"{path.parent} has no {path.name} (the context encoder of the last index rebuild); the checkpoint "
            f"is incomplete. {what_to_do}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path} cannot be read ({str(err).splitlines()[0]}). {what_to_do}") from err


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
    from ..encoders import TextEncoder
    from ..retrieval.building import build_faiss_index, passages_dataset
    from ..retrieval.custom import CustomHFIndex

    dataset = getattr(retriever.index, "dataset", None)
    if dataset is None:
        raise RagInputError(
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
    # Exact search for small corpora (the usual end2end scale), an HNSW graph beyond.
    factory = "Flat" if len(embeddings) <= 50_000 else "HNSW64"
    faiss_index = build_faiss_index(embeddings, factory, metric="ip", fill=False)
    refreshed = passages_dataset(titles, texts, embeddings)
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
            raise RagInputError("RagTrainer: no training examples; give at least one question/answer pair.")
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
        if args.max_combined_length is not None:
            self._set_max_combined_length(args.max_combined_length)
        self._apply_freezing()
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = math.ceil(
            math.ceil(len(self.train_examples) / args.train_batch_size) / args.gradient_accumulation_steps
        )
        self.total_steps = self.steps_per_epoch * args.num_train_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.autocast_dtype = _autocast_dtype(args.precision, self.device)
        # fp16 gradients underflow without loss scaling, on any device (CPU autocast runs fp16 too).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.losses: list[float] = []
        self.val_em: list[float] = []
        self._retrieval_cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        # end2end: the step of the last index rebuild (0: the index the run started with) and a CPU copy of
        # the context encoder's weights at that step, for checkpoints written between two rebuilds.
        self._index_refresh_step = 0
        self._index_encoder_state: dict[str, torch.Tensor] | None = None

    # -- setup helpers

    def _setup_end2end(self, context_encoder: Any, context_encoder_tokenizer: Any) -> None:
        """Attach the trainable context encoder to the model and tokenized passages to retrieval."""
        if context_encoder is None or context_encoder_tokenizer is None:
            raise RagInputError(
                "end2end training needs a context encoder and its tokenizer "
                "(--context_encoder_name_or_path); the index's passages are re-embedded with it."
            )
        self.context_encoder = context_encoder.to(self.device)
        self.model.set_context_encoder_for_training(self.context_encoder)
        self.model.retriever.set_ctx_encoder_tokenizer(context_encoder_tokenizer)
        if self.index_refresher is None:
            # Re-embedding every passage is long: it shows a progress bar unless the run hides them.
            self.index_refresher = lambda encoder: refresh_index(
                self.model.retriever,
                encoder,
                context_encoder_tokenizer,
                self.model.config,
                show_progress=self.args.show_progress,
            )

    def _set_max_combined_length(self, length: int) -> None:
        """Make the retriever build contexts of ``length`` tokens (the model config and the retriever's)."""
        self.model.config.max_combined_length = length
        # The retriever tokenizes the contexts with its own config (a copy when it was built apart).
        retriever_config = getattr(getattr(self.model, "retriever", None), "config", None)
        if retriever_config is not None:
            retriever_config.max_combined_length = length

    def _apply_freezing(self) -> None:
        """Turn off gradients of the parts the arguments keep fixed."""
        rag = getattr(self.model, "rag", self.model)
        if self.args.freeze_question_encoder:
            rag.question_encoder.requires_grad_(False)
        if self.args.freeze_generator:
            rag.generator.requires_grad_(False)

    def _train_mode(self) -> None:
        """Training mode, except for the frozen parts: they run as at inference (no dropout).

        A frozen question encoder then gives the same retrieval every time, which ``cache_retrieval``
        relies on; dropout in a part that is not trained is only noise.
        """
        self.model.train()
        rag = getattr(self.model, "rag", self.model)
        if self.args.freeze_question_encoder:
            rag.question_encoder.eval()
        if self.args.freeze_generator:
            rag.generator.eval()

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
            raise RagInputError("Nothing to train: every parameter is frozen (check the freeze_* options).")
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
                "num_train_examples": len(self.train_examples),
                "index_refresh_step": self._index_refresh_step,
                "model_class": type(self.model).__name__,
            }
            torch.save(state, tmp / TRAINER_STATE_FILE)
            if self._index_encoder_state is not None and self._index_refresh_step < self.global_step:
                torch.save(self._index_encoder_state, tmp / INDEX_ENCODER_FILE)
        logger.info("checkpoint at step %d written to %s", self.global_step, self.checkpoint_dir)
        return self.checkpoint_dir

    def load_checkpoint(self, directory: str | os.PathLike | None = None) -> None:
        """Restore weights, optimizer, scheduler, scaler, counters and RNG states from a checkpoint.

        Args:
            directory: Checkpoint directory (defaults to ``<output_dir>/checkpoint-last``).

        Raises:
            MissingFileError: No ``trainer_state.pt`` or ``model.safetensors`` in ``directory``.
            CorruptFileError: One of them is truncated, damaged or holds more than plain data, or another file
                of the checkpoint is damaged (see :func:`check_checkpoint_files`).
            RagInputError: This run's :data:`SCHEDULE_FIELDS`, number of training examples or model class
                (RAG-Sequence or RAG-Token) differ from the checkpoint's (naming each and both values).
        """
        directory = Path(directory or self.checkpoint_dir)
        state_file = directory / TRAINER_STATE_FILE
        if not state_file.is_file():
            raise MissingFileError(
                f"{directory} has no {TRAINER_STATE_FILE}: it is not a checkpoint written by `ragkit finetune`. "
                "Resume from <output_dir>/checkpoint-last, or start without --resume."
            )
        check_checkpoint_files(directory)
        state = _load_trainer_state(state_file)
        self._check_same_schedule(state, state_file)
        _load_model_weights(self.model, directory, self.device)
        if self.context_encoder is not None and (directory / CONTEXT_ENCODER_DIRNAME).is_dir():
            reloaded = type(self.context_encoder).from_pretrained(directory / CONTEXT_ENCODER_DIRNAME)
            self.context_encoder.load_state_dict(reloaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Empty when the checkpoint's run had no loss scaling (fp32, bf16): the scaler then starts fresh.
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.losses = list(state["losses"])
        self.val_em = list(state["val_em"])
        _restore_rng_state(state["rng"])
        # Checkpoints without the field rebuilt the index from the checkpoint's context encoder.
        self._index_refresh_step = state.get("index_refresh_step", self.global_step)
        self._index_encoder_state = None
        if 0 < self._index_refresh_step < self.global_step:
            self._index_encoder_state = _load_index_encoder_state(directory / INDEX_ENCODER_FILE)
        logger.info("resumed from %s at step %d (epoch %d)", directory, self.global_step, self.epoch)

    def _check_same_schedule(self, state: dict[str, Any], state_file: Path) -> None:
        """Refuse to resume with settings that change the data order, steps or learning-rate schedule."""
        saved = state.get("args") or {}
        changed = [
            f"{name}: {saved[name]!r} in the checkpoint, {getattr(self.args, name)!r} now"
            for name in SCHEDULE_FIELDS
            if name in saved and saved[name] != getattr(self.args, name)
        ]
        saved_class, model_class = state.get("model_class"), type(self.model).__name__
        if saved_class is not None and saved_class != model_class:
            # Same weights, another loss: RAG-Sequence and RAG-Token marginalise differently.
            changed.append(f"model: {saved_class} in the checkpoint, {model_class} now (--model_type)")
        saved_examples = state.get("num_train_examples")
        if saved_examples is not None and saved_examples != len(self.train_examples):
            changed.append(
                f"training examples: {saved_examples} in the checkpoint, {len(self.train_examples)} now"
            )
        if changed:
            raise RagInputError(
                f"--resume: this run's settings differ from those of the checkpoint {state_file.parent} ("
                + "; ".join(changed)
                + "), so it would not continue the same schedule. Resume with the checkpoint's values, or "
                "start a new run in another output directory."
            )

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

    def _build_retrieval_cache(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per training example: its contexts and their mask `(n_docs, length)` and document scores `(n_docs,)`."""
        # Eval mode: the cache is reused every epoch, so it must not keep one draw of the question encoder's
        # dropout (which would also use up RNG draws that a resumed run does not make).
        was_training = self.model.training
        self.model.eval()
        try:
            return self._retrieve_for_cache()
        finally:
            self.model.train(was_training)

    def _retrieve_for_cache(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The retrieval cache, built batch by batch (see :meth:`_build_retrieval_cache`)."""
        rag = getattr(self.model, "rag", self.model)
        n_docs = self.model.config.n_docs
        size = self.args.eval_batch_size
        cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
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
                vectors = rag.encode_questions(inputs["input_ids"], inputs["attention_mask"])
                retrieved = rag.retrieve_contexts(inputs["input_ids"], vectors, n_docs=n_docs)
            contexts = retrieved.context_input_ids.cpu().view(len(examples), n_docs, -1)
            masks = retrieved.context_attention_mask.cpu().view(len(examples), n_docs, -1)
            for row in range(len(examples)):
                ids, mask = trim_context_padding(contexts[row], masks[row])
                cache.append((ids.clone(), mask.clone(), retrieved.doc_scores[row].detach().float().cpu()))
        return cache

    def _cached_inputs(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Contexts, their mask and document scores of examples ``ids`` from the retrieval cache."""
        pad_id = self.tokenizer.generator.pad_token_id
        rows = [self._retrieval_cache[i] for i in ids]
        n_docs, width = rows[0][0].shape[0], max(r[0].shape[1] for r in rows)
        contexts = torch.full((len(rows), n_docs, width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n_docs, width), dtype=torch.long)
        for i, (row_ids, row_mask, _) in enumerate(rows):
            contexts[i, :, : row_ids.shape[1]] = row_ids
            mask[i, :, : row_mask.shape[1]] = row_mask
        return {
            "context_input_ids": contexts.view(len(rows) * n_docs, width),
            "context_attention_mask": mask.view(len(rows) * n_docs, width),
            "doc_scores": torch.stack([r[2] for r in rows]),
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

        Raises:
            RagInputError, CorruptFileError, MissingFileError: With ``resume``, see :meth:`load_checkpoint`.
        """
        args = self.args
        check_output_dir(args)
        if args.resume and (self.checkpoint_dir / TRAINER_STATE_FILE).is_file():
            self.load_checkpoint()
            if args.end2end:
                self._restore_index()
        else:
            if args.resume:
                logger.warning("--resume: no checkpoint in %s, starting from scratch.", self.checkpoint_dir)
            elif args.save_checkpoints and (self.checkpoint_dir / TRAINER_STATE_FILE).is_file():
                logger.warning(
                    "%s holds the checkpoint of an earlier run; this run starts from scratch and replaces it at "
                    "its first checkpoint. To continue that run instead, stop now and add --resume.",
                    self.checkpoint_dir,
                )
            random.seed(args.seed)
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if args.cache_retrieval and self._retrieval_cache is None:
            self._retrieval_cache = self._build_retrieval_cache()
        micro_batches = math.ceil(len(self.train_examples) / args.train_batch_size)
        interrupted = False
        self._train_mode()
        progress = tqdm(
            total=self.total_steps, initial=self.global_step, desc="training", disable=not args.show_progress
        )
        started = time.perf_counter()
        while self.epoch < args.num_train_epochs and not interrupted:
            order = _epoch_order(len(self.train_examples), args.seed, self.epoch)
            first_micro = self.step_in_epoch * args.gradient_accumulation_steps
            for start in range(first_micro, micro_batches, args.gradient_accumulation_steps):
                if args.max_steps is not None and self.global_step >= args.max_steps:
                    # Resumed at or past max_steps: a step now would go beyond it.
                    interrupted = True
                    break
                chunk = range(start, min(start + args.gradient_accumulation_steps, micro_batches))
                # Each micro-batch weighs by its share of the step's examples: the step's gradient is the one
                # of the mean loss over all of them, as one batch of the chunk's size would give.
                chunk_examples = len(
                    order[chunk[0] * args.train_batch_size : (chunk[-1] + 1) * args.train_batch_size]
                )
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
                    loss = self._loss(batch) * (len(ids) / chunk_examples)
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
                    self._train_mode()
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
        """Unscale, clip, step optimizer and scheduler, zero gradients.

        With fp16 loss scaling, a step whose gradients overflowed is skipped, and so is its scheduler step:
        warm-up and decay count the updates made.
        """
        if self.args.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The scaler lowers its scale exactly when it skipped the step (inf/NaN gradients).
        if scale is None or self.scaler.get_scale() >= scale:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _refresh_index(self) -> None:
        """Re-embed the passages with the current context encoder and swap the retriever's index."""
        if self.index_refresher is None or self.context_encoder is None:
            return
        self._rebuild_index_with(self.context_encoder)
        self._index_refresh_step = self.global_step
        self._index_encoder_state = {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.context_encoder.state_dict().items()
        }

    def _restore_index(self) -> None:
        """After a resume: rebuild the index the interrupted run was using at the checkpoint's step."""
        if self.index_refresher is None or self.context_encoder is None or self._index_refresh_step == 0:
            return  # no rebuild yet: the run was using the index it was started with, as loaded
        if self._index_encoder_state is None:  # rebuilt at the checkpoint's step: from its context encoder
            self._refresh_index()
            return
        encoder = copy.deepcopy(self.context_encoder)
        encoder.load_state_dict(self._index_encoder_state)
        self._rebuild_index_with(encoder)

    def _rebuild_index_with(self, encoder: Any) -> None:
        """Call the index refresher with ``encoder`` in eval mode, without gradients."""
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            self.index_refresher(encoder)
        encoder.train(was_training)

    def _write_metrics(self, seconds: float) -> None:
        """``metrics.json``: step, epoch, losses, validation EM and wall time of this run."""
        metrics = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "train_loss": self.losses,
            "val_em": self.val_em,
            "seconds": seconds,
        }
        with atomic_file(self.output_dir / METRICS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
