"""pytest-benchmark view of the per-layer suite: ``pytest benchmarks/test_bench_pytest.py --benchmark-only``.

One benchmark per (ResNet-50 layer, provider) at batch 32 fp16 on a GPU; on the CPU (only with
TRITON_INTERPRET=1 set before pytest starts) one tiny layer, fastres and eager. Each provider's
output is checked against the fp32 reference before it is timed. The JSON suites
(bench_kernels.py) remain the record; this is for pytest-benchmark's compare/histogram tools.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET=1 not set before pytest started", allow_module_level=True)

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

ensure_fastres()

from benchmarks.bench_kernels import LAYER_TOL, make_case, provider_fn, skip_reason  # noqa: E402
from benchmarks.common import tf32_mode  # noqa: E402
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
    from fastres.testing import rel_err

    why = skip_reason(provider, "fp16", DEVICE)
    if why:
        pytest.skip(why)
    layer, x, res, ref = make_case(li.shape, BATCH, "fp16", DEVICE)
    with torch.no_grad(), tf32_mode("fp16"):
        fn = provider_fn(provider, li.shape, layer, x, res, "fp16")
        err = rel_err(fn().float(), ref)
        assert err <= LAYER_TOL["fp16"], f"{provider} {li.shape.name}: rel err {err:.3e}"

        def call():
            fn()
            if CUDA:
                torch.cuda.synchronize()

        benchmark.extra_info.update(flops=li.shape.flops(BATCH), bytes=li.shape.bytes(BATCH, "fp16")["total"])
        benchmark(call)
