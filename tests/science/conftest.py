"""The science tests run the real DDFacet and killMS on a simulated field.

They are not skipped quietly: when HPCDDF_REQUIRE_SCIENCE=1 (set by .ci/run) a missing science
stack is a failure; otherwise the skip says how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HPCDDF = [sys.executable, "-m", "hpcddf"]
BIN = Path(sys.executable).parent


def _missing() -> str | None:
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
    why = _missing()
    if why:
        if os.environ.get("HPCDDF_REQUIRE_SCIENCE") == "1":
            pytest.fail(f"the science stack is required here but not usable: {why}")
        pytest.skip(f"science stack not installed ({why}); pip install -e '.[science]'")


def hpcddf(*args: str, home: Path, timeout: float = 3400) -> subprocess.CompletedProcess[str]:
    """The real command line, with a plain PATH: the science programs must be found by hpcddf."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "TMPDIR": str(home / "tmp")}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([*HPCDDF, *args], capture_output=True, text=True, timeout=timeout, env=env)
