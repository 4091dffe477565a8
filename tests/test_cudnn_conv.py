"""The cudnn tactic (kernels/cudnn_conv.py): both branches against the unfolded float64 reference.

- conv2d + Triton epilogue: runs for real here (F.conv2d on the CPU, the epilogue in the interpreter).
- cuDNN fused (``torch.cudnn_convolution_relu`` / ``_add_relu``): cannot run without a GPU, so its call
  is recorded: the CPU is listed as a fused device and both ops are replaced by recorders that compute
  what cuDNN computes (relu(conv + alpha·z + bias), F.conv2d in x's dtype) and keep their arguments
  (weight layout, bias dtype, alpha, z, stride ...). The GPU tests at the end run both for real.
"""

import pytest
import torch
import torch.nn.functional as F
from test_activations import ACTS, EDGES, eager_act

from fastres import activations
from fastres.fold import fold_conv_bn, pack_weight, round_tf32
from fastres.kernels import conv as gather
from fastres.kernels import cudnn_conv, tactics
from fastres.kernels.cudnn_conv import applicable, conv_bias_act, cudnn_bias, cudnn_weight
from fastres.testing import assert_close

from test_kernels import make_conv_bn

# (dtype, per-layer rel limit (DESIGN.md numerics: interpreter fp32, fp16, bf16), atol, rtol) per element.
DTYPES = [
    (torch.float32, 1e-5, 1e-4, 1e-4),
    (torch.float16, 5e-3, 2e-2, 1e-2),
    (torch.bfloat16, 2e-2, 1e-1, 1e-1),
]
INF, NAN = float("inf"), float("nan")

# (name, N, C_in, H, W, C_out, R, stride, padding): the ResNet-50 layer classes at reduced spatial size.
SHAPES = [
    ("stem 3->64 7x7/s2", 2, 3, 23, 19, 64, 7, 2, 3),
    ("1x1/s1 256->64", 2, 256, 7, 7, 64, 1, 1, 0),
    ("1x1/s2 512->1024", 1, 512, 7, 7, 1024, 1, 2, 0),
    ("3x3/s1 64->64", 2, 64, 8, 8, 64, 3, 1, 1),
    ("3x3/s2 128->128", 1, 128, 9, 11, 128, 3, 2, 1),
]


def out_hw(h, w, r, stride, padding):
    return (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1


def reference(x, conv, bn, residual=None, shortcut=None, act="relu", a=0.0, b=0.0):
    """act(bn(conv(x)) (+ residual) (+ shortcut)) from the unfolded modules in float64 on the CPU."""
    with torch.no_grad():
        y = bn.double().cpu()(conv.double().cpu()(x.double().cpu()))
        if residual is not None:
            y = y + residual.double().cpu()
        if shortcut is not None:
            y = y + shortcut.double().cpu()
        return activations.apply(y, act, a, b)


def poisoned(shape, dtype, device="cpu"):
    return torch.full(shape, NAN, dtype=dtype, device=device).to(memory_format=torch.channels_last)


class CudnnRecorder:
    """Stands in for torch.cudnn_convolution_relu / _add_relu on the CPU: records each call's arguments and
    computes what cuDNN computes, in x's dtype."""

    def __init__(self):
        self.calls = []

    def relu(self, x, w, bias, stride, padding, dilation, groups):
        self.calls.append(
            dict(
                op="relu",
                x=x,
                w=w,
                bias=bias,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
            )
        )
        return torch.relu(F.conv2d(x, w, bias, stride, padding, dilation, groups))

    def add_relu(self, x, w, z, alpha, bias, stride, padding, dilation, groups):
        self.calls.append(
            dict(
                op="add_relu",
                x=x,
                w=w,
                z=z,
                alpha=alpha,
                bias=bias,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
            )
        )
        return torch.relu(F.conv2d(x, w, bias, stride, padding, dilation, groups) + alpha * z)


@pytest.fixture
def cudnn_calls(monkeypatch):
    """The cuDNN fused branch taken on the CPU, with the recorder in place of cuDNN."""
    rec = CudnnRecorder()
    monkeypatch.setattr(cudnn_conv, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "cudnn_convolution_relu", rec.relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", rec.add_relu)
    return rec


def _layer(shape, dtype, residual):
    _, n, c_in, h, w, c_out, r, stride, padding = shape
    conv, bn = make_conv_bn(c_in, c_out, r, stride, padding, 1, 1, conv_bias=residual)
    x = torch.randn(n, c_in, h, w).to(dtype).to(memory_format=torch.channels_last)
    p, q = out_hw(h, w, r, stride, padding)
    res = torch.randn(n, c_out, p, q).to(dtype) if residual else None
    folded = fold_conv_bn(conv, bn, dtype, precision="ieee")
    # The reference sees the same dtype-rounded x, residual and conv weight, in float64.
    return x, res, folded, conv.to(dtype), bn, (n, c_out, p, q), dict(stride=stride, padding=padding)


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_epilogue_branch_matches_unfolded_reference(shape, residual, dtype, rel, atol, rtol):
    x, res, folded, conv, bn, oshape, kw = _layer(shape, dtype, residual)
    assert (
        cudnn_conv.branch(x, act="relu", residual=res, shortcut=False, precision="ieee") == "conv2d+epilogue"
    )
    out = poisoned(oshape, dtype)
    y = conv_bias_act(x, folded.weight, folded.bias, residual=res, precision="ieee", out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert not y.isnan().any(), "an output element was never written"
    assert_close(y, reference(x, conv, bn, res), rel=rel, atol=atol, rtol=rtol, what=f"{shape[0]} {dtype}")


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_fused_branch_call_recorded(shape, dtype, rel, atol, rtol, cudnn_calls):
    """ReLU without a residual: one torch.cudnn_convolution_relu call with the OIHW channels_last weight,
    the bias in x's dtype and the conv's geometry as lists; no Triton launch, the result in ``out``."""
    x, _, folded, conv, bn, oshape, kw = _layer(shape, dtype, False)
    out = poisoned(oshape, dtype)
    y = conv_bias_act(x, folded.weight, folded.bias, precision="ieee", out=out, **kw)
    (call,) = cudnn_calls.calls
    assert call["op"] == "relu" and call["x"] is x
    w = call["w"]
    assert w.shape == folded.weight.shape and w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w, folded.weight)
    assert call["bias"].dtype == dtype and torch.equal(call["bias"], folded.bias.to(dtype))
    assert call["stride"] == [kw["stride"]] * 2 and call["padding"] == [kw["padding"]] * 2
    assert call["dilation"] == [1, 1] and call["groups"] == 1
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    assert_close(y, reference(x, conv, bn), rel=rel, atol=atol, rtol=rtol, what=f"{shape[0]} {dtype}")


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES[:2])
def test_fused_add_relu_with_residual_recorded(dtype, rel, atol, rtol, cudnn_calls):
    """ReLU after a residual of x's dtype: cudnn_convolution_add_relu with z = the residual, alpha 1."""
    x, res, folded, conv, bn, _, kw = _layer(SHAPES[3], dtype, True)
    y = conv_bias_act(x, folded.weight, folded.bias, residual=res, precision="ieee", **kw)
    (call,) = cudnn_calls.calls
    assert call["op"] == "add_relu" and call["z"] is res and call["alpha"] == 1.0
    assert call["bias"].dtype == dtype and call["w"].is_contiguous(memory_format=torch.channels_last)
    assert_close(y, reference(x, conv, bn, res), rel=rel, atol=atol, rtol=rtol, what=f"add_relu {dtype}")


def _tail(dtype, stride=2):
    """A bottleneck tail (1x1 64->256) and its projection shortcut (1x1 128->256, stride 2), folded."""
    conv3, bn3 = make_conv_bn(64, 256, 1, 1, 0, 1, 1)
    conv_ds, bn_ds = make_conv_bn(128, 256, 1, stride, 0, 1, 1)
    xs = torch.randn(2, 128, 9, 9).to(dtype).to(memory_format=torch.channels_last)
    p = (9 - 1) // stride + 1
    y = torch.randn(2, 64, p, p).to(dtype).to(memory_format=torch.channels_last)
    main = fold_conv_bn(conv3, bn3, dtype, precision="ieee")
    short = fold_conv_bn(conv_ds, bn_ds, dtype, precision="ieee")
    ref_sc = reference(xs, conv_ds.to(dtype), bn_ds, act="identity")
    return y, xs, main, short, conv3.to(dtype), bn3, ref_sc


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES[:2])
def test_projection_shortcut_fused_as_add_relu_recorded(dtype, rel, atol, rtol, cudnn_calls):
    """The dual GEMM as two convs: the shortcut by F.conv2d, then add_relu with z = its output."""
    y, xs, main, short, conv3, bn3, ref_sc = _tail(dtype)
    got = conv_bias_act(
        y,
        main.weight,
        main.bias + short.bias,
        shortcut_x=xs,
        shortcut_weight=short.weight,
        shortcut_stride=2,
        precision="ieee",
    )
    (call,) = cudnn_calls.calls
    assert call["op"] == "add_relu" and call["alpha"] == 1.0 and call["z"].shape == got.shape
    assert_close(
        call["z"],
        F.conv2d(xs.double(), short.weight.double(), stride=2),
        rel=rel,
        atol=atol,
        rtol=rtol,
        what="z is the shortcut conv",
    )
    assert_close(
        got,
        reference(y, conv3, bn3, shortcut=ref_sc),
        rel=rel,
        atol=atol,
        rtol=rtol,
        what=f"tail+shortcut fused {dtype}",
    )


@pytest.mark.parametrize("dtype, rel, atol, rtol", DTYPES)
@pytest.mark.parametrize("act, a, b", [("relu", 0, 0), ("silu", 0, 0), ("hardtanh", 0.0, 6.0)])
def test_projection_shortcut_epilogue_branch(act, a, b, dtype, rel, atol, rtol):
    """Shortcut and residual both, or another activation: F.conv2d twice and the epilogue adds both."""
    y, xs, main, short, conv3, bn3, ref_sc = _tail(dtype)
    res = torch.randn(2, 256, 5, 5).to(dtype)
    out = poisoned((2, 256, 5, 5), dtype)
    got = conv_bias_act(
        y,
        main.weight,
        main.bias + short.bias,
        residual=res,
        shortcut_x=xs,
        shortcut_weight=short.weight,
        shortcut_stride=2,
        act=act,
        act_a=a,
        act_b=b,
        precision="ieee",
        out=out,
    )
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    ref = reference(y, conv3, bn3, residual=res, shortcut=ref_sc, act=act, a=a, b=b)
    assert_close(got, ref, rel=rel, atol=atol, rtol=rtol, what=f"tail+shortcut+res {act} {dtype}")


@pytest.mark.parametrize("case", ["silu", "identity", "residual_fp16", "tf32_output", "shortcut_and_res"])
def test_cases_cudnn_cannot_fuse_take_the_epilogue(case, cudnn_calls, monkeypatch):
    """Each reason not to fuse: no cuDNN call, and the epilogue gives the same as the gather kernel."""
    x, res, folded, conv, bn, _, kw = _layer(SHAPES[3], torch.float32, True)
    args = dict(residual=res, precision="ieee", **kw)
    if case in ("silu", "identity"):
        args["act"] = case
    elif case == "residual_fp16":
        args["residual"] = res.half()
    elif case == "tf32_output":
        args["precision"] = "tf32"  # fp32 outputs rounded to tf32 (emulated: the CPU listed as rounding)
        monkeypatch.setattr(cudnn_conv, "TF32_ROUND_DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(gather, "TF32_ROUND_DEVICE_TYPES", ("cuda", "cpu"))
    else:
        xs = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last)
        args.update(shortcut_x=xs, shortcut_weight=pack_weight(torch.randn(64, 32, 1, 1)), shortcut_stride=1)
    got = conv_bias_act(x, folded.weight, folded.bias, **args)
    assert cudnn_calls.calls == [], f"{case}: cuDNN's fused op cannot compute this"
    if case == "tf32_output":
        # The same sum as without rounding (F.conv2d on the CPU is exact fp32 either way), then rounded to
        # the nearest tf32 value in the epilogue, as the gather kernel's epilogue rounds.
        exact = conv_bias_act(x, folded.weight, folded.bias, **{**args, "precision": "ieee"})
        assert not torch.equal(got, exact), "rounding changed nothing: the flag did not reach the epilogue"
        assert torch.equal(got, round_tf32(exact))
        args["precision"] = "ieee"
        got = exact
    expected = gather.conv_bias_act(x, folded.weight, folded.bias, **args)
    assert_close(got, expected, rel=1e-5, atol=1e-4, rtol=1e-4, what=case)


def test_fused_branch_result_goes_into_out_aliasing_the_residual(cudnn_calls):
    x, res, folded, conv, bn, _, kw = _layer(SHAPES[1], torch.float32, True)
    ref = reference(x, conv, bn, res)
    inplace = res.clone()
    y = conv_bias_act(x, folded.weight, folded.bias, residual=inplace, out=inplace, precision="ieee", **kw)
    assert y.data_ptr() == inplace.data_ptr() and len(cudnn_calls.calls) == 1
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what="out is the residual")


def test_epilogue_in_place_on_conv_output_and_aliasing_the_residual():
    """No ``out``: the result is the conv output itself (channels_last); ``out`` = residual works too."""
    x, res, folded, conv, bn, _, kw = _layer(SHAPES[3], torch.float32, True)
    ref = reference(x, conv, bn, res)
    y = conv_bias_act(x, folded.weight, folded.bias, residual=res, precision="ieee", **kw)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what="new output")
    inplace = res.clone()
    y2 = conv_bias_act(x, folded.weight, folded.bias, residual=inplace, out=inplace, precision="ieee", **kw)
    assert y2.data_ptr() == inplace.data_ptr()
    assert_close(y2, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what="out is the residual")
    # An NCHW x and an NCHW out: strided loads and stores.
    out = torch.full(ref.shape, NAN)
    y3 = conv_bias_act(
        x.contiguous(), folded.weight, folded.bias, residual=res, precision="ieee", out=out, **kw
    )
    assert_close(y3, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what="nchw")


@pytest.mark.parametrize("name", list(ACTS))
def test_epilogue_activations_at_the_edges(name):
    """test_activations' edge values through an identity 1x1 conv (exact in fp32), NaN and ±Inf through
    the residual: every activation gives what the eager module gives."""
    c = 16
    finite = torch.tensor([v for v in EDGES if v == v and abs(v) != INF])
    x = torch.randn(2, c, 5, 4) * 4
    flat = x.permute(0, 2, 3, 1).reshape(-1)
    flat[: finite.numel()] = finite
    flat[-finite.numel() :] = finite.flip(0)
    x = flat.reshape(2, 5, 4, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    res = torch.zeros_like(x)
    for i, v in enumerate((NAN, INF, -INF, NAN, INF, -INF)):
        res[i % 2, 3 + i, i % 5, i % 4] = v
    weight = pack_weight(torch.eye(c).reshape(c, c, 1, 1))
    act = activations.from_module(eager_act(name))
    y = tactics.conv_bias_act(
        x,
        weight,
        torch.zeros(c),
        residual=res,
        act=act.name,
        act_a=act.a,
        act_b=act.b,
        precision="ieee",
        tactic="cudnn",
    )
    ref = eager_act(name)(x + res)
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what=name)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y[ref.isinf()], ref[ref.isinf()])


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid", "mish"])
def test_nan_and_inf_inputs_through_the_conv(act):
    """NaN and ±Inf in x (a 1x1 conv keeps them per pixel), batch 1, a poisoned out: as the reference."""
    conv, bn = make_conv_bn(16, 24, 1, 1, 0, 1, 1)
    x = torch.randn(1, 16, 5, 6)
    x[0, 1, 0, 0], x[0, 2, 1, 1], x[0, 0, 2, 3] = NAN, INF, -INF
    x = x.to(memory_format=torch.channels_last)
    folded = fold_conv_bn(conv, bn, torch.float32, precision="ieee")
    out = poisoned((1, 24, 5, 6), torch.float32)
    y = conv_bias_act(x, folded.weight, folded.bias, act=act, act_a=0.1, precision="ieee", out=out)
    ref = reference(x, conv, bn, act=act, a=0.1)
    assert ref.isnan().any() and not ref[0, :, 4, 5].isnan().any()
    assert_close(y, ref, rel=1e-5, atol=1e-4, rtol=1e-4, what=act)
    assert torch.equal(y.isnan(), ref.isnan())


def test_cudnn_weight_is_derived_once_and_reused():
    w = torch.randn(32, 16, 3, 3)
    packed = pack_weight(w)
    wc = cudnn_weight(packed)
    assert torch.equal(wc, w) and wc.is_contiguous(memory_format=torch.channels_last)
    assert wc.data_ptr() != packed.data_ptr()
    assert cudnn_weight(wc) is wc, "a derived weight must not be copied again"
    b = torch.randn(32)
    assert cudnn_bias(b, torch.float16).dtype == torch.float16 and cudnn_bias(b, torch.float32) is b
    # The launcher takes either weight and gives the same bits.
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    assert torch.equal(conv_bias_act(x, packed, b, padding=1), conv_bias_act(x, wc, b, padding=1))


def test_fused_bias_from_the_cache_is_passed_through(cudnn_calls):
    x, _, folded, conv, bn, _, kw = _layer(SHAPES[1], torch.float16, False)
    fb = cudnn_bias(folded.bias, torch.float16)
    conv_bias_act(x, cudnn_weight(folded.weight), folded.bias, fused_bias=fb, **kw)
    assert cudnn_calls.calls[0]["bias"] is fb
    with pytest.raises(ValueError, match="fused_bias"):
        conv_bias_act(x, folded.weight, folded.bias, fused_bias=folded.bias, **kw)


# ---- applicability and the tactic registry ----


def _x(dtype=torch.float32):
    return torch.randn(1, 16, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)


def _w(dtype=torch.float32, groups=1):
    return pack_weight(torch.randn(16, 16 // groups, 3, 3, dtype=dtype))


@pytest.mark.parametrize(
    "case, x, w, kwargs, reason",
    [
        ("fp64", _x(torch.float64), _w(torch.float64), {}, "dtype torch.float64"),
        ("dtype_mismatch", _x(), _w(torch.float16), {}, "weight dtype"),
        ("groups", _x(), _w(), {"groups": 3}, "groups=3"),
        ("3d", torch.randn(1, 16, 4), _w(), {}, "4-D"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_not_applicable_with_a_reason_falls_back_to_gather(case, x, w, kwargs, reason):
    why = applicable(x, w, **kwargs)
    assert why is not None and reason in why, f"{case}: {why!r}"
    name, because = tactics.choose(x, w, env="cudnn", **kwargs)
    assert name == "gather" and reason in because
    with pytest.raises(ValueError, match="cannot run this conv"):
        tactics.conv_bias_act(x, w, torch.randn(16), tactic="cudnn", **kwargs)


def test_device_rules(monkeypatch):
    assert applicable(_x(), _w()) is None  # the CPU under the interpreter
    assert cudnn_conv._device_reason(torch.device("cuda")) is None or not torch.backends.cudnn.is_available()
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)
    assert "not available" in cudnn_conv._device_reason(torch.device("cuda"))
    monkeypatch.undo()
    with torch.backends.cudnn.flags(enabled=False):
        assert "enabled is False" in cudnn_conv._device_reason(torch.device("cuda"))
    assert "needs CUDA" in cudnn_conv._device_reason(torch.device("meta"))
    monkeypatch.setattr(cudnn_conv, "INTERPRET", False)  # a CPU tensor without the interpreter
    assert "needs CUDA" in applicable(_x(), _w())
    assert tactics.choose(_x(), _w(), env="cudnn,gather")[0] == "gather"


def test_env_and_tuned_choose_cudnn_and_dispatch(monkeypatch):
    monkeypatch.delenv("FASTRES_TACTICS", raising=False)
    x, w = _x(), _w()
    assert tactics.DEFAULT_TACTICS == ("gather",)
    assert tactics.choose(x, w)[0] == "gather"
    assert tactics.choose(x, w, tuned="cudnn") == ("cudnn", "cudnn: tuned table")
    assert tactics.choose(x, w, tuned="cudnn", env="gather")[0] == "gather"
    assert tactics.choose(x, w, shortcut=True, env="cudnn")[0] == "cudnn", "two convs run the shortcut"
    monkeypatch.setenv("FASTRES_TACTICS", "cudnn")
    assert tactics.choose(x, w) == ("cudnn", "cudnn: first applicable in FASTRES_TACTICS")
    calls = []
    real = cudnn_conv.conv_bias_act
    monkeypatch.setattr(cudnn_conv, "conv_bias_act", lambda *a, **k: calls.append(k) or real(*a, **k))
    b, res = torch.randn(16), torch.randn(1, 16, 4, 4)
    y = tactics.conv_bias_act(x, w, b, residual=res, padding=1, act="leaky_relu", act_a=0.2, precision="ieee")
    assert len(calls) == 1 and calls[0]["act"] == "leaky_relu" and calls[0]["residual"] is res
    expected = gather.conv_bias_act(
        x, w, b, residual=res, padding=1, act="leaky_relu", act_a=0.2, precision="ieee"
    )
    assert_close(y, expected, rel=1e-5, atol=1e-4, rtol=1e-4, what="cudnn vs gather")


def test_launcher_argument_errors():
    x, w, b = _x(), _w(), torch.randn(16)
    with pytest.raises(ValueError, match="bias has 8 entries"):
        conv_bias_act(x, w, torch.randn(8), padding=1)
    with pytest.raises(TypeError, match="bias has dtype"):
        conv_bias_act(x, w, b.half(), padding=1)
    with pytest.raises(ValueError, match="residual shape"):
        conv_bias_act(x, w, b, residual=torch.randn(1, 16, 4, 5), padding=1)
    with pytest.raises(ValueError, match="out must be"):
        conv_bias_act(x, w, b, out=torch.empty(1, 16, 4, 4, dtype=torch.float16), padding=1)
    with pytest.raises(ValueError, match="precision"):
        conv_bias_act(x, w, b, precision="fp64", padding=1)
    with pytest.raises(ValueError, match="go together"):
        conv_bias_act(x, w, b, shortcut_x=x, padding=1)
    with pytest.raises(ValueError, match="smaller than"):
        conv_bias_act(torch.randn(1, 16, 2, 2), w, b)
    with pytest.raises(ValueError, match="unknown activation"):
        conv_bias_act(x, w, b, act="tanh")


# ---- on a GPU: both branches for real, against the gather kernel and the fp64 reference ----

GPU_DTYPES = [
    (torch.float16, "tf32", 5e-3),
    (torch.bfloat16, "tf32", 2e-2),
    (torch.float32, "tf32", 2e-3),
    (torch.float32, "ieee", 1e-5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, precision, rel", GPU_DTYPES)
@pytest.mark.parametrize(
    "act, residual, shortcut",
    [
        ("relu", False, False),  # cudnn_convolution_relu (fp16/bf16/fp32 ieee)
        ("relu", True, False),  # cudnn_convolution_add_relu
        ("relu", False, True),  # add_relu with z = the shortcut conv
        ("silu", True, False),  # conv2d + epilogue
        ("relu", True, True),  # conv2d twice + epilogue
    ],
)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_gpu_cudnn_matches_gather_and_reference(shape, act, residual, shortcut, dtype, precision, rel):
    _, n, c_in, h, w, c_out, r, stride, padding = shape
    conv, bn = make_conv_bn(c_in, c_out, r, stride, padding, 1, 1)
    x = torch.randn(n, c_in, h, w).to(dtype).to(memory_format=torch.channels_last)
    p, q = out_hw(h, w, r, stride, padding)
    res = torch.randn(n, c_out, p, q).to(dtype) if residual else None
    f = fold_conv_bn(conv.cuda(), bn.cuda(), dtype, precision=precision)
    args = dict(
        residual=None if res is None else res.cuda(),
        stride=stride,
        padding=padding,
        act=act,
        precision=precision,
    )
    ref_sc = None
    bias = f.bias
    if shortcut:
        cs, bs = make_conv_bn(32, c_out, 1, 1, 0, 1, 1)
        xs = torch.randn(n, 32, p, q).to(dtype).to(memory_format=torch.channels_last)
        fs = fold_conv_bn(cs.cuda(), bs.cuda(), dtype, precision=precision)
        args.update(shortcut_x=xs.cuda(), shortcut_weight=fs.weight, shortcut_stride=1)
        bias = f.bias + fs.bias
        ref_sc = reference(xs, cs.to(dtype), bs, act="identity")
    allow = torch.backends.cudnn.allow_tf32
    y = tactics.conv_bias_act(
        x.cuda(), f.weight, bias, out=poisoned((n, c_out, p, q), dtype, "cuda"), tactic="cudnn", **args
    )
    assert torch.backends.cudnn.allow_tf32 == allow, "the tf32 setting must be restored"
    g = tactics.conv_bias_act(x.cuda(), f.weight, bias, tactic="gather", **args)
    torch.cuda.synchronize()
    assert not y.isnan().any()
    ref = reference(x, conv.to(dtype), bn, res, ref_sc, act=act)
    assert_close(y, ref, rel=rel, atol=5 * rel, rtol=5 * rel, what=f"cudnn {shape[0]} {dtype} {precision}")
    assert_close(g, ref, rel=rel, atol=5 * rel, rtol=5 * rel, what=f"gather {shape[0]} {dtype} {precision}")
    if dtype == torch.float32 and precision == "tf32":
        assert torch.equal(y, round_tf32(y)), "fp32 tf32 outputs are rounded for the next layer"
