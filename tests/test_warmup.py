"""fastres.warmup on a tiny ResNet through the interpreter: every fused module runs, every fold is made."""

import os
import subprocess
import sys

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres.fold import FoldCache
from fastres.testing import assert_close, randomize_bn, rel_err

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


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [1, 8])
def test_warmup_in_threads_compiles_what_the_forward_needs(threads):
    """After a threaded compile the forward compiles nothing more, and its output is right."""
    torch.manual_seed(1)
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval().cuda().half()
    fast = fastres.convert(model)
    x = torch.randn(3, 3, 40, 40, device="cuda", dtype=torch.half)
    report = fastres.warmup(fast, x, verbose=False, threads=threads)
    assert (report.parallel_seconds is not None) == (threads > 1)
    assert all(row.kernels == 0 for row in report.layers) or threads == 1
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert_close(out, ref, rel=1e-2, atol=5e-2, rtol=5e-2, what=f"after warmup, {threads} threads")


def test_compile_only_turns_launches_into_compile_requests():
    """The mechanism behind the threaded warmup, with the interpreter off (a subprocess)."""
    probe = (
        "from fastres.kernels._common import compile_only, launchable\n"
        "class K:\n"
        "    calls = []\n"
        "    def warmup(self, *args, grid, **kw): self.calls.append((args, grid, kw))\n"
        "k = K()\n"
        "with compile_only():\n"
        "    launchable(k)[(3, 1)](1, 2, BLOCK=16)\n"
        "assert K.calls == [((1, 2), (3, 1), {'BLOCK': 16})], K.calls\n"
        "from fastres.kernels import conv\n"
        "assert type(launchable(conv._conv_bias_act_fwd_kernel)).__name__ == 'TraceableTritonKernelWrapper'\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_threads_phase_is_skipped_on_the_cpu(tiny):
    _, fast, x = tiny
    report = fastres.warmup(fast, x, verbose=False, threads=4)
    assert report.parallel_seconds is None and report.folds >= 0
