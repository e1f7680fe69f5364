"""``hpcddf status``: the recorded state of fields, refreshed from the scheduler when it answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hpcddf.fields import field_for
from hpcddf.sites import Site
from hpcddf.state import empty_state, find_fields, read_state


def collect_status(site: Site, field_ids: Sequence[str] = (),
                   work_root: Path | None = None) -> list[dict[str, Any]]:
    """States of the given fields (or every field under the work root), oldest first."""
    root = work_root if work_root is not None else site.work_root
    if field_ids:
        dirs = [field_for(site, f, root).workdir for f in field_ids]
    else:
        dirs = find_fields(root)
    states = []
    for d in dirs:
        st = read_state(d) or empty_state(d.name)
        st.setdefault("field", d.name)
        states.append(st)
    return states
