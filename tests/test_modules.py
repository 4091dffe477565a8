"""Fused modules and convert: the drop-in contract (state, fold cache, train mode, copies, errors)."""

import copy
import io
import re

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import fastres
from fastres.testing import assert_close, count_launches, randomize_bn

FP32 = dict(rel=1e-4, atol=1e-4, rtol=1e-3)


def tiny_resnet(block=BasicBlock, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ResNet(block, [1, 1, 1, 1], num_classes=10), seed).eval()


def conv_seq():
    seq = nn.Sequential(
        nn.Conv2d(5, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(inplace=True),
        nn.Conv2d(12, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.SiLU(),
        nn.Conv2d(6, 4, 1),
        nn.GELU(),
    )
    return randomize_bn(seq, 1).eval()


def eager64(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def run(model, x):
    with torch.inference_mode():
        return model(x)


# ---------------------------------------------------------------------------------------- convert


def test_sequential_runs_are_fused_and_the_rest_left_exactly():
    seq = conv_seq()
    fast = fastres.convert(seq)
    assert isinstance(fast[0], fastres.FusedConvBNAct2d) and isinstance(fast[2], fastres.FoldedReLU)
    assert isinstance(fast[1], fastres.FoldedBatchNorm2d)
    assert isinstance(fast[3], fastres.FusedConvBNAct2d) and fast[3].folded_act is None
    # SiLU is fused too (issue 12): a pass-through that is still an nn.SiLU
    assert isinstance(fast[5], fastres.FusedConvBNAct2d) and type(fast[7]).__name__ == "FoldedSiLU"
    assert isinstance(fast[7], nn.SiLU) and fast[5].extra_repr().endswith("fused=conv+bn+silu")
    assert type(fast[8]) is nn.Conv2d and type(fast[9]) is nn.GELU  # no BN after it: left as it was
    x = torch.randn(2, 5, 11, 9)
    assert_close(run(fast, x), eager64(seq, x), **FP32, what="sequential")
    rep = fastres.report(fast)
    assert (rep.convs_fused, rep.convs_total) == (3, 4)
    left = {e.path: e.detail for e in rep.left}
    assert "8" in left and "not followed by BatchNorm2d" in left["8"]


def test_convert_copies_unless_inplace_and_twice_is_a_no_op():
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fastres.convert(model)
    assert type(model.layer1[0]) is BasicBlock and type(model.conv1) is nn.Conv2d, "original was modified"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = fastres.convert(fast, inplace=True)
    assert again is fast
    assert [type(m) for m in again.modules()] == [type(m) for m in fastres.convert(model).modules()]
    assert str(fastres.report(again)) == str(fastres.report(fast))
    same = fastres.convert(model, inplace=True)
    assert same is model and isinstance(model.layer1[0], fastres.FusedBasicBlock)


def test_filter_fn_and_report_say_what_was_left():
    model = tiny_resnet(Bottleneck)
    fast = fastres.convert(model, filter_fn=lambda m, fqn: fqn != "layer2.0")
    assert type(fast.layer2[0]) is Bottleneck and isinstance(fast.layer3[0], fastres.FusedBottleneck)
    rep = fastres.report(fast)
    assert any(e.path == "layer2.0" and e.result == "left" for e in rep.entries)
    assert rep.convs_total == sum(isinstance(m, nn.Conv2d) for m in fast.modules())
    assert rep.convs_fused == rep.convs_total - 4  # layer2.0's three convs and its downsample conv
    x = torch.randn(2, 3, 32, 32)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="partly converted")
    text = str(rep)
    assert "convolutions fused:" in text and "layer2.0" in text


def test_convert_verbose_prints_the_table(capsys):
    fastres.convert(tiny_resnet(), verbose=True)
    out = capsys.readouterr().out
    assert re.search(r"layer1\.0\s+BasicBlock\s+FusedBasicBlock", out) and "FusedStem" in out
    assert "convolutions fused: 12 / 12" in out  # stem, 4 blocks × 2, 3 downsample convs


def test_conv_bn_found_by_data_flow_in_unknown_modules():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.proj = nn.Conv2d(4, 4, 1)  # its output goes to an add, not a BN: left
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.tanh(self.bn(self.conv(x)))
            return self.bn2(y) + self.proj(y)

    model = randomize_bn(nn.Sequential(Custom(), nn.Flatten())).eval()
    fast = fastres.convert(model)
    assert type(fast[0]) is Custom, "the unknown module itself stays"
    assert isinstance(fast[0].conv, fastres.FusedConvBNAct2d) and fast[0].conv.folded_act is None
    assert type(fast[0].proj) is nn.Conv2d and type(fast[0].bn2) is nn.BatchNorm2d
    x = torch.randn(2, 3, 7, 7)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="fx-found conv+bn")
    assert list(fast.state_dict()) == list(model.state_dict())
    untouched = fastres.convert(model, use_fx=False)
    assert type(untouched[0].conv) is nn.Conv2d


def test_modules_used_twice_are_not_fused():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.bn(self.conv(self.bn(self.conv(x))))

    model = randomize_bn(Twice()).eval()
    fast = fastres.convert(model)
    assert type(fast.conv) is nn.Conv2d
    x = torch.randn(1, 4, 6, 6)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="shared modules")


# ----------------------------------------------------------------------------------- state and fold


def test_state_dict_keys_and_checkpoints_load_both_ways():
    model = tiny_resnet(Bottleneck)
    fast = fastres.convert(model)
    sd, fsd = model.state_dict(), fast.state_dict()
    assert list(sd) == list(fsd)
    assert all(torch.equal(sd[k], fsd[k]) for k in sd)
    other = tiny_resnet(Bottleneck, seed=3)
    fast.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert_close(run(fast, x), eager64(other, x), **FP32, what="after load_state_dict")
    model.load_state_dict(fast.state_dict(), strict=True)
    assert_close(run(model, x), eager64(other, x), **FP32, what="fused checkpoint into eager")


def test_fold_is_cached_and_never_stale():
    seq = conv_seq()
    fast = fastres.convert(seq)
    x = torch.randn(2, 5, 9, 9)
    run(fast, x)
    run(fast, x)
    assert fast[0]._fold.folds == 1, "the second forward must reuse the fold"
    new_bias, new_mean = torch.randn(12), torch.randn(8)
    edits = {
        "conv weight mul_": lambda m: m[0].weight.mul_(1.5),
        "bn running_var": lambda m: m[1].running_var.add_(0.3),
        "bn weight, optimizer step": lambda m: m[1].weight.sub_(0.1),
        "bn eps": lambda m: setattr(m[1], "eps", 0.1),
        "replaced parameter": lambda m: setattr(m[0], "bias", nn.Parameter(new_bias.clone())),
        "param.data swap": lambda m: setattr(m[4].running_mean, "data", new_mean.clone()),
        "copy_ from a checkpoint": lambda m: m[3].weight.copy_(torch.ones_like(m[3].weight)),
    }
    for what, edit in edits.items():
        with torch.no_grad():
            edit(seq)
            edit(fast)
        assert_close(run(fast, x), eager64(seq, x), **FP32, what=f"after {what}")


def test_edits_through_data_need_refold():
    """``p.data`` has its own version counter, so edits through it are invisible; refold() says so."""
    seq = conv_seq()
    fast = fastres.convert(seq)
    x = torch.randn(2, 5, 9, 9)
    run(fast, x)
    seq[0].weight.data.mul_(2.0)
    fast[0].weight.data.mul_(2.0)
    fastres.refold(fast)
    assert_close(run(fast, x), eager64(seq, x), **FP32, what="after .data edit and refold")


def test_dtype_and_device_moves_refold():
    model = tiny_resnet()
    fast = fastres.convert(model)
    x = torch.randn(2, 3, 32, 32)
    run(fast, x)
    fast.half()
    y = run(fast, x.half())
    assert y.dtype == torch.float16
    assert_close(y, eager64(model, x), rel=1e-2, atol=5e-2, rtol=5e-2, what="after .half()")
    fast.float()
    model.half().float()  # the same rounding of every weight
    assert_close(run(fast, x), eager64(model, x), **FP32, what="after .float()")
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)
        fast.conv1.weight.mul_(0.5)
    fast.to(torch.float64)
    assert_close(run(fast, x.double()), eager64(model, x), **FP32, what="after .to(float64)")


# -------------------------------------------------------------------------------------- train mode


def test_train_mode_computes_exactly_what_the_original_computes():
    model = tiny_resnet(Bottleneck).train()
    fast = fastres.convert(model).train()
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x = torch.randn(4, 3, 32, 32)
        target = torch.randint(0, 10, (4,))
        losses = []
        for m, opt in ((model, opt_a), (fast, opt_b)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == losses[1], f"step {step}: loss {losses}"
        for (name, a), (_, b) in zip(model.named_parameters(), fast.named_parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), f"grad of {name}"
    for (name, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after training"
    assert int(fast.bn1.num_batches_tracked) == 2
    model.eval()
    fast.eval()
    x = torch.randn(2, 3, 32, 32)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="eval after training")


def test_eval_with_gradients_falls_back_to_the_exact_path():
    model = tiny_resnet()
    fast = fastres.convert(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    for (name, a), (_, b) in zip(model.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_no_grad_and_inference_mode_use_the_fused_path():
    model = tiny_resnet()
    fast = fastres.convert(model)
    x = torch.randn(1, 3, 32, 32)
    # The fused kernels of ResNet(BasicBlock, [1, 1, 1, 1]): stem conv + max-pool, two convs per block
    # (the projection shortcuts run inside the block tails), the global average pool.
    fused = 1 + 1 + 2 * 4 + 1
    outputs = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), count_launches() as launches:
            outputs.append(fast(x))
        assert len(launches) == fused, f"{mode.__name__}: {list(launches)}"
    with torch.enable_grad(), count_launches() as launches:
        fast.requires_grad_(False)(x)  # frozen parameters: fused with grad mode on, too
    assert len(launches) == fused
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert_close(outputs[0], eager64(model, x), **FP32, what="no_grad")
    assert fast.conv1._fold.folds == 1 and fast.layer1[0]._folds["conv1"].folds == 1


# ---------------------------------------------------------------------------- copies, save, repr


def test_deepcopy_save_load_and_repr():
    model = tiny_resnet(Bottleneck)
    fast = fastres.convert(model)
    x = torch.randn(1, 3, 32, 32)
    ref = eager64(model, x)
    run(fast, x)
    clone = copy.deepcopy(fast)
    assert clone.conv1.folded_bn is clone.bn1, "the copy's stem must read the copy's BN"
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (clone, loaded):
        assert_close(run(m, x), ref, **FP32, what="copy")
    with torch.no_grad():
        clone.bn1.running_var.add_(1.0)  # editing the copy must not touch the original
    assert_close(run(fast, x), ref, **FP32, what="original after editing the copy")
    text = repr(fast)
    assert "FusedStem" in text and "fused=conv+bn+relu+maxpool" in text and "FusedBottleneck" in text


# ----------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig", "strided_batch"])
def test_any_input_layout(layout):
    model = tiny_resnet()
    fast = fastres.convert(model)
    base = torch.randn(3, 3, 37, 45)
    x = {
        "nchw": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "noncontig": base.transpose(2, 3).contiguous().transpose(2, 3),
        "strided_batch": torch.stack([base, base], 1).flatten(0, 1)[::2],
    }[layout]
    y = run(fast, x)
    assert y.shape == (3, 10)
    assert_close(y, eager64(model, base), **FP32, what=layout)


def test_batch_zero_one_and_nan():
    model = tiny_resnet()
    fast = fastres.convert(model)
    assert run(fast, torch.randn(0, 3, 32, 32)).shape == (0, 10)
    x = torch.randn(1, 3, 33, 31)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="batch 1")
    x[0, 1, 5, 5] = float("nan")
    assert torch.equal(run(fast, x).isnan(), eager64(model, x).isnan())
    x = torch.randn(1, 3, 33, 31)
    x[0, 0, 3, 4] = float("inf")
    out, ref = run(fast, x), eager64(model, x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())


def test_input_on_another_device_is_a_clear_error():
    fast = fastres.convert(tiny_resnet())
    with pytest.raises(ValueError, match="conv1.*input is on meta but the module's weights are on cpu"):
        fast(torch.empty(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.randn(3, 32, 32), ValueError, "4-D input"),
        (torch.randn(1, 4, 32, 32), ValueError, "expected 3 input channels, got 4"),
        (torch.randint(0, 5, (1, 3, 32, 32)), TypeError, "floating-point"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError, "does not match"),
        (torch.randn(1, 3, 32, 32, dtype=torch.complex64), TypeError, "floating-point"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_model_still_works(bad, err, match):
    model = tiny_resnet()
    fast = fastres.convert(model)
    with pytest.raises(err, match=match) as info, torch.inference_mode():
        fast(bad)
    assert "conv1" in str(info.value), "the message names the module"
    x = torch.randn(1, 3, 32, 32)
    assert_close(run(fast, x), eager64(model, x), **FP32, what="after a bad input")


def test_block_names_itself_in_errors():
    fast = fastres.convert(tiny_resnet())
    with pytest.raises(ValueError, match="layer2.0.*expected 64 input channels"), torch.inference_mode():
        fast.layer2[0](torch.randn(1, 65, 8, 8))


def test_convert_with_example_input_warms_up(capsys):
    fast = fastres.convert(tiny_resnet(), example_input=torch.randn(1, 3, 32, 32))
    assert fast.conv1._fold.folds == 1 and fast.layer4[0]._folds["tail"].folds == 1
    assert isinstance(fast.avgpool, fastres.FusedHead) and not fast.avgpool.training


def test_eval_with_gradients_warns_once(monkeypatch):
    from fastres import modules

    monkeypatch.setattr(modules, "_WARNED", [])
    fast = fastres.convert(tiny_resnet())
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="inference_mode"):
        fast(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(x)  # said once per process, not per forward
