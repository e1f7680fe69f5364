"""`--site local`: the same plan and engine with submitit's local executor, no Slurm needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

HPCDDF = [sys.executable, "-m", "hpcddf"]


def run(*args: str, env_home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_home), "XDG_CONFIG_HOME": str(env_home / ".config")}
    return subprocess.run([*HPCDDF, *args], capture_output=True, text=True, timeout=300, env=env)


def test_local_chain_runs_every_stage_and_resumes(tmp_path):
    work = tmp_path / "work"
    args = ["--site", "local", "--work-root", str(work)]
    out = run("submit", "SIM1", *args, "--pipeline", "scaled", "--pipeline-opt", "seconds=0.1",
              "--control-exitafter=dirin_di", "--json", env_home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["fields"]["SIM1"]["status"] == "done"
    assert "stage initial done" in out.stderr and "stage dirin_di done" in out.stderr
    state = json.loads((work / "SIM1" / ".hpcddf" / "state.json").read_text())
    assert {k: v["state"] for k, v in state["stages"].items()} == {
        "initial": "done", "dirin": "done", "dirin_di": "done"}
    assert len(list((work / "SIM1" / ".hpcddf" / "done").glob("*.done.json"))) == 10
    again = run("submit", "SIM1", *args, "--pipeline", "scaled", "--control-exitafter=dirin_di",
                env_home=tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout
    logs = run("logs", "SIM1", *args, env_home=tmp_path)
    assert "image_dirin_SSD_m_c_di_m" in logs.stdout and "stage total" in logs.stdout


def test_local_failure_is_reported_and_resubmit_resumes(tmp_path):
    work = tmp_path / "work"
    args = ["--site", "local", "--work-root", str(work)]
    out = run("submit", "SIM2", *args, "--pipeline", "scaled", "--pipeline-opt", "seconds=0.1",
              "--pipeline-opt", "fail=cluster", "--pipeline-opt", "fail_times=1",
              "--control-exitafter=dirin_di", env_home=tmp_path)
    assert out.returncode != 0
    assert "stage dirin FAILED" in out.stderr
    state = json.loads((work / "SIM2" / ".hpcddf" / "state.json").read_text())["stages"]
    assert state["dirin"]["state"] == "failed" and state["dirin"]["error"]["step"] == "cluster"
    assert state["dirin_di"]["state"] == "cancelled"
    done_initial = (work / "SIM2" / ".hpcddf" / "done" / "image_dirin_SSD_m.done.json").read_text()
    again = run("resubmit", "SIM2", *args, env_home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "stage initial" not in again.stderr  # resumed at the failed stage
    assert (work / "SIM2" / ".hpcddf" / "done" / "image_dirin_SSD_m.done.json").read_text() == done_initial


def _tree(pid: int) -> set[int]:
    """``pid`` and every process started under it (science commands run in their own session
    but are still its descendants)."""
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return out


def _wait_for(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if value := pred():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _start_long_local_run(tmp_path, fid: str) -> tuple[Path, list[str], subprocess.Popen[str]]:
    """`hpcddf submit FID --site local` in the foreground (its own session), a scaled stage
    whose second step takes 15 s, returned once that step is running."""
    work = tmp_path / "work"
    args = ["--site", "local", "--work-root", str(work)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    proc = subprocess.Popen([*HPCDDF, "submit", fid, *args, "--pipeline", "scaled",
                             "--pipeline-opt", "seconds=0.2", "--pipeline-opt", "seconds.image_dirin_SSD=15",
                             "--control-exitafter=initial"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = work / fid / "logs" / "image_dirin_SSD.log"
    try:
        _wait_for(lambda: log.exists() and "tick" in log.read_text(), 120, "the long step to run")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return work / fid, args, proc


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group (Ctrl-C)", "SIGKILL"])
def test_an_interrupted_local_run_leaves_no_process_behind_and_resumes(tmp_path, how):
    """The foreground `hpcddf submit --site local` is stopped mid-step: the stage job and its
    command stop with it, the state says interrupted, a rerun resumes after the last done step."""
    wd, args, proc = _start_long_local_run(tmp_path, "SIM3")
    try:
        seen = _tree(proc.pid)
        assert len(seen) >= 4, seen  # hpcddf, submitit's controller, the stage job, the command
        if how == "SIGTERM":
            os.kill(proc.pid, signal.SIGTERM)
        elif how == "SIGKILL":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        _wait_for(lambda: not _alive(seen), 60, f"the run's processes to end: {_alive(seen)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how != "SIGKILL":
        assert proc.returncode == 130, (proc.returncode, err)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        errors = [ln for ln in err.splitlines() if ln.startswith("hpcddf: error:")]
        assert len(errors) == 1 and "stage initial interrupted by SIG" in errors[0], err
        assert "hpcddf resubmit SIM3" in errors[0]
    state = json.loads((wd / ".hpcddf" / "state.json").read_text())["stages"]["initial"]
    assert state["state"] == "interrupted", state
    done = wd / ".hpcddf" / "done"
    first = (done / "image_dirin_SSD_init.done.json").read_text()
    assert not (done / "image_dirin_SSD.done.json").exists()
    status = run("status", "SIM3", *args, env_home=tmp_path)
    assert "interrupted" in status.stdout, status.stdout

    again = run("resubmit", "SIM3", *args, env_home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (done / "image_dirin_SSD_init.done.json").read_text() == first  # not redone
    assert (done / "image_dirin_SSD_m.done.json").exists()
    final = json.loads((wd / ".hpcddf" / "state.json").read_text())["stages"]["initial"]
    assert final["state"] == "done"


def test_hpcddf_cancel_of_a_local_run_stops_it_and_records_cancelled(tmp_path):
    """`hpcddf cancel` from another terminal: the running stage and its command stop, the state
    says cancelled (the user's word, not "interrupted"), and a resubmit resumes."""
    wd, args, proc = _start_long_local_run(tmp_path, "SIM4")
    try:
        seen = _tree(proc.pid)
        cancelled = run("cancel", "SIM4", *args, env_home=tmp_path)
        assert cancelled.returncode == 0 and "SIM4: cancelled" in cancelled.stdout, cancelled
        proc.communicate(timeout=90)
        _wait_for(lambda: not _alive(seen), 60, f"the run's processes to end: {_alive(seen)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    state = json.loads((wd / ".hpcddf" / "state.json").read_text())["stages"]["initial"]
    assert state["state"] == "cancelled", state
    again = run("resubmit", "SIM4", *args, env_home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((wd / ".hpcddf" / "state.json").read_text())["stages"]["initial"]["state"] == "done"
