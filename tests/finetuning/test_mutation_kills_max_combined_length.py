"""``ragkit finetune --max_combined_length`` reaches the contexts, also through a retriever with its own config."""

from __future__ import annotations

import argparse
import copy

import torch

from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenizer
from ragkit.finetuning import RagTrainer, TrainingArguments
from ragkit.finetuning.arguments import dataclass_from_namespace
from ragkit.retrieval.custom import CustomHFIndex


def _flags_to_arguments(tmp_path, *flags: str) -> TrainingArguments:
    """The TrainingArguments ``ragkit finetune`` builds from these flags."""
    from ragkit.commands import finetune

    parser = argparse.ArgumentParser(prog="ragkit finetune")
    finetune.configure_parser(parser)
    base = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "1"]
    quiet = ["--train_batch_size", "4", "--precision", "fp32", "--no_progress", "--no_validation"]
    return dataclass_from_namespace(TrainingArguments, parser.parse_args([*base, *quiet, *flags]))


def test_flag_sets_the_width_of_contexts_from_a_retriever_with_its_own_config(
    tmp_path, rag_config, question_encoder_tokenizer, generator_tokenizer, indexed_dataset, train_examples
):
    config = type(rag_config).from_dict(rag_config.to_dict())
    config.max_combined_length = 96
    # The retriever tokenizes contexts with its own config, a separate copy from the model's.
    retriever = RagRetriever(
        copy.deepcopy(config),
        question_encoder_tokenizer,
        generator_tokenizer,
        index=CustomHFIndex(config.retrieval_vector_size, indexed_dataset),
    )
    assert retriever.config is not config
    torch.manual_seed(0)
    model = RagSequenceForGeneration(config=config, retriever=retriever)
    widths: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            widths.append(int(ids.shape[-1]))

    model.rag.generator.register_forward_pre_hook(record, with_kwargs=True)
    args = _flags_to_arguments(tmp_path, "--max_combined_length", "10")
    assert args.max_combined_length == 10
    tokenizer = RagTokenizer(question_encoder_tokenizer, generator_tokenizer)
    RagTrainer(model, tokenizer, args, train_examples[:4]).train()
    assert widths and max(widths) == 10
    assert model.config.max_combined_length == 10 and model.retriever.config.max_combined_length == 10
