"""The walltime rules on the real local Slurm, with the scaled pipeline: a step that would not
fit waits for a fresh attempt and is never cut; a step longer than a whole walltime stops the
stage after its second cut instead of looping; a signal after the last step ends the stage done;
measured durations make the next field's stages ask for shorter walltimes and split a stage too
long for one.

The scenarios run at once (each in its own work root: measured durations are per work
root), so the module costs about its longest scenario, two one-minute walltimes."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from .conftest import SITE_TEMPLATE, hpcddf, read_state, require_slurm, wait_for

pytestmark = pytest.mark.slurm
INITIAL = ["image_dirin_SSD_init", "external_mask", "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m"]


def _site(root: Path, walltime: str) -> Path:
    path = root / "site.toml"
    path.write_text(SITE_TEMPLATE.format(root=root, walltime=walltime, requeues=6, signal_delay=5, max_map=0))
    return path


def _submit(root: Path, site: Path, field: str, *opts: str) -> dict[str, str]:
    out = hpcddf("submit", field, "--site-file", str(site), "--pipeline", "scaled", *opts,
                 "--control-exitafter=initial", "--json")
    return json.loads(out.stdout)["fields"][field]["jobs"]


def _ended(root: Path, field: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = read_state(root / "work", field)
        return st if all(s["state"] in ("done", "failed") for s in st["stages"].values()) else None
    return wait_for(check, timeout, f"field {field}'s stages to end", every=2)


def _sacct(job: str, fields: str) -> list[list[str]]:
    """Every run of the job (requeues too), oldest first, once sacct has its end."""
    def rows() -> list[list[str]] | None:
        out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", f"Submit,State,{fields}"],
                             capture_output=True, text=True).stdout
        got = sorted(ln.split("|") for ln in out.splitlines() if ln.strip())
        return [r[1:] for r in got] if got and not got[-1][1].startswith(("RUNNING", "PENDING")) else None
    return wait_for(rows, 60, f"sacct to record job {job}")


def _runs(root: Path, field: str) -> dict[str, int]:
    """How often each step's command was started (a cut step shows twice)."""
    logs = root / "work" / field / "logs"
    return {p.stem: p.read_text().count("# hpcddf ") for p in logs.glob("*.log") if not p.stem.startswith("hpcddf-")}


def late_step(root: Path) -> dict[str, Any]:
    """10 s of work, then a 14-s step whose estimate (twice 14 s) exceeds the time left."""
    site = _site(root, "1")
    jobs = _submit(root, site, "F1", "--pipeline-opt", "seconds=1", "--pipeline-opt",
                   "seconds.image_dirin_SSD_init=10", "--pipeline-opt", "seconds.external_mask=14")
    return {"state": _ended(root, "F1", 420), "runs": _runs(root, "F1"), "jobs": jobs,
            "log": (root / "work" / "F1" / "logs" / "hpcddf-initial.log").read_text()}


def endless_step(root: Path) -> dict[str, Any]:
    """A 200-s step under a 1-minute walltime: it can never finish."""
    site = _site(root, "1")
    jobs = _submit(root, site, "F2", "--pipeline-opt", "seconds=1",
                   "--pipeline-opt", "seconds.image_dirin_SSD_init=200")
    state = _ended(root, "F2", 420)
    return {"state": state, "sacct": _sacct(jobs["initial"], "ExitCode")}


def learned_walltime(root: Path) -> dict[str, Any]:
    """A first field measures 1-s steps under a 10-minute maximum; the second asks for less."""
    site = _site(root, "10")
    first = _submit(root, site, "F3", "--pipeline-opt", "seconds=1")
    _ended(root, "F3", 300)
    second = _submit(root, site, "F4", "--pipeline-opt", "seconds=1")
    return {"first": _sacct(first["initial"], "Timelimit"), "second_jobs": second,
            "second": _sacct(second["initial"], "Timelimit"), "state": _ended(root, "F4", 300)}


def learned_split(root: Path) -> dict[str, Any]:
    """5-s steps under a 1-minute maximum: a job holds (60 s - 35 s signal lead - the measured
    start-up) / 1.1 = ~21 s of measured steps, the 5 steps' ~27 s do not fit, so the next
    field's stage is two chained jobs, each done in one attempt (the first field needed two)."""
    site = _site(root, "1")
    _submit(root, site, "F5", "--pipeline-opt", "seconds=5")
    _ended(root, "F5", 300)
    jobs = _submit(root, site, "F6", "--pipeline-opt", "seconds=5")
    return {"jobs": jobs, "state": _ended(root, "F6", 300), "runs": _runs(root, "F6")}


def signal_after_last_step(root: Path) -> dict[str, Any]:
    """The walltime signal between the last step's done-marker and the stage's end: the test
    holds the field's lock while the last step runs, so the job, its marker written, waits to
    record it; the signal is sent then, and the lock released."""
    from hpcddf.engine.state import locked
    site = _site(root, "10")
    jobs = _submit(root, site, "F7", "--pipeline-opt", "seconds=1", "--pipeline-opt", "seconds.image_dirin_SSD_m=4")
    wd = root / "work" / "F7"
    marker = wd / ".hpcddf" / "done" / "image_dirin_SSD_m.done.json"
    wait_for(lambda: read_state(root / "work", "F7")["stages"]["initial"].get("current_step") == INITIAL[-1],
             120, "the last step to start", every=0.2)
    with locked(wd):
        wait_for(marker.is_file, 60, "the last step's marker", every=0.1)
        subprocess.run(["scancel", "--signal=USR2", jobs["initial"]], check=True, timeout=30)
        wait_for(lambda: "walltime signal after the work was done" in
                 (wd / "logs" / "hpcddf-initial.log").read_text(), 60, "the job to log the late signal")
    return {"state": _ended(root, "F7", 120), "sacct": _sacct(jobs["initial"], "ExitCode")}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "late_step": late_step, "endless_step": endless_step,
    "learned_walltime": learned_walltime, "learned_split": learned_split,
    "signal_after_last_step": signal_after_last_step}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario run at once; a scenario that raised gives its exception to its test."""
    require_slurm()
    roots = {name: tmp_path_factory.mktemp(name) for name in SCENARIOS}
    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(run, roots[name]) for name, run in SCENARIOS.items()}
    out: dict[str, Any] = {}
    for name, fut in futures.items():
        try:
            out[name] = fut.result()
        except Exception as exc:  # noqa: BLE001 - handed to the scenario's own test
            out[name] = exc
    yield out
    ids = [j for r in out.values() if isinstance(r, dict) for k in ("jobs", "second_jobs") for j in r.get(k, {}).values()]
    subprocess.run(["scancel", *ids], check=False, capture_output=True)


def _result(outcomes: dict[str, Any], name: str) -> dict[str, Any]:
    r = outcomes[name]
    if isinstance(r, Exception):
        raise r
    return r


def test_a_step_that_does_not_fit_the_time_left_starts_a_fresh_attempt_and_is_never_cut(outcomes):
    r = _result(outcomes, "late_step")
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "done" and stage["attempts"] == 2, stage
    assert r["runs"] == {s: 1 for s in INITIAL}, r["runs"]  # nothing redone
    assert re.search(r"step external_mask needs ~(28|29|30) s", r["log"]) and "requeueing before starting it" in r["log"]
    assert "cuts" not in stage
    assert stage["steps_run"] == 5 and "ran 5 step(s) in 2 attempt(s)" in stage["note"]


def test_a_step_longer_than_a_walltime_stops_the_stage_after_its_second_cut(outcomes):
    r = _result(outcomes, "endless_step")
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "failed" and stage["attempts"] == 2, stage
    err = stage["error"]
    assert err["step"] == "image_dirin_SSD_init" and len(err["cut_after_s"]) == 2
    assert "was cut by the walltime 2 times" in err["message"] and "1 min" in err["message"]
    assert "max_walltime" in err["detail"]
    # one requeue, then Slurm saw the job end: no third attempt spent on it
    states = [row[0].split()[0] for row in r["sacct"]]
    assert states[0] == "REQUEUED" and len(states) == 2 and states[1] in ("FAILED", "TIMEOUT"), r["sacct"]


def test_measured_durations_make_the_next_field_ask_for_a_shorter_walltime(outcomes):
    r = _result(outcomes, "learned_walltime")
    assert r["first"][-1][1] == "00:10:00"  # nothing measured: the site maximum
    assert r["second"][-1][1] == "00:01:00"  # 5 x ~1.3 s measured + 25 %, start-up, 35 s signal lead
    assert r["state"]["stages"]["initial"]["state"] == "done"


def test_a_stage_too_long_for_one_walltime_is_split_into_two_chained_jobs(outcomes):
    r = _result(outcomes, "learned_split")
    assert list(r["jobs"]) == ["initial.1", "initial.2"]
    stages = r["state"]["stages"]
    assert set(stages) == {"initial.1", "initial.2"}
    assert all(s["state"] == "done" and s["attempts"] == 1 for s in stages.values()), stages
    assert r["runs"] == {s: 1 for s in INITIAL}
    plan = [(s["name"], s["depends_on"]) for s in r["state"]["plan"]["stages"]]
    assert plan == [("initial.1", []), ("initial.2", ["initial.1"])]
    parts = [s["steps"] for s in r["state"]["plan"]["stages"]]
    assert parts[0] + parts[1] == INITIAL and len(parts[0]) in (3, 4)  # 4 x ~5.1 s fit ~21 s


def test_a_walltime_signal_after_the_last_step_ends_the_stage_done_in_one_attempt(outcomes):
    r = _result(outcomes, "signal_after_last_step")
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "done" and stage["attempts"] == 1, stage
    assert "the walltime signal came after the last step: not requeued" in stage["note"]
    assert [row[0].split()[0] for row in r["sacct"]] == ["COMPLETED"], r["sacct"]  # never requeued
