"""Decoding and training-step benchmark: ragkit against Transformers' RAG on one random-weight model.

One set of random weights (DPR question encoder + BART generator) is built once and shared by the
Transformers reference models and the ragkit models, so both decode exactly the same checkpoint.
Retrieval is left out: every variant gets the same precomputed contexts, their mask and document
scores. The bare generator's beam search over the same `batch_size * n_docs` contexts is the floor.
Contexts are either full (`--contexts full`: every row fills `context_length`, no padding, where the
reference's RAG-Sequence output is correct) or realistic (`--contexts padded`: each row fills a
length drawn at 50-70% of `max_combined_length=300`, right-padded to 300 as the retriever pads them).

Timings alternate between variants (the order rotates every round) and the median is reported;
outputs of ragkit and the reference are checked for identity. Peak memory is measured per variant
in a fresh subprocess (CPU: growth of the resident-set high-water mark; CUDA: max allocated).

    python benchmarks/bench_generation.py --size cpu            # about a minute on 2 cores
    python benchmarks/bench_generation.py --size gpu            # rag-*-nq shapes, bf16, needs CUDA
    python benchmarks/bench_generation.py --size cpu --memory   # adds peak memory per variant
    python benchmarks/bench_generation.py --size cpu --contexts padded --skip-decoding --memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder

import ragkit


@dataclass
class Size:
    """Model and workload shapes."""

    dpr_layers: int
    dpr_hidden: int
    bart_layers: int
    bart_hidden: int
    bart_heads: int
    context_length: int
    batch_size: int
    n_docs: int
    num_beams: int
    new_tokens: int
    train_batch_size: int
    train_target_length: int
    device: str
    dtype: str
    repeats: int
    contexts: str = "full"
    label_smoothing: float = 0.0


SIZES = {
    # DPR 2 layers d=256, BART d=256 3+3 layers, contexts of 128 tokens, batch 8, 5 docs, 4 beams, 16 tokens.
    "cpu": Size(2, 256, 3, 256, 4, 128, 8, 5, 4, 16, 4, 16, "cpu", "float32", 3),
    # rag-*-nq: DPR bert-base, BART-large, contexts of 300 tokens, batch 32, 5 docs, 4 beams, 20 tokens.
    "gpu": Size(12, 768, 12, 1024, 16, 300, 32, 5, 4, 20, 8, 20, "cuda", "bfloat16", 5),
}
VOCAB_QUESTION, VOCAB_GENERATOR = 30522, 50265
DECODING_VARIANTS = (
    "bare_generator",
    "reference_sequence",
    "ragkit_sequence",
    "ragkit_sequence_fast",
    "reference_token",
    "ragkit_token",
)
#: ``--contexts padded``: contexts padded to the retriever's ``max_combined_length``, filled 50-70%.
PADDED_CONTEXT_LENGTH = 300
PADDED_FILL = (0.5, 0.7)
#: Target length of the training step with ``--contexts padded`` (the shapes of realistic fine-tuning).
PADDED_TARGET_LENGTH = 20
PAD, BOS, EOS = 1, 0, 2
TRAINING_VARIANTS = (
    "reference_sequence_train",
    "ragkit_sequence_train",
    "reference_token_train",
    "ragkit_token_train",
)


def use_padded_contexts(size: Size) -> None:
    """Switch ``size`` to realistic contexts: ``max_combined_length=300``, 20 target tokens."""
    size.contexts = "padded"
    size.context_length = PADDED_CONTEXT_LENGTH
    size.train_target_length = PADDED_TARGET_LENGTH


def make_contexts(
    rows: int, length: int, padded: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows, length)` context ids and mask: ``<s> ... </s>``, full or filled 50-70% and right-padded."""
    contexts = torch.randint(5, VOCAB_GENERATOR, (rows, length), generator=generator)
    contexts[:, 0] = BOS
    if not padded:
        contexts[:, -1] = EOS
        return contexts, torch.ones_like(contexts)
    low, high = (int(fraction * length) for fraction in PADDED_FILL)
    fills = torch.randint(low, high + 1, (rows,), generator=generator)
    positions = torch.arange(length).unsqueeze(0)
    mask = (positions < fills.unsqueeze(1)).long()
    contexts[torch.arange(rows), fills - 1] = EOS
    return contexts.masked_fill(mask == 0, PAD), mask


def build(size: Size, seed: int = 0) -> dict[str, Any]:
    """Random weights shared by the four RAG models, and the precomputed inputs (``size.contexts``)."""
    torch.manual_seed(seed)
    dpr = DPRConfig(
        vocab_size=VOCAB_QUESTION,
        hidden_size=size.dpr_hidden,
        num_hidden_layers=size.dpr_layers,
        num_attention_heads=size.dpr_hidden // 64,
        intermediate_size=4 * size.dpr_hidden,
    )
    bart = BartConfig(
        vocab_size=VOCAB_GENERATOR,
        d_model=size.bart_hidden,
        encoder_layers=size.bart_layers,
        decoder_layers=size.bart_layers,
        encoder_attention_heads=size.bart_heads,
        decoder_attention_heads=size.bart_heads,
        encoder_ffn_dim=4 * size.bart_hidden,
        decoder_ffn_dim=4 * size.bart_hidden,
        max_position_embeddings=1024,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    )
    question_encoder = DPRQuestionEncoder(dpr)
    generator = BartForConditionalGeneration(bart)
    # Default init gives one token repeated; wider weights give varied hypotheses, as a trained model would.
    with torch.no_grad():
        for param in generator.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.25)
    dtype = getattr(torch, size.dtype)
    question_encoder.to(size.device, dtype)
    generator.to(size.device, dtype)
    # Label smoothing goes in the config: both libraries' training losses read it there (the reference only there).
    config = ragkit.RagConfig.from_question_encoder_generator_configs(
        dpr,
        bart,
        n_docs=size.n_docs,
        max_combined_length=size.context_length,
        index_name="custom",
        label_smoothing=size.label_smoothing,
    )
    reference_config = transformers.RagConfig(**config.to_dict())
    models = {
        "reference_sequence": transformers.RagSequenceForGeneration(
            config=reference_config, question_encoder=question_encoder, generator=generator
        ),
        "reference_token": transformers.RagTokenForGeneration(
            config=reference_config, question_encoder=question_encoder, generator=generator
        ),
        "ragkit_sequence": ragkit.RagSequenceForGeneration(
            config=config, question_encoder=question_encoder, generator=generator
        ),
        "ragkit_token": ragkit.RagTokenForGeneration(
            config=config, question_encoder=question_encoder, generator=generator
        ),
    }
    for model in models.values():
        model.eval()
    generator_rng = torch.Generator().manual_seed(seed + 1)
    rows = size.batch_size * size.n_docs
    # Contexts start with BOS and end with EOS like tokenized text; padded ones are right-padded.
    contexts, mask = make_contexts(rows, size.context_length, size.contexts == "padded", generator_rng)
    inputs = {
        "context_input_ids": contexts.to(size.device),
        "context_attention_mask": mask.to(size.device),
        "doc_scores": torch.randn(size.batch_size, size.n_docs, generator=generator_rng).to(
            size.device, dtype
        ),
    }
    train_rows = size.train_batch_size * size.n_docs
    labels = torch.randint(
        5, VOCAB_GENERATOR, (size.train_batch_size, size.train_target_length), generator=generator_rng
    )
    labels[:, 0], labels[:, -1] = 0, 2
    train_inputs = {
        "context_input_ids": inputs["context_input_ids"][:train_rows],
        "context_attention_mask": inputs["context_attention_mask"][:train_rows],
        "doc_scores": inputs["doc_scores"][: size.train_batch_size],
        "labels": labels.to(size.device),
    }
    return {"models": models, "generator": generator, "inputs": inputs, "train_inputs": train_inputs}


def chunked_variant(questions_per_batch: int) -> str:
    """Name of the ragkit RAG-Sequence variant that decodes ``questions_per_batch`` questions per call."""
    return f"ragkit_sequence_qpb{questions_per_batch}"


def make_runners(
    size: Size, built: dict[str, Any], questions_per_batch: tuple[int, ...] = ()
) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per variant (plus one per ``questions_per_batch`` value)."""
    models, inputs, generator = built["models"], built["inputs"], built["generator"]
    # max_length (decoder start token included), not max_new_tokens: Transformers' RAG-Token generate ignores
    # max_new_tokens and would run to the default max_length of 20 (ragkit's honours it, which would be the
    # same as this max_length). One setting that both libraries read keeps their outputs comparable.
    decode = {"num_beams": size.num_beams, "max_length": size.new_tokens + 1}

    def bare() -> torch.Tensor:
        with torch.no_grad():
            return generator.generate(
                inputs["context_input_ids"], attention_mask=inputs["context_attention_mask"], **decode
            )

    def sequence(name: str, **extra: Any) -> Callable[[], torch.Tensor]:
        return lambda: models[name].generate(**inputs, **decode, **extra)

    def token(name: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return models[name].generate(**inputs, **decode)

        return run

    def train(name: str) -> Callable[[], float]:
        def run() -> float:
            model = models[name]
            doc_scores = built["train_inputs"]["doc_scores"].detach().clone().requires_grad_(True)
            fields = dict(built["train_inputs"], doc_scores=doc_scores)
            with torch.autocast(size.device, dtype=torch.bfloat16, enabled=size.device == "cuda"):
                loss = model(**fields, n_docs=size.n_docs).loss.sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())

        return run

    chunked = {
        chunked_variant(n): sequence("ragkit_sequence", questions_per_batch=n) for n in questions_per_batch
    }
    return {
        **chunked,
        "bare_generator": bare,
        "reference_sequence": sequence("reference_sequence"),
        "ragkit_sequence": sequence("ragkit_sequence"),
        "ragkit_sequence_fast": sequence("ragkit_sequence", decoding="fast"),
        "reference_token": token("reference_token"),
        "ragkit_token": token("ragkit_token"),
        "reference_sequence_train": train("reference_sequence"),
        "ragkit_sequence_train": train("ragkit_sequence"),
        "reference_token_train": train("reference_token"),
        "ragkit_token_train": train("ragkit_token"),
    }


def distinct_hypotheses(size: Size, built: dict[str, Any]) -> float:
    """Mean number of distinct beam-search hypotheses per question (all documents' beams together)."""
    inputs = built["inputs"]
    with torch.no_grad():
        sequences = built["generator"].generate(
            inputs["context_input_ids"],
            attention_mask=inputs["context_attention_mask"],
            num_beams=size.num_beams,
            num_return_sequences=size.num_beams,
            max_length=size.new_tokens + 1,
        )
    per_question = sequences.view(size.batch_size, size.n_docs * size.num_beams, -1).tolist()
    return statistics.mean(len({tuple(row) for row in rows}) for rows in per_question)


def _sync(size: Size) -> None:
    if size.device == "cuda":
        torch.cuda.synchronize()


def time_variants(
    size: Size, runners: dict[str, Callable[[], Any]], names: tuple[str, ...], repeats: int, warmup: int = 1
):
    """Median seconds per variant over ``repeats`` rounds (rotating order), and each variant's first output."""
    for _ in range(warmup):
        for name in names:
            runners[name]()
    outputs = {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(size)
            start = time.perf_counter()
            out = runners[name]()
            _sync(size)
            times[name].append(time.perf_counter() - start)
            outputs.setdefault(name, out)
    return {name: statistics.median(values) for name, values in times.items()}, times, outputs


def _current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(size_name: str, variant: str) -> float:
    """Peak memory (MiB) one call of ``variant`` adds, in this process (call it in a fresh one)."""
    size = SIZES[size_name]
    built = build(size)
    chunked = (int(variant.rsplit("qpb", 1)[1]),) if "_qpb" in variant else ()
    runner = make_runners(size, built, chunked)[variant]
    if size.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # Large tensors are mmapped and unmapped when freed, so sampling the resident set every
    # millisecond sees the peak of the call; the high-water mark would be the model build's.
    before = _current_rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runner()
    finally:
        done.set()
        sampler.join()
    return (max(peak, _current_rss()) - before) / 2**20


def cuda_memory_table(runners: dict[str, Callable[[], Any]], names: tuple[str, ...]) -> dict[str, float]:
    """Peak CUDA memory (MiB above what was allocated before) of one call per variant, in this process.

    CUDA's allocator counts exactly what is live, so the variants can share one process and one copy
    of the weights (a subprocess per variant would rebuild BART-large each time).
    """
    result = {}
    for name in names:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runners[name]()
        torch.cuda.synchronize()
        result[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def memory_table(size_name: str, names: tuple[str, ...], extra: list[str]) -> dict[str, float]:
    """Peak memory per variant, each in its own subprocess (CPU: the resident set is per process)."""
    result = {}
    for name in names:
        # A fixed mmap threshold makes glibc map every large tensor and unmap it when freed, so the
        # resident set follows live memory (the default threshold adapts upwards and keeps freed memory).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(
            [sys.executable, __file__, "--size", size_name, "--memory-of", name, *extra],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        result[name] = float(out.stdout.strip().splitlines()[-1])
    return result


def peak_memory(
    size_name: str,
    names: tuple[str, ...],
    questions_per_batch: tuple[int, ...] = (),
    runners: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Peak memory per variant: on CUDA in this process (with ``runners`` if built), on CPU in subprocesses."""
    size = SIZES[size_name]
    if size.device == "cuda":
        return cuda_memory_table(runners or make_runners(size, build(size), questions_per_batch), names)
    extra = [
        f"--threads={torch.get_num_threads()}",
        f"--batch-size={size.batch_size}",
        f"--train-batch-size={size.train_batch_size}",
        f"--dtype={size.dtype}",
        f"--contexts={size.contexts}",
        f"--label-smoothing={size.label_smoothing}",
    ]
    return memory_table(size_name, names, extra)


def time_decoding(
    size: Size,
    built: dict[str, Any],
    runners: dict[str, Callable[[], Any]],
    decoding_names: tuple[str, ...],
    repeats: int,
    warmup: int,
    chunked: tuple[int, ...],
) -> dict[str, Any]:
    """Time the decoding variants, print the table and check ragkit's outputs against the reference's."""
    medians, all_times, outputs = time_variants(size, runners, decoding_names, repeats, warmup)

    # Ratios are taken round by round (runs close in time) and then the median, which is steadier
    # on a shared machine than a ratio of medians.
    def ratio(numerator: str, denominator: str) -> float:
        pairs = zip(all_times[numerator], all_times[denominator])
        return statistics.median(a / b for a, b in pairs)

    print(f"\n{'decoding variant':28s} {'median s':>9s} {'x floor':>8s}   runs (s)")
    for name in decoding_names:
        runs = " ".join(f"{t:.2f}" for t in all_times[name])
        print(f"{name:28s} {medians[name]:9.3f} {ratio(name, 'bare_generator'):8.2f}   {runs}")
    speedups = {
        "sequence_speedup": ("reference_sequence", "ragkit_sequence"),
        "sequence_fast_speedup": ("reference_sequence", "ragkit_sequence_fast"),
        "token_speedup": ("reference_token", "ragkit_token"),
        **{f"{chunked_variant(n)}_speedup": ("reference_sequence", chunked_variant(n)) for n in chunked},
    }
    ratios = {
        **{key: ratio(*pair) for key, pair in speedups.items() if set(pair) <= set(decoding_names)},
        **{f"{name}_x_floor": ratio(name, "bare_generator") for name in decoding_names},
    }
    for key, (reference_name, name) in speedups.items():
        if key in ratios:
            print(f"{name}: {ratios[key]:.2f}x faster than {reference_name}")

    identical = {
        head: torch.equal(outputs[f"ragkit_{head}"], outputs[f"reference_{head}"])
        for head in ("sequence", "token")
        if {f"ragkit_{head}", f"reference_{head}"} <= set(decoding_names)
    }
    for n in chunked:
        same = torch.equal(outputs[chunked_variant(n)], outputs["ragkit_sequence"])
        print(f"{n} question(s) per call gives the same output as the whole batch at once: {same}")
    print(f"outputs identical to Transformers': {identical}")
    if size.contexts == "padded":
        # The reference's RAG-Sequence generate calls the generator without the attention mask, so it
        # attends to the padding: its output on padded contexts is not the correct one to match.
        print(
            "(padded contexts: Transformers' RAG-Sequence generate attends to padding; only RAG-Token compares)"
        )
    fast_agree = None
    if "ragkit_sequence_fast" in decoding_names:
        same_rows = outputs["ragkit_sequence_fast"] == outputs["ragkit_sequence"]
        fast_agree = same_rows.all(dim=1).float().mean().item()
        print(f"fast == thorough on {fast_agree:.0%} of questions")
    distinct = len({tuple(row.tolist()) for row in outputs["ragkit_sequence"]})
    print(f"{distinct} distinct answers in the batch")
    hypotheses = distinct_hypotheses(size, built)
    print(
        f"distinct hypotheses per question (what thorough decoding scores under every document): "
        f"mean {hypotheses:.1f} of {size.n_docs * size.num_beams}"
    )
    return {
        "decoding_median_s": medians,
        "decoding_runs_s": all_times,
        "ratios": ratios,
        "identical": identical,
        "fast_agrees_with_thorough": fast_agree,
        "distinct_hypotheses_per_question": hypotheses,
    }


def time_training(
    size: Size, runners: dict[str, Callable[[], Any]], repeats: int, warmup: int
) -> dict[str, Any]:
    """Time the training step of both heads in both libraries; ratios per round, and the losses compared."""
    medians, times, outputs = time_variants(size, runners, TRAINING_VARIANTS, repeats, warmup)
    results: dict[str, Any] = {
        "training_median_s": medians,
        "training_runs_s": times,
        "training_loss": outputs,
    }
    print(f"\n{'training step (fwd+bwd)':28s} {'median s':>9s}   runs")
    for name in TRAINING_VARIANTS:
        runs = " ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:28s} {medians[name]:9.3f}   {runs}")
    for head in ("sequence", "token"):
        ours, reference = f"ragkit_{head}_train", f"reference_{head}_train"
        relative = statistics.median(a / b for a, b in zip(times[ours], times[reference]))
        speedup = statistics.median(b / a for a, b in zip(times[ours], times[reference]))
        difference = abs(outputs[ours] - outputs[reference]) / max(abs(outputs[reference]), 1e-12)
        print(
            f"RAG-{head.capitalize()} training step: ragkit / Transformers time {relative:.2f} "
            f"({speedup:.2f}x faster, per-round median); loss {outputs[ours]:.6f} vs {outputs[reference]:.6f} "
            f"(relative difference {difference:.1e})"
        )
        results[f"training_{head}_ragkit_over_reference"] = relative
        results[f"training_{head}_speedup"] = speedup
        results[f"training_{head}_loss_relative_difference"] = difference
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (median reported)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per variant")
    parser.add_argument("--memory-only", action="store_true", help="only measure peak memory per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--train-repeats", type=int, default=None, help="timed training rounds (default: --repeats)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the size's batch size")
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=None,
        help="override the size's training batch size (at most the batch size: its contexts are the first ones)",
    )
    parser.add_argument(
        "--dtype", default=None, help="override the size's dtype (float32 makes the identity check exact)"
    )
    parser.add_argument(
        "--contexts",
        choices=("full", "padded"),
        default="full",
        help="full: no padding; padded: 50-70%% of max_combined_length=300 filled, right-padded (realistic)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="EPS",
        help="label smoothing of the training step's loss, in both libraries' configs (default 0)",
    )
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decoding", action="store_true", help="time only the training step")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=DECODING_VARIANTS,
        default=None,
        help="time only these decoding variants (bare_generator and ragkit_sequence are always included)",
    )
    parser.add_argument(
        "--questions-per-batch",
        type=int,
        nargs="*",
        default=[],
        help="also time ragkit RAG-Sequence decoding this many questions per generator call (less memory)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size:
        SIZES[args.size].batch_size = args.batch_size
    if args.train_batch_size:
        SIZES[args.size].train_batch_size = args.train_batch_size
    if SIZES[args.size].train_batch_size > SIZES[args.size].batch_size:
        parser.error(
            f"--train-batch-size ({SIZES[args.size].train_batch_size}) must be at most the batch size "
            f"({SIZES[args.size].batch_size}): the training step reuses the first decoding contexts"
        )
    if args.dtype:
        SIZES[args.size].dtype = args.dtype
    if args.contexts == "padded":
        use_padded_contexts(SIZES[args.size])
    SIZES[args.size].label_smoothing = args.label_smoothing
    transformers.logging.set_verbosity_error()
    if args.memory_of:
        print(measure_memory(args.size, args.memory_of))
        return

    size = SIZES[args.size]
    repeats = size.repeats = args.repeats or size.repeats
    chunked = tuple(args.questions_per_batch)
    selected = DECODING_VARIANTS
    if args.variants:
        wanted = {"bare_generator", "ragkit_sequence", *args.variants}
        selected = tuple(name for name in DECODING_VARIANTS if name in wanted)
    decoding_names = selected + tuple(chunked_variant(n) for n in chunked)
    memory_names = (() if args.skip_decoding else decoding_names) + (
        () if args.skip_training else TRAINING_VARIANTS
    )
    if args.memory_only:
        peaks = peak_memory(args.size, memory_names, chunked)
        for name, value in peaks.items():
            print(f"{name:28s} {value:9.1f} MiB")
        return
    built = build(size)
    runners = make_runners(size, built, chunked)
    print(f"size={args.size} {asdict(size)} torch={torch.__version__} threads={torch.get_num_threads()}")
    results: dict[str, Any] = {
        "size": args.size,
        "contexts": size.contexts,
        "shapes": asdict(size),
        "threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    mask = built["inputs"]["context_attention_mask"]
    results["context_fill"] = float(mask.float().mean())
    if size.contexts == "padded":
        print(f"contexts: {results['context_fill']:.0%} of {size.context_length} columns are real tokens")

    def save() -> None:
        # After each stage, so that a run stopped by a time limit keeps what it measured.
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    if not args.skip_decoding:
        results.update(time_decoding(size, built, runners, decoding_names, repeats, args.warmup, chunked))
        save()
    if not args.skip_training:
        results.update(time_training(size, runners, args.train_repeats or repeats, max(1, args.warmup)))
        save()
    if args.memory:
        peaks = peak_memory(args.size, memory_names, chunked, runners)
        unit = "MiB allocated" if size.device == "cuda" else "MiB peak RSS growth"
        print(f"\n{'peak memory':28s} {unit}")
        for name, value in peaks.items():
            print(f"{name:28s} {value:9.1f}")
        results["peak_memory_mib"] = peaks
        for head in ("sequence", "token"):
            ours, reference = f"ragkit_{head}_train", f"reference_{head}_train"
            if ours in peaks and reference in peaks:
                relative = peaks[ours] / peaks[reference]
                print(f"ragkit / Transformers, RAG-{head.capitalize()} training peak memory: {relative:.2f}")
                results[f"training_{head}_memory_ragkit_over_reference"] = relative
    results["complete"] = True
    save()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
