"""Helpers for checking fused models against eager ones (used by the tests, the CLI and benchmarks)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

try:
    from torchvision.ops.misc import FrozenBatchNorm2d

    _NORMS: tuple[type, ...] = (nn.BatchNorm2d, FrozenBatchNorm2d)
except ImportError:  # pragma: no cover - torchvision is a dependency
    _NORMS = (nn.BatchNorm2d,)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, in place (BatchNorm2d and torchvision's
    FrozenBatchNorm2d): defaults (mean 0, var 1, γ 1, β 0) hide folding bugs. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORMS) and getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                dev = m.running_mean.device
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5).to(dev))
                m.running_var.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5).to(dev))
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def describe_diff(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> str:
    """Where and how much two tensors differ: the worst elements with their indices."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).abs()
    bad = ~(diff <= atol + rtol * ref.abs())
    bad |= out.isnan() != ref.isnan()
    lines = [
        f"shape {tuple(ref.shape)}: {int(bad.sum())} of {ref.numel()} elements outside "
        f"atol={atol:g} rtol={rtol:g}; rel err {rel_err(out, ref):.3e}; max abs diff "
        f"{float(diff.nan_to_num(float('inf')).max()) if diff.numel() else 0:.3e}"
    ]
    flat = diff.nan_to_num(float("inf")).flatten()
    for i in flat.topk(min(5, flat.numel())).indices.tolist():
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), ref.shape))
        lines.append(f"  at {idx}: got {out[idx].item():.6g}, expected {ref[idx].item():.6g}")
    return "\n".join(lines)


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, *, rel: float, atol: float, rtol: float, what: str = ""
) -> None:
    """Norm-relative error ≤ ``rel`` and every element within atol + rtol·|ref| (NaN where ref is NaN)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = r.isfinite()
    err = rel_err(o[finite], r[finite]) if finite.any() else 0.0
    elem_ok = bool((((o - r).abs() <= atol + rtol * r.abs()) | (o.isnan() & r.isnan()) | (o == r)).all())
    assert err <= rel and elem_ok, f"{what}: rel err {err:.3e} (limit {rel:g})\n" + describe_diff(
        o, r, atol, rtol
    )


class LaunchLog(list):
    """The Triton kernels launched inside ``count_launches()``, by name, in order."""

    def count_of(self, name: str) -> int:
        return sum(1 for k in self if k == name)


def launching_modules() -> list:
    """Every module of ``fastres.kernels`` that launches Triton kernels: each calls its own ``launchable``
    (imported from ``_common``) per launch, directly or through a ``BoundLaunch``; conv, pool, the TMA GEMM
    and conv, and the epilogue pass (split-K's reduce, the cudnn tactic's epilogue)."""
    import importlib
    import pkgutil

    from fastres import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name == "_common":  # where launchable is defined, not where it is called
            continue
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        if callable(getattr(mod, "launchable", None)):
            found.append(mod)
    return found


@contextlib.contextmanager
def count_launches():
    """Record every Triton launch the fastres launchers make (every module of ``launching_modules()``:
    conv, pool, TMA GEMM / conv, the epilogue pass, so a split-K conv counts its two launches).

    The benchmarks use it to prove that a "fastres" figure came from the fused kernels, and the tests
    to prove that a path was fused rather than run eagerly. The launch itself still happens.

    >>> with count_launches() as launches:                              # doctest: +SKIP
    ...     fast(x)
    >>> assert len(launches) == 51                                      # doctest: +SKIP
    """
    log = LaunchLog()
    patched = [(mod, mod.launchable) for mod in launching_modules()]

    def counting(original):
        def launchable(kernel):
            inner = original(kernel)
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")

            class _Counted:
                def __getitem__(self, grid):
                    launch = inner[grid]

                    def run(*args, **kwargs):
                        log.append(name)
                        return launch(*args, **kwargs)

                    return run

            return _Counted()

        return launchable

    for mod, original in patched:
        mod.launchable = counting(original)
    try:
        yield log
    finally:
        for mod, original in patched:
            mod.launchable = original
