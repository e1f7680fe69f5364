"""Ask Slurm about jobs (squeue, sacct, scancel): argv builders, parsers, and thin runners.

Parsers are pure so they are unit-tested on real output; the runners call these Slurm commands
through ``slurm_client`` (timeouts, retries on a busy controller). A status refresh is one
squeue and one sacct whatever the number of fields; sacct given ``-j`` looks back to the epoch
(its default window then), so jobs that ended before midnight are found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def squeue_argv(ids: Sequence[str]) -> list[str]:
    return ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%M|%D|%N|%r"]


def sacct_argv(ids: Sequence[str]) -> list[str]:
    return ["sacct", "-X", "-n", "-P", "-j", ",".join(ids),
            "-o", "JobID,State,ElapsedRaw,NNodes,NodeList,Reason"]


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
    """Lines ``id|state|elapsed|nodes|nodelist|reason`` (squeue -o or sacct -P)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        state = parts[1].split()[0] if parts[1] else "UNKNOWN"  # "CANCELLED by 0"
        nodes = parts[3] if len(parts) > 3 else ""
        jobs[parts[0]] = JobInfo(parts[0], state, parse_elapsed(parts[2]) if len(parts) > 2 else None,
                                 int(nodes) if nodes.isdigit() else None,
                                 parts[4] if len(parts) > 4 else "", parts[5] if len(parts) > 5 else "")
    return jobs


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


def job_end_time(job_id: str) -> float | None:
    """When Slurm will kill this job (epoch seconds), or None if Slurm does not say."""
    import datetime as dt
    try:
        text = _run(["squeue", "-h", "-j", job_id, "-o", "%e"], timeout=20).strip()
        return dt.datetime.fromisoformat(text).timestamp()
    except (SubmissionError, ValueError):
        return None
