"""Where a survey's database lives and how to connect to it: one SQLAlchemy code path for the
embedded SQLite file and a shared MySQL/MariaDB server.

SQLite's file locking is unreliable on network file systems (NFS, Lustre, GPFS, ...), exactly
where work roots live; two ticks, or a tick and ``survey status``, could then corrupt the
ledger. So a SQLite file on such a file system is refused before it is opened, with the fix:
a local disk of the machine that runs the tick, or a MySQL/MariaDB URL in the site config.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from hpcddf.engine.sites import Site
from hpcddf.errors import SurveyError

INSTALL = "pip install 'hpcddf[survey]'"
# file system types (as /proc/mounts names them) whose locking SQLite cannot trust
NETWORK_FS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "fuse.beegfs", "cifs", "smb3", "smbfs", "ceph",
    "fuse.ceph", "fuse.cephfs", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "panfs", "afs",
    "ocfs2", "gfs2", "wekafs", "orangefs", "pvfs2", "fuse.juicefs", "9p", "virtiofs",
})
MYSQL_SCHEMES = ("mysql", "mariadb")
READ_ONLY = "hpcddf_read_only"  # execution option of connections that only read


def sqlalchemy() -> ModuleType:
    """SQLAlchemy, or the one-line error naming the extra that installs it."""
    try:
        import sqlalchemy as sa
    except ImportError:
        raise SurveyError("the survey database needs SQLAlchemy, which is not installed", INSTALL) from None
    return sa


def default_database(site: Site) -> str:
    """The site's ``[survey] database``, else a SQLite file in this user's state directory (on
    this machine's disk on most clusters; refused like any other if it is not)."""
    if site.survey.database:
        return site.survey.database
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "hpcddf" / f"survey-{site.name}.sqlite")


def database_url(text: str) -> Any:
    """The SQLAlchemy URL of ``text``: a path is a SQLite file; ``mysql://`` and ``mariadb://``
    use PyMySQL (the ``survey`` extra) with utf8mb4. ``$VARS`` are expanded (a password need not
    stand in the site file; one from a variable is taken as it is, special characters too).
    Other databases are refused."""
    sa = sqlalchemy()
    text = text.strip()
    if "://" not in text:
        return sa.engine.make_url(f"sqlite:///{Path(os.path.expandvars(text)).expanduser().absolute()}")
    try:  # $VARS expanded per part: a password from a variable needs no URL-encoding
        url = sa.engine.make_url(text)
        url = url.set(**{k: os.path.expandvars(getattr(url, k)) for k in ("username", "password", "host", "database")
                         if getattr(url, k)})
    except sa.exc.ArgumentError:
        raise SurveyError(f"survey database {text.split('://')[0]}://... is not a database URL",
                          "give mysql+pymysql://USER:PASSWORD@HOST[:PORT]/DATABASE or a SQLite file path") from None
    backend, _, driver = url.drivername.partition("+")
    if backend == "sqlite":
        return url
    if backend not in MYSQL_SCHEMES:
        raise SurveyError(f"survey database {backend}:// is not supported",
                          "use a SQLite file path or a mysql+pymysql:// (MySQL/MariaDB) URL")
    if driver not in ("", "pymysql"):
        raise SurveyError(f"survey database driver {driver!r} is not supported", "use mysql+pymysql://")
    if not url.database:
        raise SurveyError(f"survey database URL {describe(url)} names no database", "end it with /DATABASE")
    return url.set(drivername="mysql+pymysql").update_query_dict({"charset": "utf8mb4"})


def describe(url: Any) -> str:
    """The database as it may be printed: a SQLite file's path, a URL without its password."""
    if is_sqlite(url):
        return str(url.database)
    return str(url.render_as_string(hide_password=True))


def is_sqlite(url: Any) -> bool:
    return bool(url.drivername.startswith("sqlite"))


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_type(path: Path, mounts: str) -> str | None:
    """The file system type of the mount ``path`` is on (the longest mount point above it),
    from a /proc/mounts text; None when no line matches."""
    best, fstype = -1, None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = _unescape(parts[1])
        if (path == Path(point) or Path(point) in path.parents) and len(point) > best:
            best, fstype = len(point), parts[2]
    return fstype


def check_local_disk(path: Path, mounts: str | None = None) -> None:
    """Refuse a SQLite file on a network file system (``mounts``: a /proc/mounts text; read
    here when None, and no check where there is none)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return
    fstype = mount_type(path.absolute().resolve(), mounts)  # symlinks followed as far as they exist
    if fstype in NETWORK_FS or (fstype or "").startswith("nfs"):
        raise SurveyError(f"the SQLite survey database {path} would be on a {fstype} network file system, "
                          "where SQLite's locking is unreliable",
                          "give a path on a local disk of the machine that runs the tick (--db or [survey] "
                          "database), or a mysql+pymysql:// URL for a shared MySQL/MariaDB server")


def make_engine(url: Any) -> Any:
    """An engine for ``url``: SQLite in WAL mode (status reads while a tick writes) with a busy
    timeout; MySQL with connections checked before use (servers drop idle ones)."""
    sa = sqlalchemy()
    if is_sqlite(url):
        path = Path(url.database)
        check_local_disk(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600)
    except ImportError:
        raise SurveyError("a MySQL/MariaDB survey database needs PyMySQL, which is not installed",
                          INSTALL) from None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL and foreign keys; the driver's own transaction handling off (see _sqlite_begin)."""
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    """Take the write lock when a transaction begins (BEGIN IMMEDIATE), as MySQL's row locks
    do: a tick's read-then-move cannot interleave with another writer's. Read-only
    transactions (``SurveyDB.read``) take none."""
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")
