"""The CPU path (CPU tensors, interpreter off: fastres/cpu.py) and the triton_op registration it goes with.

Runs in subprocesses: the interpreter switch is read once, when triton is imported.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, torchvision
    import fastres, fastres.ops
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    f = fastres.convert(m)
    x = torch.randn(2, 3, 45, 37)
    with torch.inference_mode():
        out = f(x)
    with torch.no_grad():
        ref = m.double()(x.double())
    m.float()
    err = rel_err(out, ref)
    assert err < 1e-4, err
    args = (torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(2, 8, 6, 6),
            [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, 0.0)
    torch.library.opcheck(torch.ops.fastres.conv_bias_act.default, args)
    tail_args = (torch.randn(2, 4, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(8), torch.randn(2, 6, 6, 6),
                 torch.randn(8, 6, 1, 1), [1, 1], [1, 1], [1, 1], 1, [2, 2], "relu", 0.0, 0.0)
    torch.library.opcheck(torch.ops.fastres.conv_shortcut_bias_act.default, tail_args)
    pool_args = (torch.randn(1, 4, 7, 7), [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(torch.ops.fastres.max_pool2d.default, pool_args)
    torch.library.opcheck(torch.ops.fastres.global_avg_pool.default, (torch.randn(1, 4, 3, 5),))
    with torch.no_grad():
        c = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(c, ref) < 1e-4
    # torch.export traces the op bodies on fake tensors: plain aten ops, no opaque oneDNN tensors.
    ep = torch.export.export(f, (x,))
    assert "mkldnn" not in str(ep.graph), ep.graph
    with torch.no_grad():
        e = ep.module()(x)
    assert rel_err(e, ref) < 1e-4, rel_err(e, ref)
    print("OK", err)
""")

# What the CPU path runs and the pack cache beside the folded weights (fastres/cpu.py).
PACK_SCRIPT = textwrap.dedent('''
    import copy, warnings
    import torch, torchvision
    import torch.nn.functional as F
    from torch.profiler import profile
    import fastres, fastres.ops
    from fastres import cpu
    from fastres.fold import pack_weight
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)
    packs = []
    real_pack = cpu.pack_weight_cpu
    def counting_pack(w, stride, padding, dilation, groups, input_size):
        packs.append(input_size)
        return real_pack(w, stride, padding, dilation, groups, input_size)
    cpu.pack_weight_cpu = counting_pack

    def check(f, m, x, what):
        with torch.inference_mode():
            out = f(x)
        with torch.no_grad():  # a copy: m.double() would give f's shared parameters new storage
            ref = copy.deepcopy(m).double()(x.double())
        err = rel_err(out, ref)
        assert err < 1e-4, (what, err)
        return out

    def conv_calls(f, x):
        with torch.inference_mode(), profile() as p:
            f(x)
        counts = {e.key: e.count for e in p.key_averages()}
        fused = ("mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")
        return sum(counts.get(k, 0) for k in fused), counts.get("aten::convolution", 0)

    m = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    f = fastres.convert(m)
    x = torch.randn(2, 3, 64, 64)
    check(f, m, x, "resnet50")
    assert cpu.HAS_MKLDNN_OPS, "this torch has oneDNN: the fused path must be the one that runs"
    # Every one of ResNet-50's 53 convs (4 of them projection shortcuts) is one fused oneDNN call on a
    # prepacked weight, each packed once; a second forward packs nothing.
    assert conv_calls(f, x) == (53, 0), conv_calls(f, x)
    assert len(packs) == 53 and all(p is not None and p[0] == 2 for p in packs), packs
    check(f, m, x, "second forward")
    assert len(packs) == 53, len(packs)

    # A new spatial size (layer4 at 1x1 here) gets its own packs; the first size's are still kept.
    check(f, m, torch.randn(1, 3, 32, 32), "32x32")
    assert len(packs) == 106, len(packs)
    check(f, m, torch.randn(2, 3, 64, 64), "back to 64x64")
    assert len(packs) == 106, len(packs)

    # Never stale: in-place edits after a forward (a conv weight, a BN of a dual-GEMM tail, the
    # projection's BN, a stem statistic) make new folded tensors, hence new packs, and new outputs.
    with torch.no_grad():
        for model in (m, f):  # f is a copy (convert leaves m untouched): the same edits to both
            model.layer1[1].conv2.weight.mul_(1.5)
            model.layer2[0].bn3.running_var.add_(0.5)
            model.layer3[0].downsample[1].weight.mul_(-1)
            model.bn1.running_mean.add_(0.25)
    before = len(packs)
    check(f, m, x, "after in-place edits")
    assert len(packs) > before
    # refold() after a .data write (its own version counter) reaches the packs too.
    for model in (m, f):
        model.layer4[2].conv3.weight.data.mul_(0.5)
    fastres.refold(f)
    check(f, m, x, "after .data write and refold")

    # The op called directly: the pack is keyed on the weight tensor and its version, so an in-place
    # edit of the weight after a call repacks; the kernel's layout (C_out stride 1) is accepted as input.
    xs, b = torch.randn(2, 16, 9, 7), torch.randn(32)
    for w in (torch.randn(32, 16, 3, 3), pack_weight(torch.randn(32, 16, 3, 3))):
        args = ([2, 1], [1, 1], [1, 1], 1, "relu", 0.0, 0.0)
        with torch.inference_mode():
            y1 = torch.ops.fastres.conv_bias_act(xs, w, b, None, *args)
        assert rel_err(y1, torch.relu(F.conv2d(xs, w, b, [2, 1], 1))) < 1e-6
        with torch.no_grad():
            w.mul_(-2)
        with torch.inference_mode():
            y2 = torch.ops.fastres.conv_bias_act(xs, w, b, None, *args)
        assert rel_err(y2, torch.relu(F.conv2d(xs, w, b, [2, 1], 1))) < 1e-6
        assert y2.is_contiguous(memory_format=torch.channels_last)
    # Inference tensors have no version counter: never cached, so an edit inside inference mode is seen.
    with torch.inference_mode():
        w = torch.randn(32, 16, 1, 1)
        y1 = torch.ops.fastres.conv_bias_act(xs, w, b, None, [1, 1], [0, 0], [1, 1], 1, "identity", 0.0, 0.0)
        w.mul_(3)
        y2 = torch.ops.fastres.conv_bias_act(xs, w, b, None, [1, 1], [0, 0], [1, 1], 1, "identity", 0.0, 0.0)
        assert rel_err(y2, F.conv2d(xs, w, b)) < 1e-6 and rel_err(y1, F.conv2d(xs, w / 3, b)) < 1e-6
    # The binary variants: a residual (identity) and the dual-GEMM tail, with and without ReLU.
    w, res = torch.randn(32, 16, 3, 3), torch.randn(2, 32, 9, 7)
    ws, xsc = torch.randn(32, 8, 1, 1), torch.randn(2, 8, 18, 14)
    for relu in (True, False):
        act = torch.relu if relu else (lambda t: t)
        with torch.inference_mode():
            name = "relu" if relu else "identity"
            y = torch.ops.fastres.conv_bias_act(xs, w, b, res, [1, 1], [1, 1], [1, 1], 1, name, 0.0, 0.0)
            yt = torch.ops.fastres.conv_shortcut_bias_act(
                xs, w, b, xsc, ws, [1, 1], [1, 1], [1, 1], 1, [2, 2], name, 0.0, 0.0)
        assert rel_err(y, act(F.conv2d(xs, w, b, 1, 1) + res)) < 1e-6
        assert rel_err(yt, act(F.conv2d(xs, w, b, 1, 1) + F.conv2d(xsc, ws, None, 2))) < 1e-6
    # At most PACKS_PER_WEIGHT input shapes per weight; the most recent ones.
    w = torch.randn(8, 16, 3, 3)
    for h in range(5, 12):
        with torch.inference_mode():
            torch.ops.fastres.conv_bias_act(torch.randn(1, 16, h, h), w, torch.randn(8), None,
                                            [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, 0.0)
    assert [k[-1][2] for k, _ in cpu._packs[w]] == [11, 10, 9, 8][: cpu.PACKS_PER_WEIGHT]

    # oneDNN turned off: F.conv2d on dense channels_last packs (never the kernel's layout), still exact.
    with torch.backends.mkldnn.flags(enabled=False):
        m2 = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=1).eval()
        f2 = fastres.convert(m2)
        n = len(packs)
        check(f2, m2, x, "mkldnn off")
        assert conv_calls(f2, x) == (0, 20), conv_calls(f2, x)
        assert packs[n:] and all(p is None for p in packs[n:]), packs[n:]
    # A oneDNN op that raises (a build whose ops differ): one warning, then F.conv2d, still correct.
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("simulated oneDNN failure")
    real_mkl, cpu._MKL = cpu._MKL, Broken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(f2, m2, x, "oneDNN raising")
    assert sum("oneDNN" in str(c.message) for c in caught) == 1, [str(c.message) for c in caught]
    cpu._MKL = real_mkl
    cpu._broken.clear()
    # fp64 runs the plain path (oneDNN has no fp64 conv); the folded bias is fp32 by design (DESIGN.md,
    # Folding), which bounds the error near fp32's rounding of the bias (measured 1.4e-8), not fp64's.
    with torch.inference_mode():
        out = f.double()(x.double())
    with torch.no_grad():
        assert rel_err(out, m.double()(x.double())) < 1e-6
    print("OK")
''')


# A fused module's launch plan on CPU tensors calls the CPU path directly (fastres.cpu.prepare_conv: packs
# made once for the plan's input, no op dispatch): the same calls, so the same bits as the ops path.
PLAN_SCRIPT = textwrap.dedent('''
    import torch, torchvision
    from torch import nn
    from torch.profiler import profile
    import fastres
    from fastres import modules
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)

    def op_events(f, x):
        with torch.inference_mode(), profile() as p:
            f(x)
        return {e.key: e.count for e in p.key_averages() if e.key.startswith("fastres::")}

    def ops_path(f, x):  # the same forward with plans switched off: every conv through torch.ops.fastres
        real, modules._plannable = modules._plannable, lambda x: False
        fastres.refold(f)  # drops the plans (and folds: the same fold is made again)
        try:
            with torch.inference_mode():
                return f(x), op_events(f, x)
        finally:
            modules._plannable = real

    def silu_block(block):
        block.relu = nn.SiLU()
        return block

    m50 = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    m18 = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=1).eval()
    m18s = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=2).eval()
    m18s.layer2[0] = silu_block(m18s.layer2[0])  # an activation oneDNN has no exact post-op for here
    seq = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                                     nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                     nn.LeakyReLU(0.2))).eval()
    cases = [(m50, torch.randn(2, 3, 64, 64)), (m18, torch.randn(1, 3, 45, 37)),
             (m18s, torch.randn(2, 3, 32, 32)), (seq, torch.randn(2, 3, 9, 11))]
    for model, x in cases:
        f = fastres.convert(model)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            f, mx, xx = f.to(dtype), model.to(dtype), x.to(dtype)
            with torch.inference_mode():
                out = f(xx)  # makes the plans
                again = f(xx)
            events = op_events(f, xx)
            assert not events, (type(model).__name__, dtype, events)  # no op called: module, plan, CPU call
            ref, ops_events = ops_path(f, xx)
            assert ops_events, "the ops path calls the ops"
            assert torch.equal(out, ref) and torch.equal(again, ref), (dtype, (out - ref).abs().max())
            with torch.no_grad():
                err = rel_err(out.double(), mx.double()(xx.double()))
            mx.to(dtype)
            assert err < {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 3e-2}[dtype], (dtype, err)
        f.float(), model.float()
    # A plan follows edits (its stamps) and input shapes, as the ops path does.
    f = fastres.convert(m18)
    x = torch.randn(1, 3, 45, 37)
    with torch.inference_mode():
        f(x)
    with torch.no_grad():
        for model in (m18, f):
            model.layer3[0].bn2.running_var.mul_(2.0)
            model.layer3[0].downsample[1].bias.add_(0.5)
    for shape in ((1, 3, 45, 37), (3, 3, 20, 24)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            out = f(x)
        with torch.no_grad():
            assert rel_err(out, m18(x)) < 1e-4
    print("OK")
''')


# FusedStage (ResNet's layer1..4): between its blocks the identity shortcut is added in place over the
# previous block's output (oneDNN's in-place sum), never over the stage's input, and never where a hook
# could hold a block's output.
STAGE_SCRIPT = textwrap.dedent('''
    import torch, torchvision
    from torch.profiler import profile
    import fastres
    from fastres.modules import FusedStage
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)

    def inplace_calls(f, x):
        with torch.inference_mode(), profile() as p:
            f(x)
        return {e.key: e.count for e in p.key_averages()}.get("mkldnn::_convolution_pointwise_", 0)

    m = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    f = fastres.convert(m)
    assert all(type(getattr(f, n)) is FusedStage for n in ("layer1", "layer2", "layer3", "layer4"))
    assert list(f.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.double()(x.double())
    m.float()
    for _ in range(2):
        keep = x.clone()
        with torch.inference_mode():
            out = f(x)
        assert torch.equal(x, keep), "the stage's input was written"
        assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    # 4 projection tails and 12 identity tails accumulate in place (16 blocks); the stage input stays.
    assert inplace_calls(f, x) == 16, inplace_calls(f, x)
    # A layer's input held by the caller (its own tensor) is never written, even as a block input.
    with torch.inference_mode():
        a = f.maxpool(f.relu(f.bn1(f.conv1(x))))
        a_keep = a.clone()
        b = f.layer1(a)
        assert torch.equal(a, a_keep)
        b_keep = b.clone()
        f.layer2(b)
        assert torch.equal(b, b_keep)
    # A hook that keeps block outputs: the kept tensors are still the blocks' outputs afterwards.
    kept = []
    handle = f.layer1[1].register_forward_hook(lambda mod, inp, output: kept.append(output))
    # layer1's two identity tails no longer accumulate in place; the other stages still do
    assert inplace_calls(f, x) == 14, inplace_calls(f, x)
    kept.clear()
    with torch.inference_mode():
        f(x)
        h = f.maxpool(f.relu(f.bn1(f.conv1(x))))
        expect = f.layer1[1](f.layer1[0](h))
    assert torch.equal(kept[0], expect), "a hooked block output was overwritten"
    handle.remove()
    # Gradients, autocast, tracing: plain Sequential (no in-place), still correct.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(f(x).float(), ref) < 3e-2
    assert rel_err(torch.jit.trace(f, x, check_trace=False)(x).detach(), ref) < 1e-4
    print("OK")
''')


# FusedStage's one check per stage (_StageCheck): once its blocks have run as a chain of plans, a forward
# checks the first block's input signature and every block's folds at once. Every edit the per-block check
# sees must still be seen, in any block of the stage, and a stage whose blocks no longer chain must fall
# back to the per-block path.
STAGE_CHECK_SCRIPT = textwrap.dedent('''
    import torch, torchvision
    from torch import nn
    import fastres
    from fastres import modules
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    f = fastres.convert(m)
    x = torch.randn(2, 3, 64, 64)

    def same(what, inp=x):
        with torch.no_grad():
            ref = m(inp)
        with torch.inference_mode():
            out = f(inp)
        assert rel_err(out, ref) < 1e-4, (what, rel_err(out, ref))

    def both(edit):
        with torch.no_grad():
            edit(m)
            edit(f)

    same("first")
    same("second")
    for name, n in (("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3)):
        check = getattr(f, name).__dict__.get("_check")
        assert type(check) is modules._StageCheck and len(check.plans) == n, name

    # Steady state: no block's own check runs (the stage checked them all at once).
    stages = [getattr(f, n) for n in ("layer1", "layer2", "layer3", "layer4")]
    block_plans = {id(b.__dict__["_plan"]) for stage in stages for b in stage}
    assert len(block_plans) == 16
    holds = modules._Plan.holds

    def forbidden(self, x):
        assert id(self) not in block_plans, "a block's own check in the steady state"
        return holds(self, x)

    modules._Plan.holds = forbidden
    try:
        same("steady")
    finally:
        modules._Plan.holds = holds

    # Edits deep inside a stage, each seen on the next forward.
    both(lambda k: k.layer3[4].bn2.running_var.mul_(1.5))
    same("in-place running_var, layer3[4]")
    w = f.layer2[3].conv2.weight.detach().clone() * 0.9
    both(lambda k: setattr(k.layer2[3].conv2.weight, "data", w.clone()))
    same(".data = new memory, layer2[3].conv2")
    both(lambda k: setattr(k.layer4[2].bn3, "eps", 0.1))
    same("eps, layer4[2].bn3")
    both(lambda k: setattr(k.layer1[2], "relu", nn.Hardtanh(0.0, 6.0)))
    same("activation module replaced, layer1[2]")
    both(lambda k: setattr(k.layer3[5].bn1, "weight", nn.Parameter(k.layer3[5].bn1.weight.detach() * 2)))
    same("parameter replaced, layer3[5].bn1")
    both(lambda k: k.layer2[1].bn1.train())
    same("a BN in training mode, layer2[1]")
    both(lambda k: k.layer2[1].bn1.eval())
    same("back in eval")
    same("another input signature", torch.randn(1, 3, 64, 64))
    same("the first signature again")
    print("OK")
''')


def _run(script: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_cpu_path_without_interpreter_matches_eager_and_passes_opcheck():
    _run(SCRIPT)


@pytest.mark.skipif(not __import__("torch").backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_cpu_path_runs_prepacked_onednn_convs_and_its_packs_are_never_stale():
    _run(PACK_SCRIPT)


def test_cpu_plans_call_the_cpu_path_directly_and_give_the_ops_bits():
    _run(PLAN_SCRIPT)


def test_fused_stage_adds_identity_shortcuts_in_place_only_over_its_own_tensors():
    _run(STAGE_SCRIPT)


def test_fused_stage_checks_its_blocks_at_once_and_sees_every_edit():
    _run(STAGE_CHECK_SCRIPT)
