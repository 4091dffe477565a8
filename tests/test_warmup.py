"""fastres.warmup on a tiny ResNet through the interpreter: every fused module runs, every fold is made."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres.fold import FoldCache
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


def fold_caches(module):
    """The FoldCaches a fused module holds (how many depends on how it fuses its shortcut)."""
    caches = list(vars(module).get("_folds", {}).values()) + [vars(module).get("_fold")]
    return [c for c in caches if isinstance(c, FoldCache)]


@pytest.fixture
def tiny():
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return model, fastres.convert(model), torch.randn(2, 3, 32, 32)


def test_warmup_runs_every_fused_module_and_makes_every_fold(tiny, capsys):
    model, fast, x = tiny
    report = fastres.warmup(fast, x)
    assert isinstance(report, fastres.WarmupReport)
    assert [(r.name, r.kind) for r in report.layers] == FUSED
    # Every fold of every fused module made once, and counted against the module that made it.
    caches = [fold_caches(fast.get_submodule(name)) for name, _ in FUSED]
    assert all(c.folds == 1 for cs in caches for c in cs)
    assert [r.folds for r in report.layers] == [len(cs) for cs in caches]
    assert min(report.layers[i].folds for i in range(5)) >= 1 and report.layers[5].folds == 0
    assert report.folds == sum(len(cs) for cs in caches) >= 9
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
    assert first.kernels is not None and first.folds >= 9
    second = fastres.warmup(fast, x, verbose=False)
    assert second.kernels == 0 and second.folds == 0  # everything compiled and folded the first time
