"""The engine's held-array sequence on the real local Slurm: held arrays, per-task afterok,
the caller's record before anything is released, release; and on any failure everything this
submission made is cancelled before the error goes on."""

from __future__ import annotations

import functools
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from hpcddf.engine.backend import (
    HeldArray,
    add_afterok,
    release,
    submit_arrays_with_dependencies,
)
from hpcddf.engine.plan import Resources
from hpcddf.engine.sites import load_site_file
from hpcddf.errors import SubmissionError

from .conftest import queue_empty_of, sacct_settled, wait_for

pytestmark = pytest.mark.slurm
RES = Resources(cpus=1, mem_gb=1, walltime_min=5, exclusive=False, partition="debug")
NO_JOB = "999999999"


@pytest.fixture
def site(slurm_site):
    return load_site_file(slurm_site(walltime="10"))


@pytest.fixture
def submitted() -> list[str]:
    """Job ids to scancel when the test ends, whatever happened."""
    ids: list[str] = []
    yield ids
    arrays = sorted({j.split("_")[0] for j in ids})
    if arrays:
        subprocess.run(["scancel", *arrays], check=False, timeout=60)


def _show(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` fields of one job or array task."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _calls(n: int) -> list[functools.partial]:
    return [functools.partial(math.sqrt, float(k * k)) for k in range(n)]


def test_held_arrays_get_their_dependencies_before_anything_runs(site, tmp_path: Path,
                                                                   submitted: list[str]) -> None:
    arrays = [HeldArray("hpcddf-test-first", RES, _calls(2)), HeldArray("hpcddf-test-then", RES, _calls(1))]
    seen: dict[str, dict[str, str]] = {}

    def record(ids: list[str]) -> None:
        submitted.extend(ids)
        seen.update({j: _show(j) for j in ids})

    ids = submit_arrays_with_dependencies(site, tmp_path / "jobs", arrays,
                                          lambda ids: [[], [], ids[:2]], record)
    first, then = ids[:2], ids[2]
    assert [j.split("_")[0] for j in first] == [first[0].split("_")[0]] * 2 and "_" in first[0]
    assert "_" not in then, "one call is a plain job"
    # when the caller recorded, every job was still held and the last waited for both tasks
    assert all(f["JobState"] == "PENDING" and f["Reason"] == "JobHeldUser" for f in seen.values()), seen
    assert seen[then]["Dependency"].startswith(f"afterok:{first[0]}(unfulfilled),afterok:{first[1]}")
    assert seen[first[0]]["ArrayTaskThrottle"] == "2" and seen[then]["JobName"] == "hpcddf-test-then"
    wait_for(lambda: queue_empty_of(ids), 180, "the jobs to run")
    states = sacct_settled(ids)
    assert set(states.values()) == {"COMPLETED"}, states


def test_a_failing_afterok_cancels_every_array_submitted(site, tmp_path: Path,
                                                         submitted: list[str]) -> None:
    arrays = [HeldArray("hpcddf-test-a", RES, _calls(2)), HeldArray("hpcddf-test-b", RES, _calls(1))]
    undone: list[list[str]] = []

    def waits(ids: list[str]) -> list[list[str]]:
        submitted.extend(ids)
        return [[], [ids[1]], []]  # the second task waits for itself: Slurm refuses

    with pytest.raises(SubmissionError) as err:
        submit_arrays_with_dependencies(site, tmp_path / "jobs", arrays, waits,
                                        record=lambda ids: pytest.fail("recorded a failed submission"),
                                        undo=undone.append, status_command="hpcddf phangs status")
    assert err.value.message.startswith(f"scontrol update JobId={submitted[1]} "
                                        f"Dependency=afterok:{submitted[1]} failed: ")
    assert "Job dependency problem" in err.value.message
    assert err.value.hint == "check the cluster with `hpcddf phangs status`"
    assert undone == [submitted]
    wait_for(lambda: queue_empty_of(submitted), 30, "both held arrays to be cancelled")
    states = sacct_settled(submitted)
    assert set(states.values()) == {"CANCELLED"}, states


def test_a_refused_sbatch_cancels_the_arrays_before_it(site, tmp_path: Path, submitted: list[str]) -> None:
    bad = replace(RES, partition="no-such-partition")
    arrays = [HeldArray("hpcddf-test-ok", RES, _calls(2)),
              HeldArray("hpcddf-test-bad", bad, _calls(2), what="the bad array")]
    undone: list[list[str]] = []
    with pytest.raises(SubmissionError) as err:
        submit_arrays_with_dependencies(site, tmp_path / "jobs", arrays, lambda ids: pytest.fail("no waits"),
                                        undo=undone.append)
    assert err.value.message.startswith("sbatch refused the bad array: ")
    assert "partition" in err.value.message
    (ok,) = undone
    submitted.extend(ok)
    assert len(ok) == 2
    wait_for(lambda: queue_empty_of(ok), 30, "the first array to be cancelled")


def test_release_and_afterok_of_unknown_jobs_say_what_failed() -> None:
    with pytest.raises(SubmissionError, match=f"scontrol release {NO_JOB} failed: .+"):
        release(NO_JOB)
    with pytest.raises(SubmissionError) as err:
        add_afterok(NO_JOB, ["1"])
    assert err.value.hint == "check the cluster with `hpcddf status`"
