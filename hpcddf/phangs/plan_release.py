"""The planner of the ``release`` stage: the products a team release copies into release_root.

PHANGS assembles a release by copying the products of a (target, product, config) into the
target's release directory, ``release_root/<dir_for(target)>``, under their own file names,
with no sub-directories (algorithms.md B1: ``release_root`` is one of the per-target roots).
Here that is one task per whole target, product and config, planned after everything it
copies: the postprocessed cube (``*_pbcorr_trimmed_k.fits``: the flat-noise cube and the
trimmed primary beam are working products and stay in postprocess_root) and every product of
the derived task (convolved cubes, noise, masks, moment maps, velocity field). A continuum
product has no derived task: its release is its postprocessed image. The task writes a done
marker (``.<stem>.release.json`` in the release directory, the list of files and their sizes)
last, so a release is either complete and marked or re-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_casa import _line_key, postprocess_cube
from hpcddf.phangs.plan_common import Task, _products, _Selection, _stem, _task, whole_target_configs
from hpcddf.phangs.project import Project

RELEASED_STAGES = ("postprocess", "derived")


def release_marker(project: Project, whole: str, product: str, config: str) -> Path:
    return project.target_dir(whole, "release") / f".{_stem(whole, config, product)}.release.json"


def check_release_root(project: Project) -> None:
    """The release stage asked for by name needs release_root in the master key."""
    if "release_root" not in project.roots:
        raise ConfigError(f"{project.master_key}: the release stage was asked for but no "
                          f"release_root is set",
                          "add a line 'release_root <directory>' to the master key, or leave "
                          "the release stage out of --stages")


def _sources(made: dict[str, Task], project: Project, whole: str, product: str, config: str
             ) -> tuple[list[str], list[str]]:
    """(files to release, ids of the tasks making them) of one (target, product, config)."""
    key = _line_key(whole, product, config)
    files, deps = [postprocess_cube(project, whole, product, config)], [Task("postprocess", key).id]
    derived = made.get(Task("derived", key).id)
    if derived is not None:
        files += derived.outputs
        deps.append(derived.id)
    return list(dict.fromkeys(files)), deps


def build_release(project: Project, sel: _Selection, made: dict[str, Task]) -> list[Task]:
    """One release task per whole target, product and config; ``made``: the planned tasks of
    :data:`RELEASED_STAGES` by id (the derived ones planned in detail, so their outputs list
    every moment map). No release_root: no release tasks (the master key asks for none)."""
    if "release_root" not in project.roots:
        return []
    tasks = []
    for whole in sel.whole:
        outdir = project.target_dir(whole, "release")
        for product in _products(project):
            for config in whole_target_configs(project, whole, product):
                files, deps = _sources(made, project, whole, product, config)
                copies = [[src, str(outdir / Path(src).name)] for src in files]
                _check_unique(copies, whole, product, config)
                marker = release_marker(project, whole, product, config)
                params: dict[str, Any] = {
                    "inputs": files, "outputs": [dst for _, dst in copies] + [str(marker)],
                    "target": whole, "product": product, "config": config,
                    "release_dir": str(outdir), "copies": copies, "marker": str(marker)}
                tasks.append(_task("release", _line_key(whole, product, config), deps, params))
    return tasks


def _check_unique(copies: list[list[str]], whole: str, product: str, config: str) -> None:
    """Two products of one release with one file name would overwrite each other."""
    seen: dict[str, str] = {}
    for src, dst in copies:
        if dst in seen and seen[dst] != src:
            raise ConfigError(f"release {whole} {product} {config}: {seen[dst]} and {src} "
                              f"would both be released as {dst}",
                              "give the derived products distinct names (derived key)")
        seen[dst] = src
