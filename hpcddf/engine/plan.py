"""The stage plan: the reduction split at ddf-pipeline's stop points into node-sized jobs.

Pure data and pure functions: ``plan_reduction`` reads a configuration and a site and returns
stages with their steps, resources and dependencies. It runs nothing and submits nothing, so
``--dry-run`` shows exactly what a real submission would do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hpcddf.engine.sites import Site
from hpcddf.errors import PlanError
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.steps import STAGE_ENABLED, STAGES, STEPS


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
    """The stages of one field's reduction, in execution order."""

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


def stage_resources(site: Site) -> Resources:
    """Every stage takes a whole node of the site (DDFacet uses all of it)."""
    s = site.slurm
    return Resources(cpus=site.cpus, mem_gb=site.mem_gb,
                     walltime_min=site.max_walltime_min, exclusive=s.exclusive,
                     partition=s.partition or None, account=s.account or None,
                     qos=s.qos or None, extra=dict(s.extra_sbatch))


def group_steps(cfg: PipelineConfig) -> list[tuple[str, list[str]]]:
    """Enabled steps grouped into enabled stages, in order.

    A stage the configuration switches off (no bootstrap, no full MS list...) is not planned;
    any of its steps that still run join the next planned stage (or the last one).
    """
    if not cfg.get("data", "mslist") and not cfg.get("inputmodel", "basedicomodel"):
        raise PlanError("[data] mslist is not set", "set mslist=mslist.txt in the config")
    groups: list[tuple[str, list[str]]] = []
    carry: list[str] = []
    for stage in STAGES:
        steps = carry + [s.name for s in STEPS if s.stage == stage and s.enabled(cfg)]
        if STAGE_ENABLED[stage](cfg):
            groups.append((stage, steps))
            carry = []
        else:
            carry = steps
    if carry:
        if not groups:
            raise PlanError("the configuration leaves no stage to run",
                            "check [data] full_mslist and [inputmodel]")
        groups[-1][1].extend(carry)
    return [(name, steps) for name, steps in groups if steps]


def plan_reduction(cfg: PipelineConfig, site: Site, field_id: str) -> Plan:
    """Split the reduction of ``field_id`` into chained stages sized for ``site``'s nodes."""
    res = stage_resources(site)
    stages: list[Stage] = []
    for name, steps in _apply_exitafter(group_steps(cfg), cfg.get("control", "exitafter")):
        deps = (stages[-1].name,) if stages else ()
        stages.append(Stage(name=name, steps=tuple(steps), resources=res, depends_on=deps))
    return Plan(field=field_id, site=site.name, stages=tuple(stages))


def _apply_exitafter(groups: list[tuple[str, list[str]]],
                     exitafter: str | None) -> list[tuple[str, list[str]]]:
    """``[control] exitafter`` ends the plan after that stop point."""
    if exitafter is None or exitafter == "cleanup":
        return groups if exitafter is None else []
    names = [g[0] for g in groups]
    if exitafter not in names:
        raise PlanError(f"exitafter={exitafter} is not a stage of this configuration",
                        f"use one of {', '.join(names)}")
    return groups[: names.index(exitafter) + 1]


def chains(plans: list[Plan]) -> list[list[Plan]]:
    """Fields whose plans have the same shape, grouped so each group is one array chain.

    Task i of every stage array of a chain is then always the same field.
    """
    by_shape: dict[Any, list[Plan]] = {}
    for p in plans:
        by_shape.setdefault(p.shape, []).append(p)
    return list(by_shape.values())
