"""``hpcddf survey status``: where a survey stands, from its database alone (a few bulk queries,
no field directory read): fields per state, node-hours, fields done per day over the last week,
the rate and the time left at that rate, the failed fields with their reasons; and the
pointings on the sky coloured by state.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hpcddf.errors import SurveyError
from hpcddf.survey import storage

WINDOW_DAYS = 7
MIN_WINDOW = timedelta(hours=1)  # a survey an hour old does not extrapolate from seconds
COLOURS = {"new": "#bbbbbb", "fetching": "#9ecae1", "ready": "#3182bd", "reducing": "#fd8d3c",
           "done": "#31a354", "failed": "#de2d26", "mosaicked": "#756bb1"}


def survey_status(database: str, now: datetime | None = None) -> dict[str, Any]:
    """The status document (what ``--json`` prints)."""
    from hpcddf.survey import db
    now = now or db.utcnow()
    first_day = (now - timedelta(days=WINDOW_DAYS - 1)).date()
    with db.opened(database) as sdb, sdb.read() as conn:
        settings = db.read_settings(conn)
        counts = db.counts(conn)
        hours = db.node_hours_total(conn)
        done = db.arrivals(conn, db.FieldState.DONE, now - timedelta(days=WINDOW_DAYS))
        failed = db.fields(conn, [db.FieldState.FAILED])
    doc = {"database": sdb.where, "survey": settings, "states": {str(s): n for s, n in counts.items()},
           "fields": sum(counts.values()), "node_hours": round(hours, 3),
           "done_per_day": done_per_day(done, first_day),
           "failed": [{"field": r.id, "attempts": r.attempts, "error": r.last_error,
                       "since": r.state_since.isoformat(timespec="seconds")} for r in failed]}
    doc.update(eta(doc, done, settings.get("created_at"), now))
    return doc


def done_per_day(done: list[tuple[str, datetime]], first_day: Any) -> dict[str, int]:
    """Fields that became done on each of the last days (UTC dates, oldest first, 0 included)."""
    per = Counter(day for _, day in {(fid, at.date()) for fid, at in done})  # a field once a day
    days = [first_day + timedelta(days=k) for k in range(WINDOW_DAYS)]
    return {d.isoformat(): per.get(d, 0) for d in days}


def eta(doc: dict[str, Any], done: list[tuple[str, datetime]], created: str | None,
        now: datetime) -> dict[str, Any]:
    """The rate over the last week (or the survey's age, if younger) and the days left at it
    for the fields neither done, mosaicked nor failed; None while nothing got done."""
    states = doc["states"]
    remaining = doc["fields"] - states["done"] - states["mosaicked"] - states["failed"]
    start = now - timedelta(days=WINDOW_DAYS)
    if created:
        start = max(start, min(datetime.fromisoformat(created), now - MIN_WINDOW))
    recent = len({fid for fid, at in done if at >= start})
    rate = recent / ((now - start) / timedelta(days=1))
    days = remaining / rate if rate > 0 else None
    return {"remaining": remaining, "rate_per_day": round(rate, 3),
            "eta_days": round(days, 2) if days is not None else None,
            "eta": (now + timedelta(days=days)).isoformat(timespec="minutes") if days is not None else None}


def plot_sky(database: str, png: Path) -> Path:
    """The pointings on the sky coloured by state, written atomically to ``png``."""
    from hpcddf.engine.atomic import atomic_path
    from hpcddf.survey import db
    if not png.parent.is_dir():
        raise SurveyError(f"cannot write {png}: {png.parent} is not a directory",
                          "give --png a path in an existing directory")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurveyError("--png needs matplotlib, which is not installed", storage.INSTALL) from None
    with db.opened(database) as sdb, sdb.read() as conn:
        rows = db.fields(conn)
        name = db.read_settings(conn).get("name", "survey")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for state in db.FieldState:
        mine = [r for r in rows if r.state is state]
        if mine:
            ax.scatter([r.ra for r in mine], [r.dec for r in mine], s=14, c=COLOURS[str(state)],
                       label=f"{state} ({len(mine)})", edgecolors="none")
    ax.invert_xaxis()  # east to the left, as the sky is seen
    ax.set(xlabel="RA (deg)", ylabel="Dec (deg)", title=f"{name}: {len(rows)} fields")
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    ax.grid(alpha=0.3)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png
