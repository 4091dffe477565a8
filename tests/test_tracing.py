"""A converted model under the tracers people already use: torch.fx.symbolic_trace, torch.jit.trace and
torch.jit.script."""

import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import fastres
from fastres import activations
from fastres.modules import FusedBasicBlock, FusedBottleneck, FusedConvBNAct2d, FusedHead, FusedStem
from fastres.testing import assert_close, count_launches, randomize_bn


def _models():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return model, fastres.convert(model)


def test_fx_symbolic_trace_keeps_fused_modules_as_leaves():
    model, fast = _models()
    gm = torch.fx.symbolic_trace(fast)
    called = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert {FusedBasicBlock, FusedHead}.issubset(called)
    assert any(issubclass(c, FusedConvBNAct2d) for c in called)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with count_launches() as launches:
            out = gm(x)
        ref = model(x)
    assert len(launches) == 19  # the same kernels as the converted model: the leaves decide at run time
    assert_close(out, ref, rel=1e-4, atol=1e-4, rtol=1e-4, what="fx GraphModule")


def test_jit_trace_passes_its_check_and_follows_later_edits():
    model, fast = _models()
    for m in (model, fast):
        m.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(fast, x)  # check_trace reruns and compares the graphs
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert "fastres::conv_bias_act" in kinds and "aten::_convolution" not in kinds
    x2 = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(traced(x2), model(x2), rel=1e-4, atol=1e-4, rtol=1e-4, what="jit.trace")
        # The fold is part of the trace: an in-place edit of a BN statistic reaches the traced model.
        for m in (model, fast):
            m.layer2[0].bn1.running_var.mul_(3.0)
        assert_close(traced(x2), model(x2), rel=1e-4, atol=1e-4, rtol=1e-4, what="jit.trace after edit")


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.x
        return torch.jit.script(module)


def _types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_jit_script_runs_the_original_computation_and_leaves_the_model_fused(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
    fast = fastres.convert(model)
    before = _types(fast)
    scripted = _script(fast)
    again = _script(fast)  # a second script of the same model in the same process
    assert _types(fast) == before, "torch.jit.script changed the converted model's modules"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        with count_launches() as launches:
            out, out2 = scripted(x), again(x)
        with count_launches() as fused:
            fast(x)
    assert not launches, "a scripted model runs TorchScript code, not fastres launches"
    assert fused, "the converted model still fuses after being scripted"
    # The scripted model is the original computation: eager's result to the last bit (same ops, same order).
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)
    graph = str(scripted.inlined_graph)
    assert "fastres::" not in graph and "aten::batch_norm" in graph
    # Train mode too: batch statistics and running-stat updates, as the original.
    model.train(), scripted.train()
    xt = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(scripted(xt), model(xt), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        scripted.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean, rtol=1e-6, atol=1e-7
    )


def test_jit_script_every_activation_and_frozen_bn():
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    acts = [t() if t not in (nn.Hardtanh,) else t(-0.5, 2.0) for t in activations.SUPPORTED_TYPES]
    layers = []
    for i, act in enumerate(acts):
        norm = FrozenBatchNorm2d(8) if i % 2 else nn.BatchNorm2d(8)
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), norm, act]
    model = randomize_bn(nn.Sequential(*layers)).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_()
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    fast = fastres.convert(model)
    assert sum(isinstance(m, FusedConvBNAct2d) for m in fast.modules()) == len(acts)
    scripted = _script(fast)
    x = torch.randn(1, 3, 6, 5)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


def test_jit_script_saved_model_loads_without_fastres(tmp_path):
    model, fast = _models()
    path = tmp_path / "scripted.pt"
    torch.jit.save(_script(fast), str(path))
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.inference_mode():
        torch.save(model(x), tmp_path / "ref.pt")
    code = (
        "import sys; sys.modules['fastres'] = None\n"  # any import of fastres fails
        "import torch\n"
        f"m = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.inference_mode(): out = m(x)\n"
        "torch.testing.assert_close(out, ref, rtol=0, atol=0); print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_jit_script_stem_and_head_are_the_original_modules_code():
    _, fast = _models()
    assert isinstance(fast.conv1, FusedStem) and isinstance(fast.avgpool, FusedHead)
    assert isinstance(fast.layer1[0], FusedBasicBlock) and FusedBottleneck._script_forward is not None
    scripted = _script(fast)
    # The stem's scripted forward is Conv2d's; bn1, relu and maxpool after it compute their own.
    assert "aten::max_pool2d" in str(scripted.inlined_graph)
    assert "aten::adaptive_avg_pool2d" in str(scripted.inlined_graph)
