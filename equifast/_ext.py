"""Loading the compiled operators (``equifast._C``) and falling back when they are missing.

Importing ``equifast._C`` registers the ``torch.ops.equifast.*`` schemas and whichever CPU/CUDA
kernels were compiled. A missing or broken extension never breaks ``import equifast``: the ops
wrappers then use the pure-PyTorch references and say so once with :func:`warn_fallback`.

Example:
    >>> from equifast import _ext
    >>> if not _ext.has_kernel("equivariance_stats", "cpu"):
    ...     _ext.warn_fallback("equivariance_stats", "cpu")
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

BUILD_HINT = (
    "Build it from the repository root with "
    "`MAX_JOBS=2 pip install --no-build-isolation --no-deps -e .` "
    "(add CUDA_HOME=/path/to/cuda TORCH_CUDA_ARCH_LIST=9.0 for the CUDA kernels)."
)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "mps": "MPS", "xpu": "XPU"}

try:
    from equifast import _C  # noqa: F401  (importing it registers the ops)

    _LOAD_ERROR: str | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"{type(error).__name__}: {error}"

_warned: set[tuple[str, str]] = set()


def has_ops() -> bool:
    """Whether the compiled extension ``equifast._C`` imported (and registered its schemas)."""
    return _C is not None


def load_error() -> str | None:
    """Why ``equifast._C`` failed to import, or ``None`` when it imported."""
    return _LOAD_ERROR


def _dispatch_key(device_type: str | torch.device) -> str:
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    device_type = device_type.split(":")[0].lower()
    return _DISPATCH_KEYS.get(device_type, device_type.upper())


def has_kernel(op_name: str, device_type: str | torch.device) -> bool:
    """Whether ``torch.ops.equifast.<op_name>`` has a kernel registered for a device type.

    Args:
        op_name: The op name without namespace, e.g. ``"equivariance_stats"``.
        device_type: ``"cpu"`` or ``"cuda"`` (a ``torch.device`` or ``"cuda:1"`` also work).

    Returns:
        True when a kernel is registered directly for that dispatch key (the compiled one, as a
        rule); False when the op or its kernel is missing.
    """
    if not has_ops():
        return False
    try:
        return bool(
            torch._C._dispatch_has_kernel_for_dispatch_key(
                f"equifast::{op_name}", _dispatch_key(device_type)
            )
        )
    except RuntimeError:  # the op itself is not registered
        return False


def build_info() -> dict[str, Any]:
    """How the extension was built.

    Returns:
        ``{"loaded": True, "backends": ["cpu"] or ["cpu", "cuda"], "cuda_arch_list": [...],
        "torch_version": ..., "compiler": ..., "cuda_version": ... or None}`` when it imported,
        else ``{"loaded": False, "error": "<why>", "backends": [], "hint": "<how to build>"}``.
    """
    if _C is None:
        return {"loaded": False, "error": _LOAD_ERROR, "backends": [], "hint": BUILD_HINT}
    return dict(_C.build_info())


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA backend.

    This is a build fact; whether a GPU is present is ``torch.cuda.is_available()``.
    """
    return "cuda" in build_info().get("backends", [])


def warn_fallback(op_name: str, device_type: str | torch.device) -> None:
    """Warn once per (op, device type) that the pure-PyTorch reference replaces the compiled kernel.

    Args:
        op_name: The op name without namespace, e.g. ``"transform_images"``.
        device_type: The device type the op runs on (``"cpu"``, ``"cuda"`` or a ``torch.device``).
    """
    key = (op_name, _dispatch_key(device_type))
    if key in _warned:
        return
    _warned.add(key)
    if not has_ops():
        why = f"the compiled extension equifast._C did not load ({_LOAD_ERROR})"
    else:
        kernels = [k for k in ("CPU", "CUDA") if has_kernel(op_name, k.lower())]
        found = ", ".join(kernels) if kernels else "none"
        why = (
            f"equifast._C has no {key[1]} kernel for equifast::{op_name} "
            f"(compiled kernels: {found}; backends built: {', '.join(build_info()['backends'])})"
        )
    warnings.warn(
        f"equifast: {why}; using the pure-PyTorch reference for {op_name} on {key[1]}, which is "
        f"slower. {BUILD_HINT}",
        UserWarning,
        stacklevel=3,
    )
