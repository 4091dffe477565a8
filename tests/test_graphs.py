"""fastres.CUDAGraphModule: clear errors everywhere; capture and replay on a GPU."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

import fastres
from fastres.testing import assert_close, randomize_bn


def tiny(device="cpu", dtype=torch.float32):
    model = randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).eval()
    return fastres.convert(model).to(device, dtype)


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
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_matches_the_model_per_shape(dtype):
    fast = tiny("cuda", dtype)
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
        x4 = torch.randn(4, 3, 48, 40, device="cuda", dtype=dtype)
        assert_close(graphed(x4), fast(x4), **tol)  # a new shape: a second graph
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
    fast = tiny("cuda")
    graphed = fastres.cuda_graphs(fast)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        before = graphed(x)
    state = {
        k: v * 1.5 if v.is_floating_point() and k.endswith("weight") else v
        for k, v in fast.state_dict().items()
    }
    fast.load_state_dict(state)
    with torch.inference_mode():
        after = graphed(x)
        ref = fast(x)
    assert_close(after, ref, rel=1e-5, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the new weights were used, not the captured fold
