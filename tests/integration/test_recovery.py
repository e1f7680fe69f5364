"""Automatic recovery on the real local Slurm, with the scaled pipeline: a step killed by
SIGKILL once is resubmitted by the chain's guard job and the field completes; killed the same
way every time, the field stops after the identical failure's second time, nothing left queued;
a chain that succeeds has its guard cancelled by Slurm, never run. The scenarios run at once."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from .conftest import SITE_TEMPLATE, hpcddf, queue_empty_of, read_state, require_slurm, sacct_states, wait_for

pytestmark = pytest.mark.slurm
STEP = "image_dirin_SSD_init"


def _site(root: Path) -> Path:
    path = root / "site.toml"
    text = SITE_TEMPLATE.format(root=root, walltime="10", requeues=2, signal_delay=5, max_map=0)
    path.write_text(text.replace("[slurm]\n", "[slurm]\nauto_recover = true\nmax_retries = 2\n", 1))
    return path


def _submit(root: Path, field: str, *opts: str) -> dict[str, Any]:
    out = hpcddf("submit", field, "--site-file", str(_site(root)), "--pipeline", "scaled",
                 "--pipeline-opt", "seconds=1", *opts, "--control-exitafter=initial", "--json")
    return json.loads(out.stdout)["fields"][field]


def _kill_step(root: Path, field: str, seen: set[int]) -> int:
    """SIGKILL the step's command once its log names a pid not killed yet."""
    log = root / "work" / field / "logs" / f"{STEP}.log"

    def new_pid() -> int | None:
        pids = [int(p) for p in re.findall(rf"scaled step {STEP}: pid (\d+)", log.read_text())] if log.is_file() else []
        fresh = [p for p in pids if p not in seen]
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
            "guard": wait_for(lambda: sacct_states([first["guard"]]).get(first["guard"]), 60, "sacct")}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "killed_once": killed_once, "killed_always": killed_always, "succeeds": succeeds}


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
        for f in ("F1", "F2", "F3"):
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
