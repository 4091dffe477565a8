"""Block configs for the conv kernel: shipped tables, the FASTRES_AUTOTUNE cache, then a heuristic.

Order of lookup for one conv launch on CUDA (``select_config``):
1. the tables: ``$FASTRES_CONFIG_DIR/<arch>.json`` first, then the shipped ``fastres/configs/<arch>.json``;
2. the autotune cache ``$FASTRES_CACHE_DIR/<arch>.json`` (default ``~/.cache/fastres``);
3. with ``FASTRES_AUTOTUNE=1``: time ``candidates(...)`` once with ``triton.testing.do_bench``, keep the
   fastest, write it to the cache (later processes read it there);
4. ``pick_config``, the heuristic.
Under Triton's interpreter it is always the one fixed large-block config (DESIGN.md, Tuning).

Tables and the cache share one JSON format, so a cache file can be shipped as a table::

    {"format": 1, "arch": "sm_90", "tuned_on": {"gpu": ..., "torch": ..., "triton": ..., "date": ...},
     "configs": {"<shape key>": {"block_m": 128, "block_n": 128, "block_k": 64,
                                 "num_warps": 8, "num_stages": 3, "ms": 0.021}}}

``tuned_on`` is null in a table that no GPU run has filled. Keys (``shape_key``) hold what the best
config depends on and not the batch alone: C_in, C_out, R×S, stride, padding, dilation, groups, dtype
and M = N·P·Q rounded up to a power of two (the "M bucket"), so batch 32 at 224² and batch 8 at 448²
share an entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.resources
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from . import conv as _conv
from ._common import INTERPRET, compiling_only, next_pow2

TABLE_FORMAT = 1
# Autotune timing: short warm-up and repetition windows, so one shape (8 candidates, each compiled
# once, ~0.5 s) tunes in seconds; do_bench's defaults (25 / 100 ms) would add ~1 s per candidate.
BENCH_WARMUP_MS = 5
BENCH_REP_MS = 25
# Candidate tiles (block_m, block_n, block_k for 16-bit dtypes, num_warps, num_stages): the shapes
# Triton's matmul tutorial autotunes over on Ampere/Hopper, trimmed to 8. fp32 halves block_k (same
# bytes per stage). The largest, 128×256×64 with 3 stages, needs 144 KiB of shared memory: fits sm_80
# (164 KiB) and sm_90 (227 KiB). Not yet measured on this kernel; the autotuner measures them.
CANDIDATE_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 64, 32, 4, 5),
    (32, 64, 64, 4, 4),
)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(_conv.ConvConfig))

# Per-process memory: (arch, key) -> ConvConfig for shapes already resolved, tables by path.
_resolved: dict[tuple, _conv.ConvConfig] = {}
_tables: dict[str, dict[str, _conv.ConvConfig]] = {}
_archs: dict[int, str] = {}
# While ``tune_session`` is active: key -> (config, ms) of every shape tuned in it.
_session: dict[str, tuple[_conv.ConvConfig, float]] | None = None


# --------------------------------------------------------------------------------------------
# Keys and candidates (pure functions: tested on the CPU)


def m_bucket(m: int) -> int:
    """M = N·P·Q rounded up to a power of two (at least 16): the table's batch-independent size class."""
    return max(_conv.MIN_BLOCK, next_pow2(m))


def shape_key(
    c_in: int,
    c_out: int,
    r: int,
    s: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    m: int,
    dtype: torch.dtype,
    shortcut_c_in: int | None = None,
) -> str:
    """The table key of one conv launch, e.g. ``"cin64-cout64-k3x3-s1x1-p1x1-d1x1-g1-m131072-fp16"``;
    a launch that also accumulates a projection shortcut over ``shortcut_c_in`` channels (the dual
    GEMM: a second K range) ends in ``-sc<shortcut_c_in>``."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"shape_key: dtype {dtype} has no table entries")
    sc = "" if shortcut_c_in is None else f"-sc{shortcut_c_in}"
    return (
        f"cin{c_in}-cout{c_out}-k{r}x{s}-s{stride[0]}x{stride[1]}-p{padding[0]}x{padding[1]}"
        f"-d{dilation[0]}x{dilation[1]}-g{groups}-m{m_bucket(m)}-{_DTYPE_NAMES[dtype]}{sc}"
    )


def candidates(
    m: int, c_out_g: int, c_in_g: int, r: int, s: int, dtype: torch.dtype
) -> list[_conv.ConvConfig]:
    """The configs FASTRES_AUTOTUNE times for one shape: the heuristic first, then ``CANDIDATE_TILES``
    clamped to the problem (no block larger than the padded M, C_out or K extent), without repeats."""
    flat = c_in_g < _conv.FLAT_K_MAX_CIN
    k_extent = r * s * c_in_g if flat else c_in_g
    caps = (m_bucket(m), max(_conv.MIN_BLOCK, next_pow2(c_out_g)), max(_conv.MIN_BLOCK, next_pow2(k_extent)))
    out = [_conv.pick_config(m, c_out_g, c_in_g, r, s, dtype, interpret=False)]
    for bm, bn, bk, warps, stages in CANDIDATE_TILES:
        if dtype == torch.float32:
            bk //= 2
        cfg = _conv.ConvConfig(
            block_m=min(bm, caps[0]),
            block_n=min(bn, caps[1]),
            block_k=max(_conv.MIN_BLOCK, min(bk, caps[2])),
            num_warps=warps,
            num_stages=stages,
        )
        if cfg not in out:
            out.append(cfg)
    return out


# --------------------------------------------------------------------------------------------
# Table files: read, write


def shipped_config_dir() -> Path:
    """``fastres/configs``: inside the installed package (wheel) or the source tree (``pip install -e``)."""
    return Path(str(importlib.resources.files("fastres") / "configs"))


def config_dirs() -> list[Path]:
    """Table folders in lookup order: ``$FASTRES_CONFIG_DIR`` (if set), then the shipped one."""
    dirs = [Path(os.environ["FASTRES_CONFIG_DIR"])] if os.environ.get("FASTRES_CONFIG_DIR") else []
    return dirs + [shipped_config_dir()]


def cache_dir() -> Path:
    return Path(os.environ.get("FASTRES_CACHE_DIR") or "~/.cache/fastres").expanduser()


def _config_from_json(entry: dict) -> _conv.ConvConfig:
    values = {name: entry[name] for name in _CONFIG_FIELDS}
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is not a positive int")
    for name in ("block_m", "block_n", "block_k"):
        if values[name] < _conv.MIN_BLOCK or values[name] & (values[name] - 1):
            raise ValueError(f"{name}={values[name]} is not a power of two >= {_conv.MIN_BLOCK}")
    return _conv.ConvConfig(**values)


def read_table(path: str | os.PathLike, *, strict: bool = False) -> dict[str, _conv.ConvConfig]:
    """The configs in one table or cache file ({} if it does not exist).

    A malformed file or entry raises ValueError when ``strict`` (the shipped-table test), and is
    otherwise skipped with a warning: a broken cache must not stop inference.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a format-{TABLE_FORMAT} fastres config table")
        if path.stem != data.get("arch"):
            raise ValueError(f"file name says {path.stem!r} but the table is for {data.get('arch')!r}")
        raw = data.get("configs")
        if not isinstance(raw, dict):
            raise ValueError("'configs' must be an object")
    except (OSError, ValueError) as e:
        if strict:
            raise ValueError(f"fastres config table {path}: {e}") from e
        warnings.warn(f"fastres: ignoring config table {path}: {e}", stacklevel=2)
        return {}
    table = {}
    for key, entry in raw.items():
        try:
            table[key] = _config_from_json(entry)
        except (KeyError, TypeError, ValueError) as e:
            if strict:
                raise ValueError(f"fastres config table {path}, entry {key!r}: {e!r}") from e
            warnings.warn(f"fastres: ignoring entry {key!r} of {path}: {e!r}", stacklevel=2)
    return table


def write_table(
    path: str | os.PathLike,
    arch: str,
    entries: dict[str, tuple[_conv.ConvConfig, float | None]],
    *,
    tuned_on: dict | None = None,
    merge: bool = True,
) -> Path:
    """Write ``entries`` (key -> (config, ms)) as a table; with ``merge``, entries already in the file
    stay unless replaced. Atomic (temp file + rename), so a concurrent reader sees old or new."""
    path = Path(path)
    if path.stem != arch:
        raise ValueError(f"write_table: a table for {arch!r} must be named {arch}.json, got {path.name}")
    configs: dict = {}
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
            configs = dict(old.get("configs") or {})
            tuned_on = tuned_on if tuned_on is not None else old.get("tuned_on")
        except (OSError, ValueError):
            configs = {}
    for key, (cfg, ms) in entries.items():
        entry = dataclasses.asdict(cfg)
        if ms is not None:
            entry["ms"] = round(float(ms), 6)
        configs[key] = entry
    data = {
        "format": TABLE_FORMAT,
        "arch": arch,
        "tuned_on": tuned_on,
        "configs": dict(sorted(configs.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _table(path: Path) -> dict[str, _conv.ConvConfig]:
    key = str(path)
    if key not in _tables:
        _tables[key] = read_table(path)
    return _tables[key]


def table_lookup(arch: str, key: str) -> _conv.ConvConfig | None:
    """The table entry for ``key``: ``$FASTRES_CONFIG_DIR`` wins over the shipped table."""
    for d in config_dirs():
        cfg = _table(d / f"{arch}.json").get(key)
        if cfg is not None:
            return cfg
    return None


def cache_lookup(arch: str, key: str) -> _conv.ConvConfig | None:
    return _table(cache_dir() / f"{arch}.json").get(key)


def clear_cache() -> None:
    """Forget resolved configs and tables read in this process (after changing the env or files)."""
    _resolved.clear()
    _tables.clear()
    _archs.clear()


# --------------------------------------------------------------------------------------------
# The device, autotuning


def device_arch(device: torch.device) -> str:
    """``"sm_90"`` for a compute-capability 9.0 GPU; the device type (``"cpu"``) otherwise."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _archs:
        major, minor = torch.cuda.get_device_capability(index)
        _archs[index] = f"sm_{major}{minor}"
    return _archs[index]


def autotune_enabled() -> bool:
    return os.environ.get("FASTRES_AUTOTUNE", "0") == "1"


def _can_benchmark(x: torch.Tensor) -> bool:
    """Real CUDA tensors outside graph capture and tracing: do_bench launches and synchronizes."""
    if x.device.type != "cuda" or torch.compiler.is_compiling() or compiling_only():
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(x):
            return False
    except ImportError:  # pragma: no cover
        pass
    return not torch.cuda.is_current_stream_capturing()


def benchmark(launch, configs: list[_conv.ConvConfig]) -> tuple[_conv.ConvConfig, float] | None:
    """The fastest of ``configs`` for ``launch(config)``, with its median time in ms. A config that
    does not compile on this GPU (too much shared memory, too many registers) is skipped."""
    from triton.testing import do_bench

    best = None
    for cfg in configs:
        try:
            ms = do_bench(
                lambda cfg=cfg: launch(cfg), warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"
            )
        except Exception as e:  # triton's OutOfResources / CompilationError: not a usable config here
            warnings.warn(f"fastres autotune: skipping {cfg}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if best is None or ms < best[1]:
            best = (cfg, float(ms))
    return best


@contextlib.contextmanager
def tune_session():
    """Within it, every conv shape launched on CUDA is autotuned afresh (tables and cache ignored) and
    recorded; yields the dict key -> (config, ms). ``fastres.tuning.tune_model`` writes it as a table."""
    global _session
    if _session is not None:
        raise RuntimeError("tune_session: already inside a tuning session")
    _session = {}
    try:
        yield _session
    finally:
        _session = None


def select_config(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    m: int,
    shortcut_c_in: int | None = None,
    launch=None,
) -> _conv.ConvConfig:
    """The config for one conv launch (the order is in this module's docstring).

    ``shortcut_c_in``: input channels of a projection shortcut fused into the launch, if any.
    ``launch(config)`` runs the kernel with that config; the autotuner times it. Without it (or on
    fake tensors, during CUDA-graph capture) nothing is timed.
    """
    if INTERPRET:
        c_out, c_in_g, r, s = weight.shape
        return _conv.pick_config(m, c_out // groups, c_in_g, r, s, x.dtype, interpret=True)
    # Fast path, every launch: a shape already resolved in this process (~2 us here, measured).
    memo = (x.device, x.dtype, x.shape[1], weight.shape, stride, padding, dilation, groups, m, shortcut_c_in)
    try:
        cfg = _resolved.get(memo) if _session is None else None
    except TypeError:  # symbolic sizes (SymInt) while tracing are unhashable: no table key either
        c_out, c_in_g, r, s = weight.shape
        return _conv.pick_config(m, c_out // groups, c_in_g, r, s, x.dtype, interpret=False)
    if cfg is not None:
        return cfg
    c_out, c_in_g, r, s = weight.shape
    c_out_g = c_out // groups
    arch = device_arch(x.device)
    key = shape_key(x.shape[1], c_out, r, s, stride, padding, dilation, groups, m, x.dtype, shortcut_c_in)
    if _session is not None:
        if key in _session:
            return _session[key][0]
        if launch is not None and _can_benchmark(x):
            best = benchmark(launch, candidates(m, c_out_g, c_in_g, r, s, x.dtype))
            if best is not None:
                _session[key] = best
                return best[0]
        return _conv.pick_config(m, c_out_g, c_in_g, r, s, x.dtype, interpret=False)
    cfg = table_lookup(arch, key) or cache_lookup(arch, key)
    if cfg is None and autotune_enabled():
        if launch is None or not _can_benchmark(x):
            # Not now (tracing, graph capture): the heuristic, and tune on a later eager launch.
            return _conv.pick_config(m, c_out_g, c_in_g, r, s, x.dtype, interpret=False)
        best = benchmark(launch, candidates(m, c_out_g, c_in_g, r, s, x.dtype))
        if best is not None:
            cfg = best[0]
            path = cache_dir() / f"{arch}.json"
            try:
                write_table(path, arch, {key: best}, tuned_on=environment())
            except OSError as e:
                warnings.warn(f"fastres autotune: could not write {path}: {e}", stacklevel=2)
            _tables.pop(str(path), None)
    if cfg is None:
        cfg = _conv.pick_config(m, c_out_g, c_in_g, r, s, x.dtype, interpret=False)
    _resolved[memo] = cfg
    return cfg


def environment() -> dict:
    """What a tuned table was measured with: GPU, versions, date."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
