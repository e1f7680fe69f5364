"""What a running job learns from its environment, in one place for every kind of unit."""

from __future__ import annotations

import os
from typing import Mapping


def job_id_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``<array>_<task>`` for array tasks (how sacct names them), else the Slurm job id, else
    submitit's local job id; None outside a job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
