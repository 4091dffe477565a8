"""Tuning on a GPU and what the tables say per layer.

- ``tune_layers``: the one-shot tuner behind ``python -m benchmarks.tune``: every layer × batch × dtype
  over every applicable tactic of ``kernels/tactics.py`` × its configs, checked against fp64, timed
  with ``do_bench_cudagraph``, within a budget; writes the format-2 table (``fastres.kernels.tuning``)
  after every (layer, dtype, batch).
- ``tune_model``: autotune the gather kernel's config for every conv a model launches (``tune_session``).
- ``conv_launches`` / ``layer_tactics``: the launches fastres makes for a model and input, and the tactic
  the lookup picks for each (``fastres.report(model, example_input)`` names them).

``tune_model`` for example for fp16 and fp32 at batch 1 and 32 (entries are keyed by M bucket, so each
batch size and resolution adds its own)::

    import torch, torchvision, fastres
    from fastres.tuning import tune_model

    for dtype in (torch.float16, torch.float32):
        for batch in (1, 32):
            model = torchvision.models.resnet50().eval().cuda().to(dtype)
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
            tune_model(model, x, "fastres/configs")          # merges into fastres/configs/sm_90.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastres import activations
from fastres.kernels import tactics as _tactics
from fastres.kernels import tuning as _ktuning
from fastres.kernels._common import INTERPRET


def tune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    out_path: str | os.PathLike,
    *,
    merge: bool = True,
    verbose: bool = True,
) -> Path:
    """Time the candidate configs of every conv the converted ``model`` launches on ``example_input``
    (tables and the autotune cache are ignored), keep the fastest per shape, and write the table.

    ``out_path``: a ``.json`` file named after the GPU arch (``sm_90.json``), or a folder to write
    ``<arch>.json`` into. With ``merge`` (default) entries already in the file stay unless retuned.
    ``model`` is converted first (a copy; converting a converted model changes nothing) and run in
    eval mode under ``torch.inference_mode``; it and ``example_input`` must be on the same CUDA device
    with the same dtype. Returns the path written.

    >>> tune_model(resnet50().eval().cuda().half(), x_fp16, "fastres/configs")   # doctest: +SKIP
    """
    if not isinstance(example_input, torch.Tensor) or example_input.device.type != "cuda" or INTERPRET:
        raise RuntimeError(
            "tune_model times kernels on a GPU: example_input must be a CUDA tensor, "
            "with TRITON_INTERPRET unset"
        )
    from fastres.converter import convert

    fast = convert(model).eval()
    arch = _ktuning.device_arch(example_input.device)
    path = Path(out_path)
    if path.suffix != ".json":
        path = path / f"{arch}.json"
    with torch.inference_mode(), _ktuning.tune_session() as session:
        fast(example_input)
        torch.cuda.synchronize(example_input.device)
    if not session:
        raise RuntimeError(
            "tune_model: no fused conv kernel ran; is the model a ResNet that fastres.convert fuses "
            "(fastres.report(model) says), with weights on the input's device and dtype?"
        )
    _ktuning.write_table(path, arch, session, tuned_on=_ktuning.environment(), merge=merge)
    _ktuning.clear_cache()  # this process now reads the new table too
    if verbose:
        print(f"tune_model: {len(session)} conv shapes tuned on {arch}, written to {path}")
        for key, (cfg, ms) in sorted(session.items()):
            print(f"  {key:<56} {ms * 1e3:9.1f} us  {cfg}")
    return path


# --------------------------------------------------------------------------------------------
# The one-shot tuner: every tactic × its configs, per layer, checked, timed, written as it goes


@dataclass(frozen=True)
class Layer:
    """One conv launch of a model, batch-free: the conv, its epilogue (a residual, a projection shortcut
    accumulated as a second K range, the activation) and how many times the model launches it."""

    name: str
    c_in: int
    h: int
    w: int
    c_out: int
    r: int
    s: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    residual: bool = False
    act: str = "relu"
    shortcut_c_in: int | None = None  # the dual GEMM: 1×1 conv of the block input (sc_h × sc_w)
    shortcut_stride: int = 1
    sc_h: int = 0
    sc_w: int = 0
    count: int = 1

    @property
    def p(self) -> int:
        return (self.h + 2 * self.padding - self.dilation * (self.r - 1) - 1) // self.stride + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.padding - self.dilation * (self.s - 1) - 1) // self.stride + 1

    def flops(self, batch: int = 1) -> int:
        """2 × multiply-adds of one launch (the shortcut's K range included)."""
        k = (self.c_in // self.groups) * self.r * self.s + (self.shortcut_c_in or 0)
        return 2 * batch * self.p * self.q * self.c_out * k

    def key(self, batch: int, dtype: torch.dtype) -> str:
        pair = lambda v: (v, v)  # noqa: E731
        return _ktuning.shape_key(
            self.c_in, self.c_out, self.r, self.s, pair(self.stride), pair(self.padding), pair(self.dilation),
            self.groups, batch * self.p * self.q, dtype, self.shortcut_c_in,
        )  # fmt: skip


@dataclass
class Candidate:
    tactic: str
    config: object | None
    fn: Callable[[], torch.Tensor] | None = None
    out: torch.Tensor | None = None  # the buffer fn writes
    ms: float | None = None
    dropped: str | None = None  # why it was not kept (failed to compile or launch, wrong, not timed)


@dataclass
class TuneResult:
    """What ``tune_layers`` did: the entries it wrote, what it dropped and skipped, and the time."""

    path: Path
    entries: dict = field(default_factory=dict)  # key -> kernels.tuning.Entry
    dropped: list = field(default_factory=list)  # (key, tactic, config, reason)
    not_started: list = field(default_factory=list)  # layer names the budget left out
    seconds: float = 0.0


# Per-layer bounds (DESIGN.md, Numerics): ‖out − ref‖ / ‖ref‖ against the fp64 reference. fp32 is tf32 on
# a GPU and exact in the interpreter.
LAYER_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
FP32_TOL = {"cuda": 2e-3, "interpreter": 1e-5}
# Per element: |out − ref| <= ELEMENT_FACTOR · tol · (|ref| + rms(ref)), so that one wrong tile (a masking
# bug) cannot hide in the norm; fp16 rounding alone is ~0.1 of it.
ELEMENT_FACTOR = 8
# do_bench_cudagraph's repetition window per candidate: 10 graph replays of ~REP_MS each (triton 3.6-3.8),
# so ~60-100 ms per candidate with the estimate and the capture: ResNet-50 at 3 batches and 2 dtypes offers
# ~1700 (candidate, batch, dtype) timings (benchmarks/tune.py --dry-run), more than a 240 s budget holds.
REP_MS = 4
# A layer is started only if the budget left covers this many times the longest of the last RECENT layers
# (the first layer: FIRST_LAYER_S), so a run ends inside its budget with every started layer written. The
# recent ones, not all: the first layers pay most of the compiles, which later layers of a class reuse.
LAYER_MARGIN = 1.25
RECENT = 3
FIRST_LAYER_S = 8.0


def layer_tol(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32:
        return FP32_TOL["interpreter" if INTERPRET else "cuda"]
    return LAYER_TOL[dtype]


def _pair(v: int) -> tuple[int, int]:
    return (v, v)


def _problem(layer: Layer, batch: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Inputs, the packed weights and bias of one layer at one batch and dtype, and the fp64 reference of
    the launch (the folded conv computed in float64 from the same rounded tensors, + shortcut, + residual,
    activation), all on ``device``."""
    from fastres.fold import pack_weight

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    fan_in = (layer.c_in // layer.groups) * layer.r * layer.s
    x = randn(batch, layer.c_in, layer.h, layer.w).contiguous(memory_format=torch.channels_last)
    w = pack_weight(randn(layer.c_out, layer.c_in // layer.groups, layer.r, layer.s, scale=fan_in**-0.5))
    b = torch.randn(layer.c_out, generator=g, device=device) * 0.1
    res = sx = sw = None
    if layer.residual:
        res = randn(batch, layer.c_out, layer.p, layer.q).contiguous(memory_format=torch.channels_last)
    if layer.shortcut_c_in is not None:
        sx = randn(batch, layer.shortcut_c_in, layer.sc_h, layer.sc_w).contiguous(
            memory_format=torch.channels_last
        )
        sw = pack_weight(randn(layer.c_out, layer.shortcut_c_in, 1, 1, scale=layer.shortcut_c_in**-0.5))
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    ref = F.conv2d(x.double(), w.double(), b.double(), **conv)
    if sx is not None:
        ref = ref + F.conv2d(sx.double(), sw.double(), stride=layer.shortcut_stride)
    if res is not None:
        ref = ref + res.double()
    ref = activations.apply(ref, layer.act)
    return dict(x=x, w=w, b=b, res=res, sx=sx, sw=sw, ref=ref)


def _launcher(layer: Layer, prob: dict, tactic: str, config, precision: str):
    """(a no-argument callable that runs ``tactic`` with ``config`` on the problem, its output buffer).
    The check poisons the buffer with NaN first, so that an element never written shows. Each tactic gets
    its weights in its own layout (``tactics.WEIGHTS``), derived once here, not per call."""
    layout = _tactics.WEIGHTS.get(tactic, lambda t: t)
    w = layout(prob["w"])
    sw = None if prob["sw"] is None else layout(prob["sw"])
    x = prob["x"]
    out = torch.full(prob["ref"].shape, float("nan"), dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=torch.channels_last)
    kwargs = dict(
        residual=prob["res"], stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
        groups=layer.groups, act=layer.act, shortcut_x=prob["sx"], shortcut_weight=sw,
        shortcut_stride=layer.shortcut_stride, precision=precision, out=out, config=config, tactic=tactic,
    )  # fmt: skip
    return (lambda: _tactics.conv_bias_act(x, w, prob["b"], **kwargs)), out


def _check(out: torch.Tensor, ref: torch.Tensor, tol: float) -> str | None:
    """None if ``out`` is within the layer bound of the fp64 reference (norm and per element), else why."""
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = out.double() - ref
    if not bool(torch.isfinite(diff).all()):
        return "non-finite output (NaN: an element never written, or Inf)"
    ref_norm = float(ref.norm().clamp_min(1e-300))
    err = float(diff.norm()) / ref_norm
    if err > tol:
        return f"wrong: rel err {err:.3e} > {tol:g}"
    rms = ref_norm / max(1, ref.numel()) ** 0.5
    worst = float((diff.abs() / (ref.abs() + rms)).max())
    if worst > ELEMENT_FACTOR * tol:
        return f"wrong: an element off by {worst:.3e} of (|ref| + rms) > {ELEMENT_FACTOR * tol:g}"
    return None


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """cuDNN picks its algorithms by measuring (shapes are fixed), as the benchmarks' peers do, on CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _check_and_time(c: Candidate, ref: torch.Tensor, tol: float, timer, device: torch.device) -> None:
    """Launch ``c`` once into its NaN-poisoned buffer, check it against ``ref``, and time it if it passed;
    sets ``c.dropped`` to the reason when it fails to compile or launch, is wrong, or cannot be timed."""
    try:
        c.out.fill_(float("nan"))  # the compile phase may have run part of it (cuDNN's conv)
        out = c.fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - triton's OutOfResources, CompilationError, ...
        c.dropped = f"failed to compile or launch: {_first_line(e)}"
        return
    c.dropped = _check(out, ref, tol)
    if c.dropped is None:
        try:
            c.ms = float(timer(c.fn, _ktuning.Choice(c.tactic, c.config)))
        except Exception as e:  # noqa: BLE001
            c.dropped = f"not timed: {_first_line(e)}"


def _cuda_graph_timer(fn: Callable[[], object], choice: _ktuning.Choice) -> float:
    """Median ms of ``fn`` without host time: ``do_bench_cudagraph`` (triton 3.6 and 3.8 alike)."""
    from triton.testing import do_bench_cudagraph

    with torch.cuda.stream(torch.cuda.Stream()):
        ms = do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")
    torch.cuda.synchronize()
    return float(ms)


def _compile_in_parallel(fns: list[Callable[[], object]], threads: int, log) -> float | None:
    """Compile what ``fns`` launch, in ``threads`` threads (Triton's AsyncCompileMode, as fastres.warmup
    does), running no kernel. A launch that raises here is left for the check, which drops it with its
    reason. Returns the seconds taken, or None where there is nothing to compile in parallel."""
    if INTERPRET or not torch.cuda.is_available() or threads < 2:
        return None
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # Triton 3.4+
    except ImportError:
        return None
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from fastres.kernels._common import compile_only

    def run():
        with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool), compile_only():
            for fn in fns:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - the check launches it again and records why
                    pass

    t0 = time.perf_counter()
    try:
        # A copy of the context: Triton's active mode never stays set for what follows (fastres.warm).
        contextvars.copy_context().run(run)
    except Exception as e:  # noqa: BLE001 - then the check compiles them one by one
        log(f"  parallel compile failed ({type(e).__name__}: {e}); compiling one by one")
        return None
    finally:
        _drop_unfinished_compiles()
    return time.perf_counter() - t0


def _drop_unfinished_compiles() -> None:
    """Remove from every fastres kernel's cache the async compiles with no finished kernel (one whose
    compile raised, or that ``AsyncCompileMode.__exit__`` never finalised because another raised first):
    they would raise at each later launch, so a good candidate would be dropped for another's error.
    The check then compiles them one by one. (``fastres.warm`` does this for the conv and pool kernels.)"""
    import sys

    for name, mod in list(sys.modules.items()):
        if not name.startswith("fastres.kernels.") or mod is None:
            continue
        for value in list(vars(mod).values()):
            caches = getattr(value, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in list(caches.values()):
                kernels = entry[0] if isinstance(entry, tuple) and entry else None
                if not isinstance(kernels, dict):
                    continue
                for key, kernel in list(kernels.items()):
                    # vars(): FutureKernel.__getattr__ would wait for (and re-raise) the compile.
                    if type(kernel).__name__ == "FutureKernel" and vars(kernel).get("kernel") is None:
                        kernels.pop(key, None)


def _summary(c: Candidate) -> str:
    cfg = c.config
    if cfg is None:
        text = "own choice"
    else:
        d = dataclasses.asdict(cfg)
        blocks = "x".join(str(v) for k, v in d.items() if k.startswith("block_"))
        rest = " ".join(f"{k}={v}" for k, v in d.items() if not k.startswith("block_") and v not in (None, 1))
        text = f"{blocks} {rest}".strip()
    return f"{c.tactic} [{text}]"


def _entry(cands: list[Candidate], device: torch.device) -> _ktuning.Entry | None:
    """The table entry from the timed candidates: the fastest (by ``kernels.tuning.launch_score``: a split
    must beat the host's floor for its second launch), the runner-up (the fastest of another tactic, else
    the second-fastest config), each tactic's best, and cuDNN's time (measured on CUDA only)."""
    score = _ktuning.launch_score
    timed = sorted((c for c in cands if c.ms is not None), key=lambda c: score(c.config, c.ms))
    if not timed:
        return None
    best = timed[0]
    others = [c for c in timed[1:] if c.tactic != best.tactic] or timed[1:]
    by_tactic: dict[str, _ktuning.Choice] = {}
    for c in timed:
        by_tactic.setdefault(c.tactic, _ktuning.Choice(c.tactic, c.config, c.ms))
    cudnn = getattr(_tactics, "CUDNN", None)
    cudnn_ms = by_tactic[cudnn].ms if device.type == "cuda" and cudnn in by_tactic else None
    runner = others[0] if others else None
    return _ktuning.Entry(
        tactic=best.tactic,
        config=best.config,
        ms=best.ms,
        runner_up=None if runner is None else _ktuning.Choice(runner.tactic, runner.config, runner.ms),
        cudnn_ms=cudnn_ms,
        by_tactic=by_tactic,
    )


def tune_layers(
    layers: list[Layer],
    out_path: str | os.PathLike,
    *,
    batches: tuple[int, ...] = (1, 32, 256),
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16),
    budget_s: float | None = None,
    device: str | torch.device = "cuda",
    arch: str | None = None,
    tactics: tuple[str, ...] | None = None,
    candidates: Callable[..., list] | None = None,
    timer: Callable[[Callable[[], object], _ktuning.Choice], float] | None = None,
    threads: int | None = None,
    precision: str = "tf32",
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> TuneResult:
    """Tune every layer at every batch and dtype: each applicable tactic of the registry
    (``kernels.tactics.TACTICS``, or ``tactics``) × its configs (``kernels.tuning.tactic_candidates``, or
    ``candidates(tactic, layer, batch, dtype)``) is compiled (in ``threads`` threads first, on a GPU),
    checked against the fp64 reference (a candidate that fails to compile or launch, or computes a wrong
    result, is dropped with the reason logged), then timed without host time (``timer(fn, choice)`` -> ms;
    default ``do_bench_cudagraph``; ``clock``, the budget's clock, is injectable too). The table
    (``out_path``: a folder or ``<arch>.json``) is written after every (layer, dtype, batch), atomically,
    so a killed run keeps what it measured.

    Layers run in order of FLOP share (FLOPs × launches per forward), the largest first. A layer starts only
    if the budget left covers ``LAYER_MARGIN`` × the longest of the last ``RECENT`` layers; those left out
    are reported.
    Two layers with one table key are tuned once (the larger share's epilogue).

    >>> tune_layers(resnet_layers("resnet50"), "out/", budget_s=240)        # doctest: +SKIP
    """
    t_start = clock()
    device = torch.device(device)
    if timer is None:
        if device.type != "cuda" or INTERPRET:
            raise RuntimeError("tune_layers times kernels on a CUDA GPU; pass timer= to run it elsewhere")
        timer = _cuda_graph_timer
    arch = arch or _ktuning.device_arch(device)
    path = Path(out_path)
    if path.suffix != ".json":
        path = path / f"{arch}.json"
    names = tuple(tactics) if tactics is not None else tuple(_tactics.TACTICS)
    threads = threads if threads is not None else min(16, os.cpu_count() or 1)
    result = TuneResult(path)
    tuned_on = {**_ktuning.environment(), "tuner": "fastres.tuning.tune_layers", "budget_s": budget_s}
    if device.type != "cuda":
        tuned_on["gpu"] = None
        tuned_on["note"] = f"{device.type}: times from an injected timer, not a GPU measurement"
    total = sum(layer.flops() * layer.count for layer in layers) or 1
    order = sorted(layers, key=lambda layer: -layer.flops() * layer.count)
    seen_keys: dict[str, str] = {}
    durations: list[float] = []
    for i, layer in enumerate(order):
        left = None if budget_s is None else budget_s - (clock() - t_start)
        need = LAYER_MARGIN * max(durations[-RECENT:]) if durations else FIRST_LAYER_S
        if left is not None and left < need:
            result.not_started = [layer.name for layer in order[i:]]
            log(
                f"budget: {left:.0f} s left < {need:.0f} s for the next layer; "
                f"{len(result.not_started)} layers not started: {', '.join(result.not_started)}"
            )
            break
        t_layer = clock()
        share = 100 * layer.flops() * layer.count / total
        log(f"[{i + 1}/{len(order)}] {layer.name} ({share:.1f} % of the FLOPs, {layer.count} launches)")
        units = []
        for dtype in dtypes:
            for batch in batches:
                key = layer.key(batch, dtype)
                if key in seen_keys:
                    log(f"  {key}: tuned with {seen_keys[key]}")
                    continue
                seen_keys[key] = layer.name
                units.append((dtype, batch, key))
        # Every unit's candidates, built first, so that they compile together.
        work = []
        for dtype, batch, key in units:
            prob = _problem(layer, batch, dtype, device, seed=i)
            cands = []
            for name in names:
                sw = prob["sw"]
                w = _tactics.WEIGHTS.get(name, lambda t: t)(prob["w"])
                why = _tactics.applicable(
                    name, prob["x"], w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    groups=layer.groups, shortcut=sw is not None,
                )  # fmt: skip
                if why is not None:
                    continue
                if candidates is not None:
                    configs = candidates(name, layer, batch, dtype)
                else:
                    configs = _ktuning.tactic_candidates(
                        name, m=batch * layer.p * layer.q, c_in=layer.c_in, c_out=layer.c_out, r=layer.r,
                        s=layer.s, groups=layer.groups, dtype=dtype,
                    )  # fmt: skip
                for cfg in configs:
                    cands.append(Candidate(name, cfg, *_launcher(layer, prob, name, cfg, precision)))
            work.append((dtype, batch, key, prob, cands))
        compile_s = _compile_in_parallel([c.fn for *_, cands in work for c in cands], threads, log)
        if compile_s is not None:
            n = sum(len(w[-1]) for w in work)
            log(f"  compiled {n} candidates in {threads} threads: {compile_s:.1f} s")
        for dtype, batch, key, prob, cands in work:
            tol = layer_tol(dtype, device)
            for c in cands:
                with _cudnn_benchmark(device):
                    _check_and_time(c, prob["ref"], tol, timer, device)
                if c.dropped is not None:
                    result.dropped.append((key, c.tactic, c.config, c.dropped))
                    log(f"  dropped {_summary(c)}: {c.dropped}")
            entry = _entry(cands, device)
            dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
            if entry is None:
                log(f"  {dt} b{batch}: no candidate passed; nothing written for {key}")
                continue
            _ktuning.write_table(path, arch, {key: entry}, tuned_on=tuned_on)
            result.entries[key] = entry
            best = next(c for c in cands if c.ms == entry.ms and c.tactic == entry.tactic)
            runner = entry.runner_up
            cudnn = "null (not measured)" if entry.cudnn_ms is None else f"{entry.cudnn_ms * 1e3:.1f} us"
            log(
                f"  {dt} b{batch}: {_summary(best)} {entry.ms * 1e3:.1f} us; runner-up "
                + ("none" if runner is None else f"{runner.tactic} {runner.ms * 1e3:.1f} us")
                + f"; cuDNN {cudnn}; {sum(c.ms is not None for c in cands)}/{len(cands)} timed"
            )
            del prob
        del work
        durations.append(clock() - t_layer)
        elapsed = clock() - t_start
        left_text = "" if budget_s is None else f", {budget_s - elapsed:.0f} s left"
        took = clock() - t_layer
        log(f"  layer done in {took:.1f} s ({elapsed:.0f} s total{left_text}) -> {path}")
    _ktuning.clear_cache()  # this process reads the new table from now on
    result.seconds = clock() - t_start
    return result


# --------------------------------------------------------------------------------------------
# Which tactic each layer of a model would run (fastres.report, benchmarks)


def dual_shortcut(block: nn.Module) -> bool:
    """Whether a residual block's projection shortcut rides in its last conv's launch (the dual GEMM):
    a ``downsample`` of a 1×1 conv (padding 0, dilation 1, groups 1) and a norm, and a last conv with
    groups 1. A fused block answers for itself (``fastres.modules._FusedBlock._dual_shortcut``)."""
    own = getattr(block, "_dual_shortcut", None)
    if callable(own):
        return bool(own())
    ds = getattr(block, "downsample", None)
    convs = block_convs(block)
    if not convs or not isinstance(ds, nn.Sequential) or len(ds) != 2 or not isinstance(ds[0], nn.Conv2d):
        return False
    c = ds[0]
    last = getattr(block, convs[-1])
    return (
        tuple(c.kernel_size) == (1, 1)
        and tuple(c.padding) == (0, 0)
        and tuple(c.dilation) == (1, 1)
        and c.groups == 1
        and last.groups == 1
    )


def block_convs(module: nn.Module) -> list[str]:
    """The conv attribute names of a residual block in order (torchvision's or fastres's), else []."""
    names = getattr(module, "_convs", None)
    if names:
        return [c for c, _ in names]
    cls = type(module).__name__
    if cls in ("BasicBlock", "Bottleneck") and isinstance(getattr(module, "conv1", None), nn.Conv2d):
        return [n for n in ("conv1", "conv2", "conv3") if isinstance(getattr(module, n, None), nn.Conv2d)]
    return []


def _layer_of(name: str, conv: nn.Conv2d, shape, **epilogue) -> Layer:
    _, c, h, w = shape
    return Layer(
        name=name, c_in=c, h=h, w=w, c_out=conv.out_channels, r=conv.kernel_size[0], s=conv.kernel_size[1],
        stride=conv.stride[0], padding=conv.padding[0], dilation=conv.dilation[0], groups=conv.groups,
        **epilogue,
    )  # fmt: skip


def conv_launches(model: nn.Module, example_input: torch.Tensor) -> dict[str, Layer]:
    """conv path -> the launch (``Layer``) fastres makes for it on ``example_input``: each conv with its
    input shape, a block's last conv with the residual or its projection shortcut (dual GEMM, and then
    the shortcut conv has no launch of its own). Runs ``model`` once under ``torch.no_grad`` with forward
    pre-hooks (a fused block does not call its children, so their shapes are chained from the block's
    input)."""
    seen: dict[str, tuple] = {}
    mods = dict(model.named_modules())
    blocks = {p for p, m in mods.items() if block_convs(m)}
    # A block's convs (its projection shortcut's included) are the block's to describe, from its input.
    inside = {f"{b}.{n}" for b in blocks for n in [*block_convs(mods[b]), "downsample.0"]}

    def record(path):
        def hook(mod, args):  # returns None: the arguments go on unchanged
            seen.setdefault(path, tuple(args[0].shape))

        return hook

    handles = [
        m.register_forward_pre_hook(record(p))
        for p, m in mods.items()
        if p in blocks or (isinstance(m, nn.Conv2d) and p not in inside)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Layer] = {}
    for path in blocks:
        if path not in seen:
            continue
        block, shape = mods[path], seen[path]
        names = block_convs(block)
        dual = dual_shortcut(block)
        for i, name in enumerate(names):
            conv = getattr(block, name)
            full = f"{path}.{name}"
            if i < len(names) - 1:
                out[full] = _layer_of(full, conv, shape)
            elif dual:
                sc = block.downsample[0]
                out[full] = _layer_of(
                    full, conv, shape, shortcut_c_in=sc.in_channels, shortcut_stride=sc.stride[0],
                    sc_h=seen[path][2], sc_w=seen[path][3],
                )  # fmt: skip
            else:
                out[full] = _layer_of(full, conv, shape, residual=True)
            layer = out[full]
            shape = (shape[0], conv.out_channels, layer.p, layer.q)
        ds = getattr(block, "downsample", None)
        if not dual and isinstance(ds, nn.Sequential) and len(ds) and isinstance(ds[0], nn.Conv2d):
            out[f"{path}.downsample.0"] = _layer_of(f"{path}.downsample.0", ds[0], seen[path], act="identity")
    for path, shape in seen.items():
        if path not in blocks and path not in out and isinstance(mods[path], nn.Conv2d):
            out[path] = _layer_of(path, mods[path], shape)
    return dict(sorted(out.items()))


def layer_tactics(
    model: nn.Module, example_input: torch.Tensor, *, arch: str | None = None, env: str | None = None
) -> dict[str, tuple[str, str, str]]:
    """conv path -> (tactic, reason, table key) that the lookup picks for each launch of ``model`` on
    ``example_input`` (its batch, dtype and device; ``arch`` overrides the device's): ``tactics.choose``
    with the tuned table entry (``kernels.tuning.tuned_tactic``). What ``fastres.report(model,
    example_input)`` names per layer.

    >>> layer_tactics(model, torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.half))  # doctest: +SKIP
    {'conv1': ('gather', 'gather: default (...)', 'cin3-cout64-k7x7-...'), ...}
    """
    from fastres.fold import pack_weight

    dtype, device = example_input.dtype, example_input.device
    arch = arch or _ktuning.device_arch(device)
    n = example_input.shape[0]
    out = {}
    for path, layer in conv_launches(model, example_input).items():
        # Prototypes with the launch's shapes and layouts (the rules read shapes, strides and alignment).
        x = torch.empty(n, layer.c_in, layer.h, layer.w, dtype=dtype, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        w = pack_weight(
            torch.empty(layer.c_out, layer.c_in // layer.groups, layer.r, layer.s, dtype=dtype, device=device)
        )
        name, why, _ = _ktuning.tuned_tactic(
            x, w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            shortcut_c_in=layer.shortcut_c_in, arch=arch, env=env,
        )  # fmt: skip
        out[path] = (
            name,
            why,
            layer.key(n, dtype) if dtype in (torch.float16, torch.bfloat16, torch.float32) else "",
        )
    return out
