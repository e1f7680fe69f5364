"""Where the CI's CPU goes, per work unit (tests/conftest.py's scheduling units).

The suite is CPU-bound on 2 cores: a unit's wall time in CI says as much about what ran beside it
as about itself, so the durations pytest prints cannot tell which work to cut. With
``HPCDDF_TEST_CPU_LOG=<file>`` (set by .ci/run) every test appends one JSON line: its unit,
worker, wall seconds and the CPU seconds of its worker process and of the processes it waited
for (DDF.py, kMS.py, CASA; not Slurm's jobs, which slurmd runs). The controller then prints the
units by CPU, with the run's totals, at the end of the run.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import pytest

CPU_LOG = "HPCDDF_TEST_CPU_LOG"
TOP = 25


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished, waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ARG001
    path = os.environ.get(CPU_LOG)
    if not path:
        yield
        return
    t0, c0 = time.monotonic(), cpu_seconds()
    yield
    from tests.conftest import work_unit
    line = {"unit": work_unit(item.nodeid), "nodeid": item.nodeid,
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "wall_s": round(time.monotonic() - t0, 2), "cpu_s": round(cpu_seconds() - c0, 2)}
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(line) + "\n")


def per_unit(lines: list[dict]) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds summed per work unit."""
    units: dict[str, dict[str, float]] = defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0})
    for line in lines:
        units[line["unit"]]["wall_s"] += line["wall_s"]
        units[line["unit"]]["cpu_s"] += line["cpu_s"]
    return dict(units)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    path = os.environ.get(CPU_LOG)
    if not path or hasattr(config, "workerinput") or not Path(path).is_file():
        return
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    units = per_unit(lines)
    tr = terminalreporter
    total_cpu, total_wall = sum(u["cpu_s"] for u in units.values()), sum(u["wall_s"] for u in units.values())
    tr.section("CPU per work unit")
    tr.write_line(f"all tests: {total_cpu:.0f} CPU-s in {total_wall:.0f} worker-s "
                  "(pytest and the processes it waited for; Slurm's jobs not counted)")
    for name, u in sorted(units.items(), key=lambda kv: -kv[1]["cpu_s"])[:TOP]:
        tr.write_line(f"{u['cpu_s']:8.0f} CPU-s {u['wall_s']:8.0f} s  {name}")
