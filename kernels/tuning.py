"""The config and tactic lookup above the kernel families: tuned tables, the FASTRES_AUTOTUNE cache,
then the heuristic. The kernel files import nothing from here; this module hands them their configs
(DESIGN.md, Layers): ``prepare_conv`` / ``conv_bias_act`` are ``kernels.conv``'s with the lookup as
``config``, and ``tuned_tactic`` is ``tactics.choose`` with the tuned entry.

Order of lookup for one conv launch on CUDA (``select_config``, the gather kernel's config):
1. the tables: ``$FASTRES_CONFIG_DIR/<arch>.json`` first, then the shipped ``fastres/configs/<arch>.json``;
2. the autotune cache ``$FASTRES_CACHE_DIR/<arch>.json`` (default ``~/.cache/fastres``);
3. with ``FASTRES_AUTOTUNE=1``: time ``candidates(...)`` once with ``triton.testing.do_bench``, keep the
   fastest, write it to the cache (later processes read it there);
4. ``pick_config``, the heuristic.
Under Triton's interpreter it is always the one fixed large-block config (DESIGN.md, Tuning).

Tables and the cache share one JSON format, so a cache file can be shipped as a table. Format 2 records
the choice per shape key: the tactic that won, its config and time, the runner-up (the fastest other
tactic; the second-fastest config when one tactic applies), cuDNN's time (null where it was not
measured), and the fastest config of each tactic measured (``by_tactic``: a tactic that cannot run at
launch time, or that ``$FASTRES_TACTICS`` leaves out, still finds its tuned config)::

    {"format": 2, "arch": "sm_90", "tuned_on": {"gpu": ..., "torch": ..., "triton": ..., "date": ...},
     "configs": {"<shape key>": {
         "tactic": "tma_gemm", "config": {"block_m": 128, ...}, "ms": 0.021,
         "runner_up": {"tactic": "gather", "config": {"block_m": 128, ...}, "ms": 0.024},
         "cudnn_ms": 0.030,
         "by_tactic": {"tma_gemm": {"config": {...}, "ms": 0.021},
                       "gather": {"config": {...}, "ms": 0.024}}}}}

Format 1 (one gather config per key, ``{"block_m": ..., "num_stages": ..., "ms": ...}``) still reads:
its entries are gather entries without a runner-up or cuDNN time.

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
from . import tactics as _tactics
from . import tma_gemm as _tma_gemm
from ._common import INTERPRET, compiling_only, next_pow2

TABLE_FORMAT = 2
# Formats read: 1 (gather configs only) and 2 (the tactic choice).
READ_FORMATS = (1, 2)
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
# Candidate tiles of the TMA GEMM (block_m, block_n, block_k for 16-bit dtypes, num_warps, num_stages,
# programs per SM): its heuristic's 128-row tiles at 64 and 128 columns, 4 stages, and a 64-row tile for
# small M. Compiled without spills on sm_90 (kernel report, issue 11); not yet timed on a GPU.
TMA_GEMM_TILES = (
    (128, 128, 64, 8, 3, 1),
    (128, 64, 64, 8, 3, 2),
    (128, 128, 64, 8, 4, 1),
    (128, 256, 64, 8, 3, 1),
    (64, 128, 64, 4, 4, 1),
)
@dataclasses.dataclass(frozen=True)
class Choice:
    """One measured way to run a conv shape: a tactic, its config (None: the tactic's own), its time."""

    tactic: str
    config: object | None = None
    ms: float | None = None


@dataclasses.dataclass
class Entry:
    """A table entry: the choice for one shape key (the module docstring has its JSON)."""

    tactic: str
    config: object | None = None
    ms: float | None = None
    runner_up: Choice | None = None
    cudnn_ms: float | None = None
    by_tactic: dict[str, Choice] = dataclasses.field(default_factory=dict)

    @classmethod
    def gather(cls, config: _conv.ConvConfig, ms: float | None = None) -> Entry:
        """A gather-only entry (format 1, ``tune_model``, the autotune cache)."""
        return cls(
            _tactics.GATHER, config, ms, by_tactic={_tactics.GATHER: Choice(_tactics.GATHER, config, ms)}
        )

    def config_for(self, tactic: str) -> object | None:
        """The tuned config of ``tactic`` for this shape, or None if it was not measured."""
        if self.tactic == tactic and self.config is not None:
            return self.config
        choice = self.by_tactic.get(tactic)
        if choice is None and self.runner_up is not None and self.runner_up.tactic == tactic:
            choice = self.runner_up
        return None if choice is None else choice.config


# Per-process memory: (arch, key) -> ConvConfig for shapes already resolved, tables by path.
_resolved: dict[tuple, _conv.ConvConfig] = {}
_tables: dict[str, dict[str, Entry]] = {}
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


# Split-K slice counts the tuner times (besides the heuristic's own choice).
TUNED_SPLITS = (2, 4)


def candidates(
    m: int, c_out_g: int, c_in_g: int, r: int, s: int, dtype: torch.dtype
) -> list[_conv.ConvConfig]:
    """The configs FASTRES_AUTOTUNE times for one shape: the heuristic first, then ``CANDIDATE_TILES``
    clamped to the problem (no block larger than the padded M, C_out or K extent), then the default tile
    split into ``TUNED_SPLITS`` K slices where its K loop allows, without repeats."""
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
    # Split-K of the default tile (2 and 4 slices, where the K loop is long enough): what pick_config's
    # cost model weighs for layers that do not fill a wave, timed here so a GPU decides, not the model.
    for cfg in _conv.config_candidates(m, c_out_g, c_in_g, r, s, dtype):
        if cfg.split_k in TUNED_SPLITS and cfg not in out:
            out.append(cfg)
    return out


def tma_gemm_candidates(m: int, c_out: int, c_in: int, dtype: torch.dtype) -> list[_tma_gemm.TmaGemmConfig]:
    """The TMA GEMM configs the tuner times for one 1×1 shape: its heuristic first, then
    ``TMA_GEMM_TILES`` clamped to the problem (fp32 halves block_k), without repeats; then the first two
    again with a warp-specialised K loop where this Triton has it (``tma_gemm.WARP_SPECIALIZE_AVAILABLE``;
    a variant that fails to compile on the GPU is dropped by the tuner)."""
    caps = (
        m_bucket(m),
        max(_tma_gemm.MIN_BLOCK, next_pow2(c_out)),
        max(_tma_gemm.MIN_BLOCK, next_pow2(c_in)),
    )
    out = [_tma_gemm.pick_config(m, c_out, c_in, dtype, interpret=False)]
    for bm, bn, bk, warps, stages, per_sm in TMA_GEMM_TILES:
        if dtype == torch.float32:
            bk //= 2
        cfg = _tma_gemm.TmaGemmConfig(
            block_m=min(bm, caps[0]),
            block_n=min(bn, caps[1]),
            block_k=max(_tma_gemm.MIN_BLOCK, min(bk, caps[2])),
            num_warps=warps,
            num_stages=stages,
            programs_per_sm=per_sm,
        )
        if cfg not in out:
            out.append(cfg)
    if _tma_gemm.WARP_SPECIALIZE_AVAILABLE:
        out += [dataclasses.replace(cfg, warp_specialize=1) for cfg in out[:2]]
    return out


def tactic_candidates(
    tactic: str, *, m: int, c_in: int, c_out: int, r: int, s: int, groups: int, dtype: torch.dtype
) -> list:
    """The configs the tuner times for ``tactic`` on one shape. A tactic registered with a
    ``tactics.CANDIDATES[name](m=, c_in=, c_out=, r=, s=, groups=, dtype=)`` source gets its list;
    any other (cuDNN) is timed once with its own choice (``[None]``)."""
    if tactic == _tactics.GATHER:
        return candidates(m, c_out // groups, c_in // groups, r, s, dtype)
    if tactic == _tactics.TMA_GEMM:
        return tma_gemm_candidates(m, c_out, c_in, dtype)
    source = getattr(_tactics, "CANDIDATES", {}).get(tactic)
    if source is not None:
        return list(source(m=m, c_in=c_in, c_out=c_out, r=r, s=s, groups=groups, dtype=dtype))
    return [None]


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


def config_types() -> dict[str, type]:
    """Tactic name -> its config dataclass (``tactics.CONFIG_TYPES``); a tactic without one stores null."""
    return _tactics.CONFIG_TYPES


def _config_from_json(tactic: str, entry: dict | None) -> object | None:
    """The config dataclass of ``tactic`` from its JSON object (null: the tactic's own choice)."""
    if entry is None:
        return None
    cls = config_types().get(tactic)
    if cls is None:
        raise ValueError(f"tactic {tactic!r} takes no config, got {entry!r}")
    if not isinstance(entry, dict):
        raise TypeError(f"config must be an object, got {entry!r}")
    values = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING
        if f.name not in entry:
            if required:
                raise KeyError(f.name)
            continue
        v = entry[f.name]
        if v is None and not required and f.default is None:
            values[f.name] = v
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{f.name}={v!r} is not a positive int")
        # tl.arange needs powers of two; tl.dot needs the GEMM tile's M, N and K blocks >= 16 (a TMA
        # conv's pixel box, block_h × block_w, may be narrower on one side).
        least = _conv.MIN_BLOCK if f.name in ("block_m", "block_n", "block_k") else 1
        if f.name.startswith("block_") and (v < least or v & (v - 1)):
            raise ValueError(f"{f.name}={v} is not a power of two >= {least}")
        values[f.name] = v
    return cls(**values)


def _ms(v) -> float | None:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise ValueError(f"ms={v!r} is not a time")
    return float(v)


def _tactic_name(v) -> str:
    if v not in _tactics.TACTICS:
        raise ValueError(f"unknown tactic {v!r}; known here: {', '.join(_tactics.TACTICS)}")
    return v


def _choice_from_json(tactic: str, d: dict) -> Choice:
    return Choice(tactic, _config_from_json(tactic, d.get("config")), _ms(d.get("ms")))


def _entry_from_json(entry: dict, fmt: int) -> Entry:
    if not isinstance(entry, dict):
        raise TypeError(f"an entry must be an object, got {entry!r}")
    if fmt == 1:
        cfg = _config_from_json(_tactics.GATHER, {k: v for k, v in entry.items() if k != "ms"})
        return Entry.gather(cfg, _ms(entry.get("ms")))
    tactic = _tactic_name(entry.get("tactic"))
    runner = entry.get("runner_up")
    by_tactic = {}
    for name, d in (entry.get("by_tactic") or {}).items():
        if name in _tactics.TACTICS:  # a tactic this checkout does not know cannot run here anyway
            by_tactic[name] = _choice_from_json(name, d)
    return Entry(
        tactic=tactic,
        config=_config_from_json(tactic, entry.get("config")),
        ms=_ms(entry.get("ms")),
        runner_up=None if runner is None else _choice_from_json(_tactic_name(runner.get("tactic")), runner),
        cudnn_ms=_ms(entry.get("cudnn_ms")),
        by_tactic=by_tactic,
    )


def _config_to_json(config) -> dict | None:
    return None if config is None else dataclasses.asdict(config)


def _round_ms(ms) -> float | None:
    return None if ms is None else round(float(ms), 6)


def _entry_to_json(entry: Entry) -> dict:
    runner = entry.runner_up
    return {
        "tactic": entry.tactic,
        "config": _config_to_json(entry.config),
        "ms": _round_ms(entry.ms),
        "runner_up": None
        if runner is None
        else {"tactic": runner.tactic, "config": _config_to_json(runner.config), "ms": _round_ms(runner.ms)},
        "cudnn_ms": _round_ms(entry.cudnn_ms),
        "by_tactic": {
            name: {"config": _config_to_json(c.config), "ms": _round_ms(c.ms)}
            for name, c in sorted(entry.by_tactic.items())
        },
    }


def read_table(path: str | os.PathLike, *, strict: bool = False) -> dict[str, Entry]:
    """The entries of one table or cache file ({} if it does not exist), formats 1 and 2.

    A malformed file or entry raises ValueError when ``strict`` (the shipped-table test), and is
    otherwise skipped with a warning: a broken cache must not stop inference.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") not in READ_FORMATS:
            raise ValueError(f"not a fastres config table of format {' or '.join(map(str, READ_FORMATS))}")
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
            table[key] = _entry_from_json(entry, data["format"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            if strict:
                raise ValueError(f"fastres config table {path}, entry {key!r}: {e!r}") from e
            warnings.warn(f"fastres: ignoring entry {key!r} of {path}: {e!r}", stacklevel=2)
    return table


def read_configs(path: str | os.PathLike, tactic: str = _tactics.GATHER, *, strict: bool = False) -> dict:
    """key -> the tuned config of ``tactic`` in one table (keys without one left out)."""
    entries = read_table(path, strict=strict)
    return {k: c for k, e in entries.items() if (c := e.config_for(tactic)) is not None}


def write_table(
    path: str | os.PathLike,
    arch: str,
    entries: dict[str, Entry | tuple[_conv.ConvConfig, float | None]],
    *,
    tuned_on: dict | None = None,
    merge: bool = True,
) -> Path:
    """Write ``entries`` (key -> ``Entry``, or (gather config, ms)) as a format-2 table; with ``merge``,
    entries already in the file (either format) stay unless replaced. Atomic (temp file + rename), so a
    concurrent reader, or a run killed while writing, sees the old table or the new one."""
    path = Path(path)
    if path.stem != arch:
        raise ValueError(f"write_table: a table for {arch!r} must be named {arch}.json, got {path.name}")
    configs: dict = {}
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
            tuned_on = tuned_on if tuned_on is not None else old.get("tuned_on")
            fmt = old.get("format")
            for key, entry in (old.get("configs") or {}).items():
                # Format-1 entries are rewritten as format 2; unreadable ones are dropped.
                with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                    configs[key] = _entry_to_json(_entry_from_json(entry, fmt)) if fmt == 1 else entry
        except (OSError, ValueError):
            configs = {}
    for key, entry in entries.items():
        if not isinstance(entry, Entry):
            entry = Entry.gather(*entry)
        configs[key] = _entry_to_json(entry)
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


def _table(path: Path) -> dict[str, Entry]:
    key = str(path)
    if key not in _tables:
        _tables[key] = read_table(path)
    return _tables[key]


def table_lookup(arch: str, key: str) -> Entry | None:
    """The table entry for ``key``: ``$FASTRES_CONFIG_DIR`` wins over the shipped table."""
    for d in config_dirs():
        entry = _table(d / f"{arch}.json").get(key)
        if entry is not None:
            return entry
    return None


def cache_lookup(arch: str, key: str) -> Entry | None:
    return _table(cache_dir() / f"{arch}.json").get(key)


def lookup(arch: str, key: str) -> Entry | None:
    """The entry that decides ``key``'s tactic: the tables', else the autotune cache's."""
    return table_lookup(arch, key) or cache_lookup(arch, key)


def config_lookup(arch: str, key: str, tactic: str = _tactics.GATHER) -> object | None:
    """The tuned config of ``tactic`` for ``key``: the first of the tables, then the cache, that has one."""
    for entry in (table_lookup(arch, key), cache_lookup(arch, key)):
        cfg = None if entry is None else entry.config_for(tactic)
        if cfg is not None:
            return cfg
    return None


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
    """The fastest of ``configs`` for ``launch(config)`` (by ``launch_score``), with its median time in ms. A
    config that does not compile on this GPU (too much shared memory, too many registers) is skipped."""
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
        if best is None or launch_score(cfg, ms) < launch_score(best[0], best[1]):
            best = (cfg, float(ms))
    return best


def launch_score(config, ms: float) -> tuple[float, float]:
    """What a tuner ranks a timed candidate by: the longer of its measured time and its launches' host time
    (``kernels.conv.host_floor_seconds``; a gather split has two launches), then the measured time: the
    rule ``pick_config`` applies to its predictions, with the GPU's own times. At batch 1 a split that the
    graph-timed measurement finds a few µs faster is not taken where the host would hide it."""
    return max(ms, _conv.host_floor_seconds(getattr(config, "split_k", 1)) * 1e3), ms


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
    cfg = config_lookup(arch, key)
    if cfg is None and autotune_enabled():
        if launch is None or not _can_benchmark(x):
            # Not now (tracing, graph capture): the heuristic, and tune on a later eager launch.
            return _conv.pick_config(m, c_out_g, c_in_g, r, s, x.dtype, interpret=False)
        best = benchmark(launch, candidates(m, c_out_g, c_in_g, r, s, x.dtype))
        if best is not None:
            cfg = best[0]
            path = cache_dir() / f"{arch}.json"
            try:
                write_table(path, arch, {key: Entry.gather(*best)}, tuned_on=environment())
            except OSError as e:
                warnings.warn(f"fastres autotune: could not write {path}: {e}", stacklevel=2)
            _tables.pop(str(path), None)
    if cfg is None:
        cfg = _conv.pick_config(m, c_out_g, c_in_g, r, s, x.dtype, interpret=False)
    _resolved[memo] = cfg
    return cfg


# --------------------------------------------------------------------------------------------
# The launchers with the lookup: what the modules and ops call


def prepare_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, config=None, **kwargs):
    """``kernels.conv.prepare_conv`` with its config from the lookup (``select_config``) when ``config``
    is None; same arguments, same result.

    >>> launch, out = prepare_conv(x, w, b, padding=1)                     # doctest: +SKIP
    """
    return _conv.prepare_conv(x, weight, bias, config=select_config if config is None else config, **kwargs)


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, config=None, **kwargs):
    """``kernels.conv.conv_bias_act`` with its config from the lookup (``select_config``) when ``config``
    is None; same arguments, same result.

    >>> y = conv_bias_act(x, w, b, residual=identity)                       # doctest: +SKIP
    """
    return _conv.conv_bias_act(x, weight, bias, config=select_config if config is None else config, **kwargs)


def launch_key(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    shortcut_c_in: int | None = None,
) -> str:
    """The table key of the conv launch ``conv_bias_act(x, weight, ...)`` would make."""
    stride, padding, dilation = (
        _conv._pair(v, n) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    )
    c_out, _, r, s = weight.shape
    n, c_in, h, w = x.shape
    p = _conv.conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = _conv.conv_output_size(w, s, stride[1], padding[1], dilation[1])
    return shape_key(c_in, c_out, r, s, stride, padding, dilation, groups, n * p * q, x.dtype, shortcut_c_in)


def tuned_tactic(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    shortcut_c_in: int | None = None,
    arch: str | None = None,
    env: str | None = None,
) -> tuple[str, str, Entry | None]:
    """(tactic, reason, the tuned entry or None) for one conv launch: ``tactics.choose`` with the tactic
    the tables (or the autotune cache) recorded for its shape key on ``arch`` (default: x's device).
    What the reports name per layer, and what a launch plan runs. x and weight are prototypes of the launch
    (the rules read their shapes, strides, alignment and device; a meta tensor fails the TMA rules).

    >>> tuned_tactic(x, w, padding=1, arch="sm_90")                         # doctest: +SKIP
    ('gather', 'gather: default (tma_gemm is chosen only by FASTRES_TACTICS or a tuned table)', None)
    """
    entry = None
    if x.dtype in _DTYPE_NAMES:
        key = launch_key(
            x,
            weight,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            shortcut_c_in=shortcut_c_in,
        )
        entry = lookup(arch or device_arch(x.device), key)
    tuned = entry.tactic if entry is not None and entry.tactic in _tactics.RULES else None
    name, why = _tactics.choose(
        x,
        weight,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        shortcut=shortcut_c_in is not None,
        tuned=tuned,
        env=env,
    )
    return name, why, entry


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
