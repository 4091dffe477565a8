"""Shared launcher helpers: input checks with clear errors, and small integer utilities."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

# Triton reads TRITON_INTERPRET when it is imported; we read the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_COMPILE_ONLY = contextvars.ContextVar("fastres_compile_only", default=False)


@contextlib.contextmanager
def compile_only():
    """Launches inside compile (``kernel.warmup``) and run nothing: outputs stay uninitialised.
    ``fastres.warmup`` uses it under Triton's AsyncCompileMode to compile a model's kernels in threads."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def compiling_only() -> bool:
    return _COMPILE_ONLY.get()


class _CompileRequest:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)


def launchable(kernel):
    """The kernel as torch.compile can trace it (``wrap_triton``); the raw one under the interpreter,
    which torch's wrapper does not accept; a compile request inside ``compile_only()``."""
    if INTERPRET:
        return kernel
    if _COMPILE_ONLY.get():
        return _CompileRequest(kernel)
    return _traceable(kernel)


@functools.cache
def _traceable(kernel):
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise TypeError/ValueError naming the op and argument, before any launch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (same device as x)")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{op}: {name} is on {t.device}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing triton)"
        )


def tl_dtype_ok(op: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: dtype {dtype} is not supported; use one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        )
