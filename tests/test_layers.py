"""Imports point downward (DESIGN.md, Layers): no kernel-family module imports the tuner, the tactic
choice or the tables; ``kernels/tuning.py`` and ``kernels/tactics.py`` sit above them and hand them
their configs.

Checked two ways, so that neither a lazy import inside a function nor an import spelled differently
slips through: the source of every kernels/*.py (every ``import`` statement, at any depth), and a fresh
interpreter that imports every kernel family and finds the tuner not loaded.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
# The layer above the kernel families; everything else in kernels/ is a family or a shared helper of one.
ABOVE = {"tuning", "tactics"}


def kernel_family_files() -> list[Path]:
    files = sorted(p for p in KERNELS.glob("*.py") if p.stem not in ABOVE | {"__init__"})
    assert {"conv", "tma_gemm", "pool"} <= {p.stem for p in files}
    return files


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, anywhere in ``source`` (function bodies
    included), as the last dotted part and each imported name: ``from . import tuning`` gives
    {"", "tuning"}, ``import fastres.kernels.tuning as t`` gives {"tuning"}."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.rsplit(".", 1)[-1] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").rsplit(".", 1)[-1])
            names |= {alias.name for alias in node.names}
    return names


def test_the_check_sees_lazy_and_dotted_imports():
    """The detector itself: an import inside a function, a relative and an absolute one are all seen."""
    assert "tuning" in imported_modules("def f():\n    from . import tuning\n")
    assert "tuning" in imported_modules("import fastres.kernels.tuning as t\n")
    assert "tactics" in imported_modules("from fastres.kernels.tactics import choose\n")
    assert "tuning" not in imported_modules("from .conv import ConvConfig\n")


@pytest.mark.parametrize("path", kernel_family_files(), ids=lambda p: p.name)
def test_kernel_family_imports_neither_the_tuner_nor_the_tactic_choice(path):
    source = path.read_text()
    found = imported_modules(source) & ABOVE
    assert not found, f"kernels/{path.name} imports {sorted(found)}: the config comes from the layer above"
    for setting in ("FASTRES_CONFIG_DIR", "FASTRES_CACHE_DIR", "FASTRES_AUTOTUNE"):
        assert setting not in source, f"kernels/{path.name} reads {setting}: that is kernels/tuning.py's job"


def test_importing_every_kernel_family_loads_no_tuner():
    names = [f"fastres.kernels.{p.stem}" for p in kernel_family_files()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules\n"
        f"    if m.startswith('fastres.kernels.') and m.rsplit('.', 1)[-1] in {sorted(ABOVE)!r})\n"
        "print('LOADED', loaded)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
