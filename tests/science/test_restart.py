"""Restart with the real science commands: a run killed mid-stage (like a node crash) resumes
without redoing finished steps; redofrom archives once; exitafter stops at its stop point; a
failing command leaves its step not-done with the error in the state and the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.science.conftest import HPCDDF, hpcddf

pytestmark = pytest.mark.timeout(3600)


def markers(wd: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((wd / ".hpcddf" / "done").glob("*.done.json"))}


def processes_in(wd: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cwd"]):
        try:
            if p.info["cwd"] and Path(p.info["cwd"]) == wd:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_for(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("restart")
    work = home / "work"
    sim = hpcddf("simulate", str(work / "SIM2"), "--ntime", "30", home=home)
    assert sim.returncode == 0, sim.stderr
    (work / "SIM2" / "hpcddf.cfg").write_text(
        (work / "SIM2" / "hpcddf.cfg").read_text() + "\n# tests\n")
    return {"home": home, "work": work, "wd": work / "SIM2",
            "args": ["--site", "local", "--work-root", str(work)]}


def test_killed_mid_stage_resumes_without_redoing_done_steps(field):
    wd, home = field["wd"], field["home"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home / "tmp")}
    proc = subprocess.Popen([*HPCDDF, "submit", "SIM2", *field["args"], "--control-exitafter=dirin"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(lambda: (wd / ".hpcddf" / "done" / "mask_diffuse.done.json").exists(), 1800,
                 "the first steps of stage initial")
        ddf = wait_for(lambda: [p for p in processes_in(wd) if "image_dirin_SSD_m" in " ".join(p.cmdline())],
                       300, "DDF.py of image_dirin_SSD_m")
        time.sleep(3)  # well inside the command
        before = markers(wd)
        # a node crash: every process of the run dies at once, nothing gets to clean up
        victims = processes_in(wd) + [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = {p.pid for p in ddf}
    assert "image_dirin_SSD_m.done.json" not in before
    assert set(before) == {f"{s}.done.json" for s in ("image_dirin_SSD_init", "external_mask",
                                                     "image_dirin_SSD", "mask_diffuse")}

    again = hpcddf("resubmit", "SIM2", *field["args"], home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    after = markers(wd)
    for name, text in before.items():
        assert after[name] == text, f"{name} was redone"
    assert "image_dirin_SSD_m.done.json" in after and "cluster.done.json" in after
    assert "DIS0.done.json" not in after  # exitafter=dirin
    assert not [p for p in os.listdir("/dev/shm") if any(p.endswith(f".{pid}") or f".{pid}." in p
                                                          for pid in killed)]


def test_redofrom_archives_once_and_exitafter_stops_at_initial(field):
    wd, home = field["wd"], field["home"]
    old = markers(wd)
    out = hpcddf("submit", "SIM2", *field["args"], "--control-exitafter=initial",
                 "--control-redofrom=start", home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "redofrom=start: archived" in out.stderr
    assert (wd / "old" / "image_dirin_SSD_init.dirty.fits").exists()
    assert (wd / "old" / "image_dirin_SSD_m.npy.ClusterCat.npy").exists()
    new = markers(wd)
    assert set(new) == {f"{s}.done.json" for s in ("image_dirin_SSD_init", "external_mask",
                                                  "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m")}
    assert all(json.loads(new[n])["finished"] > json.loads(old[n])["finished"] for n in new)
    # resubmitting (as a requeue would) never applies redofrom again
    again = hpcddf("resubmit", "SIM2", *field["args"], home=home)
    assert again.returncode == 0
    assert not (wd / "old" / "redo-2").exists() and markers(wd) == new


def test_a_failing_command_leaves_its_step_not_done(field):
    home, work = field["home"], field["work"]
    sim = hpcddf("simulate", str(work / "BAD1"), "--n-ms", "1", "--ntime", "5", home=home)
    assert sim.returncode == 0
    out = hpcddf("submit", "BAD1", *field["args"], "--data-colname=NO_SUCH_DATA", home=home)
    assert out.returncode != 0
    state = json.loads((work / "BAD1" / ".hpcddf" / "state.json").read_text())
    err = state["stages"]["initial"]["error"]
    assert state["stages"]["initial"]["state"] == "failed"
    assert err["step"] == "image_dirin_SSD_init" and err["returncode"] == 1
    assert "has no column NO_SUCH_DATA" in err["log_tail"]
    assert "has no column NO_SUCH_DATA" in Path(err["log"]).read_text()
    assert not markers(work / "BAD1")
