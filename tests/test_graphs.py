"""fastres.CUDAGraphModule: clear errors everywhere; capture and replay on a GPU."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres import graphs
from fastres.testing import assert_close, randomize_bn


def tiny(device="cpu", dtype=torch.float32, with_eager=False):
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    fast = fastres.convert(model).to(device, dtype)
    return (fast, model.to(device)) if with_eager else fast


def eager_ref(model, x):
    """The unconverted model in fp64 (no tf32 on a GPU): what the graphed output must also match."""
    with torch.no_grad():
        return model.double()(x.double())


# DESIGN.md's whole-model bounds for a GPU, against the fp64 eager model (elements: tests/conftest.py).
EAGER_TOL = {
    torch.float32: dict(rel=5e-3, atol=0.15, rtol=2.5e-2),  # tf32 dots
    torch.float16: dict(rel=1e-2, atol=5e-2, rtol=5e-2),
}


def test_cuda_graphs_wraps_the_model():
    fast = tiny()
    graphed = fastres.cuda_graphs(fast, clone_output=False)
    assert isinstance(graphed, fastres.CUDAGraphModule) and graphed.module is fast
    assert not graphed.clone_output and graphed.num_graphs == 0
    assert list(graphed.state_dict()) == ["module." + k for k in fast.state_dict()]
    with pytest.raises(TypeError, match="nn.Module"):
        fastres.CUDAGraphModule(lambda x: x)


def test_cpu_input_is_a_clear_error():
    graphed = fastres.cuda_graphs(tiny())
    with torch.inference_mode(), pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        graphed(torch.randn(1, 3, 32, 32))
    assert graphed.num_graphs == 0


def test_train_mode_is_a_clear_error():
    graphed = fastres.cuda_graphs(tiny()).train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="train mode"):
        graphed(torch.randn(1, 3, 32, 32))


def test_gradients_needed_is_a_clear_error():
    graphed = fastres.cuda_graphs(tiny())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="inference_mode"):
        graphed(x)  # parameters require grad and grad mode is on
    with pytest.raises(RuntimeError, match="records no autograd"):
        graphed.module.requires_grad_(False)
        graphed(x.requires_grad_())


def test_non_tensor_input_is_a_clear_error():
    with pytest.raises(TypeError, match="input 0 is a list"):
        fastres.cuda_graphs(tiny())([1, 2])


# --------------------------------------------------------------------------------------------
# The weight check before each replay (on the CPU: what it watches, and that forward acts on it)


def test_weight_watch_sees_every_change_that_makes_a_graph_stale():
    fast = tiny()
    edits = {
        "in-place write to a BN statistic": lambda f: f.layer2[0].bn1.running_var.mul_(1.5),
        "in-place write to a conv weight": lambda f: f.layer3[0].conv2.weight.add_(0.1),
        "load_state_dict": lambda f: f.load_state_dict(f.state_dict()),
        "param.data replaced": lambda f: setattr(f.fc.weight, "data", f.fc.weight.data.clone()),
        "parameter replaced": lambda f: setattr(
            f.layer1[0].conv1, "weight", torch.nn.Parameter(f.layer1[0].conv1.weight.detach().clone())
        ),
        "buffer replaced": lambda f: setattr(f.bn1, "running_mean", f.bn1.running_mean.clone()),
        "module replaced": lambda f: setattr(f, "fc", torch.nn.Linear(512, 10)),
        "module moved (a new dtype)": lambda f: f.layer4.double(),
    }
    for what, edit in edits.items():
        watch = graphs._WeightWatch(fast)
        assert watch.unchanged(), what
        with torch.no_grad():
            edit(fast)
        assert not watch.unchanged(), f"{what}: not seen"
    fast.float()
    watch = graphs._WeightWatch(fast)
    with torch.no_grad():
        fast(torch.randn(1, 3, 16, 16))  # an eval forward writes nothing
    assert watch.unchanged()


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_forward_drops_its_graphs_after_an_in_place_weight_edit(monkeypatch):
    """CUDAGraphModule.forward with capture and replay stubbed out (they need a GPU): an in-place edit
    after capture is noticed before the next replay, and the next call captures again."""
    graphed = fastres.cuda_graphs(tiny())
    captures = []

    def capture(inputs):
        captures.append(inputs)
        return graphs._Captured(_FakeGraph(), tuple(t.clone() for t in inputs), torch.zeros(1), ())

    monkeypatch.setattr(graphed, "_check", lambda inputs: None)
    monkeypatch.setattr(graphed, "_capture", capture)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        graphed(x)
        graphed(x)
    assert len(captures) == 1 and graphed.num_graphs == 1  # captured once, then replayed
    with torch.no_grad():
        graphed.module.layer1[0].bn2.weight.mul_(2.0)
    with torch.inference_mode():
        graphed(x)
    assert len(captures) == 2 and graphed.num_graphs == 1  # seen: dropped and captured again
    graphed.check_weights = False
    with torch.no_grad():
        graphed.module.layer1[0].bn2.weight.mul_(2.0)
    with torch.inference_mode():
        graphed(x)
    assert len(captures) == 2  # not checked when asked not to


# --------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_matches_the_model_per_shape(dtype):
    fast, model = tiny("cuda", dtype, with_eager=True)
    graphed = fastres.cuda_graphs(fast)
    tol = (
        dict(rel=1e-5, atol=1e-5, rtol=1e-5)
        if dtype == torch.float32
        else dict(rel=1e-3, atol=1e-3, rtol=1e-3)
    )
    with torch.inference_mode():
        xs = [torch.randn(2, 3, 32, 32, device="cuda", dtype=dtype) for _ in range(3)]
        ys = [graphed(x) for x in xs]  # one capture, then replays with new data
        assert graphed.num_graphs == 1
        for x, y in zip(xs, ys, strict=True):  # clones: earlier outputs are not overwritten
            assert_close(y, fast(x), **tol)
            assert_close(y, eager_ref(model, x), **EAGER_TOL[dtype], what="graphed against eager")
        x4 = torch.randn(4, 3, 48, 40, device="cuda", dtype=dtype)
        y4 = graphed(x4)  # a new shape: a second graph
        assert_close(y4, fast(x4), **tol)
        assert_close(y4, eager_ref(model, x4), **EAGER_TOL[dtype], what="second graph against eager")
        assert graphed.num_graphs == 2
        assert_close(graphed(xs[0]), fast(xs[0]), **tol)  # the first graph again
        assert graphed.num_graphs == 2


@pytest.mark.gpu
def test_static_output_without_clone():
    graphed = fastres.cuda_graphs(tiny("cuda"), clone_output=False)
    with torch.inference_mode():
        a = graphed(torch.randn(2, 3, 32, 32, device="cuda"))
        b = graphed(torch.randn(2, 3, 32, 32, device="cuda"))
    assert a is b  # the static output, overwritten by the second replay


@pytest.mark.gpu
def test_weight_change_recaptures_with_the_new_fold():
    fast, model = tiny("cuda", with_eager=True)
    graphed = fastres.cuda_graphs(fast)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        before = graphed(x)
    state = {
        k: v * 1.5 if v.is_floating_point() and k.endswith("weight") else v
        for k, v in fast.state_dict().items()
    }
    fast.load_state_dict(state)
    model.load_state_dict(state)
    with torch.inference_mode():
        after = graphed(x)
        ref = fast(x)
    assert_close(after, ref, rel=1e-5, atol=1e-5, rtol=1e-5)
    assert_close(after, eager_ref(model, x), **EAGER_TOL[torch.float32], what="recaptured against eager")
    assert (after - before).abs().max() > 1e-3  # the new weights were used, not the captured fold
