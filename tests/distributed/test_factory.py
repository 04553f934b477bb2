"""make_distributed_retriever: the ``ragkit finetune --distributed_retriever`` choices, without Ray or a process group."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from ragkit.distributed import (
    TorchDistributedRetriever,
    add_distributed_retriever_arguments,
    distributed_retriever_from_args,
    make_distributed_retriever,
)
from ragkit.retrieval_rag import RagRetriever


@pytest.fixture
def unloaded_retriever(disk_config, question_encoder_tokenizer, generator_tokenizer):
    return RagRetriever(disk_config, question_encoder_tokenizer, generator_tokenizer, init_retrieval=False)


def test_none_and_pytorch_without_process_group_answer_like_the_retriever(
    unloaded_retriever, single_process_retriever
):
    queries = np.random.RandomState(2).randn(2, 32).astype("float32")
    expected_ids = single_process_retriever.retrieve(queries, 3)[1]
    parser = argparse.ArgumentParser()
    add_distributed_retriever_arguments(parser)

    plain = distributed_retriever_from_args(unloaded_retriever, parser.parse_args([]))
    assert plain is unloaded_retriever and plain.index.is_initialized()

    torch_retriever = make_distributed_retriever(unloaded_retriever, "pytorch")
    assert isinstance(torch_retriever, TorchDistributedRetriever)
    # No process group: it falls back to an ordinary retriever at its first call.
    np.testing.assert_array_equal(torch_retriever.retrieve(queries, 3)[1], expected_ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "faiss"}, "must be one of"),
        ({"kind": "pytorch", "index_shards": 2}, "rank 0 alone"),
        ({"kind": "ray", "index_shards": 2, "num_workers": 3}, "one actor per shard"),
        ({"kind": "ray", "num_workers": 0}, "at least 1"),
    ],
)
def test_flag_combinations_that_cannot_work_are_refused(unloaded_retriever, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_distributed_retriever(unloaded_retriever, **kwargs)
