"""CPU efficiency and peak memory from sacct, and how status shows them and the class.

Rows are real output of ``efficiency.usage_argv`` (sacct -D -n -P -o
JobID,ElapsedRaw,TotalCPU,AllocCPUS,MaxRSS) on the local Slurm 22.05: 35607651 one CPU busy
8 s under -c 1, 35607652 ``sleep 4`` then 4 s busy under -c 2 (the machine is shared, so
neither is exact), 35607647 a python holding 300 MB for 45 s (MaxRSS sampled at 30 s),
35607648 a job requeued once (two runs), 35607646 a job with an srun step.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from hpcddf.cli.report import class_text, efficiency_cells, size, status_table
from hpcddf.engine.efficiency import (
    LOW_CPU,
    cpu_seconds,
    efficiency_values,
    parse_usage,
    rss_bytes,
    usage_argv,
)

USAGE = """35607651|9|00:06.627|1|
35607651.batch|9|00:06.627|1|
35607652|9|00:03.870|2|
35607652.batch|9|00:03.870|2|
35607647|45|00:00.244|1|
35607647.batch|45|00:00.244|1|307832K
35607648|3|00:00.001|1|
35607648.batch|3|00:00.001|1|
35607648|8|00:00.002|1|
35607648.batch|8|00:00.002|1|
35607646|0|00:00.094|1|
35607646.batch|0|00:00.009|1|
35607646.0|0|00:00.084|1|
"""


def test_efficiency_is_total_cpu_over_elapsed_times_cpus():
    use = parse_usage(USAGE)
    assert use["35607651"].cpu_efficiency == pytest.approx(6.627 / 9)
    assert use["35607652"].cpu_efficiency == pytest.approx(3.870 / 18)
    assert efficiency_values(use["35607652"])["low_efficiency"] is True
    assert efficiency_values(use["35607651"])["low_efficiency"] is False
    assert LOW_CPU == 0.5


def test_peak_memory_comes_from_the_step_rows():
    use = parse_usage(USAGE)
    assert use["35607647"].max_rss == 307832 * 1024
    assert use["35607651"].max_rss is None  # not sampled: shown "-", never 0


def test_every_run_of_a_requeued_job_counts_and_steps_are_not_runs():
    use = parse_usage(USAGE)
    assert (use["35607648"].runs, use["35607648"].held_cpu_s) == (2, 11)
    assert use["35607646"].runs == 1 and use["35607646"].cpu_s == pytest.approx(0.094)
    assert use["35607646"].cpu_efficiency is None  # no elapsed time: no ratio


def test_sacct_time_and_size_forms():
    assert cpu_seconds("00:06.627") == pytest.approx(6.627)
    assert cpu_seconds("01:02:03") == 3723 and cpu_seconds("1-00:00:00") == 86400
    assert cpu_seconds("") == 0
    assert rss_bytes("1.5G") == int(1.5 * 1024 ** 3) and rss_bytes("2048") == 2048
    assert rss_bytes("") is None and rss_bytes("n/a") is None
    assert "-X" not in usage_argv(["1"]) and "-D" in usage_argv(["1"])


def _text(table) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


def test_status_shows_efficiency_flagged_and_the_class():
    failed = {"state": "failed", "job_id": "35607652",
              "efficiency": {"cpu_efficiency": 0.215, "max_rss_bytes": 307832 * 1024, "low_efficiency": True},
              "class": {"name": "node_fail", "transient": True, "nodes": ["node017"],
                        "reason": "node node017 failed under the job",
                        "fix": "resubmit excluding the node; or [node] mem_gb"}}
    states = [{"field": "F1", "stages": {"dirin": failed, "initial": {"state": "done", "job_id": "1"}}}]
    text = _text(status_table(states, efficiency=True))
    assert "cpu eff" in text and "peak mem" in text
    assert "22 % LOW" in text and "300.6 MB" in text
    assert "node_fail (transient): node node017 failed under the job [nodes node017]; fix: resubmit excluding the node; or [node] mem_gb" in text
    assert "cpu eff" not in _text(status_table(states))


def test_cells_without_accounting_say_so():
    assert efficiency_cells({}) == ("-", "-")
    assert size(None) == "-" and size(3 * 1024 ** 3) == "3.0 GB"
    assert class_text({"name": "cancelled", "transient": False, "nodes": [], "reason": "its dependency failed",
                       "fix": "hpcddf resubmit FIELD when wanted"}) == \
        "cancelled: its dependency failed; fix: hpcddf resubmit FIELD when wanted"
    assert "\\[nodes" in class_text({"name": "out_of_memory", "transient": True, "nodes": ["n1"],
                                      "reason": "r", "fix": "f"})  # escaped for rich


def test_efficiency_without_slurm_is_a_one_line_error_not_ignored(run_cli, site_file, cli_error):
    cli_error(run_cli("status", "--site-file", str(site_file), "--efficiency"),
              "--efficiency needs a Slurm site", "drop --efficiency")
    cli_error(run_cli("status", "--phangs", "keys", "--efficiency"), "not --phangs")
