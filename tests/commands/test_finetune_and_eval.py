"""`ragkit consolidate` -> `ragkit finetune` (interrupted, resumed) -> `ragkit eval`, and the bad inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ragkit.cli import main
from ragkit.errors import RagInputError
from ragkit.finetuning import QAExample, RagTrainer, TrainingArguments, load_qa_split, load_rag_for_training
from ragkit.testing import TINY_PASSAGES, tiny_bart_config, tiny_dpr_config


@pytest.fixture(scope="module")
def components(tmp_path_factory, question_encoder_tokenizer, generator_tokenizer):
    """A tiny DPR question encoder, a tiny BART generator and a custom index, each saved in its own directory."""
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    from ragkit.encoders import load_text_encoder
    from ragkit.retrieval.building import build_index

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    DPRQuestionEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(root / "qe")
    question_encoder_tokenizer.save_pretrained(root / "qe")
    BartForConditionalGeneration(tiny_bart_config(init_std=0.1)).save_pretrained(root / "gen")
    generator_tokenizer.save_pretrained(root / "gen")
    encoder = load_text_encoder(str(root / "qe"), device="cpu")
    built = build_index(
        [{"title": t, "text": x} for t, x in TINY_PASSAGES],
        root / "index",
        encoder=encoder,
        index_factory="Flat",
        words_per_passage=None,
        show_progress=False,
    )
    return root, built


@pytest.fixture
def data_dir(tmp_path, capitals):
    """train.{source,target} line files and val.jsonl over the capital questions."""
    CAPITALS, TRAIN_TEMPLATES, HELD_OUT_TEMPLATE = capitals
    directory = tmp_path / "data"
    directory.mkdir()
    pairs = [(t.format(c), city) for t in TRAIN_TEMPLATES for c, city in CAPITALS.items()]
    (directory / "train.source").write_text("".join(q + "\n" for q, _ in pairs))
    (directory / "train.target").write_text("".join(a + "\n" for _, a in pairs))
    with open(directory / "val.jsonl", "w") as f:
        for country, city in CAPITALS.items():
            f.write(json.dumps({"question": HELD_OUT_TEMPLATE.format(country), "answers": [city]}) + "\n")
    return directory


def _consolidated(tmp_path, components, model_type="rag_sequence"):
    """A RAG checkpoint over the tiny custom index, written by ``ragkit consolidate``."""
    root, built = components
    checkpoint = tmp_path / "rag"
    assert (
        main(
            [
                "consolidate",
                "--model_type", model_type,
                "--question_encoder_name_or_path", str(root / "qe"),
                "--generator_name_or_path", str(root / "gen"),
                "--dest", str(checkpoint),
                "--index_name", "custom",
                "--passages_path", str(built.passages_path),
                "--index_path", str(built.index_path),
                "--n_docs", "2",
            ]
        )
        == 0
    )  # fmt: skip
    return checkpoint


def test_consolidate_finetune_resume_eval(tmp_path, components, data_dir, capitals, capsys):
    CAPITALS, _, HELD_OUT_TEMPLATE = capitals
    checkpoint = _consolidated(tmp_path, components, "rag_token")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "rag" and config["retrieval_vector_size"] == 32
    assert (checkpoint / "question_encoder_tokenizer").is_dir() and (
        checkpoint / "generator_tokenizer"
    ).is_dir()

    output = tmp_path / "out"
    finetune = [
        "finetune",
        "--model_name_or_path", str(checkpoint),
        "--data_dir", str(data_dir),
        "--output_dir", str(output),
        "--num_train_epochs", "2",
        "--train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--max_combined_length", "96",
        "--label_smoothing", "0.1",
        "--no_progress",
    ]  # fmt: skip
    capsys.readouterr()
    assert main([*finetune, "--max_steps", "4"]) == 0  # stops mid-epoch 2, as an interrupted run
    captured = capsys.readouterr()
    assert (
        "stopped at step 4 (--max_steps); continue with --resume and a larger or no --max_steps"
        in captured.out
    )
    # --no_progress: no bar at all, transformers' (loading weights, writing checkpoints) included.
    assert "it/s]" not in captured.err and "Writing model shards" not in captured.err
    assert not (output / "final").exists()
    # A resume with another batch size would silently follow another schedule: refused, naming both values.
    assert main([*finetune, "--resume", "--train_batch_size", "3"]) == 2
    assert re.search(
        r"ragkit finetune: error: .*train_batch_size: 4 in the checkpoint, 3 now", capsys.readouterr().err
    )
    with pytest.raises(RagInputError, match=r"train_batch_size: 4 in the checkpoint, 3 now"):
        main([*finetune, "--resume", "--train_batch_size", "3", "--debug"])
    assert main([*finetune, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned model written to" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert (
        metrics["global_step"] == 6 and len(metrics["train_loss"]) == 6
    )  # 12 questions, batches of 4, 2 epochs
    assert len(metrics["val_em"]) == 2  # one validation EM per epoch (the first from before the interruption)
    # Each flag reached the model or the optimizer (the consolidated checkpoint had 300 and 0.0).
    assert config.get("max_combined_length", 300) == 300 and config.get("label_smoothing", 0.0) == 0.0
    final_config = json.loads((output / "final" / "config.json").read_text())
    assert final_config["max_combined_length"] == 96 and final_config["label_smoothing"] == 0.1
    state = torch.load(output / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert [group["initial_lr"] for group in state["optimizer"]["param_groups"]] == [1e-2] * len(
        state["optimizer"]["param_groups"]
    )

    questions = tmp_path / "questions.txt"
    gold = tmp_path / "gold.ans"
    questions.write_text("".join(HELD_OUT_TEMPLATE.format(c) + "\n" for c in CAPITALS))
    gold.write_text("".join(city + "\n" for city in CAPITALS.values()))
    predictions = tmp_path / "predictions.txt"
    metrics_path = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model_name_or_path", str(output / "final"),
                "--evaluation_set", str(questions),
                "--gold_data_path", str(gold),
                "--gold_data_mode", "ans",
                "--predictions_path", str(predictions),
                "--metrics_path", str(metrics_path),
                "--n_docs", "2",
                "--num_beams", "2",
                "--max_length", "8",
            ]
        )
        == 0
    )  # fmt: skip
    assert len(predictions.read_text().splitlines()) == len(CAPITALS)
    scores = json.loads(metrics_path.read_text())
    assert 0.0 <= scores["em"] <= scores["f1"] <= 1.0 and scores["n"] == len(CAPITALS)

    titles = tmp_path / "titles.txt"
    titles.write_text("".join("Paris\n" for _ in CAPITALS))
    assert (
        main(
            [
                "eval",
                "--eval_mode", "retrieval",
                "--model_name_or_path", str(output / "final"),
                "--evaluation_set", str(questions),
                "--gold_data_path", str(titles),
                "--predictions_path", str(predictions),
                "--metrics_path", str(metrics_path),
                "--n_docs", "2",
                "--overwrite",  # the predictions of the e2e run above
            ]
        )
        == 0
    )  # fmt: skip
    retrieved = [line.split("\t") for line in predictions.read_text().splitlines()]
    assert len(retrieved) == len(CAPITALS) and all(len(r) == 2 for r in retrieved)
    expected = sum(r.count("Paris") for r in retrieved) / (2 * len(CAPITALS))
    assert json.loads(metrics_path.read_text())["precision@2"] == pytest.approx(expected)


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_checkpoint(
    tmp_path, components, data_dir, capsys
):
    import shutil

    checkpoint = _consolidated(tmp_path, components)
    output = tmp_path / "out"
    finetune = [
        "finetune",
        "--model_name_or_path", str(checkpoint),
        "--data_dir", str(data_dir),
        "--output_dir", str(output),
        "--num_train_epochs", "2",
        "--train_batch_size", "4",
        "--no_progress",
    ]  # fmt: skip
    assert main([*finetune, "--max_steps", "1"]) == 0
    saved = tmp_path / "saved"
    shutil.copytree(output, saved)
    # The weights, the config, and a tokenizer file the retriever loads: each cut in half, as by a killed copy.
    for damaged in ("model.safetensors", "config.json", "generator_tokenizer/tokenizer.json"):
        shutil.rmtree(output)
        shutil.copytree(saved, output)
        path = output / "checkpoint-last" / damaged
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        capsys.readouterr()
        assert main([*finetune, "--resume"]) == 2, damaged
        err = capsys.readouterr().err
        assert err.startswith(f"ragkit finetune: error: {path} is damaged"), err
        assert len(err.strip().splitlines()) == 1, err
        assert err.strip().endswith(
            f"Delete {output / 'checkpoint-last'} and resume from an earlier copy, or start without --resume."
        ), err


def test_finetune_from_encoder_and_generator_end2end(
    tmp_path, components, data_dir, question_encoder_tokenizer
):
    from transformers import DPRContextEncoder

    root, built = components
    torch.manual_seed(1)
    DPRContextEncoder(tiny_dpr_config(hidden_size=32)).save_pretrained(tmp_path / "ctx")
    question_encoder_tokenizer.save_pretrained(tmp_path / "ctx")
    output = tmp_path / "out"
    args = [
        "finetune",
        "--question_encoder_name_or_path", str(root / "qe"),
        "--generator_name_or_path", str(root / "gen"),
        "--model_type", "rag_sequence",
        "--index_name", "custom",
        "--passages_path", str(built.passages_path),
        "--index_path", str(built.index_path),
        "--n_docs", "2",
        "--data_dir", str(data_dir),
        "--output_dir", str(output),
        "--num_train_epochs", "1",
        "--train_batch_size", "4",
        "--gradient-accumulation-steps", "2",
        "--max-combined-length", "64",
        "--end2end",
        "--context_encoder_name_or_path", str(tmp_path / "ctx"),
        "--index_rebuild_steps", "1",
        "--no_progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert json.loads((output / "consolidated" / "config.json").read_text())["model_type"] == "rag"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 2  # 12 questions, batches of 4, 2 batches per step (3 without)
    assert json.loads((output / "final" / "config.json").read_text())["max_combined_length"] == 64
    trained = DPRContextEncoder.from_pretrained(output / "final" / "context_encoder")
    initial = DPRContextEncoder.from_pretrained(tmp_path / "ctx")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))


# ----------------------------------------------------------------------------- bad inputs


def test_misaligned_and_missing_data_files(tmp_path):
    (tmp_path / "train.source").write_text("q1\nq2\nq3\n")
    (tmp_path / "train.target").write_text("a1\na2\n")
    with pytest.raises(ValueError, match=r"train\.source has 3 lines but .*train\.target has 2"):
        load_qa_split(tmp_path, "train")
    (tmp_path / "train.target").unlink()
    with pytest.raises(FileNotFoundError, match=r"not .*train\.target"):
        load_qa_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"val\.source \+ val\.target .* or val\.jsonl"):
        load_qa_split(tmp_path, "val")
    assert load_qa_split(tmp_path, "test", required=False) is None
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_qa_split(tmp_path, "val")
    (tmp_path / "val.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"val\.jsonl, line 1: .*'answer'"):
        load_qa_split(tmp_path, "val")
    # Valid JSON that is not an object (or 'answers' of the wrong type) used to raise AttributeError/TypeError.
    (tmp_path / "val.jsonl").write_text('{"question": "q", "answer": "a"}\n["q", "a"]\n')
    with pytest.raises(ValueError, match=r"val\.jsonl, line 2: .*JSON object"):
        load_qa_split(tmp_path, "val")
    (tmp_path / "val.jsonl").write_text('{"question": "q", "answers": 5}\n')
    with pytest.raises(ValueError, match=r"val\.jsonl, line 1: 'answers' must be"):
        load_qa_split(tmp_path, "val")


def test_data_split_edge_cases(tmp_path):
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first record.
    (tmp_path / "train.jsonl").write_text('\ufeff{"question": "q1", "answer": "a1"}\n', encoding="utf-8")
    assert [(e.source, e.target) for e in load_qa_split(tmp_path, "train")] == [("q1", "a1")]
    (tmp_path / "val.source").write_text("\ufeffq1\nq2\n", encoding="utf-8")
    (tmp_path / "val.target").write_text("\ufeffa1\na2\n", encoding="utf-8")
    assert [(e.source, e.target) for e in load_qa_split(tmp_path, "val")] == [("q1", "a1"), ("q2", "a2")]
    with pytest.raises(FileNotFoundError, match=r"data directory .*nowhere does not exist"):
        load_qa_split(tmp_path / "nowhere", "train")
    assert load_qa_split(tmp_path / "nowhere", "val", required=False) is None
    # An empty question or answer is a slipped line or a missing value, not an example.
    (tmp_path / "val.target").write_text("a1\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val\.target, line 2: the answer is empty"):
        load_qa_split(tmp_path, "val")
    (tmp_path / "train.jsonl").write_text(
        '{"question": "q1", "answer": "a1"}\n{"question": "", "answer": "a"}\n'
    )
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: the question is empty"):
        load_qa_split(tmp_path, "train")
    (tmp_path / "test.csv").write_text("question,answer\nq1,a1\n")
    with pytest.raises(
        FileNotFoundError, match=r"test\.jsonl .*\. Found test\.csv: convert to one of these formats"
    ):
        load_qa_split(tmp_path, "test")


@pytest.mark.parametrize("command", ["consolidate", "finetune"])
def test_a_generator_that_is_not_seq2seq_is_a_message(tmp_path, components, data_dir, command, capsys):
    root, _ = components
    parts = [
        "--question_encoder_name_or_path",
        str(root / "qe"),
        "--generator_name_or_path",
        str(root / "qe"),
    ]
    rest = {"consolidate": ["--dest", str(tmp_path / "rag")]}.get(
        command, ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--no_progress"]
    )
    assert main([command, *parts, *rest]) == 2
    err = capsys.readouterr().err
    assert f"ragkit {command}: error: --generator_name_or_path" in err
    assert "is a dpr model, not a sequence-to-sequence generator" in err


def test_not_a_rag_checkpoint(tmp_path, components):
    root, _ = components
    with pytest.raises(ValueError, match=r"gen is not a RAG checkpoint .*ragkit consolidate"):
        load_rag_for_training(root / "gen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a RAG checkpoint \(no config\.json\)"):
        load_rag_for_training(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rag_for_training(tmp_path / "missing")


def test_index_built_with_another_encoder_width(
    tmp_path, rag_config, question_encoder_tokenizer, generator_tokenizer
):
    import faiss
    import numpy as np
    from datasets import Dataset

    from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenizer
    from ragkit.retrieval.custom import CustomHFIndex

    # The question encoder makes 32-dim vectors; the passages were embedded by a 16-dim encoder.
    config = type(rag_config).from_dict(rag_config.to_dict())
    config.retrieval_vector_size = 16
    dataset = Dataset.from_dict(
        {
            "title": [t for t, _ in TINY_PASSAGES],
            "text": [x for _, x in TINY_PASSAGES],
            "embeddings": list(np.random.RandomState(0).randn(len(TINY_PASSAGES), 16).astype("float32")),
        }
    )
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(16))
    retriever = RagRetriever(
        config, question_encoder_tokenizer, generator_tokenizer, index=CustomHFIndex(16, dataset)
    )
    model = RagSequenceForGeneration(config=config, retriever=retriever)
    tokenizer = RagTokenizer(question_encoder_tokenizer, generator_tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), show_progress=False)
    with pytest.raises(ValueError, match=r"32-dim vectors but .* holds 16-dim passages.*ragkit build-index"):
        RagTrainer(model, tokenizer, args, [QAExample("what is the capital of france?", "Paris")])


def test_empty_corpus_is_refused(tmp_path):
    from ragkit.retrieval.building import build_index

    empty = tmp_path / "docs.tsv"
    empty.write_text("title\ttext\n")
    with pytest.raises(ValueError, match=r"docs\.tsv"):
        build_index(empty, tmp_path / "index", encoder="unused", show_progress=False)


def test_finetune_with_a_ray_served_index(tmp_path, components, data_dir, capsys):
    pytest.importorskip("ray")
    import ray

    checkpoint = _consolidated(tmp_path, components)
    args = [
        "finetune",
        "--model_name_or_path", str(checkpoint),
        "--data_dir", str(data_dir),
        "--output_dir", str(tmp_path / "out"),
        "--max_steps", "2",
        "--train_batch_size", "2",
        "--no_progress",
        "--distributed_retriever", "ray",
        "--num_retrieval_workers", "1",
    ]  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        ray.shutdown()
    assert "stopped at step 2" in capsys.readouterr().out


def test_end2end_with_a_distributed_retriever_is_refused(tmp_path, components, data_dir, capsys):
    checkpoint = _consolidated(tmp_path, components)
    args = [
        "finetune",
        "--model_name_or_path", str(checkpoint),
        "--data_dir", str(data_dir),
        "--output_dir", str(tmp_path / "out"),
        "--end2end",
        "--context_encoder_name_or_path", str(checkpoint),
        "--distributed_retriever", "pytorch",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2  # a command error: one message, no traceback
    assert "ragkit finetune: error: --end2end cannot be combined" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--end2end cannot be combined"):
        main([*args, "--debug"])  # the traceback on request
