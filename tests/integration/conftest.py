"""Fixtures for tests against the real one-node Slurm that slurm/start_slurm.sh runs.

These tests are not skipped quietly: when HPCDDF_REQUIRE_SLURM=1 (set by .ci/run) a missing
cluster is a failure; otherwise the skip says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests._require import missing

HPCDDF = [sys.executable, "-m", "hpcddf"]


def _cluster_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0 or not any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no usable Slurm node: {out.stdout.strip()} {out.stderr.strip()}"
    return None


def require_slurm() -> None:
    """Skip without the local cluster; fail where HPCDDF_REQUIRE_SLURM=1 (.ci/run)."""
    why = _cluster_up()
    if why:
        missing("HPCDDF_REQUIRE_SLURM",
                f"local Slurm cluster not usable ({why}); start it with slurm/start_slurm.sh")


# the science image (containers/build-science-image.sh; .ci/run builds it and exports the path)
SCIENCE_IMAGE = Path(os.environ.get("HPCDDF_SCIENCE_IMAGE", "/var/cache/hpcddf/science-image"))


def require_image(image: Path, witness: str, build: str) -> Path:
    """``image`` when ch-run is installed and the image holds ``witness`` (a file the image's
    build writes); otherwise skip, or fail where HPCDDF_REQUIRE_CONTAINER=1."""
    why = None
    if shutil.which("ch-run") is None:
        why = "ch-run is not installed (apt-get install charliecloud-runtime)"
    elif not (image / witness).exists():
        why = f"no image at {image} (build it with {build})"
    if why:
        missing("HPCDDF_REQUIRE_CONTAINER", why)
    return image


def require_science_image() -> Path:
    """The science image (tests/integration and tests/science run the reduction in it)."""
    return require_image(SCIENCE_IMAGE, ".hpcddf-stamp", "containers/build-science-image.sh")


CONTAINER_SECTION = """
[container]
runtime = "charliecloud"
image = "{image}"
"""


@pytest.fixture(scope="session")
def slurm() -> None:
    require_slurm()


SITE_TEMPLATE = """
scheduler = "slurm"
[slurm]
partition = "debug"
exclusive = false
max_walltime = "{walltime}"
max_requeues = {requeues}
signal_delay_s = {signal_delay}
[node]
cpus = 1
mem_gb = 1
scratch_dir = "{root}/scratch/$SLURM_JOB_ID"
scratch_min_free_gb = 0
[preflight]
shm_min_fraction = 0.01
thp_defrag = ["never", "defer", "madvise", "always", "defer+madvise"]
min_max_map_count = {max_map}
[paths]
work_root = "{root}/work"
[fields]
pattern = "F[0-9]+"
max_running = 4
"""


@pytest.fixture
def slurm_site(tmp_path: Path, slurm: None) -> Callable[..., Path]:
    """Write a site file for the local cluster; keyword arguments change its settings."""
    def make(walltime: str = "10", requeues: int = 3, signal_delay: int = 5, max_map: int = 0) -> Path:
        path = tmp_path / f"ci-{walltime.replace(':', '')}-{requeues}-{max_map}.toml"
        path.write_text(SITE_TEMPLATE.format(root=tmp_path, walltime=walltime, requeues=requeues,
                                             signal_delay=signal_delay, max_map=max_map))
        return path
    yield make
    # never leave this test's jobs behind
    out = subprocess.run(["squeue", "-h", "-o", "%A %j"], capture_output=True, text=True)
    ids = [ln.split()[0] for ln in out.stdout.splitlines() if "hpcddf-" in ln]
    for state_file in tmp_path.glob("work/*/.hpcddf/state.json"):
        st = json.loads(state_file.read_text())
        mine = {str(s.get("job_id", "")).split("_")[0] for s in st.get("stages", {}).values()}
        kill = [i for i in ids if i.split("_")[0] in mine]
        if kill:
            subprocess.run(["scancel", *kill], check=False)


def hpcddf(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*HPCDDF, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"hpcddf {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def read_state(work: Path, field: str) -> dict[str, Any]:
    return json.loads((work / field / ".hpcddf" / "state.json").read_text())


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def queue_empty_of(job_ids: list[str]) -> bool:
    bases = {j.split("_")[0] for j in job_ids}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout
    return not any(line.split("_")[0] in bases for line in out.split())


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
                         capture_output=True, text=True).stdout
    return {ln.split("|")[0]: ln.split("|")[1].split()[0] for ln in out.splitlines() if "|" in ln}


NOT_YET_FINAL = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"}


def sacct_settled(job_ids: list[str], timeout: float = 180) -> dict[str, str]:
    """sacct's final state of every job. slurmctld tells slurmdbd asynchronously, so a job that
    has left squeue can still be PENDING or RUNNING in the accounting database for a while on a
    busy machine (CI saw a cancelled dependent still PENDING there). An array's id stands for
    all its tasks."""
    def final() -> dict[str, str] | None:
        s = sacct_states(job_ids)
        known = set(s) | {k.split("_")[0] for k in s}
        return s if set(job_ids) <= known and not NOT_YET_FINAL & set(s.values()) else None
    return wait_for(final, timeout, "sacct's final states")
