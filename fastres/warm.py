"""``warmup``: run a model once so that its first real forward compiles and folds nothing.

On a GPU the first forward of a converted model compiles one Triton kernel per conv
specialization (seconds each) and folds every BatchNorm; ``warmup`` does that up front, with
progress, and says what it did.
"""

from __future__ import annotations

import contextvars
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fastres.fold import FoldCache
from fastres.kernels import conv as _conv
from fastres.kernels import pool as _pool
from fastres.kernels._common import INTERPRET, compile_only
from fastres.modules import FusedConvBNAct2d, FusedHead, _FusedBlock


@dataclass
class LayerWarmup:
    name: str
    kind: str
    seconds: float
    kernels: int | None  # kernels compiled during this layer's forward; None under the interpreter
    folds: int  # BN folds made for it during warmup (its share of the threaded phase included)


@dataclass
class WarmupReport:
    """What ``warmup`` ran: one row per fused module, in the order they ran."""

    layers: list[LayerWarmup] = field(default_factory=list)
    seconds: float = 0.0
    kernels: int | None = None
    folds: int = 0
    parallel_seconds: float | None = None  # the threaded compile phase, when it ran
    parallel_kernels: int | None = None  # kernels it compiled

    def __str__(self) -> str:
        compiled = (
            "interpreted, nothing compiled" if self.kernels is None else f"{self.kernels} kernels compiled"
        )
        return (
            f"fastres warmup: {len(self.layers)} fused modules ran, {compiled}, "
            f"{self.folds} folds made, {self.seconds:.2f} s"
        )


def _compiled_kernels() -> int | None:
    """Compiled specializations of our Triton kernels so far (None when none is a compiled
    JITFunction, i.e. under the interpreter). Reads triton's per-device cache, whose first field
    has been the kernel dict since triton 3.0."""
    total, found = 0, False
    for mod in (_conv, _pool):
        for value in vars(mod).values():
            caches = getattr(value, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            found = True
            for entry in list(caches.values()):
                try:
                    total += len(entry[0])
                except (TypeError, IndexError):
                    pass
    return total if found else None


def _fold_count(module: nn.Module) -> int:
    total = 0
    for cache in list(vars(module).get("_folds", {}).values()) + [vars(module).get("_fold")]:
        if isinstance(cache, FoldCache):
            total += cache.folds
    return total


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _parallel_possible(x: torch.Tensor, threads: int) -> bool:
    """Compiled Triton on a GPU, more than one thread: the threaded phase has something to do."""
    return x.device.type == "cuda" and not INTERPRET and threads >= 2


def _drop_unfinished_compiles() -> None:
    """Remove from our kernels' caches every async compile that has no finished kernel.

    Triton stores the ``FutureKernel`` of an async compile in the kernel cache at submit time; one whose
    compile raised (or was never finalised because ``AsyncCompileMode.__exit__`` raised first) would
    raise again at every later launch of that specialization. Without it the serial forward compiles it.
    """
    for mod in (_conv, _pool):
        for value in vars(mod).values():
            caches = getattr(value, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in list(caches.values()):
                kernels = entry[0] if isinstance(entry, tuple) and entry else None
                if not isinstance(kernels, dict):
                    continue
                for key, kernel in list(kernels.items()):
                    # vars(): FutureKernel.__getattr__ would wait for (and re-raise) the compile.
                    if type(kernel).__name__ == "FutureKernel" and vars(kernel).get("kernel") is None:
                        kernels.pop(key, None)


def _threaded_forward(model: nn.Module, x: torch.Tensor, threads: int) -> None:
    """One forward with launches as compile requests, compiled in a pool of ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode  # Triton 3.4+

    with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool), compile_only():
        with torch.inference_mode():
            model(x)


def _compile_in_parallel(model: nn.Module, x: torch.Tensor, threads: int, verbose: bool) -> float | None:
    """Compile every kernel one forward launches, in ``threads`` threads, running none of them.

    The forward runs with launches turned into compile requests (``compile_only``) under Triton's
    AsyncCompileMode, which compiles them in a thread pool (ptxas and much of the compiler run
    outside the GIL). Returns the seconds taken, or None where that is not possible (CPU, the
    interpreter, a Triton without AsyncCompileMode) or failed: the ordinary forward then compiles.

    The phase runs in a copy of the current ``contextvars`` context, so Triton's ``active_mode`` can
    never stay set for the serial forward after it: some Triton versions (3.6) finalise the compiles
    before resetting it in ``AsyncCompileMode.__exit__``, and leave it set when a compile raised; every
    later compile would then go to the pool that is already shut down.
    """
    if not _parallel_possible(x, threads):
        return None
    try:
        import triton.runtime._async_compile  # noqa: F401  (Triton 3.4+)
    except ImportError:
        return None

    t0 = time.perf_counter()
    try:
        contextvars.copy_context().run(_threaded_forward, model, x, threads)
    except Exception as e:  # noqa: BLE001 - a failure here only means compiling one by one
        warnings.warn(f"fastres.warmup: parallel compile failed ({e!r}); compiling one by one", stacklevel=3)
        return None
    finally:
        _drop_unfinished_compiles()
    seconds = time.perf_counter() - t0
    if verbose:
        print(f"fastres warmup: compiled in {threads} threads in {seconds:.2f} s", flush=True)
    return seconds


def warmup(
    model: nn.Module, example_input: torch.Tensor, *, verbose: bool = True, threads: int | None = None
) -> WarmupReport:
    """Run ``model(example_input)`` once under ``torch.inference_mode`` so that every kernel
    specialization it needs is compiled and every fold is made; print one line per fused module
    (kernels compiled, folds, seconds) when ``verbose``. Use the shape and dtype of real inputs:
    another batch size compiles nothing new, but another dtype or resolution may. With
    ``FASTRES_AUTOTUNE=1`` this is also when new shapes are tuned. On a GPU the kernels are first
    compiled in ``threads`` threads (default: the CPU count, at most 16; 1 turns that off).

    >>> fast = fastres.convert(model.eval().cuda().half())                 # doctest: +SKIP
    >>> fastres.warmup(fast, torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.half))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.warmup: expected an nn.Module, got {type(model).__name__}")
    named = [
        (name or "(root)", m)
        for name, m in model.named_modules()
        if isinstance(m, (FusedConvBNAct2d, _FusedBlock, FusedHead))
    ]
    if not named:
        warnings.warn(
            "fastres.warmup: the model has no fastres modules (run fastres.convert first)", stacklevel=2
        )
    if model.training:
        warnings.warn(
            "fastres.warmup: the model is in train mode, where the fused kernels do not run; call .eval()",
            stacklevel=2,
        )
    report = WarmupReport()
    start: dict[int, tuple[float, int | None]] = {}
    # Folds counted from the start of warmup, so those made in the threaded phase (which runs no
    # hooks) land in the row of the module that made them; updated per call for modules run twice.
    folds_before = {id(m): _fold_count(m) for _, m in named}

    def pre(module, args):
        _sync(example_input)
        start[id(module)] = (time.perf_counter(), _compiled_kernels())

    def post(module, args, output):
        _sync(example_input)
        t0, k0 = start.pop(id(module))
        k1 = _compiled_kernels()
        folds = _fold_count(module)
        row = LayerWarmup(
            name=names[id(module)],
            kind=type(module).__name__,
            seconds=time.perf_counter() - t0,
            kernels=None if k0 is None or k1 is None else k1 - k0,
            folds=folds - folds_before[id(module)],
        )
        folds_before[id(module)] = folds
        report.layers.append(row)
        if verbose:
            kernels = "interpreted" if row.kernels is None else f"{row.kernels} kernels compiled"
            print(
                f"  [{len(report.layers)}/{len(named)}] {row.name:<28} {row.kind:<18} "
                f"{kernels}, {row.folds} folds, {row.seconds:.2f} s",
                flush=True,
            )

    names = {id(m): name for name, m in named}
    k_start = _compiled_kernels()
    if verbose:
        print(
            f"fastres warmup: {len(named)} fused modules, input {tuple(example_input.shape)} "
            f"{example_input.dtype} on {example_input.device}",
            flush=True,
        )
    t_start = time.perf_counter()
    report.parallel_seconds = _compile_in_parallel(
        model, example_input, threads if threads is not None else min(16, os.cpu_count() or 1), verbose
    )
    if report.parallel_seconds is not None:
        k_now = _compiled_kernels()
        report.parallel_kernels = None if k_now is None or k_start is None else k_now - k_start
    # The per-module hooks only around the serial forward: one row per module call, and each row's
    # kernels are what that call still had to compile.
    handles = []
    for _, m in named:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.inference_mode():
            model(example_input)
        _sync(example_input)
    finally:
        for h in handles:
            h.remove()
    report.seconds = time.perf_counter() - t_start
    k_end = _compiled_kernels()
    report.kernels = None if k_start is None or k_end is None else k_end - k_start
    report.folds = sum(row.folds for row in report.layers)
    if verbose:
        print(report, flush=True)
    return report
