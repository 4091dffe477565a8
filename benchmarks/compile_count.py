"""Count the distinct Triton compiles a workload needs, on the CPU: the budget of the GPU check.

Every launch through the fastres launchers is intercepted (under the interpreter; nothing runs) and
reduced to what Triton keys a compile on: the kernel, its constexprs, the dtypes of its tensors, the
specialisation of its integer arguments (== 1, multiple of 16; sizes in ``do_not_specialize`` are not
specialised) and, for the conv, the block config and warps the GPU would pick (``pick_config`` with
``interpret=False``; the shipped sm_90 table is empty, so the heuristic decides); for the other kernels
their block sizes, warps and stages as launched. The result is an upper bound: a pointer-alignment
difference could add a compile, none is merged that Triton would keep apart except by that.

It also counts what the one-shot tuner (``benchmarks/tune.py``) compiles: every candidate of every tactic
that applies, per ResNet-50 layer, batch and dtype (``tuner_keys``).

    TRITON_INTERPRET=1 python -m benchmarks.compile_count
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bootstrap import ensure_fastres  # noqa: E402

BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "BLOCK_ROWS", "BLOCK_COLS")


def _int_spec(v: int) -> str:
    return "1" if v == 1 else ("d16" if v % 16 == 0 else "i")


@contextlib.contextmanager
def recording(keys: set, *, config=None):
    """Intercept launches: each adds its compile key to ``keys``; no kernel runs. ``config`` (a
    ConvConfig) replaces the heuristic one, as a test that passes its own config does."""
    import importlib

    from fastres.kernels import conv as conv_kernels

    mods = []
    for name in ("conv", "pool", "tma_gemm", "tma_conv", "epilogue"):
        try:
            mods.append(importlib.import_module(f"fastres.kernels.{name}"))
        except ImportError:  # a kernel family this checkout does not have
            continue
    saved = [(m, m.launchable) for m in mods if hasattr(m, "launchable")]

    def fake(kernel):
        fn = getattr(kernel, "fn", kernel)
        name = getattr(fn, "__name__", "?")
        names = list(getattr(kernel, "arg_names", None) or fn.__code__.co_varnames[: fn.__code__.co_argcount])
        # The interpreter's function drops do_not_specialize: read the conv module's list too.
        unspec = set(getattr(kernel, "do_not_specialize", ()) or ())
        if name == "_conv_bias_act_fwd_kernel":
            unspec |= set(getattr(conv_kernels, "CONV_UNSPECIALISED", ()))

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    sig = []
                    for i, a in enumerate(args):
                        arg = names[i] if i < len(names) else str(i)
                        if isinstance(a, torch.Tensor):
                            sig.append(str(a.dtype))
                        elif isinstance(a, bool) or not isinstance(a, int):
                            sig.append(repr(a))
                        else:
                            sig.append("i" if arg in unspec or i in unspec else _int_spec(a))
                    skip = BLOCKS + ("num_warps", "num_stages")
                    const = {k: v for k, v in kw.items() if k not in skip}
                    cfg = tuple(sorted((k, v) for k, v in kw.items() if k in skip))  # as launched
                    if name == "_conv_bias_act_fwd_kernel":
                        a = dict(zip(names, args, strict=False))
                        m = a["BATCH"] * a["P"] * a["Q"]
                        dtype = args[0].dtype
                        cfg = config or conv_kernels.pick_config(
                            m, a["C_OUT_G"], a["C_IN_G"], kw["R"], kw["S"], dtype, interpret=False
                        )
                        if dtype == torch.float32 and kw.get("DOT_PRECISION") == "ieee":
                            cfg = conv_kernels.fit_ieee(cfg)
                    keys.add((name, tuple(sig), tuple(sorted(const.items())), cfg))

                return run

        return _Grid()

    for m, _ in saved:
        m.launchable = fake
    try:
        yield keys
    finally:
        for m, orig in saved:
            m.launchable = orig


def model_keys(arch: str, dtype: torch.dtype, batch: int, image: int, precision: str = "tf32") -> set:
    """Compile keys of one converted torchvision model's forward. bf16 is counted as fp16 (the
    interpreter's modules refuse bf16; the structure, hence the count, is the same)."""
    import torchvision

    import fastres

    os.environ["FASTRES_FP32_PRECISION"] = precision
    keys: set = set()
    model = (torchvision.models.get_model(arch) if arch != "resnet_tiny" else _tiny()).eval()
    run_dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    fast = fastres.convert(model.to(run_dtype))
    with recording(keys), torch.inference_mode():
        fast(torch.randn(batch, 3, image, image, dtype=run_dtype))
    return {(k[0], k[1], k[2], k[3], str(dtype)) for k in keys}


def _tiny():
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def gpu_test_keys() -> dict[str, set]:
    """tests/test_gpu.py, case by case, on CPU tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_gpu as t

    from fastres.fold import fold_conv_bn
    from fastres.kernels.conv import ConvConfig, conv_bias_act, pick_config

    out: dict[str, set] = {"layers": set(), "num_warps": set(), "models": set(), "dual": set()}

    def layer(shape, dtype, precision, keys, config=None):
        _, n, c_in, h, w, c_out, r, stride, padding, dilation, groups = shape
        conv, bn = t.make_conv_bn(c_in, c_out, r, stride, padding, dilation, groups, conv_bias=True)
        f = fold_conv_bn(conv, bn, torch.float16 if dtype == torch.bfloat16 else dtype)
        x = torch.randn(n, c_in, h, w).to(f.weight.dtype).contiguous(memory_format=torch.channels_last)
        p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
        q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
        res = torch.randn(n, c_out, p, q).to(f.weight.dtype)
        with recording(keys, config=config):
            conv_bias_act(
                x,
                f.weight,
                f.bias,
                residual=res,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                precision=precision,
            )

    for shape, dtype, precision, *_ in t.LAYER_CASES:
        k: set = set()
        layer(shape, dtype, precision, k)
        out["layers"] |= {(*key, str(dtype)) for key in k}
    for shape in t.RESNET50_LAYERS:
        _, n, c_in, h, w, c_out, r, stride, padding, *_ = shape
        p = (h + 2 * padding - r) // stride + 1
        base = pick_config(n * p * p, c_out, c_in, r, r, torch.float16, interpret=False)
        for warps in (2, 4, 8):
            cfg = ConvConfig(base.block_m, base.block_n, base.block_k, warps, base.num_stages)
            layer(shape, torch.float16, "tf32", out["num_warps"], config=cfg)
    for arch, dtype, precision, *_ in t.WHOLE_MODEL_CASES:
        out["models"] |= model_keys(arch, dtype, 4, 224, precision)
    out["dual"] = {("dual", str(d)) for d in (torch.float16, torch.bfloat16)}  # one launch each
    return out


def tuner_keys(dtypes=(torch.float16, torch.bfloat16), batches=(1, 32, 256)) -> dict[str, set]:
    """What ``python -m benchmarks.tune`` compiles on ResNet-50, per tactic: each candidate config of each
    tactic that applies (``kernels.tuning.tactic_candidates``, for the batch's M), launched once under
    ``recording`` at batch 1 (the compile key does not depend on the batch; the candidates do, through M).
    cuDNN's own convs are not Triton compiles; its epilogue pass is counted where it runs."""
    from benchmarks.tune import resnet_layers
    from fastres.fold import pack_weight
    from fastres.kernels import tactics, tuning

    out: dict[str, set] = {name: set() for name in tactics.TACTICS}
    for layer in resnet_layers("resnet50"):
        for dtype in dtypes:
            run = torch.float16 if dtype == torch.bfloat16 else dtype  # the interpreter refuses bf16 dots
            x = (
                torch.randn(1, layer.c_in, layer.h, layer.w)
                .to(run)
                .contiguous(memory_format=torch.channels_last)
            )
            w = pack_weight(torch.randn(layer.c_out, layer.c_in // layer.groups, layer.r, layer.s).to(run))
            b = torch.randn(layer.c_out)
            res = torch.randn(1, layer.c_out, layer.p, layer.q).to(run) if layer.residual else None
            sx = sw = None
            if layer.shortcut_c_in is not None:
                sx = torch.randn(1, layer.shortcut_c_in, layer.sc_h, layer.sc_w).to(run)
                sx = sx.contiguous(memory_format=torch.channels_last)
                sw = pack_weight(torch.randn(layer.c_out, layer.shortcut_c_in, 1, 1).to(run))
            for name in tactics.TACTICS:
                layout = tactics.WEIGHTS.get(name, lambda t: t)
                conv = dict(
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
                )
                if tactics.applicable(name, x, layout(w), shortcut=sx is not None, **conv) is not None:
                    continue
                for batch in batches:
                    m = batch * layer.p * layer.q
                    configs = tuning.tactic_candidates(
                        name, m=m, c_in=layer.c_in, c_out=layer.c_out, r=layer.r, s=layer.s,
                        groups=layer.groups, dtype=dtype,
                    )  # fmt: skip
                    for cfg in configs:
                        keys: set = set()
                        gather_cfg = cfg if isinstance(cfg, tuning._conv.ConvConfig) else None
                        with recording(keys, config=gather_cfg):
                            tactics.conv_bias_act(
                                x, layout(w), b, residual=res, act=layer.act, shortcut_x=sx,
                                shortcut_weight=None if sw is None else layout(sw),
                                shortcut_stride=layer.shortcut_stride, config=cfg, tactic=name, **conv,
                            )  # fmt: skip
                        out[name] |= {(*k, str(dtype)) for k in keys}
    return out


def main() -> int:
    ensure_fastres()
    gpu = gpu_test_keys()
    total = set().union(*gpu.values())
    print("tests/test_gpu.py distinct compiles:")
    for part, keys in gpu.items():
        print(f"  {part:<10} {len(keys)}")
    print(f"  {'all':<10} {len(total)}")
    bench = set()
    for batch in (1, 32, 256):
        bench |= model_keys("resnet50", torch.float16, batch, 224)
    print(
        f"bench_models ResNet-50 fp16 b1/32/256: {len(bench)} compiles, {len(bench - gpu['models'])} not "
        "already compiled by test_gpu"
    )
    tiny = model_keys("resnet_tiny", torch.float16, 2, 32)
    print(f"one-block-per-stage ResNet (the other GPU tests' model), one dtype: {len(tiny)} compiles")
    tuner = tuner_keys()
    every = set().union(*tuner.values())
    per = ", ".join(f"{name} {len(keys)}" for name, keys in tuner.items())
    print(
        f"one-shot tuner, ResNet-50 b1/32/256 fp16+bf16: {len(every)} compiles ({per}), "
        f"{len(every - bench)} not compiled by the model plan"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
