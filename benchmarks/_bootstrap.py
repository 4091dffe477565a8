"""Make ``fastres`` importable from this source tree when it is not installed.

The package maps the repo's ``kernels/`` folder to ``fastres.kernels`` only through the install
(``[tool.setuptools.package-dir]`` in pyproject.toml). On a machine where nothing may be installed
(``gpu_check.sh`` runs with the machine's own python3, torch and triton), ``ensure_fastres()`` puts
the repo root on ``sys.path`` and registers ``repo/kernels`` as the ``fastres.kernels`` subpackage
through importlib, exactly where the install would put it. An installed fastres (e.g. the editable
install in .venv) is used as is.

``ensure_fastres()`` imports triton (through fastres.kernels): set TRITON_INTERPRET before calling it
when the interpreter is wanted. As a pytest plugin (``python3 -m pytest -p benchmarks._bootstrap``,
as gpu_check.sh runs the GPU tests) it does the same in ``pytest_configure``, after the test
conftest has chosen the interpreter or not.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ensure_fastres() -> str:
    """Import ``fastres`` and ``fastres.kernels``; return how they were found ("installed" or "source")."""
    try:
        import fastres.kernels  # noqa: F401

        return "installed"
    except ModuleNotFoundError as e:
        if e.name not in ("fastres", "fastres.kernels"):
            raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    for name in [n for n in sys.modules if n == "fastres" or n.startswith("fastres.")]:
        if sys.modules[name] is None:  # a failed import leaves a None placeholder
            del sys.modules[name]
    import fastres

    if "fastres.kernels" not in sys.modules:
        init = REPO / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "fastres.kernels", init, submodule_search_locations=[str(init.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastres.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["fastres.kernels"]
            raise
        fastres.kernels = module
    return "source"


def pytest_configure(config):  # ``python3 -m pytest -p benchmarks._bootstrap``: fastres from source
    ensure_fastres()
