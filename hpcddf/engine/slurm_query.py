"""Ask Slurm about jobs (squeue, sacct, scancel): argv builders, parsers, and thin runners.

Parsers are pure so they are unit-tested on real output; the runners call these Slurm commands
through ``slurm_client`` (timeouts, retries on a busy controller). A status refresh is one
squeue and one sacct whatever the number of fields; sacct given ``-j`` looks back to the epoch
(its default window then), so jobs that ended before midnight are found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from hpcddf.engine import slurm_client
from hpcddf.errors import SubmissionError

log = logging.getLogger(__name__)

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD",
          "PREEMPTED"}


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    elapsed_s: int | None = None
    nodes: int | None = None
    node_list: str = ""
    reason: str = ""
    exit_code: str = ""  # sacct's "code:signal" of the batch script
    derived_exit_code: str = ""  # the highest of the job's steps (srun), same form
    start: str = ""
    runs: tuple["JobInfo", ...] = ()  # sacct -D: every run of the job, oldest first, this one last

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def squeue_argv(ids: Sequence[str]) -> list[str]:
    return ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%M|%D|%N|%r"]


def sacct_argv(ids: Sequence[str]) -> list[str]:
    """Every run of each job (-D: a requeued job keeps its id and each run its row), with what
    ``classify`` needs. Explicit ids (-j) make sacct's default start time the epoch (man sacct,
    Slurm 22.05): no --starttime is needed for jobs that ended before midnight."""
    return ["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(ids),
            "-o", "JobID,State,ElapsedRaw,NNodes,NodeList,Reason,ExitCode,DerivedExitCode,Start"]


def parse_elapsed(text: str) -> int | None:
    """squeue's %M (``M:SS``, ``H:MM:SS``, ``D-HH:MM:SS``) or sacct's ElapsedRaw seconds."""
    text = text.strip()
    if not text or text in ("INVALID", "Unknown"):
        return None
    if text.isdigit():
        return int(text)
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


def parse_jobs(text: str) -> dict[str, JobInfo]:
    """Lines ``id|state|elapsed|nodes|nodelist|reason`` (squeue -o or sacct -P), and for sacct
    ``|exitcode|derived|start``. A job with several runs (sacct -D) is its latest run, with
    every run in ``runs``."""
    runs: dict[str, list[JobInfo]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        runs.setdefault(parts[0], []).append(_job_row(parts + [""] * (9 - len(parts))))
    jobs = {}
    for job_id, rows in runs.items():
        ordered = sorted(rows, key=lambda r: r.start if r.start[:1].isdigit() else "9")
        jobs[job_id] = replace(ordered[-1], runs=tuple(ordered))
    return jobs


def _job_row(parts: list[str]) -> JobInfo:
    state = parts[1].split()[0] if parts[1] else "UNKNOWN"  # "CANCELLED by 0"
    return JobInfo(parts[0], state, parse_elapsed(parts[2]),
                   int(parts[3]) if parts[3].isdigit() else None, parts[4], parts[5],
                   parts[6], parts[7], parts[8])


# a query only informs (the records stay as recorded if it fails): a short patience
QUERY_RETRY = slurm_client.Retry(attempts=3, first_delay_s=1.0, max_delay_s=4.0)


def _run(argv: list[str], timeout: float = 60) -> str:
    """The command's output through ``slurm_client`` (retried while the controller is busy)."""
    try:
        return slurm_client.run(argv, timeout, QUERY_RETRY)
    except slurm_client.SlurmCommandFailed as exc:
        if exc.timed_out:
            raise SubmissionError(f"{argv[0]} did not answer in {timeout:.0f} s",
                                  "the Slurm controller may be busy: retry") from None
        raise


def query_jobs(ids: Iterable[str]) -> dict[str, JobInfo]:
    """State of each job: squeue for live ones, sacct for the rest (when accounting is on)."""
    ids = sorted(set(i for i in ids if i))
    if not ids:
        return {}
    found = parse_jobs(_run(squeue_argv(ids)))
    missing = [i for i in ids if i not in found]
    if missing:
        try:
            found.update({k: v for k, v in parse_jobs(_run(sacct_argv(missing))).items() if k in missing})
        except SubmissionError as exc:
            log.info("sacct unavailable (%s): finished jobs show as unknown", exc.message)
    return found


def job_times(job_id: str) -> tuple[float | None, float | None]:
    """When this job (attempt) started and when Slurm will kill it (epoch seconds), each None
    if Slurm does not say."""
    import datetime as dt
    try:
        text = _run(["squeue", "-h", "-j", job_id, "-o", "%S|%e"], timeout=20).strip()
    except SubmissionError:
        return None, None
    out: list[float | None] = []
    for part in (text.split("|") + ["", ""])[:2]:
        try:
            out.append(dt.datetime.fromisoformat(part.strip()).timestamp())
        except ValueError:
            out.append(None)
    return out[0], out[1]


def job_end_time(job_id: str) -> float | None:
    """When Slurm will kill this job (epoch seconds), or None if Slurm does not say."""
    return job_times(job_id)[1]


def run_sacct(argv: list[str]) -> str:
    """sacct's answer to ``argv`` (built here or in ``efficiency``); SubmissionError if none."""
    return _run(argv)
