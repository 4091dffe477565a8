"""``fastres.convert``: find the ResNet parts of a model and swap in fused modules, on the instance.

Patterns, matched parent first:
- torchvision ``BasicBlock`` / ``Bottleneck`` → ``FusedBasicBlock`` / ``FusedBottleneck``;
- torchvision ``ResNet`` stem (conv1, bn1, relu, maxpool) → ``FusedStem``; its avgpool → ``FusedHead``;
- Conv2d → BatchNorm2d (→ activation) runs inside an ``nn.Sequential`` → ``FusedConvBNAct2d``;
  the torch.fx pass finds the same runs by data flow in any traceable module.
Activations: any module ``fastres.activations.from_module`` accepts (ReLU, ReLU6/Hardtanh, LeakyReLU,
SiLU, GELU, Hardswish, Hardsigmoid, Sigmoid, Mish, Identity), in runs, in blocks (``block.relu``) and in
the stem. An unsupported one (or one with an unsupported argument) stays the eager module, with the
reason in the report, while the conv and BN before it still fuse. A functional activation after the BN
(``F.silu(bn(x))``) is reported and left in the model's code: convert swaps modules on the instance and
does not rewrite a forward, so only the conv + BN fuse there.
Everything else is left exactly as it was; converting twice changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from fastres import activations
from fastres._instance import copy_sharing_tensors, restored
from fastres.fold import bn_fold_reason
from fastres.modules import (
    FUSED_TYPES,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConvBNAct2d,
    FusedHead,
    FusedStage,
    FusedStem,
    _FusedBlock,
    _PassThroughWhenFused,
    block_fuse_reason,
    conv_fold_reason,
    pool_fuse_reason,
)

try:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover
    BasicBlock = Bottleneck = ResNet = FrozenBatchNorm2d = None

FilterFn = Callable[[nn.Module, str], bool]
_NORMS = (nn.modules.batchnorm._NormBase,) + ((FrozenBatchNorm2d,) if FrozenBatchNorm2d is not None else ())


@dataclass
class Entry:
    path: str
    original: str
    result: str  # what it became, or "left"
    detail: str = ""
    convs: int = 0  # convolutions this entry fused


@dataclass
class Report:
    """What ``convert`` swapped and what it left, and why. ``str(report)`` is a table."""

    by_path: dict[str, Entry] = field(default_factory=dict)
    convs_total: int = 0

    @property
    def entries(self) -> list[Entry]:
        return list(self.by_path.values())

    @property
    def convs_fused(self) -> int:
        return sum(e.convs for e in self.entries)

    @property
    def fused(self) -> list[Entry]:
        return [e for e in self.entries if e.result != "left"]

    @property
    def left(self) -> list[Entry]:
        return [e for e in self.entries if e.result == "left"]

    def add(self, path, module, result, detail="", convs=0, original: str | None = None) -> None:
        """Record one candidate; a later pass that fuses the same path replaces the earlier entry."""
        path = path or "(root)"
        old = self.by_path.get(path)
        if original is None:
            original = old.original if old is not None else type(module).__name__
        self.by_path[path] = Entry(path, original, result, detail, convs)

    def __str__(self) -> str:
        rows = [("module", "original", "became", "detail")]
        rows += [(e.path, e.original, e.result, e.detail) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * (sum(widths) + 10))
        lines.append(f"convolutions fused: {self.convs_fused} / {self.convs_total}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "convs_fused": self.convs_fused,
            "convs_total": self.convs_total,
            "entries": [vars(e) for e in self.entries],
        }


def _original(module: nn.Module) -> str:
    """The type a fastres module replaced, for the report of an already converted model."""
    source = module.__dict__.get("_source_cls")
    return source.__name__ if source is not None else type(module).__name__


def _parts(conv: FusedConvBNAct2d) -> str:
    return "+".join(["conv", "bn"] + ([conv.act_name()] if conv.folded_act is not None else []))


def _already(conv: FusedConvBNAct2d) -> str:
    """An already fused conv's report detail, with the note convert made on why the activation after
    it was not fused."""
    return f"{_parts(conv)}, already fused{conv.__dict__.get('_fastres_act_note', '')}"


def _why_not_act(m: nn.Module) -> str:
    """' (reason)' when ``m`` is an activation the epilogue cannot compute (torch.nn's activation
    modules, or a supported class with an unsupported argument), else '' (not an activation at all)."""
    if isinstance(m, activations.SUPPORTED_TYPES) or type(m).__module__ == "torch.nn.modules.activation":
        return f" ({activations.unsupported_reason(m)})"
    return ""


_STAGE = "blocks in sequence: identity shortcuts added in place between them (CPU path)"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_torchvision_resnet(m: nn.Module) -> bool:
    return (
        ResNet is not None
        and isinstance(m, ResNet)
        and type(m).forward is ResNet.forward
        and type(m)._forward_impl is ResNet._forward_impl
    )


class _Walker:
    def __init__(self, filter_fn: FilterFn | None, apply: bool) -> None:
        self.filter_fn = filter_fn
        self.apply = apply
        self.report = Report()
        self.excluded: set[str] = set()  # paths filter_fn excluded with their whole subtree
        # report() only: paths a pattern would replace, so the fx pass does not record them again
        self.planned: set[str] = set()

    def allowed(self, module: nn.Module, path: str) -> bool:
        return self.filter_fn is None or bool(self.filter_fn(module, path))

    def visit(self, module: nn.Module, path: str) -> None:
        if isinstance(module, _FusedBlock):
            self.report.add(
                path,
                module,
                type(module).__name__,
                "already fused",
                convs=len(module._convs) + int(module._downsample_fusable()),
                original=_original(module),
            )
            return
        if BasicBlock is not None and type(module) in (BasicBlock, Bottleneck):
            if self.block(module, path):
                return  # fused, or excluded by filter_fn with everything inside it
        if _is_torchvision_resnet(module):
            self.resnet(module, path)
        recorded = self.sequential(module, path) if _is_plain_sequential(module) else set()
        for name, child in module.named_children():
            if name in recorded or isinstance(child, (_PassThroughWhenFused, FusedHead)):
                continue  # recorded by the pattern that made them
            if _join(path, name) in self.planned:
                continue  # report(): recorded by the pattern that would make it
            if isinstance(child, FusedConvBNAct2d):
                child_path = _join(path, name)
                if child_path not in self.report.by_path:
                    self.report.add(
                        child_path,
                        child,
                        type(child).__name__,
                        _already(child),
                        1,
                        original=_original(child),
                    )
                continue
            if type(child) is nn.Conv2d:
                self.report.add(
                    _join(path, name),
                    child,
                    "left",
                    "no BatchNorm2d takes its output alone (by structure, or by torch.fx where traceable)",
                )
                continue
            self.visit(child, _join(path, name))
        if isinstance(module, FusedStage):
            self.report.add(path, module, "FusedStage", "already fused", 0, original=_original(module))
        elif self.apply and path and _is_plain_sequential(module) and len(module) > 1 and all(
            isinstance(child, _FusedBlock) for child in module.children()
        ):
            self.report.add(path, module, "FusedStage", _STAGE, 0)
            self.replace(path, FusedStage.from_module(module))

    def block(self, block: nn.Module, path: str) -> bool:
        cls = FusedBottleneck if type(block) is Bottleneck else FusedBasicBlock
        reason = block_fuse_reason(block)
        if reason is None and not self.allowed(block, path):
            self.excluded.add(path)
            self.report.add(path, block, "left", "excluded by filter_fn (with everything inside it)")
            return True
        if reason:
            self.report.add(path, block, "left", reason)
            return False
        if not self.apply:
            self.unapplied(path, block, cls.__name__)
            return True  # the block's entry speaks for everything inside it
        new = cls.from_module(block)
        new._fastres_name = path
        ds = (
            ""
            if block.downsample is None
            else (", downsample conv+bn fused" if new._downsample_fusable() else ", downsample kept as is")
        )
        self.report.add(
            path,
            block,
            cls.__name__,
            f"{len(cls._convs)} fused conv kernels{ds}",
            convs=len(cls._convs) + int(new._downsample_fusable()),
        )
        self.replace(path, new)
        return True

    def resnet(self, model: nn.Module, path: str) -> None:
        stem = model.conv1
        if isinstance(stem, FusedStem):
            self.report.add(
                _join(path, "conv1"), stem, "FusedStem", "already fused", convs=1, original=_original(stem)
            )
        else:
            reason = conv_fold_reason(stem) or bn_fold_reason(model.bn1)
            if reason is None and activations.from_module(model.relu) is None:
                reason = f"stem activation: {activations.unsupported_reason(model.relu)}"
            if reason is None and not self.allowed(stem, _join(path, "conv1")):
                reason = "excluded by filter_fn"
            if reason:
                self.report.add(_join(path, "conv1"), stem, "left", reason)
            elif not self.apply:
                self.unapplied(_join(path, "conv1"), stem, "FusedStem")
            else:
                pool = model.maxpool if pool_fuse_reason(model.maxpool) is None else None
                new = FusedStem.from_modules(stem, model.bn1, model.relu, pool)
                new._fastres_name = _join(path, "conv1")
                detail = f"{_parts(new)} kernel" + (", max-pool kernel" if pool is not None else "")
                self.report.add(_join(path, "conv1"), stem, "FusedStem", detail, convs=1)
                model.conv1 = new
                model.bn1 = new.folded_bn
                model.relu = new.folded_act
                if pool is not None:
                    model.maxpool = new._pool
        head = model.avgpool
        if isinstance(head, FusedHead):
            self.report.add(
                _join(path, "avgpool"), head, "FusedHead", "already fused", original=_original(head)
            )
        elif type(head) is nn.AdaptiveAvgPool2d and self.allowed(head, _join(path, "avgpool")):
            if not self.apply:
                self.unapplied(_join(path, "avgpool"), head, "FusedHead")
            else:
                self.report.add(
                    _join(path, "avgpool"), head, "FusedHead", "global-avg-pool kernel; fc stays Linear"
                )
                model.avgpool = FusedHead.from_module(head)
        else:
            self.report.add(_join(path, "avgpool"), head, "left", "not AdaptiveAvgPool2d or filtered out")

    def sequential(self, seq: nn.Sequential, path: str) -> set[str]:
        recorded: set[str] = set()
        names = list(seq._modules)
        i = 0
        while i < len(names):
            conv = seq._modules[names[i]]
            if isinstance(conv, FusedConvBNAct2d):
                self.report.add(
                    _join(path, names[i]),
                    conv,
                    type(conv).__name__,
                    _already(conv),
                    1,
                    original=_original(conv),
                )
                i += 1
                continue
            if type(conv) is not nn.Conv2d or i + 1 >= len(names):
                i += 1
                continue
            bn = seq._modules[names[i + 1]]
            reason = conv_fold_reason(conv)
            if reason is None and not isinstance(bn, _NORMS):
                reason = f"not followed by BatchNorm2d (next is {type(bn).__name__})"
            reason = reason or bn_fold_reason(bn)
            if reason is None and not self.allowed(conv, _join(path, names[i])):
                reason = "excluded by filter_fn"
            if reason:
                self.report.add(_join(path, names[i]), conv, "left", reason)
                recorded.add(names[i])
                i += 1
                continue
            recorded.add(names[i])
            if not self.apply:
                self.unapplied(_join(path, names[i]), conv, "FusedConvBNAct2d")
                i += 1
                continue
            act = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            act_note = ""
            if act is not None and activations.from_module(act) is None:
                act_note = f"; {type(act).__name__} after it left as is" + _why_not_act(act)
                act = None
            new = FusedConvBNAct2d.from_modules(conv, bn, act)
            new._fastres_name = _join(path, names[i])
            new.__dict__["_fastres_act_note"] = act_note
            self.report.add(_join(path, names[i]), conv, "FusedConvBNAct2d", _parts(new) + act_note, convs=1)
            seq._modules[names[i]] = new
            seq._modules[names[i + 1]] = new.folded_bn
            if act is not None:
                seq._modules[names[i + 2]] = new.folded_act
            i += 3 if act is not None else 2
        return recorded

    def unapplied(self, path: str, module: nn.Module, would: str) -> None:
        self.planned.add(path)
        self.report.add(path, module, "left", f"fusable: convert() makes it {would}")

    def replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = self.root.get_submodule(parent_path) if parent_path else self.root
        setattr(parent, name, new)


class _LeafTracer(torch.fx.Tracer):
    """Traces a model's own code; our modules, torch.nn's and the norm layers are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, FUSED_TYPES + _NORMS):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> torch.fx.Graph:
    """Trace ``module`` without touching it: a model's own forward may set attributes while it is traced
    (torchvision's MultiScaleRoIAlign caches its ``scales`` from the first input it sees, so a trace
    would leave fx Proxies there and break every later forward). The trace runs on a copy that shares
    the tensors; a module that cannot be copied is traced in place and every attribute put back."""
    target = copy_sharing_tensors(module)
    if target is not None:
        return _LeafTracer().trace(target)
    with restored(module):
        return _LeafTracer().trace(module)


def _fx_runs(module: nn.Module) -> list[tuple[str, str, str | None, str]] | None:
    """(conv, bn, activation-or-None, note) module paths whose data flow is conv → bn (→ a supported
    activation module) and nothing else, found by tracing ``module`` with torch.fx; None when it cannot
    be traced. ``note`` says why an activation after the BN is not fused (unsupported module, or a
    functional call, which stays in the module's code), else ""."""
    try:
        graph = _trace(module)
    except Exception:  # noqa: BLE001 - any Python the tracer cannot follow: try the children instead
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node, kind):
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
            return None
        user = users[0]
        if user.args != (node,) or user.kwargs:
            return None
        return user if isinstance(module.get_submodule(user.target), kind) else None

    runs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        if type(module.get_submodule(node.target)) is not nn.Conv2d:
            continue
        bn = only_user(node, _NORMS)
        if bn is None:
            continue
        act, note = only_user(bn, nn.Module), ""
        if act is not None:
            m = module.get_submodule(act.target)
            if activations.from_module(m) is None:
                why = _why_not_act(m)
                note = f"; {type(m).__name__} after it left as is{why}" if why else ""
                act = None
        else:
            note = _functional_note(bn)
        runs.append((node.target, bn.target, act.target if act is not None else None, note))
    return runs


def _functional_note(bn: torch.fx.Node) -> str:
    """The report's note when the BN's sole user is a functional activation (F.relu, torch.sigmoid,
    ``x.relu()``, …): the call is in the module's forward, which convert does not rewrite."""
    users = list(bn.users)
    if len(users) != 1:
        return ""
    user = users[0]
    if user.op == "call_function" and user.target in activations.FUNCTIONAL:
        name = getattr(user.target, "__name__", str(user.target))
    elif user.op == "call_method" and user.target in activations.FUNCTIONAL_METHODS:
        name = f"Tensor.{user.target}"
    else:
        return ""
    return f"; functional activation {name}: conv+bn fused, activation left as is (in the forward's code)"


def _fx_pass(walker: _Walker, module: nn.Module, path: str, shared: set[int]) -> None:
    """Fuse conv → BN (→ activation) runs anywhere, by data flow; recurse where tracing fails."""
    if isinstance(module, FUSED_TYPES):
        return
    runs = _fx_runs(module)
    if runs is None:
        for name, child in module.named_children():
            _fx_pass(walker, child, _join(path, name), shared)
        return
    for conv_path, bn_path, act_path, note in runs:
        conv, bn = module.get_submodule(conv_path), module.get_submodule(bn_path)
        act = module.get_submodule(act_path) if act_path else None
        full = _join(path, conv_path)
        if any(full.startswith(p + ".") for p in walker.excluded):
            continue
        if full in walker.planned or any(full.startswith(p + ".") for p in walker.planned):
            continue  # report(): a block or stem pattern already says what convert makes of it
        if any(id(m) in shared for m in (conv, bn, act) if m is not None):
            walker.report.add(full, conv, "left", "module is used at more than one place in the model")
            continue
        reason = conv_fold_reason(conv) or bn_fold_reason(bn)
        if reason is None and not walker.allowed(conv, full):
            reason = "excluded by filter_fn"
        if reason:
            walker.report.add(full, conv, "left", reason)
            continue
        if not walker.apply:
            walker.unapplied(full, conv, "FusedConvBNAct2d")
            continue
        new = FusedConvBNAct2d.from_modules(conv, bn, act)
        new._fastres_name = full
        new.__dict__["_fastres_act_note"] = note
        detail = f"{_parts(new)} (found by torch.fx){note}"
        walker.report.add(full, conv, "FusedConvBNAct2d", detail, convs=1)
        for sub, replacement in ((conv_path, new), (bn_path, new.folded_bn), (act_path, new.folded_act)):
            if sub:
                parent, _, name = sub.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, name, replacement)


def _shared_modules(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _count_convs(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


def convert(
    model: nn.Module,
    *,
    inplace: bool = False,
    filter_fn: FilterFn | None = None,
    verbose: bool = False,
    use_fx: bool = True,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Return ``model`` with its ResNet parts swapped for fused modules (a copy unless ``inplace``).

    ``filter_fn(module, fqn) -> bool`` chooses which candidates to swap. The original model is
    untouched unless ``inplace=True``. ``verbose=True`` prints the report table. ``use_fx``: also
    find conv → BN (→ activation) runs by data flow with torch.fx, in any module it can trace.
    ``example_input``: run ``fastres.warmup`` with it, so every kernel is compiled and every fold
    made before the first real forward.

    >>> fast = fastres.convert(torchvision.models.resnet50().eval())     # doctest: +SKIP
    >>> print(fastres.report(fast))                                      # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    walker = _Walker(filter_fn, apply=True)
    walker.root = model
    if BasicBlock is not None and isinstance(model, (BasicBlock, Bottleneck)):
        raise ValueError(
            "fastres.convert: pass the model that contains the block, or use "
            "FusedBasicBlock/FusedBottleneck.from_module(block) directly"
        )
    walker.visit(model, "")
    if use_fx:
        _fx_pass(walker, model, "", _shared_modules(model))
    walker.report.convs_total = _count_convs(model)
    if verbose:
        print(walker.report)
    if example_input is not None:
        from fastres.warm import warmup

        warmup(model, example_input, verbose=verbose)
    return model


def report(model: nn.Module, example_input: torch.Tensor | None = None) -> Report:
    """What is fused in ``model`` and what was left, and why (a dry run of the matcher). With
    ``example_input`` (the model runs once on it), each fused entry also names the tactic of each of its
    conv launches at that input's batch, dtype and device, as the lookup picks it (tuned tables, then
    ``FASTRES_TACTICS`` and the default): ``fastres.tuning.layer_tactics``."""
    walker = _Walker(None, apply=False)
    walker.root = model
    walker.visit(model, "")
    _fx_pass(walker, model, "", _shared_modules(model))
    walker.report.convs_total = _count_convs(model)
    if example_input is not None:
        from fastres.tuning import layer_tactics

        tactics = layer_tactics(model, example_input)
        for e in walker.report.entries:
            if e.result == "left" and not e.detail.startswith("fusable"):
                continue  # runs as it is: no fastres launch
            own = [(p[len(e.path) + 1 :] or p, t[0]) for p, t in tactics.items() if p == e.path]
            own += [(p[len(e.path) + 1 :], t[0]) for p, t in tactics.items() if p.startswith(e.path + ".")]
            if own:
                e.detail += "; tactic " + ", ".join(t if p == e.path else f"{p} {t}" for p, t in own)
    return walker.report
