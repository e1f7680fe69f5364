"""The whole PHANGS CASA chain of the simulated galaxy on the real local Slurm.

`hpcddf phangs simulate` writes the galaxy, its MS and key files once (the session fixture of
tests/_phangs_chain.py, whose products test_phangs_engine checks too); `hpcddf phangs submit KEYDIR --site-file SITE`
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
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits

from hpcddf.engine.paths import unit_paths
from tests._phangs_chain import STAGE_ORDER, Chain, afterok_ids, snapshots
from tests.science.test_phangs_engine import TWELVE_M_ONLY

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(3600)]


@pytest.fixture
def chain(phangs_chain: Chain) -> Chain:
    return phangs_chain


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
        assert sorted(afterok_ids(dep)) == want, (t["id"], dep)
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
    after = snapshots(base)
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
