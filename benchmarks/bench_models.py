"""Whole-model benchmark: torchvision ResNets end to end, fastres against the ways PyTorch runs them.

Providers, in the order they run (DESIGN.md: what matters first):
  eager_cl        the model and input in channels_last
  fastres         fastres.convert(model) + fastres.warmup, same NCHW input as eager (drop-in use)
  fastres_graphs  the converted model replayed from a CUDA graph (benchmarks/peers.CudaGraphRunner)
  cudnn_folded    BN folded into the convs, cuDNN fused conv(+add)+ReLU ops (benchmarks/peers.py)
  compile         torch.compile, Inductor, freezing on (``--max-autotune`` for mode="max-autotune");
                  not started with less than COMPILE_RESERVE_S of the budget left
  eager           the model as is, NCHW
  compile_ro      torch.compile mode="reduce-overhead" (CUDA graphs), batch 1 only

For each (model, dtype, batch) the eager NCHW output is the reference; every provider's output is
compared with it at DESIGN.md's model bound for its dtype and path before timing; a wrong one is
recorded and not timed. A fastres figure also needs the fused conv kernel to have launched in the
same run (counted). cuDNN picks its algorithms by measuring (shapes are fixed). The JSON is
rewritten after every group. Reports images/s, latency p50/p90 (all raw times kept), peak memory
and cold start (build, convert or compile until the first output is on the host side of a sync).
fp32 runs with tf32 dots everywhere (the cuDNN and fastres defaults).

    python -m benchmarks.bench_models --models resnet50 --batches 1,32,256 --dtypes fp16 --budget 200
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
    log,
    measure_peaks,
    parse_list,
    peer_settings,
    stop_on_sigterm,
    summarize,
    tf32_mode,
    time_fn,
    torch_dtype,
    write_run,
)

MODELS = ("resnet18", "resnet50", "resnet101", "resnet152")
# Built from torchvision's ResNet class, for code-path runs on the CPU (interpreter): one block per stage.
TINY_ARCHS = ("resnet_tiny",)
# In order of importance (DESIGN.md "Benchmarks"): when the budget runs short the later ones go first.
PROVIDERS = ("eager_cl", "fastres", "fastres_graphs", "cudnn_folded", "compile", "eager", "compile_ro")
# A cold Inductor compile of a whole ResNet-50 takes 40-70 s on the GPU machine's CPU: none is started
# with less than this left, so the hard timeout never cuts one mid-compile.
COMPILE_RESERVE_S = 75
# DESIGN.md "Numerics", whole model, against eager in the same dtype. fp32 on the GPU runs tf32 dots.
MODEL_TOL = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 5e-3}
# The interpreter's fp32 dot is exact: its whole-model bound is 1e-4, not the GPU's tf32 bound.
INTERPRET_FP32_TOL = 1e-4


def model_tol(dtype_name: str, device: str) -> float:
    """The whole-model bound for this dtype on this path (DESIGN.md numerics table)."""
    if device != "cuda" and dtype_name == "fp32":
        return INTERPRET_FP32_TOL
    return MODEL_TOL[dtype_name]


def skip_reason(provider: str, dtype: str, batch: int, device: str) -> str | None:
    if provider == "compile_ro" and batch != 1:
        return "reduce-overhead is measured at batch 1 only"
    if device != "cuda":
        if provider in ("cudnn_folded", "compile", "compile_ro", "fastres_graphs"):
            return "needs CUDA (cuDNN fused ops / Inductor GPU codegen / CUDA graphs)"
        if dtype == "bf16" and provider.startswith("fastres"):
            return "Triton's interpreter has no bf16 dot"
    return None


def build(provider: str, base, x, master=None, *, max_autotune: bool = False):
    """(callable taking the input, the input it should get) for ``provider``; may compile lazily.
    fastres is converted and warmed up (``fastres.warmup``: its kernels compiled in threads on a GPU)."""
    import torch

    if provider == "eager":
        return base, x
    if provider == "eager_cl":
        return copy.deepcopy(base).to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last
        )
    if provider == "cudnn_folded":
        from benchmarks.peers import CudnnFoldedResNet

        return CudnnFoldedResNet(copy.deepcopy(master), x.dtype).to(x.device).to(x.dtype), x
    if provider in ("compile", "compile_ro"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        mode = "reduce-overhead" if provider == "compile_ro" else ("max-autotune" if max_autotune else None)
        torch._dynamo.reset()  # ResNet.forward is shared by every model: keep under the recompile limit
        return torch.compile(copy.deepcopy(base), mode=mode, dynamic=False), x
    if provider in ("fastres", "fastres_graphs"):
        import fastres

        fast = fastres.convert(base)
        fastres.warmup(fast, x, verbose=False)
        if provider == "fastres":
            return fast, x
        from benchmarks.peers import CudaGraphRunner

        return CudaGraphRunner(fast, x), x
    raise ValueError(provider)


def fused_launch_floor(model) -> int:
    """The fewest conv-kernel launches one forward of a converted model makes when every fused module
    took the fused path: one per fused conv, less the projection shortcuts that may ride in their
    block's tail kernel (the dual GEMM). A "fastres" figure counts only at or above this."""
    import fastres

    rep = fastres.report(model)
    shortcuts = sum(1 for name, _ in model.named_modules() if name.endswith("downsample.0"))
    return max(1, rep.convs_fused - shortcuts)


def make_model(arch: str, dtype_name: str, device: str, image: int, batch: int, seed: int = 0):
    import torch
    import torchvision

    from fastres.testing import randomize_bn

    torch.manual_seed(seed)
    if arch == "resnet_tiny":
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    else:
        net = getattr(torchvision.models, arch)()
    model = randomize_bn(net, seed).eval().to(device)
    dtype = torch_dtype(dtype_name)
    x = torch.randn(batch, 3, image, image, device=device).to(dtype)
    master = copy.deepcopy(model)  # fp32 copy: the cuDNN fold reads it, as fastres's fold reads fp32-or-wider
    return master, model.to(dtype), x


def _skip(arch, dtype_name, batch, provider, reason) -> dict:
    return {"model": arch, "dtype": dtype_name, "batch": batch, "provider": provider, "reason": reason}


def run(
    models,
    batches,
    dtypes,
    providers,
    *,
    device: str,
    image: int,
    budget: Budget,
    max_autotune: bool = False,
    rep_ms: int = 200,
    warmup_ms: int = 25,
    cpu_reps: int = 2,
    on_group=None,
) -> tuple[list, list]:
    """Measure every (model, dtype, batch) group in order while the budget lasts; (records, skipped).

    Every provider's output is checked against eager NCHW in the same dtype at its bound
    (``model_tol``) before it is timed; a wrong one is recorded with its error and not timed. A
    fastres provider must also have launched the fused conv kernel at least ``fused_launch_floor``
    times, counted in the same run (``fastres.testing.count_launches``), or it is recorded as not
    fused and not timed: an eager forward must never be stored as a fastres figure.
    ``on_group(records, skipped)`` is called after each group (the caller writes the JSON).
    """
    import torch

    from fastres.testing import count_launches, rel_err

    cuda = device == "cuda"
    records, skipped = [], []
    groups = [(a, d, b) for a in models for d in dtypes for b in batches]
    try:
        for i, (arch, dtype_name, batch) in enumerate(groups, 1):
            tag = f"[{i}/{len(groups)}] {arch} {dtype_name} b{batch}"
            if budget.spent():
                skipped.append(_skip(arch, dtype_name, batch, "*", "time budget spent"))
                log(f"{tag}: skipped (time budget spent)")
                continue
            dot = "tf32" if dtype_name == "fp32" else dtype_name
            tol = model_tol(dtype_name, device)
            with torch.no_grad(), tf32_mode(dot), peer_settings():
                try:
                    master, base, x = make_model(arch, dtype_name, device, image, batch)
                    ref = base(x).float()
                except Exception as e:
                    reason = f"eager reference failed: {type(e).__name__}: {str(e)[:200]}"
                    skipped.append(_skip(arch, dtype_name, batch, "*", reason))
                    log(f"{tag}: eager reference failed ({type(e).__name__})")
                    continue
                line = []
                for provider in providers:
                    why = skip_reason(provider, dtype_name, batch, device)
                    if why is None and budget.spent():
                        why = "time budget spent"
                    if why is None and provider.startswith("compile") and budget.spent(COMPILE_RESERVE_S):
                        why = f"less than {COMPILE_RESERVE_S} s left for an Inductor compile"
                    if why:
                        skipped.append(_skip(arch, dtype_name, batch, provider, why))
                        continue
                    rec = {
                        "model": arch,
                        "dtype": dtype_name,
                        "dot": dot,
                        "batch": batch,
                        "image": image,
                        "provider": provider,
                        "input_layout": "NHWC" if provider == "eager_cl" else "NCHW",
                    }
                    fn = inp = out = None
                    try:
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            rec["baseline_mem_mb"] = torch.cuda.memory_allocated() / 2**20
                        t0 = time.perf_counter()
                        with count_launches() as built:
                            fn, inp = build(provider, base, x, master, max_autotune=max_autotune)
                        with count_launches() as ran:
                            out = fn(inp)
                        if cuda:
                            torch.cuda.synchronize()
                        rec["cold_start_s"] = time.perf_counter() - t0
                        err = rel_err(out.float(), ref)
                        rec["rel_err_vs_eager"] = err
                        rec["tol"] = tol
                        rec["correct"] = bool(err <= tol)
                        if provider.startswith("fastres"):
                            # A graph replay launches nothing from Python: its launches are the capture's.
                            launches = built if provider == "fastres_graphs" else ran
                            conv = launches.count_of("_conv_bias_act_fwd_kernel")
                            floor = fused_launch_floor(fn.fn if provider == "fastres_graphs" else fn)
                            rec.update(conv_launches=conv, launches=len(launches), launch_floor=floor)
                            rec["fused"] = conv >= floor
                            if not rec["fused"]:
                                rec["correct"] = False
                                rec["error"] = (
                                    f"fused kernels did not run: {conv} conv launches < {floor} "
                                    "(an eager forward is not a fastres figure)"
                                )
                                records.append(rec)
                                line.append(f"{provider} NOT FUSED({conv}/{floor})")
                                continue
                        if not rec["correct"]:
                            rec["error"] = f"{provider} output off: rel err {err:.3e} > {tol:g}"
                            records.append(rec)
                            line.append(f"{provider} WRONG({err:.1e})")
                            continue
                        times = time_fn(
                            lambda fn=fn, inp=inp: fn(inp),
                            device=device,
                            warmup_ms=warmup_ms,
                            rep_ms=rep_ms,
                            cpu_reps=cpu_reps,
                        )
                        if cuda:
                            rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    except Exception as e:  # one provider failing must not end the run
                        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        records.append(rec)
                        line.append(f"{provider} ERROR({type(e).__name__})")
                        continue
                    finally:
                        fn = inp = out = None  # noqa: F841 - free the provider's model before the next one
                        if cuda:
                            torch.cuda.empty_cache()
                    rec.update(summarize(times))
                    rec["images_per_s"] = batch / (rec["median_ms"] * 1e-3)
                    records.append(rec)
                    line.append(f"{provider} {rec['images_per_s']:.0f} img/s")
                log(f"{tag}: " + ", ".join(line) + f"  [{budget.elapsed():.0f}s]")
                master = base = x = ref = None
                if cuda:
                    torch.cuda.empty_cache()
            if on_group is not None:
                on_group(records, skipped)
    except Stop as e:  # SIGTERM from gpu_check.sh's hard timeout: keep what was measured
        skipped.append({"provider": "*", "reason": str(e)})
        log(f"{e}: writing what was measured")
    return records, skipped


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {MODELS + TINY_ARCHS}")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds; groups not started are recorded as skipped"
    )
    ap.add_argument("--max-autotune", action="store_true", help="compile provider with mode='max-autotune'")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--cpu-reps", type=int, default=2, help="timed calls per case on the CPU")
    ap.add_argument("--out", default=None, help="folder or .json path (default benchmarks/results/)")
    args = ap.parse_args(argv)
    ensure_fastres()
    stop_on_sigterm()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 before starting to run fastres in the interpreter")
    budget = Budget(args.budget)
    env = env_info()
    log(
        f"bench_models on {env['gpu'] or 'CPU (interpreter)'}: models {args.models}, batches {args.batches}, "
        f"dtypes {args.dtypes}, providers {args.providers}, image {args.image}, budget {args.budget}s"
    )
    peaks = measure_peaks(device)
    doc = {"env": env, "args": vars(args), "peaks": peaks, "records": [], "skipped": []}

    def write(records, skipped) -> Path:  # after every group: a killed run still leaves its data
        doc.update(elapsed_s=round(budget.elapsed(), 1), records=records, skipped=skipped)
        doc["path"] = str(write_run({k: v for k, v in doc.items() if k != "path"}, out, "models"))
        return Path(doc["path"])

    out = args.out
    if out is not None and not str(out).endswith(".json"):  # one file for the whole run, rewritten
        out = str(Path(out) / f"models-{time.strftime('%Y%m%d-%H%M%S')}.json")
    records, skipped = run(
        parse_list(args.models, MODELS + TINY_ARCHS),
        parse_list(args.batches, conv=int),
        parse_list(args.dtypes, tuple(MODEL_TOL)),
        parse_list(args.providers, PROVIDERS),
        device=device,
        image=args.image,
        budget=budget,
        max_autotune=args.max_autotune,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
        on_group=write,
    )
    path = write(records, skipped)
    log(f"wrote {path} ({len(records)} records, {len(skipped)} skipped, {budget.elapsed():.0f}s)")
    return doc


if __name__ == "__main__":
    main()
