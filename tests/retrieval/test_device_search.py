"""Search on the GPU, tested on the CPU: the PyTorch exact search against faiss, and the retriever's plumbing.

:class:`TorchExactSearch` is device-agnostic, so it runs here on CPU tensors. The retriever-level tests
stand in for a GPU with two monkeypatches: ``resolve_search_device`` answers ``cuda:0`` without checking
CUDA, and :class:`DeviceSearch` keeps its tensors on the CPU (``_CpuDeviceSearch``); faiss-gpu is faked
with a faiss-cpu clone of the index. The same paths on a real GPU: tests/gpu/test_gpu_search.py.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
from retrieval_helpers import DIM, make_indexed_dataset

from ragkit import RagRetriever, RagTokenForGeneration
from ragkit._accelerators import AcceleratorUnavailableError
from ragkit.retrieval import CustomHFIndex, Index
from ragkit.retrieval import device_search as ds
from ragkit.retrieval.device_search import DeviceSearch, TorchExactSearch
from ragkit.testing import assert_doc_dicts_equal

FAKE_CUDA = torch.device("cuda", 0)


def _random(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randn(rows, dim).astype("float32")


def _flat(kind, vectors: np.ndarray):
    index = kind(vectors.shape[1])
    index.add(vectors)
    return index


# --------------------------------------------------------------------------------------------------
# TorchExactSearch against faiss
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database():
    return _random(3000, 48, seed=0)


@pytest.fixture(scope="module")
def probes():
    return _random(53, 48, seed=1)


@pytest.mark.parametrize("kind", [faiss.IndexFlatIP, faiss.IndexFlatL2], ids=["ip", "l2"])
def test_exact_search_matches_faiss(kind, database, probes):
    index = _flat(kind, database)
    expected_distances, expected_ids = index.search(probes, 10)
    search = TorchExactSearch.from_faiss(index, "cpu")
    assert search.metric == ("ip" if kind is faiss.IndexFlatIP else "l2")
    distances, ids = search.search(torch.from_numpy(probes), 10)
    assert ids.dtype == torch.int64 and distances.dtype == torch.float32
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    np.testing.assert_allclose(distances.numpy(), expected_distances, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", [faiss.IndexFlatIP, faiss.IndexFlatL2], ids=["ip", "l2"])
@pytest.mark.parametrize(
    "max_block_bytes, query_chunk_size",
    [(4, 13), (4 * 7 * 5, 7), (4 * 53 * 3, 1000), (4 * 8 * 100, 8)],
    ids=["one-vector-blocks", "blocks-smaller-than-k", "three-vector-blocks", "mid"],
)
def test_chunking_gives_the_same_result(kind, max_block_bytes, query_chunk_size, database, probes):
    index = _flat(kind, database[:500])
    expected_distances, expected_ids = index.search(probes, 10)
    search = TorchExactSearch.from_faiss(
        index, "cpu", max_block_bytes=max_block_bytes, query_chunk_size=query_chunk_size
    )
    block_bytes = []
    search_chunk = search._search_chunk

    def recording(queries, k):
        block_bytes.append(4 * len(queries) * search._block_rows(len(queries)))
        return search_chunk(queries, k)

    search._search_chunk = recording
    distances, ids = search.search(torch.from_numpy(probes), 10)
    assert max(block_bytes) <= max_block_bytes
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    np.testing.assert_allclose(distances.numpy(), expected_distances, atol=1e-4, rtol=1e-5)


def test_factory_flat_and_id_maps(database, probes):
    # index_factory("Flat", METRIC_INNER_PRODUCT) is a bare IndexFlat; IndexIDMap labels come back as ids.
    flat = faiss.index_factory(48, "Flat", faiss.METRIC_INNER_PRODUCT)
    flat.add(database)
    _, expected = flat.search(probes, 5)
    np.testing.assert_array_equal(
        TorchExactSearch.from_faiss(flat, "cpu").search(torch.from_numpy(probes), 5)[1], expected
    )
    labels = np.arange(len(database), dtype=np.int64) * 3 + 100
    for wrapper in (faiss.IndexIDMap, faiss.IndexIDMap2):
        mapped = wrapper(faiss.IndexFlatL2(48))
        mapped.add_with_ids(database, labels)
        expected_distances, expected_ids = mapped.search(probes, 5)
        distances, ids = TorchExactSearch.from_faiss(mapped, "cpu").search(torch.from_numpy(probes), 5)
        np.testing.assert_array_equal(ids.numpy(), expected_ids)
        np.testing.assert_allclose(distances.numpy(), expected_distances, atol=1e-4, rtol=1e-5)


def test_every_vector_half_precision_queries_and_no_queries(database, probes):
    index = _flat(faiss.IndexFlatIP, database[:20])
    search = TorchExactSearch.from_faiss(index, "cpu")
    _, ids = search.search(torch.from_numpy(probes), 20)  # k == ntotal: a permutation of every row
    assert sorted(ids[0].tolist()) == list(range(20))
    half = torch.from_numpy(probes).to(torch.bfloat16)
    _, expected = index.search(half.float().numpy(), 3)
    np.testing.assert_array_equal(search.search(half, 3)[1].numpy(), expected)
    distances, ids = search.search(torch.zeros(0, 48), 3)
    assert distances.shape == ids.shape == (0, 3)


def test_exact_search_errors(database):
    index = _flat(faiss.IndexFlatIP, database[:16])
    search = TorchExactSearch.from_faiss(index, "cpu")
    with pytest.raises(
        ValueError, match="n_docs`=17 is larger than the number of passages in the index \\(16\\)"
    ):
        search.search(torch.zeros(1, 48), 17)
    with pytest.raises(ValueError, match=r"width 31 .* width 48"):
        search.search(torch.zeros(1, 31), 3)
    with pytest.raises(ValueError, match="not exact"):
        TorchExactSearch.from_faiss(faiss.IndexHNSWFlat(48, 8), "cpu")
    with pytest.raises(ValueError, match="metric"):
        TorchExactSearch(torch.zeros(4, 2), metric="cosine")


# --------------------------------------------------------------------------------------------------
# The retriever on a stand-in GPU
# --------------------------------------------------------------------------------------------------


class _CpuDeviceSearch(DeviceSearch):
    """DeviceSearch that keeps its tensors on the CPU whatever device it is given (small blocks)."""

    def __init__(self, index, device, **kwargs):
        super().__init__(index, torch.device("cpu"), max_block_bytes=4 * 4 * 5, query_chunk_size=3)
        self.device_asked = device


def _fake_resolve(device):
    """``resolve_search_device`` on a machine with one CUDA device."""
    return FAKE_CUDA if str(device).startswith("cuda") else torch.device("cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """``search_device="cuda"`` resolves to cuda:0 and is searched on the CPU (faiss without GPU support)."""
    monkeypatch.setattr(ds, "resolve_search_device", _fake_resolve)
    monkeypatch.setattr(ds, "DeviceSearch", _CpuDeviceSearch)
    monkeypatch.setattr(ds, "_faiss_gpu_count", lambda: 0)


@pytest.fixture
def fake_faiss_gpu(monkeypatch):
    """faiss "with GPU support": index_cpu_to_gpu clones the index on the CPU; nprobe settings are recorded."""
    settings = []

    class ParameterSpace:
        def set_index_parameter(self, index, name, value):
            settings.append((name, value))
            faiss.extract_index_ivf(index).nprobe = value

    monkeypatch.setattr(ds, "resolve_search_device", _fake_resolve)
    monkeypatch.setattr(ds, "_faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", ParameterSpace, raising=False)

    def index_cpu_to_gpu(resources, device, index):
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            raise RuntimeError("Error in ... : This index type is not implemented on GPU.")
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    return settings


def _retriever(config, embeddings, index=None):
    return RagRetriever(config, None, None, index=CustomHFIndex(DIM, make_indexed_dataset(embeddings, index)))


def test_retrieve_on_the_device_matches_faiss(fake_cuda, fresh_config, passage_embeddings, queries):
    cpu = _retriever(fresh_config, passage_embeddings)
    expected_embeds, expected_ids, expected_docs = cpu.retrieve(queries, 5)
    moved = _retriever(fresh_config, passage_embeddings)
    assert moved.to_search_device("cuda") is moved
    assert moved.search_device == FAKE_CUDA and moved.index._device_search.device_asked == FAKE_CUDA
    for questions in (queries, torch.from_numpy(queries), torch.from_numpy(queries).to(torch.bfloat16)):
        embeds, ids, docs = moved.retrieve(questions, 5)
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
        assert isinstance(embeds, np.ndarray) and embeds.dtype == np.float32
        if isinstance(questions, torch.Tensor) and questions.dtype == torch.bfloat16:
            _, ref_ids, _ = cpu.retrieve(questions, 5)
            np.testing.assert_array_equal(ids, ref_ids)
            continue
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(embeds, expected_embeds)
        assert_doc_dicts_equal(docs, expected_docs)
    moved.to_search_device("cpu")
    assert moved.search_device.type == "cpu" and moved.index._device_search is None


def test_tensors_reach_the_device_search_without_a_host_copy(
    fake_cuda, fresh_config, passage_embeddings, queries
):
    retriever = _retriever(fresh_config, passage_embeddings).to_search_device("cuda")
    retriever.batch_size = 2  # chunks of a tensor stay tensors
    seen = []
    original = DeviceSearch.search

    def search(self, question_hidden_states, k):
        seen.append(type(question_hidden_states))
        return original(self, question_hidden_states, k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ds.DeviceSearch, "search", search)
        retriever.retrieve(torch.from_numpy(queries), 3)
    assert seen == [torch.Tensor, torch.Tensor]


def test_n_docs_and_bad_vectors_on_the_device(fake_cuda, fresh_config, passage_embeddings):
    retriever = _retriever(fresh_config, passage_embeddings).to_search_device("cuda")
    with pytest.raises(
        ValueError, match="n_docs`=17 is larger than the number of passages in the index \\(16\\)"
    ):
        retriever.retrieve(torch.zeros(1, DIM), 17)
    with pytest.raises(ValueError, match="n_docs"):
        retriever.retrieve(np.zeros((1, DIM), dtype="float32"), 0)
    with pytest.raises(ValueError, match=r"width 31 .* width 32"):
        retriever.retrieve(torch.zeros(2, 31), 3)
    with pytest.raises(ValueError, match=r"\(batch_size, vector_size\)"):
        retriever.retrieve(torch.zeros(DIM), 3)


def test_from_pretrained_search_device_is_not_saved(
    fake_cuda, retriever_dir, saved_custom_index, tmp_path, queries
):
    passages_path, index_path = saved_custom_index
    kwargs = dict(index_name="custom", passages_path=str(passages_path), index_path=str(index_path))
    expected_embeds, expected_ids, _ = RagRetriever.from_pretrained(retriever_dir, **kwargs).retrieve(
        queries, 4
    )
    retriever = RagRetriever.from_pretrained(retriever_dir, search_device="cuda", **kwargs)
    assert retriever.search_device == FAKE_CUDA
    assert not hasattr(retriever.config, "search_device")
    embeds, ids, _ = retriever.retrieve(torch.from_numpy(queries), 4)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(embeds, expected_embeds)
    retriever.save_pretrained(tmp_path / "saved")
    assert "search_device" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert RagRetriever.from_pretrained(tmp_path / "saved").search_device.type == "cpu"
    # Asked before the index is loaded: the move happens in init_retrieval.
    deferred = RagRetriever.from_pretrained(
        retriever_dir, init_retrieval=False, search_device="cuda", **kwargs
    )
    assert deferred.search_device == FAKE_CUDA and deferred.index._device_search is None
    deferred.init_retrieval()
    assert deferred.index._device_search is not None
    np.testing.assert_array_equal(deferred.retrieve(queries, 4)[1], expected_ids)


def test_non_exact_index_without_faiss_gpu(
    fake_cuda, fresh_config, passage_embeddings, saved_custom_index, retriever_dir, tmp_path
):
    hnsw = _retriever(fresh_config, passage_embeddings, faiss.IndexHNSWFlat(DIM, 8))
    with pytest.raises(ValueError, match=r"IndexHNSWFlat index.*faiss-gpu.*IndexFlatIP.*search_device='cpu'"):
        hnsw.to_search_device("cuda")
    assert hnsw.search_device.type == "cpu"  # a refused move changes nothing
    hnsw.retrieve(np.zeros((1, DIM), dtype="float32"), 3)
    mapped = faiss.IndexIDMap(faiss.IndexHNSWFlat(DIM, 8))
    mapped.add_with_ids(passage_embeddings, np.arange(len(passage_embeddings), dtype=np.int64))
    with pytest.raises(ValueError, match=r"this IndexIDMap\(IndexHNSWFlat\) index"):
        DeviceSearch(mapped, torch.device("cpu"))
    # Asked before the index is loaded: the error comes when it loads.
    passages_path, _ = saved_custom_index
    index_path = tmp_path / "hnsw.faiss"
    index = faiss.IndexHNSWFlat(DIM, 8)
    index.add(passage_embeddings)
    faiss.write_index(index, str(index_path))
    lazy = RagRetriever.from_pretrained(
        retriever_dir,
        index_name="custom",
        passages_path=str(passages_path),
        index_path=str(index_path),
        init_retrieval=False,
        search_device="cuda",
    )
    with pytest.raises(ValueError, match="IndexHNSWFlat"):
        lazy.init_retrieval()


def test_faiss_gpu_path_keeps_nprobe(fake_faiss_gpu, fresh_config, passage_embeddings, queries):
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(passage_embeddings)
    fresh_config.index_nprobe = 3
    index = CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings, ivf), nprobe=3)
    cpu = RagRetriever(fresh_config, None, None, index=index)
    expected_embeds, expected_ids, _ = cpu.retrieve(queries, 3)
    retriever = cpu.to_search_device("cuda")
    assert retriever.index._device_search.backend == "faiss-gpu"
    assert fake_faiss_gpu == [("nprobe", 3)]
    embeds, ids, _ = retriever.retrieve(torch.from_numpy(queries), 3)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(embeds, expected_embeds)
    with pytest.raises(ValueError, match="n_docs`=17"):
        retriever.retrieve(queries, 17)
    hnsw = _retriever(fresh_config, passage_embeddings, faiss.IndexHNSWFlat(DIM, 8))
    with pytest.raises(
        ValueError, match=r"cannot copy this IndexHNSWFlat index to the GPU.*not implemented on GPU"
    ):
        hnsw.to_search_device("cuda")


def test_cuda_without_cuda(monkeypatch, fresh_config, passage_embeddings, retriever_dir, saved_custom_index):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    retriever = _retriever(fresh_config, passage_embeddings)
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(AcceleratorUnavailableError, match=r"needs a CUDA GPU.*search_device='cpu'"):
            retriever.to_search_device(device)
    assert retriever.search_device.type == "cpu"
    passages_path, index_path = saved_custom_index
    with pytest.raises(AcceleratorUnavailableError, match=r"torch\.cuda\.is_available\(\) is False"):
        RagRetriever.from_pretrained(
            retriever_dir,
            index_name="custom",
            passages_path=str(passages_path),
            index_path=str(index_path),
            search_device="cuda",
        )
    retriever.to_search_device("cpu")
    retriever.to_search_device(None)


@pytest.mark.parametrize("device", ["tpu", "mps", 3.5])
def test_unsupported_search_devices(fresh_config, passage_embeddings, device):
    with pytest.raises(ValueError, match="search_device="):
        _retriever(fresh_config, passage_embeddings).to_search_device(device)


def test_backends_that_search_on_the_cpu_only(fake_cuda):
    class HostOnly(Index):
        def init_index(self):
            pass

        def is_initialized(self):
            return True

        def get_top_docs(self, question_hidden_states, n_docs=5):
            raise NotImplementedError

        def get_doc_dicts(self, doc_ids):
            return []

    index = HostOnly()
    index.to_search_device("cpu")
    assert index.search_device.type == "cpu"
    with pytest.raises(ValueError, match="HostOnly searches with faiss on the CPU only"):
        index.to_search_device("cuda")


def test_model_passes_tensors_and_gets_the_same_documents(
    fake_cuda, fresh_config, passage_embeddings, question_encoder_tokenizer, generator_tokenizer
):
    def build(search_device):
        retriever = RagRetriever(
            fresh_config,
            question_encoder_tokenizer,
            generator_tokenizer,
            index=CustomHFIndex(DIM, make_indexed_dataset(passage_embeddings)),
        ).to_search_device(search_device)
        torch.manual_seed(0)
        return RagTokenForGeneration(config=fresh_config, retriever=retriever).eval()

    host, device = build("cpu"), build("cuda")
    device.load_state_dict(host.state_dict())
    received = []
    call = device.retriever.__class__.__call__

    def spy(self, question_input_ids, question_hidden_states, *args, **kwargs):
        received.append(type(question_hidden_states))
        return call(self, question_input_ids, question_hidden_states, *args, **kwargs)

    encoded = question_encoder_tokenizer(["where is paris?", "danube"], return_tensors="pt", padding=True)
    questions = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    decoder_input_ids = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        expected = host(**questions, decoder_input_ids=decoder_input_ids, output_retrieved=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RagRetriever, "__call__", spy)
            out = device(**questions, decoder_input_ids=decoder_input_ids, output_retrieved=True)
    assert received == [torch.Tensor]
    assert torch.equal(out.retrieved_doc_ids, expected.retrieved_doc_ids)
    torch.testing.assert_close(out.doc_scores, expected.doc_scores)
    torch.testing.assert_close(out.retrieved_doc_embeds, expected.retrieved_doc_embeds)
    generated = device.generate(input_ids=questions["input_ids"], num_beams=2, max_length=6)
    assert generated.shape[0] == 2
