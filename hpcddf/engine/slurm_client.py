"""Every Slurm command of the login node goes through here: timeouts, retries, idempotent sbatch,
the cluster's limits.

A busy controller answers "Socket timed out" or "Unable to contact slurm controller" to
requests it may well have carried out. Such answers (:data:`TRANSIENT`) are retried with
exponential backoff, a small bounded number of times; a refusal (invalid account, bad partition,
a policy limit) is never retried: it would be refused again.

sbatch is special: a submission that timed out may have been queued. Every submission carries
a unique token (``--comment=hpcddf:<uuid>``); before a retry the job is looked up by it
(squeue, then sacct for a job that already ended), and a job found is taken as the answer, so
one submission never becomes two chains. submitit runs sbatch as a command; it runs
``python -m hpcddf.engine.slurm_client sbatch FILE`` instead, which does all this and prints
sbatch's own "Submitted batch job N" line.

Limits: ``MaxArraySize`` and ``MaxJobCount`` from ``scontrol show config``, the user's
``MaxSubmitJobs`` (``GrpSubmitJobs``) from the association; arrays are split and fields held
back so that a submission never exceeds them (:func:`array_cap`, :func:`fields_within`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pwd
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from hpcddf.errors import SubmissionError

log = logging.getLogger(__name__)
T = TypeVar("T")

# What Slurm says when it may not have heard the request, or could not act on it just now
# (slurm_errno.c's strings; sbatch's own for a full queue). Matched as substrings.
TRANSIENT = (
    "Socket timed out on send/recv operation",          # SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT
    "Unable to contact slurm controller",               # connect/send/receive/shutdown failure
    "Zero Bytes were transmitted or received",          # SLURM_PROTOCOL_SOCKET_ZERO_BYTES_SENT
    "Rate limit exceeded, please retry momentarily",    # SLURMCTLD_COMMUNICATIONS_BACKOFF (RPC rate limit)
    "Slurm temporarily unable to accept job",           # sbatch: MaxJobCount reached
    "Unable to create job record, try again",           # ESLURM_ERROR_ON_DESC_TO_RECORD_COPY
    "Resource temporarily unavailable",                 # EAGAIN
    "Slurm backup controller in standby mode",          # ESLURM_IN_STANDBY_MODE (fail-over)
    "Job can not be altered now, try again later",      # ESLURM_TRANSITION_STATE_NO_UPDATE
)
TIMED_OUT = 124          # exit code of a command that did not answer in its timeout (coreutils' too)
TOKEN_PREFIX = "hpcddf:"
SBATCH_TIMEOUT_S = 120.0  # sbatch answers in well under a second; a busy controller may take tens


def is_transient(text: str) -> bool:
    """Whether Slurm's error text says "try again" rather than "no"."""
    return any(t.lower() in text.lower() for t in TRANSIENT)


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a transient failure is retried: ``attempts`` in all, the
    n-th retry after ``first_delay_s * 2**n`` seconds, never more than ``max_delay_s``."""

    attempts: int = 4
    first_delay_s: float = 2.0
    max_delay_s: float = 30.0

    def delays(self) -> list[float]:
        """The pause before each retry (``attempts - 1`` of them)."""
        return [min(self.max_delay_s, self.first_delay_s * 2 ** n) for n in range(max(0, self.attempts - 1))]


DEFAULT_RETRY = Retry()


class SlurmCommandFailed(SubmissionError):
    """A Slurm command failed; ``transient`` when retrying may help, ``stderr`` what it said."""

    def __init__(self, argv: Sequence[str], stderr: str, transient: bool, timed_out: bool = False) -> None:
        hint = "the Slurm controller may be busy: retry later" if transient else None
        super().__init__(f"{argv[0]} failed: {stderr.strip()[:300]}", hint)
        self.stderr = stderr
        self.transient = transient
        self.timed_out = timed_out


def run_once(argv: Sequence[str], timeout_s: float) -> str:
    """One call: stdout, or :class:`SlurmCommandFailed` (a timeout counts as transient)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise SubmissionError(f"{argv[0]} not found",
                              "run hpcddf on a node where Slurm's commands are on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandFailed(argv, f"no answer in {timeout_s:.0f} s", True, timed_out=True) from None
    if done.returncode != 0:
        err = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        raise SlurmCommandFailed(argv, err, is_transient(err))
    return done.stdout


def run(argv: Sequence[str], timeout_s: float = 60.0, retry: Retry = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep) -> str:
    """A Slurm command that is safe to repeat (queries, scontrol, scancel): stdout, retried
    with backoff on transient failures only; the last failure is raised."""
    for delay in [*retry.delays(), None]:
        try:
            return run_once(argv, timeout_s)
        except SlurmCommandFailed as exc:
            if not exc.transient or delay is None:
                raise
            log.warning("%s: %s; retrying in %.0f s", argv[0], exc.stderr.strip()[:200], delay)
            sleep(delay)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ idempotent sbatch

def new_token() -> str:
    """A submission's unique token, carried as its ``--comment``."""
    return f"{TOKEN_PREFIX}{uuid.uuid4().hex}"


def script_option(script: str, option: str) -> str | None:
    """The value of ``#SBATCH --option=value`` in a batch script (``None`` when absent)."""
    m = re.search(rf"^#SBATCH\s+--{re.escape(option)}[= ](\S+)\s*$", script, re.MULTILINE)
    return m.group(1).strip("'\"") if m else None


def parse_squeue_tokens(text: str, token: str) -> str | None:
    """The (array) job id of the ``%F|%k`` line carrying ``token``."""
    for line in text.splitlines():
        job, _, comment = line.strip().partition("|")
        if job and comment.strip() == token:
            return job.strip()
    return None


def parse_sacct_tokens(text: str, token: str, since: dt.datetime) -> str | None:
    """The array (or plain) job id of a ``JobID|Comment|Submit`` line that is this submission:
    its comment is ``token``, or the cluster does not keep comments (sacct shows none; the
    job's name was already matched) and it was submitted at or after ``since``."""
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        job, comment = parts[0].split("_")[0], parts[1].strip()
        if comment == token or (not comment and _submitted_since(parts[2].strip(), since)):
            return job
    return None


def _submitted_since(text: str, since: dt.datetime) -> bool:
    try:
        return dt.datetime.fromisoformat(text) >= since
    except ValueError:
        return False


def find_submitted(token: str, name: str | None, since: dt.datetime, timeout_s: float = 30.0,
                   retry: Retry = DEFAULT_RETRY, sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The job id of a submission that went through although sbatch said it failed: by its
    token among the user's jobs the controller still holds (``-t all``: ended ones too, for
    MinJobAge, as accounting records arrive seconds late), then in accounting (a job that ended
    longer ago). None when neither has it. Neither answering raises: resubmitting blind could
    queue the job twice."""
    squeue = ["squeue", "-u", _user(), "-h", "-t", "all", "-o", "%F|%k"]  # --me: Slurm 20.11+ only
    found = parse_squeue_tokens(run(squeue, timeout_s, retry, sleep), token)
    if found or not name:
        return found
    argv = ["sacct", "-X", "-n", "-P", "--name", name, "-S", since.strftime("%Y-%m-%dT%H:%M:%S"),
            "-o", "JobID,Comment,Submit"]
    return parse_sacct_tokens(run(argv, timeout_s, retry, sleep), token, since)


def _user() -> str:
    """This user's name ($USER may be unset, e.g. under cron)."""
    return pwd.getpwuid(os.getuid()).pw_name


def sbatch(script_path: Path, retry: Retry = DEFAULT_RETRY, timeout_s: float = SBATCH_TIMEOUT_S,
           sleep: Callable[[float], None] = time.sleep) -> str:
    """sbatch's answer ("Submitted batch job N") for the batch script, submitted once: a
    transient failure is retried, but only after looking the job up by the script's token."""
    script = script_path.read_text()
    token, name = script_option(script, "comment"), script_option(script, "job-name")
    since = dt.datetime.now().replace(microsecond=0) - dt.timedelta(seconds=1)
    for delay in [*retry.delays(), None]:
        try:
            return run_once(["sbatch", str(script_path)], timeout_s)
        except SlurmCommandFailed as exc:
            if not exc.transient:
                raise
            log.warning("sbatch: %s; looking the job up", exc.stderr.strip()[:200])
            sleep(retry.first_delay_s if delay is None else delay)
            found = find_submitted(token, name, since, retry=retry, sleep=sleep) if token else None
            if found:
                log.warning("sbatch: job %s was queued after all (token %s)", found, token)
                return f"Submitted batch job {found}\n"
            if delay is None:
                raise
    raise AssertionError("unreachable")


def sbatch_command(script_path: Path, retry: Retry = DEFAULT_RETRY,
                   timeout_s: float = SBATCH_TIMEOUT_S) -> list[str]:
    """What submitit runs instead of ``sbatch FILE``."""
    return [sys.executable, "-m", "hpcddf.engine.slurm_client", "sbatch", "--attempts", str(retry.attempts),
            "--first-delay", str(retry.first_delay_s), "--max-delay", str(retry.max_delay_s),
            "--timeout", str(timeout_s), str(script_path)]


def _main(argv: Sequence[str]) -> int:
    """``python -m hpcddf.engine.slurm_client sbatch [options] FILE``: print sbatch's answer,
    or its error on stderr with its exit code (124 when Slurm never answered)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hpcddf.engine.slurm_client")
    ap.add_argument("command", choices=["sbatch"])
    ap.add_argument("--attempts", type=int, default=DEFAULT_RETRY.attempts)
    ap.add_argument("--first-delay", type=float, default=DEFAULT_RETRY.first_delay_s)
    ap.add_argument("--max-delay", type=float, default=DEFAULT_RETRY.max_delay_s)
    ap.add_argument("--timeout", type=float, default=SBATCH_TIMEOUT_S)
    ap.add_argument("script", type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        print(sbatch(a.script, Retry(a.attempts, a.first_delay, a.max_delay), a.timeout), end="")
    except SlurmCommandFailed as exc:
        print(exc.stderr.strip(), file=sys.stderr)
        return TIMED_OUT if exc.timed_out else 1
    except SubmissionError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------ cluster limits

@dataclass(frozen=True)
class ClusterLimits:
    """What the cluster lets this user queue: the largest array (tasks), the controller's job
    records, the user's queued jobs (None: no limit), and how many of each are in use now."""

    max_array_size: int = 1001
    max_job_count: int | None = None
    max_submit_jobs: int | None = None
    queued_mine: int = 0
    queued_all: int = 0

    def free_jobs(self) -> int | None:
        """How many more jobs (array tasks count one each) may be queued now; None: no limit."""
        room = [lim - used for lim, used in ((self.max_submit_jobs, self.queued_mine),
                                             (self.max_job_count, self.queued_all)) if lim is not None]
        return max(0, min(room)) if room else None


def parse_config(text: str) -> dict[str, str]:
    """``scontrol show config`` lines ``Key = value``."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_submit_limit(text: str) -> int | None:
    """The tightest of ``MaxSubmitJobs|GrpSubmitJobs`` over the user's association lines
    (``sacctmgr -P -n``); empty fields mean no limit."""
    values = [int(v) for line in text.splitlines() for v in line.strip().split("|") if v.strip().isdigit()]
    return min(values) if values else None


def _int_or(value: str | None, default: int | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else default


def read_limits(timeout_s: float = 30.0, retry: Retry = DEFAULT_RETRY) -> ClusterLimits:
    """The cluster's limits and this user's use of them now (three quick calls, once per
    submission). Accounting may be off: then no association limit is known."""
    config = parse_config(run(["scontrol", "show", "config"], timeout_s, retry))
    try:
        submit = parse_submit_limit(run(["sacctmgr", "show", "assoc", f"user={_user()}",
                                         "format=MaxSubmitJobs,GrpSubmitJobs", "-P", "-n"], timeout_s, retry))
    except SubmissionError as exc:
        log.info("no association limits (%s)", exc.message)
        submit = None
    owners = run(["squeue", "-h", "-r", "-o", "%U"], timeout_s, retry).split()
    return ClusterLimits(_int_or(config.get("MaxArraySize"), 1001) or 1001,
                         _int_or(config.get("MaxJobCount"), None), submit,
                         sum(1 for o in owners if o == str(os.getuid())), len(owners))


def array_cap(limits: ClusterLimits, site_cap: int = 0) -> int:
    """Most tasks in one array: the cluster's ``MaxArraySize`` (indices 0..N-1 are N tasks),
    or the site's ``[slurm] max_array_size`` when smaller (0: the cluster's)."""
    cap = max(1, limits.max_array_size)
    return min(cap, site_cap) if site_cap > 0 else cap


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` in consecutive pieces of at most ``size``."""
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def fields_within(costs: Sequence[int], free: int | None) -> int:
    """How many of the fields, in order, fit in ``free`` jobs (each field costs its stages)."""
    if free is None:
        return len(costs)
    n, used = 0, 0
    for cost in costs:
        if used + cost > free:
            break
        used, n = used + cost, n + 1
    return n


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
