"""Shared helpers of the bench scripts (local Slurm site files, hpcddf runner)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HPCDDF = [sys.executable, "-m", "hpcddf"]


def site_file(root: Path, walltime: str = "10", extra: str = "", requeues: int = 5,
              signal_delay: int = 10, pattern: str = "B[0-9]+", max_running: int = 100) -> Path:
    path = root / "bench-site.toml"
    path.write_text(f"""
scheduler = "slurm"
[slurm]
partition = "debug"
exclusive = false
max_walltime = "{walltime}"
max_requeues = {requeues}
signal_delay_s = {signal_delay}
{extra}
[node]
cpus = 1
mem_gb = 1
scratch_dir = "{root}/scratch/$SLURM_JOB_ID"
scratch_min_free_gb = 0
[preflight]
shm_min_fraction = 0.01
thp_defrag = ["never", "defer", "madvise", "always", "defer+madvise"]
[paths]
work_root = "{root}/work"
[fields]
pattern = "{pattern}"
max_running = {max_running}
""")
    return path


def hpcddf(*args: str) -> dict[str, Any]:
    out = subprocess.run([*HPCDDF, *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def wait_for(pred: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError("bench: timed out")
