"""``hpcddf survey init``: a survey database from a pointings table, a site, cfg files and a
work root.

Init may be run again (with a longer pointings table, say): fields already in the database
keep their state, attempts and history, and only new pointings are added. What would change
the meaning of the recorded states is refused instead: another site, work root or cfg files,
or a pointing that moved. Everything is checked before the database is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcddf.engine.fields import check_work_root, validate_field_id
from hpcddf.engine.sites import Site
from hpcddf.errors import SurveyError
from hpcddf.mosaic.pointings import Pointing
from hpcddf.survey import storage

# the settings that give the recorded states their meaning: a second init must repeat them
FIXED_SETTINGS = ("site", "work_root", "configs", "recipe")
SAME_POSITION_DEG = 1.0 / 3600.0


def read_survey_pointings(path: str | Path, site: Site) -> list[Pointing]:
    """The pointings table, read as ``hpcddf mosaic --pointings`` reads it; every id must be a
    field id of the site (it becomes a field directory and a job name)."""
    try:
        from hpcddf.mosaic.pointings import read_pointings
        pointings = read_pointings(path)
    except ImportError as exc:
        raise SurveyError(f"reading the pointings table needs {exc.name}, which is not installed",
                          storage.INSTALL) from None
    from hpcddf.survey.db import ID_LENGTH
    for p in pointings:
        validate_field_id(p.id, site.fields.pattern)
        if len(p.id) > ID_LENGTH:
            raise SurveyError(f"pointing id {p.id[:20]}... is longer than {ID_LENGTH} characters",
                              "use the observation ids as pointing ids")
    return pointings


def check_configs(configs: Sequence[str], site: Site) -> list[str]:
    """The cfg files as absolute paths, each read and checked as ``submit`` checks it."""
    from hpcddf.lofar.config import load_config
    paths = [str(Path(c).expanduser().absolute()) for c in configs]
    load_config(paths, catalog_dir=str(site.catalog_dir) if site.catalog_dir else None)
    return paths


def survey_settings(site: Site, pointings: str | Path, configs: list[str], work_root: Path,
                    name: str | None, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    from hpcddf.lofar.submit import DEFAULT_RECIPE
    return {"name": name or Path(pointings).stem, "site": site.name,
            "work_root": str(work_root.expanduser().absolute()), "configs": configs,
            "pointings": str(Path(pointings).absolute()), "recipe": recipe or DEFAULT_RECIPE}


def _compare(have: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for key in FIXED_SETTINGS:
        if key in have and have[key] != want[key]:
            raise SurveyError(f"the survey in {where} was made with {key} {have[key]!r}, not {want[key]!r}",
                              f"give the same {key.replace('_', ' ')} (see `hpcddf survey status --json`), "
                              "or another --db for a new survey")


def _moved(p: Pointing, ra: float, dec: float) -> bool:
    dra = (p.ra - ra + 180.0) % 360.0 - 180.0
    return math.hypot(dra * math.cos(math.radians(dec)), p.dec - dec) > SAME_POSITION_DEG


def init_survey(site: Site, pointings_path: str | Path, configs: Sequence[str], work_root: Path,
                database: str, name: str | None = None, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create the survey database, or add the table's new pointings to it; returns what was done.
    ``recipe``: the pipeline every field runs (``--pipeline``; the reduction by default)."""
    pointings = read_survey_pointings(pointings_path, site)
    settings = survey_settings(site, pointings_path, check_configs(configs, site), work_root, name, recipe)
    check_work_root(Path(settings["work_root"]))
    from hpcddf.survey import db
    with db.opened(database, create=True) as sdb, sdb.begin() as conn:
        have = db.read_settings(conn)
        _compare(have, settings, sdb.where)
        db.write_settings(conn, {**settings, "created_at": db.utcnow().isoformat(timespec="seconds")})
        added, kept = _add_new(conn, pointings, sdb.where)
        settings = db.read_settings(conn)
        total = sum(db.counts(conn).values())
    table_ids = {p.id for p in pointings}
    return {"database": sdb.where, "survey": settings, "added": added, "kept": kept, "fields": total,
            "not_in_table": total - len(table_ids)}


def _add_new(conn: Any, pointings: Sequence[Pointing], where: str) -> tuple[list[str], int]:
    from hpcddf.survey import db
    known = {r.id: r for r in db.fields(conn)}
    for p in pointings:
        row = known.get(p.id)
        if row is not None and _moved(p, row.ra, row.dec):
            raise SurveyError(f"pointing {p.id} is at {p.ra:.5f}, {p.dec:.5f} in the table but at "
                              f"{row.ra:.5f}, {row.dec:.5f} in {where}",
                              "a field id keeps its position: fix the table, or start a new survey")
    new = [p for p in pointings if p.id not in known]
    db.add_fields(conn, [(p.id, p.ra, p.dec) for p in new], "survey init")
    return [p.id for p in new], len(pointings) - len(new)
