"""Which commands a stage's steps run: the real reduction or the scaled test pipeline.

A recipe is plain data stored with the plan: ``{"name": "ddf"}`` for the DDFacet/killMS
reduction, ``{"name": "scaled", "options": {...}}`` for the seconds-long stand-in that tests and
site smoke tests use. Both go through the same engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcddf.config import PipelineConfig
from hpcddf.errors import PlanError
from hpcddf.runner import Step

RECIPES = ("ddf", "scaled")


@dataclass(frozen=True)
class NodeInfo:
    """What the command builders need to know about the node the stage runs on."""

    cpus: tuple[int, ...]
    cache_dir: Path
    field_id: str = ""
    python: str = sys.executable


def make_recipe(name: str, options: Sequence[str] = ()) -> dict[str, Any]:
    """``--pipeline NAME --pipeline-opt key=value...`` as recipe data."""
    if name not in RECIPES:
        raise PlanError(f"unknown pipeline {name!r}", f"use one of {', '.join(RECIPES)}")
    opts: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlanError(f"pipeline option {item!r} is not key=value", "write e.g. seconds=2")
        opts[key] = value
    return {"name": name, "options": opts}


def build_steps(recipe: Mapping[str, Any], cfg: PipelineConfig, stage: str,
                step_names: Sequence[str], node: NodeInfo) -> list[Step]:
    """The executable steps of one stage."""
    if recipe["name"] == "scaled":
        from hpcddf.scaled import build_scaled_steps
        return build_scaled_steps(stage, step_names, recipe.get("options", {}), node.python,
                                  node.field_id)
    raise PlanError("this hpcddf version cannot build the DDFacet/killMS commands yet",
                    "use --pipeline scaled to exercise the site, or update hpcddf")
