"""Per-layer benchmark: the fused fastres conv kernel against its peers, on every distinct ResNet layer.

Providers (all on channels_last activations, BN statistics randomised):
  fastres      ``fastres.kernels.tuning.conv_bias_act`` (conv + folded BN + residual + ReLU, one gather
               kernel, its config from the tables as the modules get it: FASTRES_CONFIG_DIR, shipped, else
               the heuristic)
  eager        cuDNN conv, eager BN, (+ add), ReLU: what an unconverted model runs
  cudnn_fused  BN folded, ``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``
  compile      ``torch.compile`` (Inductor, freezing on) of the same conv-BN-ReLU(-add) module

Before timing, every provider's output is compared with an fp32 reference of the unfolded layer
(same rounded inputs) at DESIGN.md's per-layer bound; a wrong one is recorded and not timed, and a
fastres record also needs its one fused-kernel launch counted. Inductor runs in a second pass over
the layers, with what the budget leaves. cuDNN picks algorithms by measuring (fixed shapes).
Times: median of ``triton.testing.do_bench_cudagraph`` (many calls in one CUDA graph: no host
time); TFLOP/s and its share of this run's measured bf16 GEMM
peak; compulsory bytes and their share of this run's measured copy bandwidth; the roofline floor.

    python -m benchmarks.bench_kernels --models resnet50 --batches 32 --dtypes fp16 --budget 120
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bootstrap import ensure_fastres  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Budget,
    Stop,
    env_info,
    fastres_precision,
    log,
    measure_peaks,
    parse_list,
    peer_settings,
    stop_on_sigterm,
    summarize,
    tf32_mode,
    time_kernel,
    torch_dtype,
    write_run,
)
from benchmarks.shapes import DEFAULT_MODELS, layer_class, unique_layers  # noqa: E402

PROVIDERS = ("fastres", "fastres_tma_gemm", "eager", "cudnn_fused", "compile")
# The fused kernel(s) each fastres provider must launch exactly once per layer call (one of them).
FUSED_KERNEL = {
    "fastres": ("_conv_bias_act_fwd_kernel",),
    "fastres_tma_gemm": ("_conv1x1_bias_act_fwd_kernel", "_conv1x1_strided_bias_act_fwd_kernel"),  # s1, s2
}
# Inductor compiles each layer cold (seconds): none is started with less than this left.
COMPILE_RESERVE_S = 15
# DESIGN.md "Numerics", per layer; fp32 here is the GPU's IEEE mode or the interpreter.
LAYER_TOL = {"fp16": 5e-3, "bf16": 2e-2, "tf32": 2e-3, "fp32": 1e-5}


def skip_reason(provider: str, dtype: str, device: str) -> str | None:
    """Why ``provider`` cannot run here, or None."""
    if device != "cuda":
        if provider in ("cudnn_fused", "compile"):
            return "needs CUDA (cuDNN fused ops / Inductor GPU codegen); CPU runs check code paths only"
        if dtype == "bf16":
            return "Triton's interpreter has no bf16 dot"
        if dtype == "tf32":
            return "tf32 is a GPU tensor-core mode"
    return None


def tactic_skip_reason(provider: str, shape, batch: int, dtype_name: str, device: str) -> str | None:
    """Why a forced-tactic provider cannot run this layer (its applicability rule), or None."""
    if provider != "fastres_tma_gemm":
        return None
    import torch

    from fastres.fold import pack_weight
    from fastres.kernels import tactics

    # The rule reads shapes, strides, dtype and alignment only: meta tensors of the case's layout.
    dtype = torch_dtype(dtype_name)
    x = torch.empty(batch, shape.c, shape.h, shape.w, dtype=dtype, device="meta")
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.empty(shape.k, shape.c // shape.groups, shape.r, shape.s, dtype=dtype, device="meta")

    return tactics.applicable(
        "tma_gemm",
        x,
        pack_weight(w),
        stride=shape.stride,
        padding=shape.padding,
        dilation=shape.dilation,
        groups=shape.groups,
    )


def make_case(shape, batch: int, dtype_name: str, device: str, seed: int = 0):
    """Inputs, the eager layer and its fp32 reference output, for one (shape, batch, dtype)."""
    import torch

    from benchmarks.peers import ConvBNAct
    from fastres.testing import randomize_bn

    torch.manual_seed(seed)
    dtype = torch_dtype(dtype_name)
    layer = randomize_bn(ConvBNAct(shape), seed).eval().to(device)
    x = torch.randn(batch, shape.c, shape.h, shape.w, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    res = None
    if shape.has_residual:
        res = torch.randn(batch, shape.k, shape.p, shape.q, device=device).to(dtype)
        res = res.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), tf32_mode("fp32"):
        ref = layer.float()(x.float(), None if res is None else res.float())
    return layer, x, res, ref


def provider_fn(provider: str, shape, layer, x, res, dtype_name: str):
    """A no-argument callable that runs one layer with ``provider``."""
    import torch

    dtype = torch_dtype(dtype_name)
    if provider == "fastres":
        from fastres.fold import fold_conv_bn
        from fastres.kernels.tuning import conv_bias_act

        # fastres's own fold, as the modules make it (fp32 weights rounded to tf32 for tf32 dots);
        # the reference is the unfolded eager layer, so a folding bug still shows.
        prec = fastres_precision(dtype_name)
        w, b = fold_conv_bn(layer.conv, layer.bn, dtype, precision=prec)
        return lambda: conv_bias_act(
            x,
            w,
            b,
            residual=res,
            stride=shape.stride,
            padding=shape.padding,
            dilation=shape.dilation,
            groups=shape.groups,
            relu=shape.relu,
            precision=prec,
        )
    if provider == "fastres_tma_gemm":  # issue 11's 1x1 tactic, forced, on the layers it applies to
        from fastres.fold import fold_conv_bn
        from fastres.kernels import tactics

        prec = fastres_precision(dtype_name)
        w, b = fold_conv_bn(layer.conv, layer.bn, dtype, precision=prec)
        return lambda: tactics.conv_bias_act(
            x,
            w,
            b,
            residual=res,
            stride=shape.stride,
            padding=shape.padding,
            dilation=shape.dilation,
            groups=shape.groups,
            relu=shape.relu,
            precision=prec,
            tactic="tma_gemm",
        )
    if provider == "cudnn_fused":  # fold from the fp32 layer, as fastres does
        from benchmarks.peers import cudnn_folded_fn

        f = cudnn_folded_fn(layer.conv, layer.bn, dtype, shape.relu)
        return lambda: f(x, res)
    mod = copy.deepcopy(layer).to(dtype).to(memory_format=torch.channels_last)
    if provider == "eager":
        return lambda: mod(x, res)
    if provider == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        # One code object (ConvBNAct.forward) serves every layer: without a reset Dynamo would hit its
        # recompile limit after a few layers and silently run the rest eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(mod, dynamic=False)
        return lambda: compiled(x, res)
    raise ValueError(provider)


def _passes(providers) -> list[tuple[str, ...]]:
    """Providers in passes: everything but Inductor over every layer first, then Inductor (a cold
    compile per layer, seconds each) with what is left of the budget."""
    first = tuple(p for p in providers if p != "compile")
    return [ps for ps in (first, ("compile",) if "compile" in providers else ()) if ps]


def run(
    layers,
    batches,
    dtypes,
    providers,
    *,
    budget: Budget,
    device: str,
    peaks: dict,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    cpu_reps: int = 3,
    on_case=None,
) -> tuple[list[dict], list[dict]]:
    """Measure every (dtype, batch, layer, provider) while the budget lasts; (records, skipped).

    Every provider's output is checked against the fp32 reference at its per-layer bound before it
    is timed; a wrong one is recorded and not timed. The fastres record also needs exactly one
    launch of the fused conv kernel, counted in the same call (``count_launches``). Kernel times
    come from ``time_kernel`` (CUDA graph replays: no host time). ``on_case(records, skipped)`` is
    called after each layer (the caller writes the JSON).
    """
    import torch

    from fastres.testing import count_launches, rel_err

    records, skipped = [], []
    peak_tflops, copy_gbps = peaks.get("gemm_tflops_bf16"), peaks.get("copy_gbps")
    cases = [(d, b, li) for d in dtypes for b in batches for li in layers]
    passes = _passes(providers)
    total = len(cases) * len(passes)
    done = 0

    def skip(shape, batch, dtype_name, provider, reason):
        skipped.append(
            {"layer": shape.name, "batch": batch, "dtype": dtype_name, "provider": provider, "reason": reason}
        )

    try:
        for pass_providers in passes:
            for dtype_name, batch, li in cases:
                done += 1
                shape = li.shape
                tag = f"[{done}/{total}] {dtype_name} b{batch} {shape.name}"
                if budget.spent():
                    skip(shape, batch, dtype_name, ",".join(pass_providers), "time budget spent")
                    continue
                whys = {}
                for provider in pass_providers:
                    why = skip_reason(provider, dtype_name, device) or tactic_skip_reason(
                        provider, shape, batch, dtype_name, device
                    )
                    if why is None and budget.spent(COMPILE_RESERVE_S if provider == "compile" else 0.0):
                        why = "time budget spent"
                    if why:
                        skip(shape, batch, dtype_name, provider, why)
                    else:
                        whys[provider] = None
                if not whys:
                    continue
                layer, x, res, ref = make_case(shape, batch, dtype_name, device)
                flops = shape.flops(batch)
                nbytes = shape.bytes(batch, dtype_name)
                line = []
                for provider in whys:
                    rec = {
                        "layer": shape.name,
                        "class": layer_class(shape),
                        "count": li.count,
                        "models": sorted(li.per_model),
                        "batch": batch,
                        "dtype": dtype_name,
                        "provider": provider,
                        "flops": flops,
                        "bytes": nbytes["total"],
                        "layout": "NHWC",
                    }
                    try:
                        with torch.no_grad(), tf32_mode(dtype_name), peer_settings():
                            fn = provider_fn(provider, shape, layer, x, res, dtype_name)
                            with count_launches() as launches:
                                out = fn()  # first call: compiles (Triton JIT / Inductor) and checks
                            if device == "cuda":
                                torch.cuda.synchronize()
                            err = rel_err(out.float(), ref)
                            tol = LAYER_TOL[dtype_name]
                            rec.update(rel_err=err, tol=tol, correct=bool(err <= tol))
                            if provider in FUSED_KERNEL:
                                conv = sum(map(launches.count_of, FUSED_KERNEL[provider]))
                                rec["conv_launches"] = conv
                                rec["fused"] = conv == 1
                                if not rec["fused"]:
                                    rec["correct"] = False
                                    rec["error"] = f"fused kernel launched {conv} times, not once"
                                    records.append(rec)
                                    line.append(f"{provider} NOT FUSED({conv})")
                                    continue
                            if not rec["correct"]:
                                rec["error"] = f"{provider} output off: rel err {err:.3e} > {tol:g}"
                                records.append(rec)
                                line.append(f"{provider} WRONG({err:.1e})")
                                continue
                            times, rec["timer"] = time_kernel(
                                fn, device=device, rep_ms=rep_ms, cpu_reps=cpu_reps
                            )
                    except Exception as e:  # one provider failing must not end the run
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        records.append(rec)
                        line.append(f"{provider} ERROR")
                        continue
                    rec.update(summarize(times))
                    sec = rec["median_ms"] * 1e-3
                    rec["tflops"] = flops / sec / 1e12
                    rec["gbps"] = nbytes["total"] / sec / 1e9
                    if peak_tflops:
                        rec["peak_share"] = rec["tflops"] / peak_tflops
                    if copy_gbps:
                        rec["bw_share"] = rec["gbps"] / copy_gbps
                    if peak_tflops and copy_gbps:
                        floor = max(flops / (peak_tflops * 1e12), nbytes["total"] / (copy_gbps * 1e9))
                        rec["floor_ms"] = floor * 1e3
                        rec["of_floor"] = floor / sec
                    records.append(rec)
                    line.append(f"{provider} {rec['median_ms']:.3f}ms")
                log(f"{tag}: " + ", ".join(line) + f"  [{budget.elapsed():.0f}s]")
                del layer, x, res, ref
                if device == "cuda":
                    torch.cuda.empty_cache()
                if on_case is not None:
                    on_case(records, skipped)
    except Stop as e:  # SIGTERM from gpu_check.sh's hard timeout: keep what was measured
        skipped.append({"provider": "*", "reason": str(e)})
        log(f"{e}: writing what was measured")
    return records, skipped


def main(argv=None, *, shapes=None) -> dict:
    """Run and write the JSON; ``shapes`` (a list of LayerInfo) replaces the model-derived layers."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="take the layers of these models")
    ap.add_argument("--layers", default=None, help="comma list of substrings of layer names to keep")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--dtypes", default="fp16,bf16,tf32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds; unfinished cases are recorded as skipped"
    )
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep time per measurement")
    ap.add_argument("--cpu-reps", type=int, default=3, help="timed calls per case on the CPU")
    ap.add_argument("--out", default=None, help="folder or .json path (default benchmarks/results/)")
    args = ap.parse_args(argv)
    ensure_fastres()
    stop_on_sigterm()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 before starting to run fastres in the interpreter")
    budget = Budget(args.budget)
    if shapes is None:
        shapes = unique_layers(tuple(parse_list(args.models)))
    if args.layers:
        keep = parse_list(args.layers)
        shapes = [li for li in shapes if any(k in li.shape.name for k in keep)]
    env = env_info()
    log(
        f"bench_kernels on {env['gpu'] or 'CPU (interpreter)'}: {len(shapes)} layers, "
        f"batches {args.batches}, "
        f"dtypes {args.dtypes}, providers {args.providers}, budget {args.budget}s"
    )
    peaks = measure_peaks(device)
    if device == "cuda":
        log(
            f"measured peak: {peaks['gemm_tflops_bf16']:.0f} TFLOP/s bf16 GEMM, "
            f"{peaks['copy_gbps']:.0f} GB/s copy"
        )
    doc = {"env": env, "args": vars(args), "peaks": peaks, "records": [], "skipped": []}
    out = args.out
    if out is not None and not str(out).endswith(".json"):  # one file for the whole run, rewritten
        out = str(Path(out) / f"kernels-{time.strftime('%Y%m%d-%H%M%S')}.json")

    def write(records, skipped) -> Path:  # after every layer: a killed run still leaves its data
        doc.update(elapsed_s=round(budget.elapsed(), 1), records=records, skipped=skipped)
        doc["path"] = str(write_run({k: v for k, v in doc.items() if k != "path"}, out, "kernels"))
        return Path(doc["path"])

    records, skipped = run(
        shapes,
        parse_list(args.batches, conv=int),
        parse_list(args.dtypes, ("fp16", "bf16", "tf32", "fp32")),
        parse_list(args.providers, PROVIDERS),
        budget=budget,
        device=device,
        peaks=peaks,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
        on_case=write,
    )
    path = write(records, skipped)
    log(f"wrote {path} ({len(records)} records, {len(skipped)} skipped, {budget.elapsed():.0f}s)")
    return doc


if __name__ == "__main__":
    main()
