"""How every ``ragkit`` command fails: one short message, exit code 2, fast when the Hub is out of reach."""

from __future__ import annotations

import time

import pytest

from ragkit import commands
from ragkit.cli import main
from ragkit.errors import HubUnreachableError, OfflineFileError


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.tsv"
    path.write_text("title\ttext\nParis\tParis is the capital of France.\n")
    return path


def _one_error(err: str, command: str) -> str:
    assert err.startswith(f"ragkit {command}: error: "), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 9
    return err


def test_build_index_offline_with_the_default_encoder_names_the_offline_encoder(docs, tmp_path, capsys):
    started = time.perf_counter()
    assert main(["build-index", str(docs), str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 10
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "--encoder all-MiniLM-L6-v2" in err and "HF_HUB_OFFLINE=1" in err
    assert "facebook/dpr-ctx_encoder-multiset-base" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_fails_fast_for_every_hub_name(online_without_network, docs, tmp_path, capsys):
    from huggingface_hub import constants

    started = time.perf_counter()
    assert main(["build-index", str(docs), str(tmp_path / "out")]) == 2
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "cannot be reached" in err and "--encoder all-MiniLM-L6-v2" in err
    assert main(["convert-legacy", "huggingface/wiki_dpr", str(tmp_path / "legacy")]) == 2
    err = _one_error(capsys.readouterr().err, "convert-legacy")
    assert "cannot be reached" in err and "'huggingface/wiki_dpr'" in err and "local directory" in err
    assert time.perf_counter() - started < 15
    assert constants.HF_HUB_OFFLINE is False  # a command's offline switch does not outlive it


def test_unreachable_hub_with_a_cached_name_runs_from_the_cache(online_without_network, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(commands, "_is_cached", lambda *args: True)
    commands.require_source("org/cached-model", "--encoder")  # no error: the files are local
    assert constants.HF_HUB_OFFLINE is True  # no retries per file afterwards


def test_require_source_errors(tmp_path, monkeypatch):
    commands.require_source(tmp_path, "--encoder")  # an existing directory is fine
    with pytest.raises(FileNotFoundError, match=r"'\./missing_dir': no such directory"):
        commands.require_source("./missing_dir", "--encoder")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        commands.require_source(str(tmp_path / "a" / "b" / "c"), "--encoder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        commands.require_source(str(tmp_path / "file"), "--encoder")
    with pytest.raises(OfflineFileError, match=r"HF_HUB_OFFLINE=1\)\. Try this\."):
        commands.require_source("org/not-cached", "--encoder", hint="Try this.")


def test_unreachable_error_type(online_without_network):
    with pytest.raises(HubUnreachableError, match=r"http://127\.0\.0\.1:\d+\) cannot be reached"):
        commands.require_source("org/not-cached", "--model")


def test_debug_shows_the_traceback(docs, tmp_path, monkeypatch):
    with pytest.raises(OfflineFileError):
        main(["build-index", str(docs), str(tmp_path / "out"), "--debug"])
    with pytest.raises(OfflineFileError):
        main(["--debug", "build-index", str(docs), str(tmp_path / "out")])
    monkeypatch.setenv("RAGKIT_DEBUG", "1")
    with pytest.raises(OfflineFileError):
        main(["build-index", str(docs), str(tmp_path / "out")])


def test_a_bug_keeps_its_traceback(docs, tmp_path, monkeypatch):
    import ragkit.commands.build_index as command

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(command, "run", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["build-index", str(docs), str(tmp_path / "out")])


def test_hub_errors_raised_inside_a_command_get_a_hint(docs, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    import ragkit.commands.build_index as command

    def offline(args):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.")

    monkeypatch.setattr(command, "run", offline)
    assert main(["build-index", str(docs), str(tmp_path / "out")]) == 2
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "disk cache" in err and "hint:" in err and "HF_HUB_OFFLINE=1" in err


@pytest.mark.parametrize(
    "command, documented, other",
    [
        ("build-index", "--words_per_passage", "--words-per-passage"),
        ("build-index", "--index_factory", "--index-factory"),
        ("build-index", "--no_progress", "--no-progress"),
        ("convert-legacy", "--allow_pickle", "--allow-pickle"),
        ("eval", "--model_name_or_path", "--model-name-or-path"),
        ("eval", "--predictions_path", "--predictions-path"),
        ("demo", "--work_dir", "--work-dir"),
        ("demo", "--no_progress", "--no-progress"),
    ],
)
def test_help_documents_underscores(command, documented, other, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert documented in out and other not in out


def test_both_spellings_are_accepted(docs, tmp_path, capsys):
    for flag in ("--words-per-passage", "--words_per_passage", "--words-per-passage=7"):
        value = [] if "=" in flag else ["7"]
        # The source does not exist: the command gets past parsing and fails on the file.
        assert main(["build-index", str(tmp_path / "nope.tsv"), str(tmp_path / "out"), flag, *value]) == 2
        err = capsys.readouterr().err
        assert "nope.tsv" in err and "unrecognized" not in err


def test_negative_words_per_passage_is_refused_at_parse_time(docs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build-index", str(docs), str(tmp_path / "out"), "--words-per-passage", "-5"])
    assert exit_info.value.code == 2
    assert "--words_per_passage: must be a whole number >= 0, got '-5'" in capsys.readouterr().err


def test_missing_encoder_directory_says_so(docs, tmp_path, capsys):
    assert (
        main(["build-index", str(docs), str(tmp_path / "out"), "--encoder", str(tmp_path / "my_encoder")])
        == 2
    )
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "my_encoder" in err and "no such directory" in err and "Repo id" not in err


def test_cuda_without_a_gpu_is_a_clear_error(docs, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(
        ["build-index", str(docs), str(tmp_path / "out"), "--encoder", "all-MiniLM-L6-v2", "--device", "cuda"]
    )
    assert code == 2
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "--device 'cuda': no CUDA GPU" in err and "--device cpu" in err


def test_output_that_is_a_regular_file_is_refused(docs, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    assert main(["build-index", str(docs), str(out), "--encoder", "all-MiniLM-L6-v2"]) == 2
    assert "existing file" in _one_error(capsys.readouterr().err, "build-index")
    assert out.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.tsv", "notes.txt"]  # nothing moved aside
    assert main(["convert-legacy", str(tmp_path), str(out)]) == 2
    assert "existing file" in _one_error(capsys.readouterr().err, "convert-legacy")
    assert out.read_text() == "my notes"


def test_build_index_surfaces_the_library_warnings(docs, tmp_path, monkeypatch, capsys):
    import warnings

    import ragkit.retrieval.building as building

    def build_index(*args, **kwargs):
        warnings.warn("docs.csv: the header ['a', 'b'] is indexed as a passage", UserWarning, stacklevel=2)
        raise ValueError("stop here")

    monkeypatch.setattr(building, "build_index", build_index)
    assert main(["build-index", str(docs), str(tmp_path / "out"), "--encoder", "all-MiniLM-L6-v2"]) == 2
    err = capsys.readouterr().err
    assert "ragkit build-index: warning: docs.csv: the header" in err
    assert "ragkit build-index: error: stop here" in err


def test_device_checks():
    commands.check_device(None)
    commands.check_device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device torch knows"):
        commands.check_device("gpu0")


def test_an_output_file_under_a_file_is_refused_before_the_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for output in (tmp_path / "notes.txt" / "predictions.txt", tmp_path / "notes.txt" / "a" / "b.txt"):
        with pytest.raises(
            ValueError, match=r"--predictions_path .* cannot be written: '.*notes\.txt' is a file"
        ):
            commands.check_outputs({"--predictions_path": str(output)}, {})
    commands.check_outputs({"--predictions_path": str(tmp_path / "new" / "predictions.txt")}, {})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_hub_names_offline_fail_fast_in_eval_and_demo(tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text("who wrote hamlet?\n")
    gold = tmp_path / "g.ans"
    gold.write_text("Shakespeare\n")
    started = time.perf_counter()
    args = ["--evaluation_set", str(questions), "--gold_data_path", str(gold), "--gold_data_mode", "ans"]
    args += ["--predictions_path", str(tmp_path / "p.txt")]
    assert main(["eval", "--model_name_or_path", "facebook/rag-sequence-nq", *args]) == 2
    err = _one_error(capsys.readouterr().err, "eval")
    assert "'facebook/rag-sequence-nq'" in err and "HF_HUB_OFFLINE=1" in err
    assert main(["demo", "--model", "facebook/rag-sequence-nq"]) == 2
    err = _one_error(capsys.readouterr().err, "demo")
    assert "HF_HUB_OFFLINE=1" in err and "without --model runs fully offline" in err
    assert time.perf_counter() - started < 10


def test_demo_refuses_a_file_as_work_dir_and_bad_values(tmp_path, capsys):
    work_dir = tmp_path / "notes.txt"
    work_dir.write_text("mine")
    assert main(["demo", "--quick", "--work_dir", str(work_dir)]) == 2
    assert "is an existing file" in _one_error(capsys.readouterr().err, "demo")
    assert work_dir.read_text() == "mine"
    for flag, least in (("--n_docs", 1), ("--epochs", 1), ("--max_facts", 12)):
        with pytest.raises(SystemExit):
            main(["demo", flag, "0"])
        assert f">= {least}" in capsys.readouterr().err


def test_a_bad_value_is_one_error_line_and_a_pointer_to_help_not_the_usage_block(tmp_path, capsys):
    for argv in (
        [
            "eval",
            "--model_name_or_path",
            "m",
            "--evaluation_set",
            "q",
            "--gold_data_path",
            "g",
            "--num_beams",
            "x",
        ],
        ["eval", "--model_name_or_path", "m"],
        ["build-index", str(tmp_path / "docs.tsv")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        command = argv[0]
        first, *rest = capsys.readouterr().err.strip().splitlines()
        assert first.startswith(f"ragkit {command}: error: ")
        assert rest == [f"  see `ragkit {command} --help` for the options"]


def test_build_index_help_says_the_train_size_default(capsys):
    with pytest.raises(SystemExit):
        main(["build-index", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "vectors used to train IVF/PQ indexes (default: 262,144)" in help_text


def test_a_directory_as_source_says_it_is_a_directory(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    assert main(["build-index", str(tmp_path / "docs"), str(tmp_path / "out")]) == 2
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "is a directory; give the documents file inside it" in err and "does not exist" not in err


def test_commands_log_ragkit_info_but_not_other_libraries_info():
    # faiss's loader logs its CPU-feature probes (with ModuleNotFoundError text) at INFO on every run.
    import subprocess
    import sys

    code = (
        "import logging; from ragkit.cli import _configure_logging; _configure_logging(False); "
        "logging.getLogger('faiss.loader').info('probe ModuleNotFoundError'); "
        "logging.getLogger('ragkit.retrieval.building').info('Wrote 3 passages')"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "Wrote 3 passages" in err and "probe" not in err


def test_no_progress_hides_library_progress_bars():
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    with commands.hidden_progress_bars():
        assert not transformers_logging.is_progress_bar_enabled()
        assert not datasets_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled() and datasets_logging.is_progress_bar_enabled()


def test_out_of_gpu_memory_is_a_message_with_a_hint(docs, tmp_path, monkeypatch, capsys):
    import torch

    import ragkit.commands.build_index as command

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(command, "run", out_of_memory)
    assert main(["build-index", str(docs), str(tmp_path / "out")]) == 2
    err = _one_error(capsys.readouterr().err, "build-index")
    assert "CUDA out of memory" in err and "lower the batch size" in err


def test_debug_and_verbose_are_accepted_after_the_command(docs, tmp_path, capsys):
    assert main(["build-index", str(docs), str(tmp_path / "out"), "-v"]) == 2  # offline: the encoder error
    assert "ragkit build-index: error:" in capsys.readouterr().err


def test_a_missing_package_is_a_message_but_a_broken_ragkit_import_is_a_traceback(
    docs, tmp_path, monkeypatch, capsys
):
    import ragkit.commands.build_index as command

    def missing(args):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(command, "run", missing)
    assert main(["build-index", str(docs), str(tmp_path / "out")]) == 2
    assert "No module named 'faiss'" in _one_error(capsys.readouterr().err, "build-index")

    def broken(args):
        raise ImportError("cannot import name 'load' from 'ragkit.loading'", name="ragkit.loading")

    monkeypatch.setattr(command, "run", broken)
    with pytest.raises(ImportError, match=r"ragkit\.loading"):
        main(["build-index", str(docs), str(tmp_path / "out")])


def test_a_file_as_convert_legacy_source_asks_for_a_directory(tmp_path, capsys):
    # The source is a dataset (DPR's legacy files), not a model: the message must not ask for a model.
    source = tmp_path / "afile.txt"
    source.write_text("not an index\n")
    assert main(["convert-legacy", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragkit convert-legacy: error: SRC") and "is a file; give a directory" in err
    assert "model" not in err.split("error:", 1)[1] and not (tmp_path / "out").exists()
