"""The whole PHANGS CASA chain of the simulated galaxy on the real local Slurm.

`hpcddf phangs simulate` writes the galaxy, its MS and key files once (module fixture, Gaussian
visibility noise as in the local engine test); `hpcddf phangs submit KEYDIR --site-file SITE`
queues stage_ms, stage_line, imaging, postprocess and derived, each stage one job array (a
plain job when the stage has one task, as here) whose tasks wait (``afterok``) on exactly the
tasks the plan names. The checks: what Slurm was given (arrays, task counts, dependencies as
``scontrol`` shows them while the jobs wait), what hpcddf recorded (every task done, in
dependency order, every planned product there), and that the science is the local default's:
the tasks and their parameters are those `--site local` plans for the same keys, the strict
moment-0 holds the fraction of the model's 150 Jy km/s the local run holds (0.92-0.98), the cube
is in K with a round beam. The CASA environment is required (a failure, not a skip) when
HPCDDF_REQUIRE_CASA=1.

The imaging task is killed by its walltime once, as a reduction stage would be: when its dirty
cube is made, its Slurm time limit is cut to 1 min (``scontrol update``); Slurm's walltime
signal then requeues it through hpcddf, the limit is put back, and the second attempt must go
on after the products the first one made, without making them again.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits

from hpcddf.engine.paths import unit_paths
from hpcddf.engine.sites import load_site
from hpcddf.errors import ConfigError
from hpcddf.phangs.casaenv import find_casa_env
from hpcddf.phangs.run_common import task_state_path
from hpcddf.phangs.submit import submit_phangs
from tests.science.test_phangs_engine import TWELVE_M_ONLY

from .conftest import SITE_TEMPLATE, hpcddf, queue_empty_of, sacct_states, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(3600)]

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


def _afterok_ids(dependency: str) -> list[str]:
    """Job ids of the afterok parts of a Slurm dependency: 'afterok:1_0(unfulfilled),...'."""
    ids = []
    for part in re.split(r"[,?]", re.sub(r"\([^)]*\)", "", dependency)):
        kind, _, rest = part.partition(":")
        if kind == "afterok":
            ids += [j for j in rest.split(":") if j]
    return ids


def _snapshots(base: str) -> dict[str, float]:
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
    at, snapshots = time.time(), _snapshots(base)
    _time_limit(job, WALLTIME_MIN)
    assert recorded().get("state") == "requeued", f"imaging was not requeued: {recorded()}"
    return Requeue(job=job, task=task["id"], at=at, snapshots=snapshots)


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


@pytest.fixture(scope="module")
def chain(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    _require_casa()
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
                    sacct=sacct_states(sorted({j.split('_')[0] for j in job_ids})), requeue=requeue,
                    local=local)
    finally:
        if not queue_empty_of(job_ids):
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in job_ids})], check=False)


def test_one_array_per_stage_chained_with_afterok(chain: Chain) -> None:
    doc, jobs = chain.doc, chain.doc["jobs"]
    assert doc["scheduler"] == "slurm"
    assert [s["name"] for s in doc["stages"]] == STAGE_ORDER
    assert set(jobs) == {t["id"] for t in chain.tasks()}, "every planned task was queued"
    arrays = {}
    for stage in doc["stages"]:
        bases = {jobs[t["id"]].split("_")[0] for t in stage["tasks"]}
        assert len(bases) == 1, f"{stage['name']}: one array, not {sorted(bases)}"
        arrays[stage["name"]] = bases.pop()
        # as many Slurm jobs (array tasks) under that id as the stage has tasks
        members = [j for j in chain.sacct if j.split("_")[0] == arrays[stage["name"]]]
        assert len(members) == stage["array_size"] == len(stage["tasks"]), (stage["name"], members)
    assert len(set(arrays.values())) == len(STAGE_ORDER), f"one array per stage: {arrays}"
    # every task of stage k > 0 waits on exactly its planned predecessors, as Slurm has it
    for t in chain.tasks():
        want = sorted(jobs[d] for d in t["depends"])
        if t["stage"] == "stage_ms":
            assert not want
            continue
        assert want, f"{t['id']} waits for nothing"
        fields = chain.waiting.get(jobs[t["id"]])
        assert fields, f"scontrol did not show {jobs[t['id']]} ({t['id']}): {sorted(chain.waiting)}"
        dep = fields.get("Dependency", "")
        assert sorted(_afterok_ids(dep)) == want, (t["id"], dep)
    # and so does hpcddf's submission record (the task states)
    for t in chain.tasks():
        row = chain.rows[t["id"]]
        assert row["job_id"] == jobs[t["id"]] and row["scheduler"] == "slurm", row
        assert row["waits_for"] == t["depends"], (t["id"], row["waits_for"])


def test_every_task_done_in_order_with_its_products(chain: Chain) -> None:
    rows = chain.rows
    assert {r["stage"] for r in rows.values()} == set(STAGE_ORDER)
    assert {t: r["state"] for t, r in rows.items()} == dict.fromkeys(rows, "done")
    attempts = {t: r["attempts"] for t, r in rows.items()}
    assert attempts == {t: 2 if t == chain.requeue.task else 1 for t in rows}, attempts
    assert set(chain.sacct.values()) == {"COMPLETED"}, chain.sacct
    for t in chain.tasks():
        row = rows[t["id"]]
        for d in t["depends"]:
            assert row["started"] >= rows[d]["ended"], (t["id"], "started before", d)
        missing = [p for p in t["params"]["outputs"] + row["products"] if not Path(p).exists()]
        assert not missing, (t["id"], missing)
        assert t["params"]["outputs"], f"{t['id']} plans no product"


def test_a_walltime_kill_requeues_the_task_and_it_resumes(chain: Chain) -> None:
    """As a reduction stage: requeued by Slurm's walltime signal, the second attempt goes on
    after what the first one made (its snapshots are not made again), and every CASA run of
    both attempts is in the task's log files under the project."""
    rq = chain.requeue
    row = chain.rows[rq.task]
    assert row["state"] == "done" and row["attempts"] == 2, row
    assert chain.sacct[rq.job.split("_")[0]] == "COMPLETED" or chain.sacct.get(rq.job) == "COMPLETED"
    base = next(t for t in chain.tasks("imaging") if t["id"] == rq.task)["params"]["imagename"]
    assert f"{base}_dirty.image" in rq.snapshots, rq.snapshots
    after = _snapshots(base)
    for path, mtime in rq.snapshots.items():
        assert after[path] == mtime, f"{path} was made again after the requeue"
    assert set(after) > set(rq.snapshots), "the second attempt made the remaining snapshots"
    logs = unit_paths(Path(chain.doc["work_dir"])).logs / rq.task
    dirty_log = (logs / "casa-dirty.log").read_text()
    assert dirty_log.count("# hpcddf ") == 2, dirty_log[-2000:]  # one run per attempt ...
    assert "exists, skipped" in dirty_log  # ... and the second found the first one's cube
    assert (logs / "casa-singlescale.log").is_file()


def _planned_strict_mom0(chain: Chain) -> Path:
    """The native-resolution strict moment-0 the derived task planned (not a hard-coded name)."""
    (derived,) = chain.tasks("derived")
    outs = [m["out"] for m in derived["params"]["moments"]
            if m["moment"] == "strictmom0" and not m["tag"]]
    assert len(outs) == 1, derived["params"]["moments"]
    assert outs[0] in chain.rows[derived["id"]]["products"]
    return Path(outs[0])


def _planned_k_cube(chain: Chain) -> Path:
    (post,) = chain.tasks("postprocess")
    (cube,) = [p for p in post["params"]["outputs"] if p.endswith("_pbcorr_trimmed_k.fits")]
    return Path(cube)


def test_science_is_the_local_defaults(chain: Chain) -> None:
    # the same tasks, inputs, products and parameters as `--site local` plans: only the site
    # (scheduler, resources) differs
    assert chain.local["scheduler"] == "local" and chain.doc["scheduler"] == "slurm"
    for key in ("master_key", "work_dir", "total_tasks", "stages"):
        assert chain.doc[key] == chain.local[key], key
    truth = json.loads((chain.root / "model" / "model_truth.json").read_text())
    model_flux = truth["total_line_flux_jykms"]
    assert model_flux == pytest.approx(150.0, rel=1e-3)

    cube = fits.getheader(_planned_k_cube(chain))
    assert cube["BUNIT"].strip().upper() == "K", cube["BUNIT"]
    assert cube["BMAJ"] == pytest.approx(cube["BMIN"], rel=1e-6), (cube["BMAJ"], cube["BMIN"])

    hdu = fits.open(_planned_strict_mom0(chain))[0]
    h = hdu.header
    assert u.Unit(h["BUNIT"]) == u.Unit("K km / s"), h["BUNIT"]
    beam_sr = (math.pi * (h["BMAJ"] * u.deg) * (h["BMIN"] * u.deg) / (4 * math.log(2))).to(u.sr)
    restfreq = truth["spec"]["restfreq_ghz"] * u.GHz
    jy_per_k = (1 * u.K).to(u.Jy, u.brightness_temperature(restfreq, beam_sr)).value
    pix_per_beam = beam_sr.value / math.radians(abs(h["CDELT2"])) ** 2
    flux = float(np.nansum(hdu.data)) * jy_per_k / pix_per_beam
    print(f"\nstrict mom0 flux {flux:.1f} Jy km/s (model {model_flux:.1f}); "
          f"cube BUNIT {cube['BUNIT']}, beam {cube['BMAJ'] * 3600:.3f}\" x {cube['BMIN'] * 3600:.3f}\"")
    # the fraction of the model's flux the local default's run of this galaxy holds
    # (test_phangs_engine: 0.953 on the strict mask, the same in every run, fixed seeds): the
    # same tasks with the same parameters on Slurm, a requeue included, give the same science
    assert TWELVE_M_ONLY[0] <= flux / model_flux <= TWELVE_M_ONLY[1], (flux, model_flux)
