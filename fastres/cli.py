"""``fastres demo | verify | bench``: the command line.

On a machine without CUDA the Triton kernels run through Triton's interpreter, which must be
switched on before triton is imported (torchvision imports it): so this module imports torch
first, decides, and only then imports torchvision and fastres.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

STAGES = ("maxpool", "layer1", "layer2", "layer3", "layer4", "fc")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _prepare_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("fastres: --device cuda asked for, but torch sees no CUDA device")
    if requested == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device(requested)


def _capture(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, o, name=name: outs.__setitem__(name, o.detach())
        )
        for name in STAGES
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _time_ms(fn, device: torch.device) -> float:
    from triton.testing import do_bench

    with torch.inference_mode():
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def demo(args: argparse.Namespace) -> int:
    device = _prepare_device(args.device)
    import torchvision

    import fastres
    from fastres.testing import randomize_bn, rel_err

    torch.manual_seed(args.seed)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    mode = (
        "compiled Triton"
        if device.type == "cuda"
        else ("Triton interpreter" if interp else "folded CPU path")
    )
    size = args.size or (224 if device.type == "cuda" else 64)
    batch = args.batch or (32 if device.type == "cuda" else 2)
    print(f"fastres {fastres.__version__} demo: {args.arch}, random weights, randomised BN statistics")
    print(f"device {device} ({mode}); torch {torch.__version__}; input {batch}x3x{size}x{size}")
    model = randomize_bn(getattr(torchvision.models, args.arch)(), args.seed).eval().to(device)
    t0 = time.perf_counter()
    fast = fastres.convert(model)
    rep = fastres.report(fast)
    print(
        f"converted in {time.perf_counter() - t0:.2f}s: "
        f"{rep.convs_fused}/{rep.convs_total} convolutions fused"
    )
    x = torch.randn(batch, 3, size, size, device=device)
    t0 = time.perf_counter()
    got = _capture(fast, x)
    print(
        f"first fused forward (fold + {'compile' if device.type == 'cuda' else 'interpret'}): "
        f"{time.perf_counter() - t0:.1f}s"
    )
    ref = _capture(model, x)
    ref64 = _capture(model.double(), x.double()) if device.type == "cpu" else None
    model.float()
    print()
    head = f"{'stage':<8} {'shape':<20} {'rel err vs eager fp32':>22}"
    print(head + (f" {'rel err vs fp64':>16}" if ref64 else ""))
    print("-" * (len(head) + (17 if ref64 else 0)))
    worst = 0.0
    for name in STAGES:
        err = rel_err(got[name], ref[name])
        worst = max(worst, err)
        line = f"{name:<8} {str(tuple(got[name].shape)):<20} {err:>22.2e}"
        if ref64:
            line += f" {rel_err(got[name], ref64[name]):>16.2e}"
        print(line)
    if device.type == "cuda":
        print()
        print(
            f"{'dtype':<8} {'eager ms':>10} {'fastres ms':>11} {'speedup':>8}"
            f"   (batch {batch}, median of do_bench)"
        )
        for dtype in (torch.float16, torch.float32):
            m = model.to(dtype).to(memory_format=torch.channels_last)
            f = fastres.convert(m)
            xd = x.to(dtype)
            te = _time_ms(lambda m=m, xd=xd: m(xd), device)
            tf = _time_ms(lambda f=f, xd=xd: f(xd), device)
            print(f"{str(dtype).replace('torch.', ''):<8} {te:>10.3f} {tf:>11.3f} {te / tf:>7.2f}x")
    limit = 5e-3 if device.type == "cuda" else 1e-4
    print(f"\nworst stage error {worst:.2e} (limit {limit:.0e}): {'OK' if worst <= limit else 'TOO LARGE'}")
    return 0 if worst <= limit else 1


def verify(args: argparse.Namespace) -> int:
    device = _prepare_device(args.device)
    import torchvision

    import fastres
    from fastres.testing import randomize_bn, rel_err

    size = args.size or (224 if device.type == "cuda" else 32)
    unknown = set(args.archs) - set(ARCHS)
    if unknown:
        sys.exit(f"fastres verify: unknown architecture(s) {sorted(unknown)}; choose from {ARCHS}")
    failed = 0
    for arch in args.archs or ARCHS:
        torch.manual_seed(args.seed)
        model = randomize_bn(getattr(torchvision.models, arch)(), args.seed).eval().to(device)
        fast = fastres.convert(model)
        x = torch.randn(2, 3, size, size, device=device)
        with torch.inference_mode():
            err = rel_err(fast(x), model(x))
        limit = 5e-3 if device.type == "cuda" else 1e-4
        ok = err <= limit
        failed += not ok
        print(f"{arch:<10} rel err {err:.2e}  {'OK' if ok else 'FAIL'} (limit {limit:.0e})", flush=True)
    return 1 if failed else 0


def bench(args: argparse.Namespace) -> int:
    """Images/s of eager NCHW, eager channels_last, fastres and fastres + CUDA graphs, one GPU."""
    if not torch.cuda.is_available():
        print(
            "fastres bench times models on a CUDA GPU and none is visible. On the CPU, "
            "`make bench-smoke` runs every benchmark code path; benchmarks/gpu_check.sh is the full suite.",
            file=sys.stderr,
        )
        return 2
    import copy
    import json

    import torchvision

    import fastres
    from fastres.testing import randomize_bn, rel_err

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tol = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 5e-3}[args.dtype]
    torch.manual_seed(args.seed)
    model = randomize_bn(getattr(torchvision.models, args.arch)(), args.seed).eval().cuda().to(dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda", dtype=dtype)
    from fastres.testing import count_launches

    # Shapes are fixed: let cuDNN choose its algorithms by measuring, as a tuned deployment would.
    torch.backends.cudnn.benchmark = True
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fast = fastres.convert(model, example_input=x)
    graphs = fastres.cuda_graphs(fast)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(x)
        with count_launches() as launches:
            y = fast(x)
        err = rel_err(y, ref)
        err_graphs = rel_err(graphs(x), ref)
        err_cl = rel_err(model_cl(x_cl), ref)
    fused = launches.count_of("_conv_bias_act_fwd_kernel")
    if not fused:
        print("fastres ran no fused conv kernel (eager path): not timing it", file=sys.stderr)
        return 1
    for what, e in (("fastres", err), ("fastres + CUDA graphs", err_graphs), ("eager channels_last", err_cl)):
        if not e <= tol:
            print(f"{what} output is off: rel err {e:.2e} > {tol:.0e}; not timing", file=sys.stderr)
            return 1
    runs = {
        "eager NCHW": lambda: model(x),
        "eager channels_last": lambda: model_cl(x_cl),
        "fastres": lambda: fast(x),
        "fastres + CUDA graphs": lambda: graphs(x),
    }
    gpu = torch.cuda.get_device_name()
    print(
        f"{args.arch}, batch {args.batch}, {args.dtype}, {args.size}x{args.size} on {gpu}; "
        f"rel err vs eager: fastres {err:.1e} ({fused} fused conv launches), CUDA graphs {err_graphs:.1e}"
    )
    print(f"{'provider':<24} {'ms (median)':>12} {'images/s':>10}")
    results = {}
    for name, fn in runs.items():
        ms = _time_ms(fn, x.device)
        results[name] = ms
        print(f"{name:<24} {ms:>12.3f} {args.batch / ms * 1e3:>10.0f}", flush=True)
    if args.json:
        doc = {
            "arch": args.arch,
            "batch": args.batch,
            "dtype": args.dtype,
            "size": args.size,
            "gpu": gpu,
            "torch": torch.__version__,
            "fastres": fastres.__version__,
            "rel_err": err,
            "rel_err_graphs": err_graphs,
            "fused_conv_launches": fused,
            "median_ms": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastres", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="convert ResNet-50, print per-stage error (and timings on a GPU)")
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--size", type=int, default=0, help="image size (default 224 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=0, help="batch (default 32 on GPU, 2 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    p = sub.add_parser("verify", help="check converted torchvision ResNets against eager")
    p.add_argument("archs", nargs="*", help=f"any of {', '.join(ARCHS)} (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=verify)
    p = sub.add_parser("bench", help="time eager vs fastres (and CUDA graphs) on this GPU")
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the times to this JSON file")
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
