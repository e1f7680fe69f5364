"""The plan of a unit of work as plain data: stages (node-sized jobs) with their steps,
resources and dependencies.

A pipeline's planner makes these (the reduction's is :mod:`hpcddf.lofar.plan`); the engine
turns them into jobs. Pure data and pure functions: planning runs and submits nothing, so
``--dry-run`` shows exactly what a real submission would do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hpcddf.engine.sites import Site


@dataclass(frozen=True)
class Resources:
    """What one stage job asks the scheduler for."""

    cpus: int
    mem_gb: int
    walltime_min: int
    exclusive: bool
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # the share of the CPUs a step may start parallel workers on: a memory remedy for a job that
    # already has the whole node (fewer workers, fewer per-worker buffers); 1.0: one per CPU
    workers_fraction: float = 1.0


@dataclass(frozen=True)
class Stage:
    """One node-sized job: the steps it runs, in order, after the stages it depends on."""

    name: str
    steps: tuple[str, ...]
    resources: Resources
    depends_on: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["depends_on"] = list(self.depends_on)
        return d


@dataclass(frozen=True)
class Plan:
    """The stages of one unit of work (a field's reduction), in execution order."""

    field: str
    site: str
    stages: tuple[Stage, ...]

    @property
    def shape(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """What makes two fields' plans submittable as one array chain."""
        return tuple((s.name, s.steps) for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "site": self.site,
                "stages": [s.to_dict() for s in self.stages]}


def fit_resources(site: Site, cpus: int | None = None, mem_gb: int | None = None,
                  walltime_min: int | None = None) -> Resources:
    """What a job asks for, capped by the site's node and walltime; None: all of it. A job
    that wants the whole node (no cpus given) is exclusive when the site says so. The one
    place a pipeline's wish becomes sbatch's resources (partition, account, qos, extras)."""
    s = site.slurm
    return Resources(cpus=min(cpus or site.cpus, site.cpus), mem_gb=min(mem_gb or site.mem_gb, site.mem_gb),
                     walltime_min=min(walltime_min or site.max_walltime_min, site.max_walltime_min),
                     exclusive=s.exclusive and cpus is None, partition=s.partition or None,
                     account=s.account or None, qos=s.qos or None, extra=dict(s.extra_sbatch))


def stage_resources(site: Site) -> Resources:
    """Every reduction stage takes a whole node of the site (DDFacet uses all of it)."""
    return fit_resources(site)


def chains(plans: list[Plan]) -> list[list[Plan]]:
    """Fields whose plans have the same shape, grouped so each group is one array chain.

    Task i of every stage array of a chain is then always the same field.
    """
    by_shape: dict[Any, list[Plan]] = {}
    for p in plans:
        by_shape.setdefault(p.shape, []).append(p)
    return list(by_shape.values())
