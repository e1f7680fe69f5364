"""The engine's generic job calls without a cluster: local calls in the foreground (result,
failure, a signal stopping the job and its processes) and the timeouts of scancel and sbatch. The held-array
sequence against the real Slurm is in tests/integration/test_held_arrays.py."""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from hpcddf.engine import backend, slurm_client
from hpcddf.engine.backend import (
    LocalCallFailed,
    LocalCallInterrupted,
    cancel,
    first_line,
    run_local_call,
)
from hpcddf.engine.sites import load_site
from hpcddf.errors import RunInterrupted, SubmissionError


@pytest.fixture
def site():
    return load_site("local", None)


def _fake_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, script: str) -> None:
    """A stand-in for a Slurm client that misbehaves (hangs, refuses), first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / name
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def _handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def test_a_local_call_returns_its_result_and_reports_its_job(site, tmp_path: Path) -> None:
    before = _handlers()
    started: list[str] = []
    polls: list[float] = []
    done = run_local_call(site, tmp_path, functools.partial(math.sqrt, 16.0), 5,
                          started=started.append, poll=lambda: polls.append(time.time()))
    assert done.result == 4.0
    assert started == [done.job_id] and done.job_id.isdigit()
    assert polls, "poll runs at least once, after the job ended"
    assert len(list(tmp_path.glob(f"local-*/{done.job_id}_0_log.out"))) == 1  # one folder per job
    assert _handlers() == before


def test_a_local_call_survives_a_slow_submitting_process(site, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded node the job's controller can start before the submitting process files the
    job: it must find its log folder anyway (with submitit's ``%j`` folder it died at once)."""
    from submitit.core import utils

    original = utils.JobPaths.move_temporary_file

    def slow(self, *args, **kwargs):
        time.sleep(3)  # the controller opens its log well within this
        return original(self, *args, **kwargs)

    monkeypatch.setattr(utils.JobPaths, "move_temporary_file", slow)
    assert run_local_call(site, tmp_path, functools.partial(math.sqrt, 9.0), 5).result == 3.0


def test_a_failing_call_gives_the_line_of_its_error(site, tmp_path: Path) -> None:
    with pytest.raises(LocalCallFailed) as err:
        run_local_call(site, tmp_path, functools.partial(int, "not a number"), 5)
    assert err.value.reason == "invalid literal for int() with base 10: 'not a number'"
    assert isinstance(err.value, SubmissionError)  # uncaught, the CLI still prints one line


def test_a_signal_stops_the_job_and_all_its_processes(site, tmp_path: Path) -> None:
    """SIGTERM to this foreground process (as Ctrl-C or a hang-up would be): the job is stopped
    before the caller hears of it, a second signal during the stop does not cut it short."""
    before = _handlers()
    tree: set[int] = set()
    stopping: list[tuple[str, str]] = []

    def poll() -> None:
        if not tree:
            job = psutil.Process(int(started[0]))
            _wait_for(lambda: job.children(recursive=True), 30, "the job's process")
            tree.update({job.pid, *(c.pid for c in job.children(recursive=True))})
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives here

    def on_stop(name: str, job_id: str) -> None:
        stopping.append((name, job_id))
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while stopping: ignored

    started: list[str] = []
    t0 = time.time()
    with pytest.raises(LocalCallInterrupted) as err:
        run_local_call(site, tmp_path, functools.partial(time.sleep, 120), 5, stop_grace_s=1.0,
                       started=started.append, poll=poll, stopping=on_stop)
    assert err.value.signal_name == "SIGTERM" and err.value.job_id == started[0]
    assert isinstance(err.value, RunInterrupted)
    assert stopping == [("SIGTERM", started[0])]
    assert time.time() - t0 < 60
    assert len(tree) >= 2  # submitit's controller and the job
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert _handlers() == before


def test_cancel_gives_up_after_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Slurm controller that does not answer must not hang the error path that cancels."""
    _fake_on_path(tmp_path, monkeypatch, "scancel", "sleep 60")
    t0 = time.time()
    assert cancel(["123"], timeout_s=1.0) is False
    assert time.time() - t0 < 10


def test_sbatch_that_does_not_answer_is_a_one_line_error(site, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit runs sbatch without a timeout; ours bounds it (each of its attempts: a timeout
    may hide a queued job, so it is retried after a look-up) and says what to check."""
    _fake_on_path(tmp_path, monkeypatch, "sbatch", "sleep 60")
    for lookup in ("squeue", "sacct"):  # the look-up finds no such job
        _fake_on_path(tmp_path, monkeypatch, lookup, "exit 0")
    monkeypatch.setattr(backend, "SBATCH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(backend, "SBATCH_RETRY", slurm_client.Retry(attempts=2, first_delay_s=0.1))
    t0 = time.time()
    with pytest.raises(SubmissionError) as err:
        backend._sbatch(site, tmp_path / "jobs", {"time": 5}, [functools.partial(math.sqrt, 4.0)],
                        "stage test")
    assert time.time() - t0 < 20
    assert err.value.message == "sbatch of stage test failed: no answer from Slurm in 1 s"
    assert "squeue --me" in err.value.hint


def test_a_refused_sbatch_gives_its_reason(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_on_path(tmp_path, monkeypatch, "sbatch",
                  "echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1")
    with pytest.raises(SubmissionError) as err:
        backend._sbatch(site, tmp_path / "jobs", {"time": 5}, [functools.partial(math.sqrt, 4.0)],
                        "stage test")
    assert err.value.message == ("sbatch refused stage test: "
                                 "sbatch: error: invalid partition specified: nope")


def test_cancel_is_best_effort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scancel at all
    assert cancel(["123"]) is False
    assert cancel([]) is True  # nothing to cancel: no command run


def test_first_line_finds_the_error_in_a_wrapped_traceback() -> None:
    exc = RuntimeError("Job (task=0) failed\nTraceback (most recent call last):\n  File x\n"
                       "hpcddf.errors.StepFailed: step image_dirin failed (exit 1)\n")
    assert first_line(exc) == "step image_dirin failed (exit 1)"
    assert first_line(RuntimeError("")) == "RuntimeError"


def _wait_for(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if value := pred():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
