"""TorchDistributedRetriever on two gloo processes gives the single-process answers; rank 1 loads no index."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import torch.multiprocessing as mp
from distributed_helpers import free_port, torch_retriever_worker

from ragkit.testing import assert_doc_dicts_equal


def test_two_gloo_ranks_get_single_process_answers_and_train(
    tmp_path,
    tiny_dir,
    saved_passages,
    question_encoder_tokenizer,
    generator_tokenizer,
    single_process_retriever,
):
    passages_path, index_path = saved_passages
    shutil.copytree(passages_path, tmp_path / "passages")
    shutil.copy(index_path, tmp_path / "index.faiss")
    # The files behind the session tokenizers, so both sides tokenize identically.
    shutil.copytree(tiny_dir / "question_encoder_tokenizer", tmp_path / "q")
    shutil.copytree(tiny_dir / "generator_tokenizer", tmp_path / "g")

    mp.spawn(torch_retriever_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            seen = pickle.load(f)
        assert len(seen["ids"]) == 3 - rank
        embeds, ids, docs = single_process_retriever.retrieve(seen["queries"], 4)
        np.testing.assert_array_equal(seen["ids"], ids)
        np.testing.assert_array_equal(seen["embeds"], embeds)
        assert_doc_dicts_equal(seen["docs"], docs)
        expected = single_process_retriever(
            seen["question_ids"], seen["queries"], n_docs=4, return_tensors="np"
        )
        np.testing.assert_array_equal(seen["contexts"], expected["context_input_ids"])
        # The main rank's error reached both ranks (the job went on: the training step below ran).
        assert "larger than the number of passages" in seen["error"]
        assert seen["error"].startswith("RagInputError" if rank == 0 else "_MainRankError")
        # Only the main rank holds the faiss index.
        assert seen["index_loaded"] is (rank == 0)
        step = json.loads(seen["step"])
        assert np.isfinite(step["loss"]) and step["encoder_moved"] > 0
