"""index_name="exact"/"compressed": wiki_dpr read from parquet shards and faiss files (a miniature mirror)."""

from __future__ import annotations

import itertools
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from retrieval_helpers import DIM

from ragkit import RagRetriever
from ragkit.retrieval import CanonicalHFIndex

N_PASSAGES = 24
N_DUMMY = 8


def _passages(n, seed):
    """id/text/title/embeddings columns as wiki_dpr's parquet files hold them."""
    embeddings = np.random.RandomState(seed).randn(n, DIM).astype("float32")
    return {
        "id": [str(i + 1) for i in range(n)],
        "text": [f"Passage number {i} says something about topic {i % 5}." for i in range(n)],
        "title": [f"Topic {i % 5}" for i in range(n)],
        "embeddings": embeddings,
    }


def _write_shards(directory, columns, n_shards):
    directory.mkdir(parents=True)
    bounds = np.linspace(0, len(columns["id"]), n_shards + 1).astype(int)
    for shard, (start, stop) in enumerate(itertools.pairwise(bounds)):
        table = pa.table(
            {
                "id": columns["id"][start:stop],
                "text": columns["text"][start:stop],
                "title": columns["title"][start:stop],
                "embeddings": pa.array(list(columns["embeddings"][start:stop]), pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, directory / f"train-{shard:05d}-of-{n_shards:05d}.parquet", row_group_size=4)


def _write_index(path, index, embeddings):
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    faiss.write_index(index, str(path))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local directory with wiki_dpr's Hub layout, at 24 passages of width 32."""
    root = tmp_path_factory.mktemp("wiki_dpr")
    nq, multiset = _passages(N_PASSAGES, 10), _passages(N_PASSAGES, 11)
    _write_shards(root / "data/psgs_w100/nq", nq, 2)
    _write_shards(root / "data/psgs_w100/multiset", multiset, 1)
    dummy = {k: v[:N_DUMMY] for k, v in nq.items()}
    _write_shards(root / "data/psgs_w100/dummy.nq", dummy, 1)
    _write_shards(root / "data/psgs_w100/dummy.multiset", {k: v[:N_DUMMY] for k, v in multiset.items()}, 1)
    (root / "index").mkdir()
    ip = faiss.METRIC_INNER_PRODUCT
    _write_index(
        root / "index/psgs_w100.nq.HNSW128_SQ8-IP-train.faiss",
        faiss.IndexHNSWFlat(DIM, 16, ip),
        nq["embeddings"],
    )
    _write_index(
        root / "index/psgs_w100.nq.IVF4096_HNSW128_PQ128-IP-train.faiss",
        faiss.index_factory(DIM, "IVF4,Flat", ip),
        np.tile(nq["embeddings"], (7, 1))[:N_PASSAGES],
    )
    _write_index(
        root / "index/psgs_w100.multiset.HNSW128_SQ8-IP-train.faiss",
        faiss.IndexHNSWFlat(DIM, 16, ip),
        multiset["embeddings"],
    )
    _write_index(
        root / "dummy.psgs_w100.nq.IndexHNSWFlat-IP-train.faiss", faiss.IndexFlatIP(DIM), dummy["embeddings"]
    )
    return root, {"nq": nq, "multiset": multiset}


def _check_against_raw_search(retriever, index_file, columns, queries, n_docs, nprobe=None):
    """Retriever results == raw faiss search on the same file + the parquet rows."""
    raw = faiss.read_index(str(index_file))
    if nprobe is not None:
        faiss.extract_index_ivf(raw).nprobe = nprobe
    _, expected_ids = raw.search(queries, n_docs)
    embeds, ids, docs = retriever.retrieve(queries, n_docs)
    np.testing.assert_array_equal(ids, expected_ids)
    valid = ids >= 0
    np.testing.assert_array_equal(embeds[valid], columns["embeddings"][ids[valid]])
    for row, doc in zip(ids, docs):
        assert doc["title"] == [columns["title"][i] if i >= 0 else "" for i in row]
        assert doc["text"] == [columns["text"][i] if i >= 0 else "" for i in row]
        assert doc["id"] == [columns["id"][i] if i >= 0 else "" for i in row]


def test_exact_index_from_local_mirror(mirror, retriever_dir, queries, question_ids, tmp_path):
    root, columns = mirror
    retriever = RagRetriever.from_pretrained(
        retriever_dir,
        index_name="exact",
        dataset=str(root),
        retrieval_vector_size=DIM,
        cache_dir=str(tmp_path),
    )
    assert retriever.index.passages.num_rows == N_PASSAGES
    _check_against_raw_search(
        retriever, root / "index/psgs_w100.nq.HNSW128_SQ8-IP-train.faiss", columns["nq"], queries, 5
    )
    out = retriever(question_ids, queries, return_tensors="pt")
    assert out["context_input_ids"].shape == (len(queries) * 3, retriever.config.max_combined_length)


@pytest.mark.parametrize("nprobe", [1, 4])
def test_compressed_index_nprobe(mirror, retriever_dir, queries, tmp_path, nprobe):
    root, columns = mirror
    retriever = RagRetriever.from_pretrained(
        retriever_dir,
        index_name="compressed",
        dataset=str(root),
        index_nprobe=nprobe,
        cache_dir=str(tmp_path),
    )
    assert faiss.extract_index_ivf(retriever.index.faiss_index).nprobe == nprobe
    _check_against_raw_search(
        retriever,
        root / "index/psgs_w100.nq.IVF4096_HNSW128_PQ128-IP-train.faiss",
        columns["nq"],
        queries,
        5,
        nprobe=nprobe,
    )


def test_multiset_embeddings(mirror, retriever_dir, queries, tmp_path):
    root, columns = mirror
    index_file = root / "index/psgs_w100.multiset.HNSW128_SQ8-IP-train.faiss"
    retriever = RagRetriever.from_pretrained(
        retriever_dir,
        index_name="exact",
        dataset=str(root),
        embeddings_name="multiset",
        cache_dir=str(tmp_path),
    )
    _check_against_raw_search(retriever, index_file, columns["multiset"], queries, 3)
    by_name = CanonicalHFIndex(DIM, str(root), index_name="psgs_w100.multiset.exact", cache_dir=tmp_path)
    by_name.init_index()
    np.testing.assert_array_equal(by_name.get_top_docs(queries, 3)[0], retriever.retrieve(queries, 3)[1])


@pytest.mark.parametrize("embeddings_name", ["nq", "multiset"])
def test_dummy_variant(mirror, queries, tmp_path, embeddings_name):
    root, columns = mirror
    dummy = {k: v[:N_DUMMY] for k, v in columns[embeddings_name].items()}
    index = CanonicalHFIndex(
        DIM,
        str(root),
        index_name="exact",
        use_dummy_dataset=True,
        embeddings_name=embeddings_name,
        cache_dir=tmp_path,
    )
    index.init_index()
    assert index.passages.num_rows == N_DUMMY
    # nq has a dummy index file; multiset has none, so an exact one is built from the embeddings.
    expected = np.argsort(-(queries @ dummy["embeddings"].T), axis=1)[:, :3]
    ids, embeds = index.get_top_docs(queries, 3)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(embeds, dummy["embeddings"][ids])


def test_dummy_compressed_falls_back_to_the_dummy_exact_index(mirror, tmp_path, caplog):
    root, _ = mirror
    index = CanonicalHFIndex(
        DIM, str(root), index_name="compressed", use_dummy_dataset=True, cache_dir=tmp_path
    )
    with caplog.at_level("WARNING"):
        index.init_index()
    assert "no compressed dummy index" in caplog.text
    assert isinstance(index.faiss_index, faiss.IndexFlatIP) and index.faiss_index.ntotal == N_DUMMY


def test_hub_layout_is_requested_from_the_hub(mirror, queries, tmp_path, monkeypatch):
    # Serve the Hub calls from the mirror and check what ragkit asks huggingface_hub for.
    import huggingface_hub

    root, _ = mirror
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, repo_type, tuple(allow_patterns)))
        return str(root)

    def fake_hf_hub_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append(("file", repo_id, repo_type, filename))
        path = root / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    index = CanonicalHFIndex(DIM, "wiki_dpr", index_name="compressed", index_path=None, cache_dir=tmp_path)
    index.init_index()
    dummy = CanonicalHFIndex(DIM, "wiki_dpr", index_name="exact", use_dummy_dataset=True, cache_dir=tmp_path)
    dummy.init_index()
    assert calls[0] == ("snapshot", "facebook/wiki_dpr", "dataset", ("data/psgs_w100/nq/train-*.parquet",))
    assert calls[1] == (
        "file",
        "facebook/wiki_dpr",
        "dataset",
        "index/psgs_w100.nq.IVF4096_HNSW128_PQ128-IP-train.faiss",
    )
    assert calls[2] == (
        "snapshot",
        "facebook/wiki_dpr",
        "dataset",
        ("data/psgs_w100/dummy.nq/train-*.parquet",),
    )
    assert (
        "file",
        "huggingface/wiki_dpr",
        "dataset",
        "dummy.psgs_w100.nq.IndexHNSWFlat-IP-train.faiss",
    ) in calls
    assert dummy.get_top_docs(queries, 2)[0].shape == (len(queries), 2)


def test_offline_and_not_cached_says_how_to_fix(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as info:
        CanonicalHFIndex(DIM, "wiki_dpr", index_name="exact", cache_dir=tmp_path)
    assert "facebook/wiki_dpr" in str(info.value) and "local directory" in str(info.value)


def test_bad_mirrors(mirror, tmp_path):
    root, _ = mirror
    with pytest.raises(FileNotFoundError, match="parquet"):
        CanonicalHFIndex(DIM, str(tmp_path), index_name="exact")
    with pytest.raises(ValueError, match="Unknown wiki_dpr `index_name`"):
        CanonicalHFIndex(DIM, str(root), index_name="fancy")
    with pytest.raises(ValueError, match="embeddings"):
        CanonicalHFIndex(DIM, str(root), index_name="exact", embeddings_name="trivia")
    # The dummy passages (8) do not go with the full index (24 vectors).
    index = CanonicalHFIndex(
        DIM,
        str(root),
        index_name="exact",
        use_dummy_dataset=True,
        index_path=str(root / "index/psgs_w100.nq.HNSW128_SQ8-IP-train.faiss"),
        cache_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="do not belong together"):
        index.init_index()
    with pytest.raises(ValueError, match="retrieval_vector_size"):
        CanonicalHFIndex(DIM * 2, str(root), index_name="exact", cache_dir=tmp_path)
