"""The project's main job, for real: the demo's simulated field reduced with the real DDFacet
and killMS through the local Slurm, each stage a batch job with a walltime far below the
reduction's length (2 min against 5 min on 2 idle cores, 10 beside the rest of the suite).

The walltime must stop a stage in the middle for the test to mean anything, on any machine.
Slurm sends the walltime signal up to 30 s before it is due (it checks every 30 s), so with
the site's 2 minutes a stage of ~50 s (the final one here) may or may not be stopped. The
final stage therefore gets a 1-minute limit while it waits in the queue: with the signal 30 s
before the limit, Slurm signals it 0-30 s after it starts, while its ~50 s of work are
running. When it is requeued, its limit goes back to the site's, so that its second attempt
fits even on a machine three times slower (a step that never fits would requeue forever).

hpcddf must requeue, the next attempt must skip every step already done, and the final image
must match the simulated sky as well as the local demo's does (the checks of
``test_demo_reduction``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import queue_empty_of, require_slurm, sacct_states, wait_for
from tests.science.conftest import assert_matches_the_demo_sky

pytestmark = [pytest.mark.timeout(3600), pytest.mark.slurm]

FIELD = "SIMS"
WALLTIME_MIN = 2
SIGNAL_DELAY_S = 30
STAGES = ("initial", "dirin", "dirin_di", "phase", "ampphase", "ampphase_di", "fullampphase", "final")

SITE = """
description = "the local one-node Slurm, with a walltime far below the reduction's length"
scheduler = "slurm"
[slurm]
partition = "debug"
exclusive = false
max_walltime = "{walltime}"
max_requeues = 12
signal_delay_s = {signal_delay}
[node]
cpus = 2
mem_gb = 4
scratch_dir = "{root}/scratch/$SLURM_JOB_ID"
scratch_min_free_gb = 0
[preflight]
shm_min_fraction = 0.01
[paths]
work_root = "{root}/work"
[fields]
pattern = "SIM[A-Z0-9]*"
"""


def _finished(state_file: Path) -> dict | None:
    """The field's state once no stage is queued or running any more."""
    try:
        state = json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    stages = state.get("stages", {})
    over = all(s.get("state") in ("done", "failed", "cancelled") for s in stages.values())
    return state if stages and over else None


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_slurm()
    from hpcddf.lofar.demo import DEMO_DDE_RMS_DEG
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    root = tmp_path_factory.mktemp("slurm-reduction")
    wd = root / "work" / FIELD
    simulate_field(wd, SimSpec(dde_rms_deg=DEMO_DDE_RMS_DEG, seed=1))  # the demo's field
    site = root / "slurm-science.toml"
    site.write_text(SITE.format(root=root, walltime=WALLTIME_MIN, signal_delay=SIGNAL_DELAY_S))
    out = subprocess.run([sys.executable, "-m", "hpcddf", "submit", FIELD, "--site-file", str(site),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = json.loads(out.stdout)["fields"][FIELD]["jobs"]
    try:
        _limit(jobs["final"], 1)
        wait_for(lambda: _requeued(wd, "final") or _finished(wd / ".hpcddf" / "state.json"), 3000,
                 "the final stage to be requeued", every=0.5)
        _limit(jobs["final"], WALLTIME_MIN)
        state = wait_for(lambda: _finished(wd / ".hpcddf" / "state.json"), 3000,
                         "the reduction's stages to finish", every=5)
        wait_for(lambda: queue_empty_of(list(jobs.values())), 120, "the jobs to leave the queue")
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    return {"wd": wd, "jobs": jobs, "state": state}


def _limit(job: str, minutes: int) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True,
                   capture_output=True, timeout=60)


def _requeued(wd: Path, stage: str) -> bool:
    """The stage's first attempt said it is requeued (its checkpoint, before the job exits)."""
    try:
        state = json.loads((wd / ".hpcddf" / "state.json").read_text())["stages"].get(stage, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return state.get("state") == "requeued" or int(state.get("attempts") or 0) >= 2


def _step_events(log: str) -> list[tuple[str, str]]:
    """(step, "starting" | "done" | "skipped") in the order a stage log says them."""
    pat = re.compile(r"step (\S+): (starting|done in|already done)")
    return [(m.group(1), m.group(2).split()[0]) for m in pat.finditer(log)]


def test_every_stage_completes_and_the_walltime_stopped_one(reduced):
    stages = reduced["state"]["stages"]
    assert {name: s["state"] for name, s in stages.items()} == dict.fromkeys(STAGES, "done")
    assert stages["final"]["attempts"] >= 2  # stopped by its walltime, then completed
    log = (reduced["wd"] / "logs" / "hpcddf-final.log").read_text()
    assert "walltime/preemption signal, requeueing" in log and "attempt 2" in log
    ids = list(reduced["jobs"].values())
    states = wait_for(lambda: (s := sacct_states(ids)) and len(s) == len(ids) and s, 120, "sacct")
    assert set(states.values()) == {"COMPLETED"}, states


def test_no_finished_step_is_redone(reduced):
    wd, stages = reduced["wd"], reduced["state"]["stages"]
    for stage in STAGES:
        events = _step_events((wd / "logs" / f"hpcddf-{stage}.log").read_text())
        done: set[str] = set()
        for step, what in events:
            assert not (what == "starting" and step in done), f"{stage}: {step} ran again after it was done"
            if what == "done":
                done.add(step)
        starts = [step for step, what in events if what == "starting"]
        restarted = len(starts) - len(set(starts))
        # only a step the signal cut short runs again: at most one per requeue
        assert restarted <= stages[stage]["attempts"] - 1, (stage, events)
    markers = list((wd / ".hpcddf" / "done").glob("*.done.json"))
    assert len(markers) == len({m.name for m in markers}) >= 25


def test_the_final_image_matches_the_simulated_sky_as_the_demos_does(reduced):
    from hpcddf.lofar.demo import evaluate
    result = evaluate(reduced["wd"])
    print(result.text())
    assert_matches_the_demo_sky(result.final)
    assert result.final.dynamic_range >= 2 * result.di.dynamic_range
