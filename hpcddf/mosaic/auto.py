"""Mosaics queued as a survey completes neighbourhoods (what ``hpcddf survey tick`` calls).

As the LoTSS mosaic checker does, a mosaic centred on a field is made once the field and all
its neighbours are reduced; neighbours that failed for good are left out rather than waited
for. A mosaic already made (its done-marker names the same inputs), queued or running is not
queued again, and one whose job failed is not retried by itself: it would fail the same way
every tick. It is reported, for ``hpcddf mosaic`` to rerun after a look.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcddf.engine.sites import Site
from hpcddf.engine.state import State, read_state
from hpcddf.mosaic.jobs import (
    check_mosaic_stack,
    mosaic_dir,
    plan_mosaics,
    run_mosaics_locally,
    submit_mosaic_array,
)
from hpcddf.mosaic.pointings import Pointing, neighbourhood

SURVEY_PRODUCT = "full"


@dataclass
class AutoMosaics:
    """Centres whose mosaic is made, mosaics queued now or before and still to be made, and
    mosaics left alone with why."""

    made: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)  # queued by an earlier tick, not made yet


def complete(centre: Pointing, pointings: Sequence[Pointing], finished: set[str],
             excluded: Sequence[str]) -> bool:
    """The centre and every neighbour not excluded are reduced."""
    return all(m.id in finished for m in neighbourhood(centre, pointings, excluded).members)


def _failed_before(work_root: Path, centre: str, product: str) -> bool:
    state = read_state(mosaic_dir(work_root, centre)) or {}
    return (state.get("stages") or {}).get(product, {}).get("state") == State.FAILED


def queue_survey_mosaics(site: Site, pointings: Sequence[Pointing], centres: Sequence[str],
                         finished: set[str], excluded: Sequence[str], work_root: Path,
                         progress: Callable[[str], None] = lambda m: None,
                         product: str = SURVEY_PRODUCT) -> AutoMosaics:
    """Queue the mosaics of ``centres`` whose neighbourhood is complete (Slurm: one array;
    local: made now, one after another)."""
    out = AutoMosaics()
    wanted = set(centres)
    ready = [p for p in pointings if p.id in wanted and complete(p, pointings, finished, excluded)]
    for p in [p for p in ready if _failed_before(work_root, p.id, product)]:
        out.left[f"{p.id}-{product}"] = "its mosaic job failed: see `hpcddf status`, rerun with `hpcddf mosaic`"
    ready = [p for p in ready if f"{p.id}-{product}" not in out.left]
    if not ready:
        return out
    plan = plan_mosaics(site, pointings, ready, [product], work_root, exclude=excluded)
    if plan.tasks:  # the mosaic stack (reproject, dask: ~1 s of imports) only to make some
        check_mosaic_stack()
    out.made = [name.removesuffix(f"-{product}") for name in plan.done]
    out.running = list(plan.queued)
    out.left.update({name: f"needs {', '.join(missing)}" for name, missing in plan.blocked.items()})
    if plan.tasks and site.scheduler == "slurm":
        submit_mosaic_array(site, plan.tasks, work_root)
        out.queued = [t.name for t in plan.tasks]
    elif plan.tasks:
        run_mosaics_locally(site, plan.tasks, work_root, progress)
        out.made += [t.centre.id for t in plan.tasks]
    return out
