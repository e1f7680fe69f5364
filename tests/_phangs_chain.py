"""The PHANGS CASA chain of the simulated galaxy, run once on the real local Slurm and shared
by every test that reads its products: tests/integration/test_phangs_slurm_chain.py (what Slurm
was given and recorded, the walltime kill) and tests/science/test_phangs_engine.py (the science
of every product against the model). One run instead of two (the chain on Slurm, and the same
chain again on the local default) keeps CI's two cores for the tests that need them; both
modules are one work unit in tests/conftest.py, so the session fixture runs once.

`hpcddf phangs simulate` writes the galaxy, its MS and key files (Gaussian visibility noise);
`hpcddf phangs submit KEYDIR --site-file SITE` queues every stage as one job array each; the
imaging task's time limit is cut once so that Slurm's walltime signal requeues it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# hpcddf's PHANGS modules are imported where used: this plugin loads in every test session,
# also where the phangs extra is not installed
from tests.integration.conftest import SITE_TEMPLATE, hpcddf, queue_empty_of, require_slurm, sacct_settled, wait_for

CASA_ENV = Path(os.environ.get("HPCDDF_CASA_ENV", "/work/casa-env"))
STAGE_ORDER = ["stage_ms", "stage_line", "imaging", "postprocess", "derived", "release"]
FINAL = ("done", "failed", "cancelled")
WAIT_S = 1500  # the chain takes ~2 min alone; DDFacet tests may share the two cores
WALLTIME_MIN = 30


@dataclass
class Requeue:
    """The imaging task's walltime kill: its job, when hpcddf recorded the requeue, and the
    first attempt's snapshots (path -> mtime) at that moment."""

    job: str
    task: str
    at: float
    snapshots: dict[str, float]


@dataclass
class Chain:
    """One submitted and finished chain: what was planned, queued, recorded."""

    root: Path
    keys: Path
    doc: dict[str, Any]                 # `hpcddf phangs submit --json`
    waiting: dict[str, dict[str, str]]  # job id -> `scontrol show job` fields, right after submit
    rows: dict[str, dict[str, Any]]     # task id -> `hpcddf phangs status --json` row at the end
    sacct: dict[str, str]               # sacct job id -> state
    requeue: Requeue                    # the imaging task's walltime kill
    local: dict[str, Any]               # the local default's plan of the same keys (dry run)

    def tasks(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [t for s in self.doc["stages"] if stage in (None, s["name"]) for t in s["tasks"]]


def _require_casa() -> None:
    from hpcddf.errors import ConfigError
    from hpcddf.phangs.casaenv import find_casa_env
    try:
        find_casa_env(CASA_ENV)
    except ConfigError as exc:
        if os.environ.get("HPCDDF_REQUIRE_CASA") == "1":
            pytest.fail(f"the CASA environment is required here but not usable: {exc}")
        pytest.skip(f"no CASA environment ({exc})")


def _status(keys: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(hpcddf("phangs", "status", str(keys), "--json").stdout)
    return {r["task"]: r for r in rows}


def _scontrol_jobs(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """`scontrol show job -o` fields of each (array) job, keyed by JobId / ArrayJobId_TaskId."""
    jobs: dict[str, dict[str, str]] = {}
    for base in sorted({j.split("_")[0] for j in job_ids}):
        out = subprocess.run(["scontrol", "show", "job", "-o", base], capture_output=True,
                             text=True, timeout=60, check=False).stdout
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "ArrayTaskId" in fields and fields.get("ArrayJobId"):
                jobs[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
            elif "JobId" in fields:
                jobs[fields["JobId"]] = fields
    return jobs


def afterok_ids(dependency: str) -> list[str]:
    """Job ids of the afterok parts of a Slurm dependency: 'afterok:1_0(unfulfilled),...'."""
    ids = []
    for part in re.split(r"[,?]", re.sub(r"\([^)]*\)", "", dependency)):
        kind, _, rest = part.partition(":")
        if kind == "afterok":
            ids += [j for j in rest.split(":") if j]
    return ids


def snapshots(base: str) -> dict[str, float]:
    """The imaging steps' finished snapshots (``<base>_<step>.image``, published last) and
    their modification times."""
    return {str(p): p.stat().st_mtime for p in sorted(Path(base).parent.glob(f"{Path(base).name}_*.image"))}


def _time_limit(job: str, minutes: int) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"],
                   check=True, timeout=60, capture_output=True)


def _kill_by_walltime(work: Path, task: dict[str, Any], job: str) -> Requeue:
    """Once the task's first step is done, cut its time limit to 1 min: Slurm's walltime signal
    (30 s before the limit, checked every 30 s) then comes 0-30 s later. When hpcddf has
    recorded the requeue, put the limit back before the next attempt starts (Slurm holds a
    requeued job for cred_expire+1 s, 11 s here)."""
    from hpcddf.phangs.run_common import task_state_path
    base = task["params"]["imagename"]
    state = task_state_path(work, task["id"])

    def recorded() -> dict[str, Any]:
        try:
            return json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    wait_for(lambda: Path(f"{base}_dirty.image").exists() or recorded().get("state") in FINAL,
             WAIT_S, "the imaging task's dirty cube", every=0.5)
    assert recorded().get("state") == "running", f"imaging ended before its walltime kill: {recorded()}"
    _time_limit(job, 1)
    wait_for(lambda: recorded().get("state") in ("requeued", *FINAL), 300,
             "the walltime signal to requeue the imaging task", every=0.5)
    at, first = time.time(), snapshots(base)
    _time_limit(job, WALLTIME_MIN)
    assert recorded().get("state") == "requeued", f"imaging was not requeued: {recorded()}"
    return Requeue(job=job, task=task["id"], at=at, snapshots=first)


def _diagnostics(work: Path, keys: Path, rows: dict[str, dict[str, Any]]) -> str:
    """`hpcddf phangs status`, then error and log tail of every task not done."""
    table = hpcddf("phangs", "status", str(keys), check=False)
    parts = [f"hpcddf phangs status {keys}:\n{table.stdout}{table.stderr}"]
    for tid, r in rows.items():
        if r.get("state") == "done":
            continue
        parts.append(f"--- {tid}: state {r.get('state')} ({r.get('slurm_state')}), "
                     f"job {r.get('job_id')}, error {json.dumps(r.get('error'))[:1500]}")
        job = str(r.get("job_id") or "")
        for log in sorted((work / ".hpcddf" / "phangs-jobs").glob(f"*/{job}*_log.*")) if job else []:
            parts.append(f"{log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def phangs_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    require_slurm()
    _require_casa()
    from hpcddf.engine.sites import load_site
    from hpcddf.phangs.submit import submit_phangs
    root = tmp_path_factory.mktemp("phangs-slurm-chain")
    gal = root / "gal"
    hpcddf("phangs", "simulate", str(gal), "--noise-jy", "0.14", "--casa-env", str(CASA_ENV),
           timeout=900)
    site = root / "ci-phangs.toml"
    # Slurm here enforces walltimes but not memory or CPUs: the template's 1 CPU / 1 GB is fine
    site.write_text(SITE_TEMPLATE.format(root=root, walltime=str(WALLTIME_MIN), requeues=1,
                                         signal_delay=30, max_map=0))
    keys = gal / "keys"
    # what `hpcddf phangs submit KEYS --site local` (test_phangs_engine's run) would run, planned
    # here in-process before anything ran (the plan looks at which products exist), as JSON as
    # the command prints it
    local = json.loads(json.dumps(submit_phangs(load_site("local"), keys, dry_run=True), default=str))
    doc = json.loads(hpcddf("phangs", "submit", str(keys), "--site-file", str(site),
                            "--casa-env", str(CASA_ENV), "--json", timeout=300).stdout)
    job_ids = list(doc["jobs"].values())
    try:
        # while stage_ms runs, every later stage still waits: Slurm shows its dependency
        waiting = _scontrol_jobs(job_ids)
        work = Path(doc["work_dir"])
        total = doc["total_tasks"]
        imaging = [t for s in doc["stages"] if s["name"] == "imaging" for t in s["tasks"]][0]
        try:
            requeue = _kill_by_walltime(work, imaging, doc["jobs"][imaging["id"]])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_diagnostics(work, keys, _status(keys))}") from None

        def finished() -> bool:
            rows = _status(keys)
            return (len(rows) == total and all(r["state"] in FINAL for r in rows.values())) \
                or queue_empty_of(job_ids)
        t0 = time.time()
        try:
            wait_for(finished, WAIT_S, "every PHANGS task to end", every=10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_diagnostics(work, keys, _status(keys))}") from None
        rows = _status(keys)
        for _ in range(30):  # a job that just left squeue: give sacct and its state a moment
            if all(r["state"] in FINAL for r in rows.values()):
                break
            time.sleep(2)
            rows = _status(keys)
        print(f"\nPHANGS chain on Slurm: {time.time() - t0:.0f} s from submission to the end")
        not_done = {t for t, r in rows.items() if r["state"] != "done"}
        if not_done or len(rows) != total:
            pytest.fail(f"tasks not done: {sorted(not_done)} ({len(rows)} of {total} recorded)\n"
                        f"{_diagnostics(work, keys, rows)}")
        yield Chain(root=gal, keys=keys, doc=doc, waiting=waiting, rows=rows,
                    sacct=sacct_settled(sorted({j.split('_')[0] for j in job_ids})), requeue=requeue,
                    local=local)
    finally:
        if not queue_empty_of(job_ids):
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in job_ids})], check=False)
