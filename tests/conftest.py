"""Shared fixtures: an isolated environment, site files with a tmp work root, a CLI runner.

Nothing here touches the user's real configuration: every test gets its own HOME,
XDG_CONFIG_HOME and HPCDDF_SITES_DIR under pytest's tmp_path, both in this process
(monkeypatch) and in the ``hpcddf`` subprocesses (``run_cli``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

pytest_plugins = [
    "tests._mariadb",  # mariadb_url: a throwaway database on the cluster's MariaDB
    "tests._phangs_chain",  # phangs_chain: the PHANGS chain on Slurm, run once for two modules
    "tests._demo",  # demo: the README's demo reduction, run once for two modules
    "tests._tier1",  # tier1: the survey's reduction of one simulated field, shared by its checks
    "tests._cputime",  # HPCDDF_TEST_CPU_LOG: CPU seconds per work unit, printed at the end
]

DATA = Path(__file__).parent / "data"
HPCDDF = Path(sys.executable).parent / "hpcddf"
# environment variables that would let the developer's own setup leak into a test
_LEAKY = ("HPCDDF_SITE", "HPCDDF_SITES_DIR", "DDF_PIPELINE_CATALOGS", "XDG_CONFIG_HOME")


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A clean environment for this process and for subprocesses: own HOME, no user sites."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    sites_dir = tmp_path / "user-sites"
    sites_dir.mkdir()
    for var in _LEAKY:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HPCDDF_SITES_DIR", str(sites_dir))
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               HPCDDF_SITES_DIR=str(sites_dir), PYTHONDONTWRITEBYTECODE="1",
               COLUMNS="400")  # long tmp paths (xdist) must not wrap in tables
    return env


@pytest.fixture
def user_sites_dir(isolated_env: dict[str, str]) -> Path:
    return Path(isolated_env["HPCDDF_SITES_DIR"])


@pytest.fixture
def work_root(tmp_path: Path) -> Path:
    root = tmp_path / "fields"
    root.mkdir()
    return root


@pytest.fixture
def observed(work_root: Path) -> Callable[..., Path]:
    """``observed("L123456", ...)``: each field's directory (under the work root, or ``root=``)
    holds one Measurement Set as a submission checks it, a directory with a ``table.dat``. For
    tests of planning and checks, which read no visibilities; returns the root."""
    def _make(*field_ids: str, root: Path | None = None) -> Path:
        base = root or work_root
        for fid in field_ids:
            ms = base / fid / f"{fid}_SB000.ms"
            ms.mkdir(parents=True, exist_ok=True)
            (ms / "table.dat").touch()
        return base
    return _make


SITE_TEMPLATE = """\
description = "test site"
scheduler = "{scheduler}"

[slurm]
max_walltime = "{walltime}"

[node]
cpus = {cpus}
mem_gb = {mem_gb}

[paths]
work_root = "{work_root}"
{extra_paths}

[fields]
pattern = "{pattern}"
"""


@pytest.fixture
def write_site(user_sites_dir: Path, work_root: Path) -> Callable[..., Path]:
    """Write ``<user sites dir>/NAME.toml`` (a valid site with a tmp work root); returns its path."""
    def _write(name: str = "testsite", *, scheduler: str = "local", walltime: str = "02:00:00",
               cpus: int = 8, mem_gb: int = 32, pattern: str = r"L[0-9]{5,7}",
               catalog_dir: str | None = None, root: Path | None = None, text: str | None = None,
               directory: Path | None = None) -> Path:
        path = (directory or user_sites_dir) / f"{name}.toml"
        if text is None:
            extra = f'catalog_dir = "{catalog_dir}"' if catalog_dir else ""
            text = SITE_TEMPLATE.format(scheduler=scheduler, walltime=walltime, cpus=cpus,
                                        mem_gb=mem_gb, work_root=root or work_root,
                                        extra_paths=extra, pattern=pattern.replace("\\", "\\\\"))
        path.write_text(text)
        return path
    return _write


@pytest.fixture
def site_file(write_site: Callable[..., Path]) -> Path:
    """A valid site "testsite" (local scheduler, 8 cpus, 32 GB, 2 h) with a tmp work root."""
    return write_site()


def _tree(root: Path) -> list[str]:
    """Every path under ``root`` (relative), to check that nothing was written."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(args: tuple[str, ...], env: dict[str, str], cwd: Path | None, plain_user: bool,
         timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HPCDDF), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          preexec_fn=_drop_file_permission_override if plain_user else None)


@pytest.fixture
def run_cli(isolated_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``hpcddf`` executable: ``run_cli("sites", "show", "local", env={...})``."""
    assert HPCDDF.exists(), f"the hpcddf entry point is not installed next to {sys.executable}"

    def _cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
             cwd: Path | None = None, plain_user: bool = False,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        full = dict(isolated_env)
        full.update(env or {})
        return _run(args, full, cwd or tmp_path, plain_user, timeout)
    return _cli


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str,
                          code: int = 2) -> str:
    """The CLI failed with ``code``, printed one error line naming each needle, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("hpcddf: error: "), line
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    assert proc.stdout == "", proc.stdout
    return line


def _drop_file_permission_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so even root is refused files its mode bits refuse (the exec'd program cannot get them)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def tree() -> Callable[[Path], list[str]]:
    """``tree(root)``: every path under root, to check that nothing was written."""
    return _tree


@pytest.fixture
def cli_error() -> Callable[..., str]:
    """``cli_error(proc, *needles, code=2)``: one ``hpcddf: error:`` line naming each needle."""
    return _assert_one_line_error


@pytest.fixture
def plain_user() -> bool:
    """Pass ``plain_user=...`` to run_cli so that file permissions apply even when we are root.

    Root without CAP_SETPCAP (some containers) cannot drop the override: the tests that need
    it skip there, which ``.ci/run`` (HPCDDF_NO_UNEXPLAINED_SKIPS=1, below) makes a failure."""
    if os.geteuid() != 0:
        return False
    try:
        subprocess.run(["true"], preexec_fn=_drop_file_permission_override, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({exc}): "
                    "run the tests as a plain user or with CAP_SETPCAP")
    return True


# ------------------------------------------------------------------ work units for pytest-xdist
# `.ci/run` runs the suite on three workers (`-n 3 --dist loadscope --no-loadscope-reorder`). A
# work unit goes to one worker whole: every module is a unit (its module fixtures are computed
# once), modules that must not run beside each other share one (SHARED_UNITS), and units start
# heaviest first, so that the workers finish together (longest-processing-time-first). The
# machine has two cores: two workers take the CPU-bound units, the third those that mostly wait
# for Slurm (WAITING_UNITS), which on two workers left a core idle for ~10 minutes of each run.
# A unit not listed below is light and runs after these, in collection order.
UNIT_SECONDS = {  # wall seconds in `.ci/run` on 3 workers, 2026-12-07 (its "CPU per work unit")
    # the demo reduction, its last two stages redone on Slurm in the science image, the restarts
    "local-reduction": 1120,
    "tests/science/test_tier1_reduction.py": 1860,  # the tier1 reduction and its checks
    "tests/science/test_phangs_postprocess.py": 760,
    "tests/science/test_offsets_reduction.py": 440,
    "phangs-chain": 415,                          # the PHANGS chain on Slurm with a walltime kill
    "tests/science/test_phangs_casa.py": 320,      # the chain, the key clean mask, the cube in 3 chunks
    "tests/integration/test_slurm_engine.py": 215,
    "tests/integration/test_recovery.py": 150,  # 5 scenarios at once, a 1-min time limit
    "tests/integration/test_survey_slurm.py": 140,  # 30 fields run by tick jobs, start/stop
    "tests/integration/test_walltime_rules.py": 100,  # 5 scenarios at once, two 1-min walltimes
    "tests/science/test_phangs_continuum.py": 70,
    "tests/integration/test_phangs_chunks_slurm.py": 60,  # chunk arrays, a requeue, local
    "tests/test_survey_local.py": 40,               # six fields through survey tick/run locally
    "tests/integration/test_busy_controller.py": 40,  # 3 scenarios at once
}
# The restart tests SIGKILL DDFacet and leave /dev/shm entries of dead processes until their
# resubmit cleans them; the demo test asserts that none are left: never at the same time.
SHARED_UNITS = {
    "tests/science/test_demo_reduction.py": "local-reduction",
    "tests/science/test_restart.py": "local-reduction",
    # the Slurm reduction in the science image is compared with the demo (tests/_demo.py)
    "tests/science/test_slurm_reduction.py": "local-reduction",
    # one PHANGS chain (tests/_phangs_chain.py) serves both: on one worker it runs once
    "tests/integration/test_phangs_slurm_chain.py": "phangs-chain",
    "tests/science/test_phangs_engine.py": "phangs-chain",
}


# Units that mostly wait for Slurm (its scheduling, walltimes, requeues): under 0.2 CPU-s per
# second in `.ci/run` (tests/_cputime.py; the PHANGS chain's CASA runs in Slurm's jobs). With
# three workers or more, the last one prefers them and the others run at nice 10
# (NICE_CPU_WORKERS), so that Slurm, its jobs and these tests' timing keep the CPU they need.
WAITING_UNITS = frozenset({
    "phangs-chain",
    "tests/integration/test_slurm_engine.py",
    "tests/integration/test_recovery.py",
    "tests/integration/test_walltime_rules.py",
    "tests/integration/test_survey_slurm.py",
    "tests/integration/test_phangs_chunks_slurm.py",
    "tests/integration/test_busy_controller.py",
    "tests/integration/test_charliecloud.py",
    "tests/integration/test_held_arrays.py",
    "tests/test_local_run.py",
})
NICE_CPU_WORKERS = 10


def waiting_worker(workerid: str, workers: int) -> bool:
    """The worker that prefers WAITING_UNITS: the last of three or more (gw2 of gw0..gw2)."""
    return workers >= 3 and workerid == f"gw{workers - 1}"


def pytest_configure(config: pytest.Config) -> None:
    """A CPU-bound worker lowers its own priority, and that of every process it starts."""
    info = getattr(config, "workerinput", None)
    if info and info.get("workercount", 0) >= 3 and not waiting_worker(info["workerid"], info["workercount"]):
        os.nice(NICE_CPU_WORKERS)


def work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return SHARED_UNITS.get(path, path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heaviest work units first; the order is stable otherwise (modules stay together)."""
    order = {id(item): k for k, item in enumerate(items)}
    items.sort(key=lambda it: (-UNIT_SECONDS.get(work_unit(it.nodeid), 0), order[id(it)]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduling with our work units as the scopes (its `xdist_group` marks do
    not group under pytest 9, which no longer lets a plugin rename a test's node id)."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            """The first queued unit of the node's kind (waiting or CPU-bound), else the first."""
            waits = waiting_worker(node.gateway.id, len(self.nodes))
            kind = next((u for u in self.workqueue if (u in WAITING_UNITS) == waits), None)
            if kind is not None:
                self.workqueue.move_to_end(kind, last=False)
            super()._assign_work_unit(node)
    return WorkUnitScheduling(config, log)


# ------------------------------------------------------------------ no unexplained skips
# A skipped test is a test that did not run. Under HPCDDF_NO_UNEXPLAINED_SKIPS=1 (`.ci/run`) a
# skip fails the run unless its node id is listed here with the reason it may skip there; the
# list is printed at the end of every such run. Keep it short: a missing dependency, cluster or
# runtime is a failure in CI (HPCDDF_REQUIRE_*), not an entry here.
SKIP_ALLOWLIST: dict[str, str] = {}
NO_UNEXPLAINED_SKIPS = "HPCDDF_NO_UNEXPLAINED_SKIPS"
_skipped: dict[str, str] = {}  # node id -> skip reason, of this run (the xdist controller's)
_unexplained: list[tuple[str, str]] = []


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped report gives (its longrepr is (path, line, "Skipped: why"))."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def unexplained_skips(skipped: dict[str, str], allowed: dict[str, str]) -> list[tuple[str, str]]:
    """(node id, reason) of every skip that ``allowed`` does not list, sorted by node id."""
    return sorted((nodeid, reason) for nodeid, reason in skipped.items() if nodeid not in allowed)


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    # an xfail is reported as skipped too, but the test ran
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.setdefault(report.nodeid, skip_reason(report))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Skips of tests (in setup: a fixture or mark; in the call: pytest.skip); under xdist the
    controller gets every worker's reports."""
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Skips of whole modules at collection (``need(...)`` at a module's top); xdist forwards
    collection skips to the controller."""
    _note_skip(report)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_xdist_worker(session.config):
        return
    _unexplained[:] = unexplained_skips(_skipped, SKIP_ALLOWLIST)
    if (_unexplained and os.environ.get(NO_UNEXPLAINED_SKIPS) == "1"
            and session.exitstatus == pytest.ExitCode.OK):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """The allowlist with its reasons, and every skip not on it (a failure under the variable)."""
    if _is_xdist_worker(config):
        return
    strict = os.environ.get(NO_UNEXPLAINED_SKIPS) == "1"
    if not strict and not _unexplained:
        return
    tr = terminalreporter
    tr.section("skips")
    tr.write_line(f"allowed skips (SKIP_ALLOWLIST in tests/conftest.py): {len(SKIP_ALLOWLIST)}")
    for nodeid, reason in sorted(SKIP_ALLOWLIST.items()):
        seen = "skipped" if nodeid in _skipped else "ran or not selected"
        tr.write_line(f"  {nodeid}: {reason} ({seen})")
    if not _unexplained:
        tr.write_line("no other skips")
        return
    what = f"{NO_UNEXPLAINED_SKIPS}=1: these fail the run" if strict else \
        f"not on the allowlist (a failure under {NO_UNEXPLAINED_SKIPS}=1, as in .ci/run)"
    tr.write_line(f"{len(_unexplained)} skip(s) {what}:", red=strict, yellow=not strict)
    for nodeid, reason in _unexplained:
        tr.write_line(f"  {nodeid}: {reason}", red=strict, yellow=not strict)
