"""A throwaway database on the local cluster's MariaDB (slurm/start_slurm.sh runs it for
slurmdbd): the survey tests run against a real server, as a shared survey database would be."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._require import missing

SLURM_DIR = Path(os.environ.get("HPCDDF_SLURM_DIR", "/var/tmp/hpcddf-slurm"))
SOCKET = SLURM_DIR / "run" / "mysql" / "mysqld.sock"
MARIADB_PORT = 3307  # slurm/start_slurm.sh's private MariaDB


def _root_sql(sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL as MariaDB's root, who logs in through the unix socket (we are root)."""
    return subprocess.run(["mariadb", f"--socket={SOCKET}", "--batch", "-e", sql],
                          capture_output=True, text=True, timeout=30)


def _mariadb_unusable() -> str | None:
    if shutil.which("mariadb") is None:
        return "no mariadb client"
    if not SOCKET.exists():
        return f"no MariaDB socket {SOCKET}"
    proc = _root_sql("SELECT 1")
    return None if proc.returncode == 0 else f"MariaDB refuses root on {SOCKET}: {proc.stderr.strip()[:200]}"


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A throwaway database and user (random names and password) on the local cluster's
    MariaDB, dropped afterwards; skipped without it, a failure under HPCDDF_REQUIRE_SLURM=1."""
    why = _mariadb_unusable()
    if why:
        missing("HPCDDF_REQUIRE_SLURM", f"the local cluster's MariaDB is not usable ({why}); "
                                        "start it with slurm/start_slurm.sh")
    tag = secrets.token_hex(4)
    name, user, password = f"hpcddf_survey_{tag}", f"hs_{tag}", secrets.token_urlsafe(16)
    proc = _root_sql(f"CREATE DATABASE {name}; CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                     f"GRANT ALL ON {name}.* TO '{user}'@'127.0.0.1';")
    assert proc.returncode == 0, proc.stderr
    try:
        yield f"mysql+pymysql://{user}:{password}@127.0.0.1:{MARIADB_PORT}/{name}"
    finally:
        _root_sql(f"DROP DATABASE IF EXISTS {name}; DROP USER IF EXISTS '{user}'@'127.0.0.1';")
