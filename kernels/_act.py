"""What every conv tactic's epilogue applies after the bias and residual: the pointwise activation,
then (fp32 with tf32 dots) the rounding of the output to tf32. The activation is one ``ACT`` constexpr
code and two fp32 runtime scalars (``a``, ``b``: hardtanh's bounds, leaky ReLU's slope).

Each branch computes what eager PyTorch computes for the same fp32 value, NaN and ±Inf included:
comparisons with NaN are false, so every ``tl.where`` below lets NaN through as eager's clamps do, and
the formulas are eager's own (``x / (1 + exp(-x))`` for SiLU gives NaN at -Inf as eager does).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET

# name -> ACT code; the names are ``fastres.activations.Act.name``. Codes are compared inside the kernel
# as literals (a Triton global would have to be a tl.constexpr object).
ACT_CODES = {
    "identity": 0,
    "relu": 1,
    "hardtanh": 2,  # a = min_val, b = max_val (ReLU6: 0, 6)
    "leaky_relu": 3,  # a = negative_slope
    "silu": 4,
    "gelu": 5,  # erf form (approximate="none")
    "gelu_tanh": 6,  # approximate="tanh"
    "hardswish": 7,
    "hardsigmoid": 8,
    "sigmoid": 9,
    "mish": 10,
}
# sqrt(2 / pi) and 1 / sqrt(2), as torch's CPU kernels spell them (M_2_SQRTPI * M_SQRT1_2, M_SQRT1_2).
# tl.constexpr: a @triton.jit function may read a module global only if it is one.
_K_BETA = tl.constexpr(0.7978845608028654)
_SQRT1_2 = tl.constexpr(0.7071067811865476)


def act_code(act: str) -> int:
    """The kernel's ACT code for an activation name, with a clear error for an unknown one."""
    try:
        return ACT_CODES[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACT_CODES)}") from None


@triton.jit
def _apply_act(x, ACT: tl.constexpr, a, b):
    """act(x) for an fp32 tile x; ``a``/``b`` are read by hardtanh (min, max) and leaky_relu (slope)."""
    if ACT == 1:  # relu: where(x < 0, ...) keeps NaN as torch.relu does
        x = tl.where(x < 0.0, 0.0, x)
    elif ACT == 2:  # hardtanh: min(max(x, a), b), NaN through
        x = tl.where(x < a, a, x)
        x = tl.where(x > b, b, x)
    elif ACT == 3:  # leaky_relu: x > 0 ? x : x * slope
        x = tl.where(x > 0.0, x, x * a)
    elif ACT == 4:  # silu
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 5:  # gelu, erf form
        x = x * 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == 6:  # gelu, tanh form: 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u), without 1 + tanh cancelling
        u = _K_BETA * (x + 0.044715 * x * x * x)
        x = x / (1.0 + tl.exp(-2.0 * u))
    elif ACT == 7:  # hardswish: x * min(max(x + 3, 0), 6) / 6
        t = x + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        x = x * t / 6.0
    elif ACT == 8:  # hardsigmoid: min(max(x + 3, 0), 6) / 6
        t = x + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        x = t / 6.0
    elif ACT == 9:  # sigmoid
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == 10:  # mish: x * tanh(softplus(x)); tanh(log(1 + e)) = n / (n + 2) with n = e (e + 2)
        e = tl.exp(tl.where(x > 20.0, 0.0, x))  # above 20 the factor is 1.0 in fp32 (and e^2x overflows)
        n = e * (e + 2.0)
        x = tl.where(x > 20.0, x, x * (n / (n + 2.0)))
    return x


@triton.jit
def _round_tf32(x):
    # Round to nearest even on the low 13 mantissa bits (the next layer's tf32 dot drops them); Inf and
    # NaN pass unchanged, the largest finite values round up to Inf as tf32 rounding must. The same bits
    # as fastres.fold.round_tf32, which rounds the fp32 weights.
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + (0xFFF + ((bits >> 13) & 1))) & -8192
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)


if INTERPRET:
    # Under TRITON_INTERPRET, torch's tracing of a kernel launch (wrap_triton, make_fx) hashes the kernel's
    # source and the globals it references, and Triton's dependency finder accepts compiled helpers but
    # rejects an interpreted one as an "unsupported function". Skipped from that hash like a builtin: the
    # interpreter compiles nothing, so there is no cache the hash could make stale.
    _apply_act.__triton_builtin__ = True
    _round_tf32.__triton_builtin__ = True
