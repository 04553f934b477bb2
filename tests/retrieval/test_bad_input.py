"""Every bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest
import torch
from retrieval_helpers import DIM, make_indexed_dataset

from ragkit import RagRetriever
from ragkit.retrieval import CustomHFIndex
from ragkit.retrieval.building import passages_dataset


def _from_custom_files(retriever_dir, passages_path, index_path):
    """``RagRetriever.from_pretrained`` with ``index_name="custom"`` over the given files."""
    return RagRetriever.from_pretrained(
        retriever_dir, index_name="custom", passages_path=str(passages_path), index_path=str(index_path)
    )


def _write_flat_index(path, vectors):
    """Write an exact inner-product faiss index over ``vectors`` to ``path``."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(path))


@pytest.fixture
def retriever(fresh_config, passage_embeddings):
    return RagRetriever(
        fresh_config, None, None, index=CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings))
    )


def test_dataset_missing_a_column(passage_embeddings, retriever_dir):
    dataset = make_indexed_dataset(passage_embeddings)
    dataset.drop_index("embeddings")
    dataset = dataset.remove_columns("title")
    with pytest.raises(ValueError, match=r"\['title'\] missing"):
        CustomHFIndex(DIM, dataset)
    with pytest.raises(ValueError, match="'title'"):
        RagRetriever.from_pretrained(retriever_dir, indexed_dataset=dataset)
    with pytest.raises(TypeError, match=r"datasets\.Dataset"):
        CustomHFIndex(DIM, {"title": [], "text": [], "embeddings": []})


def test_dataset_without_faiss_index(passage_embeddings):
    dataset = make_indexed_dataset(passage_embeddings)
    dataset.drop_index("embeddings")
    with pytest.raises(ValueError, match="add_faiss_index"):
        CustomHFIndex(DIM, dataset)


def test_dimension_mismatches(passage_embeddings, retriever_dir, saved_custom_index, tmp_path):
    with pytest.raises(ValueError, match="retrieval_vector_size"):
        CustomHFIndex(DIM + 8, make_indexed_dataset(passage_embeddings))  # embeddings are 32 wide
    passages_path, _ = saved_custom_index
    _write_flat_index(tmp_path / "narrow.faiss", passage_embeddings[:, : DIM // 2].copy())
    with pytest.raises(ValueError, match="dimension 16 but `retrieval_vector_size` is 32"):
        _from_custom_files(retriever_dir, passages_path, tmp_path / "narrow.faiss")


def test_question_vectors_of_the_wrong_shape(retriever, question_ids):
    with pytest.raises(ValueError, match=r"width 31 .* width 32"):
        retriever.retrieve(np.zeros((2, 31), dtype="float32"), 3)
    with pytest.raises(ValueError, match=r"\(batch_size, vector_size\)"):
        retriever.retrieve(np.zeros(DIM, dtype="float32"), 3)
    with pytest.raises(ValueError, match="retrieval_vector_size"):
        retriever(question_ids[:1], torch.zeros(1, 64), return_tensors="pt")
    # One vector without its batch axis, or an extra axis: the shape is named, not a row-count mismatch.
    for vectors in (torch.zeros(DIM), torch.zeros(1, len(question_ids), DIM)):
        with pytest.raises(ValueError, match=r"must have shape \(batch_size, vector_size\), got"):
            retriever(question_ids, vectors)


def test_n_docs_larger_than_the_index(retriever):
    with pytest.raises(
        ValueError, match="n_docs`=17 is larger than the number of passages in the index \\(16\\)"
    ):
        retriever.retrieve(np.zeros((1, DIM), dtype="float32"), 17)
    with pytest.raises(ValueError, match="n_docs"):
        retriever.retrieve(np.zeros((1, DIM), dtype="float32"), 0)


def test_missing_and_corrupt_files(retriever_dir, saved_custom_index, tmp_path):
    passages_path, index_path = saved_custom_index
    with pytest.raises(FileNotFoundError, match="`index_path`"):
        _from_custom_files(retriever_dir, passages_path, tmp_path / "no")
    with pytest.raises(FileNotFoundError, match="`passages_path`"):
        _from_custom_files(retriever_dir, tmp_path / "no", index_path)
    with pytest.raises(ValueError, match=r"passages_path.*index_path"):
        RagRetriever.from_pretrained(retriever_dir, index_name="custom")
    corrupt = tmp_path / "corrupt.faiss"
    corrupt.write_bytes(index_path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated, corrupt or not a faiss index"):
        _from_custom_files(retriever_dir, passages_path, corrupt)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        _from_custom_files(retriever_dir, tmp_path / "empty_dir", index_path)


def test_the_index_directory_given_for_a_path_names_the_file_in_it(retriever_dir, saved_custom_index):
    # `ragkit build-index out` writes out/passages and out/index.faiss; passing `out` is a common slip.
    passages_path, index_path = saved_custom_index
    with pytest.raises(
        FileNotFoundError, match=rf"is a directory.*give index_path='{re.escape(str(index_path))}'"
    ):
        _from_custom_files(retriever_dir, passages_path, index_path.parent)
    with pytest.raises(FileNotFoundError, match=rf"give passages_path='{re.escape(str(passages_path))}'"):
        _from_custom_files(retriever_dir, passages_path.parent, index_path)


def test_index_of_other_passages(retriever_dir, saved_custom_index, tmp_path, passage_embeddings):
    passages_path, _ = saved_custom_index
    _write_flat_index(tmp_path / "other.faiss", passage_embeddings[:5])
    with pytest.raises(ValueError, match="holds 5 vectors but the dataset has 16 passages"):
        _from_custom_files(retriever_dir, passages_path, tmp_path / "other.faiss")


def test_index_numbering_its_vectors_with_other_ids(
    retriever_dir, saved_custom_index, tmp_path, passage_embeddings
):
    # Same size as the passages, so it loads; its ids (1000...) are not row numbers: named at the search.
    passages_path, _ = saved_custom_index
    index = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    index.add_with_ids(passage_embeddings, np.arange(len(passage_embeddings)) + 1000)
    faiss.write_index(index, str(tmp_path / "idmap.faiss"))
    retriever = _from_custom_files(retriever_dir, passages_path, tmp_path / "idmap.faiss")
    with pytest.raises(ValueError, match=r"returned doc id 10\d\d but the dataset has 16 passages"):
        retriever.retrieve(passage_embeddings[:2], 2)


def test_unknown_index_name(retriever_dir, fresh_config):
    with pytest.raises(ValueError, match="index_name"):
        RagRetriever.from_pretrained(retriever_dir, index_name="bogus")
    fresh_config.index_name = "bogus"  # bypasses the config's own check
    with pytest.raises(ValueError, match="'legacy' for DPR's files or 'custom'"):
        RagRetriever(fresh_config, None, None)


def test_search_before_init(fresh_config, saved_custom_index):
    passages_path, index_path = saved_custom_index
    fresh_config.passages_path, fresh_config.index_path = str(passages_path), str(index_path)
    retriever = RagRetriever(fresh_config, None, None, init_retrieval=False)
    with pytest.raises(RuntimeError, match="init_retrieval"):
        retriever.retrieve(np.zeros((1, DIM), dtype="float32"), 2)
    retriever.init_retrieval()
    assert retriever.retrieve(np.zeros((1, DIM), dtype="float32"), 2)[1].shape == (1, 2)


def test_numpy_integer_n_docs_is_searched_like_an_int(retriever):
    queries = np.random.RandomState(2).randn(3, DIM).astype("float32")
    expected = retriever.retrieve(queries, 2)[1]
    np.testing.assert_array_equal(retriever.retrieve(queries, np.int64(2))[1], expected)


def test_an_empty_batch_of_questions(retriever, question_ids):
    embeds, doc_ids, doc_dicts = retriever.retrieve(np.zeros((0, DIM), dtype="float32"), 2)
    assert embeds.shape == (0, 2, DIM) and embeds.dtype == np.float32
    assert doc_ids.shape == (0, 2) and doc_dicts == []
    assert retriever.retrieve(torch.zeros(0, DIM), 2)[1].shape == (0, 2)
    with pytest.raises(ValueError, match=r"`question_input_ids` holds no question \(batch size 0\)"):
        retriever(question_ids[:0], np.zeros((0, DIM), dtype="float32"), return_tensors="pt")


def test_passages_without_any_row_are_refused(passage_embeddings):
    written = passages_dataset([], [], np.zeros((0, DIM), dtype="float32"))
    selected = make_indexed_dataset(passage_embeddings)
    selected.drop_index("embeddings")
    selected = selected.select([])  # filtered down to nothing
    for empty in (written, selected):
        empty.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(DIM))
        with pytest.raises(ValueError, match="holds no passages"):
            CustomHFIndex(DIM, empty)
