"""Helpers shared by the distributed retrieval tests (and importable by spawned worker processes)."""

from __future__ import annotations

import socket

import numpy as np
import torch

from ragkit.testing import tiny_question_vectors, tiny_rag_model

DIM = 32
QUESTIONS = ["How many people live in Paris?", "Which river flows through London?", "Where is the Louvre?"]
ANSWERS = ["about 2 million", "the Thames", "in Paris"]


def query_vectors(batch: int, seed: int) -> np.ndarray:
    """(batch, DIM) float32 question vectors."""
    return tiny_question_vectors(batch, DIM, seed)


def free_port() -> int:
    """A TCP port nobody listens on right now (for torch.distributed's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_sequence_model(config, retriever, seed: int = 0):
    """ragkit RagSequenceForGeneration over a tiny random DPR + BART (seeded: same weights everywhere)."""
    return tiny_rag_model(config, retriever, seed=seed)


def train_one_step(model, question_encoder_tokenizer, generator_tokenizer, questions, answers) -> dict:
    """One optimizer step; returns the loss and how far the question encoder's weights moved.

    The question encoder gets gradients only through the document scores, i.e. through the
    retrieved embeddings: a move proves the retriever's output took part in training.
    """
    model.train()
    inputs = question_encoder_tokenizer(questions, return_tensors="pt", padding=True)
    labels = generator_tokenizer(answers, return_tensors="pt", padding=True).input_ids
    encoder_params = [p for p in model.question_encoder.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in encoder_params]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss = model(inputs.input_ids, attention_mask=inputs.attention_mask, labels=labels).loss.sum()
    loss.backward()
    optimizer.step()
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(encoder_params, before))
    return {"loss": float(loss.detach()), "encoder_moved": moved}


def torch_retriever_worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    """One rank of the gloo test job: retrieve through rank 0, train one step, save what it saw.

    Rank 0 asks for 3 questions and rank 1 for 2 (unequal batches, as at the end of an epoch).
    """
    import json
    import os
    import pickle

    import torch.distributed as dist
    from transformers import BartTokenizer, DPRQuestionEncoderTokenizer

    from ragkit.distributed import TorchDistributedRetriever
    from ragkit.retrieval.custom import CustomHFIndex
    from ragkit.testing import tiny_rag_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        question_tokenizer = DPRQuestionEncoderTokenizer(vocab=os.path.join(workdir, "q", "vocab.txt"))
        generator_tokenizer = BartTokenizer(
            vocab=os.path.join(workdir, "g", "vocab.json"), merges=os.path.join(workdir, "g", "merges.txt")
        )
        config = tiny_rag_config("bart", hidden_size=DIM)
        index = CustomHFIndex.load_from_disk(
            DIM, os.path.join(workdir, "passages"), os.path.join(workdir, "index.faiss")
        )
        retriever = TorchDistributedRetriever(config, question_tokenizer, generator_tokenizer, index=index)
        batch = 3 - rank
        questions = QUESTIONS[:batch]
        queries = query_vectors(batch, seed=10 + rank)
        embeds, ids, docs = retriever.retrieve(queries, 4)
        question_ids = question_tokenizer(questions, padding=True, return_tensors="np")["input_ids"]
        contexts = retriever(question_ids, queries, n_docs=4, return_tensors="np")["context_input_ids"]
        try:  # more documents than passages: rank 0's error must reach rank 1 instead of a hang
            retriever.retrieve(queries, 17)
            error = None
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        model = tiny_sequence_model(config, retriever)
        step = train_one_step(model, question_tokenizer, generator_tokenizer, questions, ANSWERS[:batch])
        with open(os.path.join(workdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(
                {
                    "queries": queries,
                    "question_ids": question_ids,
                    "embeds": embeds,
                    "ids": ids,
                    "docs": docs,
                    "contexts": contexts,
                    "index_loaded": index.is_initialized(),
                    "error": error,
                    "step": json.dumps(step),
                },
                f,
            )
    finally:
        dist.destroy_process_group()
