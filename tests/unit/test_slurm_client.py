"""The Slurm client without a cluster: which answers are retried, the backoff, the idempotent
sbatch (a busy controller cannot be made here, so stand-in Slurm commands on PATH answer as one
does), the token and limit parsers on real output formats, and the split arithmetic. The same
against the real local Slurm is tests/integration/test_busy_controller.py."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from hpcddf.engine import slurm_client as sc
from hpcddf.errors import SubmissionError


def _on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("text", [
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
    "squeue: error: Unable to contact slurm controller (connect failure)",
    "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying",
    "sbatch: error: Batch job submission failed: Rate limit exceeded, please retry momentarily",
    "scontrol: error: Resource temporarily unavailable",
    "sbatch: error: Batch job submission failed: Zero Bytes were transmitted or received",
])
def test_a_busy_controller_is_transient(text: str) -> None:
    assert sc.is_transient(text)


@pytest.mark.parametrize("text", [
    "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
    "sbatch: error: invalid partition specified: nope",
    "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy "
    "(job submit limit, user's size and/or time limits)",
    "scancel: error: Invalid job id specified",
])
def test_a_refusal_is_not_retried(text: str) -> None:
    assert not sc.is_transient(text)


def test_backoff_doubles_up_to_its_bound() -> None:
    assert sc.Retry(attempts=4, first_delay_s=2, max_delay_s=30).delays() == [2, 4, 8]
    assert sc.Retry(attempts=6, first_delay_s=2, max_delay_s=10).delays() == [2, 4, 8, 10, 10]
    assert sc.Retry(attempts=1).delays() == []


def _counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> Path:
    """A stand-in command that counts its calls in ``calls`` (``$n``: this call's number)."""
    calls = tmp_path / f"{name}.calls"
    _on_path(tmp_path, monkeypatch, name,
             f'echo x >> {calls}; n=$(wc -l < {calls})\n{body}')
    return calls


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_transient_failures_are_retried_with_backoff(tmp_path, monkeypatch) -> None:
    calls = _counting(tmp_path, monkeypatch, "scontrol", 'if [ "$n" -lt 3 ]; then '
                      'echo "scontrol: error: Socket timed out on send/recv operation" >&2; exit 1; fi; echo ok')
    slept: list[float] = []
    assert sc.run(["scontrol", "release", "1"], 5, sc.Retry(4, 0.5, 10), slept.append) == "ok\n"
    assert _lines(calls) == 3 and slept == [0.5, 1.0]


def test_a_refusal_is_raised_at_once_and_a_busy_controller_after_the_last_attempt(tmp_path, monkeypatch) -> None:
    calls = _counting(tmp_path, monkeypatch, "scontrol", 'echo "scontrol: error: Invalid job id specified" >&2; exit 1')
    with pytest.raises(sc.SlurmCommandFailed) as err:
        sc.run(["scontrol", "release", "1"], 5, sc.Retry(4, 0.01), lambda s: None)
    assert _lines(calls) == 1 and not err.value.transient
    calls = _counting(tmp_path, monkeypatch, "scancel",
                      'echo "scancel: error: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    with pytest.raises(sc.SlurmCommandFailed) as err:
        sc.run(["scancel", "1"], 5, sc.Retry(3, 0.01), lambda s: None)
    assert _lines(calls) == 3 and err.value.transient


def _script(tmp_path: Path, token: str) -> Path:
    """A batch script as submitit writes it, with the submission's token."""
    path = tmp_path / "job.sh"
    path.write_text(_make_sbatch_string(command="true", folder=tmp_path, job_name="hpcddf-F1-initial",
                                        comment=token))
    return path


def test_the_token_and_name_are_read_from_submitits_script(tmp_path) -> None:
    token = sc.new_token()
    text = _script(tmp_path, token).read_text()
    assert sc.script_option(text, "comment") == token and token.startswith("hpcddf:")
    assert sc.script_option(text, "job-name") == "hpcddf-F1-initial"
    assert sc.script_option(text, "account") is None


def test_sbatch_that_queued_the_job_and_timed_out_is_not_repeated(tmp_path, monkeypatch) -> None:
    """The controller queued the job but answered "Socket timed out": the look-up by token
    finds it, and sbatch is not run again."""
    token = sc.new_token()
    queued = tmp_path / "queued"
    calls = _counting(tmp_path, monkeypatch, "sbatch", f'echo "4242|{token}" > {queued}; '
                      'echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2; exit 1')
    _on_path(tmp_path, monkeypatch, "squeue", f'echo "17|(null)"; cat {queued} 2>/dev/null; true')
    answer = sc.sbatch(_script(tmp_path, token), sc.Retry(4, 0.01), 10, lambda s: None)
    assert answer == "Submitted batch job 4242\n" and _lines(calls) == 1


def test_sbatch_that_did_not_queue_is_retried_until_it_does(tmp_path, monkeypatch) -> None:
    calls = _counting(tmp_path, monkeypatch, "sbatch", 'if [ "$n" -lt 3 ]; then echo "sbatch: error: Batch job '
                      'submission failed: Unable to contact slurm controller (connect failure)" >&2; exit 1; fi; '
                      'echo "Submitted batch job 99"')
    _on_path(tmp_path, monkeypatch, "squeue", 'echo "17|(null)"')
    _on_path(tmp_path, monkeypatch, "sacct", "true")  # accounting has no such job either
    slept: list[float] = []
    answer = sc.sbatch(_script(tmp_path, sc.new_token()), sc.Retry(4, 0.5), 10, slept.append)
    assert answer == "Submitted batch job 99\n" and _lines(calls) == 3 and slept == [0.5, 1.0]


def test_a_refused_sbatch_is_not_retried(tmp_path, monkeypatch) -> None:
    calls = _counting(tmp_path, monkeypatch, "sbatch",
                      'echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1')
    with pytest.raises(sc.SlurmCommandFailed) as err:
        sc.sbatch(_script(tmp_path, sc.new_token()), sc.Retry(4, 0.01), 10, lambda s: None)
    assert _lines(calls) == 1 and "Invalid account" in err.value.stderr


def test_the_token_is_found_in_squeue_and_sacct_answers() -> None:
    token = "hpcddf:abc"
    assert sc.parse_squeue_tokens("17|(null)\n4242|hpcddf:abc\n", token) == "4242"
    assert sc.parse_squeue_tokens("17|hpcddf:other\n", token) is None
    since = dt.datetime(2026, 12, 6, 8, 0, 0)
    # sacct keeps comments only with AccountingStoreFlags=job_comment: without, the name (already
    # matched by the query) and a submit time since the first attempt identify the job
    assert sc.parse_sacct_tokens("51_0|hpcddf:abc|2026-12-06T07:00:00\n", token, since) == "51"
    assert sc.parse_sacct_tokens("50|hpcddf:other|2026-12-06T08:00:01\n", token, since) is None
    assert sc.parse_sacct_tokens("49||2026-12-06T07:59:58\n52||2026-12-06T08:00:02\n", token, since) == "52"


def test_limits_are_read_from_scontrol_and_sacctmgr_output() -> None:
    config = sc.parse_config("Configuration data as of 2026-12-06T08:00:00\nMaxArraySize            = 10\n"
                             "MaxJobCount             = 10000\nSLURM_VERSION           = 22.05.8\n")
    assert config["MaxArraySize"] == "10" and config["MaxJobCount"] == "10000"
    assert sc.parse_submit_limit("|\n") is None
    assert sc.parse_submit_limit("500|\n") == 500
    assert sc.parse_submit_limit("500|200\n1000|\n") == 200


def test_free_jobs_is_the_tightest_limit_left() -> None:
    assert sc.ClusterLimits().free_jobs() is None
    assert sc.ClusterLimits(max_submit_jobs=500, queued_mine=480).free_jobs() == 20
    assert sc.ClusterLimits(max_job_count=100, max_submit_jobs=500, queued_all=95).free_jobs() == 5
    assert sc.ClusterLimits(max_submit_jobs=10, queued_mine=12).free_jobs() == 0


def test_arrays_are_split_to_the_tighter_of_cluster_and_site() -> None:
    assert sc.array_cap(sc.ClusterLimits(max_array_size=1001)) == 1001
    assert sc.array_cap(sc.ClusterLimits(max_array_size=1001), site_cap=10) == 10
    assert sc.array_cap(sc.ClusterLimits(max_array_size=10), site_cap=5000) == 10
    assert [len(c) for c in sc.chunks(list(range(25)), 10)] == [10, 10, 5]
    assert sc.chunks(list(range(25)), 10)[2] == [20, 21, 22, 23, 24]  # order kept: task i is field i


def test_fields_are_held_back_beyond_the_free_jobs() -> None:
    assert sc.fields_within([3, 3, 3], None) == 3
    assert sc.fields_within([3, 3, 3], 7) == 2
    assert sc.fields_within([3, 3, 3], 2) == 0


def test_the_sbatch_command_carries_its_bounds(tmp_path) -> None:
    argv = sc.sbatch_command(tmp_path / "job.sh", sc.Retry(2, 0.5, 4), 7)
    assert argv[1:4] == ["-m", "hpcddf.engine.slurm_client", "sbatch"]
    assert argv[-1] == str(tmp_path / "job.sh") and "--timeout" in argv and "7" in argv


def test_a_command_that_is_missing_is_one_line() -> None:
    with pytest.raises(SubmissionError) as err:
        sc.run_once(["hpcddf-no-such-slurm-command"], 5)
    assert err.value.message == "hpcddf-no-such-slurm-command not found"


class _Unit:
    """What the hold-back looks at of a unit: its id (a user limit cannot be set on the shared
    test cluster, so the limits below stand in for a site's association)."""

    def __init__(self, fid: str) -> None:
        self.field = type("F", (), {"id": fid})()


def test_units_beyond_the_users_limit_are_held_back_and_said_so(monkeypatch) -> None:
    from hpcddf.engine import submission
    from hpcddf.engine.sites import load_site
    site = load_site("local", None)
    limits = sc.ClusterLimits(max_array_size=1001, max_submit_jobs=10, queued_mine=3)
    monkeypatch.setattr(submission, "read_limits", lambda: limits)
    units = [(_Unit(f"F{i}"), ["initial", "dirin", "dirin_di"]) for i in range(4)]
    said: list[str] = []
    result: dict = {"fields": {}}
    kept, cap = submission._within_limits(site, units, result, said.append)  # type: ignore[arg-type]
    assert [u.field.id for u, _ in kept] == ["F0", "F1"] and cap == 1001
    assert result["fields"] == {"F2": {"status": "held back", "jobs": {}},
                                "F3": {"status": "held back", "jobs": {}}}
    assert said == ["2 of 4 fields held back (F2 F3): the cluster lets you queue 7 more jobs now "
                    "(MaxSubmitJobs/MaxJobCount); run the same `hpcddf submit` again later to queue them"]
    monkeypatch.setattr(submission, "read_limits", lambda: sc.ClusterLimits(max_submit_jobs=2))
    with pytest.raises(SubmissionError, match="nothing queued: 4 of 4 fields held back"):
        submission._within_limits(site, units, {"fields": {}}, said.append)  # type: ignore[arg-type]
