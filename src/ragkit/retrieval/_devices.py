"""Leaf helpers of the retrieval package: importing faiss quietly and resolving a search device.

Imports nothing of :mod:`ragkit.retrieval`, so the index base classes and the GPU search can both use
it without importing each other.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

__all__ = ["faiss_gpu_count", "import_faiss", "resolve_search_device"]


def import_faiss() -> Any:
    """Import faiss without its loader's INFO lines about the AVX2/AVX512 builds it could not load.

    faiss tries its optimized variants first and logs each ``ModuleNotFoundError`` at INFO through the
    ``faiss.loader`` logger; they are noise unless that logger is set to DEBUG, which keeps them.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    loader_logger = logging.getLogger("faiss.loader")
    previous = loader_logger.level
    if not loader_logger.isEnabledFor(logging.DEBUG):
        loader_logger.setLevel(logging.WARNING)
    try:
        import faiss
    finally:
        loader_logger.setLevel(previous)
    return faiss


def faiss_gpu_count() -> int:
    """GPUs faiss can search on: 0 for a faiss-cpu build."""
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def resolve_search_device(device: Any) -> torch.device:
    """Check a requested search device and make it explicit (``"cuda"`` -> ``cuda:<current device>``).

    Args:
        device: ``None`` or ``"cpu"`` (faiss on the CPU), ``"cuda"``, ``"cuda:<index>"`` or a ``torch.device``.

    Returns:
        torch.device: ``cpu`` or ``cuda:<index>``.

    Raises:
        AcceleratorUnavailableError: A CUDA device was asked for and PyTorch sees none.
        RagInputError: Not a device, a device type other than CPU and CUDA, or a CUDA index out of range.
    """
    from ..errors import RagInputError

    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise RagInputError(
            f"search_device={device!r} is not a device; use 'cpu' (faiss on the CPU), 'cuda' or 'cuda:<index>'."
        ) from err
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise RagInputError(
            f"search_device={device!r}: retrieval searches on 'cpu' (faiss) or on a CUDA device ('cuda', "
            f"'cuda:<index>'), not on {resolved.type!r}."
        )
    from .._accelerators import AcceleratorUnavailableError, _cuda_available

    if not _cuda_available():
        raise AcceleratorUnavailableError(
            f"search_device={device!r} needs a CUDA GPU, and PyTorch sees none (torch.cuda.is_available() is "
            "False). Keep search_device='cpu' (faiss-cpu) here; on a GPU machine use a CUDA build of PyTorch."
        )
    index = resolved.index if resolved.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise RagInputError(
            f"search_device={device!r}: PyTorch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})."
        )
    return torch.device("cuda", index)
