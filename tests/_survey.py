"""Helpers of the survey tests: LOFAR-like archive tarballs, the site's fetch command (a
copy from an archive directory that can fail once for a field), a short cfg, the rows."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

# [survey] fetch = [python, "<dir>/fetch.py", "{field}", "{dest}"]: copies archive/<field>.tar;
# fails once (exit 1) where archive/<field>.flaky exists, as a busy LTA staging service does
FETCH_SCRIPT = """\
import shutil, sys
from pathlib import Path
field, dest = sys.argv[1:]
archive = Path(__file__).parent / "archive"
flaky = archive / f"{field}.flaky"
if flaky.exists():
    flaky.unlink()
    sys.exit("LTA: staging request timed out")
shutil.copy(archive / f"{field}.tar", dest)
"""
# the scaled pipeline up to dirin_di: three stages, as an operator's cfg would say it
SHORT_CFG = "[data]\nmslist = mslist.txt\n[control]\nexitafter = dirin_di\n"


def make_archive(path: Path, *members: str, fmt: str = "w") -> Path:
    """A tarball with a ``table.dat`` (and a data file) inside each ``members`` directory."""
    with tarfile.open(path, fmt) as tf:
        for name in members:
            for leaf, data in (("table.dat", b"table"), ("table.f0", b"\0" * 64)):
                info = tarfile.TarInfo(f"{name}/{leaf}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def fields_by_id(database: str | Path) -> dict[str, Any]:
    """Every field row of the survey database, by id."""
    from hpcddf.survey import db
    with db.opened(str(database)) as sdb, sdb.read() as conn:
        return {r.id: r for r in db.fields(conn)}
