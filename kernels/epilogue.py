"""The conv epilogue as its own pass, for the tactics whose GEMM cannot hold it: a sum of ``NUM_SRC`` source
tiles (fp32 split-K partial sums, or one conv output in its own dtype) + bias + residual + a second
addend (a projection shortcut's conv output) → activation → tf32 rounding → cast → one store.

The activation and the tf32 rounding are ``_act``'s, the ones the gather and TMA kernels apply in their own
epilogues: every tactic gives the same bits for the same fp32 sum. Users:

- ``kernels/conv.py``, split-K: the gather kernel's ``SPLIT_K`` programs per tile store fp32 partial sums
  in a workspace [SPLIT_K, M, C_out]; this pass adds them in split order (deterministic) and finishes.
- ``kernels/cudnn_conv.py``: ``F.conv2d`` (cuDNN on a GPU, oneDNN or ATen in the interpreter) gives the
  conv; this pass adds what cuDNN's fused ops cannot (another activation, both a residual and a shortcut,
  a residual of another dtype, fp32 outputs rounded to tf32).

Tensors are (N, C, P, Q) addressed through their strides; each source also has a split stride. Every
element is read, then written, by the same program, so the output may alias the first source or the
residual (in place).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from ._act import _apply_act, _round_tf32
from ._common import (  # launchable is looked up here per launch: count_launches patches it
    INTERPRET,
    BoundLaunch,
    launchable,  # noqa: F401
    next_pow2,
    unused_pointer,
)

# Tuning constants.
# An elementwise pass: 4096-element tiles (32 per thread with 4 warps), channels innermost so a
# channels_last row is one contiguous run. Not measured on a GPU yet (no GPU was lent for issue 11).
GPU_TILE_ELEMS = 4096
GPU_MAX_BLOCK_C = 128
GPU_WARPS = 4
# Interpreter: each program costs milliseconds whatever its size, so few large tiles (conv.py's reason).
INTERPRET_TILE_ELEMS = 128 * 128
# Pixel count M only enters masks and index arithmetic: batches share one compile (conv.py's reason).
EPILOGUE_UNSPECIALISED = ("M", "P", "Q")


@triton.jit(do_not_specialize=EPILOGUE_UNSPECIALISED)
def _bias_act_epilogue_kernel(
    src_ptr,  # NUM_SRC tiles to sum: split-K partials (fp32) or the conv output (any float dtype)
    bias_ptr,
    res_ptr,
    res2_ptr,  # a second addend: the projection shortcut's conv output
    out_ptr,
    M,
    P,
    Q,
    C,
    stride_sk,  # between the sources (split-K partials)
    stride_sn,
    stride_sc,
    stride_sh,
    stride_sw,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_r2n,
    stride_r2c,
    stride_r2h,
    stride_r2w,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    act_a,  # fp32 activation arguments (_act._apply_act)
    act_b,
    NUM_SRC: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RES2: tl.constexpr,
    ACT: tl.constexpr,  # activation code, _act.ACT_CODES
    ROUND_TF32: tl.constexpr,  # round the fp32 output to tf32 (nearest even) for the next tf32 dot
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    # Pixel (n, p, q) of row m; int64 before any product with a stride.
    q = (offs_m % Q).to(tl.int64)
    p = ((offs_m // Q) % P).to(tl.int64)
    n = (offs_m // Q // P).to(tl.int64)
    co = offs_c.to(tl.int64)

    s_ptrs = src_ptr + (n * stride_sn + p * stride_sh + q * stride_sw)[:, None] + (co * stride_sc)[None, :]
    acc = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    for k in range(1, NUM_SRC):  # split order: the same sum on every run
        acc += tl.load(s_ptrs + k * stride_sk, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(bias_ptr + co, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_RES2:
        r2_ptrs = (
            res2_ptr
            + (n * stride_r2n + p * stride_r2h + q * stride_r2w)[:, None]
            + (co * stride_r2c)[None, :]
        )
        acc += tl.load(r2_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = (
            res_ptr + (n * stride_rn + p * stride_rh + q * stride_rw)[:, None] + (co * stride_rc)[None, :]
        )
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = _apply_act(acc, ACT, act_a, act_b)
    if ROUND_TF32:
        acc = _round_tf32(acc)
    o_ptrs = out_ptr + (n * stride_on + p * stride_oh + q * stride_ow)[:, None] + (co * stride_oc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def blocks(c: int, *, interpret: bool = INTERPRET) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of the epilogue pass for C output channels."""
    tile = INTERPRET_TILE_ELEMS if interpret else GPU_TILE_ELEMS
    block_c = max(16, min(next_pow2(c), tile if interpret else GPU_MAX_BLOCK_C))
    return max(16, tile // block_c), block_c


def bias_act_epilogue(
    src: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    *,
    num_src: int = 1,
    src_split_stride: int = 0,
    residual: torch.Tensor | None = None,
    res2: torch.Tensor | None = None,
    act_code: int = 1,
    act_a: float = 0.0,
    act_b: float = 0.0,
    round_tf32: bool = False,
) -> torch.Tensor:
    """out = act(sum of the ``num_src`` (N, C, P, Q) tiles of ``src`` (``src_split_stride`` elements apart)
    + bias + res2 + residual), cast to out's dtype; tf32-rounded first if ``round_tf32``. The launchers
    have checked shapes and devices; ``out`` may be ``src`` (num_src 1) or ``residual``.

    >>> bias_act_epilogue(y, b, y, residual=identity, act_code=ACT_CODES["relu"])   # doctest: +SKIP
    """
    launch = prepare_bias_act_epilogue(
        src,
        bias,
        out,
        num_src=num_src,
        src_split_stride=src_split_stride,
        residual=residual,
        res2=res2,
        act_code=act_code,
        act_a=act_a,
        act_b=act_b,
        round_tf32=round_tf32,
    )
    return launch(src, out, residual, res2)


class EpilogueLaunch:
    """``bias_act_epilogue`` prepared once for one signature (DESIGN.md, The hot path), as ``ConvLaunch``
    is for the conv: a call takes the tensors that change (src, out, residual, res2), which must have the
    prototypes' dtype, shape, strides, device and 16-byte alignment, and launches through a ``BoundLaunch``.

    >>> launch = prepare_bias_act_epilogue(ws, b, y, num_src=4, src_split_stride=m * c)   # doctest: +SKIP
    >>> launch(ws, y)                                                                      # doctest: +SKIP
    """

    __slots__ = ("template", "bound", "has_residual", "has_res2")

    def __init__(self, template, bound, has_residual: bool, has_res2: bool) -> None:
        self.template = template  # every kernel argument in parameter order; the call's tensors are None
        self.bound = bound  # a BoundLaunch, or None when there is nothing to compute
        self.has_residual = has_residual
        self.has_res2 = has_res2

    def __call__(self, src, out, residual=None, res2=None) -> torch.Tensor:
        if self.bound is None:
            return out
        args = self.template.copy()
        args[0] = src
        args[4] = out
        if self.has_residual:
            args[2] = residual
        if self.has_res2:
            args[3] = res2
        bound = self.bound
        fast = bound.fast  # BoundLaunch.__call__, inline (one Python call less per launch)
        if fast is None or not fast(args):
            bound.launch(args)
        return out


_EPILOGUE_CONSTEXPRS = ("NUM_SRC", "HAS_RESIDUAL", "HAS_RES2", "ACT", "ROUND_TF32", "BLOCK_M", "BLOCK_C")


def prepare_bias_act_epilogue(
    src: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    *,
    num_src: int = 1,
    src_split_stride: int = 0,
    residual: torch.Tensor | None = None,
    res2: torch.Tensor | None = None,
    act_code: int = 1,
    act_a: float = 0.0,
    act_b: float = 0.0,
    round_tf32: bool = False,
) -> EpilogueLaunch:
    """Everything ``bias_act_epilogue`` does before the launch, for these tensors as prototypes (only their
    dtypes, strides and devices are kept: the template holds no src or out)."""
    batch, c, p, q = out.shape
    m = batch * p * q
    has_residual, has_res2 = residual is not None, res2 is not None
    if m == 0 or c == 0:
        return EpilogueLaunch(None, None, has_residual, has_res2)
    block_m, block_c = blocks(c)
    # Unused pointers: a dedicated dummy (conv.py's reason), with out's strides (the same specialisation).
    res = residual if has_residual else unused_pointer(out)
    r2 = res2 if has_res2 else unused_pointer(out)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    runtime = [
        None,  # src: each call's
        bias,
        None if has_residual else res,
        None if has_res2 else r2,
        None,  # out: each call's
        m,
        p,
        q,
        c,
        src_split_stride,
        *src.stride(),
        *(residual.stride() if has_residual else out.stride()),
        *(res2.stride() if has_res2 else out.stride()),
        *out.stride(),
        float(act_a),
        float(act_b),
    ]
    consts = (num_src, has_residual, has_res2, act_code, round_tf32, block_m, block_c)
    owner = sys.modules[__name__]
    bound = BoundLaunch(
        owner, _bias_act_epilogue_kernel, grid, len(runtime), _EPILOGUE_CONSTEXPRS, {"num_warps": GPU_WARPS},
        out.device,
    )  # fmt: skip
    return EpilogueLaunch(runtime + list(consts), bound, has_residual, has_res2)
