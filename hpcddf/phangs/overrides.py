"""The override key: tclean parameters of one named cube, over its imaging recipes.

An override line is ``filename param value``. ``filename`` names an imaging product the way
hpcddf names it (:func:`hpcddf.phangs.project.cube_filename` without ``.fits``):
``<target>_<config>_<product>`` sets the parameter in the tclean calls of all three imaging
stages of that cube, ``<target>_<config>_<product>_<stage>`` (stage dirty, multiscale or
singlescale) in that stage only. ``param`` is a tclean parameter of CASA 6.7 that the stages
do not set themselves; ``value`` is a Python literal, or else the text as written
(``0.2arcsec``). The reference reads this key and mostly ignores it; here it is applied by
the imaging planner (:func:`apply_overrides`) to the recipes it hands to the runner, which
records each applied line in the task's notes, and the tclean call carries the value.

Why checked when the keys are read (:func:`check_overrides`): an override naming a cube the
project never images, or a parameter tclean does not have, would otherwise be a line that
changes nothing, found only when the cube is not what the user asked for.
"""

from __future__ import annotations

import ast
from typing import Any

from hpcddf.phangs.keyfile import Where, _fail, _suggest
from hpcddf.phangs.project import STAGES, Project, cube_filename

# tclean's parameters in CASA 6.7.0.31 (casatasks.tclean), for checking override names.
TCLEAN_PARAMS = (
    "vis", "selectdata", "field", "spw", "timerange", "uvrange", "antenna", "scan",
    "observation", "intent", "datacolumn", "imagename", "imsize", "cell", "phasecenter",
    "stokes", "projection", "startmodel", "specmode", "reffreq", "nchan", "start", "width",
    "outframe", "veltype", "restfreq", "interpolation", "perchanweightdensity", "gridder",
    "facets", "psfphasecenter", "wprojplanes", "vptable", "mosweight", "aterm", "psterm",
    "wbawp", "conjbeams", "cfcache", "usepointing", "computepastep", "rotatepastep",
    "pointingoffsetsigdev", "pblimit", "normtype", "deconvolver", "scales", "nterms",
    "smallscalebias", "fusedthreshold", "largestscale", "restoration", "restoringbeam", "pbcor",
    "outlierfile", "weighting", "robust", "noise", "npixels", "uvtaper", "niter", "gain",
    "threshold", "nsigma", "cycleniter", "cyclefactor", "minpsffraction", "maxpsffraction",
    "interactive", "nmajor", "fullsummary", "usemask", "mask", "pbmask", "sidelobethreshold",
    "noisethreshold", "lownoisethreshold", "negativethreshold", "smoothfactor", "minbeamfrac",
    "cutthreshold", "growiterations", "dogrowprune", "minpercentchange", "verbose", "fastnoise",
    "restart", "savemodel", "calcres", "calcpsf", "psfcutoff", "parallel")


def _owned() -> tuple[str, ...]:
    """What the imaging stages set themselves (an override of it would be dropped)."""
    from hpcddf.phangs.casa_imaging import TCLEAN_OWNED
    return TCLEAN_OWNED


def parse_value(text: str) -> Any:
    """A Python literal, else the text itself (CASA quantities such as ``0.2arcsec``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def check_param(where: Where, param: str) -> None:
    """A tclean parameter the imaging stages leave to the recipe, or a ConfigError."""
    if param not in TCLEAN_PARAMS:
        _fail(where, f"override parameter {param!r} is not a tclean parameter",
              _suggest(param, TCLEAN_PARAMS, "tclean parameters"))
    if param in _owned():
        _fail(where, f"override parameter {param!r} is set by the imaging stages themselves",
              f"remove the line (the stages own: {', '.join(_owned())})")


def imaged_files(project: Project) -> dict[str, tuple[str, str, str, str | None]]:
    """Every name an override may give: ``stem`` and ``stem_<stage>`` of each cube the
    imaging stage makes -> (target, config, product, stage or None)."""
    out: dict[str, tuple[str, str, str, str | None]] = {}
    for target in project.targets:
        for product in project.line_products + project.cont_products:
            for config in project.interf_configs_for(target):
                stem = cube_filename(target, config, product)[: -len(".fits")]
                out[stem] = (target, config, product, None)
                for stage in STAGES:
                    out[f"{stem}_{stage}"] = (target, config, product, stage)
    return out


def check_overrides(project: Project) -> None:
    """Each override names a cube the project images (ConfigError at its line otherwise)."""
    known = imaged_files(project)
    for fname, params in project.overrides.items():
        if fname not in known:
            first = next(iter(params.values())).source
            _fail(first, f"override file {fname!r} is no cube this project images",
                  _suggest(fname, [k for k, v in known.items() if v[3] is None],
                           "cube names (optionally with _dirty, _multiscale or _singlescale)"))


def apply_overrides(project: Project, target: str, config: str, product: str,
                    recipes: dict[str, dict[str, Any]]
                    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The recipes with this cube's overrides set (a stage's own line wins over the cube's),
    and one note per applied line for the log."""
    stem = cube_filename(target, config, product)[: -len(".fits")]
    out = {stage: dict(params) for stage, params in recipes.items()}
    notes: list[str] = []
    for stage in out:
        for fname in (stem, f"{stem}_{stage}"):
            for param, ov in project.overrides.get(fname, {}).items():
                out[stage][param] = ov.value
                notes.append(f"override {ov.source}: {stage} tclean {param}={ov.value!r}")
    return out, notes

