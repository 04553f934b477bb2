"""A saved custom-index retriever directory is self-contained and relocatable.

``save_pretrained`` writes the passages and faiss index the retriever owns into every directory it
saves to; a directory can be moved, renamed, or outlive the one it was loaded from. Directories
saved by transformers' RagRetriever (absolute paths into themselves) load after a move too.
"""

from __future__ import annotations

import json
import logging
import shutil

import datasets
import numpy as np
import pytest
import transformers
from retrieval_helpers import DIM, make_indexed_dataset
from transformers.models.rag.retrieval_rag import CustomHFIndex as RefCustomHFIndex

from ragkit import RagConfig, RagRetriever
from ragkit.retrieval import CustomHFIndex

INDEX_FILE, PASSAGES_DIR = "hf_dataset_index.faiss", "hf_dataset"


@pytest.fixture
def make_retriever(fresh_config, question_encoder_tokenizer, generator_tokenizer, passage_embeddings):
    """Build a retriever over an in-memory indexed dataset (``seed`` picks other embeddings)."""

    def make(seed=None):
        embeddings = passage_embeddings
        if seed is not None:
            embeddings = np.random.RandomState(seed).randn(*embeddings.shape).astype("float32")
        return RagRetriever(
            fresh_config,
            question_encoder_tokenizer,
            generator_tokenizer,
            index=CustomHFIndex(DIM, make_indexed_dataset(embeddings)),
        )

    return make


def _doc_ids(retriever, queries):
    return retriever.retrieve(queries, 4)[1]


def _assert_self_contained(directory):
    """The config's index paths name files inside ``directory``, and they are there."""
    config = json.loads((directory / "config.json").read_text())
    assert config["index_path"] == str((directory / INDEX_FILE).resolve())
    assert config["passages_path"] == str((directory / PASSAGES_DIR).resolve())
    assert (directory / INDEX_FILE).is_file()
    assert (directory / PASSAGES_DIR / "dataset_info.json").is_file()


def test_save_load_save_elsewhere_then_delete_the_first(make_retriever, tmp_path, queries):
    retriever = make_retriever()
    expected = _doc_ids(retriever, queries)
    retriever.save_pretrained(tmp_path / "first")
    RagRetriever.from_pretrained(tmp_path / "first").save_pretrained(tmp_path / "second")
    _assert_self_contained(tmp_path / "second")
    shutil.rmtree(tmp_path / "first")
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "second"), queries), expected
    )


def test_same_retriever_saved_twice(make_retriever, tmp_path, queries):
    retriever = make_retriever()
    expected = _doc_ids(retriever, queries)
    retriever.save_pretrained(tmp_path / "first")
    retriever.save_pretrained(tmp_path / "second")
    _assert_self_contained(tmp_path / "second")
    shutil.rmtree(tmp_path / "first")
    retriever.save_pretrained(tmp_path / "third")  # its files are gone: written from memory
    _assert_self_contained(tmp_path / "third")
    for directory in ("second", "third"):
        loaded = RagRetriever.from_pretrained(tmp_path / directory)
        np.testing.assert_array_equal(_doc_ids(loaded, queries), expected)


def test_save_again_into_the_same_directory(make_retriever, tmp_path, queries):
    retriever = make_retriever()
    expected = _doc_ids(retriever, queries)
    retriever.save_pretrained(tmp_path / "saved")
    loaded = RagRetriever.from_pretrained(tmp_path / "saved")
    loaded.save_pretrained(tmp_path / "saved")
    retriever.save_pretrained(tmp_path / "saved")
    _assert_self_contained(tmp_path / "saved")
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "saved"), queries), expected
    )


def test_moved_directory_loads(make_retriever, tmp_path, queries, caplog):
    retriever = make_retriever()
    expected = _doc_ids(retriever, queries)
    retriever.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved").rename(tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="ragkit.retrieval_rag"):
        loaded = RagRetriever.from_pretrained(tmp_path / "moved")
    np.testing.assert_array_equal(_doc_ids(loaded, queries), expected)
    assert loaded.config.index_path == str((tmp_path / "moved" / INDEX_FILE).resolve())
    # Saved again elsewhere, the copy no longer depends on the moved directory.
    loaded.save_pretrained(tmp_path / "copy")
    shutil.rmtree(tmp_path / "moved")
    _assert_self_contained(tmp_path / "copy")
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "copy"), queries), expected
    )


def test_renamed_directory_ignores_a_new_one_at_the_old_path(make_retriever, tmp_path, queries):
    # Keep version 1 under another name, save version 2 where it was: each loads its own index.
    first, second = make_retriever(), make_retriever(seed=1)
    expected_first, expected_second = _doc_ids(first, queries), _doc_ids(second, queries)
    assert not np.array_equal(expected_first, expected_second)
    first.save_pretrained(tmp_path / "retriever")
    (tmp_path / "retriever").rename(tmp_path / "retriever_v1")
    second.save_pretrained(tmp_path / "retriever")
    loaded_first = RagRetriever.from_pretrained(tmp_path / "retriever_v1")
    np.testing.assert_array_equal(_doc_ids(loaded_first, queries), expected_first)
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "retriever"), queries), expected_second
    )


def test_relative_save_directory(make_retriever, tmp_path, queries, monkeypatch):
    retriever = make_retriever()
    expected = _doc_ids(retriever, queries)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    retriever.save_pretrained("saved")
    monkeypatch.chdir(tmp_path)
    _assert_self_contained(tmp_path / "work" / "saved")
    loaded = RagRetriever.from_pretrained("work/saved")
    np.testing.assert_array_equal(_doc_ids(loaded, queries), expected)


def test_transformers_saved_directory_moved(
    fresh_config,
    question_encoder_tokenizer,
    generator_tokenizer,
    passage_embeddings,
    tmp_path,
    queries,
    caplog,
):
    reference = transformers.RagRetriever(
        transformers.RagConfig(**fresh_config.to_dict()),
        question_encoder_tokenizer,
        generator_tokenizer,
        index=RefCustomHFIndex(DIM, make_indexed_dataset(passage_embeddings)),
    )
    expected = reference.retrieve(queries, 4)[1]
    reference.save_pretrained(str(tmp_path / "saved"))  # absolute paths into tmp_path/saved
    (tmp_path / "saved").rename(tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="ragkit.retrieval_rag"):
        loaded = RagRetriever.from_pretrained(tmp_path / "moved")
    np.testing.assert_array_equal(_doc_ids(loaded, queries), expected)
    assert sum("not found" in record.getMessage() for record in caplog.records) == 2
    # Saved again by ragkit, the copy holds its own files.
    loaded.save_pretrained(tmp_path / "copy")
    shutil.rmtree(tmp_path / "moved")
    _assert_self_contained(tmp_path / "copy")
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "copy"), queries), expected
    )


def test_external_index_files_stay_references(retriever_dir, saved_custom_index, tmp_path, queries):
    # Passages and an index the user built elsewhere are referenced, not copied (they may be huge).
    passages_path, index_path = saved_custom_index
    kwargs = dict(index_name="custom", passages_path=str(passages_path), index_path=str(index_path))
    retriever = RagRetriever.from_pretrained(retriever_dir, **kwargs)
    retriever.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (config["passages_path"], config["index_path"]) == (str(passages_path), str(index_path))
    assert not (tmp_path / "saved" / INDEX_FILE).exists()
    assert not (tmp_path / "saved" / PASSAGES_DIR).exists()
    np.testing.assert_array_equal(
        _doc_ids(RagRetriever.from_pretrained(tmp_path / "saved"), queries), _doc_ids(retriever, queries)
    )


def test_explicit_paths_override_the_saved_files(make_retriever, saved_custom_index, tmp_path, queries):
    retriever = make_retriever(seed=1)
    retriever.save_pretrained(tmp_path / "saved")
    passages_path, index_path = saved_custom_index
    loaded = RagRetriever.from_pretrained(
        tmp_path / "saved", passages_path=str(passages_path), index_path=str(index_path)
    )
    assert loaded.config.index_path == str(index_path)
    assert loaded.index.index_path == str(index_path)
    assert not np.array_equal(_doc_ids(loaded, queries), _doc_ids(retriever, queries))


def test_indexed_dataset_replaces_the_saved_files(make_retriever, tmp_path, queries):
    # from_pretrained(dir, indexed_dataset=...) retrieves from the given dataset: that is what gets saved.
    make_retriever().save_pretrained(tmp_path / "old")
    other = make_retriever(seed=1)
    expected = _doc_ids(other, queries)
    loaded = RagRetriever.from_pretrained(tmp_path / "old", indexed_dataset=other.index.dataset)
    np.testing.assert_array_equal(_doc_ids(loaded, queries), expected)
    loaded.save_pretrained(tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    _assert_self_contained(tmp_path / "new")
    np.testing.assert_array_equal(_doc_ids(RagRetriever.from_pretrained(tmp_path / "new"), queries), expected)


def test_paths_of_a_given_config_override_the_saved_files(
    make_retriever, saved_custom_index, tmp_path, queries
):
    # As in transformers (and load_rag_for_training / `ragkit eval --index_path`): a config passed with
    # other index files retrieves from those, not from the files saved next to the directory's config.
    make_retriever(seed=1).save_pretrained(tmp_path / "saved")
    passages_path, index_path = saved_custom_index

    def config_with_other_files(config_class):
        config = config_class.from_pretrained(tmp_path / "saved")
        config.passages_path, config.index_path = str(passages_path), str(index_path)
        return config

    loaded = RagRetriever.from_pretrained(tmp_path / "saved", config=config_with_other_files(RagConfig))
    assert loaded.index.index_path == str(index_path)
    reference = transformers.RagRetriever.from_pretrained(
        str(tmp_path / "saved"), config=config_with_other_files(transformers.RagConfig)
    )
    np.testing.assert_array_equal(_doc_ids(loaded, queries), _doc_ids(reference, queries))
    # An unchanged config still reads the directory's own files.
    unchanged = RagRetriever.from_pretrained(
        tmp_path / "saved", config=RagConfig.from_pretrained(tmp_path / "saved")
    )
    assert unchanged.index.index_path == str((tmp_path / "saved" / INDEX_FILE).resolve())


def test_saving_onto_an_existing_file_is_refused(make_retriever, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(AssertionError, match="existing file"):  # transformers raises AssertionError too
        make_retriever().save_pretrained(target)
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_interrupted_save_keeps_the_previous_index_and_passages_together(
    make_retriever, tmp_path, queries, monkeypatch
):
    first, second = make_retriever(), make_retriever(seed=1)  # same size: a mix would load silently
    first.save_pretrained(tmp_path / "saved")
    save_to_disk = datasets.Dataset.save_to_disk

    def killed_after_writing(self, path, *args, **kwargs):
        save_to_disk(self, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "saved")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generator_tokenizer", PASSAGES_DIR, INDEX_FILE, "question_encoder_tokenizer"
    ]  # fmt: skip
    loaded = RagRetriever.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(_doc_ids(loaded, queries), _doc_ids(first, queries))
    doc_ids = _doc_ids(loaded, queries)
    np.testing.assert_array_equal(
        loaded.retrieve(queries, 4)[0],
        first.index.passages.embeddings(doc_ids.reshape(-1)).reshape(-1, 4, DIM),
    )


@pytest.mark.parametrize("part", ["config", "tokenizer"])
def test_an_interrupted_save_leaves_no_truncated_config_or_tokenizer(
    make_retriever, tmp_path, monkeypatch, part
):
    retriever = make_retriever()
    retriever.save_pretrained(tmp_path / "saved")
    before = {
        path.relative_to(tmp_path): path.read_bytes()
        for path in (tmp_path / "saved").rglob("*")
        if path.is_file() and not path.is_relative_to(tmp_path / "saved" / PASSAGES_DIR)
    }
    retriever.config.n_docs += 1  # a save that completed would change config.json

    def killed_mid_write(path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[:10])  # a truncated file, then the process is interrupted
        raise KeyboardInterrupt

    if part == "config":
        monkeypatch.setattr(
            transformers.PretrainedConfig,
            "to_json_file",
            lambda self, path, use_diff=True: killed_mid_write(path, self.to_json_string(use_diff)),
        )
    else:
        monkeypatch.setattr(
            type(retriever.generator_tokenizer),
            "save_pretrained",
            lambda self, directory, **kwargs: killed_mid_write(f"{directory}/vocab.json", "{" * 40),
        )
    with pytest.raises(KeyboardInterrupt):
        retriever.save_pretrained(tmp_path / "saved")
    monkeypatch.undo()
    after = {
        path.relative_to(tmp_path): path.read_bytes()
        for path in (tmp_path / "saved").rglob("*")
        if path.is_file() and not path.is_relative_to(tmp_path / "saved" / PASSAGES_DIR)
    }
    if part == "config":
        assert after == before
    else:  # config.json is complete (the new one); each tokenizer folder is the old one or the new one whole
        assert {k: v for k, v in after.items() if "tokenizer" in str(k)} == {
            k: v for k, v in before.items() if "tokenizer" in str(k)
        }
        assert (
            json.loads(after[next(k for k in after if k.name == "config.json")])["n_docs"]
            == retriever.config.n_docs
        )
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generator_tokenizer", PASSAGES_DIR, INDEX_FILE, "question_encoder_tokenizer"
    ]  # fmt: skip
    RagRetriever.from_pretrained(tmp_path / "saved")  # loads
