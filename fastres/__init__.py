"""fastres: fused Triton kernels that make ResNets run faster, as drop-in modules.

>>> import torchvision, fastres
>>> fast = fastres.convert(torchvision.models.resnet50().eval())   # doctest: +SKIP
>>> y = fast(x)                                                    # doctest: +SKIP

Names load on first use, so that ``python -m fastres`` can choose Triton's interpreter
(``TRITON_INTERPRET=1``) before anything imports triton.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "convert": "fastres.converter",
    "export": "fastres.deploy",
    "export_onnx": "fastres.deploy",
    "report": "fastres.converter",
    "Report": "fastres.converter",
    "FoldedBatchNorm2d": "fastres.modules",
    "FoldedMaxPool2d": "fastres.modules",
    "FoldedAct": "fastres.modules",
    "FoldedReLU": "fastres.modules",
    "FusedBasicBlock": "fastres.modules",
    "FusedBottleneck": "fastres.modules",
    "FusedConvBNAct2d": "fastres.modules",
    "FusedHead": "fastres.modules",
    "FusedStage": "fastres.modules",
    "FusedStem": "fastres.modules",
    "refold": "fastres.modules",
    "CUDAGraphModule": "fastres.graphs",
    "cuda_graphs": "fastres.graphs",
    "tune_model": "fastres.tuning",
    "warmup": "fastres.warm",
    "WarmupReport": "fastres.warm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
