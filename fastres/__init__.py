"""fastres: fused Triton kernels that make ResNets run faster, as drop-in modules.

>>> import torchvision, fastres
>>> fast = fastres.convert(torchvision.models.resnet50().eval())   # doctest: +SKIP
>>> y = fast(x)                                                    # doctest: +SKIP
"""

from fastres.convert import Report, convert, report
from fastres.modules import (
    FoldedBatchNorm2d,
    FoldedMaxPool2d,
    FoldedReLU,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConvBNAct2d,
    FusedHead,
    FusedStem,
)

__version__ = "0.1.0"
__all__ = [
    "FoldedBatchNorm2d", "FoldedMaxPool2d", "FoldedReLU", "FusedBasicBlock", "FusedBottleneck",
    "FusedConvBNAct2d", "FusedHead", "FusedStem", "Report", "convert", "report",
]
