"""index_name="custom": parity with transformers' RagRetriever, loading from disk, save/load round trips."""

from __future__ import annotations

import copy
import logging
import shutil

import faiss
import numpy as np
import pytest
import torch
import transformers
from retrieval_helpers import DIM, make_indexed_dataset
from transformers.models.rag.retrieval_rag import CustomHFIndex as RefCustomHFIndex

from ragkit import RagRetriever
from ragkit.retrieval import MISSING_DOC_ID, CustomHFIndex
from ragkit.testing import assert_doc_dicts_equal


def _reference(config, question_encoder_tokenizer, generator_tokenizer, embeddings, index=None):
    """transformers' RagRetriever over a fresh copy of the same passages and index."""
    ref_config = transformers.RagConfig(**config.to_dict())
    ref_index = RefCustomHFIndex(DIM, make_indexed_dataset(embeddings, index))
    return transformers.RagRetriever(
        ref_config, question_encoder_tokenizer, generator_tokenizer, index=ref_index
    )


@pytest.fixture
def pair(fresh_config, question_encoder_tokenizer, generator_tokenizer, passage_embeddings):
    """(ours, reference) retrievers over identical passages and exact indexes."""
    ours = RagRetriever(
        fresh_config,
        question_encoder_tokenizer,
        generator_tokenizer,
        index=CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings)),
    )
    ref = _reference(fresh_config, question_encoder_tokenizer, generator_tokenizer, passage_embeddings)
    return ours, ref


@pytest.mark.parametrize("n_docs", [None, 1, 5])
def test_call_matches_reference(pair, question_ids, queries, n_docs):
    # Exact equality: same ids, same float32 embeddings, same context token ids.
    ours, ref = pair
    out = ours(question_ids, queries, n_docs=n_docs, return_tensors="pt")
    expected = ref(question_ids, queries, n_docs=n_docs, return_tensors="pt")
    assert set(out.keys()) == set(expected.keys())
    for key in expected:
        assert out[key].dtype == expected[key].dtype, key
        assert torch.equal(out[key], expected[key]), key
    assert out["doc_ids"].shape == (len(queries), n_docs or ours.n_docs)


def test_call_matches_reference_with_prefix_and_lists(pair, question_ids, queries):
    ours, ref = pair
    out = ours(question_ids.tolist(), queries, prefix="answer: ")
    expected = ref(question_ids.tolist(), queries, prefix="answer: ")
    assert out["context_input_ids"] == expected["context_input_ids"]
    assert out["context_attention_mask"] == expected["context_attention_mask"]
    np.testing.assert_array_equal(out["doc_ids"], expected["doc_ids"])


def test_retrieve_matches_reference_and_strips_quotes(pair, queries, generator_tokenizer):
    ours, ref = pair
    embeds, ids, docs = ours.retrieve(queries, 4)
    ref_embeds, ref_ids, ref_docs = ref.retrieve(queries, 4)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(embeds, ref_embeds)
    assert embeds.dtype == np.float32 and ids.dtype == np.int64
    assert [d["title"] for d in docs] == [list(d["title"]) for d in ref_docs]
    assert [d["text"] for d in docs] == [list(d["text"]) for d in ref_docs]
    # The quoted title (row 15) loses one pair of quotes in the context, as in the reference.
    query = ours.index.passages.embeddings(np.array([15]))
    _, _, quoted = ours.retrieve(query, 1)
    context_ids, _ = ours.postprocess_docs(quoted, ["q"], None, 1)
    assert generator_tokenizer.decode(context_ids[0], skip_special_tokens=True).startswith("Quoted Title / ")


def test_retrieval_batch_size_chunks_give_same_results(pair, queries):
    ours, _ = pair
    embeds, ids, _ = ours.retrieve(queries, 3)
    ours.batch_size = 1
    embeds_1, ids_1, _ = ours.retrieve(queries, 3)
    np.testing.assert_array_equal(ids, ids_1)
    np.testing.assert_array_equal(embeds, embeds_1)


def test_torch_half_and_double_questions(pair, question_ids, queries):
    ours, ref = pair
    expected_ids = ref.retrieve(queries, 3)[1]
    _, ids_double, _ = ours.retrieve(torch.from_numpy(queries).double(), 3)
    np.testing.assert_array_equal(ids_double, expected_ids)
    half = torch.from_numpy(queries).half()
    out = ours(torch.from_numpy(question_ids), half, return_tensors="pt")
    ref_out = ref(question_ids, half.float().numpy(), return_tensors="pt")
    assert torch.equal(out["doc_ids"], ref_out["doc_ids"])
    assert out["retrieved_doc_embeds"].dtype == torch.float32
    # bfloat16 has no numpy dtype: the retriever converts through torch.
    bf16 = torch.from_numpy(queries).bfloat16()
    _, ids_bf16, _ = ours.retrieve(bf16, 3)
    np.testing.assert_array_equal(ids_bf16, ref.retrieve(bf16.float().numpy(), 3)[1])


def test_single_question_ids_as_flat_list(pair, question_ids, queries):
    ours, ref = pair
    flat_ids = question_ids[0].tolist()
    out = ours(flat_ids, queries[:1], return_tensors="np")
    expected = ref(question_ids[:1], queries[:1], return_tensors="np")
    np.testing.assert_array_equal(out["context_input_ids"], expected["context_input_ids"])


def test_tokenized_docs_match_reference(pair, question_ids, queries, question_encoder_tokenizer):
    ours, ref = pair
    ours.set_ctx_encoder_tokenizer(question_encoder_tokenizer)
    ref.set_ctx_encoder_tokenizer(question_encoder_tokenizer)
    out = ours(question_ids, queries, return_tensors="pt")
    expected = ref(question_ids, queries, return_tensors="pt")
    for key in ("tokenized_doc_ids", "tokenized_doc_attention_mask", "context_input_ids"):
        assert torch.equal(out[key], expected[key]), key
    assert ours.return_tokenized_docs and ours.ctx_encoder_tokenizer is question_encoder_tokenizer


def test_dataset_not_mutated_and_selected_rows_respected(passage_embeddings, queries):
    dataset = make_indexed_dataset(passage_embeddings)
    index = CustomHFIndex(DIM, dataset)
    assert dataset.format["type"] is None  # unlike the reference, the caller's format is left alone
    # A dataset view (select) is read through its indices mapping.
    reordered = make_indexed_dataset(passage_embeddings)
    reordered.drop_index("embeddings")
    reordered = reordered.select(list(range(15, -1, -1)))
    reordered.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(DIM))
    ids, embeds = CustomHFIndex(DIM, reordered).get_top_docs(queries, 2)
    expected_ids, expected_embeds = index.get_top_docs(queries, 2)
    np.testing.assert_array_equal(ids, 15 - expected_ids)
    np.testing.assert_array_equal(embeds, expected_embeds)
    docs = CustomHFIndex(DIM, reordered).get_doc_dicts(ids)
    assert_doc_dicts_equal(docs, index.get_doc_dicts(expected_ids))


def test_from_pretrained_with_indexed_dataset(retriever_dir, passage_embeddings, queries, question_ids):
    retriever = RagRetriever.from_pretrained(
        retriever_dir, indexed_dataset=make_indexed_dataset(passage_embeddings), n_docs=2
    )
    assert retriever.config.index_name == "custom" and retriever.n_docs == 2
    ref = transformers.RagRetriever.from_pretrained(
        str(retriever_dir), indexed_dataset=make_indexed_dataset(passage_embeddings), n_docs=2
    )
    out, expected = retriever(question_ids, queries), ref(question_ids, queries)
    assert out["context_input_ids"] == expected["context_input_ids"]


def test_from_pretrained_from_disk_matches_reference(
    retriever_dir, saved_custom_index, queries, question_ids
):
    passages_path, index_path = saved_custom_index
    kwargs = dict(index_name="custom", passages_path=str(passages_path), index_path=str(index_path))
    ours = RagRetriever.from_pretrained(retriever_dir, **kwargs)
    ref = transformers.RagRetriever.from_pretrained(str(retriever_dir), **kwargs)
    out = ours(question_ids, queries, return_tensors="pt")
    expected = ref(question_ids, queries, return_tensors="pt")
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


def test_save_pretrained_round_trip_and_move(pair, tmp_path, queries, question_ids):
    ours, _ = pair
    expected = ours(question_ids, queries, return_tensors="np")
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "hf_dataset_index.faiss").is_file()
    assert (tmp_path / "saved" / "hf_dataset" / "dataset_info.json").is_file()
    assert ours.index.dataset.list_indexes() == ["embeddings"]  # index re-attached after the save
    for directory in (tmp_path / "saved", tmp_path / "moved"):
        if directory.name == "moved":
            shutil.move(tmp_path / "saved", directory)
        loaded = RagRetriever.from_pretrained(directory)
        out = loaded(question_ids, queries, return_tensors="np")
        for key in expected:
            np.testing.assert_array_equal(out[key], expected[key])
    # The reference loads what we saved (before the move its absolute paths are valid).
    ours.config.index_path = ours.config.passages_path = None
    ours.save_pretrained(tmp_path / "again")
    ref = transformers.RagRetriever.from_pretrained(str(tmp_path / "again"))
    np.testing.assert_array_equal(
        ref(question_ids, queries, return_tensors="np")["doc_ids"], expected["doc_ids"]
    )


def test_nprobe_and_ef_search_reach_the_index(fresh_config, passage_embeddings, saved_custom_index, tmp_path):
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(passage_embeddings)
    ivf.add(passage_embeddings)
    faiss.write_index(ivf, str(tmp_path / "ivf.faiss"))
    passages_path, _ = saved_custom_index
    config = copy.deepcopy(fresh_config)
    config.passages_path, config.index_path, config.index_nprobe = (
        str(passages_path),
        str(tmp_path / "ivf.faiss"),
        3,
    )
    retriever = RagRetriever(config, None, None)
    assert faiss.extract_index_ivf(retriever.index.faiss_index).nprobe == 3
    hnsw = faiss.IndexHNSWFlat(DIM, 8, faiss.METRIC_INNER_PRODUCT)  # add_faiss_index fills it
    index = CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings, hnsw), ef_search=77)
    assert faiss.downcast_index(index.faiss_index).hnsw.efSearch == 77


def test_missing_hits_are_padded_not_repeated(passage_embeddings, queries, caplog, fresh_config):
    # An IVF index probing 1 of 8 lists cannot fill 10 slots: faiss returns -1 there.
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.tile(passage_embeddings, (4, 1)))
    ivf.nprobe = 1  # add_faiss_index adds the vectors
    retriever = RagRetriever(
        fresh_config, None, None, index=CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings, ivf))
    )
    with caplog.at_level(logging.WARNING):
        embeds, ids, docs = retriever.retrieve(queries, 10)
    missing = ids == MISSING_DOC_ID
    assert missing.any() and "index_nprobe" in caplog.text
    assert np.all(embeds[missing] == 0)
    for row, doc in zip(ids, docs):
        found = row[row >= 0]
        assert len(set(found.tolist())) == len(found)  # no passage repeated
        assert [t for t, i in zip(doc["title"], row) if i < 0] == [""] * int((row < 0).sum())
        np.testing.assert_array_equal(row >= 0, np.asarray(doc["text"], dtype=object) != "")


def test_passage_table_gathers_across_chunks(passage_embeddings):
    # Memory-mapped datasets come in many record batches; gathers must cross them in any order.
    import pyarrow as pa

    from ragkit.retrieval.base import PassageTable
    from ragkit.testing import TINY_PASSAGES

    table = pa.table(
        {
            "title": [t for t, _ in TINY_PASSAGES],
            "text": [x for _, x in TINY_PASSAGES],
            "embeddings": pa.array(list(passage_embeddings), pa.list_(pa.float32())),
        }
    )
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=3))
    passages = PassageTable(chunked)
    assert len(passages._text_batches) == 6 and len(passages._embedding_chunks) == 6
    ids = np.array([[15, 0, 7], [3, -1, 3], [-1, -1, -1]])
    docs = passages.doc_dicts(ids)
    for row, doc in zip(ids, docs):
        assert doc["title"] == [TINY_PASSAGES[i][0] if i >= 0 else "" for i in row]
        assert doc["text"] == [TINY_PASSAGES[i][1] if i >= 0 else "" for i in row]
    flat = np.array([14, 2, 9, 2, 0])
    np.testing.assert_array_equal(passages.embeddings(flat), passage_embeddings[flat])
    with pytest.raises(IndexError, match="do not belong together"):
        passages.doc_dicts(np.array([[16]]))
