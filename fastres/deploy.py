"""Deploying a converted model: ONNX, and a ``.pt2`` package compiled with AOTInductor.

* ``export_onnx(model, args, f, **kw)``: ``torch.onnx.export`` (either exporter) of a converted model
  as a standard ONNX graph. The exporter runs on ``original_computation(model)``: the same tensors
  under their original module types, so the graph holds the original convs, BatchNorms and ReLUs
  (which ONNX runtimes fuse themselves) and no ``fastres::`` op.
* ``export(model, example_input, path)``: ``torch.export`` of the converted model compiled by
  AOTInductor into a package that ``torch._inductor.aoti_load_package`` loads in a process that never
  imports fastres. On CUDA the ``fastres::`` ops are ``triton_op``s, so the package holds the Triton
  kernels; elsewhere (the CPU path, or Triton's interpreter, where the ops are opaque) ``decompose``
  first replaces every ``fastres::`` op by its PyTorch computation on the folded weights.

The module is ``fastres.deploy``, not ``fastres.export``: a submodule named like the function would
shadow it once imported (DESIGN.md, Layers).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastres import (
    activations,
    ops,  # noqa: F401  (registers torch.ops.fastres.*, which decomposition_table names)
)
from fastres._instance import copy_sharing_tensors, restored
from fastres.fold import FoldCache
from fastres.kernels._common import INTERPRET
from fastres.modules import FUSED_TYPES, _PassThroughWhenFused

__all__ = ["decompose", "export", "export_onnx", "original_computation", "unfused"]

# Attributes a fastres module adds to the module it replaced (unregistered references to the norm,
# activation, pool and owner it fuses with, fold caches, the replaced type, the report's name).
_PRIVATE = ("_bn", "_act", "_pool", "_owner", "_fold", "_folds", "_source_cls", "_fastres_name")


def _original_type(module: nn.Module) -> type:
    """The type a fastres module replaced."""
    source = module.__dict__.get("_source_cls")
    if source is not None:
        return source
    if isinstance(module, _PassThroughWhenFused):
        # FoldedBatchNorm2d(_PassThroughWhenFused, nn.BatchNorm2d) etc.: the first base that is not ours.
        for cls in type(module).__mro__:
            if issubclass(cls, nn.Module) and not issubclass(cls, _PassThroughWhenFused):
                return cls
    raise TypeError(f"fastres: do not know which module type {type(module).__name__} replaced")


def _is_private(key: str, value) -> bool:
    return (
        key in _PRIVATE
        or key.startswith("_fastres")
        or isinstance(value, (FoldCache, nn.Module))  # registered children live in _modules, not here
        or type(value).__module__.split(".")[0] == "fastres"
    )


def _is_cache(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_is_cache(v) for v in value.values())
    if isinstance(value, (nn.Module, type)):
        return False  # the norm / activation / owner a fused module refers to are in the tree too
    return isinstance(value, FoldCache) or type(value).__module__.split(".")[0] == "fastres"


def _unfuse_in_place(model: nn.Module) -> None:
    for m in list(model.modules()):
        if isinstance(m, FUSED_TYPES):
            cls = _original_type(m)
            for key in [k for k, v in m.__dict__.items() if _is_private(k, v)]:
                del m.__dict__[key]
            m.__class__ = cls


def _copy_sharing_tensors(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` sharing its parameters and buffers, without the fold caches (their
    tensors are not copied either), or None when the model cannot be deep-copied."""
    caches = [
        value
        for m in model.modules()
        if isinstance(m, FUSED_TYPES)
        for key, value in m.__dict__.items()
        # Fold caches and plans (dropped from the copy anyway). Not strings or other atoms: the memo is
        # keyed by identity, and an interned name is also a key of some _modules.
        if _is_private(key, value) and _is_cache(value)
    ]
    return copy_sharing_tensors(model, caches)


def unfused(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every fastres module is back to the type it replaced (``Conv2d``,
    ``BatchNorm2d``, ``ReLU``, torchvision's blocks, …), sharing every parameter and buffer: the same
    ``state_dict`` keys and tensors, the original computation. ``model`` is left as it is.

    >>> from fastres.deploy import unfused
    >>> plain = unfused(fast)   # for a tool that must see standard modules    # doctest: +SKIP
    """
    new = _copy_sharing_tensors(model)
    if new is None:
        raise TypeError(
            f"fastres: {type(model).__name__} cannot be deep-copied; use "
            "`with original_computation(model) as m:` (from fastres.deploy) instead"
        )
    _unfuse_in_place(new)
    return new


@contextlib.contextmanager
def original_computation(model: nn.Module) -> Iterator[nn.Module]:
    """A module that computes what ``model`` computed before ``fastres.convert``: ``unfused(model)``,
    or, when the model cannot be deep-copied, ``model`` itself with its fastres modules turned back
    into their original types until the block ends (every attribute of every submodule is put back
    on exit, whatever happened inside)."""
    new = _copy_sharing_tensors(model)
    if new is not None:
        _unfuse_in_place(new)
        yield new
        return
    with restored(model):
        _unfuse_in_place(model)
        yield model


# --------------------------------------------------------------------------------------------
# ONNX


def export_onnx(model: nn.Module, args, f=None, **kwargs):
    """``torch.onnx.export(model, args, f, **kwargs)`` for a converted model: a standard ONNX graph
    (the original convs, BatchNorms, ReLUs and pools; no ``fastres::`` op, no custom domain), with
    either exporter (``dynamo=False``: TorchScript-based; ``dynamo=True``: torch.export-based, needs
    ``onnxscript``). Returns what ``torch.onnx.export`` returns. ``model`` is left as it is.

    >>> fastres.export_onnx(fast.eval(), (x,), "resnet.onnx", dynamo=True)   # doctest: +SKIP
    """
    args = args if isinstance(args, tuple) else (args,)
    with original_computation(model) as plain:
        return torch.onnx.export(plain, args, f, **kwargs)


# --------------------------------------------------------------------------------------------
# torch.export / AOTInductor

_CL = torch.channels_last


def _conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, act, act_a, act_b):
    y = F.conv2d(x.contiguous(memory_format=_CL), weight, bias.to(x.dtype), stride, padding, dilation, groups)
    if residual is not None:
        y = (y + residual).to(y.dtype)  # as eager's in-place `out += identity`
    y = activations.apply(y, act, act_a, act_b)
    return y.contiguous(memory_format=_CL)


def _conv_shortcut_bias_act(
    x, weight, bias, shortcut_x, shortcut_weight, stride, padding, dilation, groups, shortcut_stride, act,
    act_a, act_b,
):
    shortcut = F.conv2d(shortcut_x.contiguous(memory_format=_CL), shortcut_weight, None, shortcut_stride)
    return _conv_bias_act(x, weight, bias, shortcut, stride, padding, dilation, groups, act, act_a, act_b)


def _max_pool2d(x, kernel_size, stride, padding):
    return F.max_pool2d(x, kernel_size, stride, padding).contiguous(memory_format=_CL)


def _global_avg_pool(x):
    return x.mean(dim=(2, 3), keepdim=True).contiguous(memory_format=_CL)


def decomposition_table() -> dict:
    """Each ``fastres::`` op mapped to its PyTorch computation (what the ops compute on the CPU path)."""
    lib = torch.ops.fastres
    return {
        lib.conv_bias_act.default: _conv_bias_act,
        lib.conv_shortcut_bias_act.default: _conv_shortcut_bias_act,
        lib.max_pool2d.default: _max_pool2d,
        lib.global_avg_pool.default: _global_avg_pool,
    }


def fastres_nodes(ep: torch.export.ExportedProgram) -> list[str]:
    """The targets of every ``fastres::`` op call in ``ep``'s graph (its submodules included)."""
    return [
        str(node.target)
        for gm in ep.graph_module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for node in gm.graph.nodes
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "fastres"
    ]


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` in core ATen with every ``fastres::`` op replaced by its PyTorch computation (conv with the
    folded weights, bias, residual, ReLU; the pools): a graph that runs without fastres."""
    table = torch.export.default_decompositions()
    table.update(decomposition_table())
    out = ep.run_decompositions(table)
    left = fastres_nodes(out)
    if left:
        raise RuntimeError(f"fastres: ops left after decomposition: {sorted(set(left))}")
    return out


def export(
    model: nn.Module,
    example_input,
    path: str | os.PathLike,
    *,
    dynamic_shapes=None,
    inductor_configs: dict | None = None,
) -> str:
    """Compile a converted eval model into an AOTInductor package at ``path`` (a ``.pt2`` file) and
    return its path. A fresh process runs it without fastres::

        runner = torch._inductor.aoti_load_package(path)
        y = runner(x)

    ``example_input``: a tensor or a tuple of arguments (on the device the package is for).
    ``dynamic_shapes`` goes to ``torch.export.export``. The weights are frozen into the package
    (``inductor_configs`` defaults to ``{"freezing": True}``, which also folds BatchNorm into the
    weights at compile time; pass ``{"freezing": False}`` to keep them as loadable constants; the
    fold then runs on every call). On CUDA the package holds fastres's Triton kernels; on the CPU
    (and under Triton's interpreter) the folded PyTorch computation.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("fastres.export: call model.eval() first (the package is an inference graph)")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    on_cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
    if INTERPRET or not on_cuda:
        ep = decompose(ep)
    configs = {"freezing": True, **(inductor_configs or {})}
    return torch._inductor.aoti_compile_and_package(
        ep, package_path=os.fspath(path), inductor_configs=configs
    )
