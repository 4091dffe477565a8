"""Which kernel family runs a conv: the tactic registry, applicability rules and the choice.

Tactics (DESIGN.md, "Conv tactics"), in the order they are registered:

- ``gather`` (``kernels/conv.py``): every conv; always applicable. The only tactic that can be relied
  on for any shape, so it is always the fallback, whatever ``FASTRES_TACTICS`` says.
- ``tma_gemm`` (``kernels/tma_gemm.py``): 1×1, stride 1 or (2, 2) (a strided 4-D view of x), padding 0,
  groups 1, no projection shortcut, x channels_last-contiguous with 16-byte rows and base, the weight
  packed with C_out stride 1, a Triton with device-side tensor descriptors, compute capability ≥ 9.0 on
  CUDA (or the interpreter).
- ``tma_conv`` (``kernels/tma_conv.py``): 3×3, stride 1, groups 1 (any padding, dilated too), no
  projection shortcut, x channels_last-contiguous with 16-byte rows and base, the weight packed
  (R, S, C_in, C_out) with 16-byte C_out rows, device-side descriptors, compute capability ≥ 9.0 on CUDA
  (or the interpreter). Its A tiles are 4-D TMA boxes whose zero fill is the padding.
- ``cudnn`` (``kernels/cudnn_conv.py``): every conv in fp16/bf16/fp32 on CUDA with cuDNN (or the CPU in the
  interpreter): cuDNN's fused conv + bias (+ add) + ReLU, else ``F.conv2d`` + one Triton epilogue pass.
  The safety net a tuner picks per layer where it measures faster; its weight is OIHW channels_last
  (``cudnn_conv.cudnn_weight``), so a fold cache holds one weight per tactic.

Default: only ``gather`` is chosen. ``tma_gemm`` compiles for sm_90 with TMA loads, wgmma and no spills
(benchmarks/kernel_report.py) and matches the fp64 reference in the interpreter, but no GPU has timed
it against ``gather`` yet (issue 11: no GPU was lent), so nothing selects it until a GPU measurement
changes this default or a tuned table entry names it (``choose(..., tuned="tma_gemm")``); the same holds
for ``tma_conv`` (compiled for sm_90 with TMA and wgmma, no spills, never timed). ``cudnn`` is
likewise chosen only by ``FASTRES_TACTICS`` or a tuned table (measured per layer).

``FASTRES_TACTICS`` (comma list, e.g. ``tma_gemm,gather``) restricts the set and gives the order of
preference: the first listed tactic that is applicable runs. A tuned table's choice runs only if the
restriction allows it. ``gather`` is appended when absent (it is the fallback for every conv).

This module knows nothing of the tuner, the tables' files or the modules: a caller that has a tuned
table entry passes its tactic name. ``choose`` belongs in a launch plan, not in the per-forward path.

    >>> name, why = choose(x, w, stride=1, padding=0)          # doctest: +SKIP
    >>> y = conv_bias_act(x, w, b, residual=r)                # chooses, then runs     # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import conv, cudnn_conv, tma_conv, tma_gemm

GATHER = "gather"
TMA_GEMM = "tma_gemm"
CUDNN = "cudnn"
TMA_CONV = "tma_conv"
# Registration order; gather first: the fallback.
TACTICS: tuple[str, ...] = (GATHER, TMA_GEMM, CUDNN, TMA_CONV)
# What runs when neither $FASTRES_TACTICS nor a tuned table says otherwise (see the docstring).
DEFAULT_TACTICS: tuple[str, ...] = (GATHER,)
ENV_VAR = "FASTRES_TACTICS"


def enabled(env: str | None = None) -> tuple[tuple[str, ...], bool]:
    """(tactics in order of preference, whether $FASTRES_TACTICS set them). ``env`` overrides the variable.
    Raises ValueError naming an unknown tactic."""
    raw = os.environ.get(ENV_VAR) if env is None else env
    if raw is None or not raw.strip():
        return DEFAULT_TACTICS, False
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in TACTICS]
    if unknown:
        raise ValueError(f"{ENV_VAR}={raw!r}: unknown tactic(s) {unknown}; known: {', '.join(TACTICS)}")
    if GATHER not in names:
        names = (*names, GATHER)
    return names, True


def _gather_applicable(x, w, stride, padding, dilation, groups, shortcut) -> str | None:
    return None


def _tma_gemm_applicable(x, w, stride, padding, dilation, groups, shortcut) -> str | None:
    if shortcut:
        return "tma_gemm: projection shortcut (dual GEMM) not implemented in this tactic"
    return tma_gemm.applicable(x, w, stride, padding, dilation, groups)


def _tma_conv_applicable(x, w, stride, padding, dilation, groups, shortcut) -> str | None:
    if shortcut:
        return "tma_conv: projection shortcut (dual GEMM) not implemented in this tactic"
    return tma_conv.applicable(x, w, stride, padding, dilation, groups)


def _cudnn_applicable(x, w, stride, padding, dilation, groups, shortcut) -> str | None:
    return cudnn_conv.applicable(x, w, stride, padding, dilation, groups)  # the shortcut: a second conv


# name -> rule(x, w, stride, padding, dilation, groups, shortcut) -> None or the reason it cannot run.
RULES: dict[str, Callable[..., str | None]] = {
    GATHER: _gather_applicable,
    TMA_GEMM: _tma_gemm_applicable,
    CUDNN: _cudnn_applicable,
    TMA_CONV: _tma_conv_applicable,
}
# name -> the config dataclass its launcher takes as ``config`` (what a tuned table stores for it; read
# and written by kernels/tuning.py). A tactic without one (cudnn: cuDNN picks its own algorithm) is absent.
CONFIG_TYPES: dict[str, type] = {
    GATHER: conv.ConvConfig,
    TMA_GEMM: tma_gemm.TmaGemmConfig,
    TMA_CONV: tma_conv.TmaConvConfig,
}
# name -> the weight layout it takes, derived from the packed (C_out stride 1) one; absent: the packed
# weight. A caller that launches a tactic many times (the tuner) derives it once.
WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {CUDNN: cudnn_conv.cudnn_weight}


def applicable(
    name: str, x: torch.Tensor, w: torch.Tensor, *, stride=1, padding=0, dilation=1, groups=1, shortcut=False
) -> str | None:
    """None if tactic ``name`` can run this conv, else the reason it cannot."""
    if name not in RULES:
        raise ValueError(f"unknown tactic {name!r}; known: {', '.join(TACTICS)}")
    return RULES[name](x, w, stride, padding, dilation, groups, shortcut)


def choose(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    shortcut: bool = False,
    tuned: str | None = None,
    env: str | None = None,
) -> tuple[str, str]:
    """(tactic name, reason) for this conv. ``tuned``: the tactic a tuned table or measurement recorded
    for this shape, tried first (if $FASTRES_TACTICS, or ``env``, allows it); ``shortcut``: the launch
    also accumulates a projection shortcut.

    >>> choose(x, w)                                          # doctest: +SKIP
    ('gather', 'gather: default (tma_gemm is chosen only by FASTRES_TACTICS or a tuned table)')
    """
    order, explicit = enabled(env)
    skipped = []
    if tuned is not None:
        if tuned not in RULES:
            raise ValueError(f"tuned tactic {tuned!r} is unknown; known: {', '.join(TACTICS)}")
        if explicit and tuned not in order:
            skipped.append(f"{tuned}: tuned, but {ENV_VAR} leaves it out")
        else:
            why = RULES[tuned](x, w, stride, padding, dilation, groups, shortcut)
            if why is None:
                return tuned, f"{tuned}: tuned table"
            skipped.append(why)
    for name in order:
        if name == tuned:
            continue
        why = RULES[name](x, w, stride, padding, dilation, groups, shortcut)
        if why is None:
            if skipped:
                source = "; ".join(skipped)
            elif explicit:
                source = f"first applicable in {ENV_VAR}"
            else:
                source = "default (tma_gemm is chosen only by FASTRES_TACTICS or a tuned table)"
            return name, f"{name}: {source}"
        skipped.append(why)
    raise AssertionError(f"no tactic applies, yet gather always does: {skipped}")  # gather's rule is None


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    act: str = "relu",
    act_a: float = 0.0,
    act_b: float = 0.0,
    relu: bool | None = None,
    shortcut_x: torch.Tensor | None = None,
    shortcut_weight: torch.Tensor | None = None,
    shortcut_stride=1,
    precision: str | None = None,
    out: torch.Tensor | None = None,
    config=None,
    tactic: str | None = None,
    tuned: str | None = None,
) -> torch.Tensor:
    """``kernels.conv.conv_bias_act``'s signature and result, run by the chosen tactic.

    ``tactic``: run this one (ValueError with the reason if it cannot); else ``choose(..., tuned=tuned)``.
    ``config``: handed to the tactic that runs when it is that tactic's config type (``conv.ConvConfig``,
    ``tma_gemm.TmaGemmConfig`` or ``tma_conv.TmaConvConfig``); otherwise that tactic picks its own
    (``cudnn`` has none: cuDNN picks).

    >>> y = conv_bias_act(x, w, b, residual=identity, tactic="tma_gemm")   # doctest: +SKIP
    """
    shortcut = shortcut_x is not None or shortcut_weight is not None
    conv_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, shortcut=shortcut)
    if tactic is None:
        tactic, _ = choose(x, weight, tuned=tuned, **conv_args)
    else:
        why = applicable(tactic, x, weight, **conv_args)
        if why is not None:
            raise ValueError(f"conv_bias_act: tactic {tactic!r} cannot run this conv: {why}")
    if tactic == CUDNN:
        return cudnn_conv.conv_bias_act(
            x,
            weight,
            bias,
            residual=residual,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            act=act,
            act_a=act_a,
            act_b=act_b,
            relu=relu,
            shortcut_x=shortcut_x,
            shortcut_weight=shortcut_weight,
            shortcut_stride=shortcut_stride,
            precision=precision,
            out=out,
        )
    if tactic == TMA_CONV:
        return tma_conv.conv3x3_bias_act(
            x,
            weight,
            bias,
            residual=residual,
            padding=padding,
            dilation=dilation,
            act=act,
            act_a=act_a,
            act_b=act_b,
            relu=relu,
            precision=precision,
            out=out,
            config=config if isinstance(config, tma_conv.TmaConvConfig) else None,
        )
    if tactic == TMA_GEMM:
        return tma_gemm.conv1x1_bias_act(
            x,
            weight,
            bias,
            residual=residual,
            stride=stride,
            act=act,
            act_a=act_a,
            act_b=act_b,
            relu=relu,
            precision=precision,
            out=out,
            config=config if isinstance(config, tma_gemm.TmaGemmConfig) else None,
        )
    return conv.conv_bias_act(
        x,
        weight,
        bias,
        residual=residual,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        act=act,
        act_a=act_a,
        act_b=act_b,
        relu=relu,
        shortcut_x=shortcut_x,
        shortcut_weight=shortcut_weight,
        shortcut_stride=shortcut_stride,
        precision=precision,
        out=out,
        config=config if isinstance(config, conv.ConvConfig) else None,
    )


class TacticLaunch:
    """One conv of a launch plan run by a tactic other than ``gather``: its weights put in the tactic's
    layout once (``WEIGHTS``), its tuned config; called like ``conv.ConvLaunch``
    (``launch(x, residual=None, shortcut_x=None, out=None)``). Each call goes through the tactic's
    launcher, i.e. Triton's generic launch path (argument binding, cache lookup): more host work per call
    than gather's bound launch, which a tuner accepts only where the kernel gains more."""

    __slots__ = ("name", "weight", "bias", "shortcut_weight", "config", "kwargs", "out_shape", "dtype")

    def __init__(self, name, weight, bias, shortcut_weight, config, kwargs, out_shape, dtype) -> None:
        self.name, self.weight, self.bias, self.shortcut_weight = name, weight, bias, shortcut_weight
        self.config, self.kwargs, self.out_shape, self.dtype = config, kwargs, out_shape, dtype

    def __call__(self, x, residual=None, shortcut_x=None, out=None) -> torch.Tensor:
        return conv_bias_act(
            x, self.weight, self.bias, residual=residual, shortcut_x=shortcut_x,
            shortcut_weight=self.shortcut_weight, out=out, config=self.config, tactic=self.name,
            **self.kwargs,
        )


def prepare(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    config=None,
    residual: torch.Tensor | None = None,
    shortcut_x: torch.Tensor | None = None,
    shortcut_weight: torch.Tensor | None = None,
    **kwargs,
) -> tuple[TacticLaunch, torch.Tensor]:
    """(launch, an output-shaped prototype) of tactic ``name`` for tensors like these, as
    ``conv.prepare_conv`` returns for gather; ValueError with the reason if ``name`` cannot run them.

    >>> launch, y = prepare("tma_gemm", x, w, b, stride=1, padding=0)      # doctest: +SKIP
    """
    defaults = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
    conv_args = {k: kwargs.get(k, d) for k, d in defaults}
    why = applicable(name, x, weight, shortcut=shortcut_weight is not None, **conv_args)
    if why is not None:
        raise ValueError(f"tactic {name!r} cannot run this conv: {why}")
    derive = WEIGHTS.get(name)
    w = derive(weight) if derive is not None else weight
    sw = derive(shortcut_weight) if derive is not None and shortcut_weight is not None else shortcut_weight
    stride, padding, dilation = (conv._pair(conv_args[k], k) for k in ("stride", "padding", "dilation"))
    (r, s), (h, wd) = weight.shape[-2:], x.shape[-2:]
    out_shape = (
        x.shape[0],
        weight.shape[0],
        conv.conv_output_size(h, r, stride[0], padding[0], dilation[0]),
        conv.conv_output_size(wd, s, stride[1], padding[1], dilation[1]),
    )
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return TacticLaunch(name, w, bias, sw, config, kwargs, out_shape, x.dtype), out
