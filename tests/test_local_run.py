"""`--site local`: the same plan and engine with submitit's local executor, no Slurm needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
