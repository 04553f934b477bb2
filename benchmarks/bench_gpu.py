"""GPU benchmark: time per ``generate`` and peak memory in float32, bfloat16 and 4-bit (bitsandbytes nf4).

Shapes of facebook/rag-{sequence,token}-nq with random weights: DPR bert-base question encoder, BART-large
generator, ``n_docs`` 5, contexts of ``max_combined_length`` 300 tokens, 4 beams, exactly 20 new tokens
(``min_length`` = ``max_length`` = 21, so random weights cannot stop early), batch 8 and 32. A
random-weight checkpoint is written once (bfloat16 safetensors) and every mode loads it with
``from_pretrained``, as a user would: ``dtype=torch.float32``, ``dtype=torch.bfloat16``, or
``quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, compute bf16)`` with ``device_map="auto"``
(ragkit: generator only; unquantized modules in bf16).

Reported per (mode, head, batch): weights (GiB allocated after loading), peak (GiB, max allocated during
the timed calls, weights included) and seconds per ``generate`` (mean of ``--repeats`` calls after one
warm-up call). Cases that would exceed ``--budget-s`` are recorded as skipped. Contexts are given
(no retrieval), so the numbers are the model's; retrieval runs on the CPU index either way.

    python benchmarks/bench_gpu.py --out results.json --markdown results.md          # on a CUDA machine
    python benchmarks/bench_gpu.py --shapes tiny --device cpu --modes fp32 bf16     # smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import BartConfig, BitsAndBytesConfig, DPRConfig

from ragkit import RagConfig, RagSequenceForGeneration, RagTokenForGeneration
from ragkit.testing import tiny_rag_config

GIB = 2**30
HEADS = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


def nq_config() -> RagConfig:
    """facebook/rag-*-nq shapes: DPR bert-base (DPRConfig defaults) + BART-large (BartConfig defaults)."""
    generator = BartConfig()
    return RagConfig.from_question_encoder_generator_configs(
        DPRConfig(),
        generator,
        n_docs=5,
        max_combined_length=300,
        index_name="custom",
        pad_token_id=generator.pad_token_id,
        eos_token_id=generator.eos_token_id,
        bos_token_id=generator.bos_token_id,
        decoder_start_token_id=generator.decoder_start_token_id,
    )


def write_checkpoint(config: RagConfig, directory: Path, device: str) -> Path:
    """Random weights (transformers' init, seeded), built on ``device`` and saved in bfloat16."""
    torch.manual_seed(0)
    with torch.device(device):
        model = RagTokenForGeneration(config)
    model.to(torch.bfloat16).save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def load(mode: str, checkpoint: Path, device: str) -> RagTokenForGeneration:
    """Load the checkpoint for ``mode`` (fp32, bf16, 4bit) the way a user would."""
    if mode == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        return RagTokenForGeneration.from_pretrained(
            checkpoint, quantization_config=quantization, device_map="auto"
        ).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
    return RagTokenForGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()


def contexts(config: RagConfig, batch_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random contexts of ``max_combined_length`` tokens and doc scores, as a retriever would return them."""
    generator = torch.Generator().manual_seed(seed)
    rows, length = batch_size * config.n_docs, config.max_combined_length
    ids = torch.randint(4, config.generator.vocab_size, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = config.generator.bos_token_id, config.generator.eos_token_id
    return {
        "context_input_ids": ids.to(device),
        "context_attention_mask": torch.ones(rows, length, dtype=torch.long, device=device),
        "doc_scores": torch.randn(batch_size, config.n_docs, generator=generator).to(device),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(model: Any, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up and ``args.repeats`` timed generate calls; seconds per call and peak memory."""
    inputs = contexts(model.config, batch_size, args.device)
    options = dict(num_beams=args.num_beams, max_length=args.new_tokens + 1, min_length=args.new_tokens + 1)
    with torch.no_grad():
        model.generate(**inputs, **options)
        _sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate(**inputs, **options)
            _sync(args.device)
            times.append(time.perf_counter() - start)
    result = {"seconds": sum(times) / len(times), "times": times, "output_shape": list(out.shape)}
    if args.device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return result


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """A table of the results."""
    lines = [
        f"Device: {meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"bitsandbytes {meta['bitsandbytes']}; shapes {meta['shapes']}, n_docs {meta['n_docs']}, "
        f"contexts of {meta['context_length']} tokens, {meta['num_beams']} beams, "
        f"{meta['new_tokens']} new tokens, mean of {meta['repeats']} after a warm-up.",
        "",
        "| mode | head | batch | weights (GiB) | peak (GiB) | s / generate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['head']} | {r['batch']} | | | skipped: {r['skipped']} |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a"
        weights = f"{r['weights_gib']:.2f}" if "weights_gib" in r else "n/a"
        lines.append(
            f"| {r['mode']} | {r['head']} | {r['batch']} | {weights} | {peak} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=["nq", "tiny"], default="nq")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["bf16", "4bit", "fp32"],
        choices=["fp32", "bf16", "4bit"],
        help="run in this order (fp32 last: the slowest, and the baseline least missed if the budget runs out)",
    )
    parser.add_argument("--heads", nargs="+", default=["sequence", "token"], choices=list(HEADS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="skip cases once this much time is spent"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--markdown", type=Path, default=None, help="Markdown table")
    args = parser.parse_args()

    started = time.perf_counter()
    config = nq_config() if args.shapes == "nq" else tiny_rag_config("bart", max_combined_length=32)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "not installed"
    meta = {
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version,
        "shapes": args.shapes,
        "n_docs": config.n_docs,
        "context_length": config.max_combined_length,
        "num_beams": args.num_beams,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(config, Path(tmp) / "rag-nq-random", args.device)
        for mode in args.modes:
            if mode == "4bit" and bnb_version == "not installed":
                results += [
                    {"mode": mode, "head": h, "batch": b, "skipped": "bitsandbytes not installed"}
                    for h in args.heads
                    for b in args.batches
                ]
                continue
            if args.device == "cuda":
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
            base = load(mode, checkpoint, args.device)
            weights = (torch.cuda.memory_allocated() - before) / GIB if args.device == "cuda" else None
            for head in args.heads:
                # Both heads share the loaded parts: no second copy of the weights.
                model = HEADS[head](
                    config=base.config, question_encoder=base.question_encoder, generator=base.generator
                )
                model.eval()
                for batch in args.batches:
                    case = {"mode": mode, "head": head, "batch": batch}
                    if time.perf_counter() - started > args.budget_s:
                        results.append({**case, "skipped": f"time budget {args.budget_s:.0f} s spent"})
                        continue
                    try:
                        case.update(run_case(model, batch, args))
                    except torch.cuda.OutOfMemoryError as error:  # recorded, not fatal: the table says so
                        case["skipped"] = f"out of memory ({str(error).splitlines()[0][:80]})"
                        torch.cuda.empty_cache()
                    if weights is not None:
                        case["weights_gib"] = weights
                    results.append(case)
                    print(json.dumps(case), flush=True)
                del model
            del base
    meta["total_seconds"] = time.perf_counter() - started
    table = markdown(results, meta)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
