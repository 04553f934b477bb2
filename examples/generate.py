"""Answer a question with a RAG model: the first usage example of the RAG docs, runnable.

python examples/generate.py                      # facebook/rag-sequence-nq + the compressed wiki_dpr index
python examples/generate.py --dummy              # the 10,000-passage dummy index (small download)
python examples/generate.py --load_in_4bit       # 4-bit generator weights (CUDA + bitsandbytes)
python examples/generate.py --local              # a tiny random checkpoint built here, offline
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer
from ragkit.errors import RagkitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="facebook/rag-sequence-nq")
    parser.add_argument("--model_type", choices=["rag_sequence", "rag_token"], default="rag_sequence")
    parser.add_argument("--index_name", default="compressed", help="compressed, exact, legacy or custom")
    parser.add_argument("--dummy", action="store_true", help="use wiki_dpr's dummy variant")
    parser.add_argument("--load_in_4bit", action="store_true", help="quantize the weights to 4 bits (CUDA)")
    parser.add_argument("--question", default="How many people live in Paris?")
    parser.add_argument("--local", action="store_true", help="a tiny local checkpoint instead (offline)")
    args = parser.parse_args(argv)
    try:
        return _answer(args, parser)
    except RagkitError as err:  # offline, no network, a missing file: what to do, not a traceback
        parser.error(str(err))


def _answer(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Load the model and its retriever as ``args`` says and print the answer to ``args.question``."""
    with tempfile.TemporaryDirectory() as scratch:
        model_name, retriever_kwargs = (
            args.model,
            {"index_name": args.index_name, "use_dummy_dataset": args.dummy},
        )
        if args.local:
            from _local import build_local_checkpoint

            model_name, retriever_kwargs = str(build_local_checkpoint(scratch, args.model_type)), {}

        tokenizer = RagTokenizer.from_pretrained(model_name)
        retriever = RagRetriever.from_pretrained(model_name, **retriever_kwargs)
        model_class = RagSequenceForGeneration if args.model_type == "rag_sequence" else RagTokenForGeneration
        load_kwargs = {"dtype": "auto"}
        if torch.cuda.is_available():
            load_kwargs["device_map"] = "auto"
            try:
                import flash_attn  # noqa: F401

                load_kwargs["attn_implementation"] = "flash_attention_2"
            except ImportError:
                load_kwargs["attn_implementation"] = "sdpa"
        if args.load_in_4bit:
            if not torch.cuda.is_available():
                parser.error(
                    "--load_in_4bit needs a CUDA GPU and bitsandbytes (pip install bitsandbytes, or "
                    "pip install -e '.[cuda]' from a clone of the ragkit repository)."
                )
            from transformers import BitsAndBytesConfig

            load_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
            )
        model = model_class.from_pretrained(model_name, retriever=retriever, **load_kwargs)

        input_dict = tokenizer.prepare_seq2seq_batch(args.question, return_tensors="pt").to(model.device)
        generated = model.generate(
            input_ids=input_dict["input_ids"], attention_mask=input_dict["attention_mask"]
        )
        print(f"Q: {args.question}\nA: {tokenizer.batch_decode(generated, skip_special_tokens=True)[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
