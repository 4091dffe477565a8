"""fastres.warmup on a tiny ResNet through the interpreter: every fused module runs, every fold is made."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres.testing import randomize_bn, rel_err

# The fused modules of ResNet(BasicBlock, [1, 1, 1, 1]) after convert, in the order they run.
FUSED = [
    ("conv1", "FusedStem"),
    ("layer1.0", "FusedBasicBlock"),
    ("layer2.0", "FusedBasicBlock"),
    ("layer3.0", "FusedBasicBlock"),
    ("layer4.0", "FusedBasicBlock"),
    ("avgpool", "FusedHead"),
]
# Folds: stem 1, layer1.0 two convs, layers 2-4 two convs and the projection shortcut each.
FOLDS = [1, 2, 3, 3, 3, 0]


@pytest.fixture
def tiny():
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, fastres.convert(model), torch.randn(2, 3, 32, 32)


def test_warmup_runs_every_fused_module_and_makes_every_fold(tiny, capsys):
    model, fast, x = tiny
    report = fastres.warmup(fast, x)
    assert isinstance(report, fastres.WarmupReport)
    assert [(r.name, r.kind) for r in report.layers] == FUSED
    assert [r.folds for r in report.layers] == FOLDS and report.folds == sum(FOLDS)
    assert report.kernels is None and all(r.kernels is None for r in report.layers)  # interpreted
    assert report.seconds >= sum(r.seconds for r in report.layers) > 0
    out = capsys.readouterr().out
    for i, (name, kind) in enumerate(FUSED, 1):
        assert f"[{i}/{len(FUSED)}] {name}" in out and kind in out
    assert out.rstrip().splitlines()[-1] == str(report)

    # The next forward folds nothing new and computes what the original computes.
    again = fastres.warmup(fast, x, verbose=False)
    assert again.folds == 0 and capsys.readouterr().out == ""
    with torch.inference_mode():
        assert rel_err(fast(x), model(x)) <= 1e-4


def test_warmup_warns_when_nothing_would_be_fused(tiny):
    model, fast, x = tiny
    with pytest.warns(UserWarning, match="convert"):
        report = fastres.warmup(model, x, verbose=False)
    assert report.layers == [] and report.folds == 0
    fast.train()
    with pytest.warns(UserWarning, match="train mode"):
        report = fastres.warmup(fast, x, verbose=False)
    assert report.folds == 0  # the eager path ran: nothing folded
    with pytest.raises(TypeError, match="nn.Module"):
        fastres.warmup(lambda t: t, x)


@pytest.mark.gpu
def test_warmup_compiles_once_on_gpu():
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval().cuda().half()
    fast = fastres.convert(model)
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.half)
    first = fastres.warmup(fast, x, verbose=False)
    assert first.kernels is not None and first.folds == sum(FOLDS)
    second = fastres.warmup(fast, x, verbose=False)
    assert second.kernels == 0 and second.folds == 0  # everything compiled and folded the first time
