"""Drop-in ``nn.Module`` replacements backed by the fused ops.

Two shapes of replacement, both keeping every ``state_dict`` key of the original:

* A block (``FusedBasicBlock``, ``FusedBottleneck``) replaces a torchvision block whole and keeps
  its children under their names (``conv1``, ``bn1``, …, ``downsample``).
* A conv → norm → act run among siblings (a ``Sequential``, or ResNet's ``conv1, bn1, relu``)
  is fused into the conv: the conv becomes ``FusedConvBNAct2d`` (an ``nn.Conv2d`` holding the same
  parameters), the norm becomes ``FoldedBatchNorm2d`` (the same buffers and parameters) and the
  activation a ``FoldedAct`` of its own class (``FoldedReLU``, ``FoldedSiLU``, …; any activation of
  ``fastres.activations``). When the fused path runs, the norm and activation pass their input
  through, because the conv already applied them; otherwise each computes exactly what it did.

The fused path runs in eval mode when no gradient is needed; otherwise every module computes
exactly what the original computes (batch statistics and running-stat updates in train mode,
gradients to every parameter), since fused training kernels do not exist yet.
"""

from __future__ import annotations

import operator
import types
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.modules import module as _nn_module

from fastres import activations, cpu, ops
from fastres.fold import (
    FoldCache,
    TensorStamps,
    bn_fold_reason,
    conv_bn_sources,
    conv_bn_tensors,
    fold_conv_bn,
    fp32_precision,
)
from fastres.kernels import pool as _pool
from fastres.kernels import tactics as _tactics
from fastres.kernels import tuning as _tuning
from fastres.kernels._common import INTERPRET, SUPPORTED_DTYPES

try:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    BasicBlock = Bottleneck = FrozenBatchNorm2d = None


# --------------------------------------------------------------------------------------------
# When the fused path may run


def _device_ok(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return x.dtype in SUPPORTED_DTYPES
    if x.device.type == "cpu":
        # The interpreter has no bf16 (or fp64) dot; the folded CPU path handles every float dtype.
        return x.dtype in (torch.float32, torch.float16) if INTERPRET else x.is_floating_point()
    return False


def fused_path_ok(x: torch.Tensor, params, *, training: bool) -> bool:
    """True when the fused kernels compute what the original module would, and no autograd is needed."""
    if training or not isinstance(x, torch.Tensor) or not _device_ok(x):
        return False
    if torch.onnx.is_in_onnx_export():
        return False  # both ONNX exporters get the original computation: a standard graph, no custom op
    if _exporting():
        return True  # an exported eval model is an inference graph: fused ops, no autograd
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        _warn_eager_once()
        return False
    return True


_WARNED = []


def _warn_eager_once() -> None:
    """Say once per process why an eval forward is not fused: correct, but not fast."""
    if _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.append(True)
    warnings.warn(
        "fastres: an eval forward that needs gradients runs the original (eager) computation; "
        "use torch.inference_mode() / torch.no_grad() (or freeze the parameters) for the fused kernels",
        stacklevel=4,
    )


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def autocast_input(x):
    """``x`` in the dtype an enabled autocast computes convolutions in on x's device (as eager would),
    and whether autocast is on. Outside autocast, or for a non-float input, ``x`` as it is."""
    if (
        isinstance(x, torch.Tensor)
        and x.device.type in ("cuda", "cpu")  # the fused path runs nowhere else; meta has no autocast
        and x.is_floating_point()
        and torch.is_autocast_enabled(x.device.type)
    ):
        dtype = torch.get_autocast_dtype(x.device.type)
        return (x if x.dtype == dtype else x.to(dtype)), True
    return x, False


def _fx_leaf(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Under ``torch.fx.symbolic_trace`` a fastres module is a leaf: the graph calls the module itself,
    which decides at run time (fused kernels, or the original computation) as it does untraced."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


# --------------------------------------------------------------------------------------------
# Launch plans (DESIGN.md, The hot path): module → plan → kernel.

# Device types whose fused forward launches Triton kernels (the plan's ConvLaunch / PoolLaunch); a plan on
# other CPU tensors (interpreter off) calls the CPU path (``fastres.cpu``, the ops' CPU bodies) directly.
# benchmarks/host_overhead.py adds "cpu" to measure the CUDA path's host work on CPU tensors.
KERNEL_DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)

_TRAINING = operator.attrgetter("training")
# _TRAINING_FORWARD: a fused module about to run in training mode drops its plan and folds (refold). Its
# BatchNorms update their running statistics in place inside the batch_norm kernel, which bumps no
# version counter; their num_batches_tracked increment does (fold.conv_bn_tensors stamps it), but a BN
# may have no counter. Cheap (references dropped); the next eval forward folds again. Not while Dynamo
# traces (nothing runs then, and the compiled graph writes the statistics back with copy_, which bumps).
_EPS = operator.attrgetter("eps")
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_CHILDREN = operator.attrgetter("_modules")


def _tracing() -> bool:
    """Whether a forward is being traced or dispatched (torch.compile / export, jit.trace, make_fx,
    FakeTensorMode and other dispatch modes): then the ``torch.ops.fastres`` ops must be called, and a
    launch plan (real tensors, direct launches) must not."""
    return (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack() > 0
    )


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def plain_inference(x) -> bool:
    """What a launch plan needs of the call, before its own checks: a plain tensor, no gradient mode, no
    tracing, and no autocast (for any device type: a stricter rule than the input's device, and one C
    call; under autocast for another device the full decision runs, and may still use the plan)."""
    return (
        not _tracing()  # first: under Dynamo it folds to True and nothing after it is traced
        and type(x) is torch.Tensor
        and not torch.is_grad_enabled()
        and not (_ANY_AUTOCAST() if _ANY_AUTOCAST is not None else _autocast_any(x))
    )


def _autocast_any(x) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _plannable(x) -> bool:
    """A fused forward on ``x`` may build or use a launch plan (else it calls the ops)."""
    return type(x) is torch.Tensor and x.device.type in ("cuda", "cpu") and not _tracing()


class _KernelLaunches:
    """Where a plan's launches come from for a device type that runs the Triton kernels."""

    @staticmethod
    def prepare_conv(x, weight, bias, **kwargs):
        """The launch of the tactic chosen for this conv (``kernels.tuning.tuned_tactic``: a tuned table's
        choice where ``$FASTRES_TACTICS`` allows it, else the first applicable tactic, by default gather),
        decided here, once per plan."""
        sw = kwargs.get("shortcut_weight")
        conv_args = {k: kwargs[k] for k in ("stride", "padding", "dilation", "groups") if k in kwargs}
        name, _, entry = _tuning.tuned_tactic(
            x, weight, shortcut_c_in=None if sw is None else sw.shape[1], **conv_args
        )
        if name == _tactics.GATHER:
            return _tuning.prepare_conv(x, weight, bias, **kwargs)
        config = None if entry is None else entry.config_for(name)
        return _tactics.prepare(name, x, weight, bias, config=config, **kwargs)

    @staticmethod
    def prepare_max_pool2d(y, kernel_size, stride, padding):
        return _pool.prepare_max_pool2d(y, kernel_size, stride, padding)

    @staticmethod
    def prepare_global_avg_pool(x):
        return _pool.prepare_global_avg_pool(x)


def _launches(x: torch.Tensor):
    """What prepares a plan's launches for ``x``: the Triton kernels (CUDA, or the interpreter), or the
    CPU path's calls (``fastres.cpu``: the ops' CPU bodies with their packs made once, no op dispatch)."""
    return _KernelLaunches if x.device.type in KERNEL_DEVICE_TYPES else cpu


def _sources(conv: nn.Module, bn: nn.Module | None) -> list[tuple[dict, str]] | None:
    """Where each tensor of ``conv_bn_tensors(conv, bn)`` lives (its module's ``_parameters`` or
    ``_buffers`` dict and name), so that a plan fetches them again with one C-level loop; None if one
    is not a registered parameter or buffer (a plan then cannot see it replaced: no plan)."""
    owners = conv_bn_sources(conv, bn)
    out = []
    for (module, name), tensor in zip(owners, conv_bn_tensors(conv, bn), strict=True):
        where = module._parameters if name in module._parameters else module._buffers
        if where.get(name) is not tensor or (tensor is None and name not in where):
            return None
        out.append((where, name))
    return out


class _FoldState:
    """What a plan's folds and decision read, as it was when the plan was made, in flat lists that one
    C-level loop each compares again (``holds``): the training flag of every module the decision reads,
    the fp32 dot mode (fp32 plans only), every folded tensor (the same object in its module's
    ``_parameters``/``_buffers``, the same version and data pointer: ``fold.TensorStamps``), every BN eps,
    every activation's settings, and the children of every module tree. ``concat`` joins several plans'
    states into one, so that a ``FusedStage`` checks all its blocks with one set of loops."""

    __slots__ = (
        "modules", "precisions", "dicts", "names", "tensors", "versioned", "versions", "pointed", "pointers",
        "bns", "eps", "acts", "act_keys", "trees", "children",
    )

    @classmethod
    def of(cls, modules, precision, sources, stamps, bns, acts, trees) -> _FoldState:
        new = cls()
        new.modules = tuple(modules)  # every module whose training flag the decision reads
        new.precisions = [] if precision is None else [precision]
        new.dicts = [d for d, _ in sources]
        new.names = [n for _, n in sources]
        new.tensors = [d.get(n) for d, n in sources]
        new.versioned, new.versions = stamps.versioned, stamps.versions
        new.pointed, new.pointers = stamps.tensors, stamps.pointers
        new.bns = list(bns)
        new.eps = list(map(_EPS, new.bns))
        new.acts = list(acts)  # activation modules the launches apply: their settings must hold too
        new.act_keys = list(map(activations.key, new.acts))
        new.trees = tuple(trees)  # modules whose children must stay the same objects
        new.children = list(map(tuple, map(dict.values, map(_CHILDREN, new.trees))))
        return new

    @classmethod
    def concat(cls, states) -> _FoldState:
        new = cls()
        for name in cls.__slots__:
            parts = [getattr(st, name) for st in states]
            joined = [v for part in parts for v in part]
            setattr(new, name, tuple(joined) if isinstance(parts[0], tuple) else joined)
        new.precisions = sorted(set(new.precisions))
        return new

    def holds(self) -> bool:
        """Nothing in training mode, and every fold is still what a fold now would give."""
        return (
            not any(map(_TRAINING, self.modules))
            and all(fp32_precision() == p for p in self.precisions)
            and all(map(operator.is_, map(dict.get, self.dicts, self.names), self.tensors))
            and list(map(_VERSION, self.versioned)) == self.versions
            and list(map(_DATA_PTR, self.pointed)) == self.pointers
            and list(map(_EPS, self.bns)) == self.eps
            and list(map(activations.key, self.acts)) == self.act_keys
            and list(map(tuple, map(dict.values, map(_CHILDREN, self.trees)))) == self.children
        )

    def __deepcopy__(self, memo):
        return None  # like _Plan's: a copy plans again

    def __reduce__(self):
        return (type(None), ())


class _Plan:
    """What a fused module decided on its first fused call, kept while it holds: the input signature it
    was made for and the state of everything its folds and decision read (``_FoldState``: the tensors'
    identity, versions and memory, every eps and activation setting, the module trees, the precision);
    ``run(x)`` launches the prepared kernels.

    ``ready(x)`` is the whole per-forward check of the fast path: no gradient mode, no tracing, no
    autocast, nothing in training mode, the same signature (dtype, shape, strides, device, 16-byte
    alignment: what Triton specialised on) and folds that are not stale."""

    __slots__ = (
        "run", "shape", "stride", "dtype", "device", "aligned", "stamps", "state",
        "output_size", "run_owned",
    )

    def __init__(self, run, x: torch.Tensor, modules, trees, pairs, sources, acts=(), run_owned=None) -> None:
        self.run = run
        # run_owned(x): run(x) for an input the caller owns, which the launches may overwrite (FusedStage)
        self.run_owned = run_owned
        self.shape, self.stride, self.dtype, self.device = x.shape, x.stride(), x.dtype, x.device
        self.aligned = x.data_ptr() % 16 == 0
        # The fp32 dot mode decides fp32 folds and launches only: other dtypes do not read it per forward.
        precision = fp32_precision() if x.dtype == torch.float32 else None
        self.stamps = TensorStamps([d.get(n) for d, n in sources])  # holds the storages (see its docstring)
        bns = [bn for _, bn in pairs if bn is not None]
        self.state = _FoldState.of(modules, precision, sources, self.stamps, bns, acts, trees)

    def signature_ok(self, x: torch.Tensor) -> bool:
        """The input's dtype, shape, strides, device and 16-byte alignment are the plan's."""
        return (
            x.dtype is self.dtype
            and x.shape == self.shape
            and x.stride() == self.stride
            and x.device == self.device
            and (x.data_ptr() % 16 == 0) is self.aligned
        )

    def matches(self, x: torch.Tensor) -> bool:
        """Same signature, and every fold the plan holds is still what a fold now would give."""
        return self.signature_ok(x) and self.state.holds()

    def __deepcopy__(self, memo):
        return None  # a copy plans again from its own tensors

    def __reduce__(self):
        return (type(None), ())  # pickled as None, like FoldCache's state

    def _mode_ok(self, x) -> bool:
        """A plain tensor, no gradients, no tracing, no autocast, nothing in training mode."""
        return plain_inference(x) and not any(map(_TRAINING, self.state.modules))

    def ready(self, x) -> bool:
        """The whole per-forward check of the fast path: ``_mode_ok(x) and matches(x)``."""
        return plain_inference(x) and self.holds(x)

    def holds(self, x) -> bool:
        """``ready(x)`` once ``plain_inference(x)`` is known to hold: the same signature, nothing in training
        mode, folds that are not stale."""
        return self.signature_ok(x) and self.state.holds()

    def fuses(self, x) -> bool:
        """True only if the plan's module fuses now for an input like ``x`` (its dtype and device): what
        the norm, activation and pool after a fused conv ask (``_PassThroughWhenFused``) on each forward,
        answered without walking parameters. False means "ask the module" (the full decision), not "no"."""
        return (
            self._mode_ok(x)
            and x.dtype is self.dtype
            and x.device == self.device
            and not torch.onnx.is_in_onnx_export()
            and list(map(activations.key, self.state.acts)) == self.state.act_keys
        )


def _script_forward_of(cls: type | None):
    """``cls.forward`` under the name ``_script_forward``: what a fused module runs once
    ``torch.jit.script`` compiles it (the original class's computation on the same parameters and
    children). TorchScript names a method it compiles after the function, so a copy of ``forward`` kept
    as is would collide with the fused module's own ``forward``."""
    if cls is None:
        return None
    fn = cls.forward
    copy = types.FunctionType(fn.__code__, fn.__globals__, "_script_forward", fn.__defaults__, fn.__closure__)
    copy.__qualname__ = f"{fn.__qualname__.rsplit('.', 1)[0]}._script_forward"
    copy.__annotations__ = dict(fn.__annotations__)
    return copy


def _name(module: nn.Module) -> str:
    return getattr(module, "_fastres_name", None) or type(module).__name__


def check_input(
    module: nn.Module,
    x,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
    ndims: tuple[int, ...] = (4,),
    autocast: bool = False,
) -> None:
    """Clear errors for bad input, before any kernel launch, naming the module and what it expected."""
    where = f"fastres {type(module).__name__} '{_name(module)}'"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() not in ndims:
        shape = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{where}: expected a {shape} input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}")
    c = x.shape[-3]
    if c != channels:
        raise ValueError(
            f"{where}: expected {channels} input channels, got {c} (input shape {tuple(x.shape)})"
        )
    if x.device != device:
        raise ValueError(f"{where}: input is on {x.device} but the module's weights are on {device}")
    if x.dtype != dtype and not autocast:
        raise TypeError(
            f"{where}: input dtype {x.dtype} does not match the module's weights ({dtype}); "
            f"convert the input or the model (e.g. model.to({dtype}))"
        )


class _FoldedMixin:
    """Folds through a ``FoldCache`` keyed on every tensor read, the compute dtype and the BN eps."""

    def _fold_for(self, cache: FoldCache, conv: nn.Conv2d, bn: nn.Module | None, dtype: torch.dtype):
        if torch.jit.is_tracing():
            # torch.jit.trace records the fold from the parameters on every call, so each trace is the
            # same graph (a cache hit would record constants) and the traced model follows later edits.
            return fold_conv_bn(conv, bn, dtype)
        extra = (dtype, None if bn is None else float(bn.eps))
        return cache.get(conv_bn_tensors(conv, bn), extra, lambda: fold_conv_bn(conv, bn, dtype))


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _conv_kwargs(conv: nn.Conv2d, act: activations.Act) -> dict:
    stride, padding, dilation, groups = _conv_args(conv)
    return dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups, act=act.name, act_a=act.a,
        act_b=act.b,
    )


def _chain(launches, tail, *, shortcut: bool = False, projection=None):
    """A block's run: its first launches in order, then the tail with the block input as the residual,
    as the accumulated shortcut's input (``shortcut``), or through the projection launch."""
    first = tuple(launches)
    if shortcut:

        def run(x):
            y = x
            for launch in first:
                y = launch(y)
            return tail(y, None, x)

    elif projection is not None:

        def run(x):
            y = x
            for launch in first:
                y = launch(y)
            return tail(y, projection(x))

    else:

        def run(x):
            y = x
            for launch in first:
                y = launch(y)
            return tail(y, x)

    return run


def conv_fold_reason(conv: nn.Module) -> str | None:
    """Why the fused conv kernel cannot run this conv, or None if it can."""
    if type(conv) not in (nn.Conv2d, FusedConvBNAct2d):
        return f"{type(conv).__name__} is not a plain Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is fused)"
    if conv.groups > 1 and conv.groups == conv.in_channels:
        # One input channel per group: the implicit GEMM would use 1 of every 16 MMA columns;
        # such layers are left to cuDNN until a depthwise kernel exists.
        return "depthwise conv (no fused depthwise kernel yet)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (string padding is not fused yet)"
    return None


# --------------------------------------------------------------------------------------------
# conv → BN → act among siblings


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` instance holding the same parameters, buffers and settings as ``module`` (its own
    registries, so the original is left intact)."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    new.__dict__.update(state)
    return new


class FusedConvBNAct2d(_FoldedMixin, nn.Conv2d):
    """A Conv2d that also applies the BatchNorm (and activation) after it, in one kernel, in eval.

    Holds the original conv's parameters (same ``state_dict`` keys). The norm and activation
    modules stay where they were, as ``FoldedBatchNorm2d`` / ``FoldedAct`` (``FoldedReLU``, …).
    The activation is any module ``fastres.activations.from_module`` accepts.

    >>> seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> seq[0] = FusedConvBNAct2d.from_modules(seq[0], seq[1], seq[2])   # doctest: +SKIP
    """

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.Module | None, act: nn.Module | None = None
    ) -> FusedConvBNAct2d:
        new = _retype(conv, cls)
        # Unregistered references: the norm and act stay registered where they were.
        new.__dict__["_bn"] = FoldedBatchNorm2d.wrap(bn, new) if bn is not None else None
        if act is not None and activations.from_module(act) is None:
            raise ValueError(f"FusedConvBNAct2d: {activations.unsupported_reason(act)}")
        new.__dict__["_act"] = FoldedAct.wrap(act, new) if act is not None else None
        new.__dict__["_fold"] = FoldCache()
        new.__dict__["_plan"] = None
        new.__dict__["_source_cls"] = type(conv)  # what report() names as the original
        return new

    # TorchScript: a scripted model runs the original computation (see _SCRIPTED below).
    __jit_unused_properties__ = ["folded_bn", "folded_act"]
    _script_forward = _script_forward_of(nn.Conv2d)

    @property
    def folded_bn(self) -> nn.Module | None:
        return self._bn

    @property
    def folded_act(self) -> nn.Module | None:
        return self._act

    def _group_params(self):
        yield from self.parameters()
        if self._bn is not None:
            yield from self._bn.parameters()

    def act(self) -> activations.Act | None:
        """The activation the kernel applies (identity without one), as its module is set now; None if
        it was edited into something the kernel cannot compute (then nothing fuses)."""
        return activations.from_module(self._act)

    def fuses(self, x: torch.Tensor) -> bool:
        training = self.training or (self._bn is not None and self._bn.training)
        return fused_path_ok(x, self._group_params(), training=training) and self.act() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)  # the conv alone; the norm and act after it compute theirs
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.ready(x):
            return plan.run(x)  # the hot path: module → plan → kernel
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        # 4-D only: the BatchNorm2d folded in here rejects unbatched input in eager too.
        xc, cast = autocast_input(x)
        check_input(self, xc, self.in_channels, self.weight.dtype, self.weight.device, autocast=cast)
        if not self.fuses(xc):
            training = self.training or (self._bn is not None and self._bn.training)
            if training and not torch.compiler.is_compiling():
                refold(self)  # its BN may move its statistics unseen: see _TRAINING_FORWARD
            return super().forward(x)
        if not cast and _plannable(xc):
            if plan is None or not plan.matches(xc):
                plan = self.__dict__["_plan"] = self._make_plan(xc)
            if plan is not None:
                return plan.run(xc)
        # Under autocast the fold is made in the autocast dtype (cached like any other dtype), as eager
        # casts the weight; the bias stays fp32 and the kernel accumulates in fp32 as always.
        return self._fused_forward(xc)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._fold_for(self._fold, self, self._bn, x.dtype)
        act = self.act()
        return ops.conv_bias_act(x, folded.weight, folded.bias, None, *_conv_args(self), *act)

    def _prepare(self, x: torch.Tensor):
        """(the prepared conv launch, a prototype of its output) for input ``x``."""
        folded = self._fold_for(self._fold, self, self._bn, x.dtype)
        return _launches(x).prepare_conv(x, folded.weight, folded.bias, **_conv_kwargs(self, self.act()))

    def _make_plan(self, x: torch.Tensor) -> _Plan | None:
        sources = _sources(self, self._bn)
        if sources is None:
            return None
        run, _ = self._prepare(x)
        modules = (self,) if self._bn is None else (self, self._bn)
        acts = () if self._act is None else (self._act,)
        return _Plan(run, x, modules, (), [(self, self._bn)], sources, acts)

    def act_name(self) -> str | None:
        """What the report and repr call the fused activation (None without one)."""
        if self._act is None:
            return None
        act = self.act()
        return str(act) if act is not None else f"{type(self._act).__name__} (unsupported now)"

    def extra_repr(self) -> str:
        parts = ["conv"] + (["bn"] if self._bn is not None else [])
        parts += [self.act_name()] if self._act is not None else []
        return f"{super().extra_repr()}, fused={'+'.join(parts)}"


class _PassThroughWhenFused:
    """A norm / activation whose work the fused conv before it already did (in eval)."""

    @classmethod
    def wrap(cls, module: nn.Module, owner: FusedConvBNAct2d):
        new = module if isinstance(module, _PassThroughWhenFused) else _retype(module, cls)
        new.__dict__["_owner"] = owner
        return new

    # The original class's forward: what a scripted model runs (set on each concrete class).
    _script_forward = None

    def forward(self, x):
        if torch.jit.is_scripting():
            return self._script_forward(x)
        plan = self._owner.__dict__.get("_plan")
        if plan is not None and plan.fuses(x):
            return x  # the hot path: the owner's plan applied us
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if self._owner.fuses(x):
            return x
        return super().forward(x)


class FoldedBatchNorm2d(_PassThroughWhenFused, nn.BatchNorm2d):
    """The BatchNorm2d after a ``FusedConvBNAct2d``: same buffers; identity while the conv fuses it."""

    @classmethod
    def wrap(cls, module: nn.Module, owner: FusedConvBNAct2d):
        if (
            FrozenBatchNorm2d is not None
            and isinstance(module, FrozenBatchNorm2d)
            and not isinstance(module, _PassThroughWhenFused)
        ):
            return FoldedFrozenBatchNorm2d.wrap(module, owner)
        return super().wrap(module, owner)

    _script_forward = _script_forward_of(nn.BatchNorm2d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded into the conv before it in eval"


if FrozenBatchNorm2d is not None:

    class FoldedFrozenBatchNorm2d(_PassThroughWhenFused, FrozenBatchNorm2d):
        """torchvision's FrozenBatchNorm2d after a ``FusedConvBNAct2d``."""

        _script_forward = _script_forward_of(FrozenBatchNorm2d)

        @classmethod
        def wrap(cls, module, owner):
            return _PassThroughWhenFused.wrap.__func__(cls, module, owner)

        def __repr__(self) -> str:
            return f"FoldedFrozenBatchNorm2d({self.weight.shape[0]}, eps={self.eps}, folded into the conv)"


class FoldedAct(_PassThroughWhenFused):
    """The activation after a ``FusedConvBNAct2d``: identity while the conv applies it, the original
    class's forward otherwise. One subclass per supported activation class (``FoldedReLU``,
    ``FoldedSiLU``, …: module-level names, so a converted model pickles), ``_act_base`` naming it."""

    _act_base: type | None = None

    @classmethod
    def wrap(cls, module: nn.Module, owner: FusedConvBNAct2d):
        if isinstance(module, _PassThroughWhenFused):
            return _PassThroughWhenFused.wrap.__func__(type(module), module, owner)
        target = _FOLDED_ACTS.get(type(module))
        if target is None:
            raise ValueError(f"fastres: {activations.unsupported_reason(module)}")
        return _PassThroughWhenFused.wrap.__func__(target, module, owner)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base + ', ' if base else ''}fused into the conv before it in eval"


def _folded_act_class(base: type) -> type:
    name = f"Folded{base.__name__}"
    doc = f"The {base.__name__} after a ``FusedConvBNAct2d``: identity while the conv applies it."
    body = {"__module__": __name__, "__qualname__": name, "__doc__": doc}
    body["_script_forward"] = _script_forward_of(base)
    cls = type(name, (FoldedAct, base), body)
    cls._act_base = base
    globals()[name] = cls  # pickle finds it by name
    return cls


_FOLDED_ACTS = {base: _folded_act_class(base) for base in activations.SUPPORTED_TYPES}
FoldedReLU = _FOLDED_ACTS[nn.ReLU]


class FoldedMaxPool2d(_PassThroughWhenFused, nn.MaxPool2d):
    """ResNet's stem max-pool after a ``FusedStem``, which applies it."""

    _script_forward = _script_forward_of(nn.MaxPool2d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, applied by the stem in eval"


def pool_fuse_reason(pool: nn.Module) -> str | None:
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not MaxPool2d"
    if pool.ceil_mode or pool.return_indices or pool.dilation not in (1, (1, 1)):
        return "max-pool with ceil_mode, indices or dilation is not fused"
    return None


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class FusedStem(FusedConvBNAct2d):
    """ResNet's stem: conv1 (7×7/2) + bn1 + relu in one kernel, then the 3×3/2 max-pool kernel.

    ``conv1`` becomes this module; ``bn1``, ``relu`` and ``maxpool`` stay in place as pass-throughs.
    """

    @classmethod
    def from_modules(cls, conv, bn, act=None, pool=None):
        new = super().from_modules(conv, bn, act)
        new.__dict__["_pool"] = FoldedMaxPool2d.wrap(pool, new) if pool is not None else None
        return new

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super()._fused_forward(x)
        if self._pool is None:
            return y  # a max-pool that is not fused stays an ordinary module after us
        pool = self._pool
        return ops.max_pool2d(y, _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding))

    def _make_plan(self, x: torch.Tensor) -> _Plan | None:
        plan = super()._make_plan(x)
        if plan is None or self._pool is None:
            return plan
        conv, y = self._prepare(x)
        p = self._pool
        prepare = _launches(x).prepare_max_pool2d
        pool, _ = prepare(y, _pair(p.kernel_size), _pair(p.stride), _pair(p.padding))
        # The pool's settings are read when the plan is made: a plan holds while its module tree does.
        plan.run = lambda x: pool(conv(x))
        plan.state.modules += (p,)  # its training flag too
        return plan

    def extra_repr(self) -> str:
        return super().extra_repr() + ("+maxpool" if self._pool is not None else "")


class FusedHead(nn.AdaptiveAvgPool2d):
    """ResNet's global average pool as one NHWC reduction kernel (the FC stays ``nn.Linear``)."""

    _script_forward = _script_forward_of(nn.AdaptiveAvgPool2d)

    @classmethod
    def from_module(cls, pool: nn.AdaptiveAvgPool2d) -> FusedHead:
        new = cls(pool.output_size)
        new.train(pool.training)
        new.__dict__["_source_cls"] = type(pool)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.ready(x) and self.output_size is plan.output_size:
            return plan.run(x)
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        if (
            x.dim() == 4
            and _pair(self.output_size) == [1, 1]
            and x.numel() > 0
            and fused_path_ok(x, (), training=False)
        ):
            if _plannable(x):
                if plan is None or not plan.matches(x) or self.output_size is not plan.output_size:
                    run, _ = _launches(x).prepare_global_avg_pool(x)
                    plan = self.__dict__["_plan"] = _Plan(run, x, (), (), [], [])
                    plan.output_size = self.output_size
                return plan.run(x)
            return ops.global_avg_pool(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused=global-avg-pool kernel"


# --------------------------------------------------------------------------------------------
# Residual blocks


class _FusedBlock(_FoldedMixin, nn.Module):
    """Shared by FusedBasicBlock and FusedBottleneck: same children, fused eval forward."""

    _convs: tuple[tuple[str, str], ...] = ()  # (conv, bn) attribute pairs, in order

    @classmethod
    def from_module(cls, block: nn.Module) -> _FusedBlock:
        new = cls()
        for name, child in block.named_children():
            new.add_module(name, child)
        for key, value in vars(block).items():
            if not key.startswith("_") and key != "training":
                setattr(new, key, value)
        new.training = block.training
        new.__dict__["_source_cls"] = type(block)
        return new

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_folds"] = {}
        self.__dict__["_plan"] = None
        self.__dict__["_source_cls"] = None

    def _cache(self, key: str) -> FoldCache:
        cache = self._folds.get(key)
        if cache is None:
            cache = self._folds[key] = FoldCache()
        return cache

    def act(self) -> activations.Act | None:
        """The block's activation (its ``relu`` child, whatever its class: torchvision's blocks apply it
        after every conv but the last's BN and after the residual add), or None if the kernels cannot
        compute it as it is set now (then the block runs its original forward)."""
        return activations.from_module(self._modules.get("relu"))

    def _cba(self, x, conv_name: str, bn_name: str, act: activations.Act, *, residual=None):
        conv, _, folded = self._folded(x, conv_name, bn_name)
        return ops.conv_bias_act(x, folded.weight, folded.bias, residual, *_conv_args(conv), *act)

    def _folded(self, x, conv_name: str, bn_name: str):
        """(conv, bn, their fold in x's dtype): the ops path and the launch plan fold here alike."""
        conv, bn = getattr(self, conv_name), getattr(self, bn_name)
        folded = self._fold_for(self._cache(conv_name), conv, bn, x.dtype)
        return conv, bn, folded

    def _downsample_fusable(self) -> bool:
        ds = self.downsample
        return (
            isinstance(ds, nn.Sequential)
            and len(ds) == 2
            and conv_fold_reason(ds[0]) is None
            and bn_fold_reason(ds[1]) is None
        )

    def _dual_shortcut(self) -> bool:
        """The projection shortcut can be accumulated into the last conv's output tile (one kernel)."""
        if not self._downsample_fusable():
            return False
        ds_conv, last = self.downsample[0], getattr(self, self._convs[-1][0])
        return (
            tuple(ds_conv.kernel_size) == (1, 1)
            and tuple(ds_conv.padding) == (0, 0)
            and tuple(ds_conv.dilation) == (1, 1)
            and ds_conv.groups == 1
            and last.groups == 1
        )

    def _tail_fold(self, dtype: torch.dtype):
        """(last conv's folded weight, shortcut's folded weight, the sum of both folded biases)."""
        conv_name, bn_name = self._convs[-1]
        conv, bn = getattr(self, conv_name), getattr(self, bn_name)
        ds_conv, ds_bn = self.downsample

        def make():
            main, short = fold_conv_bn(conv, bn, dtype), fold_conv_bn(ds_conv, ds_bn, dtype)
            return main.weight, short.weight, main.bias + short.bias

        if torch.jit.is_tracing():
            return make()  # as in _fold_for
        tensors = conv_bn_tensors(conv, bn) + conv_bn_tensors(ds_conv, ds_bn)
        return self._cache("tail").get(tensors, (dtype, float(bn.eps), float(ds_bn.eps)), make)

    def _shortcut(self, x):
        if self.downsample is None:
            return x
        if self._downsample_fusable():
            ds = self.downsample
            folded = self._fold_for(self._cache("downsample"), ds[0], ds[1], x.dtype)
            return ops.conv_bias_act(
                x, folded.weight, folded.bias, None, *_conv_args(ds[0]), *activations.IDENTITY
            )
        return self.downsample(x)

    def fuses(self, x: torch.Tensor) -> bool:
        training = any(m.training for m in self.modules())
        return fused_path_ok(x, self.parameters(), training=training) and self.act() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)  # torchvision's block forward, on the same children
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.ready(x):
            return plan.run(x)  # the hot path: module → plan → kernels
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        conv1 = self.conv1
        xc, cast = autocast_input(x)
        check_input(self, xc, conv1.in_channels, conv1.weight.dtype, conv1.weight.device, autocast=cast)
        if not self.fuses(xc):
            if any(m.training for m in self.modules()) and not torch.compiler.is_compiling():
                refold(self)  # its BNs may move their statistics unseen: see _TRAINING_FORWARD
            return self._source_cls.forward(self, x)
        if not cast and _plannable(xc):
            if plan is None or not plan.matches(xc):
                plan = self.__dict__["_plan"] = self._make_plan(xc)
            if plan is not None:
                return plan.run(xc)
        act = self.act()
        out = xc
        for conv_name, bn_name in self._convs[:-1]:
            out = self._cba(out, conv_name, bn_name, act)
        last_conv, last_bn = self._convs[-1]
        if not self._dual_shortcut():
            # An identity shortcut adds the block input as eager does, in its own dtype (the kernel
            # reads any float residual and adds in fp32); a projection runs in the compute dtype.
            residual = x if self.downsample is None else self._shortcut(xc)
            return self._cba(out, last_conv, last_bn, act, residual=residual)
        x = xc
        weight, shortcut_weight, bias = self._tail_fold(x.dtype)
        shortcut_stride = list(self.downsample[0].stride)
        conv_args = _conv_args(getattr(self, last_conv))
        return ops.conv_shortcut_bias_act(
            out, weight, bias, x, shortcut_weight, *conv_args, shortcut_stride, *act
        )

    def _make_plan(self, x: torch.Tensor) -> _Plan | None:
        """The block's launches prepared for input ``x``, as the forward below would make them (None
        when the projection shortcut is an eager module: it is not the plan's to run)."""
        if self.downsample is not None and not self._downsample_fusable():
            return None
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._convs]
        if self.downsample is not None:
            pairs.append((self.downsample[0], self.downsample[1]))
        sources = []
        for conv, bn in pairs:
            found = _sources(conv, bn)
            if found is None:
                return None
            sources += found
        act = self.act()
        launches, y, prepare, run_owned = [], x, _launches(x).prepare_conv, None
        for conv_name, bn_name in self._convs[:-1]:
            conv, _, folded = self._folded(x, conv_name, bn_name)
            launch, y = prepare(y, folded.weight, folded.bias, **_conv_kwargs(conv, act))
            launches.append(launch)
        last = getattr(self, self._convs[-1][0])
        if self._dual_shortcut():
            weight, shortcut_weight, bias = self._tail_fold(x.dtype)
            tail, _ = prepare(
                y, weight, bias, shortcut_x=x, shortcut_weight=shortcut_weight,
                shortcut_stride=list(self.downsample[0].stride), **_conv_kwargs(last, act),
            )
            run = _chain(launches, tail, shortcut=True)
        else:
            shortcut = None
            residual = x
            if self.downsample is not None:
                ds = self.downsample
                folded = self._fold_for(self._cache("downsample"), ds[0], ds[1], x.dtype)
                kwargs = _conv_kwargs(ds[0], activations.IDENTITY)
                shortcut, residual = prepare(x, folded.weight, folded.bias, **kwargs)
            conv_name, bn_name = self._convs[-1]
            _, _, folded = self._folded(x, conv_name, bn_name)
            kwargs = _conv_kwargs(last, act)
            tail, _ = prepare(y, folded.weight, folded.bias, residual=residual, **kwargs)
            run = _chain(launches, tail, projection=shortcut)
            into = getattr(tail, "into_residual", None)
            if shortcut is None and into is not None:
                run_owned = _chain(launches, into)  # the identity shortcut added over the block input
        trees = (self,) if self.downsample is None else (self, self.downsample)
        return _Plan(run, x, tuple(self.modules()), trees, pairs, sources, (self.relu,), run_owned)

    def extra_repr(self) -> str:
        shortcut = ""
        if self.downsample is not None:
            shortcut = ", shortcut=eager module"
            if self._dual_shortcut():
                shortcut = ", shortcut conv+bn accumulated into the last kernel"
            elif self._downsample_fusable():
                shortcut = ", shortcut=conv+bn kernel"
        n = len(self._convs)
        act = self.act()
        name = str(act) if act is not None else f"{type(self.relu).__name__} (unsupported now)"
        return f"fused={n} conv+bn+{name} kernels, last with residual add{shortcut}"


class FusedBasicBlock(_FusedBlock):
    """torchvision BasicBlock: conv1+bn1+relu, then conv2+bn2+residual+relu (two kernels)."""

    _convs = (("conv1", "bn1"), ("conv2", "bn2"))
    _script_forward = _script_forward_of(BasicBlock)


class FusedBottleneck(_FusedBlock):
    """torchvision Bottleneck: three kernels, the last one adding the residual before its ReLU."""

    _convs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _script_forward = _script_forward_of(Bottleneck)


class FusedStage(nn.Sequential):
    """A ``Sequential`` of fused residual blocks (ResNet's ``layer1`` … ``layer4``): the same children and
    ``state_dict`` keys, and ``nn.Sequential``'s result. What it adds: the tensors that pass between its
    blocks are made and consumed by this forward alone, so on the CPU path (eval, no gradients) each
    block after the first may write its output over its input, the identity shortcut added in place by
    oneDNN (``cpu._prepare_into_residual``), as Inductor's CPU freezing does for the buffers it plans:
    no fresh output, whose new pages the OS faults in and zeroes on each forward (ResNet-50, batch 32,
    224²: 1845 -> 1685 ms, benchmarks/NOTES.md). The stage's input is never written. Any forward hook on
    a block (it could keep a block's output), a global forward hook, tracing, autocast or gradients:
    ``nn.Sequential.forward`` exactly."""

    _script_forward = _script_forward_of(nn.Sequential)

    @classmethod
    def from_module(cls, seq: nn.Sequential) -> FusedStage:
        new = _retype(seq, cls)
        new.__dict__["_source_cls"] = type(seq)
        return new

    def forward(self, x):
        if torch.jit.is_scripting():
            return self._script_forward(x)
        blocks = list(self._modules.values())
        if not plain_inference(x) or torch.onnx.is_in_onnx_export() or _forward_hooks(blocks):
            for block in blocks:
                x = block(x)
            return x
        # No hook can see a block's call, and the mode was checked once here: block plans run directly
        # (module → plan → kernels, no nn.Module call).
        plans = [b.__dict__.get("_plan") for b in blocks]
        cpu = x.is_cpu
        check = self.__dict__.get("_check")
        if check is not None and check.plans == plans and plans[0].signature_ok(x) and check.state.holds():
            # The chain this check was made on (_StageCheck), its folds all holding: from the first block's
            # input on, each plan's output is what the next plan was made for. On the CPU path each block
            # after the first writes its output over its input, which this forward made.
            y = plans[0].run(x)
            for plan in plans[1:]:
                y = plan.run_owned(y) if cpu and plan.run_owned is not None else plan.run(y)
            return y
        owned = False  # whether y was made by this forward (x is the caller's: never written)
        chained = True  # whether every block ran its plan, on the previous plan's output
        y = x
        for block, plan in zip(blocks, plans, strict=True):
            if plan is not None and plan.holds(y):
                y = plan.run_owned(y) if owned and plan.run_owned is not None else plan.run(y)
            else:
                y = block(y)
                chained = False
            owned = cpu
        if chained and plans:
            self.__dict__["_check"] = _StageCheck(plans)
        return y

    def extra_repr(self) -> str:
        return "identity shortcuts added in place between its blocks (CPU path, eval)"


class _StageCheck:
    """The block plans a ``FusedStage`` ran as a chain (each on the previous plan's output, the first on
    the stage input) and their fold states joined (``_FoldState.concat``): later forwards check the first
    block's input signature and every block's folds at once, not each block's. Sound because a plan's
    output has a fixed dtype, shape, strides and device for its input signature, and fresh outputs are
    16-byte aligned (PyTorch's CPU allocator aligns to 64 bytes, the CUDA caching allocator to 512), or
    are the block's own input (written in place): each next plan's signature holds as it did in the
    chain. Plans are compared by identity: a block that planned again breaks the check."""

    __slots__ = ("plans", "state")

    def __init__(self, plans) -> None:
        self.plans = list(plans)
        self.state = _FoldState.concat([p.state for p in plans])

    def __deepcopy__(self, memo):
        return None  # a copy's blocks plan again

    def __reduce__(self):
        return (type(None), ())


def _forward_hooks(blocks) -> bool:
    """Whether a forward hook (a block's, or a global one) could see a tensor passed between blocks."""
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return True
    return any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


def block_fuse_reason(block: nn.Module) -> str | None:
    """Why a torchvision block cannot use the fused forward, or None."""
    pairs = FusedBottleneck._convs if hasattr(block, "conv3") else FusedBasicBlock._convs
    for conv_name, bn_name in pairs:
        reason = conv_fold_reason(getattr(block, conv_name)) or bn_fold_reason(getattr(block, bn_name))
        if reason:
            return f"{conv_name}/{bn_name}: {reason}"
    act = getattr(block, "relu", None)
    if not isinstance(act, nn.Module):
        return "no activation module at block.relu"
    reason = activations.unsupported_reason(act)
    if reason:
        return f"activation: {reason}"
    return None


def refold(model: nn.Module) -> nn.Module:
    """Drop every cached fold in ``model``; the next eval forward refolds.

    Needed only after edits that PyTorch does not track: writes through ``param.data``
    (which has a version counter of its own). Everything else is detected by the cache key.

    >>> model.conv1.weight.data.mul_(2); fastres.refold(model)           # doctest: +SKIP
    """
    for m in model.modules():
        if m.__dict__.get("_plan") is not None:
            m.__dict__["_plan"] = None  # a plan holds the folded tensors it was made with
        fold = m.__dict__.get("_fold")
        if isinstance(fold, FoldCache):
            fold.clear()
        for cache in m.__dict__.get("_folds", {}).values():
            cache.clear()
    return model


# Every module type convert creates: what it must neither trace into nor convert again.
FUSED_TYPES = (FusedConvBNAct2d, _FusedBlock, FusedHead, _PassThroughWhenFused, FusedStage)
__all__ = [
    "refold",
    "FusedConvBNAct2d",
    "FusedStem",
    "FusedHead",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedStage",
    "FoldedBatchNorm2d",
    "FoldedAct",
    "FoldedReLU",
    "FoldedMaxPool2d",
    "check_input",
    "fused_path_ok",
]
