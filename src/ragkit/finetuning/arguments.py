"""The settings of a fine-tuning run, and the ``ragkit finetune`` flags built from them.

Each setting is declared once, as a :class:`TrainingArguments` field with its default and its help
(``metadata={"help": ...}``); :func:`add_dataclass_arguments` turns the fields into flags, so the command
line, the defaults and the docs cannot drift apart. Every flag takes both spellings,
``--max_combined_length`` and ``--max-combined-length``; help shows the first.
"""

from __future__ import annotations

import argparse
import contextvars
import copy
import dataclasses
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import RagInputError

__all__ = [
    "PRECISIONS",
    "TrainingArguments",
    "UnderscoreHelpFormatter",
    "add_dataclass_arguments",
    "add_flag",
    "dataclass_from_namespace",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: True while :func:`dataclass_from_namespace` builds settings from flags: their errors name the flag the
#: user typed (``--num_train_epochs``) instead of the field (``num_train_epochs``).
_FROM_FLAGS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ragkit_settings_from_flags", default=False
)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the flag's help text and builder options (``choices``, ``flag``, ``cli``)."""
    return {"help": text, **extra}


def _dash_spelling(option: str) -> str:
    """``--max_combined_length`` -> ``--max-combined-length``."""
    return "--" + option[2:].replace("_", "-")


class UnderscoreHelpFormatter(argparse.HelpFormatter):
    """Help that lists each flag once, in its underscore spelling (the dash spelling is accepted too)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [o for o in action.option_strings if not (o.startswith("--") and "-" in o[2:])]
        if not action.option_strings or not shown or len(shown) == len(action.option_strings):
            return super()._format_action_invocation(action)
        shown_action = copy.copy(action)
        shown_action.option_strings = shown
        return super()._format_action_invocation(shown_action)


def add_flag(parser: argparse.ArgumentParser | Any, name: str, **kwargs: Any) -> argparse.Action:
    """Add ``--name`` (and ``--na-me`` when the name has underscores) writing to ``args.name``.

    Args:
        parser: A parser or argument group.
        name: The destination, in underscores (``max_combined_length``).
        **kwargs: Passed to ``add_argument``.

    Returns:
        The argparse action.
    """
    option = f"--{name}"
    options = [option] if "_" not in name else [option, _dash_spelling(option)]
    kwargs.setdefault("dest", name.replace("-", "_"))
    return parser.add_argument(*options, **kwargs)


def _scalar_type(annotation: Any) -> Any:
    """``int`` for ``int`` and ``int | None`` (likewise ``float``, ``str``, ``bool``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any, cls: type, exclude: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of the dataclass ``cls``, with its default, type, choices and help.

    A field without a default is a required flag; a ``bool`` field defaulting to ``False`` is a switch
    (``--resume``), one defaulting to ``True`` gets ``--no_<name>`` (or ``metadata["flag"]``). Fields with
    ``metadata["cli"] = False`` or listed in ``exclude`` are left out.

    Args:
        parser: A parser or argument group.
        cls: The dataclass.
        exclude: Field names not to add.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli", True) is False:
            continue
        help_text = f.metadata.get("help", "")
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            if f.default is True:
                add_flag(
                    parser,
                    f.metadata.get("flag", f"no_{f.name}"),
                    dest=f.name,
                    action="store_false",
                    help=help_text,
                )
            else:
                add_flag(parser, f.name, action="store_true", help=help_text)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        options: dict[str, Any] = {"type": kind, "help": help_text, "choices": f.metadata.get("choices")}
        if required:
            options["required"] = True
        else:
            options["default"] = f.default
            if f.default is not None:
                options["help"] = f"{help_text} (default: %(default)s)"
        add_flag(parser, f.name, **options)


def dataclass_from_namespace(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass ``cls`` from the parsed flags of the same names (others keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    token = _FROM_FLAGS.set(True)
    try:
        return cls(**{**values, **overrides})
    finally:
        _FROM_FLAGS.reset(token)


def _ref(name: str) -> str:
    """A setting as the user gave it: ``--name`` on the command line, ```name``` in Python."""
    return f"--{name}" if _FROM_FLAGS.get() else f"`{name}`"


def _switch(name: str, on: bool) -> str:
    """How to turn a boolean setting on or off, in the words of the command line or of Python."""
    if _FROM_FLAGS.get():
        return f"add --{name}" if on else f"leave out --{name}"
    return f"set `{name}={on}`"


def _is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainingArguments:
    """Settings of a fine-tuning run (the flags of ``ragkit finetune``).

    Every field is checked on construction; a wrong type or value raises
    :class:`~ragkit.errors.RagInputError` naming the field.

    Attributes:
        output_dir: Where checkpoints (``checkpoint-last/``), the final model (``final/``) and
            ``metrics.json`` go.
        num_train_epochs: Passes over the training data.
        train_batch_size: Questions per forward pass.
        eval_batch_size: Questions per generation batch during validation (and per retrieval batch of
            ``cache_retrieval``).
        gradient_accumulation_steps: Forward passes per optimizer step.
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_steps: Linear warm-up steps, then linear decay to 0.
        max_grad_norm: Gradient clipping norm (0 disables clipping).
        label_smoothing: Epsilon of label smoothing in the RAG loss.
        n_docs: Passages retrieved per question (defaults to the model's config).
        max_combined_length: Token length of each generator input ``title / text // question`` (defaults to
            the model's config, 300 for the Hub checkpoints).
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
        freeze_question_encoder: Keep the question encoder fixed (no gradient through ``doc_scores``); it
            runs without dropout, so retrieval is the same every time.
        freeze_generator: Keep the generator fixed (train retrieval only); it runs without dropout.
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

    output_dir: str = field(metadata=_help("directory for checkpoint-last/, final/ and metrics.json"))
    num_train_epochs: int = field(default=3, metadata=_help("passes over the training data"))
    train_batch_size: int = field(default=8, metadata=_help("questions per forward pass"))
    eval_batch_size: int = field(default=16, metadata=_help("questions per validation (and retrieval) batch"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("forward passes per optimizer step"))
    learning_rate: float = field(default=3e-5, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not on biases, LayerNorm)"))
    warmup_steps: int = field(default=0, metadata=_help("linear warm-up steps, then linear decay to 0"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: no clipping)"))
    label_smoothing: float = field(
        default=0.0, metadata=_help("label smoothing epsilon of the RAG loss, in [0, 1)")
    )
    n_docs: int | None = field(
        default=None, metadata=_help("passages retrieved per question (default: the model's)")
    )
    max_combined_length: int | None = field(
        default=None,
        metadata=_help("tokens of each generator input 'title / text // question' (default: the model's)"),
    )
    max_source_length: int = field(default=128, metadata=_help("questions are truncated to this many tokens"))
    max_target_length: int = field(default=25, metadata=_help("answers are truncated to this many tokens"))
    val_max_target_length: int = field(default=25, metadata=_help("max generated tokens at validation"))
    num_beams: int = field(default=1, metadata=_help("beam size for validation"))
    precision: str = field(
        default="auto",
        metadata=_help("auto: bf16/fp16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS),
    )
    seed: int = field(default=42, metadata=_help("seed of data order, dropout and initialisation"))
    save_steps: int = field(
        default=0, metadata=_help("also checkpoint every N optimizer steps (0: each epoch)")
    )
    max_steps: int | None = field(
        default=None, metadata=_help("stop after N optimizer steps, with a checkpoint to --resume from")
    )
    resume: bool = field(default=False, metadata=_help("continue from output_dir/checkpoint-last"))
    freeze_question_encoder: bool = field(default=False, metadata=_help("keep the question encoder fixed"))
    freeze_generator: bool = field(default=False, metadata=_help("keep the generator fixed"))
    cache_retrieval: bool = field(
        default=False,
        metadata=_help("retrieve once and reuse contexts every epoch (needs --freeze_question_encoder)"),
    )
    end2end: bool = field(default=False, metadata=_help("also train the context encoder, rebuild the index"))
    index_rebuild_steps: int = field(
        default=500, metadata=_help("optimizer steps between index rebuilds (--end2end)")
    )
    do_validation: bool = field(
        default=True, metadata=_help("skip validation EM after each epoch", flag="no_validation")
    )
    save_checkpoints: bool = field(
        default=True, metadata=_help("write checkpoints and the final model", cli=False)
    )
    show_progress: bool = field(default=True, metadata=_help("hide progress bars", flag="no_progress"))

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            self._check_type(f.name, _scalar_type(hints[f.name]), f.default is None)
        for name in (
            "num_train_epochs",
            "train_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "max_source_length",
            "max_target_length",
            "val_max_target_length",
            "num_beams",
            "index_rebuild_steps",
            "n_docs",
            "max_combined_length",
            "max_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RagInputError(f"{_ref(name)} must be >= 1, got {value!r}.")
        for name in ("warmup_steps", "save_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise RagInputError(f"{_ref(name)} must be >= 0, got {getattr(self, name)!r}.")
        if self.learning_rate <= 0:
            raise RagInputError(f"{_ref('learning_rate')} must be > 0, got {self.learning_rate!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RagInputError(f"{_ref('label_smoothing')} must be in [0, 1), got {self.label_smoothing!r}.")
        if self.precision not in PRECISIONS:
            raise RagInputError(
                f"{_ref('precision')} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."
            )
        if not self.output_dir:
            raise RagInputError(f"{_ref('output_dir')} must be a directory path, got an empty string.")
        if self.cache_retrieval and (self.end2end or not self.freeze_question_encoder):
            # Name only what is in the way: the user may have frozen the question encoder already.
            problems, fixes = [], []
            if not self.freeze_question_encoder:
                problems.append("the question encoder is trained")
                fixes.append(_switch("freeze_question_encoder", True))
            if self.end2end:
                problems.append(f"{_ref('end2end')} retrains the context encoder and rebuilds the index")
                fixes.append(_switch("end2end", False))
            raise RagInputError(
                f"{_ref('cache_retrieval')} reuses retrieval results, so it needs a fixed retriever, but "
                f"{' and '.join(problems)}: {' and '.join(fixes)}, or {_switch('cache_retrieval', False)}."
            )

    def _check_type(self, name: str, kind: Any, optional: bool) -> None:
        """Raise naming the field when its value is not of the declared type."""
        value = getattr(self, name)
        if value is None and optional:
            return
        ok = {
            int: _is_int,
            float: _is_number,
            bool: lambda v: isinstance(v, bool),
            str: lambda v: isinstance(v, str),
        }[kind](value)
        if not ok:
            expected = {int: "an integer", float: "a finite number", bool: "True or False", str: "a string"}[
                kind
            ]
            raise RagInputError(
                f"{_ref(name)} must be {expected}{' or None' if optional else ''}, got {value!r} "
                f"({type(value).__name__})."
            )
