"""CUDA paths checked on the CPU: attention per part, dtypes, bitsandbytes skip lists, errors, device moves.

Nothing here needs a GPU: CUDA, flash-attn and bitsandbytes are replaced by monkeypatched probes where a
check depends on them, and transformers' loader is replaced by a spy where only the arguments ragkit hands
it matter. tests/gpu/ runs the same paths for real on a CUDA machine.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, DPRQuestionEncoder, PreTrainedModel
from transformers.quantizers.quantizers_utils import should_convert_module

import ragkit._accelerators as acc
import ragkit.modeling_rag as modeling
from ragkit import RagModel, RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer
from ragkit._accelerators import (
    AcceleratorUnavailableError,
    check_bitsandbytes,
    check_flash_attention,
    module_device,
    quantization_config_for_rag,
    resolve_attn_implementation,
    to_device,
)
from ragkit.testing import tiny_rag_config, write_tiny_rag_checkpoint, write_tiny_wiki_dpr_mirror

QUESTIONS = ["How many people live in Paris?", "Which river flows through London?"]
ANSWERS = ["about 2 million", "the Thames"]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints (BART and T5 generators) over a miniature wiki_dpr mirror, and that mirror."""
    root = tmp_path_factory.mktemp("accel")
    mirror = write_tiny_wiki_dpr_mirror(root / "wiki_dpr")
    fields = dict(dataset=str(mirror), index_name="exact", use_dummy_dataset=True)
    return {
        "token": write_tiny_rag_checkpoint(root / "token", RagTokenForGeneration, seed=1, **fields),
        "sequence": write_tiny_rag_checkpoint(root / "sequence", RagSequenceForGeneration, seed=2, **fields),
        "t5": write_tiny_rag_checkpoint(root / "t5", RagTokenForGeneration, generator="t5", seed=3, **fields),
    }


@pytest.fixture(scope="module")
def tokenizer(checkpoints):
    """The checkpoints' RagTokenizer."""
    return RagTokenizer.from_pretrained(checkpoints["token"])


@pytest.fixture(scope="module")
def retriever(checkpoints):
    """A ragkit RagRetriever over the mirror's exact index."""
    return RagRetriever.from_pretrained(checkpoints["token"])


@pytest.fixture
def cuda_env(monkeypatch):
    """Pretend a Hopper GPU with flash-attn and bitsandbytes installed (only the probes ragkit asks)."""
    monkeypatch.setattr(acc, "_cuda_available", lambda: True)
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(acc, "_package_available", lambda name: name in ("flash_attn", "bitsandbytes"))
    monkeypatch.setattr(acc, "_bitsandbytes_devices", lambda: {"cuda"})
    _installed_flash_distributions(monkeypatch, "flash-attn")


def _installed_flash_distributions(monkeypatch, *distributions: str) -> None:
    """Pretend ``distributions`` (``flash-attn``, ``flash-attn-4``) are what provide the ``flash_attn`` module."""
    monkeypatch.setattr(
        acc, "_module_distributions", lambda module: list(distributions) if module == "flash_attn" else []
    )


class _SpyLoader:
    """Stands in for transformers' ``PreTrainedModel.from_pretrained`` and keeps the kwargs it was given."""

    def __init__(self):
        self.kwargs: dict = {}

    def __call__(self, cls, path, *args, **kwargs):
        self.kwargs = kwargs
        model = cls(modeling.RagConfig.from_pretrained(path))
        if kwargs.get("output_loading_info"):
            # As the real loader: ragkit asks for the report to refuse checkpoints with missing weights.
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model


@pytest.fixture
def spy_loader(monkeypatch):
    """Replace transformers' loader under RagPreTrainedModel.from_pretrained with a :class:`_SpyLoader`."""
    spy = _SpyLoader()
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy.__call__))
    return spy


# --------------------------------------------------------------------------------------------------
# 1. attn_implementation reaches both parts; unsupported choices fall back unless named per part
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attn_implementation_string_reaches_both_parts(checkpoints, implementation):
    model = RagTokenForGeneration.from_pretrained(checkpoints["token"], attn_implementation=implementation)
    assert model.question_encoder.config._attn_implementation == implementation
    assert model.generator.config._attn_implementation == implementation


def test_attn_implementation_dict_per_part_and_default(checkpoints):
    model = RagTokenForGeneration.from_pretrained(
        checkpoints["token"], attn_implementation={"question_encoder": "eager", "": "sdpa"}
    )
    assert model.question_encoder.config._attn_implementation == "eager"
    # "" is the default for the parts the dict does not name.
    assert model.generator.config._attn_implementation == "sdpa"


def test_flash_attention_falls_back_on_the_question_encoder_only(cuda_env, caplog):
    config = tiny_rag_config("bart")
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        resolved = resolve_attn_implementation("flash_attention_2", config, RagTokenForGeneration)
    assert resolved == {
        "question_encoder": "sdpa",
        "generator": "flash_attention_2",
        "": "flash_attention_2",
    }
    assert "DPRQuestionEncoder" in caplog.text and "'sdpa' instead" in caplog.text


def test_flash_attention_named_for_a_part_that_lacks_it_is_an_error(cuda_env):
    with pytest.raises(ValueError, match=r"question encoder \(DPRQuestionEncoder\) does not support"):
        resolve_attn_implementation(
            {"question_encoder": "flash_attention_2"}, tiny_rag_config("bart"), RagTokenForGeneration
        )


def test_flash_attention_with_t5_falls_back_everywhere_and_loads_without_cuda(checkpoints, caplog):
    # Neither DPR nor T5 has flash-attention: the whole load falls back instead of failing (no CUDA needed).
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        model = RagTokenForGeneration.from_pretrained(
            checkpoints["t5"], attn_implementation="flash_attention_2"
        )
    assert model.question_encoder.config._attn_implementation == "sdpa"
    assert model.generator.config._attn_implementation == "sdpa"
    assert "T5ForConditionalGeneration" in caplog.text


def test_unsupported_sdpa_falls_back_to_eager_unless_named(checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(DPRQuestionEncoder, "_supports_sdpa", False)
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        model = RagTokenForGeneration.from_pretrained(checkpoints["token"], attn_implementation="sdpa")
    assert model.question_encoder.config._attn_implementation == "eager"
    assert model.generator.config._attn_implementation == "sdpa"
    assert "'eager' instead" in caplog.text
    with pytest.raises(ValueError, match="supports eager"):
        RagTokenForGeneration.from_pretrained(
            checkpoints["token"], attn_implementation={"question_encoder": "sdpa"}
        )


def test_attn_implementation_dict_with_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown key"):
        resolve_attn_implementation({"encoder": "sdpa"}, tiny_rag_config("bart"))


def test_flex_attention_leaves_the_rag_wrapper_on_a_supported_choice(checkpoints):
    model = RagTokenForGeneration.from_pretrained(checkpoints["token"], attn_implementation="flex_attention")
    assert model.generator.config._attn_implementation == "flex_attention"
    assert model.question_encoder.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------
# 5. Missing CUDA / flash-attn / bitsandbytes: ragkit's error, before transformers'
# --------------------------------------------------------------------------------------------------


def test_flash_attention_without_cuda_names_the_extra(checkpoints, monkeypatch):
    monkeypatch.setattr(acc, "_cuda_available", lambda: False)
    with pytest.raises(AcceleratorUnavailableError, match=r"needs a CUDA GPU.*ragkit-torch\[cuda\].*sdpa"):
        RagSequenceForGeneration.from_pretrained(
            checkpoints["token"], attn_implementation="flash_attention_2"
        )


def test_flash_attention_without_the_package_names_the_extra(cuda_env, monkeypatch):
    monkeypatch.setattr(acc, "_package_available", lambda name: False)
    with pytest.raises(AcceleratorUnavailableError, match=r"flash-attn package.*ragkit-torch\[cuda\]"):
        check_flash_attention("flash_attention_2")


def test_flash_attention_on_an_old_gpu_suggests_sdpa(cuda_env, monkeypatch):
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (7, 5))
    with pytest.raises(AcceleratorUnavailableError, match=r"compute capability 8\.0.*7\.5.*sdpa"):
        check_flash_attention("flash_attention_2")


def test_flash_attention_with_the_kernels_package_is_left_to_transformers(cuda_env, monkeypatch):
    monkeypatch.setattr(acc, "_package_available", lambda name: name == "kernels")
    check_flash_attention("flash_attention_2")  # no error: transformers loads a Hub kernel
    check_flash_attention("flash_attention_4")


# flash-attention 4 (the flash-attn-4 distribution's ``flash_attn.cute``; Hopper or newer)


def test_flash_attention_4_on_the_generator_and_sdpa_on_dpr(cuda_env, monkeypatch, caplog):
    _installed_flash_distributions(monkeypatch, "flash-attn-4")
    with caplog.at_level(logging.WARNING, logger="ragkit._accelerators"):
        resolved = resolve_attn_implementation(
            "flash_attention_4", tiny_rag_config("bart"), RagTokenForGeneration
        )
    assert resolved == {"question_encoder": "sdpa", "generator": "flash_attention_4", "": "flash_attention_4"}
    assert "DPRQuestionEncoder" in caplog.text


def test_flash_attention_4_without_cuda_names_its_package(checkpoints, monkeypatch):
    monkeypatch.setattr(acc, "_cuda_available", lambda: False)
    with pytest.raises(
        AcceleratorUnavailableError, match=r"needs a CUDA GPU.*pip install --pre flash-attn-4.*sdpa"
    ) as error:
        RagSequenceForGeneration.from_pretrained(
            checkpoints["token"], attn_implementation="flash_attention_4"
        )
    # The cuda extra installs flash-attn 2, which does not provide flash_attention_4.
    assert "ragkit-torch[cuda]" not in str(error.value)


def test_flash_attention_4_needs_hopper(cuda_env, monkeypatch):
    _installed_flash_distributions(monkeypatch, "flash-attn-4")
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (8, 0))
    with pytest.raises(AcceleratorUnavailableError, match=r"compute capability 9\.0.*8\.0.*sdpa"):
        check_flash_attention("flash_attention_4")
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (10, 0))
    check_flash_attention("flash_attention_4")  # Blackwell is newer: no error


@pytest.mark.parametrize(
    ("asked", "installed", "missing"),
    [
        ("flash_attention_4", "flash-attn", "flash-attn-4"),
        ("flash_attention_2", "flash-attn-4", "flash-attn"),
    ],
)
def test_flash_attn_module_of_the_other_version_does_not_count(
    cuda_env, monkeypatch, asked, installed, missing
):
    # Both distributions install the module flash_attn; transformers accepts only the one it asked for.
    _installed_flash_distributions(monkeypatch, installed)
    with pytest.raises(
        AcceleratorUnavailableError, match=rf"needs the {missing} package, which is not installed"
    ):
        check_flash_attention(asked)
    _installed_flash_distributions(monkeypatch, installed, missing)
    check_flash_attention(asked)


def test_module_distributions_reads_the_installed_metadata():
    # A distribution whose name differs from its module in "-"/"_" (typing-extensions -> typing_extensions).
    assert acc._module_distributions("typing_extensions") == ["typing-extensions"]
    assert acc._module_distributions("no_such_module_anywhere") == []


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_missing_names_the_extra(checkpoints, monkeypatch, bits):
    monkeypatch.setattr(acc, "_package_available", lambda name: False)
    bnb = BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    with pytest.raises(
        AcceleratorUnavailableError, match=rf"{bits}-bit.*bitsandbytes package.*ragkit-torch\[cuda\]"
    ):
        RagSequenceForGeneration.from_pretrained(
            checkpoints["token"], quantization_config=bnb, device_map="auto"
        )


def test_bitsandbytes_without_cuda_names_the_gpu(monkeypatch):
    monkeypatch.setattr(acc, "_package_available", lambda name: True)
    monkeypatch.setattr(acc, "_cuda_available", lambda: False)
    monkeypatch.setattr(acc, "_bitsandbytes_devices", lambda: {"cuda"})
    with pytest.raises(AcceleratorUnavailableError, match=r"needs a CUDA GPU.*ragkit-torch\[cuda\]"):
        check_bitsandbytes({"quant_method": "bitsandbytes", "load_in_4bit": True})
    # A bitsandbytes build with CPU support is left to transformers.
    monkeypatch.setattr(acc, "_bitsandbytes_devices", lambda: {"cuda", "cpu"})
    check_bitsandbytes({"quant_method": "bitsandbytes", "load_in_4bit": True})


def test_checkpoint_saved_quantized_without_bitsandbytes(checkpoints, tmp_path, monkeypatch):
    directory = write_tiny_rag_checkpoint(tmp_path / "quantized", RagTokenForGeneration)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (directory / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(acc, "_package_available", lambda name: False)
    with pytest.raises(AcceleratorUnavailableError, match=r"ragkit-torch\[cuda\]"):
        RagTokenForGeneration.from_pretrained(directory)


def test_quantize_question_encoder_without_quantization_is_an_error(checkpoints):
    with pytest.raises(ValueError, match="quantize_question_encoder"):
        RagTokenForGeneration.from_pretrained(checkpoints["token"], quantize_question_encoder=True)


# --------------------------------------------------------------------------------------------------
# 3. bitsandbytes quantizes the generator only, unless asked
# --------------------------------------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@pytest.mark.parametrize("model_class", [RagTokenForGeneration, RagSequenceForGeneration, RagModel])
def test_skip_list_keeps_the_question_encoder_and_transformers_defaults(model_class):
    config = tiny_rag_config("bart")
    user_config = BitsAndBytesConfig(load_in_4bit=True)
    quantization = quantization_config_for_rag(
        user_config, model_class, config, quantize_question_encoder=False
    )
    assert user_config.llm_int8_skip_modules is None  # the user's object is not modified
    skip = quantization.llm_int8_skip_modules
    with torch.device("meta"):
        model = model_class(config)
    converted = {name for name in _linear_names(model) if should_convert_module(name, skip)}
    question_encoder = [name for name in _linear_names(model) if "question_encoder" in name]
    generator = [name for name in _linear_names(model) if "generator" in name and "lm_head" not in name]
    assert question_encoder and not converted & set(question_encoder)
    assert generator and set(generator) <= converted
    assert not any(name.endswith("lm_head") for name in converted)  # transformers' default skip kept


def test_quantize_question_encoder_true_leaves_the_config_alone():
    user_config = BitsAndBytesConfig(load_in_8bit=True)
    assert (
        quantization_config_for_rag(user_config, RagTokenForGeneration, tiny_rag_config("bart"), True)
        is user_config
    )


def test_user_skip_list_is_extended_not_replaced():
    user_config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["fc1"])
    quantization = quantization_config_for_rag(user_config, RagModel, tiny_rag_config("bart"), False)
    assert quantization.llm_int8_skip_modules == ["fc1", "question_encoder"]


@pytest.mark.parametrize("flash", ["flash_attention_2", "flash_attention_4"])
def test_from_pretrained_hands_transformers_the_adapted_options(
    checkpoints, cuda_env, spy_loader, flash, monkeypatch
):
    _installed_flash_distributions(monkeypatch, "flash-attn", "flash-attn-4")
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    RagTokenForGeneration.from_pretrained(
        checkpoints["token"],
        quantization_config=bnb,
        device_map="auto",
        attn_implementation=flash,
    )
    kwargs = spy_loader.kwargs
    assert "quantize_question_encoder" not in kwargs
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
    assert "rag.question_encoder" in kwargs["quantization_config"].llm_int8_skip_modules
    assert kwargs["attn_implementation"]["question_encoder"] == "sdpa"
    assert kwargs["attn_implementation"]["generator"] == flash
    assert kwargs["device_map"] == "auto"

    RagTokenForGeneration.from_pretrained(
        checkpoints["token"], quantization_config=bnb, quantize_question_encoder=True
    )
    assert spy_loader.kwargs["quantization_config"] == bnb


def test_4bit_without_dtype_keeps_unquantized_modules_in_the_compute_dtype(checkpoints, cuda_env, spy_loader):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    RagTokenForGeneration.from_pretrained(checkpoints["token"], quantization_config=bnb, device_map="auto")
    assert spy_loader.kwargs["dtype"] == torch.bfloat16
    RagTokenForGeneration.from_pretrained(checkpoints["token"], quantization_config=bnb, dtype=torch.float32)
    assert spy_loader.kwargs["dtype"] == torch.float32  # the user's choice stands
    RagTokenForGeneration.from_pretrained(
        checkpoints["token"], quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert "dtype" not in spy_loader.kwargs


# --------------------------------------------------------------------------------------------------
# 2. dtypes: the pipeline runs in the model's dtype, doc scores and marginalization in float32
# --------------------------------------------------------------------------------------------------


def _questions(tokenizer) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of :data:`QUESTIONS` (no token_type_ids: generate refuses them)."""
    encoded = tokenizer.question_encoder(QUESTIONS, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class _RecordingRetriever:
    """Delegates to a RagRetriever and records what the model handed it."""

    def __init__(self, inner):
        self.inner = inner
        self.question_vectors = []

    def __call__(self, question_input_ids, question_hidden_states, **kwargs):
        self.question_vectors.append(question_hidden_states)
        return self.inner(question_input_ids, question_hidden_states, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_is_close_to_float32(checkpoints, retriever, tokenizer, dtype):
    questions = _questions(tokenizer)
    labels = tokenizer.generator(ANSWERS, return_tensors="pt", padding=True).input_ids
    outputs = {}
    for run_dtype in (torch.float32, dtype):
        spy = _RecordingRetriever(retriever)
        model = RagTokenForGeneration.from_pretrained(checkpoints["token"], retriever=spy, dtype=run_dtype)
        assert {p.dtype for p in model.parameters()} == {run_dtype}
        with torch.no_grad():
            outputs[run_dtype] = model(**questions, labels=labels, do_marginalize=True)
            generated = model.generate(**questions, num_beams=2, max_length=6)
        assert generated.shape[0] == len(QUESTIONS)
        vectors = spy.question_vectors[0]
        assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32
    half, full = outputs[dtype], outputs[torch.float32]
    assert half.doc_scores.dtype == half.logits.dtype == half.loss.dtype == torch.float32
    # Tolerances (tiny random model): log-probs within 0.02, doc scores within 0.1 of ~13, loss within 1e-2 rel.
    assert (half.logits - full.logits).abs().max() < 0.02
    assert (half.doc_scores - full.doc_scores).abs().max() < 0.1
    torch.testing.assert_close(half.loss, full.loss, rtol=1e-2, atol=0.0)


def test_half_precision_rag_sequence_generates(checkpoints, retriever, tokenizer):
    questions = _questions(tokenizer)
    model = RagSequenceForGeneration.from_pretrained(
        checkpoints["sequence"], retriever=retriever, dtype=torch.bfloat16
    )
    with torch.no_grad():
        outputs = model(
            **questions, labels=tokenizer.generator(ANSWERS, return_tensors="pt", padding=True).input_ids
        )
        generated = model.generate(**questions, num_beams=2, max_length=6)
    assert outputs.logits.dtype == torch.bfloat16
    assert outputs.doc_scores.dtype == outputs.loss.dtype == torch.float32
    assert torch.isfinite(outputs.loss).all()
    assert generated.shape[0] == len(QUESTIONS)


def test_dtype_auto_follows_the_checkpoint(checkpoints, tmp_path):
    RagTokenForGeneration.from_pretrained(checkpoints["token"], dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    model = RagTokenForGeneration.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert model.question_encoder.dtype == model.generator.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# 4. Devices: every input goes to the device of the part that reads it
# --------------------------------------------------------------------------------------------------


QUESTION_DEVICE = torch.device("cpu")
# Another name for the CPU: moving to it is real (.to runs) but the recorded target tells the parts apart.
GENERATOR_DEVICE = torch.device("cpu", 0)


@pytest.fixture
def device_spy(monkeypatch):
    """Pretend the generator lives on another device; record every (input name, target device) move."""
    moves: list[tuple[str, torch.device]] = []
    real_to_device = modeling.to_device

    def fake_module_device(module):
        return GENERATOR_DEVICE if "Bart" in type(module).__name__ else QUESTION_DEVICE

    def spy(tensor, device, name):
        if tensor is not None:
            moves.append((name, device))
        return real_to_device(tensor, device, name)

    # Every module that places inputs imports the two helpers by name: spy on each copy.
    import ragkit.generation.contexts
    import ragkit.generation.rag_token

    for module in (modeling, ragkit.generation.contexts, ragkit.generation.rag_token):
        if hasattr(module, "module_device"):
            monkeypatch.setattr(module, "module_device", fake_module_device)
        if hasattr(module, "to_device"):
            monkeypatch.setattr(module, "to_device", spy)
    return moves


def test_retrieval_inputs_go_to_their_parts(checkpoints, retriever, tokenizer, device_spy):
    model = RagTokenForGeneration.from_pretrained(checkpoints["token"], retriever=retriever)
    questions = _questions(tokenizer)
    labels = tokenizer.generator(ANSWERS, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        model(**questions, labels=labels)
    moves = set(device_spy)
    assert {("input_ids", QUESTION_DEVICE), ("attention_mask", QUESTION_DEVICE)} <= moves
    for name in ("context_input_ids", "context_attention_mask", "decoder_input_ids", "doc_scores"):
        assert (name, GENERATOR_DEVICE) in moves, name
    assert not {name for name, device in moves if device == GENERATOR_DEVICE} & {
        "input_ids",
        "attention_mask",
    }


@pytest.mark.parametrize("head", ["token", "sequence"])
def test_given_contexts_go_to_the_generator_in_generate(checkpoints, retriever, tokenizer, device_spy, head):
    model_class = RagTokenForGeneration if head == "token" else RagSequenceForGeneration
    model = model_class.from_pretrained(checkpoints[head])
    questions = _questions(tokenizer)
    vectors = np.random.RandomState(0).randn(len(QUESTIONS), 32).astype("float32")
    docs = retriever(questions["input_ids"], vectors, return_tensors="pt")
    doc_scores = torch.bmm(torch.from_numpy(vectors)[:, None], docs["retrieved_doc_embeds"].transpose(1, 2))[
        :, 0
    ]
    model.generate(
        context_input_ids=docs["context_input_ids"],
        context_attention_mask=docs["context_attention_mask"],
        doc_scores=doc_scores,
        num_beams=2,
        max_length=6,
    )
    targets: dict[str, torch.device] = {}
    for name, device in device_spy:  # the first move of each (later ones follow the logits' device)
        if name.startswith(("context", "doc_scores")):
            targets.setdefault(name, device)
    assert targets == {
        "context_input_ids": GENERATOR_DEVICE,
        "context_attention_mask": GENERATOR_DEVICE,
        "doc_scores": GENERATOR_DEVICE,
    }


def test_meta_tensors_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"`doc_scores` is on the meta device"):
        to_device(torch.empty(2, 3, device="meta"), torch.device("cpu"), "doc_scores")


def test_module_device_prefers_accelerate_execution_device():
    module = nn.Linear(2, 2)
    assert module_device(module) == torch.device("cpu")

    class _Hook:
        execution_device = "meta"

    module._hf_hook = _Hook()
    assert module_device(module) == torch.device("meta")


def test_module_device_skips_offloaded_embeddings():
    class _Offloaded(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, 2, device="meta")
            self.proj = nn.Linear(2, 2)

        def get_input_embeddings(self):
            return self.embed

    assert module_device(_Offloaded()) == torch.device("cpu")


def test_flash_attention_3_needs_no_more_than_transformers_does(cuda_env, monkeypatch):
    # transformers accepts flash_attention_3 from compute capability 8.0 (Ampere); ragkit must not refuse an A100.
    monkeypatch.setattr(acc, "_package_available", lambda name: name == "flash_attn_interface")
    monkeypatch.setattr(acc, "_module_distributions", lambda module: ["flash-attn-3"])
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (8, 0))
    acc.check_flash_attention("flash_attention_3")
    monkeypatch.setattr(acc, "_cuda_capability", lambda: (7, 5))
    with pytest.raises(AcceleratorUnavailableError, match=r"compute capability 8\.0.*7\.5"):
        acc.check_flash_attention("flash_attention_3")


def test_install_hints_install_from_a_clone_of_the_repository():
    # ragkit-torch is not on PyPI: the hints install the extra from a clone, or name the package itself.
    from pathlib import Path

    assert acc.CUDA_EXTRA_HINT.startswith("pip install -e '.[cuda]' in a clone of the ragkit repository")
    pypi_install = re.compile(r"pip install\s+(-\S+\s+)*['\"]?ragkit-torch")
    src = Path(acc.__file__).parent
    found = [
        f"{path.relative_to(src)}:{n}"
        for path in (src / "_accelerators.py", src / "distributed" / "ray_service.py")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pypi_install.search(line)
    ]
    assert not found, found
