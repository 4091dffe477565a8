"""3×3 stride-1 (and dilated) convolution over NHWC as a persistent implicit GEMM whose A tiles are
4-D tensor-descriptor (TMA) boxes, with the shared fused epilogue.

GEMM view: M = N·P·Q output pixels, N = C_out, K = R·S·C_in. An output tile is one image's
BLOCK_H × BLOCK_W pixel box × BLOCK_N channels (BLOCK_M = BLOCK_H·BLOCK_W rows). For filter tap (r, s)
and channel block c0, its A tile is the input box

    x[n, h0 + r·dil_h − pad_h : … + BLOCK_H, w0 + s·dil_w − pad_w : … + BLOCK_W, c0 : c0 + BLOCK_K]

loaded through a descriptor over x viewed as [N, H, W, C_in] (channels_last memory), with box
[1, BLOCK_H, BLOCK_W, BLOCK_K], and reshaped to [BLOCK_M, BLOCK_K]. The copy engine returns zeros for
every coordinate outside the tensor, negative ones included (the interpreter does the same), so its zero
fill *is* the conv's zero padding, and the channels past C_in of a partial K block are zeros too: the
A path has no masks and no per-element index arithmetic (gather's ``kernels/conv.py`` computes and masks
an (ih, iw) pair per element). The B tile of tap (r, s) is a [BLOCK_K, BLOCK_N] box of the packed
weight (``fastres.fold.pack_weight``: memory order R, S, C_in, C_out) viewed as [R·S, C_in, C_out], so
a partial K block reads zeros there as well, never the next tap's rows. Taps × channel blocks form one
K loop (``tl.range``, software-pipelined over the launch's ``num_stages``).

A persistent grid of min(k × #SMs, tiles) programs walks the tiles in grouped order (GROUP_M pixel
boxes share a column of weight tiles in L2), as ``kernels/tma_gemm.py``. The epilogue is the one every
tactic shares, in fp32: + bias, + residual tile (a 4-D descriptor box when the residual is
channels_last-contiguous and aligned, else strided pointer loads), ``_act._apply_act``, optional
``_act._round_tf32`` for fp32, cast, one store (a descriptor store, which clips at the tensor's edge, or
a masked pointer store for an output that is not channels_last-contiguous). Every output element is
written exactly once.

Applicability (``applicable``): 3×3 kernel, stride 1, groups 1, any padding and dilation; x
channels_last-contiguous with C_in·itemsize a multiple of 16 bytes and a 16-byte aligned base (the copy
engine's rule for strides and addresses); the weight packed, C_out·itemsize a multiple of 16 bytes; a
Triton with device-side descriptors; on CUDA compute capability ≥ 9.0 (or the interpreter).

Stride 2 is not implemented. It is expressible for *even* H and W through a parity view of x as the 5-D
[N, H/2, 2, W/2, 2·C_in] tensor (strides [H·W·C, 2·W·C, W·C, 2·C, 1]): tap (r, s) of output (p, q)
reads row 2p + r − 1 = 2·(p − [r = 0]) + (r + 1) mod 2, i.e. half-row p − [r = 0] of parity (r + 1) mod 2,
and the column's parity selects the first or second C_in half of the merged last dimension; the box
[1, BLOCK_H, 1, BLOCK_W, BLOCK_K] at half-row/column −1 is zero-filled, which is the top/left padding.
It is not clean for the rest, concretely: (1) odd H or W (ResNet's 7×7 → 4×4 at 112-pixel inputs, any
odd image size, the 13×13 and 25×25 maps of a 200-pixel input) has no such view: the last half-row's
parity-1 row lies outside the image but inside the view (the next image's first row, or past the end of
x), so the bottom/right padding would read real data instead of zeros and need a mask or a second
descriptor; (2) the second C_in half of the merged dimension is not zero-filled at C_in, so a partial K
block (C_in not a multiple of BLOCK_K) would read the neighbour column's channels: another constraint on
the config; (3) 5-D boxes over a [.., 2, .., 2·C] view are a second kernel path that no GPU has timed
either. Stride-2 3×3 stays with ``gather`` (three layers of ResNet-50, one per stage) until a GPU shows
the stride-1 path pays.

Device-side descriptors keep the signature to pointers and integers (``kernels/tma_gemm.py`` explains
why, and provides the Triton-version check and the scratch allocator this module reuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._act import act_code
from ._common import INTERPRET, check_tensor, launchable, next_pow2, tl_dtype_ok, unused_pointer
from .conv import TF32_ROUND_DEVICE_TYPES, _default_precision, conv_output_size
from .tma_gemm import (
    TMA_ALIGN,
    _aligned,
    _ensure_allocator,
    _is_nhwc_rows,
    _num_sms,
    _pair,
    _pixel_box_epilogue,
    _pixel_box_tile,
    descriptors_available,
)

# Tuning constants.
# Interpreter: each program instance costs milliseconds whatever its block size, so one large pixel box
# (up to 128 pixels) per image and a small fixed persistent grid (4 programs: the tests' multi-tile
# images and 512-channel layers make every program walk several tiles).
INTERPRET_MAX_PIXELS = 128
INTERPRET_MAX_BLOCK = 128
INTERPRET_PROGRAMS = 4
# tl.dot needs every dimension >= 16; a box needs >= 16 bytes along the contiguous dimension.
MIN_BLOCK = 16
# GPU defaults until a GPU measures them (no GPU was lent for issue 11): 128-pixel boxes (64 for maps of
# at most 8×8, where a 128-pixel box is more than half padding) × 128 channels, BLOCK_K = 64 (16-bit) or
# 32 (fp32): 128-byte box rows, the widest swizzle. 3 stages: (128 + 128) × 64 × 2 B = 32 KiB per
# stage, 96 KiB, as tma_gemm. Registers, spills and shared memory of these configs on every ResNet-50
# 3×3 stride-1 layer: benchmarks/kernel_report.py --tactics tma_conv.
GPU_PIXELS = 128
SMALL_MAP_PIXELS = 64
SMALL_MAP_MAX = 8
# Row boxes (1 × BLOCK_W) keep the wgmma A operand in shared memory; taller boxes do not. Compiled for
# sm_90 (triton 3.8, kernel report): the [1, BLOCK_H, BLOCK_W, BLOCK_K] box is reshaped to
# [BLOCK_M, BLOCK_K] for tl.dot; a reshape that only drops unit dimensions folds into the TMA copy (the
# tile goes from the copy engine straight to wgmma, the "SS" form), but merging BLOCK_H and BLOCK_W does
# not: the A tile is read back into registers with ldmatrix every K step ("RS" wgmma). A row box needs
# BLOCK_W >= 64 (wgmma's rows per warpgroup), so it is used where it covers the row as well as the best
# 2-D box does (56×56: 1 × 64, 87.5% useful, like 8 × 16); 28×28 and smaller maps take 2-D boxes.
ROW_BOX_MIN_W = 64
GPU_BLOCK_N = 128
GPU_STAGES = 3
# 8 warps for a 128-row tile, 4 below (tma_gemm's and gather's reason: 128 fp32 accumulator registers
# per thread at 4 warps before the epilogue).
GPU_WARPS = 8
SMALL_TILE_WARPS = 4
# Two persistent programs per SM for tiles at most 64 channels wide (tma_gemm's kernel-report reason).
NARROW_TILE_N = 64
NARROW_TILE_PROGRAMS_PER_SM = 2
# Grouped tile order: GROUP_M pixel boxes share a column of weight tiles in L2.
GROUP_M = 8
# Sizes that only enter descriptor shapes and index arithmetic are not specialised, so batches and image
# sizes share a compile (conv.py's CONV_UNSPECIALISED). Channel counts stay specialised.
TMA_CONV_UNSPECIALISED = ("BATCH", "H", "W", "P", "Q")
# The copy engine's tensor maps and the Hopper tensor cores: sm_90 and later.
MIN_CAPABILITY = (9, 0)
KERNEL = (3, 3)


@dataclass(frozen=True)
class TmaConvConfig:
    block_h: int  # output pixel box: block_h × block_w pixels of one image (a power of two each)
    block_w: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    num_programs: int | None = None  # persistent grid size; None: min(programs_per_sm × #SMs, tiles)
    programs_per_sm: int = 1

    @property
    def block_m(self) -> int:
        return self.block_h * self.block_w


@triton.jit(do_not_specialize=TMA_CONV_UNSPECIALISED)
def _conv3x3_bias_act_fwd_kernel(
    x_ptr,  # [BATCH, H, W, C_IN] (channels_last x)
    w_ptr,  # [R·S, C_IN, C_OUT] (packed weight)
    bias_ptr,
    res_ptr,
    out_ptr,
    BATCH,
    H,
    W,
    P,
    Q,
    C_IN,
    C_OUT,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    act_a,  # fp32 activation arguments (_act._apply_act): hardtanh's bounds, leaky ReLU's slope
    act_b,
    R: tl.constexpr,
    S: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RES_DESC: tl.constexpr,  # residual is channels_last-contiguous and aligned: 4-D descriptor boxes
    OUT_DESC: tl.constexpr,  # output is channels_last-contiguous and aligned: 4-D descriptor stores
    ACT: tl.constexpr,  # activation code, _act.ACT_CODES
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee"; used by fp32 dots only
    ROUND_TF32: tl.constexpr,  # round the fp32 output to tf32 (nearest even) for the next tf32 dot
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    tiles_h = tl.cdiv(P, BLOCK_H)
    tiles_w = tl.cdiv(Q, BLOCK_W)
    tiles_img = tiles_h * tiles_w
    num_pid_m = BATCH * tiles_img
    num_pid_n = tl.cdiv(C_OUT, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    k_blocks = tl.cdiv(C_IN, BLOCK_K)
    k_iters = R * S * k_blocks

    # One set of descriptors per program, reused for every tile. Strides in elements, int64.
    row_x = W.to(tl.int64) * C_IN
    x_desc = tl.make_tensor_descriptor(
        x_ptr,
        shape=[BATCH, H, W, C_IN],
        strides=[H * row_x, row_x, C_IN, 1],
        block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_K],
    )
    w_desc = tl.make_tensor_descriptor(
        w_ptr,
        shape=[R * S, C_IN, C_OUT],
        strides=[C_IN * C_OUT, C_OUT, 1],
        block_shape=[1, BLOCK_K, BLOCK_N],
    )
    row_o = Q.to(tl.int64) * C_OUT
    r_desc = None
    o_desc = None
    if RES_DESC:
        r_desc = tl.make_tensor_descriptor(
            res_ptr,
            shape=[BATCH, P, Q, C_OUT],
            strides=[P * row_o, row_o, C_OUT, 1],
            block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
        )
    if OUT_DESC:
        o_desc = tl.make_tensor_descriptor(
            out_ptr,
            shape=[BATCH, P, Q, C_OUT],
            strides=[P * row_o, row_o, C_OUT, 1],
            block_shape=[1, BLOCK_H, BLOCK_W, BLOCK_N],
        )

    for tile in range(pid, num_tiles, num_programs):
        img, h0, w0, off_n = _pixel_box_tile(
            tile, num_pid_in_group, num_pid_m, tiles_img, tiles_w, GROUP_M, BLOCK_H, BLOCK_W, BLOCK_N
        )

        # Taps × channel blocks, one K loop: scalar index arithmetic per iteration, none per element.
        # The box origin may be negative or past the edge: the zero fill is the padding.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.range(0, k_iters):
            tap = kk // k_blocks
            c0 = (kk % k_blocks) * BLOCK_K
            ih = h0 + (tap // S) * DIL_H - PAD_H
            iw = w0 + (tap % S) * DIL_W - PAD_W
            a = x_desc.load([img, ih, iw, c0]).reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([tap, c0, off_n]).reshape(BLOCK_K, BLOCK_N)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # Epilogue in fp32: + bias, + residual, activation, one store.
        _pixel_box_epilogue(
            acc, bias_ptr, res_ptr, out_ptr, r_desc, o_desc, img, h0, w0, off_n, P, Q, C_OUT,
            stride_rn, stride_rh, stride_rw, stride_rc, stride_on, stride_oh, stride_ow, stride_oc,
            act_a, act_b, HAS_RESIDUAL, RES_DESC, OUT_DESC, ACT, ROUND_TF32,
            BLOCK_M, BLOCK_N, BLOCK_H, BLOCK_W,
        )


def _is_packed(w: torch.Tensor) -> bool:
    """w (C_out, C_in, R, S) is a row-major [R, S, C_in, C_out] array (``fastres.fold.pack_weight``)."""
    c_out, c_in, r, s = w.shape
    want = (1, c_out, s * c_in * c_out, c_in * c_out)
    return all(size == 1 or st == ws for size, st, ws in zip(w.shape, w.stride(), want, strict=True))


def applicable(
    x: torch.Tensor, w: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1
) -> str | None:
    """None if ``conv3x3_bias_act`` can run this conv, else the reason it cannot.

    >>> applicable(x, w, stride=2, padding=1)                 # doctest: +SKIP
    'tma_conv: stride (2, 2), needs 1 (stride 2 by a parity view: see the module docstring)'
    """
    why = descriptors_available()
    if why:
        return f"tma_conv: {why}"
    if x.dim() != 4 or w.dim() != 4:
        return f"tma_conv: needs 4-D x and weight, got {tuple(x.shape)} and {tuple(w.shape)}"
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if tuple(w.shape[2:]) != KERNEL:
        return f"tma_conv: {w.shape[2]}x{w.shape[3]} kernel, needs 3x3"
    if groups != 1:
        return f"tma_conv: groups={groups}, needs 1"
    if stride != (1, 1):
        return f"tma_conv: stride {stride}, needs 1 (stride 2 by a parity view: see the module docstring)"
    if min(padding) < 0 or min(dilation) < 1:
        return f"tma_conv: padding {padding}, dilation {dilation}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return f"tma_conv: dtypes x {x.dtype}, weight {w.dtype}"
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < MIN_CAPABILITY:
            return f"tma_conv: compute capability {cap[0]}.{cap[1]}, TMA needs 9.0"
    elif not INTERPRET:
        return f"tma_conv: x is on {x.device}, needs CUDA (or the interpreter)"
    c_in, c_out = x.shape[1], w.shape[0]
    if w.shape[1] != c_in:
        return f"tma_conv: weight expects {w.shape[1]} input channels, x has {c_in}"
    if not _is_nhwc_rows(x):
        return f"tma_conv: x is not channels_last-contiguous (strides {tuple(x.stride())})"
    if not _aligned(x, c_in):
        return (
            f"tma_conv: x rows of C_in={c_in} x {x.element_size()} B or its base address are not "
            f"{TMA_ALIGN}-byte aligned"
        )
    if not _is_packed(w):
        return f"tma_conv: weight strides {tuple(w.stride())} are not the packed layout (R, S, C_in, C_out)"
    if not _aligned(w, c_out):
        return (
            f"tma_conv: weight rows of C_out={c_out} x {w.element_size()} B or its base address are not "
            f"{TMA_ALIGN}-byte aligned"
        )
    p = conv_output_size(x.shape[2], 3, 1, padding[0], dilation[0])
    q = conv_output_size(x.shape[3], 3, 1, padding[1], dilation[1])
    if p < 1 or q < 1:
        return f"tma_conv: input {x.shape[2]}x{x.shape[3]} gives an empty output"
    return None


def pixel_box(p: int, q: int, pixels: int) -> tuple[int, int]:
    """(block_h, block_w), powers of two with block_h · block_w = ``pixels``, that cover a p × q map with
    the fewest padded pixels; ties go to the squarest box (the smallest halo of input pixels it reads), then
    the wider one. 56×56 at 128 pixels: 8 × 16 (7 × 4 boxes, 87.5% useful); 28×28: 4 × 32 (87.5%, where
    8 × 16 is 76.6%)."""
    best = None
    bw = pixels
    while bw >= 1:
        bh = pixels // bw
        covered = triton.cdiv(p, bh) * bh * triton.cdiv(q, bw) * bw
        key = (covered, (bh + 2) * (bw + 2), -bw)  # then the smallest halo (squarest box)
        if best is None or key < best[0]:
            best = (key, (bh, bw))
        bw //= 2
    return best[1]


def pick_config(
    p: int, q: int, c_out: int, c_in: int, dtype: torch.dtype, *, interpret: bool = INTERPRET
) -> TmaConvConfig:
    """The heuristic config for one 3×3 conv shape (no tuned table for this tactic yet)."""
    if interpret:
        cap = INTERPRET_MAX_BLOCK
        pixels = min(INTERPRET_MAX_PIXELS, max(MIN_BLOCK, next_pow2(p) * next_pow2(q)))
        bh, bw = pixel_box(p, q, pixels)
        return TmaConvConfig(
            block_h=bh,
            block_w=bw,
            block_n=min(cap, max(MIN_BLOCK, next_pow2(c_out))),
            block_k=min(cap, max(MIN_BLOCK, next_pow2(c_in))),
            num_programs=INTERPRET_PROGRAMS,
        )
    pixels = SMALL_MAP_PIXELS if max(p, q) <= SMALL_MAP_MAX else GPU_PIXELS
    bh, bw = pixel_box(p, q, pixels)
    row_w = min(GPU_PIXELS, max(ROW_BOX_MIN_W, next_pow2(q)))
    if q / (triton.cdiv(q, row_w) * row_w) >= p * q / (triton.cdiv(p, bh) * bh * triton.cdiv(q, bw) * bw):
        bh, bw, pixels = 1, row_w, row_w
    block_k = 32 if dtype == torch.float32 else 64
    block_n = min(GPU_BLOCK_N, max(MIN_BLOCK, next_pow2(c_out)))
    return TmaConvConfig(
        block_h=bh,
        block_w=bw,
        block_n=block_n,
        block_k=min(block_k, max(MIN_BLOCK, next_pow2(c_in))),
        num_warps=GPU_WARPS if pixels >= GPU_PIXELS else SMALL_TILE_WARPS,
        num_stages=GPU_STAGES,
        programs_per_sm=NARROW_TILE_PROGRAMS_PER_SM if block_n <= NARROW_TILE_N else 1,
    )


def num_tiles(cfg: TmaConvConfig, batch: int, p: int, q: int, c_out: int) -> int:
    return batch * triton.cdiv(p, cfg.block_h) * triton.cdiv(q, cfg.block_w) * triton.cdiv(c_out, cfg.block_n)


def num_programs(cfg: TmaConvConfig, tiles: int, sms: int) -> int:
    """Persistent grid: ``programs_per_sm`` programs per SM, never more programs than tiles."""
    return max(1, min(cfg.num_programs or sms * cfg.programs_per_sm, tiles))


def conv3x3_bias_act(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    padding=1,
    dilation=1,
    act: str = "relu",
    act_a: float = 0.0,
    act_b: float = 0.0,
    relu: bool | None = None,
    precision: str | None = None,
    out: torch.Tensor | None = None,
    config: TmaConvConfig | None = None,
) -> torch.Tensor:
    """act(conv2d(x, w, padding, dilation) + bias (+ residual)) for a 3×3 stride-1 conv, as one
    persistent implicit GEMM over 4-D TMA boxes (``kernels.conv.conv_bias_act``'s result contract).

    x: (N, C_in, H, W) fp32/fp16/bf16, channels_last-contiguous, C_in·itemsize a multiple of 16 B.
    w: (C_out, C_in, 3, 3), x's dtype, packed (``fastres.fold.pack_weight``), C_out·itemsize a multiple
    of 16 B. bias: (C_out,) fp32. residual: (N, C_out, P, Q), any strides and floating dtype.
    precision: fp32 dot mode, "tf32" (default, or $FASTRES_FP32_PRECISION) or "ieee".
    Raises ValueError with ``applicable``'s reason for a conv this tactic cannot run.

    >>> y = conv3x3_bias_act(x, w, b, padding=2, dilation=2)  # doctest: +SKIP
    """
    op = "conv3x3_bias_act"
    padding, dilation = _pair(padding), _pair(dilation)
    if relu is not None:
        act = "relu" if relu else "identity"
    code = act_code(act)
    check_tensor(op, "x", x, ndim=4)
    check_tensor(op, "weight", w, ndim=4, dtype=x.dtype, device=x.device)
    check_tensor(op, "bias", bias, ndim=1, dtype=torch.float32, device=x.device)
    tl_dtype_ok(op, x.dtype)
    batch, c_in, h, wd = x.shape
    c_out = w.shape[0]
    if bias.shape[0] != c_out:
        raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected C_out={c_out}")
    why = applicable(x, w, 1, padding, dilation, 1)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    p = conv_output_size(h, 3, 1, padding[0], dilation[0])
    q = conv_output_size(wd, 3, 1, padding[1], dilation[1])
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=4, device=x.device)
        if tuple(residual.shape) != (batch, c_out, p, q):
            raise ValueError(
                f"{op}: residual shape {tuple(residual.shape)} != output shape {(batch, c_out, p, q)}"
            )
    if out is None:
        out = torch.empty(
            (batch, c_out, p, q), device=x.device, dtype=x.dtype, memory_format=torch.channels_last
        )
    elif tuple(out.shape) != (batch, c_out, p, q) or out.dtype != x.dtype:
        raise ValueError(f"{op}: out must be {(batch, c_out, p, q)} {x.dtype}")
    elif out.device != x.device:
        raise ValueError(f"{op}: out is on {out.device}, expected {x.device}")
    precision = precision or _default_precision()
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"{op}: precision must be 'tf32' or 'ieee', got {precision!r}")
    if batch == 0 or c_out == 0:
        return out
    cfg = config or pick_config(p, q, c_out, c_in, x.dtype)
    if x.device.type == "cuda":
        _ensure_allocator()
        sms = _num_sms(x.device)
    else:
        sms = INTERPRET_PROGRAMS
    res_desc = residual is not None and _is_nhwc_rows(residual) and _aligned(residual, c_out)
    out_desc = _is_nhwc_rows(out) and _aligned(out, c_out)
    # Without a residual its pointer is never read: a dedicated dummy (conv.py's reason), out's strides.
    res = residual if residual is not None else unused_pointer(out)
    res_strides = residual.stride() if residual is not None else out.stride()
    round_tf32 = x.dtype == torch.float32 and precision == "tf32" and x.device.type in TF32_ROUND_DEVICE_TYPES
    grid = (num_programs(cfg, num_tiles(cfg, batch, p, q, c_out), sms),)
    launchable(_conv3x3_bias_act_fwd_kernel)[grid](
        x,
        w,
        bias,
        res,
        out,
        batch,
        h,
        wd,
        p,
        q,
        c_in,
        c_out,
        *res_strides,
        *out.stride(),
        float(act_a),
        float(act_b),
        R=3,
        S=3,
        PAD_H=padding[0],
        PAD_W=padding[1],
        DIL_H=dilation[0],
        DIL_W=dilation[1],
        HAS_RESIDUAL=residual is not None,
        RES_DESC=res_desc,
        OUT_DESC=out_desc,
        ACT=code,
        DOT_PRECISION=precision,
        ROUND_TF32=round_tf32,
        BLOCK_H=cfg.block_h,
        BLOCK_W=cfg.block_w,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=GROUP_M,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
