"""Automatic recovery on the real local Slurm, with the scaled pipeline: a step killed by
SIGKILL once is resubmitted by the chain's guard job and the field completes; killed the same
way every time, the field stops after the identical failure's second time, nothing left queued;
a chain that succeeds has its guard cancelled by Slurm, never run; a stage Slurm kills as
TIMEOUT without a walltime signal (a site with no signal lead, its time limit cut below what it
already ran) is resubmitted by the guard from its first step not done; a node lost mid-stage (its slurmd and the
job's processes killed, the node marked down, then brought back: the cluster's second node
"spare", alone in partition "lossy", so no other test loses jobs) ends the run NODE_FAIL, Slurm
requeues it, and the stage completes without redoing a finished step. The scenarios run at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from .conftest import SITE_TEMPLATE, hpcddf, queue_empty_of, read_state, require_slurm, sacct_settled, wait_for

pytestmark = pytest.mark.slurm
STEP = "image_dirin_SSD_init"


def _site(root: Path, partition: str = "debug", signal_delay: int = 5) -> Path:
    path = root / "site.toml"
    text = SITE_TEMPLATE.format(root=root, walltime="10", requeues=2, signal_delay=signal_delay, max_map=0)
    text = text.replace('partition = "debug"', f'partition = "{partition}"')
    path.write_text(text.replace("[slurm]\n", "[slurm]\nauto_recover = true\nmax_retries = 2\n", 1))
    return path


def _submit(root: Path, field: str, *opts: str, partition: str = "debug", signal_delay: int = 5) -> dict[str, Any]:
    out = hpcddf("submit", field, "--site-file", str(_site(root, partition, signal_delay)), "--pipeline", "scaled",
                 "--pipeline-opt", "seconds=1", *opts, "--control-exitafter=initial", "--json")
    return json.loads(out.stdout)["fields"][field]


def _step_pids(root: Path, field: str, step: str) -> list[int]:
    """The pid of every run of the step, from its log (one line per run)."""
    log = root / "work" / field / "logs" / f"{step}.log"
    return [int(p) for p in re.findall(rf"scaled step {step}: pid (\d+)", log.read_text())] if log.is_file() else []


def _kill_step(root: Path, field: str, seen: set[int]) -> int:
    """SIGKILL the step's command once its log names a pid not killed yet."""

    def new_pid() -> int | None:
        fresh = [p for p in _step_pids(root, field, STEP) if p not in seen]
        return fresh[-1] if fresh else None
    pid = wait_for(new_pid, 150, f"{field}'s step to start", every=0.5)
    seen.add(pid)
    os.kill(pid, signal.SIGKILL)
    return pid


def _final(root: Path, field: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = read_state(root / "work", field)
        stage = st["stages"]["initial"]
        ended = stage["state"] == "done" or "stopped" in str(stage.get("note"))
        return st if ended and queue_empty_of([str(st.get("guard"))]) else None
    return wait_for(check, timeout, f"field {field} to end", every=2)


def killed_once(root: Path) -> dict[str, Any]:
    first = _submit(root, "F1", "--pipeline-opt", f"seconds.{STEP}=20")
    _kill_step(root, "F1", set())
    return {"first": first, "state": _final(root, "F1", 240)}


def killed_always(root: Path) -> dict[str, Any]:
    first = _submit(root, "F2", "--pipeline-opt", f"seconds.{STEP}=20")
    seen: set[int] = set()
    _kill_step(root, "F2", seen)
    _kill_step(root, "F2", seen)
    state = _final(root, "F2", 240)
    return {"first": first, "state": state, "guards": [r for r in state.get("recoveries", [])]}


def succeeds(root: Path) -> dict[str, Any]:
    first = _submit(root, "F3")
    state = _final(root, "F3", 180)
    return {"first": first, "state": state,
            "guard": sacct_settled([first["guard"]])[first["guard"]]}


LATE = "image_dirin_SSD"  # the initial stage's third step: two finished steps before it
SLURM_DIR = Path(os.environ.get("HPCDDF_SLURM_DIR", "/var/tmp/hpcddf-slurm"))


def _stage_job(root: Path, field: str) -> str:
    return str(read_state(root / "work", field)["stages"]["initial"]["job_id"])


def _runs(job: str) -> list[str]:
    """The state of every run of the job, requeued runs included (sacct -D), oldest first."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", "State"],
                         capture_output=True, text=True, timeout=60).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def _runs_per_step(root: Path, field: str) -> dict[str, int]:
    return {step: len(_step_pids(root, field, step)) for step in ("image_dirin_SSD_init", "external_mask", LATE)}


def timeout_unhandled(root: Path) -> dict[str, Any]:
    """A site whose jobs get no walltime signal ahead of the limit (signal_delay_s = 0:
    --signal=USR2@0, which Slurm never sends early); two steps take 65 s, then while the third
    runs the time limit is cut to 1 min: the job is past it, Slurm ends it TIMEOUT at its next
    check (every 30 s), in the third step's 40 s, and only the guard can bring the stage back. (With a signal lead, Slurm sends the
    signal in the same pass and the requeue races the kill: measured both ways here.)"""
    first = _submit(root, "F4", "--pipeline-opt", "seconds.image_dirin_SSD_init=35",
                    "--pipeline-opt", "seconds.external_mask=30", "--pipeline-opt", f"seconds.{LATE}=40",
                    signal_delay=0)
    wait_for(lambda: _step_pids(root, "F4", LATE), 240, "F4's third step to start", every=0.5)
    job = _stage_job(root, "F4")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True, timeout=60,
                   capture_output=True)
    state = _final(root, "F4", 300)
    return {"first": first, "state": state, "runs": wait_for(lambda: _runs(job), 60, "sacct of F4"),
            "runs_per_step": _runs_per_step(root, "F4")}


def _job_processes(job: str) -> list[int]:
    """The pids of the job's slurmstepd processes and everything they started."""
    parent: dict[int, int] = {}
    roots = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(f"slurmstepd: [{job}."):
            roots.append(int(proc.name))
    tree, grew = set(roots), True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sorted(tree)


def _lose_node(job: str) -> None:
    """The node "spare" dies under the job: its slurmd and the job's processes are killed (as a
    power loss would), the operator marks it down; Slurm ends the run NODE_FAIL."""
    os.kill(int((SLURM_DIR / "run" / "slurmd-spare.pid").read_text()), signal.SIGKILL)
    for pid in _job_processes(job):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["scontrol", "update", "NodeName=spare", "State=DOWN", "Reason=hpcddf test: node lost"],
                   check=True, timeout=60, capture_output=True)


def _bring_back_spare() -> None:
    subprocess.run(["/usr/sbin/slurmd", "-N", "spare"], check=True, timeout=60, capture_output=True)
    idle = ("idle", "mixed", "allocated", "completing")

    def up() -> bool:
        out = subprocess.run(["sinfo", "-h", "-n", "spare", "-o", "%T"], capture_output=True, text=True,
                             timeout=60).stdout.split()
        return bool(out) and out[0] in idle
    if not wait_for(lambda: up() or None, 20, "spare to register", every=0.5):
        subprocess.run(["scontrol", "update", "NodeName=spare", "State=RESUME"], check=False, timeout=60)


def node_lost(root: Path) -> dict[str, Any]:
    first = _submit(root, "F5", "--pipeline-opt", f"seconds.{LATE}=30", partition="lossy")
    wait_for(lambda: _step_pids(root, "F5", LATE), 150, "F5's third step to start", every=0.5)
    job = _stage_job(root, "F5")
    try:
        _lose_node(job)
        wait_for(lambda: "NODE_FAIL" in _runs(job), 60, "Slurm to end the run NODE_FAIL")
    finally:
        _bring_back_spare()
    state = _final(root, "F5", 300)
    return {"first": first, "state": state, "job": job, "runs": _runs(job),
            "runs_per_step": _runs_per_step(root, "F5")}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "killed_once": killed_once, "killed_always": killed_always, "succeeds": succeeds,
    "timeout_unhandled": timeout_unhandled, "node_lost": node_lost}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
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
    for root in roots.values():
        for f in ("F1", "F2", "F3", "F4", "F5"):
            if (root / "work" / f).is_dir():
                hpcddf("cancel", f, "--site-file", str(root / "site.toml"), check=False)


def _result(outcomes: dict[str, Any], name: str) -> dict[str, Any]:
    r = outcomes[name]
    if isinstance(r, Exception):
        raise r
    return r


def test_a_step_killed_once_is_resubmitted_by_the_guard_and_the_field_completes(outcomes):
    r = _result(outcomes, "killed_once")
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "done" and stage["retries"] == 1, stage
    [rec] = r["state"]["recoveries"]
    assert rec["action"] == "resubmit" and rec["class"] == "killed_by_signal", rec
    assert r["state"]["guard"] != r["first"]["guard"]  # the new chain has its own guard
    assert len(r["state"]["submissions"]) == 2


def test_the_same_kill_twice_stops_the_field_with_the_reason_and_nothing_queued(outcomes):
    r = _result(outcomes, "killed_always")
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "failed" and stage["retries"] == 1, stage
    assert [g["action"] for g in r["guards"]] == ["resubmit", "stop"], r["guards"]
    assert stage["class"]["name"] == "permanent" and "same failure 2 times" in stage["class"]["reason"]
    assert "SIGKILL" in stage["note"] and stage["fix"]
    assert len(r["state"]["submissions"]) == 2
    jobs = [str(r["state"]["guard"]), *(str(s["job_id"]) for s in r["state"]["stages"].values())]
    assert queue_empty_of(jobs)


def test_a_chain_that_succeeds_has_its_guard_cancelled_by_slurm(outcomes):
    r = _result(outcomes, "succeeds")
    assert r["state"]["stages"]["initial"]["state"] == "done"
    assert r["guard"] == "CANCELLED" and "recoveries" not in r["state"]


def test_a_stage_killed_as_timeout_without_the_signal_is_resubmitted(outcomes):
    r = _result(outcomes, "timeout_unhandled")
    assert r["runs"][0] == "TIMEOUT", r["runs"]
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "done" and stage["retries"] == 1, stage
    [rec] = r["state"]["recoveries"]
    assert rec["action"] == "resubmit" and rec["class"] == "timeout", rec
    # resubmitted from the step the limit cut: the two finished before it were not run again
    assert r["runs_per_step"] == {"image_dirin_SSD_init": 1, "external_mask": 1, LATE: 2}


def test_a_node_lost_mid_stage_ends_node_fail_and_the_stage_completes_without_redoing_steps(outcomes):
    r = _result(outcomes, "node_lost")
    assert r["runs"][0] == "NODE_FAIL" and r["runs"][-1] == "COMPLETED", r["runs"]
    stage = r["state"]["stages"]["initial"]
    assert stage["state"] == "done" and [a["node"] for a in stage["lost_attempts"]] == ["spare"], stage
    assert r["runs_per_step"] == {"image_dirin_SSD_init": 1, "external_mask": 1, LATE: 2}
    assert "recoveries" not in r["state"]  # Slurm requeued it: the guard had nothing to do
