"""Launch-and-bytes model: kernel launches and compulsory HBM bytes per image, eager vs fastres, and
the per-layer roofline floor on a reference GPU. Pure arithmetic on shapes; no GPU, no weights.

Eager: a meta-device forward of the torchvision model under a dispatch mode; every non-view aten op
counts as one launch that reads each input tensor and writes each output once (cuDNN may launch more
than one kernel per conv, so eager launches are a lower bound). fastres: one launch per conv
(conv + BN + ReLU + residual add in the epilogue) except projection shortcuts, which run inside their
block's last kernel; the pools and the classifier as in eager; each conv reads its input, weight,
bias (and residual) once and writes its output once (a fused shortcut's output never reaches memory).

Roofline floor of a layer = max(FLOPs / peak, bytes / bandwidth). Reference defaults (parameters):
H100 SXM5, dense tensor-core fp16/bf16 989.4 TFLOP/s, tf32 494.7 TFLOP/s, HBM3 3.35 TB/s, from the
NVIDIA H100 Tensor Core GPU datasheet (dense figures, i.e. half the "with sparsity" numbers).
A benchmark run replaces these with the peak and copy bandwidth it measured itself.

    python -m benchmarks.roofline --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import BYTES, DEFAULT_MODELS, layer_class, model_convs, unique_layers  # noqa: E402

H100_SXM = {
    "name": "H100 SXM5 (datasheet, dense)",
    "tflops": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "hbm_tbps": 3.35,
    "source": "NVIDIA H100 Tensor Core GPU datasheet: SXM5 dense tensor-core throughput, HBM3 bandwidth",
}
MODEL_ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152")
_FUSED_INTO_CONV = (
    "aten::convolution",
    "aten::_native_batch_norm_legit_no_training",
    "aten::native_batch_norm",
    "aten::batch_norm",
    "aten::cudnn_convolution",
    "aten::relu_",
    "aten::relu",
    "aten::add_",
    "aten::add",
)


def eager_ops(arch: str, batch: int, dtype: str = "fp16", image: int = 224) -> list[dict]:
    """Every non-view aten op of an eval forward with its bytes (inputs read + outputs written)."""
    import torch
    import torchvision
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from benchmarks.common import torch_dtype

    ops: list[dict] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # views and allocations (empty, empty_like) launch no kernel
            name = func.overloadpacket._qualified_op_name
            if not func.is_view and name not in ("aten::detach",) and not name.startswith("aten::empty"):
                nbytes = lambda ts: sum(
                    t.numel() * t.element_size() for t in tree_leaves(ts) if isinstance(t, torch.Tensor)
                )
                ops.append({"op": name, "read": nbytes((args, kwargs)), "write": nbytes(out)})
            return out

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)().eval().to(torch_dtype(dtype))
    x = torch.empty(batch, 3, image, image, device="meta", dtype=torch_dtype(dtype))
    with torch.no_grad(), Log():
        model(x)
    return ops


def model_traffic(arch: str, batch: int, dtype: str = "fp16", image: int = 224) -> dict:
    """Launches and bytes per forward and per image, eager vs fastres."""
    ops = eager_ops(arch, batch, dtype, image)
    rest = [o for o in ops if o["op"] not in _FUSED_INTO_CONV]
    convs = model_convs(arch, image)
    conv_bytes = sum(s.bytes(batch, dtype)["total"] for _, s in convs)
    eager_bytes = sum(o["read"] + o["write"] for o in ops)
    rest_bytes = sum(o["read"] + o["write"] for o in rest)
    by_op: dict[str, int] = {}
    for o in ops:
        by_op[o["op"]] = by_op.get(o["op"], 0) + 1
    # Dual GEMM: a 1x1 projection shortcut runs inside its block's last kernel
    # (fastres.modules._FusedBlock._dual_shortcut), so its output is never written nor read back.
    dual = [s for path, s in convs if path.endswith("downsample.0") and s.r == s.s == 1 and s.groups == 1]
    fast_bytes = conv_bytes - sum(2 * s.bytes(batch, dtype)["output"] for s in dual) + rest_bytes
    return {
        "arch": arch,
        "batch": batch,
        "dtype": dtype,
        "image": image,
        "eager": {
            "launches": len(ops),
            "bytes": eager_bytes,
            "bytes_per_image": eager_bytes / batch,
            "ops": by_op,
        },
        "fastres": {
            "launches": len(convs) - len(dual) + len(rest),
            "shortcuts_in_tail": len(dual),
            "bytes": fast_bytes,
            "bytes_per_image": fast_bytes / batch,
            "convs": len(convs),
            "other_ops": sorted({o["op"] for o in rest}),
        },
        "flops": sum(s.flops(batch) for _, s in convs),
    }


def layer_floor(shape, batch: int, dtype: str, tflops: float, tbps: float) -> dict:
    f = shape.flops(batch)
    b = shape.bytes(batch, dtype)["total"]
    t_c, t_m = f / (tflops * 1e12), b / (tbps * 1e12)
    return {
        "flops": f,
        "bytes": b,
        "ai": f / b,
        "floor_us": max(t_c, t_m) * 1e6,
        "compute_us": t_c * 1e6,
        "memory_us": t_m * 1e6,
        "bound": "compute" if t_c >= t_m else "memory",
    }


def build(
    models=MODEL_ARCHS,
    layer_models=DEFAULT_MODELS,
    batches=(1, 32, 256),
    layer_batches=(32, 256),
    dtype: str = "fp16",
    gpu: dict = H100_SXM,
    image: int = 224,
) -> dict:
    tflops, tbps = gpu["tflops"][dtype], gpu["hbm_tbps"]
    traffic = [model_traffic(a, n, dtype, image) for a in models for n in batches]
    layers = []
    for li in unique_layers(tuple(layer_models), image):
        for n in layer_batches:
            layers.append(
                {
                    "layer": li.shape.name,
                    "class": layer_class(li.shape),
                    "count": li.count,
                    "models": sorted(li.per_model),
                    "batch": n,
                    "dtype": dtype,
                    **layer_floor(li.shape, n, dtype, tflops, tbps),
                }
            )
    return {
        "params": {"gpu": gpu, "dtype": dtype, "bytes_per_element": BYTES[dtype], "image": image},
        "models": traffic,
        "layers": layers,
    }


def to_markdown(doc: dict) -> str:
    p = doc["params"]
    g = p["gpu"]
    lines = [
        f"### Launches and HBM bytes per image ({p['dtype']}, {p['image']}x{p['image']}; model, "
        "not measured)",
        "",
        "| model | batch | eager launches | fastres launches | eager MB/image | fastres MB/image | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        e, f = m["eager"], m["fastres"]
        lines.append(
            f"| {m['arch']} | {m['batch']} | {e['launches']} | {f['launches']} | "
            f"{e['bytes_per_image'] / 1e6:.1f} | {f['bytes_per_image'] / 1e6:.1f} | "
            f"{e['bytes_per_image'] / f['bytes_per_image']:.2f}x |"
        )
    lines += [
        "",
        f"Roofline floor per layer on {g['name']}: {g['tflops'][p['dtype']]} TFLOP/s, "
        f"{g['hbm_tbps']} TB/s ({g['source']}).",
        "",
        "| layer | class | count | batch | GFLOP | MB | FLOP/B | floor us | bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["layers"]:
        lines.append(
            f"| {r['layer']} | {r['class']} | {r['count']} | {r['batch']} | "
            f"{r['flops'] / 1e9:.2f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['ai']:.0f} | {r['floor_us']:.1f} | {r['bound']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.common import env_info, write_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODEL_ARCHS))
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "tf32"])
    ap.add_argument("--peak-tflops", type=float, help="override the reference peak (TFLOP/s)")
    ap.add_argument("--hbm-tbps", type=float, help="override the reference bandwidth (TB/s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = {**H100_SXM, "tflops": dict(H100_SXM["tflops"])}
    if args.peak_tflops:
        gpu["tflops"][args.dtype] = args.peak_tflops
        gpu["name"] += " (peak overridden)"
    if args.hbm_tbps:
        gpu["hbm_tbps"] = args.hbm_tbps
        gpu["name"] += " (bandwidth overridden)"
    doc = build(
        tuple(args.models.split(",")),
        batches=tuple(int(b) for b in args.batches.split(",")),
        dtype=args.dtype,
        gpu=gpu,
    )
    path = write_run({"env": env_info(), "args": vars(args), **doc}, args.out, "roofline")
    print(to_markdown(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
