"""The survey database: its schema (with a version a newer or older hpcddf refuses), the states
a field moves through and the moves allowed between them, and the bulk reads a tick needs.

One SQLAlchemy Core code path serves SQLite and MySQL/MariaDB. A tick over 1000 fields must
take well under 2 s, so everything here reads or writes many fields in one statement
(``fields``, ``counts``, ``move_many``, ``set_node_hours``) and the columns a tick selects on
(a field's state, the time of a state change) are indexed.

Moves are compare-and-set (``UPDATE ... WHERE state = <the state read>``): two ticks, or a tick
and a hand-made retry, can never both move one field; the loser gets an error, not a silent
overwrite. Every move is an event row, so the history (fields done per day, the rate, the ETA,
why a field went back) is in the database, not in logs.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hpcddf.errors import SurveyError
from hpcddf.survey import storage

sa = storage.sqlalchemy()  # the one-line "pip install 'hpcddf[survey]'" error when missing
from sqlalchemy.dialects import mysql  # noqa: E402  (after the check above)

SCHEMA_VERSION = 1
ID_LENGTH = 64  # a field id (observation id); site patterns allow at most 64 characters


class FieldState(enum.StrEnum):
    NEW = "new"              # in the pointings table, nothing done yet
    FETCHING = "fetching"    # its data is being staged / downloaded / unpacked
    READY = "ready"          # its measurement sets are in the work root, not yet submitted
    REDUCING = "reducing"    # its reduction is queued or running
    DONE = "done"            # reduced
    FAILED = "failed"        # stopped with an error a person has to look at (last_error)
    MOSAICKED = "mosaicked"  # the mosaic centred on it is made


S = FieldState
# the moves of the normal course of a survey
FORWARD: dict[FieldState, frozenset[FieldState]] = {
    S.NEW: frozenset({S.FETCHING, S.READY, S.FAILED}),  # READY: its data is already on disk
    S.FETCHING: frozenset({S.READY, S.FAILED}),
    S.READY: frozenset({S.REDUCING, S.FAILED}),
    S.REDUCING: frozenset({S.DONE, S.FAILED}),
    S.DONE: frozenset({S.MOSAICKED}),
    S.FAILED: frozenset(),
    S.MOSAICKED: frozenset(),
}
# moves back, each only with a reason (recorded in the event and as the last error)
BACKWARD: dict[FieldState, frozenset[FieldState]] = {
    S.FETCHING: frozenset({S.NEW}),       # a transient fetch failure: fetch again
    S.READY: frozenset({S.NEW}),          # its data went missing before it was submitted
    S.REDUCING: frozenset({S.READY}),     # a transient failure (node, walltime): submit again
    S.FAILED: frozenset({S.NEW, S.READY}),  # retried after a person looked
    S.DONE: frozenset({S.READY}),         # reduced again (redo)
    S.MOSAICKED: frozenset({S.DONE}),     # its mosaic is to be made again
}

metadata = sa.MetaData()
schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
)
settings_table = sa.Table(  # the survey's settings, one JSON value per key
    "survey", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
fields_table = sa.Table(
    "fields", metadata,
    sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
    sa.Column("ra_deg", sa.Double, nullable=False),
    sa.Column("dec_deg", sa.Double, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("node_hours", sa.Double, nullable=False, default=0.0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
    sa.Column("state_since", TIMESTAMP, nullable=False),
)
events_table = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("field_id", sa.String(ID_LENGTH), sa.ForeignKey("fields.id"), nullable=False, index=True),
    sa.Column("at", TIMESTAMP, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_events_to_state_at", "to_state", "at"),
)


class TransitionError(SurveyError):
    """A move a field may not make, or one another process made first."""


@dataclass(frozen=True)
class FieldRow:
    id: str
    ra: float
    dec: float
    state: FieldState
    attempts: int
    node_hours: float
    last_error: str | None
    updated_at: datetime
    state_since: datetime


@dataclass(frozen=True)
class SurveyDB:
    """An open survey database: ``with db.begin() as conn:`` for one transaction."""

    engine: Any
    url: Any

    @property
    def where(self) -> str:
        return storage.describe(self.url)

    def begin(self) -> Any:
        """A transaction that may write (on SQLite it takes the write lock at once)."""
        return self.engine.begin()

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        """A transaction that only reads: on SQLite a plain BEGIN, so a status never waits for
        a tick's write lock (WAL readers see the last commit)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{storage.READ_ONLY: True})
            with conn.begin():
                yield conn

    def close(self) -> None:
        self.engine.dispose()


def utcnow() -> datetime:
    """Naive UTC (both back ends store DATETIME without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


# ------------------------------------------------------------------ opening, schema version

@contextlib.contextmanager
def opened(text: str, *, create: bool = False) -> Iterator[SurveyDB]:
    """``open_db`` for the length of a ``with`` block: its connections closed after, whatever
    happened (a tick job or a status must not leave a MySQL connection open)."""
    sdb = open_db(text, create=create)
    try:
        yield sdb
    finally:
        sdb.close()


def open_db(text: str, *, create: bool = False) -> SurveyDB:
    """The survey database at ``text`` (a SQLite path or a MySQL URL). ``create``: make the
    schema in an empty database; otherwise a database without a survey is an error. A schema
    version other than this hpcddf's is refused either way."""
    url = storage.database_url(text)
    if storage.is_sqlite(url) and not create and not _sqlite_exists(url):
        raise SurveyError(f"no survey database at {url.database}", "run `hpcddf survey init` first")
    db = SurveyDB(storage.make_engine(url), url)
    try:
        _check_schema(db, create)
    except BaseException:
        db.close()
        raise
    return db


def _sqlite_exists(url: Any) -> bool:
    return Path(url.database).is_file()


def _check_schema(db: SurveyDB, create: bool) -> None:
    try:
        with (db.begin() if create else db.read()) as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in tables:
                _create_schema(conn, db, tables, create)
                return
            found = conn.execute(sa.select(schema_version.c.version)).scalars().all()
    except sa.exc.OperationalError as exc:
        why = _first_line(exc)
        raise SurveyError(f"cannot use the survey database {db.where}: {why}",
                          "another hpcddf holds it for longer than 30 s: try again" if "locked" in why else
                          "check the URL, the server and the credentials ([survey] database or --db)") from None
    if found != [SCHEMA_VERSION]:
        raise SurveyError(f"the survey database {db.where} has schema version {found or 'none'}; "
                          f"this hpcddf reads version {SCHEMA_VERSION}",
                          "use the hpcddf version that made it, or a new database for this one")


def _create_schema(conn: Any, db: SurveyDB, tables: set[str], create: bool) -> None:
    if not create:
        raise SurveyError(f"no survey in the database {db.where}", "run `hpcddf survey init` first")
    if tables:
        raise SurveyError(f"the database {db.where} holds other tables ({', '.join(sorted(tables)[:5])}), "
                          "not a survey", "give an empty database (or a new SQLite path) to survey init")
    metadata.create_all(conn)
    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).splitlines()[0][:200]


# ------------------------------------------------------------------ settings

def read_settings(conn: Any) -> dict[str, Any]:
    rows = conn.execute(sa.select(settings_table.c.key, settings_table.c.value)).all()
    return {key: json.loads(value) for key, value in rows}


def write_settings(conn: Any, values: Mapping[str, Any]) -> None:
    """Insert settings not yet stored (never overwrites: init compares, it does not change)."""
    have = read_settings(conn)
    new = [{"key": k, "value": json.dumps(v, sort_keys=True)} for k, v in values.items() if k not in have]
    if new:
        conn.execute(settings_table.insert(), new)


def set_setting(conn: Any, key: str, value: Any) -> None:
    """Replace one operational setting (the next tick job's id): unlike the survey's own
    settings, it changes as the survey runs."""
    conn.execute(settings_table.delete().where(settings_table.c.key == key))
    conn.execute(settings_table.insert(), [{"key": key, "value": json.dumps(value, sort_keys=True)}])


# ------------------------------------------------------------------ bulk reads

def _row(r: Any) -> FieldRow:
    return FieldRow(r.id, r.ra_deg, r.dec_deg, FieldState(r.state), r.attempts, r.node_hours,
                    r.last_error, r.updated_at, r.state_since)


def fields(conn: Any, states: Iterable[FieldState] | None = None) -> list[FieldRow]:
    """Every field (in one of ``states``), by id, in one query."""
    q = sa.select(fields_table).order_by(fields_table.c.id)
    if states is not None:
        q = q.where(fields_table.c.state.in_([str(s) for s in states]))
    return [_row(r) for r in conn.execute(q)]


def counts(conn: Any) -> dict[FieldState, int]:
    """Fields per state, every state present (0 where none)."""
    q = sa.select(fields_table.c.state, sa.func.count()).group_by(fields_table.c.state)
    found = {FieldState(state): n for state, n in conn.execute(q)}
    return {s: found.get(s, 0) for s in FieldState}


def node_hours_total(conn: Any) -> float:
    return float(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(fields_table.c.node_hours), 0.0))).scalar())


def arrivals(conn: Any, state: FieldState, since: datetime) -> list[tuple[str, datetime]]:
    """(field, when) of every move into ``state`` since ``since`` (uses the (to_state, at) index)."""
    q = (sa.select(events_table.c.field_id, events_table.c.at)
         .where(events_table.c.to_state == str(state), events_table.c.at >= since)
         .order_by(events_table.c.at))
    return [(fid, at) for fid, at in conn.execute(q)]


def history(conn: Any, field_id: str) -> list[dict[str, Any]]:
    """The moves of one field, oldest first."""
    q = (sa.select(events_table.c.at, events_table.c.from_state, events_table.c.to_state, events_table.c.detail)
         .where(events_table.c.field_id == field_id).order_by(events_table.c.id))
    return [dict(r._mapping) for r in conn.execute(q)]


# ------------------------------------------------------------------ adding fields

def add_fields(conn: Any, pointings: Sequence[tuple[str, float, float]], detail: str) -> None:
    """New fields (id, ra, dec) in state new, each with its first event, in two statements."""
    if not pointings:
        return
    now = utcnow()
    conn.execute(fields_table.insert(), [
        {"id": fid, "ra_deg": ra, "dec_deg": dec, "state": str(S.NEW), "attempts": 0, "node_hours": 0.0,
         "last_error": None, "created_at": now, "updated_at": now, "state_since": now}
        for fid, ra, dec in pointings])
    conn.execute(events_table.insert(), [
        {"field_id": fid, "at": now, "from_state": None, "to_state": str(S.NEW), "detail": detail}
        for fid, _, _ in pointings])


# ------------------------------------------------------------------ moves

def check_move(field_id: str, old: FieldState, new: FieldState, reason: str | None) -> None:
    """A move is allowed forward, or back with a reason; anything else is an error."""
    if new in FORWARD[old]:
        if new is S.FAILED and not reason:
            raise TransitionError(f"field {field_id}: a move to failed needs the error", "pass the reason")
        return
    if new in BACKWARD.get(old, frozenset()):
        if not reason:
            raise TransitionError(f"field {field_id}: {old} -> {new} goes back and needs a reason",
                                  "pass the reason, it is recorded in the field's history")
        return
    allowed = sorted(FORWARD[old] | BACKWARD.get(old, frozenset()))
    raise TransitionError(f"field {field_id}: {old} -> {new} is not a move a field can make",
                          f"from {old} a field moves to {', '.join(allowed) or 'nothing'}")


def move(conn: Any, field_id: str, new: FieldState, reason: str | None = None) -> FieldState:
    """Move one field to ``new``; returns the state it left."""
    old = conn.execute(sa.select(fields_table.c.state).where(fields_table.c.id == field_id)).scalar()
    if old is None:
        raise TransitionError(f"field {field_id} is not in the survey", "check the id (see `hpcddf survey status`)")
    move_many(conn, [field_id], FieldState(old), new, reason)
    return FieldState(old)


def move_many(conn: Any, ids: Sequence[str], old: FieldState, new: FieldState, reason: str | None = None) -> None:
    """Move every field of ``ids`` from ``old`` to ``new`` in one UPDATE, or none: a field not
    in ``old`` any more (another process moved it) is an error and the transaction rolls back.
    Entering ``reducing`` counts an attempt; a reason on a move to failed or back is kept as
    the field's last error."""
    if not ids:
        return
    check_move(ids[0], old, new, reason)  # one rule for all: they share old, new and reason
    now = utcnow()
    values: dict[str, Any] = {"state": str(new), "updated_at": now, "state_since": now}
    if new is S.REDUCING:
        values["attempts"] = fields_table.c.attempts + 1
    if reason and (new is S.FAILED or new in BACKWARD.get(old, frozenset())):
        values["last_error"] = reason
    done = 0
    for chunk in _chunks(list(dict.fromkeys(ids)), 500):  # bounded IN lists for both back ends
        res = conn.execute(fields_table.update().where(fields_table.c.id.in_(chunk),
                                                       fields_table.c.state == str(old)).values(**values))
        done += res.rowcount
    if done != len(set(ids)):
        raise TransitionError(f"{len(set(ids)) - done} of {len(set(ids))} field(s) were not {old} any more "
                              f"(moved meanwhile by another process, or not in the survey)",
                              "run the command again: it reads the states afresh")
    conn.execute(events_table.insert(), [{"field_id": fid, "at": now, "from_state": str(old),
                                          "to_state": str(new), "detail": reason} for fid in dict.fromkeys(ids)])


def set_node_hours(conn: Any, hours: Mapping[str, float]) -> None:
    """Each field's node-hours as its state files add them up (absolute, so a tick that reads
    them twice counts nothing twice): one UPDATE ... CASE per 500 fields, not one per field
    (a round trip each to a MySQL server)."""
    items = sorted(hours.items())
    for k in range(0, len(items), 500):
        chunk = dict(items[k:k + 500])
        conn.execute(fields_table.update().where(fields_table.c.id.in_(list(chunk)))
                     .values(node_hours=sa.case({fid: float(h) for fid, h in chunk.items()},
                                                value=fields_table.c.id)))


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for k in range(0, len(items), n):
        yield items[k:k + n]
