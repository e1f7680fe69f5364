"""Chunked imaging on the real local Slurm: a cube's chunks are ONE job array, the gather waits
for them, and a chunk killed by its walltime is requeued alone.

The plan, the submission (held arrays, per-task afterok), the node job (PhangsTask, the
engine's UnitJob), the runner and the casa_tasks command line are hpcddf's own; the CASA
environment is a stand-in whose ``python -m hpcddf.phangs.casa_tasks STAGE ...`` parses the
options with the real parser, enters the chunk's directory as casa_tasks does, and makes the
stage's products as empty directories (skipping those that exist, as the real stages do),
taking its time where the test needs a chunk to be running. Real CASA would cost minutes of
the CI budget for what is here a matter of the engine: the chunked cube against the single
call, with real CASA, is tests/science/test_phangs_casa.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpcddf.phangs.plan_chunks import PHASES
from hpcddf.phangs.run_common import task_state_path

from .conftest import SITE_TEMPLATE, hpcddf, queue_empty_of, wait_for

pytestmark = pytest.mark.timeout(900)

CUBE = "imaging/gal1/co21/a"
KEYS = {
    "master_key.txt": "imaging_root ../work/imaging\npostprocess_root ../work/postprocess\n"
                      "derived_root ../work/derived\nms_root ../ms\nms_key ms_file_key.txt\n"
                      "target_key target_definitions.txt\nconfig_key config_definitions.txt\n"
                      "imaging_key imaging_recipes.txt\n",
    "ms_file_key.txt": "gal1  p1  all  12m  1  gal1_12m_1.ms\n",
    "target_definitions.txt": "gal1  10h00m00s  +02d00m00s  0.0  60.0\n",
    # 60 km/s + 2 x 50 km/s of statwt edge in 2 km/s channels: 80 channels, 3 chunks of <= 27
    "config_definitions.txt": "interf_config a {'array_tags':['12m']}\n"
                              "line_product co21 {'line_tag':'co21','channel_kms':2.0,"
                              "'chunksize':27}\n",
    "imaging_recipes.txt": "all all_line all recipes/cube.clean\n",
    "recipes/cube.clean": "specmode = 'cube'\nrobust = 0.5\n",
}

# The stand-in for the CASA environment's python. SLOW names the chunk whose multiscale step
# takes long in its first attempt (SLURM_RESTART_COUNT unset or 0), so its walltime can be cut.
FAKE_PYTHON = r'''#!{python}
import json, os, sys, time
from pathlib import Path
assert sys.argv[1:3] == ["-m", "hpcddf.phangs.casa_tasks"], sys.argv
from hpcddf.phangs.casa_tasks import build_parser
from hpcddf.phangs.casa_imaging import enter_chunk_dir
a = build_parser().parse_args(sys.argv[3:])
stage = a.stage
out = {{"stage": stage}}
if stage in ("dirty", "multiscale", "singlescale"):
    enter_chunk_dir(a)
    base = str(Path(a.imagename).resolve())
    snap = Path(f"{{base}}_{{stage}}.image")
    if snap.exists():
        out["skipped"] = True
    else:
        first = os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0")
        if stage == "singlescale" and base.endswith("{fail}") and Path("{failfile}").exists():
            sys.exit("error: casa_tasks singlescale: the stand-in fails this chunk")
        if stage == "multiscale" and first and base.endswith("{slow}"):
            time.sleep(240)
        Path(f"{{base}}_{{stage}}.cwd").write_text(os.getcwd())
        for ext in ("image", "pb"):
            Path(f"{{base}}.{{ext}}").mkdir(exist_ok=True)
        snap.mkdir()
        out["cell"] = "0.3arcsec"
elif stage == "clean_mask":
    Path(f"{{a.imagename}}_cleanmask.im").mkdir(exist_ok=True)
elif stage == "gather_chunks":
    for c in a.chunk_imagename:
        assert Path(f"{{c}}_singlescale.image").is_dir(), c
    for ext in (".image", ".pb", "_singlescale.image"):
        Path(f"{{a.imagename}}{{ext}}").mkdir(exist_ok=True)
    out["chunks"] = a.chunk_imagename
elif stage == "export_image":
    Path(f"{{a.imagename}}.fits").write_text("")
else:
    sys.exit(f"error: the stand-in has no stage {{stage}}")
text = json.dumps(out)
print(text)
Path(os.environ["HPCDDF_CASA_SUMMARY"]).write_text(text)
'''


def fake_casa_env(root: Path, slow: str, fail: str = "no chunk fails") -> Path:
    """The stand-in; chunk ``fail``'s singlescale fails while ROOT/fail exists."""
    env = root / "casa-env"
    (env / "bin").mkdir(parents=True)
    python = env / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, slow=slow, fail=fail,
                                         failfile=root / "fail"))
    python.chmod(0o755)
    (env / "casasiteconfig.py").write_text("")
    tools = env / "lib" / "python3.11" / "site-packages" / "casatools"
    tools.mkdir(parents=True)
    (tools / "__init__.py").write_text("")
    return env


def write_project(root: Path) -> Path:
    keys = root / "keys"
    for name, text in KEYS.items():
        (keys / name).parent.mkdir(parents=True, exist_ok=True)
        (keys / name).write_text(text)
    (root / "ms" / "gal1_12m_1.ms").mkdir(parents=True)
    # the staged cube imaging reads (stage_line's product; not run here)
    (root / "work" / "imaging" / "gal1" / "gal1_a_co21.ms").mkdir(parents=True)
    return keys


def _state(work: Path, task: str) -> dict[str, Any]:
    try:
        return json.loads(task_state_path(work, task).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _sacct_all(array: str) -> list[tuple[str, str]]:
    """(job id, state) of every record of the array's tasks, requeued attempts included."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", array, "-o", "JobID,State"],
                         capture_output=True, text=True, timeout=60).stdout
    return [(ln.split("|")[0], ln.split("|")[1].split()[0]) for ln in out.splitlines() if "|" in ln]


def test_local_site_runs_the_phases_in_order_and_resubmits_only_a_failed_chunk(
        tmp_path: Path) -> None:
    """`--site local`: the chunk tasks phase by phase, then the gather; when one chunk fails,
    the gather is not run, and the resubmission runs that chunk alone, then the gather."""
    keys = write_project(tmp_path)
    env = fake_casa_env(tmp_path, slow="no chunk is slow here", fail="gal1_a_co21_chunk2")
    (tmp_path / "fail").write_text("")
    phases = [[f"{CUBE}/{phase}{k}" for k in range(3)] for phase in PHASES]
    order = [*(t for p in phases for t in p), CUBE]
    failed = phases[-1][2]
    first = hpcddf("phangs", "submit", str(keys), "--site", "local", "--stages", "imaging",
                   "--casa-env", str(env), check=False, timeout=300)
    assert first.returncode != 0 and "PHANGS task(s) failed" in first.stderr, first.stderr
    work = Path(json.loads(hpcddf("phangs", "submit", str(keys), "--site", "local", "--dry-run",
                                  "--json").stdout)["work_dir"])
    states = {t: _state(work, t) for t in order}
    assert states[failed]["state"] == "failed"
    assert states[CUBE]["state"] == "cancelled" and states[CUBE]["note"] == f"not run: {failed} failed"
    assert all(states[t]["state"] == "done" for t in order if t not in (failed, CUBE)), states
    assert [states[t]["started"] for t in order[:-1]] == sorted(states[t]["started"]
                                                                for t in order[:-1])
    (tmp_path / "fail").unlink()
    again = json.loads(hpcddf("phangs", "submit", str(keys), "--site", "local", "--stages",
                              "imaging", "--casa-env", str(env), "--json", timeout=300).stdout)
    assert list(again["jobs"]) == [failed, CUBE]          # in that order, nothing else
    assert sorted(again["done"]) == sorted(set(order) - {failed, CUBE})
    states = {t: _state(work, t) for t in order}
    assert all(s["state"] == "done" for s in states.values()), states
    assert {t: s["attempts"] for t, s in states.items()} == \
        {t: 2 if t == failed else 1 for t in order}


@pytest.mark.slurm
def test_chunks_are_one_array_and_a_killed_chunk_is_requeued_alone(slurm, tmp_path: Path) -> None:
    keys = write_project(tmp_path)
    slow = "gal1_a_co21_chunk1"
    env = fake_casa_env(tmp_path, slow)
    site = tmp_path / "ci-chunks.toml"
    site.write_text(SITE_TEMPLATE.format(root=tmp_path, walltime="10", requeues=2,
                                         signal_delay=30, max_map=0))
    doc = json.loads(hpcddf("phangs", "submit", str(keys), "--site-file", str(site), "--stages",
                            "imaging", "--casa-env", str(env), "--json").stdout)
    jobs = doc["jobs"]
    phases = [[f"{CUBE}/{phase}{k}" for k in range(3)] for phase in PHASES]
    chunks = phases[1]  # the multiscale phase: its chunk 1 is killed
    try:
        assert sorted(jobs) == sorted([*(t for p in phases for t in p), CUBE])
        arrays = []
        for phase in phases:
            (array,) = {jobs[t].split("_")[0] for t in phase}
            assert [jobs[t] for t in phase] == [f"{array}_{k}" for k in range(3)], jobs
            arrays.append(array)
        array = arrays[1]
        assert len({*arrays, jobs[CUBE].split("_")[0]}) == 4, jobs
        work = Path(doc["work_dir"])
        assert _state(work, CUBE)["waits_for"] == phases[-1]
        for before, phase in zip(phases, phases[1:]):
            assert all(_state(work, t)["waits_for"] == before for t in phase)

        # chunk 1 is running its long multiscale step: cut its time limit, Slurm's walltime
        # signal then requeues it through hpcddf (its own array task only)
        victim = jobs[chunks[1]]
        task = next(t for s in doc["stages"] for t in s["tasks"] if t["id"] == chunks[1])
        base = task["params"]["imagename"]
        wait_for(lambda: Path(f"{base}_cleanmask.im").exists(), 300, "chunk 1's clean mask")
        first_mtime = Path(f"{base}_cleanmask.im").stat().st_mtime
        subprocess.run(["scontrol", "update", f"JobId={victim}", "TimeLimit=1"], check=True,
                       timeout=60, capture_output=True)
        wait_for(lambda: _state(work, chunks[1]).get("state") in ("requeued", "done", "failed"),
                 300, "the walltime signal to requeue chunk 1", every=0.5)
        assert _state(work, chunks[1])["state"] == "requeued", _state(work, chunks[1])
        subprocess.run(["scontrol", "update", f"JobId={victim}", "TimeLimit=10"], check=False,
                       timeout=60, capture_output=True)
        wait_for(lambda: _state(work, CUBE).get("state") in ("done", "failed", "cancelled")
                 or queue_empty_of(list(jobs.values())), 600, "the gather")
        states = {t: _state(work, t) for t in [*(t for p in phases for t in p), CUBE]}
        assert {t: s["state"] for t, s in states.items()} == dict.fromkeys(states, "done"), states
        assert {t: s["attempts"] for t, s in states.items()} == \
            {t: 2 if t == chunks[1] else 1 for t in states}, "only the killed chunk ran twice"
        for before, phase in zip(phases, [*phases[1:], [CUBE]]):
            assert all(states[t]["started"] >= states[b]["ended"] for t in phase for b in before)
        # the requeued chunk went on after its clean mask; the others were not run again
        assert Path(f"{base}_cleanmask.im").stat().st_mtime == first_mtime
        for c in phases[-1]:
            params = next(t for s in doc["stages"] for t in s["tasks"] if t["id"] == c)["params"]
            assert Path(params["marker"]).is_file()
            # each chunk ran its tclean steps in its own directory
            for step in ("dirty", "multiscale", "singlescale"):
                assert Path(f"{params['imagename']}_{step}.cwd").read_text() == \
                    str(Path(params["imagename"]).parent)
        for ext in (".image", ".pb", "_singlescale.image", ".fits"):
            assert Path(task["params"]["imagename"].rsplit("_chunks", 1)[0] + ext).exists()
        # Slurm's record: three tasks of one array; only task 1 ran twice
        def settled() -> list[tuple[str, str]] | None:
            rec = _sacct_all(array)
            return rec if rec and not {"RUNNING", "PENDING", "COMPLETING"} & {s for _, s in rec} \
                else None
        records = wait_for(settled, 60, "sacct's records of the chunk array")
        runs = {f"{array}_{k}": [s for j, s in records if j == f"{array}_{k}"] for k in range(3)}
        assert runs[f"{array}_0"] == ["COMPLETED"] and runs[f"{array}_2"] == ["COMPLETED"], records
        assert runs[f"{array}_1"][-1] == "COMPLETED" and len(runs[f"{array}_1"]) == 2, records
        assert {j for j, _ in records} == set(runs), records
    finally:
        if not queue_empty_of(list(jobs.values())):
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in jobs.values()})],
                           check=False)
