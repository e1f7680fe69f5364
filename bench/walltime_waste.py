#!/usr/bin/env python3
"""Work lost to walltime kills: a scaled reduction with 3x a walltime of work, on the local Slurm,
when the runner's step estimates are wrong (as they are in a real survey) and when they are exact.

Six stages (initial .. ampphase_di: 18 steps x 10 s = 180 s of work) run under a 1-minute
walltime per job, so most stages need several attempts. Before each step the runner checks that
its estimate fits in the walltime left; with exact estimates (the old bench's only case) a step
is (almost) never cut, so that number cannot show a regression in how wrong estimates are handled.
Here each step's estimate is drawn around its true duration, lognormal: true x exp(scatter x N(0,1))
(--scatter 0.4: ~40 % scatter, median = truth), seeded; the noisy side's run k uses seed + k, so
its median is over --runs draws. The perfect-information side (estimate = truth) runs beside it,
interleaved A B B A A B ..., each run in a fresh work root (measured durations, which override
the estimates, are not carried from one run to the next).

Work is "redone" when a step was interrupted by the kill and had to run again: the seconds its
interrupted runs had already spent (each scaled step logs a tick a second). Total node-seconds
is the sum of the elapsed time of every attempt (sacct); idle is what is neither work nor redone
(job start-up, and a stage stopped early because a step was overestimated).

    python bench/walltime_waste.py [--runs 3] [--scatter 0.4] [--seed 1] [--exitafter ampphase_di]
One run is ~9 one-minute attempts and their requeues (roughly 5-10 min), so the default is
6 runs, most of an hour; --exitafter initial (one stage, 5 steps) is a short version, and
--step-seconds 2 with it (nothing cut) a ~30 s check of the plumbing.
Ends with: RESULT waste=<median redone / node-seconds, estimates with error> ... perfect_waste=...
(waste, redone_s, node_s, attempts: the noisy side's medians; perfect_*: exact estimates, which
is what waste= meant before).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import hpcddf, site_file, wait_for

STEP_S = 10


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


def submit_args(site: Path, step_s: float, exitafter: str) -> list[str]:
    return ["submit", "B1", "--site-file", str(site), "--pipeline", "scaled",
            "--pipeline-opt", f"seconds={step_s:g}", f"--control-exitafter={exitafter}"]


def step_names(step_s: float, exitafter: str) -> list[str]:
    """The plan's steps, from a dry run (nothing queued)."""
    with tempfile.TemporaryDirectory(prefix="hpcddf-bench-") as tmp:
        plan = hpcddf(*submit_args(site_file(Path(tmp)), step_s, exitafter), "--dry-run")
    return [s for stage in plan["stages"] for s in stage["steps"]]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per side, interleaved (default 3)")
    ap.add_argument("--scatter", type=float, default=0.4, help="sigma of ln(estimate / true duration)")
    ap.add_argument("--seed", type=int, default=1, help="the noisy side's run k draws with seed + k")
    ap.add_argument("--exitafter", default="ampphase_di", metavar="STAGE")
    ap.add_argument("--step-seconds", type=float, default=STEP_S, help="true duration of every step")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    steps = step_names(a.step_seconds, a.exitafter)
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

    def span(side: str) -> tuple[float, float]:
        w = [r["waste"] for r in results[side]]
        return min(w), max(w)

    failed = sum(r["failed"] for rs in results.values() for r in rs)
    print(f"work {work:g} s ({len(steps)} steps x {a.step_seconds:g} s) in a 60 s walltime; medians over "
          f"{a.runs} runs: noisy estimates {med('noisy', 'attempts'):.0f} attempts, {med('noisy', 'node_s'):.0f} "
          f"node-s, redone {med('noisy', 'redone_s'):.0f} s; exact estimates {med('perfect', 'attempts'):.0f} "
          f"attempts, {med('perfect', 'node_s'):.0f} node-s, redone {med('perfect', 'redone_s'):.0f} s"
          + (f"; {failed} stage(s) FAILED" if failed else ""))
    lo, hi = span("noisy")
    plo, phi = span("perfect")
    print(f"RESULT waste={med('noisy', 'waste'):.4f} redone_s={med('noisy', 'redone_s'):.0f} "
          f"node_s={med('noisy', 'node_s'):.0f} attempts={med('noisy', 'attempts'):.0f} "
          f"perfect_waste={med('perfect', 'waste'):.4f} perfect_redone_s={med('perfect', 'redone_s'):.0f} "
          f"perfect_node_s={med('perfect', 'node_s'):.0f} perfect_attempts={med('perfect', 'attempts'):.0f} "
          f"idle_s={med('noisy', 'idle_s'):.0f} perfect_idle_s={med('perfect', 'idle_s'):.0f} "
          f"waste_min={lo:.4f} waste_max={hi:.4f} perfect_waste_min={plo:.4f} perfect_waste_max={phi:.4f} "
          f"runs={a.runs} scatter={a.scatter:g} seed={a.seed} exitafter={a.exitafter} step_s={a.step_seconds:g} "
          f"failed={failed}")


if __name__ == "__main__":
    main()
