"""The scaled pipeline: ddf-pipeline's stages and steps, each a few seconds of sleep + a file.

It goes through exactly the engine code the real reduction uses (plan, backend, node job,
preflight, staging, runner, markers, requeue), so tests and benchmarks exercise the real
engine in seconds, and a site can be smoke-tested before a 5-day run:
``hpcddf submit TEST1 --site mycluster --pipeline scaled``.

Run as a program it is one step: ``python -m hpcddf.lofar.scaled STEP --seconds S --out FILE``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcddf.engine.runner import Command, Step

OUT_DIR = "scaled"


def option(opts: Mapping[str, Any], key: str, default: Any) -> Any:
    return opts.get(key, default)


def build_scaled_steps(stage: str, step_names: Sequence[str], opts: Mapping[str, Any],
                       python: str, field_id: str = "") -> list[Step]:
    """Steps that sleep ``seconds`` (or ``seconds.<step>``) and write ``scaled/<step>.out``.

    ``fail=<step>`` makes that step exit 3 (``fail_times=N``: only its first N runs, or
    ``fail_times.<field>=N`` in one field; ``fail_fields=F1+F2``: only in those fields;
    ``fail_signal=KILL``: die by that signal instead, as DDFacet dies out of memory),
    ``estimate=<s>`` sets the runner's duration estimate (default: the sleep time).
    """
    fail_fields = [f for f in str(opts.get("fail_fields", "")).split("+") if f]
    steps = []
    for name in step_names:
        secs = float(opts.get(f"seconds.{name}", opts.get("seconds", 2.0)))
        out = f"{OUT_DIR}/{name}.out"
        argv = [python, "-m", "hpcddf.lofar.scaled", name, "--seconds", str(secs), "--out", out]
        if opts.get("fail") == name and (not fail_fields or field_id in fail_fields):
            times = opts.get(f"fail_times.{field_id}", opts.get("fail_times", 0))
            argv += ["--fail", "--fail-times", str(times), "--count-file", f"{OUT_DIR}/{name}.runs"]
            if opts.get("fail_signal"):
                argv += ["--fail-signal", str(opts["fail_signal"])]
        est = float(opts.get(f"estimate.{name}", opts.get("estimate", secs)))
        steps.append(Step(name=name, stage=stage,
                          commands=(Command(tuple(argv), f"{name}.log", timeout_s=secs * 5 + 120),),
                          outputs=(out,), params={"seconds": secs}, estimate_s=est))
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.scaled", description=__doc__)
    ap.add_argument("step")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fail", action="store_true", help="exit 3 instead of writing the output")
    ap.add_argument("--fail-times", type=int, default=0, help="fail only the first N runs (0: always)")
    ap.add_argument("--count-file", help="where runs are counted for --fail-times")
    ap.add_argument("--fail-signal", help="fail by this signal (e.g. KILL) instead of exit 3")
    a = ap.parse_args(argv)
    print(f"scaled step {a.step}: pid {os.getpid()}, python {sys.executable}, "
          f"sleeping {a.seconds} s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.fail:
        runs = 0
        if a.count_file:
            cf = Path(a.count_file)
            runs = int(cf.read_text()) if cf.exists() else 0
            cf.write_text(str(runs + 1))
        if a.fail_times == 0 or runs < a.fail_times:
            print(f"scaled step {a.step}: failing on purpose (run {runs + 1})", flush=True)
            if a.fail_signal:
                os.kill(os.getpid(), signal.Signals[f"SIG{a.fail_signal.upper()}"])
            return 3
    end = time.time() + a.seconds
    while (left := end - time.time()) > 0:  # one tick a second: benches measure interrupted work
        time.sleep(min(1.0, left))
        print(f"tick {time.time():.2f}", flush=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(f"{a.step} {time.time()}\n")
    os.replace(tmp, out)
    print(f"scaled step {a.step}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
