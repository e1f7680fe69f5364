"""The README's demo, run once per test session and shared by every test that reads it:
tests/science/test_demo_reduction.py (the demo's own checks) and
tests/science/test_slurm_reduction.py (the same field reduced on Slurm inside the science
image must agree with this uncontained run). Both modules are one work unit in
tests/conftest.py, so the session fixture runs once, on one worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIELD = "SIM1"


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`hpcddf demo` on the local default: the process, its home, the field and the verdict."""
    from tests._require import missing
    from tests.science.conftest import hpcddf, science_stack_missing
    why = science_stack_missing()
    if why:
        missing("HPCDDF_REQUIRE_SCIENCE", f"science stack not installed ({why}); pip install -e '.[science]'")
    home = tmp_path_factory.mktemp("demo")
    proc = hpcddf("demo", "--work-root", str(home / "work"), "--field", FIELD, home=home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from hpcddf.lofar.demo import evaluate
    wd: Path = home / "work" / FIELD
    return {"proc": proc, "home": home, "workdir": wd, "result": evaluate(wd)}
