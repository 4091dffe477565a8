"""A converted fp32 model under ``torch.autocast``: the fused path computes in the autocast dtype, as
eager does, returns the dtype eager returns, and stays within DESIGN.md's bounds for that dtype."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fastres
from fastres.kernels._common import INTERPRET
from fastres.testing import assert_close, count_launches, randomize_bn, rel_err


def _models():
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return m, fastres.convert(m)


@pytest.mark.skipif(not INTERPRET, reason="interpreter fp16 case; the GPU case is below")
def test_fp16_autocast_runs_the_fused_kernels_in_the_interpreter():
    model, fast = _models()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        with count_launches() as launches:
            out = fast(x)
        ref = model(x)
    # 20 convs: the stem and 16 block convs as 17 kernels (the 3 shortcuts run inside their tails),
    # then the stem max-pool and the head pool.
    assert len(launches) == 19
    assert out.dtype == ref.dtype == torch.float16
    # fp16 whole-model bound against eager under the same autocast (DESIGN.md, Numerics).
    assert_close(out, ref, rel=1e-2, atol=5e-2, rtol=5e-2, what="resnet18 autocast fp16")
    # The fp32 fold is still there for fp32 calls, and correct: the cache keys on the compute dtype.
    with torch.inference_mode():
        out32, ref32 = fast(x), model(x)
    assert out32.dtype == torch.float32
    assert_close(out32, ref32, rel=1e-4, atol=1e-4, rtol=1e-4, what="fp32 after autocast")


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's limits")
def test_bf16_autocast_in_the_interpreter_runs_eager():
    """The interpreter has no bf16 dot: the layers run their original computation, exactly."""
    model, fast = _models()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with count_launches() as launches:
            out = fast(x)
        ref = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    assert all(k != "_conv_bias_act_fwd_kernel" for k in launches)


CPU_SCRIPT = textwrap.dedent("""
    import torch, torchvision
    import fastres
    from fastres.kernels._common import INTERPRET
    from fastres.testing import randomize_bn, rel_err
    assert not INTERPRET
    torch.manual_seed(0)
    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    f = fastres.convert(m)
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = f(x), m(x)
    with torch.inference_mode():
        ref64 = m.double()(x.double())
    assert out.dtype == ref.dtype == torch.bfloat16, (out.dtype, ref.dtype)
    print("OK", rel_err(out, ref), rel_err(ref, ref64), rel_err(out, ref64))
""")


def test_bf16_autocast_on_the_cpu_path():
    """The folded CPU path (interpreter off) under bf16 autocast: within the bf16 whole-model bound."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", CPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, vs_eager, eager_vs_64, ours_vs_64 = proc.stdout.split()
    assert float(vs_eager) <= 3e-2, proc.stdout
    assert float(ours_vs_64) <= 3e-2, proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_autocast_on_gpu(dtype, rel):
    model, fast = _models()
    model, fast = model.cuda(), fast.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        with count_launches() as launches:
            out = fast(x)
        ref = model(x)
    assert len(launches) == 19
    assert out.dtype == ref.dtype == dtype
    assert rel_err(out, ref) <= rel
