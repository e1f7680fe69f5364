"""What every PHANGS stage planner shares: the task model, names, rest frequencies, selections.

:class:`Task` and :class:`StageArray` (what :func:`hpcddf.phangs.plan.plan_project` returns
and the runners and submission read), the line rest frequencies and the derived key's keyword
maps, the small helpers every planner uses (task ids from safe names, tclean recipes, rest
frequencies and excluded velocities, key-file names for errors) and the selection of targets
and configs. Kept below the planners (:mod:`hpcddf.phangs.plan_casa`,
:mod:`hpcddf.phangs.plan_chain`, :mod:`hpcddf.phangs.plan_moments`,
:mod:`hpcddf.phangs.plan_derived`) so that they share it without importing each other.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.project import Project, cube_filename

SAFE_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
C_KMS = 299_792.458

# Rest frequencies (GHz) of the line tags a line_product may name (CDMS/JPL values).
LINE_REST_GHZ: dict[str, float] = {
    "co10": 115.271202, "co21": 230.538000, "co32": 345.795990, "co43": 461.040768,
    "13co10": 110.201354, "13co21": 220.398684, "13co32": 330.587965,
    "c18o10": 109.782173, "c18o21": 219.560354, "c18o32": 329.330553,
    "hcn10": 88.631602, "hcn21": 177.261111, "hcn32": 265.886434,
    "hcop10": 89.188525, "hcop21": 178.375056, "hcop32": 267.557633,
    "hnc10": 90.663568, "hnc21": 181.324758, "hnc32": 271.981142,
    "cs21": 97.980953, "cs32": 146.969029, "cs54": 244.935557,
    "sio21": 86.846960, "n2hp10": 93.173704, "ci10": 492.160651, "ci21": 809.341970,
}

# The derived key's *_kw dicts: PHANGS keyword -> parameter of the hpcddf function it goes to
# (noise.phangs_noise, masks.strict_mask, masks.broad_mask, convolution.smooth_cube).
NOISE_KW = {"spec_box": "spec_box", "iterations": "iterations", "box": "box",
            "nThresh": "n_thresh", "n_thresh": "n_thresh", "substride": "substride",
            "bandpass_smooth_window": "bandpass_smooth_window",
            "bandpass_smooth_order": "bandpass_smooth_order"}
STRICTMASK_KW = {k: k for k in ("hi_thresh", "hi_nchan", "lo_thresh", "lo_nchan", "min_pix",
                                "min_area", "min_beams", "grow_xy", "grow_v")}
BROADMASK_KW = {"recipe": "recipe", "fraction_of_scales": "fraction", "fraction": "fraction",
                "grow_xy": "grow_xy", "grow_v": "grow_v"}
CONVOLVE_KW = {"tol": "tol"}
FLAT_MASKS = ("flatstrictmask", "flatbroadmask")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One unit of a stage: its key in the loop, the tasks it waits for (ids), what it needs.

    ``params`` is plain JSON data (paths as strings): ``inputs`` and ``outputs`` are the files
    it reads from other tasks and makes; the rest is what the node needs to run it, taken from
    the key files at planning time so that the jobs do not depend on keys edited later.
    """

    stage: str
    key: tuple[str, ...]
    depends: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        """``stage/part/part...``, e.g. ``imaging/ngc0628/co21/12m``; also its state file path."""
        return "/".join((self.stage, *self.key))

    @property
    def inputs(self) -> list[str]:
        return list(self.params.get("inputs", []))

    @property
    def outputs(self) -> list[str]:
        return list(self.params.get("outputs", []))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "key": list(self.key),
                "depends": list(self.depends), "params": self.params}


@dataclass(frozen=True)
class StageArray:
    """The tasks of one stage: one job array."""

    name: str
    tasks: tuple[Task, ...]

    @property
    def size(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True)
class _Selection:
    """Targets with uv data (per-part stages) and whole targets (postprocess, derived)."""

    parts: tuple[str, ...]
    whole: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _stem(target: str, config: str, product: str) -> str:
    return cube_filename(target, config, product)[: -len(".fits")]


def _check_names(task_key: Iterable[str], stage: str) -> None:
    for name in task_key:
        if not SAFE_NAME.match(name):
            raise ConfigError(f"{stage}: name {name!r} cannot be part of a task id or file name",
                              "use letters, digits and _ + - . in target, config, product, "
                              "project and obsnum names")


def _task(stage: str, key: Sequence[str], depends: Iterable[str], params: dict[str, Any]
          ) -> Task:
    _check_names(key, stage)
    return Task(stage, tuple(key), tuple(dict.fromkeys(depends)), params)


def _key_files(project: Project, kind: str) -> str:
    return ", ".join(map(str, project.key_files.get(kind, []))) or f"(no {kind})"


def read_recipe(path: Path) -> dict[str, Any]:
    """A ``.clean`` recipe: ``name = python literal`` lines, ``#`` comments skipped."""
    params: dict[str, Any] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        try:
            if not sep or not name.strip().isidentifier():
                raise ValueError("not 'name = value'")
            params[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"{path}:{number}: cannot read tclean parameter line {line!r} "
                              f"({exc})", "write it as name = python literal, e.g. "
                                          "robust = 0.5") from None
    return params


def line_restfreq_ghz(project: Project, product: str) -> float:
    """The rest frequency of a line product's line_tag."""
    tag = project.configs.line_product[product].line_tag
    if tag.lower() not in LINE_REST_GHZ:
        raise ConfigError(f"line_product {product}: line_tag {tag!r} has no known rest frequency "
                          f"({_key_files(project, 'config_key')})",
                          f"use one of {', '.join(LINE_REST_GHZ)}")
    return LINE_REST_GHZ[tag.lower()]


def _velocity_of(freq_ghz: float, rest_ghz: float) -> float:
    """Radio velocity (km/s) at which ``freq_ghz`` appears for a line at ``rest_ghz``."""
    return C_KMS * (1.0 - freq_ghz / rest_ghz)


def _excluded_velocities(project: Project, product: str, vsys: float, vwidth: float
                         ) -> list[list[float]]:
    """Velocity ranges (of this line) kept out of the continuum fit: other lines named in
    lines_to_flag at the target's velocity (± vwidth/2), and exclude_freq_ranges_ghz."""
    line = project.configs.line_product[product]
    rest = line_restfreq_ghz(project, product)
    out: list[list[float]] = []
    for other in line.lines_to_flag:
        if str(other).lower() not in LINE_REST_GHZ:
            raise ConfigError(f"line_product {product}: lines_to_flag names {other!r}, which "
                              f"has no known rest frequency ({_key_files(project, 'config_key')})",
                              f"use line tags such as {', '.join(list(LINE_REST_GHZ)[:6])}")
        observed = LINE_REST_GHZ[str(other).lower()] * (1.0 - vsys / C_KMS)
        centre = _velocity_of(observed, rest)
        out.append([round(centre - vwidth / 2.0, 3), round(centre + vwidth / 2.0, 3)])
    for pair in line.exclude_freq_ranges_ghz:
        try:
            lo, hi = (float(f) for f in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"line_product {product}: exclude_freq_ranges_ghz entry {pair!r} "
                              f"is not [low, high]", "write e.g. [[230.1, 230.3]]") from None
        v = sorted((_velocity_of(lo, rest), _velocity_of(hi, rest)))
        out.append([round(v[0], 3), round(v[1], 3)])
    return out


def _mapped_kw(project: Project, values: dict[str, Any], names: dict[str, str], what: str,
               config: str, product: str) -> dict[str, Any]:
    """A derived-key *_kw dict with its PHANGS keywords renamed to hpcddf's parameters."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{what} of config {config} product {product} has unknown keyword "
                          f"{unknown[0]!r} ({_key_files(project, 'derived_key')})",
                          f"use {', '.join(sorted(set(names)))}")
    return {names[k]: v for k, v in values.items()}


def _all_exist(paths: Iterable[str]) -> bool:
    paths = list(paths)
    return bool(paths) and all(Path(p).exists() for p in paths)


# ---------------------------------------------------------------------------------------------
# Targets and configs
# ---------------------------------------------------------------------------------------------

def _selection(project: Project, targets: Sequence[str] | None) -> _Selection:
    mosaics = project.linmos
    part_of = {p: m for m, ps in mosaics.items() for p in ps}
    with_uv = [t for t in project.targets if t not in mosaics]
    if targets is None:
        return _Selection(tuple(with_uv), tuple(project.whole_targets))
    names = list(dict.fromkeys(targets))
    project.loop(targets=names)  # unknown names: ConfigError with the closest known one
    parts: set[str] = set()
    whole: set[str] = set()
    for name in names:
        if name in mosaics:
            whole.add(name)
            parts.update(mosaics[name])
        elif name in part_of:
            parts.add(name)
        else:
            whole.add(name)
            parts.add(name)
    return _Selection(tuple(t for t in with_uv if t in parts),
                      tuple(t for t in project.whole_targets if t in whole))


def _products(project: Project) -> list[str]:
    return project.line_products + project.cont_products


def _parts(project: Project, whole: str) -> list[str]:
    return list(project.linmos.get(whole, [whole]))


def whole_target_configs(project: Project, whole: str, product: str) -> list[str]:
    """The configs postprocess and derived make for a whole target and product."""
    parts = _parts(project, whole)
    interf = [c for c in project.interf_configs
              if all(project.has_data_for_config(p, c) for p in parts)]
    has_sd = (whole, product) in project.singledish_files
    feather = [f for f, cfg in project.configs.feather_config.items()
               if has_sd and cfg.interf_config in interf]
    return interf + feather


def _interf_of(project: Project, config: str) -> str:
    feather = project.configs.feather_config.get(config)
    return feather.interf_config if feather else config
