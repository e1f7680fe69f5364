"""Optional dependencies of the tests: skipped where an extra is not installed, a failure where
it must be (``.ci/run`` exports ``HPCDDF_REQUIRE_<EXTRA>=1`` for every extra it installs).

``np = need("numpy", "science")`` at the top of a test module (or in a test) imports the module,
or skips with the install command, or, under ``HPCDDF_REQUIRE_SCIENCE=1``, fails with one line
naming what is missing. The extra must be the one of pyproject.toml that declares the module's
distribution (tests/unit/test_test_dependencies.py checks every call).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

# import name -> distribution name, where the two differ (pyproject.toml names distributions)
DISTRIBUTIONS = {
    "casacore": "python-casacore",
    "spectral_cube": "spectral-cube",
    "radio_beam": "radio-beam",
    "xdist": "pytest-xdist",
}


def require_var(extra: str) -> str:
    """The variable that makes a missing ``extra`` a failure: ``HPCDDF_REQUIRE_PHANGS``."""
    return f"HPCDDF_REQUIRE_{extra.upper()}"


def distribution_of(module: str) -> str:
    """The distribution that installs ``module`` (its top-level package)."""
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top)


def missing(var: str, why: str) -> NoReturn:
    """Skip (the whole module when called at its top) because ``why``; or, where ``var=1`` says
    this must be here, fail with one line."""
    if os.environ.get(var) == "1":
        pytest.fail(f"{why} (required here: {var}=1)", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def need(module: str, extra: str) -> ModuleType:
    """``module``, imported; else skip (the whole module when called at its top), or fail when
    ``HPCDDF_REQUIRE_<EXTRA>=1``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = exc  # outside the handler below: the failure is one line, no chained traceback
    missing(require_var(extra), f"{module} does not import ({error}); pip install -e '.[{extra}]'")
