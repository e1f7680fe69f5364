"""Nodes a site's jobs avoid for a while after a node fault.

A node that failed under one field's job (NODE_FAIL, BOOT_FAIL) is likely to fail the next job
sent to it too, whichever field that is: the recovery of one field must not be the only thing
that learns. When recovery classifies a node fault, the node is remembered for the site for
``[slurm] exclude_node_hours`` (24 by default; 0: never), and every job hpcddf submits to the
site meanwhile gets it in ``--exclude``. The memory expires by itself: a repaired node comes back
without anyone editing a file.

It lives in the site's work root (``.hpcddf/excluded-nodes.json``), on the shared file system
that guard jobs on compute nodes and the login node both see; writes are locked and atomic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.paths import HIDDEN
from hpcddf.engine.sites import Site
from hpcddf.engine.state import locked

log = logging.getLogger(__name__)
FILE = "excluded-nodes.json"


def exclusions_file(site: Site) -> Path:
    return site.work_root / HIDDEN / FILE


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _read(path: Path) -> dict[str, str]:
    """node -> until (ISO time); a missing or unreadable file is no exclusion (never an error:
    a submission must not fail over a memory it can do without)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _current(data: Mapping[str, str], now: datetime) -> dict[str, str]:
    out = {}
    for node, until in data.items():
        try:
            if datetime.fromisoformat(until) > now:
                out[node] = until
        except ValueError:
            continue
    return out


def remember(site: Site, nodes: Iterable[str], now: datetime | None = None) -> list[str]:
    """Exclude ``nodes`` from the site's jobs for ``exclude_node_hours``; the nodes now excluded."""
    hours = site.slurm.exclude_node_hours
    nodes = [n for n in nodes if n and n != "None assigned"]
    if hours <= 0 or not nodes:
        return excluded(site, now)
    now = now or _now()
    until = (now + timedelta(hours=hours)).isoformat(timespec="seconds")
    path = exclusions_file(site)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(site.work_root):
        data = _current(_read(path), now)
        data.update({n: until for n in nodes})
        write_json_atomic(path, data)
    log.warning("node(s) %s excluded from the site's jobs until %s ([slurm] exclude_node_hours = %s)",
                ", ".join(nodes), until, hours)
    return sorted(data)


def excluded(site: Site, now: datetime | None = None) -> list[str]:
    """The nodes the site's jobs avoid now."""
    if site.slurm.exclude_node_hours <= 0:
        return []
    return sorted(_current(_read(exclusions_file(site)), now or _now()))
