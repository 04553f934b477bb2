"""Shards and the exact top-k merge, without Ray: the merged answers are the single index's answers."""

from __future__ import annotations

import numpy as np
import pytest

from ragkit.distributed.sharding import PassageShard, merge_shard_results, shard_bounds
from ragkit.testing import assert_doc_dicts_equal


@pytest.fixture(scope="module")
def collection():
    """2,000 passages of width 16 with exact duplicates (ties), and the single-process exact index over them."""
    import faiss
    from datasets import Dataset

    from ragkit.retrieval.custom import CustomHFIndex

    rng = np.random.RandomState(3)
    vectors = rng.randn(2000, 16).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # The same vector in several shards: ties must be broken exactly as one faiss index breaks them.
    for row in (11, 499, 500, 1333, 1999):
        vectors[row] = vectors[7]
    dataset = Dataset.from_dict(
        {
            "title": [f"title {i}" for i in range(len(vectors))],
            "text": [f"text {i}" for i in range(len(vectors))],
            "embeddings": list(vectors),
        }
    )
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(16))
    return dataset, vectors, CustomHFIndex(16, dataset)


def test_shard_bounds_cover_the_collection_in_order():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="at most 2 shards"):
        shard_bounds(2, 3)


@pytest.mark.parametrize("num_shards", [2, 3, 7])
@pytest.mark.parametrize("batch", [4, 25])  # faiss switches to its BLAS path at 20 queries
def test_merged_shards_equal_one_exact_index(collection, num_shards, batch):
    dataset, vectors, single = collection
    queries = np.random.RandomState(batch).randn(batch, 16).astype("float32")
    queries[0] = vectors[7] * 2.0  # its best hits are the five tied duplicates
    n_docs = 4  # fewer slots than the six tied duplicates: which ties are kept matters too
    expected_ids, expected_embeds = single.get_top_docs(queries, n_docs)
    expected_docs = single.get_doc_dicts(expected_ids)

    shards = [PassageShard(dataset, start, stop) for start, stop in shard_bounds(len(dataset), num_shards)]
    merged = merge_shard_results([shard.search(queries, n_docs) for shard in shards], n_docs)

    assert sorted(expected_ids[0]) == [7, 11, 499, 500]  # the tie case is really exercised
    np.testing.assert_array_equal(merged.doc_ids, expected_ids)
    np.testing.assert_array_equal(merged.doc_embeds, expected_embeds)
    assert_doc_dicts_equal(merged.doc_dicts, expected_docs)
    assert np.all(np.diff(merged.scores, axis=1) <= 0)


def test_small_shard_pads_and_too_many_docs_is_refused(collection):
    dataset, _, _ = collection
    queries = np.ones((2, 16), dtype="float32")
    tiny = PassageShard(dataset, 0, 3).search(queries, 5)
    np.testing.assert_array_equal(tiny.doc_ids[:, 3:], -1)
    assert np.isneginf(tiny.scores[:, 3:]).all()
    with pytest.raises(ValueError, match="larger than the number of passages"):
        merge_shard_results([tiny, PassageShard(dataset, 3, 5).search(queries, 5)], 6)


def test_replica_recipes_and_prebuilt_shard_files_answer_like_the_retriever(
    disk_config, single_process_retriever, saved_passages, tmp_path
):
    """What actors build: the config's own index (replicated), a shard read from its own faiss file."""
    import faiss

    from ragkit.distributed.ray_retriever import _ConfigIndexRecipe
    from ragkit.distributed.sharding import ReplicaSpec, ShardSpec

    queries = np.random.RandomState(5).randn(3, 32).astype("float32")
    embeds, ids, docs = single_process_retriever.retrieve(queries, 3)

    replica = ReplicaSpec(_ConfigIndexRecipe(disk_config)).build().search(queries, 3)
    np.testing.assert_array_equal(replica.doc_ids, ids)
    assert replica.scores is None
    assert_doc_dicts_equal(replica.doc_dicts, docs)

    passages_path, _ = saved_passages
    shards = []
    for number, (start, stop) in enumerate(shard_bounds(16, 2)):
        built = PassageShard(passages_path, start, stop)
        faiss.write_index(built.index, str(tmp_path / f"shard{number}.faiss"))
        spec = ShardSpec(str(passages_path), start, stop, index_path=str(tmp_path / f"shard{number}.faiss"))
        shards.append(spec.build())
    merged = merge_shard_results([shard.search(queries, 3) for shard in shards], 3)
    np.testing.assert_array_equal(merged.doc_ids, ids)
    np.testing.assert_array_equal(merged.doc_embeds, embeds)
    with pytest.raises(ValueError, match="holds 8 vectors but the shard has 16"):
        ShardSpec(str(passages_path), 0, 16, index_path=str(tmp_path / "shard0.faiss")).build()
