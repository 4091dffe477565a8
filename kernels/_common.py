"""Shared launcher helpers: input checks with clear errors, and small integer utilities."""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
from triton import knobs as _knobs
from triton.runtime.jit import JITFunction

# Triton reads TRITON_INTERPRET when it is imported; we read the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_COMPILE_ONLY = contextvars.ContextVar("fastres_compile_only", default=False)


@contextlib.contextmanager
def compile_only():
    """Launches inside compile (``kernel.warmup``) and run nothing: outputs stay uninitialised.
    ``fastres.warmup`` uses it under Triton's AsyncCompileMode to compile a model's kernels in threads."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def compiling_only() -> bool:
    return _COMPILE_ONLY.get()


# Tensor types a raw Triton launch can take: it reads data_ptr() and nothing else. FakeTensor,
# FunctionalTensor and other subclasses mean someone is tracing (or dispatching) and must see the launch.
_REAL_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def is_traced(args) -> bool:
    """Whether a launch with these arguments is being traced (torch.compile, torch.export, make_fx,
    FakeTensorMode) rather than run: a traced launch must go through ``wrap_triton`` so that it is
    recorded, a real one must not (the higher-order-op dispatch costs ~80 µs per launch and adds a
    kernel-table entry per call)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    # By type, not isinstance(a, torch.Tensor): that goes through a Python __instancecheck__ and made
    # this loop ~5 µs for a conv's 35 arguments instead of ~1 µs (CPU, torch 2.14).
    for a in args:
        t = type(a)
        if t is int or t in _REAL_TENSOR_TYPES:
            continue
        if isinstance(a, torch._C.TensorBase):
            return True
    return False


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current device, whatever device
    the tensors are on."""
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda._DeviceGuard(device.index)


def _launch_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class _CompileRequest:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def compile_request(*args, **kwargs):
            with device_guard(_launch_device(args)):
                return self.kernel.warmup(*args, grid=grid, **kwargs)

        return compile_request


class _Launcher:
    """``launcher[grid](*args)``: the raw kernel on its tensors' device for real tensors, ``wrap_triton``
    (decided per call, never cached: inside a triton_op in eager mode it returns the raw kernel) while
    tracing."""

    __slots__ = ("kernel",)

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        kernel = self.kernel

        def launch(*args, **kwargs):  # tensors are positional in every fastres launcher
            if is_traced(args):
                from torch.library import wrap_triton

                traceable = wrap_triton(kernel)
                if traceable is not kernel:  # the raw kernel: a triton_op's eager body with real tensors
                    return traceable[grid](*args, **kwargs)
            with device_guard(_launch_device(args)):
                return kernel[grid](*args, **kwargs)

        return launch


_LAUNCHERS: dict = {}


def launchable(kernel):
    """``launchable(kernel)[grid](*args, **kwargs)`` launches ``kernel``: directly under the interpreter
    (its kernels are not JITFunctions and torch's wrapper does not accept them), as a compile request
    inside ``compile_only()``, else through a ``_Launcher`` that picks the raw kernel or ``wrap_triton``
    from the arguments of each call. The launchers must launch through it: ``count_launches`` patches it."""
    if not isinstance(kernel, JITFunction):
        return kernel
    if _COMPILE_ONLY.get():
        return _CompileRequest(kernel)
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = _Launcher(kernel)
    return launcher


class BoundLaunch:
    """One launch of ``kernel`` on ``grid`` prepared once, for a launch plan (DESIGN.md, The hot path).

    Each call passes every kernel argument in parameter order (the runtime ones, then the values of the
    constexprs named in ``names``): the plan's template with this call's tensors filled in. The caller
    guarantees that those tensors match the template's (dtype, shape, strides, device, 16-byte
    alignment), which fixes the specialisation Triton chose on the first launch.

    The first launch goes through ``launchable(kernel)[grid]`` (Triton's binder, cache and compile) and
    keeps the ``CompiledKernel`` it returns; later ones call that kernel's launcher directly, as
    ``CompiledKernel.__getitem__`` does in Triton 3.6 to 3.8: no argument binding, specialisation or
    cache lookup per call. The generic path is taken whenever the bound one could be wrong or unseen:
    no compiled kernel (interpreter, a Triton without these attributes, a compile request), the kernel
    or ``launchable`` replaced (``count_launches``, tests), ``compile_only``, Triton's debug or
    instrumentation knob changed, or pre-run hooks added. Another current CUDA device gets a guard, and
    a launch hook its launch metadata (Triton 3.8's hooks are ``HookChain``s, never None: an empty chain
    counts as no hook, where Triton would build the metadata of every launch for nobody)."""

    __slots__ = (
        "owner", "kernel", "name", "grid", "grid3", "n_runtime", "names", "options", "device", "compiled",
        "stream", "knobs", "cuda", "index", "fast",
    )

    def __init__(
        self, owner, kernel, grid: tuple, n_runtime: int, names: tuple[str, ...], options: dict, device
    ) -> None:
        self.owner = owner  # the launcher's module: its ``launchable`` and kernel are looked up per call
        self.kernel = kernel
        self.name = getattr(kernel, "__name__", None)
        self.grid = grid
        self.grid3 = tuple(grid) + (1,) * (3 - len(grid))
        self.n_runtime = n_runtime
        self.names = names
        self.options = options  # launch options (num_warps, num_stages): not kernel arguments
        self.device = device
        self.cuda = device.type == "cuda"
        self.index = device.index or 0
        self.compiled = None  # the CompiledKernel of the first launch, once bound
        self.stream = None
        self.knobs = None
        self.fast = None  # once bound: the closure that launches it (``_fast_launch``)

    def _bindable(self) -> bool:
        return (
            self.owner.launchable is launchable
            and not _COMPILE_ONLY.get()
            and getattr(self.owner, self.name, None) is self.kernel
            and not self.kernel.pre_run_hooks
        )

    def __call__(self, args: list) -> None:
        # The prepared launches (ConvLaunch, EpilogueLaunch, PoolLaunch) run these two lines inline.
        fast = self.fast
        if fast is None or not fast(args):
            self.launch(args)

    def launch(self, args: list) -> None:
        """The launch through Triton's own path (``launchable(kernel)[grid]``); binds on the first."""
        compiled = self.compiled
        if compiled is not None and self._bindable() and self.knobs == _knob_state():
            with device_guard(self.device):  # bound, but another device is current or a hook is set
                return self._run(compiled, args)
        n = self.n_runtime
        consts = dict(zip(self.names, args[n:], strict=True))
        result = self.owner.launchable(self.kernel)[self.grid](*args[:n], **consts, **self.options)
        if (
            compiled is None
            and isinstance(self.kernel, JITFunction)
            and self._bindable()
            and all(hasattr(result, a) for a in ("run", "function", "packed_metadata", "launch_metadata"))
        ):
            from triton.runtime.driver import driver

            self.stream = driver.active.get_current_stream
            self.knobs = _knob_state()
            self.compiled = result
            self.fast = _fast_launch(self, result)
        return None

    def _run(self, compiled, args) -> None:
        grid = self.grid3
        stream = self.stream(self.index)
        enter = _knobs.runtime.launch_enter_hook
        metadata = compiled.launch_metadata(self.grid, stream, *args) if enter is not None else None
        compiled.run(
            grid[0],
            grid[1],
            grid[2],
            stream,
            compiled.function,
            compiled.packed_metadata,
            metadata,
            enter,
            _knobs.runtime.launch_exit_hook,
            *args,
        )


_HOOK_CHAIN = getattr(_knobs, "HookChain", None)


def _fast_launch(bound: BoundLaunch, compiled):
    """``fast(args) -> bool``: launch ``compiled`` with ``args`` straight through its launcher, as
    ``CompiledKernel.__getitem__`` does (Triton 3.6 to 3.8), and return True; or launch nothing and return
    False when the generic path must run instead: ``launchable`` or the kernel replaced (``count_launches``,
    tests), pre-run hooks added, ``compile_only``, Triton's debug or instrumentation knob changed since
    binding, another CUDA device current, or a launch hook set (it gets its launch metadata there). Every
    value it reads per call is a local of this closure: this runs once per kernel launch."""
    owner, name, kernel, index, cuda = bound.owner, bound.name, bound.kernel, bound.index, bound.cuda
    run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    g0, g1, g2 = bound.grid3
    stream = bound.stream
    debug, instrumentation = bound.knobs
    runtime, compilation, chain, only = _knobs.runtime, _knobs.compilation, _HOOK_CHAIN, _COMPILE_ONLY

    def fast(args) -> bool:
        if (
            owner.launchable is not launchable
            or getattr(owner, name, None) is not kernel
            or kernel.pre_run_hooks
            or only.get()
            or runtime.debug is not debug
            or compilation.instrumentation_mode != instrumentation
            or (cuda and _current_cuda_device() != index)
        ):
            return False
        enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (enter is not None and (type(enter) is not chain or enter.calls)) or (
            exit_ is not None and (type(exit_) is not chain or exit_.calls)
        ):
            return False
        run(g0, g1, g2, stream(index), function, packed, None, None, None, *args)
        return True

    return fast


def _current_cuda_device() -> int:
    return torch._C._cuda_getDevice()


def _knob_state() -> tuple:
    """Triton settings outside the arguments that enter its kernel-cache key."""
    return (_knobs.runtime.debug, _knobs.compilation.instrumentation_mode)


_UNUSED: dict = {}


def unused_pointer(like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``like``'s dtype and device for a pointer argument the kernel never reads (a flag
    turned it off). It shares storage with no other argument: passing the output there instead would
    hand torch.compile one buffer as both a read and a written argument. Cached for real tensors,
    allocated while tracing (a cached real tensor cannot enter a traced graph)."""
    if is_traced((like,)):
        return like.new_empty(1)
    key = (like.device, like.dtype)
    t = _UNUSED.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = _UNUSED[key] = torch.empty(1, dtype=like.dtype, device=like.device)
    return t


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise TypeError/ValueError naming the op and argument, before any launch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (same device as x)")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{op}: {name} is on {t.device}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing triton)"
        )


def tl_dtype_ok(op: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: dtype {dtype} is not supported; use one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        )


def channels_last_strides(shape) -> tuple[int, ...]:
    """The strides ``torch.empty(shape, memory_format=torch.channels_last)`` gives (from a meta tensor, so
    size-1 dimensions come out exactly as torch makes them). A prepared launch allocates its output with
    ``torch.empty_strided(shape, these)``: about half the host time of ``torch.empty(..., memory_format=)``
    per call (1.5 vs 3.7 µs, CPU, this project's 2-core machine)."""
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()

