"""Every torchvision classification model that has a BatchNorm2d, converted, against eager.

`make test` runs the SUBSET; `make test-zoo` runs them all (marker ``zoo``). Random weights,
randomised BN statistics, small inputs: the Triton interpreter is slow.
"""

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres.testing import assert_close, randomize_bn

SUBSET = {
    "resnet18",
    "googlenet",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "vgg11_bn",
    "densenet121",
    "efficientnet_b0",
}
# Smallest inputs each architecture accepts (its own pooling / window arithmetic), default 64.
SIZES = {"inception_v3": 80, "maxvit_t": 224, "vgg11_bn": 32, "vgg13_bn": 32, "vgg16_bn": 32, "vgg19_bn": 32}
EXTRA_KWARGS = {
    "googlenet": dict(aux_logits=False, init_weights=False),
    "inception_v3": dict(aux_logits=False),
}


ZOO = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in SUBSET else pytest.mark.zoo) for n in ZOO])
def test_zoo_model_matches_eager(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **EXTRA_KWARGS.get(name, {}))
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        pytest.skip(f"{name} has no BatchNorm2d")
    model = randomize_bn(model).eval()
    fast = fastres.convert(model)
    rep = fastres.report(fast)
    assert rep.convs_fused > 0, f"{name}: nothing fused\n{rep}"
    size = SIZES.get(name, 64)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        out = fast(x)
    with torch.no_grad():
        ref = model.double()(x.double())
    assert_close(
        out, ref, rel=1e-4, atol=1e-4, rtol=1e-3, what=f"{name} ({rep.convs_fused}/{rep.convs_total} fused)"
    )


def test_subset_is_in_the_zoo():
    assert SUBSET <= set(ZOO)
