"""The API reference's usage examples, run as written with only the Hub names swapped for local paths.

Local stand-ins: ``facebook/rag-sequence-nq`` / ``rag-token-nq`` / ``rag-token-base`` are tiny
random-weight checkpoints in the same layout, whose config points ``dataset`` at a miniature wiki_dpr
mirror (``ragkit.testing.write_tiny_wiki_dpr_mirror``). Where an example needs CUDA
(flash-attention, bitsandbytes), the test checks that ragkit says clearly what is missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from ragkit import (
    RagModel,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
    RetrievAugLMMarginOutput,
    RetrievAugLMOutput,
)
from ragkit.testing import write_tiny_rag_checkpoint, write_tiny_wiki_dpr_mirror


def _cuda_with(package: str) -> bool:
    """Whether this machine can really run the CUDA path that needs ``package`` (then the error tests skip)."""
    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local paths standing in for the Hub repos the examples name."""
    root = tmp_path_factory.mktemp("hub")
    mirror = write_tiny_wiki_dpr_mirror(root / "wiki_dpr")
    fields = dict(dataset=str(mirror), index_name="compressed")
    return {
        "facebook/rag-sequence-nq": str(
            write_tiny_rag_checkpoint(root / "rag-sequence-nq", RagSequenceForGeneration, seed=1, **fields)
        ),
        "facebook/rag-token-nq": str(
            write_tiny_rag_checkpoint(root / "rag-token-nq", RagTokenForGeneration, seed=2, **fields)
        ),
        "facebook/rag-token-base": str(
            write_tiny_rag_checkpoint(root / "rag-token-base", RagModel, seed=3, **fields)
        ),
        "wiki_dpr": str(mirror),
    }


def test_first_example_prepare_seq2seq_batch_and_generate(hub):
    tokenizer = RagTokenizer.from_pretrained(hub["facebook/rag-sequence-nq"])
    retriever = RagRetriever.from_pretrained(
        hub["facebook/rag-sequence-nq"], dataset=hub["wiki_dpr"], index_name="compressed"
    )
    # attn_implementation="flash_attention_2" needs CUDA and flash-attn; sdpa is the CPU equivalent.
    model = RagSequenceForGeneration.from_pretrained(
        hub["facebook/rag-token-nq"], retriever=retriever, dtype="auto", attn_implementation="sdpa"
    )
    input_dict = tokenizer.prepare_seq2seq_batch("How many people live in Paris?", return_tensors="pt")
    generated = model.generate(input_ids=input_dict["input_ids"], max_length=8)
    assert generated.dim() == 2 and generated.shape[0] == 1
    answer = tokenizer.batch_decode(generated, skip_special_tokens=True)[0]
    assert isinstance(answer, str)


@pytest.mark.skipif(_cuda_with("flash_attn"), reason="flash-attention can run here (tests/gpu covers it)")
def test_first_example_flash_attention_without_cuda_is_a_clear_error(hub):
    retriever = RagRetriever.from_pretrained(
        hub["facebook/rag-sequence-nq"], dataset=hub["wiki_dpr"], index_name="compressed"
    )
    # ragkit checks before transformers and names the extra to install.
    with pytest.raises(ImportError, match=r"flash_attention_2.*ragkit-torch\[cuda\]"):
        RagSequenceForGeneration.from_pretrained(
            hub["facebook/rag-token-nq"],
            retriever=retriever,
            dtype="auto",
            attn_implementation="flash_attention_2",
        )


def test_retriever_examples(hub, indexed_dataset, tmp_path):
    checkpoint = hub["facebook/rag-sequence-nq"]
    questions = torch.randn(2, 32)

    retriever = RagRetriever.from_pretrained(checkpoint, dataset=hub["wiki_dpr"], index_name="compressed")
    embeds, doc_ids, docs = retriever.retrieve(questions.numpy(), n_docs=3)
    assert embeds.shape == (2, 3, 32) and doc_ids.shape == (2, 3) and len(docs) == 2

    # "To load your own indexed dataset built with the datasets library"
    retriever = RagRetriever.from_pretrained(checkpoint, indexed_dataset=indexed_dataset)
    _, own_ids, _ = retriever.retrieve(questions.numpy(), n_docs=3)

    # "... that was saved on disk"
    dataset_path, index_path = tmp_path / "my_dataset", tmp_path / "my_index.faiss"
    indexed_dataset.get_index("embeddings").save(str(index_path))
    # save_to_disk refuses a dataset with an index attached; save a copy without it.
    Dataset.from_dict(indexed_dataset[:]).save_to_disk(str(dataset_path))
    retriever = RagRetriever.from_pretrained(
        checkpoint, index_name="custom", passages_path=str(dataset_path), index_path=str(index_path)
    )
    _, disk_ids, _ = retriever.retrieve(questions.numpy(), n_docs=3)
    assert (disk_ids == own_ids).all()


def test_rag_model_example(hub):
    tokenizer = AutoTokenizer.from_pretrained(hub["facebook/rag-token-base"])
    retriever = RagRetriever.from_pretrained(
        hub["facebook/rag-token-base"], index_name="exact", use_dummy_dataset=True
    )
    model = RagModel.from_pretrained(hub["facebook/rag-token-base"], retriever=retriever)
    inputs = tokenizer("How many people live in Paris?", return_tensors="pt")
    outputs = model(input_ids=inputs["input_ids"])
    assert isinstance(outputs, RetrievAugLMOutput)
    assert outputs.doc_scores.shape == (1, model.config.n_docs)


@pytest.mark.parametrize(
    "checkpoint, model_class",
    [
        ("facebook/rag-sequence-nq", RagSequenceForGeneration),
        ("facebook/rag-token-nq", RagTokenForGeneration),
    ],
)
def test_generation_class_examples(hub, checkpoint, model_class):
    tokenizer = AutoTokenizer.from_pretrained(hub[checkpoint])
    retriever = RagRetriever.from_pretrained(hub[checkpoint], index_name="exact", use_dummy_dataset=True)
    # initialize with RagRetriever to do everything in one forward call
    model = model_class.from_pretrained(hub["facebook/rag-token-nq"], retriever=retriever)
    inputs = tokenizer("How many people live in Paris?", return_tensors="pt")
    targets = tokenizer(text_target="In Paris, there are 10 million people.", return_tensors="pt")
    input_ids = inputs["input_ids"]
    labels = targets["input_ids"]
    outputs = model(input_ids=input_ids, labels=labels)
    assert isinstance(outputs, RetrievAugLMMarginOutput)
    assert torch.isfinite(outputs.loss).all()

    # or use retriever separately
    model = model_class.from_pretrained(hub[checkpoint], use_dummy_dataset=True)
    # 1. Encode
    question_hidden_states = model.question_encoder(input_ids)[0]
    # 2. Retrieve
    docs_dict = retriever(input_ids.numpy(), question_hidden_states.detach().numpy(), return_tensors="pt")
    doc_scores = torch.bmm(
        question_hidden_states.unsqueeze(1), docs_dict["retrieved_doc_embeds"].float().transpose(1, 2)
    ).squeeze(1)
    # 3. Forward to generator
    outputs = model(
        context_input_ids=docs_dict["context_input_ids"],
        context_attention_mask=docs_dict["context_attention_mask"],
        doc_scores=doc_scores,
        decoder_input_ids=labels,
    )
    assert outputs.logits.shape[-1] == model.config.generator.vocab_size

    # or directly generate
    generated = model.generate(
        context_input_ids=docs_dict["context_input_ids"],
        context_attention_mask=docs_dict["context_attention_mask"],
        doc_scores=doc_scores,
        max_length=8,
    )
    generated_string = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert len(generated_string) == 1


@pytest.mark.skipif(_cuda_with("bitsandbytes"), reason="bitsandbytes can run here (tests/gpu covers it)")
def test_quantization_example_without_cuda_is_a_clear_error(hub):
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    # Without bitsandbytes (or without CUDA) ragkit's error names what is missing and the extra to install.
    with pytest.raises(ImportError, match=r"(?i)(bitsandbytes|cuda).*ragkit-torch\[cuda\]"):
        RagSequenceForGeneration.from_pretrained(
            hub["facebook/rag-token-nq"], quantization_config=bnb, device_map="auto"
        )
