"""CUDA paths on a real GPU: half precision, attention implementations, bitsandbytes, devices.

Skipped without a CUDA device. Run them with ``bash scripts/gpu_checks.sh`` (docs/gpu.md), which also
installs the carried wheels (bitsandbytes, faiss-cpu, datasets) on a bare GPU machine.

Tolerances, against the same model in float32 with TF32 off, on marginalized RAG-Token log-probabilities
of a random "mid" model (width 256; see conftest.py): bfloat16 within 0.1 absolute and >= 97% of
positions with the same top token; float16 within 0.02 and >= 99%. sdpa and eager agree within 1e-4 in
float32. (On the CPU the same model gives 0.027 for bf16 and 0.003 for fp16.)
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from gpu_helpers import random_contexts
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.modeling_outputs import BaseModelOutput

from ragkit import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer
from ragkit.testing import write_tiny_rag_checkpoint, write_tiny_wiki_dpr_mirror

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("exact_float32"),  # float32 references without TF32
]

CUDA = "cuda"
TOLERANCES = {torch.bfloat16: (0.1, 0.97), torch.float16: (0.02, 0.99)}
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (docs/gpu.md)"
)


def _flash_distribution_installed(distribution: str) -> bool:
    """Whether ``distribution`` (flash-attn, flash-attn-4) provides the module flash_attn, as transformers checks."""
    from ragkit._accelerators import _module_distributions

    return importlib.util.find_spec("flash_attn") is not None and distribution in _module_distributions(
        "flash_attn"
    )


# flash-attn and flash-attn-4 both install the module flash_attn: each test asks for its own distribution.
needs_flash_attn = pytest.mark.skipif(
    not _flash_distribution_installed("flash-attn"), reason="flash-attn not installed (no wheel on PyPI)"
)
needs_flash_attn_4 = pytest.mark.skipif(
    not _flash_distribution_installed("flash-attn-4"),
    reason="flash-attn-4 not installed (scripts/prepare_gpu_wheels.sh, the fa4 wheel set)",
)


def _marginalized(model, config, seed: int = 0) -> torch.Tensor:
    """Marginalized log-probs `(4, 12, vocab)` of the RAG-Token head on fixed random contexts and targets."""
    inputs = random_contexts(config, batch_size=4, length=64, seed=seed, device=CUDA)
    targets = torch.randint(
        4, config.generator.vocab_size, (4, 12), generator=torch.Generator().manual_seed(seed)
    )
    targets[:, 0] = config.generator.decoder_start_token_id
    with torch.no_grad():
        outputs = model(**inputs, decoder_input_ids=targets.to(CUDA), do_marginalize=True)
    assert outputs.logits.dtype == outputs.doc_scores.dtype == torch.float32
    return outputs.logits


def _load(checkpoint, model_class=RagTokenForGeneration, **kwargs):
    return model_class.from_pretrained(checkpoint, **kwargs).to(CUDA).eval()


def _linear_kinds(module: nn.Module) -> set[str]:
    return {type(child).__name__ for child in module.modules() if isinstance(child, nn.Linear)}


# --------------------------------------------------------------------------------------------------
# dtypes and attention implementations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_close_to_float32(mid_checkpoint, dtype):
    full_model = _load(mid_checkpoint, dtype=torch.float32)
    full = _marginalized(full_model, full_model.config)
    half_model = _load(mid_checkpoint, dtype=dtype)
    assert half_model.generator.dtype == half_model.question_encoder.dtype == dtype
    half = _marginalized(half_model, half_model.config)
    atol, agreement = TOLERANCES[dtype]
    error = (half - full).abs().max().item()
    same_top = (half.argmax(-1) == full.argmax(-1)).float().mean().item()
    print(f"{dtype}: max |log-prob error| {error:.4f}, top-1 agreement {same_top:.4f}")
    assert error < atol
    assert same_top >= agreement


def test_sdpa_and_eager_agree(mid_checkpoint):
    sdpa = _load(mid_checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    eager = _load(mid_checkpoint, dtype=torch.float32, attn_implementation="eager")
    assert sdpa.generator.config._attn_implementation == "sdpa"
    assert eager.generator.config._attn_implementation == "eager"
    torch.testing.assert_close(
        _marginalized(sdpa, sdpa.config), _marginalized(eager, eager.config), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("head", [RagTokenForGeneration, RagSequenceForGeneration])
def test_bf16_generate_with_cpu_contexts(mid_checkpoint, head):
    model = _load(mid_checkpoint, head, dtype=torch.bfloat16)
    inputs = random_contexts(model.config, batch_size=2, length=32)  # on the CPU: moved by ragkit
    generated = model.generate(**inputs, num_beams=2, max_length=8)
    assert generated.device.type == CUDA and generated.shape[0] == 2


@needs_flash_attn
def test_flash_attention_2_on_the_generator(mid_checkpoint, caplog):
    sdpa = _load(mid_checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa")
    reference = _marginalized(sdpa, sdpa.config)
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        model = _load(mid_checkpoint, dtype=torch.bfloat16, attn_implementation="flash_attention_2")
    assert model.generator.config._attn_implementation == "flash_attention_2"
    assert model.question_encoder.config._attn_implementation == "sdpa"  # DPR has no flash-attention
    assert "DPRQuestionEncoder" in caplog.text
    assert (_marginalized(model, model.config) - reference).abs().max() < TOLERANCES[torch.bfloat16][0]


def _padded_contexts(config, batch_size: int, length: int, seed: int = 0) -> dict:
    """:func:`random_contexts` on CUDA with each row right-padded after 50-100% of ``length``."""
    inputs = random_contexts(config, batch_size=batch_size, length=length, seed=seed, device=CUDA)
    rows = inputs["context_input_ids"].shape[0]
    fills = torch.randint(length // 2, length + 1, (rows,), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length).unsqueeze(0) < fills.unsqueeze(1)).long().to(CUDA)
    inputs["context_input_ids"] = inputs["context_input_ids"].masked_fill(
        mask == 0, config.generator.pad_token_id
    )
    inputs["context_attention_mask"] = mask
    return inputs


@needs_flash_attn_4
def test_flash_attention_4_on_the_generator(mid_checkpoint, caplog):
    """flash-attn-4 (CuTe DSL kernels, compiled at first use) against sdpa, on padded contexts (varlen path)."""
    sdpa = _load(mid_checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa")
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        model = _load(mid_checkpoint, dtype=torch.bfloat16, attn_implementation="flash_attention_4")
    assert model.generator.config._attn_implementation == "flash_attention_4"
    assert model.question_encoder.config._attn_implementation == "sdpa"  # DPR has no flash-attention
    assert "DPRQuestionEncoder" in caplog.text

    # Full contexts (flash_attn_func), then padded ones (flash_attn_varlen_func after unpadding).
    reference = _marginalized(sdpa, sdpa.config)
    assert (_marginalized(model, model.config) - reference).abs().max() < TOLERANCES[torch.bfloat16][0]
    inputs = _padded_contexts(model.config, batch_size=4, length=64, seed=1)
    targets = torch.randint(
        4, model.config.generator.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1)
    )
    targets[:, 0] = model.config.generator.decoder_start_token_id
    with torch.no_grad():
        flash, exact = (
            m(**inputs, decoder_input_ids=targets.to(CUDA), do_marginalize=True).logits for m in (model, sdpa)
        )
    tolerance, same_top = TOLERANCES[torch.bfloat16]
    assert (flash - exact).abs().max() < tolerance
    assert (flash.argmax(-1) == exact.argmax(-1)).float().mean() >= same_top

    # Generation (the decoder's cached steps: one query row against the cache) for both heads.
    for head in (RagTokenForGeneration, RagSequenceForGeneration):
        sequences = {}
        for name, implementation in (("flash", "flash_attention_4"), ("sdpa", "sdpa")):
            loaded = _load(mid_checkpoint, head, dtype=torch.bfloat16, attn_implementation=implementation)
            sequences[name] = loaded.generate(**inputs, num_beams=2, max_length=10)
        assert sequences["flash"].shape[0] == 4 and sequences["flash"].device.type == CUDA
        width = min(sequences["flash"].shape[1], sequences["sdpa"].shape[1])
        same_rows = (sequences["flash"][:, :width] == sequences["sdpa"][:, :width]).all(dim=1).float().mean()
        # bf16 kernels round differently, so a near tie may go the other way and the row diverges after it.
        print(
            f"{head.__name__}: flash_attention_4 and sdpa generate the same sequence for {same_rows:.0%} of rows"
        )
        assert same_rows >= 0.5


# --------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head", [RagTokenForGeneration, RagSequenceForGeneration])
def test_quantized_loads_and_generates(mid_checkpoint, bits, head):
    if bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        quantized_kind = "Linear4bit"
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
        quantized_kind = "Linear8bitLt"
    model = head.from_pretrained(mid_checkpoint, quantization_config=quantization, device_map="auto").eval()
    assert quantized_kind in _linear_kinds(model.generator)
    assert _linear_kinds(model.question_encoder) == {"Linear"}  # generator only by default
    assert type(model.generator.get_output_embeddings()).__name__ == "Linear"  # LM head kept
    inputs = random_contexts(model.config, batch_size=2, length=32)
    generated = model.generate(**inputs, num_beams=2, max_length=8)
    assert generated.shape[0] == 2


@needs_bitsandbytes
def test_quantize_question_encoder_when_asked(mid_checkpoint):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = RagTokenForGeneration.from_pretrained(
        mid_checkpoint, quantization_config=quantization, device_map="auto", quantize_question_encoder=True
    )
    assert "Linear4bit" in _linear_kinds(model.question_encoder)


@needs_bitsandbytes
def test_4bit_peak_memory_below_bf16(base_checkpoint):
    """Weights and generate-time peak, bf16 vs 4-bit (nf4, compute bf16), bert-base + BART-base shapes.

    Only the generator's linear layers are quantized (embeddings, LM head and question encoder stay bf16),
    so the weights shrink by about 1.5 bytes per such parameter, not to a quarter.
    """
    results = {}
    linear_parameters = 0
    for name, kwargs in (
        ("bf16", dict(dtype=torch.bfloat16, device_map=CUDA)),
        (
            "4bit",
            dict(
                quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
                ),
                device_map="auto",
            ),
        ),
    ):
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        model = RagTokenForGeneration.from_pretrained(base_checkpoint, **kwargs).eval()
        weights = torch.cuda.memory_allocated() - start
        if name == "bf16":
            head = model.generator.get_output_embeddings()
            linear_parameters = sum(
                module.weight.numel()
                for module in model.generator.modules()
                if isinstance(module, nn.Linear) and module is not head
            )
        inputs = random_contexts(model.config, batch_size=2, length=64, device=CUDA)
        torch.cuda.reset_peak_memory_stats()
        model.generate(**inputs, num_beams=2, max_length=10)
        peak = torch.cuda.max_memory_allocated() - start
        results[name] = (weights, peak)
        del model, inputs
    gib = 2**30
    print({name: (round(w / gib, 3), round(p / gib, 3)) for name, (w, p) in results.items()})
    expected_saving = 1.5 * linear_parameters  # bytes: bf16 (2) -> nf4 (0.5 plus small per-block constants)
    assert results["bf16"][0] - results["4bit"][0] > 0.8 * expected_saving
    assert results["4bit"][1] < results["bf16"][1]


# --------------------------------------------------------------------------------------------------
# Model on CUDA, index on the CPU (faiss-cpu), inputs anywhere
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A tiny checkpoint over a miniature wiki_dpr mirror (needs faiss and datasets: carried wheels)."""
    pytest.importorskip("faiss")
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("gpu_hub")
    mirror = write_tiny_wiki_dpr_mirror(root / "wiki_dpr")
    return write_tiny_rag_checkpoint(
        root / "token", RagTokenForGeneration, dataset=str(mirror), index_name="exact", use_dummy_dataset=True
    )


@pytest.mark.parametrize("head", [RagTokenForGeneration, RagSequenceForGeneration])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_model_cpu_index_cpu_inputs(tiny_hub, head, dtype):
    retriever = RagRetriever.from_pretrained(tiny_hub)
    tokenizer = RagTokenizer.from_pretrained(tiny_hub)
    model = head.from_pretrained(tiny_hub, retriever=retriever, dtype=dtype).to(CUDA).eval()
    questions = tokenizer.question_encoder(["How many people live in Paris?"], return_tensors="pt")
    labels = tokenizer.generator(["about 2 million"], return_tensors="pt").input_ids
    with torch.no_grad():  # questions and labels stay on the CPU: ragkit moves them
        outputs = model(
            input_ids=questions["input_ids"], attention_mask=questions["attention_mask"], labels=labels
        )
    assert outputs.doc_scores.device.type == CUDA and outputs.doc_scores.dtype == torch.float32
    assert outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss).all()
    generated = model.generate(input_ids=questions["input_ids"], num_beams=2, max_length=8)
    assert generated.device.type == CUDA and generated.shape[0] == 1


def test_device_map_auto_without_quantization(mid_checkpoint):
    model = RagTokenForGeneration.from_pretrained(mid_checkpoint, dtype=torch.bfloat16, device_map="auto")
    assert next(model.generator.parameters()).device.type == CUDA
    generated = model.generate(
        **random_contexts(model.config, batch_size=2, length=32), num_beams=2, max_length=8
    )
    assert generated.shape[0] == 2


# --------------------------------------------------------------------------------------------------
# RAG-Sequence decoding on CUDA: per-context cross-attention, bounded scoring
# --------------------------------------------------------------------------------------------------


def _sequence_inputs(model, seed: int = 0) -> dict:
    """Padded random contexts on the GPU for 4 questions."""
    inputs = random_contexts(model.config, batch_size=4, length=48, seed=seed, device=CUDA)
    inputs["context_attention_mask"][1::3, -7:] = 0  # some padding
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shared_cross_attention_beam_search_on_cuda(mid_checkpoint, dtype):
    # Beams attending to their context's keys/values together (one query sequence per context) decode as
    # the generator's own beam search: identically in float32; in bf16 sdpa may pick other kernels for
    # the longer query sequence, so near ties may differ (agreement printed and bounded).
    from ragkit.generation.calls import decoding_call
    from ragkit.generation.search import beam_shared_cross_attention

    model = _load(mid_checkpoint, RagSequenceForGeneration, dtype=dtype)
    generator = model.generator
    inputs = _sequence_inputs(model)
    ids, mask = inputs["context_input_ids"], inputs["context_attention_mask"]
    decode = dict(attention_mask=mask, num_beams=4, num_return_sequences=4, max_length=16)
    with torch.no_grad():
        states = generator.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = generator.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states.clone()), **decode
        )
        with decoding_call():
            shared = beam_shared_cross_attention(generator, states, mask, num_beams=4)
            assert shared.decoder_layers is not None
            with shared.installed():
                got = generator.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states.clone()),
                    cache=shared.cache,
                    **decode,
                )
    width = max(got.shape[1], plain.shape[1])  # rows ending earlier are padded by generate
    pad = generator.config.pad_token_id
    got, plain = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad) for x in (got, plain))
    same = (got == plain).all(dim=1).float().mean().item()
    print(f"{dtype}: {same:.3f} of beam-search rows identical with per-context cross-attention")
    if dtype == torch.float32:
        assert torch.equal(got, plain)
    else:
        assert same >= 0.9


def test_bounded_scoring_on_cuda_returns_the_exhaustive_output(mid_checkpoint):
    # float32 on CUDA (rows path): bounds from 64 vocabulary ids leave work to the projection rounds.
    from ragkit.generation import DecodingOptions, fast_path_allowed

    model = _load(mid_checkpoint, RagSequenceForGeneration, dtype=torch.float32)
    kwargs = dict(**_sequence_inputs(model, seed=1), num_beams=4, num_return_sequences=2, max_length=16)
    options = DecodingOptions(probe_tokens=64)
    assert fast_path_allowed(model.generator, options)  # the capability probe passes on CUDA
    pruned = model.generate(**kwargs, decoding_options=options)
    exhaustive = model.generate(**kwargs, decoding_options=options.replace(prune_scoring=False))
    assert torch.equal(pruned, exhaustive)
    assert torch.equal(pruned, model.generate(**kwargs, decoding_options=DecodingOptions(fast_path=False)))
