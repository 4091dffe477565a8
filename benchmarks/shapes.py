"""Every distinct conv layer of torchvision ResNets, derived by running the models, with FLOPs and bytes.

Shapes come from forward hooks on a meta-device forward pass (no memory, no weights), so nothing is
typed by hand. Epilogue flags follow the torchvision block structure, which is also what fastres
fuses: the last conv of a BasicBlock/Bottleneck takes the residual and ReLU; ``downsample.0`` has
neither; every other conv (stem included) has ReLU.

    python -m benchmarks.shapes                      # table of ResNet-18/50/101 layers at 224
    python -m benchmarks.shapes --models resnet50 --json out.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

DEFAULT_MODELS = ("resnet18", "resnet50", "resnet101")
BYTES = {"fp16": 2, "bf16": 2, "tf32": 4, "fp32": 4}


@dataclass(frozen=True)
class ConvShape:
    """One conv layer, batch-free; ``at(n)`` adds the batch."""

    c: int  # input channels
    h: int
    w: int
    k: int  # output channels
    r: int
    s: int
    stride: int
    padding: int
    dilation: int = 1
    groups: int = 1
    has_residual: bool = False
    relu: bool = True

    @property
    def p(self) -> int:
        return (self.h + 2 * self.padding - self.dilation * (self.r - 1) - 1) // self.stride + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.padding - self.dilation * (self.s - 1) - 1) // self.stride + 1

    @property
    def name(self) -> str:
        tail = "+res" if self.has_residual else ("" if self.relu else " norelu")
        return (
            f"{self.c}x{self.h}x{self.w}->{self.k} {self.r}x{self.s}/s{self.stride}"
            f"{'/g' + str(self.groups) if self.groups != 1 else ''}{tail}"
        )

    def flops(self, n: int) -> int:
        """Multiply-adds × 2 of the conv (epilogue ignored)."""
        return 2 * n * self.p * self.q * self.k * (self.c // self.groups) * self.r * self.s

    def bytes(self, n: int, dtype: str = "fp16") -> dict:
        """Compulsory HBM traffic of one fused launch: each tensor read or written once."""
        e = BYTES[dtype]
        out = n * self.k * self.p * self.q * e
        d = {
            "input": n * self.c * self.h * self.w * e,
            "weight": self.k * (self.c // self.groups) * self.r * self.s * e,
            "bias": self.k * 4,
            "output": out,
            "residual": out if self.has_residual else 0,
        }
        d["total"] = sum(d.values())
        return d

    def gemm(self, n: int) -> tuple[int, int, int]:
        """Implicit-GEMM (M, N, K) per group."""
        return n * self.p * self.q, self.k // self.groups, (self.c // self.groups) * self.r * self.s


@dataclass
class LayerInfo:
    shape: ConvShape
    count: int = 0  # occurrences over all models walked
    per_model: dict = field(default_factory=dict)  # model -> occurrences
    paths: dict = field(default_factory=dict)  # model -> first module path using it

    def to_json(self, batches=(32, 256), dtype: str = "fp16") -> dict:
        d = {
            "name": self.shape.name,
            **asdict(self.shape),
            "p": self.shape.p,
            "q": self.shape.q,
            "count": self.count,
            "per_model": self.per_model,
            "models": sorted(self.per_model),
            "example_path": self.paths,
        }
        for n in batches:
            d[f"flops_b{n}"] = self.shape.flops(n)
            d[f"bytes_{dtype}_b{n}"] = self.shape.bytes(n, dtype)
        return d


def _epilogue_flags(model) -> dict[str, tuple[bool, bool]]:
    """module path -> (has_residual, relu) for each Conv2d, from the block structure."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    flags = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (BasicBlock, Bottleneck)):
            convs = [n for n, c in mod.named_children() if isinstance(c, nn.Conv2d)]
            for i, cname in enumerate(convs):
                last = i == len(convs) - 1
                flags[f"{path}.{cname}"] = (last, True)
            if mod.downsample is not None:
                for n, c in mod.downsample.named_modules():
                    if isinstance(c, nn.Conv2d):
                        flags[f"{path}.downsample.{n}"] = (False, False)
    return flags


def model_convs(arch: str, image: int = 224) -> list[tuple[str, ConvShape]]:
    """(module path, shape) for every Conv2d of ``torchvision.models.<arch>`` in forward order."""
    import torch
    import torchvision
    from torch import nn

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)().eval()
    flags = _epilogue_flags(model)
    seen: list[tuple[str, ConvShape]] = []

    def hook(path):
        def fn(mod, args, out):
            x = args[0]
            res, relu = flags.get(path, (False, True))
            seen.append(
                (
                    path,
                    ConvShape(
                        c=x.shape[1],
                        h=x.shape[2],
                        w=x.shape[3],
                        k=mod.out_channels,
                        r=mod.kernel_size[0],
                        s=mod.kernel_size[1],
                        stride=mod.stride[0],
                        padding=mod.padding[0],
                        dilation=mod.dilation[0],
                        groups=mod.groups,
                        has_residual=res,
                        relu=relu,
                    ),
                )
            )

        return fn

    handles = [m.register_forward_hook(hook(p)) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, image, image, device="meta"))
    for h in handles:
        h.remove()
    return seen


def unique_layers(models=DEFAULT_MODELS, image: int = 224) -> list[LayerInfo]:
    """Distinct conv shapes over ``models``, in first-seen order, with counts and users."""
    table: dict[ConvShape, LayerInfo] = {}
    for arch in models:
        for path, shape in model_convs(arch, image):
            info = table.setdefault(shape, LayerInfo(shape))
            info.count += 1
            info.per_model[arch] = info.per_model.get(arch, 0) + 1
            info.paths.setdefault(arch, path)
    return list(table.values())


def layer_class(shape: ConvShape) -> str:
    """A coarse family for summaries: stem, 1x1, 1x1 downsample, 3x3, 3x3 stride 2."""
    if shape.c == 3:
        return "stem 7x7/s2"
    if shape.r == 1 and not shape.relu:
        return "1x1 downsample"
    if shape.r == 1:
        return "1x1 +res" if shape.has_residual else "1x1"
    kind = f"{shape.r}x{shape.s}" + ("/s2" if shape.stride == 2 else "")
    return kind + (" +res" if shape.has_residual else "")


def format_table(layers: list[LayerInfo], batch: int = 32, dtype: str = "fp16") -> str:
    rows = [
        "| layer | class | count | models | GFLOP | MB moved | FLOP/byte |",
        "|---|---|---|---|---|---|---|",
    ]
    for li in layers:
        f = li.shape.flops(batch)
        b = li.shape.bytes(batch, dtype)["total"]
        users = ",".join(sorted(li.per_model))
        rows.append(
            f"| {li.shape.name} | {layer_class(li.shape)} | {li.count} | {users} "
            f"| {f / 1e9:.2f} | {b / 1e6:.1f} | {f / b:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="fp16", choices=sorted(BYTES))
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    layers = unique_layers(tuple(args.models.split(",")), args.image)
    print(format_table(layers, args.batch, args.dtype))
    print(
        f"\n{len(layers)} distinct conv layers, {sum(li.count for li in layers)} occurrences "
        f"(batch {args.batch}, {args.dtype})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([li.to_json((args.batch,), args.dtype) for li in layers], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
