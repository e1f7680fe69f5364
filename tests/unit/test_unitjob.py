"""The one node job class: the life every unit's record goes through (attempts, done, failed,
cancelled kept, walltime checkpoint) whatever the pipeline, and the reduction stage's sums over
attempts and its end at a walltime signal that comes after the last step. The walltime kill itself on the real
Slurm is in tests/integration (a reduction stage and a PHANGS task)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpcddf.cli.report import _record_cells
from hpcddf.engine import nodejob
from hpcddf.engine.nodejob import NodeInfo, NodeSteps, StageJob
from hpcddf.engine.runner import RunContext, Step, StopRequested
from hpcddf.engine.sites import load_site
from hpcddf.engine.state import State, read_state
from hpcddf.engine.unitjob import UnitJob, error_doc, requeue_underway
from hpcddf.errors import HpcddfError


class FileJob(UnitJob):
    """A unit whose record is one JSON file and whose work is a callable."""

    def __init__(self, path: str, fail: str | None = None) -> None:
        self.path = path
        self.fail = fail

    def record(self, change: Any, timeout: float | None = None) -> None:
        p = Path(self.path)
        doc = json.loads(p.read_text()) if p.exists() else {}
        change(doc)
        p.write_text(json.dumps(doc))

    def work(self) -> dict[str, Any]:
        self._scratch = object()  # node-only state: must not travel back into the queue
        if self.fail:
            raise HpcddfError(self.fail, "fix it")
        return {"made": 1}

    def done_values(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"products": [result["made"]]}


def _doc(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_each_attempt_is_counted_and_the_outcome_kept(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    path = tmp_path / "unit.json"
    assert FileJob(str(path))() == {"made": 1}
    first = _doc(path)
    assert (first["state"], first["attempts"], first["products"]) == (State.DONE, 1, [1])
    assert first["error"] is None and first["ended"] and first["elapsed_s"] >= 0 and first["host"]
    FileJob(str(path))()
    assert _doc(path)["attempts"] == 2
    # Slurm's restart count wins when a requeue happened before the record said so
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    FileJob(str(path))()
    assert _doc(path)["attempts"] == 5


def test_a_failure_is_recorded_with_its_message_and_hint(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    with pytest.raises(HpcddfError):
        FileJob(str(path), fail="no MS")()
    doc = _doc(path)
    assert doc["state"] == State.FAILED and doc["error"] == {"message": "no MS", "hint": "fix it"}


def test_a_cancelled_unit_stays_cancelled_when_its_work_then_fails(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    job = FileJob(str(path), fail="killed")
    job.begin()
    job.record(lambda s: s.update(state=State.CANCELLED))  # `hpcddf cancel` said so first
    job.failed(error_doc(HpcddfError("killed")))
    assert _doc(path)["state"] == State.CANCELLED


def test_the_walltime_checkpoint_records_the_requeue_and_ships_only_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    job = FileJob(str(path))
    job.begin()
    job._started -= 60  # the attempt ran a minute before the walltime signal
    again = job.checkpoint()
    assert again.function is job
    doc = _doc(path)
    assert doc["state"] == State.REQUEUED and doc["requeued_at"]
    assert doc["elapsed_s"] >= 60, "the killed attempt's time counts"
    copy = pickle.loads(pickle.dumps(job))
    assert copy.path == str(path) and not hasattr(copy, "_scratch") and not hasattr(copy, "_started")


def test_an_unexpected_error_says_its_type() -> None:
    assert error_doc(KeyError("x")) == {"message": "KeyError: 'x'"}


def test_attempts_are_counted_over_resubmissions_too(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    path = tmp_path / "unit.json"
    FileJob(str(path))()
    FileJob(str(path))()
    doc = _doc(path)
    doc["attempts"] = 0  # a resubmission starts the requeue count again, keeps the sums
    path.write_text(json.dumps(doc))
    FileJob(str(path))()
    assert (_doc(path)["attempts"], _doc(path)["attempts_total"]) == (1, 3)


def test_an_attempt_slurm_restarted_without_a_word_is_kept_as_lost(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that dies takes the attempt with it: nothing records its end, Slurm requeues
    the job, and the next attempt finds the record still running on the dead node."""
    path = tmp_path / "unit.json"
    path.write_text(json.dumps({"state": State.RUNNING, "attempts": 1, "host": "node07",
                                "started": "2026-12-06T10:00:00"}))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURMD_NODENAME", "node08")
    FileJob(str(path))()
    doc = _doc(path)
    assert (doc["state"], doc["attempts"], doc["host"]) == (State.DONE, 2, "node08")
    assert doc["lost_attempts"] == [{"attempt": 1, "node": "node07", "started": "2026-12-06T10:00:00"}]
    assert "attempt 1 on node07 ended without a word" in doc["note"]
    # a record that said how its attempt ended (a walltime requeue) loses nothing
    path.write_text(json.dumps({"state": State.REQUEUED, "attempts": 1, "host": "node07"}))
    FileJob(str(path))()
    assert "lost_attempts" not in _doc(path)


# ---------------------------------------------------------------- the reduction's stage job
def _no_steps(stage: str, names: Any, node: NodeInfo) -> NodeSteps:
    return NodeSteps(steps=[])


@pytest.fixture
def stage_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StageJob]:
    """A local stage of two steps; the walltime signal goes to a stand-in for submitit's
    requeue handler (which would requeue the job) and the handlers are put back after."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, nodejob.WALLTIME_SIGNAL)}
    handlers = list(logging.getLogger().handlers)  # begin() logs to the stage's log file
    requeues: list[int] = []
    signal.signal(nodejob.WALLTIME_SIGNAL, lambda signum, frame: requeues.append(signum))
    workdir = tmp_path / "F1"
    workdir.mkdir()
    job = StageJob(site=load_site("local", None), field_id="F1", workdir=str(workdir),
                   work_root=str(tmp_path), stage="calibrate", steps=("a", "b"),
                   builder=_no_steps, walltime_min=10)
    job._requeues = requeues  # type: ignore[attr-defined]
    yield job
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    for added in set(logging.getLogger().handlers) - set(handlers):
        logging.getLogger().removeHandler(added)
        added.close()


def _steps_run(names: list[str]) -> Any:
    """run_steps as if ``names`` were run now (each recorded done) and the rest found done."""
    def run(ctx: RunContext, steps: list[Step], walltime_s: float) -> list[str]:
        for name in names:
            ctx.on_step(name, State.DONE, {"duration_s": 1.0})
        return names
    return run


def _stage(job: StageJob) -> dict[str, Any]:
    state = read_state(Path(job.workdir))
    assert state is not None
    return state["stages"][job.stage]


def _attempt(job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Any) -> list[str]:
    monkeypatch.setattr(nodejob, "run_steps", run)
    job.begin()
    return job._run((0,), tmp_path / "cache")


def test_status_sums_time_and_steps_over_every_attempt(stage_job: StageJob, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _attempt(stage_job, tmp_path, monkeypatch, _steps_run(["a", "b"]))
    stage_job._started -= 60  # attempt 1 did all the work in a minute, then the signal came
    stage_job.checkpoint()
    ran = _attempt(stage_job, tmp_path, monkeypatch, _steps_run([]))  # attempt 2 finds all done
    stage_job.finished(**stage_job.done_values({"ran": ran}))
    s = _stage(stage_job)
    assert (s["state"], s["attempts"], s["attempts_total"], s["steps_run"]) == (State.DONE, 2, 2, 2)
    assert s["elapsed_s"] >= 60 and s["node_hours"] >= 60 / 3600
    assert s["note"] == "ran 2 step(s) in 2 attempt(s)"
    _, _, attempts, elapsed, hours, note = _record_cells(s)
    assert (attempts, elapsed, hours, note) == ("2", "0:01:00", "0.02", "ran 2 step(s) in 2 attempt(s)")


def test_a_walltime_signal_after_the_last_step_ends_the_stage_done_not_requeued(
        stage_job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _attempt(stage_job, tmp_path, monkeypatch, _steps_run(["a", "b"]))
    os.kill(os.getpid(), nodejob.WALLTIME_SIGNAL)  # the signal, a second after the last step
    stage_job.finished(**stage_job.done_values({"ran": ran}))
    assert stage_job._requeues == []  # type: ignore[attr-defined]
    s = _stage(stage_job)
    assert (s["state"], s["attempts_total"], s["steps_run"]) == (State.DONE, 1, 2)
    assert "walltime signal came after the last step: not requeued" in s["note"]


def test_a_walltime_signal_before_the_last_step_still_requeues(
        stage_job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(ctx: RunContext, steps: list[Step], walltime_s: float) -> list[str]:
        ctx.on_step("a", State.DONE, {"duration_s": 1.0})
        raise StopRequested("b would not fit")
    with pytest.raises(StopRequested):
        _attempt(stage_job, tmp_path, monkeypatch, stopped)
    os.kill(os.getpid(), nodejob.WALLTIME_SIGNAL)
    assert stage_job._requeues == [nodejob.WALLTIME_SIGNAL]  # type: ignore[attr-defined]


def _cut_while_running(job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> Any:
    """An attempt whose walltime signal comes while ``step`` runs: what checkpoint returns."""
    out: dict[str, Any] = {}

    def cut(ctx: RunContext, steps: list[Step], walltime_s: float) -> list[str]:
        ctx.on_step(step, State.RUNNING, {})
        out["delayed"] = job.checkpoint()
        return []
    _attempt(job, tmp_path, monkeypatch, cut)
    return out["delayed"]


def test_a_step_cut_twice_stops_the_stage_with_the_reason_instead_of_looping(
        stage_job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit
    first = _cut_while_running(stage_job, tmp_path, monkeypatch, "b")
    assert isinstance(first, submitit.helpers.DelayedSubmission)  # cut once: requeued
    assert _stage(stage_job)["state"] == State.REQUEUED
    assert _cut_while_running(stage_job, tmp_path, monkeypatch, "b") is None  # submitit: no requeue
    s = _stage(stage_job)
    assert s["state"] == State.FAILED and len(s["cuts"]["b"]) == 2
    assert s["error"]["step"] == "b"
    assert "step b was cut by the walltime 2 times" in s["error"]["message"]
    assert "10 min" in s["error"]["message"] and "max_walltime" in s["error"]["detail"]
    # submitit then raises in the job; the reason recorded by the handler is kept
    stage_job.on_error(submitit.core.utils.UncompletedJobError("not requeued"))
    assert _stage(stage_job)["error"]["step"] == "b"
    assert _stage(stage_job)["class"]["name"] == "step_too_long"


def test_cuts_of_different_steps_do_not_add_up(stage_job: StageJob, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cut_while_running(stage_job, tmp_path, monkeypatch, "a") is not None
    assert _cut_while_running(stage_job, tmp_path, monkeypatch, "b") is not None
    assert _stage(stage_job)["state"] == State.REQUEUED


def test_any_unit_signalled_after_its_work_ends_done_not_requeued(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    saved = signal.getsignal(nodejob.WALLTIME_SIGNAL)
    requeues: list[int] = []
    signal.signal(nodejob.WALLTIME_SIGNAL, lambda signum, frame: requeues.append(signum))
    job = FileJob(str(tmp_path / "unit.json"))
    try:
        job.begin()
        result = job.work()
        job.work_complete()  # what __call__ does between work() and finished()
        os.kill(os.getpid(), nodejob.WALLTIME_SIGNAL)
        job.finished(**job.done_values(result))
    finally:
        signal.signal(nodejob.WALLTIME_SIGNAL, saved)
    assert requeues == [] and job._late_signal  # type: ignore[attr-defined]
    assert _doc(tmp_path / "unit.json")["state"] == State.DONE


def test_a_killed_command_is_classed_on_the_node_and_the_same_kill_twice_is_permanent(
        stage_job: StageJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDFacet's out-of-memory death (SIGBUS): transient once, permanent the second time the
    same step dies the same way (the signature survives the next attempt's start)."""
    from hpcddf.errors import StepFailed
    bus = StepFailed("image_dirin", ["DDF.py", "x.parset"], -7, "...\nBus error\n", "/w/l.log")
    for _ in range(2):
        stage_job.begin()
        assert "class" not in _stage(stage_job)
        stage_job.on_error(bus)
        s = _stage(stage_job)
        assert s["state"] == State.FAILED
        if len(s["failures"]) == 1:
            assert (s["class"]["name"], s["class"]["transient"]) == ("killed_by_signal", True)
            assert "SIGBUS" in s["class"]["reason"]
    assert (s["class"]["name"], s["class"]["transient"]) == ("permanent", False)
    assert _record_cells(s)[-1].startswith("permanent: step image_dirin: DDF.py killed by SIGBUS")
    stage_job.begin()
    stage_job.finished()
    assert "class" not in _stage(stage_job) and _stage(stage_job)["failures"] == []


def test_the_workers_remedy_reaches_the_step_builder(stage_job: StageJob, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node job gives the builder the remedy's share of the allocation's CPUs (at least 1)."""
    seen: list[Any] = []

    def builder(stage: str, steps: Any, node: Any) -> Any:
        seen.append(node.workers)
        return _no_steps(stage, steps, node)
    full = dataclasses.replace(stage_job, builder=builder)
    half = dataclasses.replace(stage_job, builder=builder, workers_fraction=0.5)
    tiny = dataclasses.replace(stage_job, builder=builder, workers_fraction=0.01)
    for job in (full, half, tiny):
        job.begin()
        job.work()
    ncpu = len(os.sched_getaffinity(0))
    assert seen == [None, max(1, ncpu // 2), 1]


class RequeueKilledJob(FileJob):
    """The walltime handler ran submitit's `scontrol requeue`, which Slurm's requeue itself
    killed before it returned (seen on a loaded node)."""

    def work(self) -> dict[str, Any]:
        self.checkpoint()
        raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "11778395"])


def test_a_requeue_that_kills_its_own_scontrol_is_not_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    with pytest.raises(subprocess.CalledProcessError):
        RequeueKilledJob(str(path))()
    doc = _doc(path)
    assert doc["state"] == State.REQUEUED and not doc.get("error")
    assert not requeue_underway(subprocess.CalledProcessError(1, ["scontrol", "requeue", "1"]))
    assert not requeue_underway(subprocess.CalledProcessError(-9, ["DDF.py"]))
