"""The test suite's own rules: what the tests import is declared in pyproject.toml, an optional
dependency is skipped only where its extra is not required (tests/_require.py), and a skip
fails a `.ci/run` run unless tests/conftest.py's allowlist explains it."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import conftest
from tests._require import distribution_of, need, require_var

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CI_RUN = (REPO / ".ci" / "run").read_text()


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normal(re.match(r"\s*([A-Za-z0-9._-]+)", req).group(1))


def _extras() -> dict[str, set[str]]:
    """extra -> the distributions it declares; "" for the core dependencies."""
    opt = PYPROJECT["project"]["optional-dependencies"]
    return {"": {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]},
            **{extra: {_requirement_name(r) for r in reqs} for extra, reqs in opt.items()}}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions that install ``module`` (installed metadata first, else the name)."""
    top = module.split(".")[0]
    found = _installed().get(top) or [distribution_of(top)]
    return {_normal(d) for d in found}


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def _need_calls() -> list[tuple[str, str, str]]:
    """(file, module, extra) of every ``need(MODULE, EXTRA)`` call in the tests (but the calls
    here, which test need() itself)."""
    calls = []
    for path in _test_files():
        if path == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "need":
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                args += [k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)]
                assert len(args) == 2, f"{path}:{node.lineno}: need() with literal module and extra"
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", *args))
    return calls


def _imported_modules() -> dict[str, str]:
    """Top-level module -> a file:line that imports it, for every absolute import in tests/."""
    found: dict[str, str] = {}
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(REPO)}:{node.lineno}")
    return found


# ------------------------------------------------------------------ what the tests import

def test_every_module_the_tests_import_is_declared() -> None:
    declared = set().union(*_extras().values())
    modules = _imported_modules()
    modules.update((module.split(".")[0], where) for where, module, _ in _need_calls())
    third_party = {m: w for m, w in modules.items()
                   if m not in sys.stdlib_module_names and m not in ("__future__", "hpcddf", "tests")}
    assert {"pytest", "numpy", "psutil", "xdist"} <= set(third_party), sorted(third_party)
    undeclared = {m: w for m, w in third_party.items() if not _distributions(m) & declared}
    assert not undeclared, f"imported by the tests but declared by no extra of pyproject.toml: {undeclared}"


def test_every_need_names_the_extra_that_declares_the_module() -> None:
    extras = _extras()
    calls = _need_calls()
    assert {m for _, m, _ in calls} >= {"spectral_cube", "casacore.tables"}, calls
    for where, module, extra in calls:
        assert extra in extras and extra, f"{where}: {extra!r} is not an extra of pyproject.toml"
        assert _distributions(module) & extras[extra], f"{where}: the {extra} extra does not declare {module}"


def test_ci_requires_every_extra_it_installs_and_no_unexplained_skips() -> None:
    (installed,) = re.findall(r"pip install -q -e '\.\[([a-z,]+)\]'", CI_RUN)
    exported = set(re.findall(r"\b(HPCDDF_[A-Z_]+)=1\b", "\n".join(
        line for line in CI_RUN.splitlines() if line.startswith("export "))))
    for extra in installed.split(","):
        if extra != "dev":
            assert require_var(extra) in exported, (extra, sorted(exported))
    assert {require_var(extra) for _, _, extra in _need_calls()} <= exported
    assert conftest.NO_UNEXPLAINED_SKIPS in exported


# ------------------------------------------------------------------ need()

def test_need_returns_the_module() -> None:
    assert need("json", "dev") is sys.modules["json"]


def test_need_skips_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCDDF_REQUIRE_PHANGS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"hpcddf_no_such_module does not import .*"
                                                    r"pip install -e '\.\[phangs\]'"):
        need("hpcddf_no_such_module", "phangs")


def test_need_fails_in_one_line_where_the_extra_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCDDF_REQUIRE_PHANGS", "1")
    with pytest.raises(pytest.fail.Exception) as exc:
        need("hpcddf_no_such_module", "phangs")
    message = str(exc.value)
    assert "\n" not in message and not exc.value.pytrace
    assert "HPCDDF_REQUIRE_PHANGS=1" in message and "hpcddf_no_such_module" in message, message


# ------------------------------------------------------------------ the skip allowlist

def test_only_skips_off_the_allowlist_are_unexplained() -> None:
    skipped = {"tests/b.py::test_x": "no GPU", "tests/a.py": "no casacore", "tests/c.py::test_y[1]": "r"}
    allowed = {"tests/b.py::test_x": "machines without a GPU", "tests/d.py::test_z": "never skipped"}
    assert conftest.unexplained_skips(skipped, allowed) == [("tests/a.py", "no casacore"),
                                                            ("tests/c.py::test_y[1]", "r")]
    assert conftest.unexplained_skips(skipped, {**allowed, "tests/a.py": "x", "tests/c.py::test_y[1]": "y"}) == []
    assert conftest.unexplained_skips({}, allowed) == []


def test_skip_reason_is_the_message_without_its_prefix() -> None:
    report = SimpleNamespace(longrepr=("tests/a.py", 3, "Skipped: no casacore"))
    assert conftest.skip_reason(report) == "no casacore"
    assert conftest.skip_reason(SimpleNamespace(longrepr="odd")) == "odd"


def test_the_allowlist_names_existing_tests_with_reasons() -> None:
    for nodeid, reason in conftest.SKIP_ALLOWLIST.items():
        assert (REPO / nodeid.split("::")[0]).is_file(), nodeid
        assert reason.strip(), f"{nodeid}: no reason"


INNER = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("nothing to see")

@pytest.mark.xfail(reason="known")
def test_xfails():
    assert False
'''


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_run_with_an_unexplained_skip_fails_only_under_the_variable(tmp_path: Path, workers: list[str]) -> None:
    """A real pytest run with tests/conftest.py as its plugin: a skipped test and a skipped
    module (need() of a missing module) are listed; with the variable the run fails, and an
    xfail is not a skip."""
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "test_inner_module.py").write_text(
        "from tests._require import need\nneed('hpcddf_no_such_module', 'phangs')\n\ndef test_never():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCDDF_")}
    env["PYTHONPATH"] = str(REPO)

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest",
                               "-p", "no:cacheprovider", *workers], cwd=tmp_path,
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)
    strict = run(HPCDDF_NO_UNEXPLAINED_SKIPS="1")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "2 skip(s) HPCDDF_NO_UNEXPLAINED_SKIPS=1: these fail the run" in strict.stdout, strict.stdout
    assert "test_inner.py::test_skips: nothing to see" in strict.stdout
    assert "test_inner_module.py: hpcddf_no_such_module does not import" in strict.stdout
    assert "test_xfails" not in strict.stdout.split("skips ====")[-1]
    assert "allowed skips (SKIP_ALLOWLIST in tests/conftest.py)" in strict.stdout
    if not workers:
        lenient = run()
        assert lenient.returncode == 0, lenient.stdout + lenient.stderr
        assert "2 skip(s) not on the allowlist" in lenient.stdout, lenient.stdout
