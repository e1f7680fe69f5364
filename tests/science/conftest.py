"""The science tests run the real DDFacet and killMS on a simulated field.

They are not skipped quietly: when HPCDDF_REQUIRE_SCIENCE=1 (set by .ci/run) a missing science
stack is a failure; otherwise the skip says how to install it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._require import missing

HPCDDF = [sys.executable, "-m", "hpcddf"]
BIN = Path(sys.executable).parent


def science_stack_missing() -> str | None:
    """Why the science stack is not usable here, or None."""
    for module in ("casacore", "DDFacet", "killMS", "bdsf"):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} does not import ({exc})"
    for prog in ("DDF.py", "kMS.py", "MakeMask.py", "ClipCal.py"):
        if not (BIN / prog).exists() and shutil.which(prog) is None:
            return f"{prog} is not installed"
    return None


@pytest.fixture(scope="session", autouse=True)
def science_stack() -> None:
    why = science_stack_missing()
    if why:
        missing("HPCDDF_REQUIRE_SCIENCE", f"science stack not installed ({why}); pip install -e '.[science]'")


def hpcddf(*args: str, home: Path, timeout: float = 3400) -> subprocess.CompletedProcess[str]:
    """The real command line, with a plain PATH: the science programs must be found by hpcddf."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "TMPDIR": str(home / "tmp")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([*HPCDDF, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_matches_the_demo_sky(final) -> None:
    """The bar the demo's final image must meet against the simulated sky (a ``SkyCheck``):
    all six sources above 10 sigma found, nothing spurious, offsets <= 0.1 beam, fluxes <= 10 %.
    Any reduction of the demo's field, local or through Slurm, is held to it."""
    sky_above_10_sigma = [m.true for m in final.matches if m.true.flux_jy >= 10 * final.rms_jy]
    assert len(sky_above_10_sigma) == 6 and not final.missed
    assert final.spurious == []
    assert final.worst_offset_beams() <= 0.1
    assert final.worst_flux_error() <= 0.10


def logged_commands(log: Path) -> list[list[str]]:
    """The argv of every command a step's log records (the runner's "# hpcddf TIME: [argv]")."""
    return [json.loads(line.split(": ", 1)[1]) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("# hpcddf ") and ": [" in line]


def rewrite_argv(argv: list[str], swap: dict[str, str], drop: tuple[str, ...] = ()) -> list[str]:
    """A logged ``--Key=value`` command line (DDF.py's) with some values replaced and the
    options starting with ``drop`` left out: a step's own call, rerun as a test needs it."""
    def key(arg: str) -> str:
        return arg.split("=", 1)[0]
    return [f"{key(a)}={swap[key(a)]}" if key(a) in swap else a
            for a in argv if not (drop and a.startswith(drop))]
