"""CUDA graphs for inference: capture a model's forward once per input shape, replay it afterwards.

A replay launches every kernel of the forward with one call, which removes the Python and launch
overhead that dominates small batches. Follows the recipe of PyTorch's CUDA graphs notes: warm-up
iterations on a side stream (kernels compiled, folds made, allocator settled), capture into a
``torch.cuda.CUDAGraph``, then for each call copy the input into the static input buffer and replay.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fastres.fold import FoldCache

# Warm-up forwards before a capture: the first compiles kernels and folds; the second runs with
# everything cached, as the capture will (the PyTorch notes use a few on the side stream).
WARMUP_ITERS = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static input buffers the graph reads
    output: object  # static output (a tensor or a structure of them) the graph writes
    keep_alive: tuple[torch.Tensor, ...]  # folded weights the graph reads, held past any refold


def _fold_tensors(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Every folded weight and bias the model's fold caches hold now (the graph reads their memory)."""
    out = []
    for m in model.modules():
        caches = list(vars(m).get("_folds", {}).values()) + [vars(m).get("_fold")]
        for cache in caches:
            value = getattr(cache, "_value", None) if isinstance(cache, FoldCache) else None
            if value is not None:
                out.extend(t for t in value if isinstance(t, torch.Tensor))
    return tuple(out)


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


class _WeightWatch:
    """What a captured graph depends on, in a form that is cheap to check before every replay.

    At creation: every ``_parameters``, ``_buffers`` and ``_modules`` dict of the module tree, the objects
    they hold, and each tensor's version and data pointer. ``unchanged()`` compares all of them again,
    with C-level loops (``map`` over the dicts and tensors) instead of a ``parameters()`` walk: a module,
    parameter or buffer replaced anywhere in the tree, an in-place write (``load_state_dict``,
    ``mul_``, optimizer steps) or a move (``.to()``, ``param.data = ...``) makes it False. Measured on
    a loaded 2-core CPU host for a converted ResNet-50 (320 tensors), best of 5 x 2000: the walk it
    replaces 545-890 µs per check, this 130-220 µs (three runs each). Not seen, as before: writes
    through ``param.data`` (a version counter of its own)
    and in-place writes to inference tensors (none at all).
    """

    __slots__ = ("dicts", "values", "tensors", "versioned", "versions", "ptrs")

    def __init__(self, module: nn.Module) -> None:
        mods = list(module.modules())
        self.dicts = tuple(d for m in mods for d in (m._parameters, m._buffers, m._modules))
        self.values = self._values()
        self.tensors = [v for v in self.values if isinstance(v, torch.Tensor)]
        self.versioned = [t for t in self.tensors if not t.is_inference()]  # inference tensors: no version
        self.versions = list(map(_VERSION, self.versioned))
        self.ptrs = list(map(_DATA_PTR, self.tensors))

    def _values(self) -> list:
        return list(chain.from_iterable(map(dict.values, self.dicts)))

    def unchanged(self) -> bool:
        values = self._values()
        return (
            len(values) == len(self.values)
            and all(map(operator.is_, values, self.values))
            and list(map(_VERSION, self.versioned)) == self.versions
            and list(map(_DATA_PTR, self.tensors)) == self.ptrs
        )


class CUDAGraphModule(nn.Module):
    """``module`` run through CUDA graphs: one capture per (input shapes, dtypes, device), then replays.

    * Inference only: the module must be in eval mode and no gradient may be needed (run under
      ``torch.inference_mode()`` / ``torch.no_grad()``, or with parameters that do not require grad).
    * Returns a **clone** of the static output by default, safe to keep across calls. With
      ``clone_output=False`` it returns the static output itself: no copy, but the next call with the
      same input shape overwrites it.
    * Weights: before each replay the parameters, buffers and submodules, their versions and addresses
      are compared to those at capture (``check_weights``; a few µs per ten tensors on the host,
      see ``_WeightWatch``); a change (``load_state_dict``, an optimizer step, ``.to()``, a module or
      parameter replaced) drops every graph, and the next call refolds and captures again. Writes
      through ``param.data`` are not seen: call ``reset()`` after them (and ``fastres.refold`` for the
      fold).
    * ``state_dict`` keys gain the prefix ``module.``; load checkpoints into ``.module``.

    >>> fast = fastres.cuda_graphs(fastres.convert(model.eval().cuda().half()))   # doctest: +SKIP
    >>> with torch.inference_mode():                                             # doctest: +SKIP
    ...     y = fast(x)          # first call for this shape: warm-up and capture; later calls replay
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        clone_output: bool = True,
        check_weights: bool = True,
        warmup_iters: int = WARMUP_ITERS,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"CUDAGraphModule: expected an nn.Module, got {type(module).__name__}")
        self.module = module
        self.clone_output = clone_output
        self.check_weights = check_weights
        self.warmup_iters = max(1, int(warmup_iters))
        self.__dict__["_graphs"] = {}
        self.__dict__["_watch"] = None

    @property
    def num_graphs(self) -> int:
        """How many graphs are captured now (one per input shape, dtype and device seen)."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph; the next call captures again."""
        self._graphs.clear()
        self.__dict__["_watch"] = None

    def _check(self, inputs: tuple) -> None:
        if not inputs:
            raise TypeError("CUDAGraphModule: expected at least one tensor input")
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"CUDAGraphModule: input {i} is a {type(t).__name__}; only tensor positional inputs "
                    "can be copied into a captured graph"
                )
        if self.module.training:  # what .train() / .eval() on the model set
            raise RuntimeError(
                "CUDAGraphModule captures inference only, and the module is in train mode "
                "(batch statistics, running-stat updates): call .eval() first"
            )
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in inputs) or any(p.requires_grad for p in self.module.parameters())
        ):
            raise RuntimeError(
                "CUDAGraphModule: a replayed graph records no autograd, and gradients are enabled with "
                "tensors that require grad; run under torch.inference_mode() or torch.no_grad() "
                "(or call requires_grad_(False) on the model)"
            )
        device = inputs[0].device
        for i, t in enumerate(inputs):
            if t.device.type != "cuda":
                raise ValueError(
                    f"CUDAGraphModule: input {i} is on {t.device}; CUDA graphs need CUDA tensors "
                    "(call the wrapped .module directly on the CPU)"
                )
            if t.device != device:
                raise ValueError(f"CUDAGraphModule: inputs on {device} and {t.device}; use one device")

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        device = inputs[0].device
        # Outside inference mode: the static buffers must accept copy_ in any later mode.
        with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad():
            static = tuple(torch.empty_like(t) for t in inputs)
            for s, t in zip(static, inputs, strict=True):
                s.copy_(t)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self.module(*static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.module(*static)
        return _Captured(graph, static, output, _fold_tensors(self.module))

    def forward(self, *inputs: torch.Tensor):
        self._check(inputs)
        if self.check_weights:
            watch = self._watch
            if watch is None or not watch.unchanged():
                self._graphs.clear()
                self.__dict__["_watch"] = _WeightWatch(self.module)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs)
        for s, t in zip(captured.inputs, inputs, strict=True):
            s.copy_(t)
        captured.graph.replay()
        if not self.clone_output:
            return captured.output
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.output)

    def extra_repr(self) -> str:
        return f"graphs={len(self._graphs)}, clone_output={self.clone_output}"


def cuda_graphs(module: nn.Module, **kwargs) -> CUDAGraphModule:
    """``CUDAGraphModule(module, **kwargs)``: replay ``module``'s forward as CUDA graphs.

    >>> fast = fastres.cuda_graphs(fastres.convert(model.eval().cuda()))     # doctest: +SKIP
    """
    return CUDAGraphModule(module, **kwargs)
