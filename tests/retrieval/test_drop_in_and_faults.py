"""Drop-in behaviour the reference's own tests rely on, and clear early errors for bad input and damaged files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from unittest.mock import patch

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from retrieval_helpers import DIM, QUESTIONS

from ragkit import RagRetriever, RagTokenizer
from ragkit.errors import CorruptFileError, MissingFileError, RagInputError
from ragkit.retrieval import CanonicalHFIndex, CustomHFIndex
from ragkit.retrieval.building import build_index, build_passages_index, read_documents
from ragkit.testing import (
    TINY_PASSAGES,
    assert_doc_dicts_equal,
    write_tiny_custom_index,
    write_tiny_wiki_dpr_mirror,
)

_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
}


def _run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (ragkit on the path) and return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the load_dataset seam and doc_dicts -----------------------------------------------------------------


def _with_id_column(embeddings):
    dataset = Dataset.from_dict(
        {
            "id": [str(i) for i in range(len(TINY_PASSAGES))],
            "text": [text for _, text in TINY_PASSAGES],
            "title": [title for title, _ in TINY_PASSAGES],
            "embeddings": list(embeddings),
        }
    )
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(DIM))
    return dataset


def test_patched_load_dataset_provides_the_canonical_index_with_the_reference_arguments(
    fresh_config, question_encoder_tokenizer, generator_tokenizer, passage_embeddings, queries
):
    fresh_config.index_name, fresh_config.dataset = "compressed", "wiki_dpr"
    dataset = _with_id_column(passage_embeddings)
    with patch("ragkit.retrieval_rag.load_dataset") as mock_load_dataset:
        mock_load_dataset.return_value = dataset
        retriever = RagRetriever(fresh_config, question_encoder_tokenizer, generator_tokenizer)
    first, second = mock_load_dataset.call_args_list
    assert first.args == ("wiki_dpr",) and first.kwargs == dict(
        with_index=False, split="train", dummy=False, revision=None
    )
    assert second.kwargs == dict(
        with_embeddings=True,
        with_index=True,
        split="train",
        index_name="compressed",
        dummy=False,
        revision=None,
    )
    _, ids, _ = retriever.retrieve(queries, 3)
    expected = np.argsort(-(queries @ passage_embeddings.T), axis=1)[:, :3]
    np.testing.assert_array_equal(ids, expected)


def test_unpatched_seam_reads_the_files(
    tmp_path, fresh_config, question_encoder_tokenizer, generator_tokenizer
):
    import datasets

    import ragkit.retrieval_rag as retrieval_rag

    assert (
        retrieval_rag.load_dataset is datasets.load_dataset and retrieval_rag._replaced_load_dataset() is None
    )
    mirror = write_tiny_wiki_dpr_mirror(tmp_path / "wiki_dpr", dim=DIM)
    fresh_config.index_name, fresh_config.dataset = "exact", os.fspath(mirror)
    with patch("datasets.load_dataset", side_effect=AssertionError("the real path must not call it")):
        retriever = RagRetriever(fresh_config, question_encoder_tokenizer, generator_tokenizer)
    assert isinstance(retriever.index, CanonicalHFIndex) and retriever.index.faiss_index.ntotal == len(
        TINY_PASSAGES
    )


def test_doc_dicts_equal_the_reference(passage_embeddings, queries):
    from transformers.models.rag.retrieval_rag import CustomHFIndex as RefCustomHFIndex

    ours = CustomHFIndex(DIM, _with_id_column(passage_embeddings))
    ref = RefCustomHFIndex(DIM, _with_id_column(passage_embeddings))
    ids, _ = ours.get_top_docs(queries, 4)
    docs, ref_docs = ours.get_doc_dicts(ids), ref.get_doc_dicts(ids)
    assert sorted(docs[0]) == ["embeddings", "id", "text", "title"]
    assert docs[0]["embeddings"].shape == (4, DIM) and docs[0]["embeddings"].dtype == np.float32
    assert_doc_dicts_equal(docs, ref_docs)


def test_missing_slots_get_empty_values_and_zero_embeddings(passage_embeddings):
    docs = CustomHFIndex(DIM, _with_id_column(passage_embeddings)).get_doc_dicts(np.array([[2, -1]]))
    assert docs[0]["id"] == ["2", ""] and docs[0]["title"][1] == ""
    np.testing.assert_array_equal(docs[0]["embeddings"][1], np.zeros(DIM, dtype=np.float32))
    np.testing.assert_array_equal(docs[0]["embeddings"][0], passage_embeddings[2])


# -- tokenizer folders ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_without_config(tmp_path, question_encoder_tokenizer, generator_tokenizer):
    RagTokenizer(question_encoder=question_encoder_tokenizer, generator=generator_tokenizer).save_pretrained(
        tmp_path
    )
    assert not (tmp_path / "config.json").exists()
    loaded = RagTokenizer.from_pretrained(tmp_path)
    assert (
        loaded("where is paris?")["input_ids"] == question_encoder_tokenizer("where is paris?")["input_ids"]
    )
    assert loaded.generator("Paris")["input_ids"] == generator_tokenizer("Paris")["input_ids"]


@pytest.mark.parametrize("folder", ["generator_tokenizer", "question_encoder_tokenizer"])
def test_missing_tokenizer_folder_is_named(tmp_path, retriever_dir, folder, saved_custom_index):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(retriever_dir, checkpoint)
    shutil.rmtree(checkpoint / folder)
    with pytest.raises(MissingFileError, match=f"no {folder}/ folder"):
        RagTokenizer.from_pretrained(checkpoint)
    passages_path, index_path = saved_custom_index
    with pytest.raises(MissingFileError, match=folder):
        RagRetriever.from_pretrained(
            checkpoint, passages_path=os.fspath(passages_path), index_path=os.fspath(index_path)
        )


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path, retriever_dir):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(retriever_dir, checkpoint)
    for name in os.listdir(checkpoint / "generator_tokenizer"):
        if name not in ("tokenizer_config.json", "special_tokens_map.json"):
            os.remove(checkpoint / "generator_tokenizer" / name)
    with pytest.raises(MissingFileError, match="has no vocabulary"):
        RagTokenizer.from_pretrained(checkpoint)


# -- question inputs -----------------------------------------------------------------------------------


@pytest.fixture
def retriever(fresh_config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset):
    return RagRetriever(
        fresh_config,
        question_encoder_tokenizer,
        generator_tokenizer,
        index=CustomHFIndex(DIM, indexed_dataset),
    )


@pytest.mark.parametrize("n_vectors", [3, 5])
def test_rows_of_ids_and_vectors_must_match(retriever, question_ids, queries, n_vectors):
    vectors = np.resize(queries, (n_vectors, DIM)).astype("float32")
    with pytest.raises(
        RagInputError, match=f"`question_input_ids` has 4 row.*`question_hidden_states` has {n_vectors}"
    ):
        retriever(question_ids, vectors, n_docs=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_question_vectors_are_refused(retriever, question_ids, queries, bad):
    import torch

    vectors = queries.copy()
    vectors[2, 5] = bad
    for given in (vectors, torch.from_numpy(vectors)):
        with pytest.raises(RagInputError, match=r"NaN or infinite values \(rows \[2\]\)"):
            retriever.retrieve(given, 2)
    with pytest.raises(RagInputError, match="NaN or infinite"):
        retriever(question_ids, vectors, n_docs=2)


def test_non_finite_vectors_refused_by_the_device_search_and_shards(indexed_dataset, queries):
    import torch

    from ragkit.distributed.sharding import PassageShard
    from ragkit.retrieval.device_search import TorchExactSearch, as_query_tensor

    vectors = queries.copy()
    vectors[0, 0] = np.nan
    with pytest.raises(RagInputError, match="NaN"):
        as_query_tensor(torch.from_numpy(vectors), torch.device("cpu"), DIM)
    search = TorchExactSearch.from_faiss(indexed_dataset.get_index("embeddings").faiss_index, "cpu")
    with pytest.raises(RagInputError, match="NaN"):
        search.search(as_query_tensor(vectors, torch.device("cpu"), DIM), 2)
    with pytest.raises(RagInputError, match="NaN"):
        PassageShard(indexed_dataset).search(vectors, 2)


# -- passages columns ----------------------------------------------------------------------------------


def _passages(titles, texts, embeddings):
    return Dataset.from_dict({"title": titles, "text": texts, "embeddings": list(embeddings)})


def test_non_string_titles_and_null_texts_are_refused(tmp_path, passage_embeddings):
    n = len(passage_embeddings)
    titles, texts = [t for t, _ in TINY_PASSAGES], [x for _, x in TINY_PASSAGES]
    int_titles = _passages(list(range(n)), texts, passage_embeddings)
    null_texts = _passages(titles, [*texts[:-1], None], passage_embeddings)
    for dataset, message in (
        (int_titles, "'title' column must hold strings"),
        (null_texts, "'text' column has 1 missing"),
    ):
        dataset.add_faiss_index("embeddings")
        with pytest.raises(RagInputError, match=message):
            CustomHFIndex(DIM, dataset)
    # From disk the message names the directory.
    null_texts.drop_index("embeddings")
    null_texts.save_to_disk(tmp_path / "passages")
    with pytest.raises(RagInputError, match=r"passages.*'text' column has 1 missing"):
        CustomHFIndex.load_from_disk(DIM, tmp_path / "passages", tmp_path / "passages" / "state.json")


def test_wiki_dpr_mirror_with_integer_titles_is_refused(tmp_path):
    mirror = write_tiny_wiki_dpr_mirror(tmp_path / "wiki_dpr", dim=DIM)
    shard = mirror / "data" / "psgs_w100" / "nq" / "train-00000-of-00001.parquet"
    table = pq.read_table(shard)
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(range(table.num_rows)))
    pq.write_table(table, shard)
    with pytest.raises(RagInputError, match="'title' column must hold strings"):
        CanonicalHFIndex(DIM, dataset_name=os.fspath(mirror), index_name="exact")


# -- damaged files -------------------------------------------------------------------------------------


def _saved_passages(tmp_path):
    passages_path, index_path = write_tiny_custom_index(tmp_path / "custom")
    arrow = next(p for p in passages_path.iterdir() if p.suffix == ".arrow")
    return passages_path, index_path, arrow


@pytest.mark.parametrize("damage", ["empty", "truncated", "overwritten", "state"])
def test_damaged_passages_name_the_directory(tmp_path, damage):
    passages_path, index_path, arrow = _saved_passages(tmp_path)
    data = arrow.read_bytes()
    if damage == "empty":
        arrow.write_bytes(b"")
    elif damage == "truncated":
        arrow.write_bytes(data[: len(data) // 2])
    elif damage == "overwritten":
        arrow.write_bytes(b"\0" * 200 + data[200:])
    else:
        (passages_path / "state.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=str(passages_path)):
        CustomHFIndex.load_from_disk(DIM, passages_path, index_path)


def test_truncated_wiki_dpr_parquet_names_the_file(tmp_path):
    mirror = write_tiny_wiki_dpr_mirror(tmp_path / "wiki_dpr", dim=DIM)
    shard = mirror / "data" / "psgs_w100" / "nq" / "train-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match=r"train-00000-of-00001\.parquet"):
        CanonicalHFIndex(
            DIM, dataset_name=os.fspath(mirror), index_name="exact", cache_dir=tmp_path / "cache"
        )


@pytest.mark.parametrize("meta", [42, {"a": 1}, ["1", "two"], "garbage-bytes"])
def test_malformed_legacy_meta_is_a_corrupt_file(tmp_path, meta):
    from test_legacy_index import _write_legacy_files

    from ragkit.retrieval import convert_legacy_index
    from ragkit.retrieval.legacy import INDEX_FILENAME

    src = _write_legacy_files(
        tmp_path / "dpr", np.random.RandomState(0).randn(len(TINY_PASSAGES), DIM).astype("f4")
    )
    meta_file = src / f"{INDEX_FILENAME}.index_meta.dpr"
    if meta == "garbage-bytes":
        meta_file.write_bytes(meta_file.read_bytes()[:7])
    else:
        meta_file.write_bytes(pickle.dumps(meta))
    with pytest.raises(CorruptFileError, match=r"index_meta\.dpr"):
        convert_legacy_index(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- build-index inputs --------------------------------------------------------------------------------


def _documents(path):
    return list(read_documents(path))


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"title": "a", "text": "b"}\n\n{"title": "c", "text": 1984}\n')
    with pytest.raises(RagInputError, match=r"docs.jsonl, line 3: 'text' must be a string"):
        _documents(path)
    path.write_text('{"title": "a", "text": "b"}\n{"title": 5, "text": "x"}\n')
    with pytest.raises(RagInputError, match=r"docs.jsonl, line 2: 'title' must be a string"):
        _documents(path)
    path.write_text('{"title": "a", "text": "b"}\n\n\n{"title": "c", text: "d"}\n')
    with pytest.raises(RagInputError, match=r"docs.jsonl, line 4: not valid JSON"):
        _documents(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_file_is_named(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    body = "title,text\nCafé,Crème brûlée\n" if suffix == ".csv" else '{"title": "Café", "text": "Crème"}\n'
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(RagInputError, match=rf"docs{suffix}, line 2?.*not UTF-8"):
        _documents(path)


def test_bom_before_a_csv_header_is_accepted(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_bytes("\ufefftitle,text\nParis,Paris is in France.\n".encode())
    assert _documents(path) == [("Paris", "Paris is in France.")]


def test_headerless_two_column_csv_warns_about_its_first_row(tmp_path, caplog):
    path = tmp_path / "docs.csv"
    path.write_text("name,body\nParis,Paris is in France.\n")
    with caplog.at_level("WARNING", logger="ragkit.retrieval.building"):
        assert _documents(path)[0] == ("name", "body")
    assert "first row ['name', 'body'] is indexed as a passage" in caplog.text


@pytest.mark.parametrize("words", [-5, 2.5, True])
def test_words_per_passage_is_checked_first(tmp_path, words):
    path = tmp_path / "docs.csv"
    path.write_text("title,text\nParis,Paris is in France.\n")
    with pytest.raises(RagInputError, match="`words_per_passage` must be a positive number"):
        build_index(path, tmp_path / "out", encoder="does-not-matter", words_per_passage=words)


def test_build_passages_index_writes_a_loadable_index_atomically(tmp_path, passage_embeddings, queries):
    titles, texts = [t for t, _ in TINY_PASSAGES], [x for _, x in TINY_PASSAGES]
    built = build_passages_index(titles, texts, passage_embeddings, tmp_path / "index", index_factory="Flat")
    index = CustomHFIndex.load_from_disk(DIM, built.passages_path, built.index_path)
    index.init_index()
    ids, _ = index.get_top_docs(queries, 3)
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ passage_embeddings.T), axis=1)[:, :3])
    assert json.loads((tmp_path / "index" / "ragkit_index.json").read_text())["num_passages"] == len(texts)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds files ragkit did not write \(notes\.txt\)"):
        build_passages_index(titles, texts, passage_embeddings, tmp_path / "user", index_factory="Flat")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    with pytest.raises(RagInputError, match="one title, text and embedding row per passage"):
        build_passages_index(titles[:-1], texts, passage_embeddings, tmp_path / "bad", index_factory="Flat")


@pytest.mark.parametrize(
    "titles, texts, pattern",
    [
        (["a", None], ["x", "y"], r"`titles` holds 1 None value\(s\) \(the first at position 1\)"),
        (["a", "b"], ["x", 7], "`texts` must all be strings"),
        ([], [], "No passages to index"),
    ],
    ids=["none-title", "int-text", "empty"],
)
def test_build_passages_index_refuses_what_the_retriever_could_not_load(tmp_path, titles, texts, pattern):
    # Written anyway, the index would fail only when loaded (a null title, no passage) or in pyarrow.
    embeddings = np.zeros((len(texts), DIM), dtype="float32")
    with pytest.raises(RagInputError, match=pattern):
        build_passages_index(titles, texts, embeddings, tmp_path / "index", index_factory="Flat")
    assert list(tmp_path.iterdir()) == []


# -- unreachable services and quiet imports ------------------------------------------------------------


def test_unreachable_hub_says_so_quickly(tmp_path):
    env = dict(_ENV, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=os.fspath(tmp_path / "hf"))
    start = time.monotonic()
    done = _run_python(
        """
        from ragkit.retrieval import _hub
        for call in (lambda: _hub.resolve_file("facebook/wiki_dpr", "index/x.faiss"),
                     lambda: _hub.list_files("facebook/wiki_dpr", "data/*")):
            try:
                call()
            except Exception as err:
                print(type(err).__name__, "|", err)
        """,
        env=env,
    )
    assert time.monotonic() - start < 60, "each file must not retry against an unreachable Hub"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stderr[-2000:]
    for line in lines:
        assert line.startswith("HubUnreachableError |") and "cannot be reached" in line
        assert "downloads are disabled" not in line


def test_offline_hub_still_says_offline(tmp_path):
    env = dict(_ENV, HF_HUB_OFFLINE="1", HF_HOME=os.fspath(tmp_path / "hf"))
    done = _run_python(
        """
        from ragkit.retrieval import _hub
        try:
            _hub.resolve_file("facebook/wiki_dpr", "index/x.faiss")
        except Exception as err:
            print(type(err).__name__)
        """,
        env=env,
    )
    assert done.stdout.strip() == "OfflineFileError", done.stderr[-2000:]


def test_ray_address_nobody_listens_on_fails_fast():
    start = time.monotonic()
    done = _run_python(
        """
        from ragkit.distributed.ray_service import RayIndexService
        from ragkit.distributed.sharding import ShardSpec
        from ragkit.testing import tiny_indexed_dataset
        try:
            RayIndexService([ShardSpec(tiny_indexed_dataset())], address="127.0.0.1:1", init_timeout_s=30).start()
        except Exception as err:
            print(type(err).__name__, "|", err)
        """,
        timeout=90,
    )
    assert time.monotonic() - start < 60
    assert done.stdout.startswith(
        "RetrievalUnavailableError | Cannot reach the Ray cluster at '127.0.0.1:1'"
    ), done.stdout + done.stderr[-2000:]


def test_faiss_import_is_quiet_unless_debugging():
    code = """
        import logging, sys
        logging.basicConfig(level=logging.{level}, stream=sys.stdout)
        from ragkit.retrieval._devices import import_faiss
        import_faiss()
        print("faiss loaded")
        """
    quiet = _run_python(code.format(level="INFO"))
    assert "faiss loaded" in quiet.stdout and "faiss.loader" not in quiet.stdout
    debug = _run_python(code.format(level="DEBUG"))
    assert "faiss.loader" in debug.stdout  # the loader's messages stay available when debugging


def test_query_helpers_do_not_hide_the_question_texts(retriever, question_ids, queries):
    """The row check runs before retrieval and leaves a correct call unchanged."""
    out = retriever(question_ids, queries, n_docs=2)
    assert len(out["context_input_ids"]) == len(QUESTIONS) * 2
