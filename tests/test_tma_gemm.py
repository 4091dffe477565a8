"""tma_gemm (1×1 stride-1 conv as a persistent tensor-descriptor GEMM) and the tactic registry.

Numerics against the unfolded float64 reference (conv → BN(eval, randomised) → (+residual) → ReLU) for the
ResNet-50 1×1 layer classes at reduced spatial size; applicability edges; ``kernels.tactics`` choice.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastres.fold import fold_conv_bn, pack_weight, round_tf32
from fastres.kernels import conv as gather
from fastres.kernels import tactics, tma_gemm
from fastres.kernels.tma_gemm import TmaGemmConfig, applicable, conv1x1_bias_act
from fastres.testing import assert_close

# (dtype, per-layer rel limit (DESIGN.md numerics: interpreter fp32, fp16), atol, rtol) per element.
DTYPES = [
    (torch.float32, 1e-5, 1e-4, 1e-4),
    (torch.float16, 5e-3, 2e-2, 1e-2),
]

# (name, N, C_in, H, W, C_out, residual): the ResNet-50 1×1 stride-1 classes (bottleneck conv1 and conv3
# of each stage) at 4×4 / 7×7, batch 1 and 2; and an odd M (2·13·11 = 286: three 128-row tiles, the last
# 30 rows deep, 6 tiles over the interpreter's 4 persistent programs).
SHAPES = [
    ("64->256+res b2 7x7", 2, 64, 7, 7, 256, True),
    ("256->64 b1 7x7", 1, 256, 7, 7, 64, False),
    ("1024->256 b2 4x4", 2, 1024, 4, 4, 256, False),
    ("256->1024+res b1 4x4", 1, 256, 4, 4, 1024, True),
    ("2048->512 b1 7x7", 1, 2048, 7, 7, 512, False),
    ("512->2048+res b2 4x4", 2, 512, 4, 4, 2048, True),
    ("odd_M 32->48+res b2 13x11", 2, 32, 13, 11, 48, True),
]


def make_conv_bn(c_in, c_out, r=1, stride=1, padding=0, groups=1, conv_bias=False):
    conv = nn.Conv2d(c_in, c_out, r, stride, padding, groups=groups, bias=conv_bias)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv.eval(), bn.eval()


def reference(x, conv, bn, residual, relu=True):
    """The unfolded module chain in float64 on the CPU."""
    with torch.no_grad():
        y = bn.double().cpu()(conv.double().cpu()(x.double().cpu()))
        if residual is not None:
            y = y + residual.double().cpu()
        return torch.relu(y) if relu else y


def poisoned(shape, dtype, device, channels_last=True):
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return out.to(memory_format=torch.channels_last) if channels_last else out


@pytest.mark.cuda_ok
@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_tma_gemm_matches_unfolded_reference(shape, dtype, rel, atol, rtol, device):
    _, n, c_in, h, w, c_out, has_res = shape
    conv, bn = make_conv_bn(c_in, c_out, conv_bias=has_res)
    x = torch.randn(n, c_in, h, w).to(dtype).to(memory_format=torch.channels_last)
    # The residual in the other float dtype, NCHW-contiguous: the strided epilogue load and its cast.
    res_dtype = torch.float32 if dtype == torch.float16 else torch.float16
    res = torch.randn(n, c_out, h, w).to(res_dtype) if has_res else None
    # fp16 inputs are rounded before the kernel sees them; the reference sees the same values, in fp64.
    ref = reference(x, conv, bn, res)

    folded = fold_conv_bn(conv.to(device), bn.to(device), dtype, precision="ieee")
    assert applicable(x.to(device), folded.weight) is None
    out = poisoned((n, c_out, h, w), dtype, device)
    y = conv1x1_bias_act(
        x.to(device),
        folded.weight,
        folded.bias,
        residual=None if res is None else res.to(device),
        precision="ieee",
        out=out,
    )
    assert y.data_ptr() == out.data_ptr()
    assert not y.isnan().any(), "an output element was never written"
    if dtype == torch.float16:
        # The reference above is exact; the fp16 kernel also holds fp16-rounded weights.
        ref16 = reference(x, conv.half().float(), bn, res)
        assert_close(y, ref16, rel=rel, atol=atol, rtol=rtol, what=f"{shape[0]} {dtype} vs fp16 weights")
    assert_close(y, ref, rel=rel, atol=atol, rtol=rtol, what=f"{shape[0]} {dtype}")


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "res_layout, out_layout",
    [("channels_last", "channels_last"), ("channels_last", "nchw"), ("nchw", "nchw"), (None, "nchw")],
)
def test_descriptor_and_strided_epilogue_paths_agree_with_reference(
    res_layout, out_layout, dtype, rel, atol, rtol
):
    """Residual through a descriptor or strided loads; output through a descriptor store or a masked
    pointer store (an NCHW ``out``); odd M (3·5·7 = 105) and ReLU off, so negative values must survive."""
    n, c_in, h, w, c_out = 3, 48, 5, 7, 40
    conv, bn = make_conv_bn(c_in, c_out)
    x = torch.randn(n, c_in, h, w).to(dtype).to(memory_format=torch.channels_last)
    res = None
    if res_layout is not None:
        res = torch.randn(n, c_out, h, w).to(dtype)
        if res_layout == "channels_last":
            res = res.to(memory_format=torch.channels_last)
    folded = fold_conv_bn(conv, bn, dtype, precision="ieee")
    out = poisoned((n, c_out, h, w), dtype, "cpu", channels_last=out_layout == "channels_last")
    y = conv1x1_bias_act(x, folded.weight, folded.bias, residual=res, relu=False, precision="ieee", out=out)
    assert not y.isnan().any()
    assert (y < 0).any(), "relu=False must keep negative outputs"
    ref = reference(x, conv.to(dtype).float(), bn, res, relu=False)
    assert_close(y, ref, rel=rel, atol=atol, rtol=rtol, what=f"res {res_layout} out {out_layout} {dtype}")


def test_persistent_programs_cover_every_tile_with_any_grid():
    """1, 3 and 7 persistent programs over 3 × 3 tiles (32×16 blocks): every tile computed, none twice, the
    same result as the gather kernel. The output aliases the residual (each tile reads its residual, then
    stores over it), so a tile computed a second time would add the residual twice."""
    n, c_in, h, w, c_out = 2, 32, 5, 9, 48  # M = 90: three 32-row tiles, the last 26 rows deep
    conv, bn = make_conv_bn(c_in, c_out)
    x = torch.randn(n, c_in, h, w).to(memory_format=torch.channels_last)
    res = torch.randn(n, c_out, h, w)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    expected = gather.conv_bias_act(x, folded.weight, folded.bias, residual=res, precision="ieee")
    for programs in (1, 3, 7):
        cfg = TmaGemmConfig(32, 16, 16, num_programs=programs)
        inplace = res.clone()
        y = conv1x1_bias_act(
            x, folded.weight, folded.bias, residual=inplace, precision="ieee", out=inplace, config=cfg
        )
        assert_close(y, expected, rel=1e-6, atol=1e-5, rtol=1e-5, what=f"{programs} programs")


def test_fp32_output_rounded_to_tf32_when_the_device_asks(monkeypatch):
    """ROUND_TF32: on a device whose fp32 dots are tf32 the epilogue rounds the output (nearest even).
    Emulated here by listing the CPU as such a device: the result must equal round_tf32(ieee result)."""
    conv, bn = make_conv_bn(64, 32)
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    exact = conv1x1_bias_act(x, folded.weight, folded.bias, precision="tf32")  # CPU: no rounding
    monkeypatch.setattr(tma_gemm, "TF32_ROUND_DEVICE_TYPES", ("cpu",))
    rounded = conv1x1_bias_act(x, folded.weight, folded.bias, precision="tf32")
    assert not torch.equal(exact, rounded), "rounding changed nothing: the flag did not reach the kernel"
    assert torch.equal(rounded, round_tf32(exact))


def _packed(c_out, c_in, r=1, groups=1, dtype=torch.float32):
    return pack_weight(torch.randn(c_out, c_in // groups, r, r, dtype=dtype))


def _nhwc(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)


# (case, x, w, conv kwargs, a phrase the reason must contain)
NOT_APPLICABLE = [
    ("fp16 C_in=12", _nhwc(1, 12, 4, 4, torch.float16), _packed(16, 12, dtype=torch.float16), {},
     "x rows of C_in=12 x 2 B"),
    ("fp16 C_out=12", _nhwc(1, 16, 4, 4, torch.float16), _packed(12, 16, dtype=torch.float16), {},
     "weight rows of C_out=12"),
    ("fp32 C_in=6", _nhwc(1, 6, 4, 4), _packed(16, 6), {}, "x rows of C_in=6 x 4 B"),
    ("stride3", _nhwc(1, 16, 4, 4), _packed(16, 16), {"stride": 3}, "stride (3, 3)"),
    ("stride2 fp16 C_in=12", _nhwc(1, 12, 5, 5, torch.float16), _packed(16, 12, dtype=torch.float16),
     {"stride": 2}, "x rows of C_in=12 x 2 B"),
    ("stride2 nchw_x", torch.randn(1, 16, 5, 5), _packed(16, 16), {"stride": 2}, "not channels_last"),
    ("3x3", _nhwc(1, 16, 4, 4), _packed(16, 16, r=3), {"padding": 1}, "3x3 kernel"),
    ("padding", _nhwc(1, 16, 4, 4), _packed(16, 16), {"padding": 1}, "padding (1, 1)"),
    ("groups", _nhwc(1, 16, 4, 4), _packed(16, 16, groups=2), {"groups": 2}, "groups=2"),
    ("nchw_x", torch.randn(1, 16, 4, 4), _packed(16, 16), {}, "not channels_last-contiguous"),
    ("sliced_channels", _nhwc(1, 32, 4, 4)[:, :16], _packed(16, 16), {}, "not channels_last-contiguous"),
    ("unpacked_weight", _nhwc(1, 16, 4, 4), torch.randn(16, 16, 1, 1), {}, "not the packed layout"),
    ("dtype_mismatch", _nhwc(1, 16, 4, 4), _packed(16, 16, dtype=torch.float16), {}, "dtypes"),
]


@pytest.mark.parametrize("case, x, w, kwargs, reason", NOT_APPLICABLE, ids=[c[0] for c in NOT_APPLICABLE])
def test_not_applicable_with_a_reason(case, x, w, kwargs, reason):
    why = applicable(x, w, **kwargs)
    assert why is not None and reason in why, f"{case}: {why!r}"
    # The tactic registry says the same and falls back to gather, even when tma_gemm is preferred.
    name, because = tactics.choose(x, w, env="tma_gemm,gather", **kwargs)
    assert name == "gather" and reason in because, (name, because)


def test_misaligned_base_is_not_applicable_and_the_launcher_refuses():
    buf = torch.randn(1 * 4 * 4 * 16 + 1)
    x = buf[1:].view(1, 4, 4, 16).permute(0, 3, 1, 2)  # channels_last-contiguous, base 4 bytes off
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 == 4
    w = _packed(16, 16)
    assert "base address" in applicable(x, w)
    with pytest.raises(ValueError, match="base address"):
        conv1x1_bias_act(x, w, torch.randn(16))


def test_missing_descriptor_api_is_a_reason_not_a_crash(monkeypatch):
    """A Triton without device-side descriptors (older than 3.4): tma_gemm reports itself not applicable."""
    monkeypatch.delattr(tma_gemm.tl, "make_tensor_descriptor")
    x, w = _nhwc(1, 16, 4, 4), _packed(16, 16)
    why = applicable(x, w)
    assert why is not None and "make_tensor_descriptor" in why
    assert tactics.choose(x, w, env="tma_gemm")[0] == "gather"


def test_launcher_argument_errors():
    x, w, b = _nhwc(1, 16, 4, 4), _packed(32, 16), torch.randn(32)
    with pytest.raises(ValueError, match="bias has 16 entries"):
        conv1x1_bias_act(x, w, torch.randn(16))
    with pytest.raises(TypeError, match="bias has dtype"):
        conv1x1_bias_act(x, w, b.half())
    with pytest.raises(ValueError, match="residual shape"):
        conv1x1_bias_act(x, w, b, residual=torch.randn(1, 32, 4, 5))
    with pytest.raises(ValueError, match="out must be"):
        conv1x1_bias_act(x, w, b, out=torch.empty(1, 32, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="precision"):
        conv1x1_bias_act(x, w, b, precision="fp64")
    with pytest.raises(ValueError, match="stride"):
        tactics.conv_bias_act(x, w, b, stride=3, tactic="tma_gemm")


def test_gpu_config_and_persistent_grid():
    from fastres.kernels.tma_gemm import num_programs, pick_config

    cfg = pick_config(32 * 56 * 56, 256, 64, torch.float16, interpret=False)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (128, 128, 64, 8)
    assert pick_config(49, 2048, 512, torch.float32, interpret=False).block_k == 32
    assert pick_config(49, 2048, 512, torch.float32, interpret=False).num_warps == 4
    # 784 × 2 tiles over 132 SMs: one program per SM; 1 × 4 tiles: 4 programs, never an idle one.
    assert cfg.programs_per_sm == 1 and num_programs(cfg, 32 * 56 * 56, 256, 132) == 132
    assert num_programs(cfg, 49, 512, 132) == 4
    # 128×64 tiles: two programs fit on an SM (kernel report), so two per SM.
    narrow = pick_config(32 * 56 * 56, 64, 256, torch.float16, interpret=False)
    assert narrow.block_n == 64 and num_programs(narrow, 32 * 56 * 56, 64, 132) == 264


# ---- tactic registry ----


def test_default_is_gather_and_env_selects_tma_gemm(monkeypatch):
    x, w = _nhwc(1, 64, 4, 4), _packed(32, 64)
    monkeypatch.delenv("FASTRES_TACTICS", raising=False)
    name, why = tactics.choose(x, w)
    assert name == "gather" and "default" in why
    monkeypatch.setenv("FASTRES_TACTICS", "tma_gemm,gather")
    assert tactics.choose(x, w) == ("tma_gemm", "tma_gemm: first applicable in FASTRES_TACTICS")
    # Preference is the listed order, and gather is always the fallback.
    assert tactics.choose(x, w, env="gather,tma_gemm")[0] == "gather"
    assert tactics.enabled("tma_gemm") == (("tma_gemm", "gather"), True)
    with pytest.raises(ValueError, match="unknown tactic"):
        tactics.enabled("tma_gemm,winograd")


def test_tuned_choice_and_its_limits(monkeypatch):
    monkeypatch.delenv("FASTRES_TACTICS", raising=False)
    x, w = _nhwc(1, 64, 4, 4), _packed(32, 64)
    assert tactics.choose(x, w, tuned="tma_gemm") == ("tma_gemm", "tma_gemm: tuned table")
    # FASTRES_TACTICS restricts even a tuned choice.
    name, why = tactics.choose(x, w, tuned="tma_gemm", env="gather")
    assert name == "gather" and "leaves it out" in why
    # A tuned tactic that cannot run this conv falls back with its reason.
    name, why = tactics.choose(x, w, stride=3, tuned="tma_gemm")
    assert name == "gather" and "stride (3, 3)" in why
    # The dual GEMM (projection shortcut) is gather's alone.
    name, why = tactics.choose(x, w, shortcut=True, tuned="tma_gemm")
    assert name == "gather" and "shortcut" in why


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
def test_tactics_conv_bias_act_runs_either_tactic_with_conv_signature(monkeypatch, dtype, rel, atol, rtol):
    """One call with conv.conv_bias_act's signature: the 1×1 layer through tma_gemm when chosen, a 3×3
    and a tail with its projection shortcut through gather; all against the fp64 reference."""
    calls = []
    real = tma_gemm.conv1x1_bias_act
    monkeypatch.setattr(tma_gemm, "conv1x1_bias_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTRES_TACTICS", "tma_gemm,gather")
    conv, bn = make_conv_bn(64, 64, conv_bias=True)
    x = torch.randn(2, 64, 5, 5).to(dtype).to(memory_format=torch.channels_last)
    res = torch.randn(2, 64, 5, 5).to(dtype)
    f = fold_conv_bn(conv, bn, dtype, precision="ieee")
    y = tactics.conv_bias_act(x, f.weight, f.bias, residual=res, stride=1, padding=0, precision="ieee")
    assert calls == [1]
    assert_close(y, reference(x, conv.to(dtype).float(), bn, res), rel=rel, atol=atol, rtol=rtol, what="1x1")

    conv3, bn3 = make_conv_bn(64, 32, r=3, padding=1)
    f3 = fold_conv_bn(conv3, bn3, dtype, precision="ieee")
    y3 = tactics.conv_bias_act(x, f3.weight, f3.bias, padding=1, precision="ieee")
    assert calls == [1], "a 3x3 conv must not reach tma_gemm"
    ref3 = reference(x, conv3.to(dtype).float(), bn3, None)
    assert_close(y3, ref3, rel=rel, atol=atol, rtol=rtol, what="3x3")

    sc = fold_conv_bn(*make_conv_bn(64, 64), dtype, precision="ieee")
    ys = tactics.conv_bias_act(
        x, f.weight, f.bias, shortcut_x=x, shortcut_weight=sc.weight, shortcut_stride=1, precision="ieee"
    )
    assert calls == [1], "the dual GEMM must not reach tma_gemm"
    expected = F.relu(
        F.conv2d(x.double(), f.weight.double(), f.bias.double()) + F.conv2d(x.double(), sc.weight.double())
    )
    assert_close(ys, expected, rel=rel, atol=atol, rtol=rtol, what="1x1 + shortcut")


# ---- stride 2: the strided 4-D view ----

# (name, N, C_in, H, W, C_out, residual, act): even and odd H/W (P = (H - 1)//2 + 1), batch 1 and 2, the
# ResNet-50 downsample class (C_out = 2·C_in... at reduced size), ReLU, identity and leaky ReLU.
STRIDE2 = [
    ("even 8x8 b2 +res relu", 2, 32, 8, 8, 64, True, "relu"),
    ("odd 7x7 b1 identity", 1, 64, 7, 7, 128, False, "identity"),
    ("odd H 9x6 b2 +res leaky", 2, 16, 9, 6, 48, True, "leaky_relu"),
    ("odd W 6x11 b1 relu", 1, 48, 6, 11, 32, False, "relu"),
    ("1x1 spatial b2", 2, 16, 1, 1, 16, True, "identity"),
]


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", STRIDE2, ids=[c[0] for c in STRIDE2])
def test_stride2_matches_unfolded_reference(case, dtype, rel, atol, rtol):
    """Stride 2 through the strided view: the fp64 reference of the unfolded conv → BN (→ +res) → act, the
    output NaN-poisoned beforehand (every element written), through tactics.choose when tma_gemm is
    preferred; the residual NCHW in the other dtype (strided epilogue load) or channels_last (descriptor)."""
    _, n, c_in, h, w, c_out, has_res, act = case
    conv, bn = make_conv_bn(c_in, c_out, stride=2, conv_bias=has_res)
    x = torch.randn(n, c_in, h, w).to(dtype).to(memory_format=torch.channels_last)
    p, q = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    res = None
    if has_res:
        res = torch.randn(n, c_out, p, q)
        res = res.to(dtype).to(memory_format=torch.channels_last) if n == 2 else res.half()
    folded = fold_conv_bn(conv, bn, dtype, precision="ieee")
    assert applicable(x, folded.weight, stride=2) is None
    assert tactics.choose(x, folded.weight, stride=2, env="tma_gemm")[0] == "tma_gemm"
    out = poisoned((n, c_out, p, q), dtype, "cpu")
    slope = 0.1
    y = tactics.conv_bias_act(
        x, folded.weight, folded.bias, residual=res, stride=2, act=act, act_a=slope, precision="ieee",
        out=out, tactic="tma_gemm",
    )  # fmt: skip
    assert y.data_ptr() == out.data_ptr() and y.shape == (n, c_out, p, q)
    assert not y.isnan().any(), "an output element was never written"
    with torch.no_grad():
        ref = bn.double()(conv.to(dtype).double()(x.double()))
        if res is not None:
            ref = ref + res.double()
        acts = {"relu": torch.relu, "identity": lambda t: t, "leaky_relu": lambda t: F.leaky_relu(t, slope)}
        ref = acts[act](ref)
    assert_close(y, ref, rel=rel, atol=atol, rtol=rtol, what=f"{case[0]} {dtype}")


def test_stride2_every_output_written_once_with_any_grid_and_box():
    """1, 3 and 7 persistent programs, 16- and 32-pixel boxes over odd 9×13 inputs (5×7 outputs: boxes
    that stick out at the bottom and right), an NCHW output (masked pointer stores) and an output that
    aliases the residual: a pixel computed twice would add the residual twice, one skipped keeps it."""
    n, c_in, h, w, c_out = 2, 32, 9, 13, 48
    conv, bn = make_conv_bn(c_in, c_out, stride=2)
    x = torch.randn(n, c_in, h, w).to(memory_format=torch.channels_last)
    res = torch.randn(n, c_out, 5, 7)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    expected = gather.conv_bias_act(x, folded.weight, folded.bias, residual=res, stride=2, precision="ieee")
    for programs, block_m, layout in ((1, 16, "cl"), (3, 32, "nchw"), (7, 16, "nchw"), (3, 32, "cl")):
        cfg = TmaGemmConfig(block_m, 16, 16, num_programs=programs)
        inplace = res.clone()
        if layout == "cl":
            inplace = inplace.to(memory_format=torch.channels_last)
        y = conv1x1_bias_act(
            x, folded.weight, folded.bias, residual=inplace, stride=2, precision="ieee", out=inplace,
            config=cfg,
        )  # fmt: skip
        what = f"{programs} programs {block_m} {layout}"
        assert_close(y, expected, rel=1e-6, atol=1e-5, rtol=1e-5, what=what)


def test_stride2_pixel_box_and_tiles():
    from fastres.kernels.tma_gemm import m_tiles, pick_config, pixel_box

    assert pixel_box(128, 7) == (16, 8) and pixel_box(128, 14) == (8, 16) and pixel_box(16, 100) == (1, 16)
    # 7×7 outputs: a 64-pixel box (49 useful), not 128; 28×28: 4×32 boxes, 7 per image.
    assert pick_config(32 * 49, 2048, 1024, torch.float16, interpret=False, out_hw=(7, 7)).block_m == 64
    cfg = pick_config(32 * 784, 1024, 512, torch.float16, interpret=False, out_hw=(28, 28))
    assert cfg.block_m == 128 and m_tiles(cfg, 32 * 784, batch=32, out_hw=(28, 28)) == 32 * 7


# ---- warp specialisation: a config field, forced off where Triton lacks it ----


def test_warp_specialize_field_guard_and_candidates(monkeypatch):
    from fastres.kernels import tuning

    ws = TmaGemmConfig(128, 128, 64, 8, 3, warp_specialize=1)
    assert tma_gemm.use_warp_specialize(TmaGemmConfig(128, 128, 64)) is False
    assert tma_gemm.use_warp_specialize(ws) is tma_gemm.WARP_SPECIALIZE_AVAILABLE
    cands = tuning.tma_gemm_candidates(32 * 56 * 56, 256, 64, torch.float16)
    with_ws = [c for c in cands if c.warp_specialize]
    assert len(with_ws) == (2 if tma_gemm.WARP_SPECIALIZE_AVAILABLE else 0)
    assert len(set(cands)) == len(cands)
    # A Triton whose tl.range has no warp_specialize: the field is forced off, no such candidates.
    monkeypatch.setattr(tma_gemm, "WARP_SPECIALIZE_AVAILABLE", False)
    assert tma_gemm.use_warp_specialize(ws) is False
    assert not any(c.warp_specialize for c in tuning.tma_gemm_candidates(32 * 3136, 256, 64, torch.float16))


def test_warp_specialize_config_runs_and_round_trips_through_a_table(tmp_path):
    """The warp-specialised K loop (a plain loop in the interpreter) gives the gather result; the field
    survives a tuned table's JSON (the reader takes positive ints or null, not bools)."""
    from fastres.kernels import tuning

    conv, bn = make_conv_bn(64, 32)
    x = torch.randn(2, 64, 5, 5).to(memory_format=torch.channels_last)
    f = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    ws = TmaGemmConfig(32, 16, 16, num_programs=3, warp_specialize=1)
    for stride in (1, 2):
        ref = gather.conv_bias_act(x, f.weight, f.bias, stride=stride, precision="ieee")
        y = conv1x1_bias_act(x, f.weight, f.bias, stride=stride, precision="ieee", config=ws)
        assert_close(y, ref, rel=1e-6, atol=1e-5, rtol=1e-5, what=f"warp-specialised stride {stride}")
    entry = tuning.Entry("tma_gemm", ws, 0.02)
    path = tuning.write_table(tmp_path / "sm_90.json", "sm_90", {"k": entry})
    assert tuning.read_table(path, strict=True)["k"].config == ws
    off = tuning.Entry("tma_gemm", TmaGemmConfig(32, 16, 16), 0.02)
    path = tuning.write_table(tmp_path / "b" / "sm_90.json", "sm_90", {"k": off})
    assert tuning.read_table(path, strict=True)["k"].config.warp_specialize is None


def test_tuner_drops_a_tma_gemm_candidate_that_cannot_compile(tmp_path):
    """The one-shot tuner on a 1×1 stride-2 layer: a tma_gemm config that cannot compile (block_m 24, not a
    power of two) is dropped with its reason, the warp-specialised and plain ones are timed; no crash."""
    from fastres.tuning import Layer, tune_layers

    broken = TmaGemmConfig(24, 16, 16, num_programs=2)
    plain = TmaGemmConfig(16, 16, 16, num_programs=2)
    good = [plain, TmaGemmConfig(16, 16, 16, num_programs=2, warp_specialize=1)]
    timed = []

    def candidates(tactic, layer, batch, dtype):
        return [*good, broken] if tactic == "tma_gemm" else [None] if tactic != "gather" else [
            gather.ConvConfig(16, 16, 16, 4, 2)]

    def timer(fn, choice):
        timed.append((choice.tactic, choice.config))
        return 1.0 if choice.tactic == "tma_gemm" else 2.0

    result = tune_layers(
        [Layer("ds", 16, 5, 5, 32, 1, 1, stride=2)], tmp_path / "sm_90.json", batches=(1,),
        dtypes=(torch.float16,), budget_s=1e9, device="cpu", arch="sm_90", candidates=candidates, timer=timer,
        tactics=("gather", "tma_gemm"), log=lambda s: None,
    )  # fmt: skip
    assert [(t, c) for _, t, c, why in result.dropped] == [("tma_gemm", broken)]
    assert "failed to compile or launch" in result.dropped[0][3]
    assert {c for t, c in timed if t == "tma_gemm"} == set(good)
