"""Parsing squeue/sacct output (pasted from the local Slurm 22.05) and the argv built."""

from __future__ import annotations

from hpcddf.engine.slurm_query import parse_elapsed, parse_jobs, sacct_argv, squeue_argv

SACCT = """30354973_0|COMPLETED|5|1|vm|None
30354974_1|CANCELLED by 0|0|1|None assigned|Dependency
30355830|FAILED|22|1|vm|None
"""
SQUEUE = "30355884|PENDING|0:00|1||BeginTime\n30355885_2|RUNNING|1-02:03:04|1|vm|None\n"


def test_parse_sacct_lines():
    jobs = parse_jobs(SACCT)
    assert jobs["30354973_0"].state == "COMPLETED" and not jobs["30354973_0"].active
    assert jobs["30354974_1"].state == "CANCELLED"
    assert jobs["30355830"].elapsed_s == 22


def test_parse_squeue_lines():
    jobs = parse_jobs(SQUEUE)
    assert jobs["30355884"].active and jobs["30355884"].reason == "BeginTime"
    assert jobs["30355885_2"].elapsed_s == 86400 + 2 * 3600 + 3 * 60 + 4


def test_parse_elapsed_forms():
    assert parse_elapsed("5:07") == 307
    assert parse_elapsed("1:00:00") == 3600
    assert parse_elapsed("123") == 123
    assert parse_elapsed("") is None


def test_argv_are_lists_with_every_id():
    assert squeue_argv(["1", "2_3"])[:5] == ["squeue", "-h", "-r", "-j", "1,2_3"]
    assert "-P" in sacct_argv(["7"]) and "7" in sacct_argv(["7"])
