"""Search on the GPU (``search_device="cuda"``) on a real GPU: the documents faiss finds on the CPU.

Skipped without a CUDA device; needs faiss and datasets (carried wheels, see docs/gpu.md). With the
faiss-cpu wheel the exact PyTorch search runs; with faiss-gpu the index is copied by
``faiss.index_cpu_to_gpu`` instead. Same paths on the CPU: tests/retrieval/test_device_search.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer
from ragkit.testing import write_tiny_rag_checkpoint, write_tiny_wiki_dpr_mirror

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 matmuls (no TF32), as the exact search needs to match faiss."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A tiny checkpoint over a miniature wiki_dpr mirror whose indexes are IndexFlatIP."""
    pytest.importorskip("faiss")
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("gpu_search_hub")
    mirror = write_tiny_wiki_dpr_mirror(root / "wiki_dpr")
    return write_tiny_rag_checkpoint(
        root / "token", RagTokenForGeneration, dataset=str(mirror), index_name="exact", use_dummy_dataset=True
    )


def test_retriever_on_cuda_returns_the_cpu_documents(tiny_hub):
    cpu = RagRetriever.from_pretrained(tiny_hub)
    gpu = RagRetriever.from_pretrained(tiny_hub, search_device=CUDA)
    assert gpu.search_device.type == CUDA
    print("backend:", gpu.index._device_search.backend)
    queries = torch.randn(6, cpu.config.retrieval_vector_size, generator=torch.Generator().manual_seed(0))
    expected_embeds, expected_ids, expected_docs = cpu.retrieve(queries.numpy(), 4)
    for questions in (queries, queries.to(CUDA)):
        embeds, ids, docs = gpu.retrieve(questions, 4)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(embeds, expected_embeds)
        assert docs == expected_docs
    half = queries.to(CUDA, torch.bfloat16)
    np.testing.assert_array_equal(gpu.retrieve(half, 4)[1], cpu.retrieve(half.cpu(), 4)[1])
    with pytest.raises(ValueError, match="larger than the number of passages"):
        gpu.retrieve(queries.to(CUDA), 1000)


@pytest.mark.parametrize("head", [RagTokenForGeneration, RagSequenceForGeneration])
def test_cuda_model_generates_with_search_on_cuda(tiny_hub, head):
    tokenizer = RagTokenizer.from_pretrained(tiny_hub)
    questions = tokenizer.question_encoder(
        ["How many people live in Paris?", "danube"], return_tensors="pt", padding=True
    )
    inputs = {"input_ids": questions["input_ids"], "attention_mask": questions["attention_mask"]}
    outputs = {}
    for search_device in ("cpu", CUDA):
        retriever = RagRetriever.from_pretrained(tiny_hub, search_device=search_device)
        model = head.from_pretrained(tiny_hub, retriever=retriever).to(CUDA).eval()
        with torch.no_grad():
            outputs[search_device] = model(
                **inputs, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long), output_retrieved=True
            )
        generated = model.generate(**inputs, num_beams=2, max_length=8)
        assert generated.device.type == CUDA and generated.shape[0] == 2
    assert torch.equal(outputs[CUDA].retrieved_doc_ids, outputs["cpu"].retrieved_doc_ids)
    torch.testing.assert_close(outputs[CUDA].doc_scores, outputs["cpu"].doc_scores)
    assert outputs[CUDA].doc_scores.device.type == CUDA


def test_large_exact_index_matches_faiss_cpu():
    faiss = pytest.importorskip("faiss")
    from ragkit.retrieval.device_search import DeviceSearch

    rows, dim, k = 200_000, 768, 10
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(rows, dim, generator=generator).numpy()
    queries = torch.randn(64, dim, generator=generator).numpy()
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    expected_scores, expected_ids = index.search(queries, k + 1)  # k + 1: room for a tie at the k-th place
    search = DeviceSearch(index, torch.device(CUDA))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    scores, ids = search.search(torch.from_numpy(queries).to(CUDA), k)
    extra = torch.cuda.max_memory_allocated() - before
    print(f"backend {search.backend}; search memory beyond the vectors: {extra / 2**20:.1f} MiB")
    assert extra < 300 * 2**20  # one score block (256 MiB at most) plus small top-k buffers
    np.testing.assert_allclose(scores, expected_scores[:, :k], atol=1e-3, rtol=1e-5)
    # Ids equal, except that documents with (numerically) equal scores may swap places.
    for row, position in zip(*np.nonzero(ids != expected_ids[:, :k])):
        assert ids[row, position] in expected_ids[row]
        assert abs(scores[row, position] - expected_scores[row, position]) < 1e-3
    assert (ids == expected_ids[:, :k]).mean() > 0.99


def _faiss_gpus() -> int:
    """GPUs faiss can use (0 without faiss, or with faiss-cpu)."""
    try:
        from ragkit.retrieval._devices import faiss_gpu_count

        return faiss_gpu_count()
    except ImportError:
        return 0


@pytest.mark.skipif(
    _faiss_gpus() == 0, reason="faiss-gpu not installed (faiss-cpu has no GPU support; docs/gpu.md)"
)
@pytest.mark.parametrize("kind", ["IndexFlatIP", "IVF64,Flat"])
def test_faiss_gpu_index_finds_what_faiss_cpu_finds(kind):
    import faiss

    from ragkit.retrieval.device_search import DeviceSearch

    rows, dim, k = 50_000, 128, 10
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(rows, dim, generator=generator).numpy()
    queries = torch.randn(64, dim, generator=generator).numpy()
    if kind == "IndexFlatIP":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        faiss.extract_index_ivf(index).nprobe = 8
    index.add(vectors)
    expected_scores, expected_ids = index.search(queries, k + 1)
    search = DeviceSearch(index, torch.device(CUDA))
    assert search.backend == "faiss-gpu"
    for questions in (queries, torch.from_numpy(queries).to(CUDA)):
        scores, ids = search.search(questions, k)
        np.testing.assert_allclose(scores, expected_scores[:, :k], atol=1e-3, rtol=1e-4)
        # The GPU copy keeps nprobe (else IVF would probe 1 list and find other documents).
        assert (ids == expected_ids[:, :k]).mean() > 0.99
