"""pytest-benchmark view of the per-layer suite: ``pytest benchmarks/test_bench_pytest.py --benchmark-only``.

One benchmark per (ResNet-50 layer, provider) at batch 32 fp16 on a GPU; on the CPU (Triton's
interpreter) one tiny layer, fastres and eager, a few rounds: it runs in CI (``testpaths``) so the
checks below are exercised on every change. Each provider's output is checked against the fp32
reference at the per-layer bound before it is timed, and the fastres figure counts only with its
one fused-kernel launch counted in the same call. The JSON suites (bench_kernels.py) remain the
record; this is for pytest-benchmark's compare/histogram tools.
"""

import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:  # run on its own: the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no GPU, and triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True
    )

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

ensure_fastres()

from benchmarks.bench_kernels import LAYER_TOL, make_case, provider_fn, skip_reason  # noqa: E402
from benchmarks.common import peer_settings, tf32_mode  # noqa: E402
from benchmarks.shapes import ConvShape, LayerInfo, unique_layers  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    LAYERS, BATCH = unique_layers(("resnet50",)), 32
else:
    LAYERS, BATCH = [LayerInfo(ConvShape(16, 8, 8, 16, 3, 3, 1, 1, has_residual=True), 1, {"tiny": 1})], 2
PROVIDERS = ("fastres", "eager", "cudnn_fused", "compile")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("li", LAYERS, ids=lambda li: li.shape.name.replace(" ", "_"))
def test_layer(benchmark, li, provider):
    from fastres.testing import count_launches, rel_err

    why = skip_reason(provider, "fp16", DEVICE)
    if why:
        pytest.skip(why)
    layer, x, res, ref = make_case(li.shape, BATCH, "fp16", DEVICE)
    with torch.no_grad(), tf32_mode("fp16"), peer_settings():
        fn = provider_fn(provider, li.shape, layer, x, res, "fp16")
        with count_launches() as launches:
            err = rel_err(fn().float(), ref)
        assert err <= LAYER_TOL["fp16"], f"{provider} {li.shape.name}: rel err {err:.3e}"
        fused = launches.count_of("_conv_bias_act_fwd_kernel")
        assert fused == (1 if provider == "fastres" else 0), f"{provider}: {fused} fused-kernel launches"

        def call():
            fn()
            if CUDA:
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            flops=li.shape.flops(BATCH), bytes=li.shape.bytes(BATCH, "fp16")["total"], rel_err=err
        )
        if CUDA:
            benchmark(call)
        else:  # the interpreter: a few rounds prove the path, timings mean nothing
            benchmark.pedantic(call, rounds=2, iterations=1)
