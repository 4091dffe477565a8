"""Working on a user's module without changing it: a copy that shares its tensors, or, where a module
cannot be copied, every submodule's type and attributes put back afterwards. Used by the fx pass of
``convert``/``report`` and by ``fastres.deploy``'s original-computation view."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable, Iterator

from torch import nn


def copy_sharing_tensors(module: nn.Module, also_shared: Iterable[object] = ()) -> nn.Module | None:
    """A deep copy of ``module`` that shares its parameters and buffers (no tensor data is copied), and
    maps each object in ``also_shared`` to None in the copy; None when the module cannot be deep-copied."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    for obj in also_shared:
        memo[id(obj)] = None
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - modules holding locks, handles, generators …
        return None


@contextlib.contextmanager
def restored(module: nn.Module) -> Iterator[nn.Module]:
    """Put back the type and every attribute of every submodule as they were on entry, whatever runs
    inside (a trace that sets attributes, types swapped for a while)."""
    saved = []
    for m in module.modules():
        registries = {k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers", "_modules")}
        saved.append((m, m.__class__, dict(m.__dict__), registries))
    try:
        yield module
    finally:
        for m, cls, attrs, registries in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for key, contents in registries.items():
                m.__dict__[key].clear()
                m.__dict__[key].update(contents)
