"""The Slurm client on the real local Slurm, with the scaled pipeline: an sbatch that queues the
job and then answers "Socket timed out" (as a busy controller does) gives no second chain, for
a plain job and for an array; arrays larger than the cluster's MaxArraySize (10 in the local
cluster's slurm.conf, read from ``scontrol show config``) are split into several chains and
every field completes.

The busy controller is an ``sbatch`` first on PATH that runs the real sbatch, then prints the
controller's time-out and exits 1 on its first call: the job is really queued, the answer is
really lost. The scenarios run at once (each from its own directory, which sacct records as the
jobs' WorkDir: that is how this test finds every job it caused, duplicates included)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

from .conftest import HPCDDF, SITE_TEMPLATE, read_state, require_slurm, wait_for

pytestmark = pytest.mark.slurm
TIMED_OUT = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
QUICK = ["--pipeline", "scaled", "--pipeline-opt", "seconds=0.2"]


def _site(root: Path, slurm_extra: str = "") -> Path:
    path = root / "site.toml"
    text = SITE_TEMPLATE.format(root=root, walltime="10", requeues=3, signal_delay=5, max_map=0)
    path.write_text(text.replace("[slurm]\n", f"[slurm]\n{slurm_extra}", 1))
    return path


def _busy_sbatch(root: Path) -> dict[str, str]:
    """The environment of a login node whose controller loses the answer to the first sbatch."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\nout=$({shutil.which("sbatch")} "$@") || exit $?\n'
                      f'echo "$out" >> {root}/queued.log\n'
                      f'if [ ! -e {root}/lost ]; then touch {root}/lost; echo "{TIMED_OUT}" >&2; exit 1; fi\n'
                      'echo "$out"\n')
    sbatch.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _submit(root: Path, fields: list[str], *opts: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([*HPCDDF, "submit", *fields, "--site-file", str(root / "site.toml"), *QUICK, *opts,
                          "--json"], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    if out.returncode != 0:
        raise AssertionError(f"hpcddf submit exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)["fields"]


def _done(root: Path, fields: list[str], timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        states = {f: read_state(root / "work", f) for f in fields}
        ended = all(s["state"] in ("done", "failed", "cancelled") for st in states.values()
                    for s in st["stages"].values())
        return states if ended else None
    return wait_for(check, timeout, f"{len(fields)} fields to end", every=2)


def _jobs_from(root: Path, since: float) -> dict[str, str]:
    """Every job sacct has seen submitted from ``root`` since ``since``: id -> name."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 2))
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "-o", "JobID,JobName,WorkDir"],
                         capture_output=True, text=True, timeout=60).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.count("|") == 2]
    return {jid: name for jid, name, wd in rows if Path(wd) == root}


def _sacct_seen(r: dict[str, Any], expected: list[str]) -> dict[str, str]:
    """The jobs from the scenario's directory once sacct has the expected ones (accounting
    records arrive a little after the jobs end)."""
    def seen() -> dict[str, str] | None:
        jobs = _jobs_from(r["root"], r["t0"])
        return jobs if set(expected) <= set(jobs) else None
    return wait_for(seen, 60, f"sacct to record {expected}")


def lost_answer_plain(root: Path) -> dict[str, Any]:
    _site(root)
    t0 = time.time()
    fields = _submit(root, ["F93001"], "--control-exitafter=dirin", env=_busy_sbatch(root))
    states = _done(root, ["F93001"], 240)
    return {"fields": fields, "states": states, "root": root, "t0": t0,
            "queued": (root / "queued.log").read_text().splitlines()}


def lost_answer_array(root: Path) -> dict[str, Any]:
    _site(root)
    t0 = time.time()
    fields = _submit(root, ["F93002", "F93003"], "--control-exitafter=initial", env=_busy_sbatch(root))
    states = _done(root, ["F93002", "F93003"], 240)
    return {"fields": fields, "states": states, "root": root, "t0": t0,
            "queued": (root / "queued.log").read_text().splitlines()}


SPLIT_FIELDS = [f"F93{i}" for i in range(100, 125)]


def split_arrays(root: Path) -> dict[str, Any]:
    _site(root)  # no [slurm] max_array_size: the cluster's own limit is read
    fields = _submit(root, SPLIT_FIELDS, "--control-exitafter=initial")
    return {"fields": fields, "states": _done(root, SPLIT_FIELDS, 300)}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "plain": lost_answer_plain, "array": lost_answer_array, "split": split_arrays}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_slurm()
    roots = {name: tmp_path_factory.mktemp(name) for name in SCENARIOS}
    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(run, roots[name]) for name, run in SCENARIOS.items()}
    out: dict[str, Any] = {}
    for name, fut in futures.items():
        try:
            out[name] = fut.result()
        except Exception as exc:  # noqa: BLE001 - handed to the scenario's own test
            out[name] = exc
    yield out
    ids = {j.split("_")[0] for r in out.values() if isinstance(r, dict)
           for f in r["fields"].values() for j in f["jobs"].values()}
    subprocess.run(["scancel", *sorted(ids)], check=False, capture_output=True)


def _result(outcomes: dict[str, Any], name: str) -> dict[str, Any]:
    r = outcomes[name]
    if isinstance(r, Exception):
        raise r
    return r


def _all_done(states: dict[str, Any]) -> bool:
    return all(s["state"] == "done" for st in states.values() for s in st["stages"].values())


def test_a_lost_sbatch_answer_gives_one_job_per_stage(outcomes) -> None:
    r = _result(outcomes, "plain")
    jobs = r["fields"]["F93001"]["jobs"]
    assert list(jobs) == ["initial", "dirin"]
    # the first sbatch was queued and its answer lost: the real sbatch ran once per stage
    assert len(r["queued"]) == 2
    sacct = _sacct_seen(r, list(jobs.values()))
    assert sorted(sacct) == sorted(jobs.values())  # no other job came from this submission
    assert sorted(sacct.values()) == ["hpcddf-F93001-dirin", "hpcddf-F93001-initial"]
    assert _all_done(r["states"])


def test_a_lost_sbatch_answer_for_an_array_gives_one_array(outcomes) -> None:
    r = _result(outcomes, "array")
    jobs = {f: r["fields"][f]["jobs"]["initial"] for f in ("F93002", "F93003")}
    base = jobs["F93002"].split("_")[0]
    assert jobs == {"F93002": f"{base}_0", "F93003": f"{base}_1"}
    assert len(r["queued"]) == 1
    assert sorted(_sacct_seen(r, list(jobs.values()))) == [f"{base}_0", f"{base}_1"]
    assert _all_done(r["states"])


def test_arrays_beyond_max_array_size_are_split_and_all_complete(outcomes) -> None:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"^MaxArraySize\s*=\s*10$", config, re.M), "start_slurm.sh sets MaxArraySize=10"
    r = _result(outcomes, "split")
    ids = [r["fields"][f]["jobs"]["initial"] for f in SPLIT_FIELDS]
    arrays: dict[str, list[int]] = {}
    for job in ids:
        base, task = job.split("_")
        arrays.setdefault(base, []).append(int(task))
    assert sorted(len(t) for t in arrays.values()) == [5, 10, 10]
    assert all(sorted(t) == list(range(len(t))) for t in arrays.values())
    assert _all_done(r["states"])
    assert all(st["stages"]["initial"]["job_id"] == r["fields"][f]["jobs"]["initial"]
               for f, st in r["states"].items())
