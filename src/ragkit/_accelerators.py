"""CUDA paths of the RAG models: environment checks, attention per part, 4/8-bit skip lists, device moves.

Everything here runs before (or around) ``transformers``' own loading code, so that a request that
cannot work says what is missing and how to install it (``pip install -e '.[cuda]'`` in a clone) instead of
failing deep inside transformers or inside a CUDA kernel. See ``docs/gpu.md``.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, MODEL_MAPPING

from .errors import AcceleratorUnavailableError, RagInputError

logger = logging.getLogger(__name__)

__all__ = [
    "CUDA_EXTRA_HINT",
    "RAG_PARTS",
    "AcceleratorUnavailableError",
    "check_bitsandbytes",
    "check_flash_attention",
    "default_dtype_for_quantization",
    "is_bitsandbytes_config",
    "module_device",
    "part_model_class",
    "quantization_config_for_rag",
    "resolve_attn_implementation",
    "supports_attn_implementation",
    "to_device",
]

#: What every "missing CUDA piece" message tells the user to run. ragkit-torch is installed from a clone of
#: its repository (it is not on PyPI), so the extra is installed there.
CUDA_EXTRA_HINT = (
    "pip install -e '.[cuda]' in a clone of the ragkit repository (the ragkit-torch[cuda] extra)"
)
#: The sub-models of a RAG model, as named in ``RagConfig`` and in a per-part ``attn_implementation`` dict.
RAG_PARTS = ("question_encoder", "generator")
#: Keys a per-part ``attn_implementation`` dict may hold ("" is the RAG wrapper and the default for parts
#: not named).
_ATTN_DICT_KEYS = ("", *RAG_PARTS)
#: Flash-attention implementations transformers knows by name -> (the top-level module transformers imports,
#: the distribution that must provide it). flash-attn (2) and flash-attn-4 both install ``flash_attn``
#: (4 as ``flash_attn.cute``), so transformers, and ragkit, tell them apart by the distribution's name.
_FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
    "flash_attention_4": ("flash_attn", "flash-attn-4"),
}
#: How to install each version, for messages (flash-attn-4 is a pre-release on PyPI, with a CUDA 13 extra).
_FLASH_PIP_NAMES = {
    "flash_attention_2": "flash-attn",
    "flash_attention_3": "flash-attn 3 (flash_attn_interface, built from source)",
    "flash_attention_4": "flash-attn-4 (pip install --pre flash-attn-4, or --pre 'flash-attn-4[cu13]' for CUDA 13)",
}
#: Lowest CUDA compute capability (major) transformers accepts for each flash-attention version (Ampere,
#: Ampere, Hopper); ragkit asks no more than transformers does.
_FLASH_MIN_CAPABILITY = {"flash_attention_2": 8, "flash_attention_3": 8, "flash_attention_4": 9}
#: Used in place of an implementation a part cannot run, first supported wins.
_FALLBACK_ORDER = ("sdpa", "eager")


# --------------------------------------------------------------------------------------------------
# Environment probes (separate functions so tests can replace them)
# --------------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    """Whether PyTorch sees a CUDA device."""
    return torch.cuda.is_available()


def _cuda_capability() -> tuple[int, int]:
    """Compute capability of the current CUDA device."""
    return torch.cuda.get_device_capability()


def _package_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (flash_attn and bitsandbytes load CUDA code)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _distributions_by_module() -> dict[str, list[str]]:
    """Top-level module -> installed distributions, read once (a scan of every installed package)."""
    try:
        return importlib.metadata.packages_distributions()
    except Exception:  # a broken metadata entry must not hide the module: report no distribution
        return {}


def _module_distributions(module: str) -> list[str]:
    """Normalized names (``flash-attn-4``) of the installed distributions that provide top-level ``module``."""
    return [name.replace("_", "-") for name in _distributions_by_module().get(module, [])]


def _bitsandbytes_devices() -> set[str]:
    """Device types the installed bitsandbytes can run on (recent versions also support CPU)."""
    import bitsandbytes

    return set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))


# --------------------------------------------------------------------------------------------------
# Checks that run before transformers' own
# --------------------------------------------------------------------------------------------------


def _flash_package_installed(implementation: str) -> bool:
    """Whether the package of ``implementation`` is installed under the distribution transformers accepts."""
    module, distribution = _FLASH_PACKAGES[implementation]
    return _package_available(module) and distribution in _module_distributions(module)


def check_flash_attention(implementation: str) -> None:
    """Raise :class:`AcceleratorUnavailableError` when ``implementation`` (a flash-attention name) cannot run here.

    Args:
        implementation: ``"flash_attention_2"``, ``"flash_attention_3"`` or ``"flash_attention_4"``; other
            names are not checked.

    Raises:
        AcceleratorUnavailableError: No CUDA device, a device older than the version needs, or the
            package missing (unless the ``kernels`` package is installed: transformers then loads a Hub kernel).
    """
    if implementation not in _FLASH_PACKAGES:
        return
    pip_name = _FLASH_PIP_NAMES[implementation]
    # The cuda extra installs flash-attn (2); for the other versions it would not help.
    install = (
        f"{CUDA_EXTRA_HINT}, or pip install {pip_name}" if implementation == "flash_attention_2" else pip_name
    )
    if not _cuda_available():
        raise AcceleratorUnavailableError(
            f"attn_implementation='{implementation}' needs a CUDA GPU, and PyTorch sees none "
            f"(torch.cuda.is_available() is False). On a CUDA machine: {install}; here, use "
            "attn_implementation='sdpa'."
        )
    major, minor = _cuda_capability()
    needed = _FLASH_MIN_CAPABILITY[implementation]
    if major < needed:
        raise AcceleratorUnavailableError(
            f"attn_implementation='{implementation}' needs a GPU of compute capability {needed}.0 or newer; "
            f"this one is {major}.{minor}. Use attn_implementation='sdpa'."
        )
    if not _flash_package_installed(implementation) and not _package_available("kernels"):
        raise AcceleratorUnavailableError(
            f"attn_implementation='{implementation}' needs the {_FLASH_PACKAGES[implementation][1]} package, which is not "
            f"installed: {install} on this CUDA machine, or use attn_implementation='sdpa'."
        )


def is_bitsandbytes_config(quantization_config: Any) -> bool:
    """Whether ``quantization_config`` (a config object or a dict) asks for bitsandbytes 4-bit or 8-bit."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, BitsAndBytesConfig):
        return True
    if isinstance(quantization_config, Mapping):
        method = quantization_config.get("quant_method")
        return str(method) in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES") or bool(
            quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit")
        )
    return str(getattr(quantization_config, "quant_method", "")) in (
        "bitsandbytes",
        "QuantizationMethod.BITS_AND_BYTES",
    )


def _bits(quantization_config: Any) -> str:
    """'4-bit' or '8-bit', for messages."""
    if isinstance(quantization_config, Mapping):
        return "8-bit" if quantization_config.get("load_in_8bit") else "4-bit"
    return "8-bit" if getattr(quantization_config, "load_in_8bit", False) else "4-bit"


def check_bitsandbytes(quantization_config: Any) -> None:
    """Raise :class:`AcceleratorUnavailableError` when a bitsandbytes ``quantization_config`` cannot run here.

    Args:
        quantization_config: What was passed to ``from_pretrained``; anything but bitsandbytes is not checked.

    Raises:
        AcceleratorUnavailableError: bitsandbytes not installed, or no device it supports (no CUDA and a
            bitsandbytes without CPU support).
    """
    if not is_bitsandbytes_config(quantization_config):
        return
    bits = _bits(quantization_config)
    if not _package_available("bitsandbytes"):
        raise AcceleratorUnavailableError(
            f"{bits} quantization (quantization_config=BitsAndBytesConfig(...)) needs the bitsandbytes package, "
            f"which is not installed: {CUDA_EXTRA_HINT}, or pip install bitsandbytes, on a CUDA machine; or load without "
            "quantization_config (dtype=torch.bfloat16 halves the weights' memory)."
        )
    if _cuda_available():
        return
    if "cpu" not in _bitsandbytes_devices():
        raise AcceleratorUnavailableError(
            f"{bits} quantization with bitsandbytes needs a CUDA GPU, and PyTorch sees none "
            f"(torch.cuda.is_available() is False). On a CUDA machine: {CUDA_EXTRA_HINT}; here, load without "
            "quantization_config."
        )


# --------------------------------------------------------------------------------------------------
# Attention implementation per part
# --------------------------------------------------------------------------------------------------


def part_model_class(config: PretrainedConfig, part: str) -> type | None:
    """The class ``RagModel`` builds for ``part`` from ``config`` (None when transformers has no mapping for it)."""
    sub_config = getattr(config, part)
    mapping = MODEL_MAPPING if part == "question_encoder" else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    try:
        return mapping[type(sub_config)]
    except KeyError:
        return None


def supports_attn_implementation(model_class: type | None, implementation: str) -> bool:
    """Whether ``model_class`` declares support for ``implementation`` (unknown classes/names: assumed yes)."""
    if model_class is None or implementation == "eager":
        return True
    if implementation == "sdpa":
        return bool(getattr(model_class, "_supports_sdpa", False))
    if implementation.startswith("flash_attention") or "flash" in implementation:
        return bool(getattr(model_class, "_supports_flash_attn", False))
    if implementation == "flex_attention":
        return bool(getattr(model_class, "_supports_flex_attn", False))
    # Hub kernels and custom registrations: transformers judges them.
    return True


def _supported_list(model_class: type | None) -> str:
    """Names of the common implementations ``model_class`` supports, for messages."""
    names = ("eager", "sdpa", "flash_attention_2", "flex_attention")
    return ", ".join(name for name in names if supports_attn_implementation(model_class, name))


def _fallback(model_class: type | None) -> str:
    """First implementation of :data:`_FALLBACK_ORDER` the class supports."""
    for name in _FALLBACK_ORDER:
        if supports_attn_implementation(model_class, name):
            return name
    return "eager"


def resolve_attn_implementation(
    requested: str | Mapping[str, Any] | None, config: PretrainedConfig, model_class: type | None = None
) -> dict[str, Any] | None:
    """Decide the attention implementation of each part of a RAG model.

    A single name (``"flash_attention_2"``, ``"sdpa"``, ``"eager"``, ...) is asked of both parts; a part
    whose class does not support it (DPR has no flash-attention, T5 neither) falls back to ``"sdpa"`` (else
    ``"eager"``) with a logged warning. In a per-part dict (``{"question_encoder": ..., "generator": ...,
    "": ...}``) a named part gets exactly what is named, and an unsupported choice is an error; ``""`` is the
    default for the parts not named (with the same fallback as a single name).

    Args:
        requested: The ``attn_implementation`` given to ``from_pretrained`` (None: leave the config's).
        config: The RAG config being loaded (its sub-configs say which classes are built).
        model_class: The RAG class being loaded; its own ``_supports_*`` flags decide ``""``.

    Returns:
        None when nothing was requested, else ``{"": ..., "question_encoder": ..., "generator": ...}`` for
        transformers (a part left ``None`` keeps its config's choice; ``""``, the RAG wrapper, which has no
        attention layers of its own, reports the generator's choice when it can).

    Raises:
        RagInputError: Unknown keys in the dict, or a part explicitly given an implementation its class lacks.
        AcceleratorUnavailableError: A flash-attention implementation a part will use cannot run here.
    """
    if requested is None:
        return None
    if isinstance(requested, Mapping):
        unknown = sorted(set(requested) - set(_ATTN_DICT_KEYS))
        if unknown:
            raise RagInputError(
                f"attn_implementation: unknown key(s) {unknown} for a RAG model; use 'question_encoder', "
                "'generator' and '' (the default for the parts not named)."
            )
        default = requested.get("")
        explicit = {part: requested[part] for part in RAG_PARTS if part in requested}
    elif isinstance(requested, str):
        default, explicit = requested, {}
    else:
        raise TypeError(
            f"attn_implementation must be a string or a dict per part, got {type(requested).__name__}."
        )

    resolved: dict[str, Any] = {}
    for part in RAG_PARTS:
        part_class = part_model_class(config, part)
        class_name = part_class.__name__ if part_class is not None else type(getattr(config, part)).__name__
        choice = explicit.get(part, default)
        if choice is None or isinstance(choice, Mapping):
            # Nothing asked for this part, or a nested dict for the part's own sub-models: transformers decides.
            resolved[part] = choice
            continue
        if not supports_attn_implementation(part_class, choice):
            if part in explicit:
                raise RagInputError(
                    f"attn_implementation: the {part.replace('_', ' ')} ({class_name}) does not support "
                    f"'{choice}'; it supports {_supported_list(part_class)}. Name one of those for '{part}', or "
                    f"leave '{part}' out of the dict to let ragkit pick the best one it supports."
                )
            fallback = _fallback(part_class)
            logger.warning(
                "attn_implementation='%s' is not supported by the %s (%s); it uses '%s' instead. Pass a per-part "
                "dict, e.g. {'%s': '%s'}, to choose it explicitly.",
                choice,
                part.replace("_", " "),
                class_name,
                fallback,
                part,
                fallback,
            )
            choice = fallback
        resolved[part] = choice

    for part in RAG_PARTS:
        if isinstance(resolved[part], str):
            check_flash_attention(resolved[part])
    top = resolved["generator"] if isinstance(resolved["generator"], str) else default
    if isinstance(top, str) and not supports_attn_implementation(model_class, top):
        top = _fallback(model_class)
    resolved[""] = top
    return resolved


# --------------------------------------------------------------------------------------------------
# Quantization: generator only unless asked
# --------------------------------------------------------------------------------------------------


def _default_skip_modules(model_class: type, config: PretrainedConfig) -> tuple[list[str], str]:
    """transformers' default "do not quantize" list for ``model_class`` and the question encoder's module name.

    Built on the meta device (no memory, no weights): the same list transformers computes when
    ``llm_int8_skip_modules`` is None (tied weights, output embeddings, last module), which setting the
    list would otherwise switch off.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        model = model_class(config)
    question_encoder = model.question_encoder
    name = next(name for name, module in model.named_modules() if module is question_encoder)
    return get_keys_to_not_convert(model), name


def quantization_config_for_rag(
    quantization_config: Any,
    model_class: type,
    config: PretrainedConfig,
    quantize_question_encoder: bool,
) -> Any:
    """The ``quantization_config`` to hand transformers: bitsandbytes skips the question encoder unless asked.

    transformers' bitsandbytes quantizer converts every ``nn.Linear`` not matched by
    ``llm_int8_skip_modules`` (and, when that list is None, not among its defaults: the LM head, tied
    weights, the last module). ragkit adds the question encoder's module to the list, keeping the defaults,
    so only the generator is quantized unless ``quantize_question_encoder=True``.

    Args:
        quantization_config: What the user passed (not modified; a copy is returned).
        model_class: The RAG class being loaded.
        config: Its RAG config.
        quantize_question_encoder: Quantize the question encoder too.

    Returns:
        The config to pass on (unchanged when it is not bitsandbytes or the question encoder is quantized).
    """
    if not is_bitsandbytes_config(quantization_config) or quantize_question_encoder:
        return quantization_config
    if isinstance(quantization_config, Mapping):
        quantization_config = BitsAndBytesConfig.from_dict(dict(quantization_config))
    else:
        quantization_config = copy.deepcopy(quantization_config)
    defaults, question_encoder_name = _default_skip_modules(model_class, config)
    skip = list(quantization_config.llm_int8_skip_modules or defaults)
    if question_encoder_name not in skip:
        skip.append(question_encoder_name)
    quantization_config.llm_int8_skip_modules = skip
    return quantization_config


def default_dtype_for_quantization(quantization_config: Any) -> torch.dtype | None:
    """The ``dtype`` for the modules a 4-bit load leaves unquantized, when the user gave none.

    transformers loads them in float32 by default, so the question encoder, the embeddings, the LM head and
    every activation after it are twice the size of the 4-bit compute dtype's (the reference's RAG-Token
    4-bit peak is about twice its bf16 peak; see docs/gpu.md). A half-precision ``bnb_4bit_compute_dtype`` is
    the natural choice for them.

    Returns:
        ``torch.bfloat16``/``torch.float16`` for a bitsandbytes 4-bit config with that compute dtype, else None.
    """
    if not is_bitsandbytes_config(quantization_config) or _bits(quantization_config) != "4-bit":
        return None
    if isinstance(quantization_config, Mapping):
        compute = quantization_config.get("bnb_4bit_compute_dtype")
    else:
        compute = getattr(quantization_config, "bnb_4bit_compute_dtype", None)
    if isinstance(compute, str):
        compute = getattr(torch, compute, None)
    return compute if compute in (torch.bfloat16, torch.float16) else None


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------


def module_device(module: nn.Module) -> torch.device:
    """The device on which ``module`` expects its inputs.

    With accelerate's dispatch (``device_map=...``) that is the hook's execution device (weights may be
    offloaded); otherwise the device of the input embeddings (where token ids are looked up), else of the
    first parameter.
    """
    hook = getattr(module, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if get_embeddings is not None:
        try:
            embeddings = get_embeddings()
        except NotImplementedError:
            embeddings = None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def to_device(tensor: torch.Tensor | None, device: torch.device, name: str) -> torch.Tensor | None:
    """Move ``tensor`` (an input named ``name``) to ``device``; None passes through.

    Raises:
        RagInputError: The tensor is on the meta device (it holds no data to move).
    """
    if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.device == device:
        return tensor
    if tensor.device.type == "meta":
        raise RagInputError(
            f"`{name}` is on the meta device, so it holds no values; pass a tensor on the CPU or on {device}."
        )
    return tensor.to(device)
