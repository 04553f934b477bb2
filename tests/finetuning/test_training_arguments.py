"""TrainingArguments: every field checked by name, and the `ragkit finetune` flags built from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from ragkit.errors import RagInputError
from ragkit.finetuning import TrainingArguments
from ragkit.finetuning.arguments import UnderscoreHelpFormatter


def _finetune_parser() -> argparse.ArgumentParser:
    from ragkit.commands import finetune

    parser = argparse.ArgumentParser(prog="ragkit finetune")
    finetune.configure_parser(parser)
    return parser


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("label_smoothing", "a lot", r"`label_smoothing` must be a finite number, got 'a lot' \(str\)"),
        ("label_smoothing", 1.0, r"`label_smoothing` must be in \[0, 1\), got 1\.0"),
        ("train_batch_size", 2.5, r"`train_batch_size` must be an integer, got 2\.5"),
        ("train_batch_size", 0, r"`train_batch_size` must be >= 1, got 0"),
        ("num_train_epochs", True, r"`num_train_epochs` must be an integer, got True"),
        ("learning_rate", float("nan"), r"`learning_rate` must be a finite number"),
        ("learning_rate", 0, r"`learning_rate` must be > 0"),
        ("warmup_steps", -1, r"`warmup_steps` must be >= 0"),
        ("weight_decay", "0.1", r"`weight_decay` must be a finite number"),
        ("n_docs", 0, r"`n_docs` must be >= 1"),
        ("n_docs", "5", r"`n_docs` must be an integer or None"),
        ("max_combined_length", 0, r"`max_combined_length` must be >= 1"),
        ("max_steps", 0, r"`max_steps` must be >= 1"),
        ("precision", "fp8", r"`precision` must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        ("resume", "yes", r"`resume` must be True or False, got 'yes'"),
        ("output_dir", 5, r"`output_dir` must be a string"),
        ("index_rebuild_steps", 0, r"`index_rebuild_steps` must be >= 1"),
    ],
)
def test_every_field_is_checked_by_name(tmp_path, field, value, pattern):
    values = {"output_dir": str(tmp_path), field: value}
    with pytest.raises(RagInputError, match=pattern):
        TrainingArguments(**values)


def test_a_path_is_accepted_as_output_dir(tmp_path):
    assert TrainingArguments(output_dir=tmp_path).output_dir == str(tmp_path)


def test_cache_retrieval_needs_a_fixed_retriever(tmp_path):
    with pytest.raises(RagInputError, match="freeze_question_encoder=True") as error:
        TrainingArguments(output_dir=str(tmp_path), cache_retrieval=True)
    assert "end2end" not in str(error.value)
    # Frozen already: only end2end is in the way, and the message does not ask for what was given.
    with pytest.raises(RagInputError, match=r"`end2end` retrains the context encoder") as error:
        TrainingArguments(
            output_dir=str(tmp_path), cache_retrieval=True, freeze_question_encoder=True, end2end=True
        )
    assert "freeze_question_encoder" not in str(error.value) and "set `end2end=False`" in str(error.value)


_BOTH_WAYS = {"cache_retrieval": True, "freeze_question_encoder": True, "end2end": True}


@pytest.mark.parametrize(
    "flags, fields, message",
    [
        (["--num_train_epochs", "0"], {"num_train_epochs": 0}, "--num_train_epochs must be >= 1, got 0."),
        (["--learning_rate", "0"], {"learning_rate": 0.0}, "--learning_rate must be > 0, got 0.0."),
        (["--max_steps", "0"], {"max_steps": 0}, "--max_steps must be >= 1, got 0."),
        (["--warmup_steps", "-1"], {"warmup_steps": -1}, "--warmup_steps must be >= 0, got -1."),
        (
            ["--cache_retrieval", "--freeze_question_encoder", "--end2end"],
            _BOTH_WAYS,
            "--cache_retrieval reuses retrieval results, so it needs a fixed retriever, but --end2end retrains the "
            "context encoder and rebuilds the index: leave out --end2end, or leave out --cache_retrieval.",
        ),
        (
            ["--cache_retrieval"],
            {"cache_retrieval": True},
            "the question encoder is trained: add --freeze_question_encoder, or leave out --cache_retrieval.",
        ),
    ],
)
def test_the_command_names_the_flags_the_user_typed(tmp_path, flags, fields, message, capsys):
    from ragkit.cli import main

    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(tmp_path / "missing"), *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit finetune: error: ") and message in err
    assert "`" not in err.split("error: ", 1)[1]
    # The Python API keeps naming the fields.
    with pytest.raises(RagInputError, match=rf"^`{next(iter(fields))}`"):
        TrainingArguments(output_dir=str(tmp_path), **fields)


def test_the_finetune_flags_are_the_fields_with_their_defaults():
    parser = _finetune_parser()
    parsed = parser.parse_args(["--data_dir", "d", "--output_dir", "o"])
    for f in dataclasses.fields(TrainingArguments):
        if f.name in ("output_dir", "save_checkpoints"):
            continue
        assert getattr(parsed, f.name) == f.default, f.name
    assert TrainingArguments(
        **{
            f.name: getattr(parsed, f.name)
            for f in dataclasses.fields(TrainingArguments)
            if hasattr(parsed, f.name)
        }
    ) == TrainingArguments(output_dir="o")
    assert not hasattr(parsed, "save_checkpoints")  # not a flag: the command always writes its model


def test_flags_take_both_spellings_and_help_shows_underscores():
    parser = _finetune_parser()
    underscores = parser.parse_args(
        ["--data_dir", "d", "--output_dir", "o", "--max_combined_length", "64", "--label_smoothing", "0.1",
         "--gradient_accumulation_steps", "2", "--no_progress", "--no_validation", "--cache_retrieval"]
    )  # fmt: skip
    dashes = parser.parse_args(
        ["--data-dir", "d", "--output-dir", "o", "--max-combined-length", "64", "--label-smoothing", "0.1",
         "--gradient-accumulation-steps", "2", "--no-progress", "--no-validation", "--cache-retrieval"]
    )  # fmt: skip
    assert vars(underscores) == vars(dashes)
    assert underscores.max_combined_length == 64 and underscores.gradient_accumulation_steps == 2
    assert underscores.show_progress is False and underscores.do_validation is False
    assert underscores.cache_retrieval is True
    text = parser.format_help()
    assert isinstance(parser.formatter_class(prog="x"), UnderscoreHelpFormatter)
    assert "--max_combined_length" in text and "--max-combined-length" not in text
    assert "--label_smoothing LABEL_SMOOTHING" in text and "(default: 0.0)" in text
    assert "--model_type {rag_sequence,rag_token}" in text


def test_a_bad_flag_value_names_the_flag(capsys):
    parser = _finetune_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--data_dir", "d", "--output_dir", "o", "--label_smoothing", "a lot"])
    assert exit_info.value.code == 2
    assert (
        "argument --label_smoothing/--label-smoothing: invalid float value: 'a lot'"
        in capsys.readouterr().err
    )


def test_finetune_refuses_a_bad_setting_before_loading_anything(tmp_path, capsys):
    from ragkit.cli import main

    # The model does not exist: the setting is reported first, naming the flag.
    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(tmp_path / "missing"), "--label_smoothing", "1.5"]  # fmt: skip
    assert main(argv) == 2
    # The command names the flag the user typed; the Python API names the field.
    assert "ragkit finetune: error: --label_smoothing must be in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(RagInputError, match=r"--label_smoothing must be in \[0, 1\), got 1\.5"):
        main([*argv, "--debug"])


def test_finetune_refuses_conflicting_model_flags(tmp_path, capsys):
    from ragkit.cli import main

    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(tmp_path / "rag"), "--generator_name_or_path", "facebook/bart-base"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit finetune: error: --model_name_or_path (a RAG checkpoint) and")
    assert "give one of them" in err and "Traceback" not in err
    argv[-2:] = ["--context_encoder_name_or_path", "facebook/dpr-ctx_encoder-single-nq-base"]
    assert main(argv) == 2  # given without --end2end, it would be ignored
    assert "--context_encoder_name_or_path is used only with --end2end" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_finetune_on_a_missing_gpu_is_a_message(tmp_path, capsys):
    from ragkit.cli import main

    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(tmp_path / "missing"), "--device", "cuda"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit finetune: error: --device 'cuda': no CUDA GPU is usable here")


def test_finetune_checks_the_output_dir_before_loading_anything(tmp_path, capsys):
    from ragkit.cli import main

    (tmp_path / "o" / "final").mkdir(parents=True)
    (tmp_path / "o" / "final" / "report.docx").write_text("mine")
    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", str(tmp_path / "missing")]  # fmt: skip
    assert main(argv) == 2
    assert "final' already holds files ragkit did not write (report.docx)" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("mine")
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "a_file")
    assert main(argv) == 2
    assert "--output_dir" in (err := capsys.readouterr().err) and "a_file' is an existing file" in err


def test_finetune_refuses_an_output_dir_under_a_file_before_loading_anything(tmp_path, capsys):
    from ragkit.cli import main

    (tmp_path / "a_file").write_text("mine")
    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "a_file" / "run"),
            "--model_name_or_path", str(tmp_path / "missing")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit finetune: error: fine-tuning output ") and len(err.splitlines()) == 1
    assert "cannot be created: " in err and "a_file' is a file" in err and "give another --output_dir" in err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_checkpoint_of_weight_shards_may_be_replaced_but_not_other_files(tmp_path):
    from ragkit.finetuning.trainer import check_output_dir

    checkpoint = tmp_path / "run" / "checkpoint-last"
    checkpoint.mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (checkpoint / name).write_bytes(b"")
    args = TrainingArguments(output_dir=tmp_path / "run", save_checkpoints=True)
    check_output_dir(args)  # what save_pretrained writes for a large model
    (checkpoint / "model-00001-of-00002.safetensors.bak").write_bytes(b"")
    with pytest.raises(
        RagInputError, match=r"\(model-00001-of-00002\.safetensors\.bak\).* written earlier by `ragkit"
    ):
        check_output_dir(args)


def test_consolidate_parser_is_its_own():
    from ragkit.commands import consolidate

    parser = argparse.ArgumentParser(prog="ragkit consolidate")
    consolidate.configure_parser(parser)
    parsed = parser.parse_args(
        [
            "--question-encoder-name-or-path",
            "q",
            "--generator_name_or_path",
            "g",
            "--dest",
            "d",
            "--n-docs",
            "2",
        ]
    )
    assert (parsed.question_encoder_name_or_path, parsed.generator_name_or_path, parsed.n_docs) == (
        "q",
        "g",
        2,
    )
    assert not hasattr(parsed, "train_batch_size")
