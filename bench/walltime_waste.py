#!/usr/bin/env python3
"""Node time lost to walltimes in a two-field survey, on the local Slurm: redone work and every
other second a job holds the node (start-up, preflight, early requeues, the tail after the last
step), when the runner's static step estimates are wrong and it must learn from measurements.

Why: a real site's first field runs on the pipeline's static estimates, which are off by tens of
per cent; the runner must never start a step it cannot finish (redone work), and the later fields
must plan with what the first one measured (sized requests, stages split at step boundaries) so
that the node time Slurm charges is spent in steps. Counting only redone steps (the old bench)
hides the start-up and early-requeue seconds that made the real reduction's utilisation 0.89.

The survey: two fields in ONE work root, one after the other. B1 runs on static estimates,
each true x f with f drawn uniformly in [0.5, 1.5] (seeded by --seed; --error alternate: f
alternates 0.5, 1.5, 0.5, ... over the steps in plan order); B2 is submitted with the same options
once every stage of B1 is done or failed, so it plans with B1's measured durations. Steps have mixed
true lengths (STEP_SECONDS, ~10 min per field): with the 3-minute site walltime (usable per
attempt: walltime - signal delay - 30 s = 145 s) several steps do not fit the time left after
earlier steps, and one (130 s) nearly fills a whole attempt.

Allocated seconds: sacct ElapsedRaw summed over every attempt (sacct -D) of every job of the field
(the submit's and the state file's job ids: split stages are extra jobs). Step seconds: the true
durations of the steps that finished. Redone: ticks of step runs that did not finish.

    python bench/walltime_waste.py [--seed 1] [--error uniform|alternate] [--exitafter ampphase_di]
One survey is ~20 min of step work plus queueing and requeues: about 25-35 min. --scale 0.1
--exitafter initial is a ~2 min check of the plumbing. --compare runs the old bench instead
(one field, 10 s steps, 1-min walltime, noisy vs exact estimates, --runs per side: ~10 min a run).
Ends with: RESULT waste=<redone/allocated> utilisation=<step s/allocated> attempts=<sacct rows>
b1_... b2_... (the same per field) b1_jobs= b2_jobs= b2_walltime_min=<STAGE:minutes of each B2 job, plan order>.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import hpcddf, site_file, wait_for

STEP_S = 10
WALLTIME_MIN = "3"
SIGNAL_DELAY_S = 5
# True step lengths (s) over ampphase_di's six stages: 595 s. initial (145 s) and dirin_di
# (160 s) do not fit one 145 s attempt; image_dirin_SSD_m_c_di nearly fills one on its own.
STEP_SECONDS = {
    "image_dirin_SSD_init": 15, "external_mask": 10, "image_dirin_SSD": 50, "mask_diffuse": 10,
    "image_dirin_SSD_m": 60,
    "cluster": 20, "image_dirin_SSD_m_c": 80,
    "DIS0": 15, "image_dirin_SSD_m_c_di": 130, "image_dirin_SSD_m_c_di_m": 15,
    "DDS0": 25, "image_phase1": 35,
    "mask_phase1": 10, "DDS1": 45, "image_ampphase1": 20,
    "Predict_DI1": 10, "DIS1": 30, "image_ampphase1_di": 15,
}
TERMINAL = ("done", "failed", "interrupted", "cancelled")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ .*step (\S+): (starting|done in)")


# ------------------------------------------------------------------ shared
def attempts_node_seconds(job: str) -> tuple[float, int]:
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,ElapsedRaw"],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.strip()]
    return float(sum(int(r[2]) for r in rows)), len(rows)


def _if_recorded(result: tuple[float, int]) -> tuple[float, int] | None:
    return result if result[1] else None


def redone_seconds(logs: Path) -> float:
    """Ticks of step runs that did not finish (a later run of the step did)."""
    lost = 0.0
    for log in logs.glob("*.log"):
        if log.name.startswith("hpcddf-"):
            continue
        for run in log.read_text().split("# hpcddf ")[1:]:
            if ": done" not in run:
                lost += run.count("tick ")
    return lost


def step_names(args: list[str]) -> list[str]:
    """The plan's steps, from a dry run (nothing queued)."""
    return [s for stage in hpcddf(*args, "--dry-run")["stages"] for s in stage["steps"]]


# ------------------------------------------------------------------ the two-field survey
def true_seconds(steps: list[str], scale: float) -> dict[str, float]:
    return {s: round(STEP_SECONDS.get(s, STEP_S) * scale, 2) for s in steps}


def wrong_estimates(true: dict[str, float], error: str, seed: int) -> dict[str, float]:
    """Static estimates off by up to +-50 %: true x f, f uniform in [0.5, 1.5] or alternating."""
    rng = random.Random(seed)
    return {s: round(t * (rng.uniform(0.5, 1.5) if error == "uniform" else (0.5, 1.5)[i % 2]), 2)
            for i, (s, t) in enumerate(true.items())}


def survey_args(site: Path, field: str, exitafter: str, true: dict[str, float],
                est: dict[str, float]) -> list[str]:
    opts = [a for s, t in true.items() for a in ("--pipeline-opt", f"seconds.{s}={t:g}")]
    opts += [a for s, e in est.items() for a in ("--pipeline-opt", f"estimate.{s}={e:g}")]
    return ["submit", field, "--site-file", str(site), "--pipeline", "scaled",
            f"--control-exitafter={exitafter}", *opts]


def sacct(job: str, fmt: str, attempts: bool = True) -> list[list[str]]:
    cmd = ["sacct", "-X", "-n", "-P", "-j", job, "-o", fmt] + (["-D"] if attempts else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [ln.split("|") for ln in out.splitlines() if ln.strip()]


def live_jobs(jobs: list[str]) -> list[tuple[str, str, str]]:
    """(id, state, reason) of the field's jobs still in the queue."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i|%T|%r"],
                         capture_output=True, text=True).stdout
    return [tuple(ln.split("|")) for ln in out.splitlines() if ln.strip()]  # type: ignore[misc]


def field_finished(state_file: Path, jobs: list[str]) -> bool:
    """Every stage done or failed; stages behind a failed one never start: cancel their jobs."""
    stages = json.loads(state_file.read_text())["stages"].values()
    if all(s["state"] in TERMINAL for s in stages):
        return True
    live = live_jobs(jobs)
    if any(s["state"] == "failed" for s in stages) and live and \
            all(st == "PENDING" and "Dependency" in why for _, st, why in live):
        subprocess.run(["scancel", *[j for j, _, _ in live]], check=False)
        return True
    return False


def minutes(limit: str) -> float:
    """sacct's Timelimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def attempt_times(log: Path) -> list[tuple[float, str, str]]:
    """(epoch, step, 'starting'|'done in') of the stage log's step lines."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        m = LOG_TIME.match(line)
        if m:
            out.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp(), m[2], m[3]))
    return out


def attempt_breakdown(job: str, log: Path) -> list[dict[str, float]]:
    """Per attempt: elapsed, start-up (job start to first step), tail (last step end to job end)."""
    events = attempt_times(log)
    out = []
    for _, state, elapsed, start, end in sacct(job, "JobID,State,ElapsedRaw,Start,End"):
        t0 = datetime.strptime(start, "%Y-%m-%dT%H:%M:%S").timestamp()
        t1 = t0 + int(elapsed)
        inside = [e for e in events if t0 - 1 <= e[0] <= t1 + 1]
        starts = [e[0] for e in inside if e[2] == "starting"]
        dones = [e[0] for e in inside if e[2] == "done in"]
        out.append({"elapsed": float(elapsed), "steps": float(len(dones)),
                    "startup": (min(starts) - t0) if starts else float(elapsed),
                    "tail": (t1 - max(dones)) if dones else 0.0, "state": state})  # type: ignore[dict-item]
    return out


def run_field(root: Path, site: Path, field: str, exitafter: str, true: dict[str, float],
              est: dict[str, float]) -> dict[str, Any]:
    """Submit one field, wait for it, and count its node time."""
    t0 = time.time()
    doc = hpcddf(*survey_args(site, field, exitafter, true, est))
    state_file = root / "work" / field / ".hpcddf" / "state.json"
    submitted = [str(j) for j in doc["fields"][field]["jobs"].values()]
    try:
        wait_for(lambda: field_finished(state_file, submitted), 3600, every=3)
    except BaseException:  # the work root goes with the bench: its jobs must not outlive it
        subprocess.run(["scancel", *submitted], check=False)
        raise
    wall = time.time() - t0
    state = json.loads(state_file.read_text())
    by_job = {str(s["job_id"]): name for name, s in state["stages"].items() if s.get("job_id")}
    by_job.update({j: n for n, j in doc["fields"][field]["jobs"].items() if str(j) not in by_job})
    wait_for(lambda: not live_jobs(list(by_job)), 120)  # sacct's ElapsedRaw final
    time.sleep(2)
    by_job = dict(sorted(by_job.items(), key=lambda kv: int(kv[0])))  # submit order: the plan's
    limits = {n: minutes(sacct(j, "JobID,Timelimit", attempts=False)[0][1]) for j, n in by_job.items()}
    allocated, attempts, per_attempt = 0.0, 0, []
    for job, stage in by_job.items():
        node_s, n = wait_for(lambda j=job: _if_recorded(attempts_node_seconds(j)), 60)
        allocated += node_s
        attempts += n
        for a in attempt_breakdown(job, root / "work" / field / "logs" / f"hpcddf-{stage}.log"):
            per_attempt.append({"job": job, "stage": stage, **a})
    done = [s for s, v in state.get("steps", {}).items() if v.get("state") == "done" and s in true]
    step_s = sum(true[s] for s in done)
    redone = redone_seconds(root / "work" / field / "logs")
    failed = {k: (v.get("error") or {}).get("message", v["state"]) for k, v in state["stages"].items()
              if v["state"] != "done"}
    print(f"  {field}: stages " + ", ".join(f"{k}={v['state']} ({v.get('attempts', 0)} att.)"
                                          for k, v in state["stages"].items()), flush=True)
    for k, why in failed.items():
        print(f"  {field}: {k} NOT done: {why}", flush=True)
    for a in per_attempt:
        print(f"  {field} job {a['job']} {a['stage']:<14} {a['state']:<10} elapsed {a['elapsed']:4.0f} s, "
              f"{a['steps']:.0f} step(s) done, start-up {a['startup']:4.0f} s, tail {a['tail']:3.0f} s",
              flush=True)
    return {"allocated": allocated, "step_s": step_s, "redone": redone, "attempts": attempts,
            "jobs": len(by_job), "limits": limits, "wall": wall,
            "failed": len(failed), "steps_done": len(done), "steps": len(true),
            "startup": [a["startup"] for a in per_attempt], "tail": [a["tail"] for a in per_attempt],
            "empty": sum(1 for a in per_attempt if a["steps"] == 0)}


def ratios(r: dict[str, Any]) -> tuple[float, float]:
    total = r["allocated"] or 1.0
    return r["redone"] / total, r["step_s"] / total


def survey(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        root = Path(a.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        site = site_file(root, walltime=WALLTIME_MIN, signal_delay=SIGNAL_DELAY_S, requeues=10)
        steps = step_names(["submit", "B1", "--site-file", str(site), "--pipeline", "scaled",
                            f"--control-exitafter={a.exitafter}"])
        true = true_seconds(steps, a.scale)
        est = wrong_estimates(true, a.error, a.seed)
        print(f"{len(steps)} steps, {sum(true.values()):g} s of work per field, walltime {WALLTIME_MIN} min; "
              "true/estimate: " + " ".join(f"{s}={true[s]:g}/{est[s]:g}" for s in steps), flush=True)
        res = {}
        for field in ("B1", "B2"):
            if field == "B2":
                plan = hpcddf(*survey_args(site, field, a.exitafter, true, est), "--dry-run")
                print("  B2 plan: " + ", ".join(f"{s['name']}[{len(s['steps'])} steps, "
                                                f"{s['resources']['walltime_min']} min]"
                                                for s in plan["stages"]), flush=True)
            res[field] = r = run_field(root, site, field, a.exitafter, true, est)
            w, u = ratios(r)
            print(f"{field}: waste {w:.4f} utilisation {u:.4f}: {r['step_s']:g} step-s, redone {r['redone']:g} s, "
                  f"{r['allocated']:g} allocated s, {r['attempts']} attempts ({r['empty']} with no step done), "
                  f"{r['jobs']} jobs, median start-up {statistics.median(r['startup']):.0f} s, "
                  f"wall {r['wall']:.0f} s", flush=True)
    tot = {k: sum(res[f][k] for f in res) for k in ("allocated", "step_s", "redone", "attempts", "failed")}
    w, u = ratios(tot)
    out = [f"waste={w:.4f}", f"utilisation={u:.4f}", f"attempts={tot['attempts']}"]
    for f, r in res.items():
        fw, fu = ratios(r)
        p = f.lower()
        out += [f"{p}_waste={fw:.4f}", f"{p}_utilisation={fu:.4f}", f"{p}_attempts={r['attempts']}",
                f"{p}_jobs={r['jobs']}", f"{p}_allocated_s={r['allocated']:g}", f"{p}_step_s={r['step_s']:g}",
                f"{p}_redone_s={r['redone']:g}", f"{p}_startup_s={sum(r['startup']):.0f}",
                f"{p}_tail_s={sum(r['tail']):.0f}", f"{p}_empty_attempts={r['empty']}",
                f"{p}_wall_s={r['wall']:.0f}"]
    out += ["b2_walltime_min=" + ",".join(f"{n}:{m:g}" for n, m in res["B2"]["limits"].items()),
            f"failed={tot['failed']}", f"error={a.error}", f"seed={a.seed}", f"exitafter={a.exitafter}",
            f"scale={a.scale:g}", f"walltime_min={WALLTIME_MIN}"]
    print("RESULT " + " ".join(out))


# ------------------------------------------------------------------ the old comparison (--compare)
def submit_args(site: Path, step_s: float, exitafter: str) -> list[str]:
    return ["submit", "B1", "--site-file", str(site), "--pipeline", "scaled",
            "--pipeline-opt", f"seconds={step_s:g}", f"--control-exitafter={exitafter}"]


def drawn_estimates(steps: list[str], step_s: float, scatter: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {s: round(step_s * math.exp(scatter * rng.gauss(0.0, 1.0)), 2) for s in steps}


def run_once(step_s: float, exitafter: str, estimates: dict[str, float], work: float) -> dict[str, float]:
    """One reduction in a fresh work root; its redone, node-seconds, attempts, wall time."""
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        root = Path(tmp)
        site = site_file(root, walltime="1", requeues=8, signal_delay=5)
        opts = [a for s, e in estimates.items() for a in ("--pipeline-opt", f"estimate.{s}={e:g}")]
        t0 = time.time()
        doc = hpcddf(*submit_args(site, step_s, exitafter), *opts)
        jobs = doc["fields"]["B1"]["jobs"]
        state_file = root / "work" / "B1" / ".hpcddf" / "state.json"
        wait_for(lambda: all(s["state"] in ("done", "failed") for s in
                             json.loads(state_file.read_text())["stages"].values()), 1800)
        wall = time.time() - t0
        time.sleep(3)
        state = json.loads(state_file.read_text())
        total = 0.0
        attempts = 0
        for job in jobs.values():
            node_s, n = wait_for(lambda j=job: _if_recorded(attempts_node_seconds(j)), 60)
            total += node_s
            attempts += n
        redone = redone_seconds(root / "work" / "B1" / "logs")
    failed = [k for k, v in state["stages"].items() if v["state"] != "done"]
    print("  stages: " + ", ".join(f"{k}={v['state']} ({v['attempts']} att.)" for k, v in state["stages"].items()),
          flush=True)
    return {"waste": redone / total, "redone_s": redone, "node_s": total, "attempts": attempts,
            "idle_s": total - work - redone, "wall_s": wall, "failed": len(failed)}


def compare(a: argparse.Namespace) -> None:
    """The old bench: one field, 10 s steps, noisy vs exact estimates, interleaved A B B A ..."""
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        steps = step_names(submit_args(site_file(Path(tmp)), a.step_seconds, a.exitafter))
    work = len(steps) * a.step_seconds
    results: dict[str, list[dict[str, float]]] = {"noisy": [], "perfect": []}
    for k in range(a.runs):
        for side in (("perfect", "noisy") if k % 2 == 0 else ("noisy", "perfect")):
            if side == "perfect":
                est = {s: a.step_seconds for s in steps}
            else:
                est = drawn_estimates(steps, a.step_seconds, a.scatter, a.seed + k)
            print(f"run {k} {side}: estimates/true " +
                  " ".join(f"{e / a.step_seconds:.2f}" for e in est.values()), flush=True)
            r = run_once(a.step_seconds, a.exitafter, est, work)
            results[side].append(r)
            print(f"run {k} {side}: waste {r['waste']:.4f}, redone {r['redone_s']:.0f} s, "
                  f"{r['node_s']:.0f} node-s, {r['attempts']:.0f} attempts, wall {r['wall_s']:.0f} s", flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    failed = sum(r["failed"] for rs in results.values() for r in rs)
    print(f"RESULT waste={med('noisy', 'waste'):.4f} redone_s={med('noisy', 'redone_s'):.0f} "
          f"node_s={med('noisy', 'node_s'):.0f} attempts={med('noisy', 'attempts'):.0f} "
          f"perfect_waste={med('perfect', 'waste'):.4f} perfect_node_s={med('perfect', 'node_s'):.0f} "
          f"perfect_attempts={med('perfect', 'attempts'):.0f} idle_s={med('noisy', 'idle_s'):.0f} "
          f"perfect_idle_s={med('perfect', 'idle_s'):.0f} runs={a.runs} scatter={a.scatter:g} "
          f"seed={a.seed} exitafter={a.exitafter} step_s={a.step_seconds:g} failed={failed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1, help="seed of the estimate errors (default 1)")
    ap.add_argument("--error", choices=("uniform", "alternate"), default="uniform",
                    help="estimate = true x f: f uniform in [0.5, 1.5] (default) or 0.5, 1.5, 0.5, ...")
    ap.add_argument("--exitafter", default="ampphase_di", metavar="STAGE", help="last stage (default ampphase_di)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every true step length (0.1: a quick check)")
    ap.add_argument("--keep", metavar="DIR", help="survey in this (new) folder and keep it, logs and all")
    ap.add_argument("--compare", action="store_true", help="the old bench instead: noisy vs exact estimates")
    ap.add_argument("--runs", type=int, default=3, help="--compare: runs per side, interleaved (default 3)")
    ap.add_argument("--scatter", type=float, default=0.4, help="--compare: sigma of ln(estimate / true)")
    ap.add_argument("--step-seconds", type=float, default=STEP_S, help="--compare: every step's length")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    if a.compare:
        compare(a)
    else:
        survey(a)


if __name__ == "__main__":
    main()
