"""slurm/stop_slurm.sh stops what start_slurm.sh started, by pid file and process name, and
nothing else. The daemons are stand-ins: copies of ``sleep`` named slurmd and slurmdbd, whose
/proc/<pid>/comm is what the script checks (a real cluster is the integration tests')."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "stop_slurm.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="stop_slurm.sh runs as root only")


def _daemon(tmp_path: Path, name: str) -> subprocess.Popen:
    exe = tmp_path / "bin" / name
    exe.parent.mkdir(exist_ok=True)
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    return subprocess.Popen([str(exe), "300"])


def _stop(base: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPCDDF_SLURM_DIR": str(base)}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_slurmdbd_is_stopped_though_its_pid_file_matches_the_slurmd_glob(tmp_path):
    """slurmdbd.pid matches ``slurmd*.pid``: it must not be taken for a slurmd's and lost."""
    run = tmp_path / "slurm" / "run"
    run.mkdir(parents=True)
    procs = {name: _daemon(tmp_path, name) for name in ("slurmd", "slurmdbd")}
    try:
        for name, p in procs.items():
            (run / f"{name}.pid").write_text(f"{p.pid}\n")
        proc = _stop(tmp_path / "slurm")
        assert proc.returncode == 0, proc.stderr
        for p in procs.values():
            assert p.wait(timeout=60) is not None
        assert not list(run.glob("*.pid")), proc.stderr
        assert "stopped slurmdbd" in proc.stderr and "stopped slurmd " in proc.stderr
    finally:
        for p in procs.values():
            p.kill()


def test_a_pid_file_of_another_running_program_is_left_with_its_process(tmp_path):
    """A pid reused by another program: neither signalled nor its file forgotten. A stale
    file (no such process) is removed."""
    run = tmp_path / "slurm" / "run"
    run.mkdir(parents=True)
    other = _daemon(tmp_path, "notslurm")
    try:
        (run / "slurmctld.pid").write_text(f"{other.pid}\n")
        (run / "munged.pid").write_text("999999999\n")
        proc = _stop(tmp_path / "slurm")
        assert proc.returncode == 0, proc.stderr
        assert other.poll() is None, "another program was signalled"
        assert (run / "slurmctld.pid").is_file() and not (run / "munged.pid").exists()
        assert "is notslurm, not slurmctld: left alone" in proc.stderr
    finally:
        other.kill()
