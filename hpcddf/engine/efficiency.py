"""How well a stage used what it asked for: CPU efficiency and peak memory from sacct.

CPU efficiency is TotalCPU / (Elapsed x AllocCPUS) over every run of the job (requeues
included); peak memory is the largest MaxRSS of its steps (sacct fills MaxRSS only on step
rows such as ``123.batch``, so this asks without -X). A stage under ``LOW_CPU`` used less
than half the cores it held: it asks for too many, or waits on I/O.

The parsers are pure (unit-tested on pasted sacct output); :func:`add_efficiency` makes the one
sacct call for every record shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from hpcddf.engine.slurm_query import parse_elapsed

log = logging.getLogger(__name__)

LOW_CPU = 0.5
_UNITS = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}


@dataclass
class Usage:
    """A job's use over all its runs: CPU seconds used and held, and the peak RSS in bytes."""

    cpu_s: float = 0.0
    held_cpu_s: float = 0.0
    max_rss: int | None = None
    runs: int = field(default=0)

    @property
    def cpu_efficiency(self) -> float | None:
        return self.cpu_s / self.held_cpu_s if self.held_cpu_s > 0 else None


def usage_argv(ids: Sequence[str]) -> list[str]:
    """Job rows (with their TotalCPU, which sums their steps) and step rows (MaxRSS), every run."""
    return ["sacct", "-D", "-n", "-P", "-j", ",".join(ids),
            "-o", "JobID,ElapsedRaw,TotalCPU,AllocCPUS,MaxRSS"]


def cpu_seconds(text: str) -> float:
    """sacct's TotalCPU: ``MM:SS.mmm``, ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    text = text.strip()
    if not text:
        return 0.0
    whole, _, frac = text.partition(".")
    seconds = parse_elapsed(whole) or 0
    return seconds + (float("0." + frac) if frac.isdigit() else 0.0)


def rss_bytes(text: str) -> int | None:
    """sacct's MaxRSS (``307832K``, ``1.50G``, or plain bytes); None when not sampled."""
    text = text.strip()
    if not text:
        return None
    unit = _UNITS.get(text[-1].upper())
    number = text[:-1] if unit else text
    try:
        return int(float(number) * (unit or 1))
    except ValueError:
        return None


def parse_usage(text: str) -> dict[str, Usage]:
    """``JobID|ElapsedRaw|TotalCPU|AllocCPUS|MaxRSS`` rows -> each job's usage (step rows,
    ``<job>.<step>``, only add their MaxRSS to their job's)."""
    jobs: dict[str, Usage] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5 or not parts[0]:
            continue
        job, _, step = parts[0].partition(".")
        use = jobs.setdefault(job, Usage())
        rss = rss_bytes(parts[4])
        if rss is not None:
            use.max_rss = max(rss, use.max_rss or 0)
        if not step:
            _add_run(use, parts)
    return jobs


def _add_run(use: Usage, parts: list[str]) -> None:
    elapsed = parse_elapsed(parts[1]) or 0
    cpus = int(parts[3]) if parts[3].isdigit() else 0
    use.cpu_s += cpu_seconds(parts[2])
    use.held_cpu_s += elapsed * cpus
    use.runs += 1


def efficiency_values(use: Usage) -> dict[str, Any]:
    """What a stage's record shows of its job's usage."""
    eff = use.cpu_efficiency
    return {"cpu_efficiency": None if eff is None else round(eff, 3),
            "max_rss_bytes": use.max_rss,
            "low_efficiency": eff is not None and eff < LOW_CPU}


def add_efficiency(records: Sequence[dict[str, Any]]) -> str | None:
    """Each record with a job gets ``efficiency`` from ONE sacct call for them all. Returns why
    sacct did not answer (the records then have none), else None."""
    from hpcddf.engine.slurm_query import run_sacct
    from hpcddf.errors import SubmissionError
    ids = sorted({str(r["job_id"]) for r in records if r.get("job_id")})
    if not ids:
        return None
    try:
        found = parse_usage(run_sacct(usage_argv(ids)))
    except SubmissionError as exc:
        return f"sacct did not answer ({exc.message}): no efficiency"
    for r in records:
        use = found.get(str(r.get("job_id") or ""))
        if use is not None and use.runs:
            r["efficiency"] = efficiency_values(use)
    return None
