"""A PHANGS project's loops as tasks with data-following dependencies (``plan_project``).

PHANGS runs its handlers one after another, each looping over everything (algorithms.md B2).
On a cluster that serialises a project on one node. Here every unit of a loop is a
:class:`Task` and every stage one job array (:class:`StageArray`), and each task waits only for
the tasks that make its inputs, so one galaxy's imaging starts while another's visibilities
are still being staged. Pure Python: nothing here runs CASA or talks to Slurm; ``--dry-run``
shows exactly this plan.

Stages, in order, and what each task waits for (:data:`DEPENDENCY_RULES`; all are "all of"):

``stage_ms``     (target, product, project, array_tag, obsnum): split one input MS to the
                 product's window, then uvcontsub (lines). Waits for nothing.
``stage_line``   (target, product, interf_config): regrid, concat and statwt the staged MSs of
                 the arrays the config uses. Waits for the ``stage_ms`` task of every one of
                 those MSs.
``imaging``      (target, product, interf_config): dirty, clean mask, multiscale, singlescale,
                 FITS export. Waits for its ``stage_line`` task (one to one).
``postprocess``  (whole target, product, config): pbcor, round beam, K, trim, export. A linear
                 mosaic's task waits for the ``imaging`` tasks of ALL its parts; a feather
                 config's for the imaging of its interferometric config.
``derived``      (whole target, product, config): convolve, noise, strict masks (native and
                 every resolution), the broad mask, then the moments round by round: round 1
                 (masked moments), round 2 (mom1wprior from round-1 maps), the velocity field
                 and flat masks, round 3 (moments on flat masks). The broad mask joins this
                 config's strict masks with those of its linked ``mask_configs``, so the task
                 waits for its own ``postprocess`` task AND for the ``postprocess`` task of
                 every linked config (the predecessors of the linked ``derived`` tasks). It
                 makes the linked configs' strict masks itself if they are not there yet,
                 under a per-file lock, so a linked task running at the same time reuses
                 rather than redoes them; a mom1wprior prior that is another config's strict
                 mom1 (PHANGS' 7m+tp 15as) is made the same way, and that config's
                 ``postprocess`` task joins the dependencies. Depending on those predecessors
                 instead of on sibling ``derived`` tasks keeps the array free of internal
                 dependencies and of cycles: two configs may list each other as mask configs.

Targets: ``stage_ms``/``stage_line``/``imaging`` run per target with uv data (mosaic parts
separately); ``postprocess``/``derived`` per whole target (a mosaic replaces its parts).
Selecting a mosaic selects its parts; selecting a part selects only its per-part tasks.
Configs of a whole target: the interferometric configs every part has full data for, plus
feather configs on one of those when the single-dish key has an entry for it. Linked mask
configs that do not exist for a target are ignored, as PHANGS skips masks it cannot find.

A stage filter keeps only the stages named. A kept task's dependencies on stages not run are
dropped, and the files it needs from them must exist already: otherwise a ConfigError names the
first missing file and the stage to run first (unless the task's own products are all there,
when it will only be skipped). Checks that need the key files of a stage (measurement sets on
disk, recipes, rest frequencies, distances, moment definitions) are made only for the stages
that run.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.project import Project, cube_filename

STAGES = ("stage_ms", "stage_line", "imaging", "postprocess", "derived")
CASA_STAGES = ("stage_ms", "stage_line", "imaging", "postprocess")
PREVIOUS = {"stage_line": "stage_ms", "imaging": "stage_line", "postprocess": "imaging",
            "derived": "postprocess"}
DEPENDENCY_RULES = {
    "stage_ms": "nothing",
    "stage_line": "all stage_ms tasks of the MSs of the target's arrays in this config",
    "imaging": "the stage_line task of the same target, product and config (one to one)",
    "postprocess": "all imaging tasks of the whole target's parts (itself if not a mosaic) "
                   "for this config (a feather config: its interferometric config)",
    "derived": "the postprocess task of this config and of every linked mask_config of the "
               "same target and product (their strict masks feed the broad mask), and of the "
               "config whose map is a mom1wprior prior",
}
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

def project_work_dir(project: Project) -> Path:
    """Where the project's task states and job logs live: the deepest directory holding the
    imaging, postprocess and derived roots (the key directory when they share none)."""
    roots = [project.roots[k] for k in ("imaging_root", "postprocess_root", "derived_root")
             if k in project.roots]
    if not roots:
        return project.key_dir
    common = Path(os.path.commonpath([str(r) for r in roots]))
    return project.key_dir if common == Path(common.anchor) else common


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


# ---------------------------------------------------------------------------------------------
# Per-stage task builders (``detailed``: the stage runs, so its run parameters are needed)
# ---------------------------------------------------------------------------------------------

def _staged_ms_paths(project: Project, target: str, product: str, entry: Any) -> dict[str, str]:
    stem = f"{target}_{entry.project}_{entry.array_tag}_{entry.obsnum}_{product}"
    d = project.imaging_dir(target)
    return {"split": str(d / f"{stem}_split.ms"), "contsub": str(d / f"{stem}_contsub.ms")}


def _staged_ms_product(project: Project, target: str, product: str, entry: Any) -> str:
    paths = _staged_ms_paths(project, target, product, entry)
    return paths["contsub"] if product in project.line_products else paths["split"]


def _ms_key(target: str, product: str, entry: Any) -> tuple[str, ...]:
    return (target, product, entry.project, entry.array_tag, entry.obsnum)


def _build_stage_ms(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for target in sel.parts:
        configs = project.interf_configs_for(target)
        entries = project.input_ms(target, configs, must_exist=detailed) if configs else []
        for product in _products(project):
            for e in entries:
                params: dict[str, Any] = {
                    "inputs": [str(e.path)] if e.path else [],
                    "outputs": [_staged_ms_product(project, target, product, e)]}
                if detailed:
                    params.update(_stage_ms_params(project, target, product, e))
                tasks.append(_task("stage_ms", _ms_key(target, product, e), (), params))
    return tasks


def _window(project: Project, target: str) -> dict[str, float]:
    t = project.target_defs[target]
    return {"vsys_kms": t.vsys_kms, "vwidth_kms": t.vwidth_kms}


def _stage_ms_params(project: Project, target: str, product: str, e: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"target": target, "product": product, "vis": str(e.path),
                            # the ms key's field 'all' means every field (CASA's '')
                            "field": "" if e.field.lower() == "all" else e.field,
                            **_staged_ms_paths(project, target, product, e)}
    if product not in project.line_products:
        # split keeps the channels of the product's frequency ranges; the lines are flagged
        # later (stage_line), on a copy, as PHANGS flags them in task_extract_continuum
        return {**base, "kind": "cont", "freq_ranges_ghz": cont_freq_ranges_ghz(project, product)}
    line = project.configs.line_product[product]
    win = _window(project, target)
    return {**base, "kind": "line", "restfreq_ghz": line_restfreq_ghz(project, product), **win,
            # split keeps statwt_edge_kms beyond the window on each side: line-free channels
            # for uvcontsub and statwt
            "margin_kms": line.statwt_edge_kms, "fitorder": line.fitorder,
            "exclude_kms": _excluded_velocities(project, product, win["vsys_kms"],
                                                win["vwidth_kms"])}


def _line_key(target: str, product: str, config: str) -> tuple[str, ...]:
    return (target, product, config)


def _staged_line_path(project: Project, target: str, product: str, config: str) -> str:
    return str(project.imaging_dir(target) / f"{_stem(target, config, product)}.ms")


def _build_stage_line(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for target in sel.parts:
        for product in _products(project):
            for config in project.interf_configs_for(target):
                entries = project.input_ms(target, config, must_exist=False)
                deps = [Task("stage_ms", _ms_key(target, product, e)).id for e in entries]
                vis = [_staged_ms_product(project, target, product, e) for e in entries]
                out = _staged_line_path(project, target, product, config)
                params: dict[str, Any] = {"inputs": vis, "outputs": [out]}
                if detailed:
                    params.update(_stage_line_params(project, target, product, config, vis, out))
                tasks.append(_task("stage_line", _line_key(target, product, config), deps, params))
    return tasks


def _stage_line_params(project: Project, target: str, product: str, config: str,
                       vis: list[str], out: str) -> dict[str, Any]:
    base = {"target": target, "product": product, "config": config, "vis": vis,
            "outputvis": out}
    if product not in project.line_products:
        cont = project.configs.cont_product[product]
        win = _window(project, target)
        if cont.channel_ghz < 0:
            raise ConfigError(f"cont_product {product}: channel_ghz {cont.channel_ghz:g} is "
                              f"negative ({_key_files(project, 'config_key')})",
                              "give the averaged channel width in GHz, or 0 for one channel "
                              "per spectral window")
        return {**base, "kind": "cont", **win, "channel_ghz": cont.channel_ghz,
                "flag_ghz": line_flag_ranges_ghz(project, product, win["vsys_kms"],
                                                 win["vwidth_kms"])}
    line = project.configs.line_product[product]
    return {**base, "kind": "line", "restfreq_ghz": line_restfreq_ghz(project, product),
            **_window(project, target), "channel_kms": line.channel_kms,
            "statwt_edge_kms": line.statwt_edge_kms}


def _range_error(project: Project, product: str, what: str, pair: Any) -> ConfigError:
    return ConfigError(f"cont_product {product}: {what} entry {pair!r} is not [low, high] in "
                       f"GHz ({_key_files(project, 'config_key')})",
                       "write e.g. [[210.0, 235.0], [245.0, 260.0]]")


def cont_freq_ranges_ghz(project: Project, product: str) -> list[list[float]]:
    """A continuum product's freq_ranges_ghz as sorted [low, high] pairs (LSRK GHz); empty
    means every channel of the data."""
    out = []
    for pair in project.configs.cont_product[product].freq_ranges_ghz:
        try:
            lo, hi = sorted(float(f) for f in pair)
        except (TypeError, ValueError):
            raise _range_error(project, product, "freq_ranges_ghz", pair) from None
        if lo <= 0 or lo == hi:
            raise _range_error(project, product, "freq_ranges_ghz", pair)
        out.append([lo, hi])
    return sorted(out)


def lines_to_flag(project: Project, product: str) -> list[str]:
    """The line tags a continuum product's lines_to_flag names. An entry is a tag (``co21``)
    or, as PHANGS's line families, a tag without its transition (``co``: co10, co21, co32,
    co43; ``13co``: the 13CO lines; never a longer name that merely starts alike)."""
    tags: list[str] = []
    for name in project.configs.cont_product[product].lines_to_flag:
        tag = re.sub(r"[^0-9a-z]", "", str(name).lower())
        family = [t for t in LINE_REST_GHZ if re.fullmatch(re.escape(tag) + r"[0-9]+", t)]
        if tag in LINE_REST_GHZ:
            tags.append(tag)
        elif tag and family:
            tags += family
        else:
            raise ConfigError(f"cont_product {product}: lines_to_flag names {name!r}, which is "
                              f"neither a known line tag nor a family of them "
                              f"({_key_files(project, 'config_key')})",
                              f"use tags such as co21 or families such as co, 13co, hcn "
                              f"(known tags: {', '.join(LINE_REST_GHZ)})")
    return list(dict.fromkeys(tags))


def line_flag_ranges_ghz(project: Project, product: str, vsys_kms: float, vwidth_kms: float
                         ) -> list[list[float]]:
    """LSRK frequency ranges (GHz) a continuum product flags: every line of lines_to_flag
    over the target's window vsys +- vwidth/2 (radio convention, as PHANGS), overlaps merged."""
    ranges = sorted([LINE_REST_GHZ[t] * (1.0 - (vsys_kms + vwidth_kms / 2.0) / C_KMS),
                     LINE_REST_GHZ[t] * (1.0 - (vsys_kms - vwidth_kms / 2.0) / C_KMS)]
                    for t in lines_to_flag(project, product))
    merged: list[list[float]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def imaging_base(project: Project, target: str, product: str, config: str) -> str:
    """tclean's imagename of a cube (products are ``BASE.image``, ``BASE.pb``, ...)."""
    return str(project.imaging_dir(target) / _stem(target, config, product))


def _imaging_products(base: str) -> list[str]:
    """What postprocess reads; ``_singlescale.image`` marks an imaging run that finished."""
    return [f"{base}.image", f"{base}.pb", f"{base}_singlescale.image"]


def _build_imaging(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for target in sel.parts:
        for product in _products(project):
            for config in project.interf_configs_for(target):
                base = imaging_base(project, target, product, config)
                vis = _staged_line_path(project, target, product, config)
                params: dict[str, Any] = {"inputs": [vis],
                                          "outputs": [*_imaging_products(base), f"{base}.fits"]}
                if detailed:
                    params.update(_imaging_params(project, target, product, config, base, vis))
                deps = [Task("stage_line", _line_key(target, product, config)).id]
                tasks.append(_task("imaging", _line_key(target, product, config), deps, params))
    return tasks


def _imaging_params(project: Project, target: str, product: str, config: str, base: str,
                    vis: str) -> dict[str, Any]:
    recipes = {stage: read_recipe(path)
               for stage, path in project.imaging_recipes(config, product).items()}
    kind = "line" if product in project.line_products else "cont"
    if kind == "cont":
        recipes = _continuum_recipes(project, config, product, recipes)
    return {"target": target, "product": product, "config": config, "kind": kind,
            "imagename": base, "vis": [vis], "recipes": recipes,
            "restfreq_ghz": line_restfreq_ghz(project, product) if kind == "line" else None,
            "clean_scales_arcsec": list(project.configs.interf_config[config].clean_scales_arcsec)}


def _continuum_recipes(project: Project, config: str, product: str,
                       recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A continuum product is imaged as one plane (tclean specmode 'mfs'): a recipe that
    leaves specmode out gets it, one that asks for another mode is an error."""
    paths = project.imaging_recipes(config, product)
    for stage, params in recipes.items():
        mode = params.get("specmode", "mfs")
        if mode != "mfs":
            raise ConfigError(f"{paths[stage]}: specmode {mode!r} for continuum product "
                              f"{product} (config {config}, stage {stage})",
                              "continuum products are imaged as one plane: write "
                              "specmode = 'mfs' in the recipe, or leave specmode out")
    return {stage: {**params, "specmode": "mfs"} for stage, params in recipes.items()}


def _postprocess_products(project: Project, whole: str, product: str, config: str) -> list[str]:
    stem = _stem(whole, config, product)
    d = project.postprocess_dir(whole)
    return [str(d / f"{stem}_{k}.fits") for k in ("pbcorr_trimmed_k", "flat_trimmed_k",
                                                    "pb_trimmed")]


def postprocess_cube(project: Project, whole: str, product: str, config: str) -> str:
    """The Kelvin cube postprocess makes and the derived products start from."""
    return _postprocess_products(project, whole, product, config)[0]


def _build_postprocess(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for whole in sel.whole:
        parts = _parts(project, whole)
        for product in _products(project):
            for config in whole_target_configs(project, whole, product):
                interf = _interf_of(project, config)
                bases = [imaging_base(project, p, product, interf) for p in parts]
                deps = [Task("imaging", _line_key(p, product, interf)).id for p in parts]
                params: dict[str, Any] = {
                    "inputs": [f for b in bases for f in _imaging_products(b)],
                    "outputs": _postprocess_products(project, whole, product, config)}
                if detailed:
                    params.update({
                        "target": whole, "product": product, "config": config,
                        "kind": "line" if product in project.line_products else "cont",
                        "mosaic": whole in project.linmos, "parts": parts,
                        "feather": config in project.configs.feather_config,
                        "interf_config": interf, "imagenames": bases,
                        "outdir": str(project.postprocess_dir(whole)),
                        "stem": _stem(whole, config, product),
                        "units": _postprocess_units(project, whole, product, config, bases,
                                                    check=not _all_exist(params["outputs"]))})
                tasks.append(_task("postprocess", _line_key(whole, product, config), deps,
                                   params))
    return tasks


def _postprocess_units(project: Project, whole: str, product: str, config: str,
                       bases: list[str], check: bool = True) -> list[dict[str, Any]]:
    """One CASA postprocess (or, for a feather config, feather) run per imaged target: the
    whole target's own products, or for a linear mosaic each part's, in the part's
    postprocess directory, which the mosaic then combines (PHANGS also prepares, and feathers,
    every part before the mosaic). A part feathers with its own single-dish entry if the key
    has one, else with the mosaic's (one total-power map usually covers the whole galaxy).
    ``check``: a missing single-dish file is an error (not for a task whose products all
    exist: it will only be skipped, as for its other inputs)."""
    feather = config in project.configs.feather_config
    units = []
    for part, base in zip(_parts(project, whole), bases, strict=True):
        stem = _stem(part, config, product)
        outdir = project.postprocess_dir(part)
        unit: dict[str, Any] = {
            "target": part, "imagename": base, "outdir": str(outdir), "stem": stem,
            "fits": {k: str(outdir / f"{stem}_{k}.fits")
                     for k in ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed")}}
        if feather:
            owner = part if (part, product) in project.singledish_files else whole
            sd = (singledish_path(project, owner, product) if check
                  else project.singledish_file(owner, product))
            unit["singledish"] = str(sd) if sd else None
        units.append(unit)
    return units


def singledish_path(project: Project, target: str, product: str) -> Path:
    """The single-dish cube of (target, product); a key entry whose file is under no
    singledish_root is a ConfigError naming the key line, before anything is queued."""
    ref = project.singledish_files.get((target, product))
    if ref is None:
        raise ConfigError(f"no single-dish cube for {target} {product} "
                          f"({_key_files(project, 'singledish_key')})",
                          f"add a line '{target} {product} FILE' to the singledish key")
    path = project.singledish_file(target, product)
    if path is None:
        roots = ", ".join(map(str, project.singledish_roots)) or "none set"
        raise ConfigError(f"{ref.source}: single-dish cube {ref.file} not found under any "
                          f"singledish_root ({roots})",
                          f"fix the file name, or add the singledish_root holding it to "
                          f"{project.master_key}")
    return path


# -- derived ------------------------------------------------------------------------------------

def linked_mask_configs(project: Project, whole: str, product: str, config: str) -> list[str]:
    """The other configs whose strict masks this config's broad mask joins (those that exist
    for this target and product)."""
    existing = whole_target_configs(project, whole, product)
    links = project.derived_params(config, product).mask_configs
    return [c for c in links if c != config and c in existing]


def _derived_name(project: Project, whole: str, config: str, product: str, ext: str | None
                  ) -> str:
    return str(project.derived_dir(whole) / cube_filename(whole, config, product, ext))


def _resolutions(project: Project, whole: str, config: str, product: str
                 ) -> list[dict[str, Any]]:
    """Angular then physical resolutions, each by increasing size (PHANGS' order)."""
    dp = project.derived_params(config, product)
    clash = sorted(set(dp.ang_res) & set(dp.phys_res))
    if clash:
        raise ConfigError(f"config {config} product {product}: resolution tag {clash[0]!r} is "
                          f"both an ang_res and a phys_res ({_key_files(project, 'derived_key')})",
                          "give the two resolutions different tags")
    out: list[dict[str, Any]] = [{"tag": tag, "ang_arcsec": size}
                                 for tag, size in sorted(dp.ang_res.items(), key=lambda kv: kv[1])]
    out += [{"tag": tag, "phys_pc": size}
            for tag, size in sorted(dp.phys_res.items(), key=lambda kv: kv[1])]
    return out


def _chain(project: Project, whole: str, product: str, config: str, detailed: bool
           ) -> dict[str, Any]:
    """Convolution, noise and strict-mask products of one config (native and every res)."""
    res = _resolutions(project, whole, config, product)

    def name(ext: str | None) -> str:
        return _derived_name(project, whole, config, product, ext)
    levels = [{"tag": "", "cube": name(None), "coverage": name("coverage"),
               "coverage2d": name("coverage2d"), "noise": name("noise"),
               "strictmask": name("strictmask")}]
    for r in res:
        t = r["tag"]
        levels.append({**r, "cube": name(t), "coverage": name(f"{t}_coverage"),
                       "coverage2d": name(f"{t}_coverage2d"), "noise": name(f"{t}_noise"),
                       "strictmask": name(f"{t}_strictmask")})
    chain: dict[str, Any] = {"config": config, "cube_in": postprocess_cube(project, whole,
                                                                          product, config),
                             "levels": levels}
    if detailed:
        dp = project.derived_params(config, product)
        chain["noise_kw"] = _mapped_kw(project, dp.noise_kw, NOISE_KW, "noise_kw", config,
                                       product)
        chain["strictmask_kw"] = _mapped_kw(project, dp.strictmask_kw, STRICTMASK_KW,
                                            "strictmask_kw", config, product)
        chain["convolve_kw"] = _mapped_kw(project, dp.convolve_kw, CONVOLVE_KW, "convolve_kw",
                                          config, product)
        if any("phys_pc" in r for r in res) and not project.distance_mpc(whole):
            raise ConfigError(f"{whole}: config {config} product {product} has physical "
                              f"resolutions (phys_res) but no distance",
                              f"add {whole} to the distance key "
                              f"({_key_files(project, 'distance_key')})")
    return chain


def _chain_products(chain: dict[str, Any]) -> list[str]:
    return [lvl[k] for lvl in chain["levels"]
            for k in ("cube", "coverage", "coverage2d", "noise", "strictmask")]


# The round-1 maps mom1wprior combines, by the role the moment key's kwargs may name them with:
# the (algorithm, mask) of the moment that makes them, and moments.PRIOR_MAPS' names for its
# value and error maps.
MOM1WPRIOR_ROLES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "strict_vfield": (("mom1", "strictmask"), ("strict_mom1", "strict_emom1")),
    "broad_vfield": (("mom1", "broadmask"), ("broad_mom1", "broad_emom1")),
    "broad_signal": (("mom0", "broadmask"), ("broad_mom0", "broad_emom0")),
}
# mom1wprior's numeric kwargs (PHANGS' names and hpcddf's) -> moments.mom1wprior parameters.
# Other kwargs of a mom1wprior are ignored with a note rather than refused: PHANGS' keys pass it
# keywords of their own implementation (output units, contexts) that mean nothing here.
# PHANGS' published moment key writes the mom0 S/N threshold as 'mom0_thresh', its code as
# 'mom0_thresh_for_mom1': both mean the same threshold.
MOM1WPRIOR_KW = {"vfield_reject_thresh": "vwindow_kms", "vwindow_kms": "vwindow_kms",
                 "mom0_thresh_for_mom1": "snr_thresh", "mom0_thresh": "snr_thresh",
                 "snr_thresh": "snr_thresh"}
# kwargs that name maps instead: the three roles, and a prior map of this config
MOM1WPRIOR_MAP_KW = (*MOM1WPRIOR_ROLES, "vfield_prior", "vfield_prior_res")
# other_exts keys naming mom1wprior's prior file: hpcddf's 'prior' and PHANGS' 'vfield_prior'
PRIOR_EXT_KEYS = ("prior", "vfield_prior")
FLATMASK_KW = {"window": "window"}
DEFAULT_FLAT_WINDOW_KMS = 50.0
RAD_ARCSEC = 206_264.806


def _level_arcsec(level: dict[str, Any], distance_mpc: float | None) -> float:
    """A level's resolution, to order levels finest first (native: 0; no distance: last)."""
    if "ang_arcsec" in level:
        return float(level["ang_arcsec"])
    if "phys_pc" in level:
        if not distance_mpc:
            return float("inf")
        return float(level["phys_pc"]) / (float(distance_mpc) * 1e6) * RAD_ARCSEC
    return 0.0


def _finest_first(levels: list[dict[str, Any]], distance_mpc: float | None
                  ) -> list[dict[str, Any]]:
    return sorted(levels, key=lambda lvl: _level_arcsec(lvl, distance_mpc))


def _moment_kw_names(algorithm: str) -> list[str]:
    """The kwargs a moment key may give an algorithm: the parameters of its function after
    (cube, noise, mask, vaxis); mom1wprior's are translated (MOM1WPRIOR_KW, MOM1WPRIOR_MAP_KW)."""
    import inspect

    from hpcddf.phangs.moments import ALGORITHMS
    if algorithm == "mom1wprior":
        return [*MOM1WPRIOR_KW, *MOM1WPRIOR_MAP_KW]
    return list(inspect.signature(ALGORITHMS[algorithm][0]).parameters)[4:]


def _checked_moment(project: Project, name: str) -> Any:
    """The moment key's definition of ``name``, checked: known algorithm, an ext, known
    kwargs (so a typo is a key error at planning, not a TypeError on the node)."""
    from hpcddf.phangs.moments import ALGORITHMS

    m = project.moment_params(name)
    where = _key_files(project, "moment_key")
    if m.algorithm not in ALGORITHMS:
        raise ConfigError(f"moment {name}: algorithm {m.algorithm!r} is unknown ({where})",
                          f"use one of {', '.join(ALGORITHMS)}")
    if not m.ext:
        raise ConfigError(f"moment {name} has no ext ({where})",
                          f"add a line '{name} ext _{name}'")
    known = _moment_kw_names(m.algorithm)
    unknown = sorted(set(m.kwargs) - set(known))
    if unknown and m.algorithm != "mom1wprior":  # mom1wprior's: ignored with a note
        raise ConfigError(f"moment {name}: kwargs keyword {unknown[0]!r} is not a parameter "
                          f"of {m.algorithm} ({where})",
                          f"use {', '.join(known)}" if known
                          else f"give {m.algorithm} no kwargs")
    return m


def _moment_mask(project: Project, whole: str, product: str, config: str,
                 level: dict[str, Any], mask: str | None) -> str | None:
    """The mask file a moment uses at a level: strict and flat-strict masks are per level,
    broad and flat-broad masks are one per config (on the native grid all levels share)."""
    if mask is None:
        return None
    if mask == "strictmask":
        return level["strictmask"]
    ext = {"broadmask": "broadmask", "flatbroadmask": "flatbroadmask",
           "flatstrictmask": f"{level['tag']}_flatstrictmask"}[mask]
    return _derived_name(project, whole, config, product, ext)


def _cube_moment(project: Project, whole: str, product: str, config: str, name: str, m: Any,
                 level: dict[str, Any], rnd: int) -> dict[str, Any]:
    """A moment computed from a level's cube, noise cube and mask."""
    def path(ext: str) -> str:
        return _derived_name(project, whole, config, product, f"{level['tag']}{ext}")
    return {"moment": name, "tag": level["tag"], "round": rnd, "algorithm": m.algorithm,
            "cube": level["cube"], "noise": level["noise"], "mask_kind": m.mask,
            "mask": _moment_mask(project, whole, product, config, level, m.mask),
            "out": path(m.ext), "err": path(m.ext_error) if m.ext_error else None,
            "kwargs": dict(m.kwargs)}


def _moment_line(project: Project, name: str, param: str, mentions: str | None = None) -> str:
    """``file:line`` of the moment key line setting ``param`` of moment ``name`` (the last,
    the one in force; with ``mentions``, the last whose value contains it), else the moment
    key files. The moment model keeps no line numbers, so errors found at planning look the
    line up again here: the user should not have to search the key for it."""
    from hpcddf.phangs.keyfile import _lines

    found = None
    for path in project.key_files.get("moment_key", []):
        for where, line in _lines(Path(path)):
            words = line.split(None, 2)
            if (words[:2] == [name, param]
                    and (mentions is None or mentions in (words[2:] or [""])[0])):
                found = where
    return str(found) if found else _key_files(project, "moment_key")


def _passed_moment(project: Project, ref: str, listed: list[str]) -> str | None:
    """The moment a ``maps_to_pass`` entry (or a role kwarg) names, or None.

    Either a moment name (hpcddf's keys) or, as PHANGS' own moment key writes them, a map
    extension: PHANGS passes the file ``<momentroot>_<ext>.fits``, so ``strict_mom1`` and
    ``strict_emom1`` are the value and error maps of the moment whose ``ext`` / ``ext_error``
    is ``_strict_mom1`` / ``_strict_emom1``. A name wins over an extension; an extension is
    looked up in the config's moment list first, then anywhere in the moment key.
    """
    defs = project.moments
    if ref in defs:
        return ref
    ext = "_" + ref.removesuffix(".fits").lstrip("_")
    pool = [*listed, *sorted(set(defs) - set(listed))]
    return next((n for n in pool if ext in (defs[n].ext, defs[n].ext_error)), None)


def _mom1wprior_roles(project: Project, name: str, m: Any, listed: list[str]
                      ) -> tuple[dict[str, str], str | None]:
    """The moment playing each of mom1wprior's roles (MOM1WPRIOR_ROLES), or why none can.

    Named by the role's kwarg first (PHANGS' ``strict_vfield`` etc.), then by the
    (algorithm, mask) of the moments in ``maps_to_pass`` (moment names or PHANGS' map
    extensions, see :func:`_passed_moment`), then of the config's moment list, then of any
    moment the key defines (made too, then: a passed map must exist).
    """
    defs = project.moments

    def known(ref: str, what: str, where: str) -> tuple[str, tuple[str | None, str | None]]:
        found = _passed_moment(project, ref, listed)
        if found is None:
            raise ConfigError(f"moment {name}: {what} names {ref!r}, which the moment key "
                              f"does not define (no moment {ref!r}, no moment with ext or "
                              f"ext_error '_{ref.lstrip('_')}') ({where})",
                              f"name a moment ({', '.join(sorted(defs))}) or one of its maps "
                              "as PHANGS does, its ext without the leading '_' "
                              "(e.g. 'strict_mom1')")
        return found, (defs[found].algorithm, defs[found].mask)

    roles: dict[str, str] = {}
    for role, (want, _) in MOM1WPRIOR_ROLES.items():
        if role in m.kwargs:
            where = _moment_line(project, name, "kwargs", role)
            ref, sig = known(str(m.kwargs[role]), role, where)
            if sig != want:
                raise ConfigError(f"moment {name}: {role} {ref} is not a {want[0]} with mask "
                                  f"{want[1]} ({where})", f"name a {want[0]} moment with mask "
                                                          f"{want[1]} as {role}")
            roles[role] = ref
    for entry in m.maps_to_pass:
        where = _moment_line(project, name, "maps_to_pass")
        ref, sig = known(str(entry), "maps_to_pass", where)
        role = next((r for r, (want, _) in MOM1WPRIOR_ROLES.items() if sig == want), None)
        if role is None:
            raise ConfigError(f"moment {name}: maps_to_pass names {entry} (moment {ref}, "
                              f"{sig[0]} with mask {sig[1]}), which is none of the maps "
                              f"mom1wprior combines ({where})",
                              "pass a mom1 with strictmask, a mom1 with broadmask and a mom0 "
                              "with broadmask (and their error maps)")
        roles.setdefault(role, ref)
    pool = [*listed, *sorted(set(defs) - set(listed))]
    for role, (want, _) in MOM1WPRIOR_ROLES.items():
        if role not in roles:
            found = next((r for r in pool if (defs[r].algorithm, defs[r].mask) == want), None)
            if found is None:
                return roles, (f"needs a {want[0]} moment with mask {want[1]} ({role}); the "
                               f"moment key defines none")
            roles[role] = found
    for role, ref in roles.items():
        if not defs[ref].ext_error:
            return roles, f"its {role} map {ref} has no ext_error (its error map is needed)"
    return roles, None


def _mom1wprior_kwargs(project: Project, name: str, m: Any) -> tuple[dict[str, float],
                                                                    list[str]]:
    """The numeric kwargs as moments.mom1wprior parameters (a threshold like '30km/s' too),
    and the kwargs ignored."""
    from hpcddf.phangs.masks import window_kms

    out: dict[str, float] = {}
    ignored = [k for k in m.kwargs if k not in MOM1WPRIOR_KW and k not in MOM1WPRIOR_MAP_KW]
    for key, value in m.kwargs.items():
        if key not in MOM1WPRIOR_KW:
            continue
        try:
            out[MOM1WPRIOR_KW[key]] = (window_kms(value) if MOM1WPRIOR_KW[key] == "vwindow_kms"
                                       else float(value))
        except (ConfigError, TypeError, ValueError):
            raise ConfigError(f"moment {name}: kwargs {key} {value!r} is not a "
                              f"{'velocity' if 'thresh' in key and 'mom0' not in key else 'number'}"
                              f" ({_moment_line(project, name, 'kwargs', key)})",
                              "write e.g. {'vfield_reject_thresh':'30km/s',"
                              "'mom0_thresh_for_mom1':2.0}") from None
    return out, ignored


def _prior(project: Project, whole: str, product: str, config: str, name: str, m: Any,
           levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Where mom1wprior's prior velocity field comes from.

    ``other_exts {'vfield_prior': ext}`` (PHANGS' key; ``'prior'`` is accepted too) names the
    file ``<target><ext>`` in the target's derived directory (PHANGS:
    ``<target>_7m+tp_co21_15as_strict_mom1.fits``, a robust low-resolution field), as PHANGS
    passes every other_exts entry; PHANGS' kwargs ``vfield_prior`` (a moment) and
    ``vfield_prior_res`` (a level tag) name one of this config's own maps, and an other_exts
    file wins over them as it does in PHANGS (it overwrites that kwarg). With neither, the
    source is the fallback: the broad mom1 of the coarsest level made (see run.py), which is
    also used when the named file is missing when the map is made.
    """
    extra = sorted(set(m.other_exts) - set(PRIOR_EXT_KEYS))
    if extra:
        raise ConfigError(f"moment {name}: other_exts {extra[0]!r} is not used by "
                          f"{m.algorithm} ({_moment_line(project, name, 'other_exts', extra[0])})",
                          "mom1wprior takes other_exts {'vfield_prior':'_<config>_<product>_"
                          "<res>_strict_mom1.fits'} (or 'prior' for 'vfield_prior')")
    exts = {str(m.other_exts[k]).removesuffix(".fits") for k in PRIOR_EXT_KEYS
            if k in m.other_exts}
    if len(exts) > 1:
        raise ConfigError(f"moment {name}: other_exts 'prior' and 'vfield_prior' name different "
                          f"files ({_moment_line(project, name, 'other_exts')})",
                          "give the prior once, as 'vfield_prior'")
    if exts:
        return {"path": str(project.derived_dir(whole) / f"{whole}{exts.pop()}.fits"),
                "source": "file"}
    if "vfield_prior" in m.kwargs:
        ref = str(m.kwargs["vfield_prior"])
        tag = str(m.kwargs.get("vfield_prior_res") or "")
        if ref not in project.moments or not project.moments[ref].ext:
            raise ConfigError(f"moment {name}: vfield_prior {ref!r} is not a moment with an "
                              f"ext ({_moment_line(project, name, 'kwargs', 'vfield_prior')})",
                              "name the moment whose map is the prior")
        tags = [lvl["tag"] for lvl in levels]
        if tag not in tags:
            where = _moment_line(project, name, "kwargs", "vfield_prior_res")
            raise ConfigError(f"moment {name}: vfield_prior_res {tag!r} is not a resolution "
                              f"of config {config} ({where})",
                              f"use one of {', '.join(repr(t) for t in tags)}")
        return {"path": _derived_name(project, whole, config, product,
                                      f"{tag}{project.moments[ref].ext}"), "source": "file"}
    return {"path": None, "source": "fallback"}


def _moments(project: Project, whole: str, product: str, config: str, levels: list[dict],
             distance_mpc: float | None = None
             ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every moment of the config at every level, each a spec with its inputs and the round
    it runs in, and the moments left out (with why).

    A moment runs no earlier than the key's ``round`` and after its inputs: mom1wprior after
    the maps it combines (round ≥ 2, PHANGS' "secondary" moments); a moment on a flat mask
    after the velocity field the flat masks follow, which is made from the mom1wprior maps
    once their round is over (round ≥ 3, PHANGS' "flat maps"). Maps mom1wprior needs that the
    config's moment list lacks are made as well (marked ``implied_by``).
    """
    listed = project.derived_params(config, product).moments
    defs = {n: _checked_moment(project, n) for n in listed}
    skipped: list[dict[str, str]] = []
    cube_names = [n for n in listed if defs[n].algorithm != "mom1wprior"]
    implied: dict[str, str] = {}
    wprior: dict[str, dict[str, str]] = {}
    for name in listed:
        if defs[name].algorithm != "mom1wprior":
            continue
        roles, reason = _mom1wprior_roles(project, name, defs[name], listed)
        if reason:
            skipped.append({"moment": name, "reason": reason})
            continue
        wprior[name] = roles
        for ref in roles.values():
            if ref not in cube_names and ref not in implied:
                defs[ref] = _checked_moment(project, ref)
                implied[ref] = name

    def path(tag: str, ext: str) -> str:
        return _derived_name(project, whole, config, product, f"{tag}{ext}")

    made: list[dict[str, Any]] = []
    for name in [*cube_names, *implied]:
        m = defs[name]
        if m.mask in FLAT_MASKS:
            continue  # below, once the round of the velocity field is known
        for lvl in levels:
            spec = _cube_moment(project, whole, product, config, name, m, lvl, max(m.round, 1))
            if name in implied:
                spec["implied_by"] = implied[name]
            made.append(spec)
    round_of = {s["out"]: s["round"] for s in made}
    coarsest_first = list(reversed(_finest_first(levels, distance_mpc)))
    for name, roles in wprior.items():
        m = defs[name]
        prior = _prior(project, whole, product, config, name, m, levels)
        prior["fallback"] = [path(lvl["tag"], defs[roles["broad_vfield"]].ext)
                             for lvl in coarsest_first]
        after = [round_of[path(levels[0]["tag"], defs[r].ext)] for r in roles.values()]
        if prior["path"] in round_of:  # one of this config's own maps: made first
            after.append(round_of[prior["path"]])
        rnd = max(m.round, 2, *(r + 1 for r in after))
        kwargs, ignored = _mom1wprior_kwargs(project, name, m)
        for lvl in levels:
            maps = {}
            for role, ref in roles.items():
                value_map, error_map = MOM1WPRIOR_ROLES[role][1]
                maps[value_map] = path(lvl["tag"], defs[ref].ext)
                maps[error_map] = path(lvl["tag"], defs[ref].ext_error)
            made.append({"moment": name, "tag": lvl["tag"], "round": rnd,
                         "algorithm": m.algorithm, "maps": maps, "prior": prior,
                         "out": path(lvl["tag"], m.ext),
                         "err": path(lvl["tag"], m.ext_error) if m.ext_error else None,
                         "kwargs": kwargs, **({"ignored_kwargs": ignored} if ignored else {})})
    vround = max((s["round"] for s in made if s["algorithm"] == "mom1wprior"), default=2)
    for name in cube_names:
        m = defs[name]
        if m.mask in FLAT_MASKS:
            made += [_cube_moment(project, whole, product, config, name, m, lvl,
                                  max(m.round, 3, vround + 1)) for lvl in levels]
    return made, skipped


def _other_config_priors(project: Project, whole: str, product: str, config: str,
                         moments: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Priors that are maps of another config (PHANGS' 7m+tp 15as strict mom1 for every
    config): this task makes them itself, under the product lock as it does linked strict
    masks, so the result does not depend on which task runs first. That needs the other
    config's cube, noise and strict mask at that level only; a prior on its broad mask would
    need its whole chain and linked configs, so one missing at planning falls back instead.
    Returns {prior path: what to make} and notes."""
    made_here, notes = {}, []
    own = {s["out"] for s in moments}
    for spec in moments:
        prior = spec.get("prior")
        if not prior or prior["source"] != "file" or prior.get("checked"):
            continue
        prior["checked"] = True
        if prior["path"] in own:
            prior["source"] = "own"
            continue
        found = _planned_elsewhere(project, whole, product, config, prior["path"])
        if found is None:
            continue
        other, name, level = found
        m = _checked_moment(project, name)
        if m.mask in (None, "strictmask"):
            chain = _chain(project, whole, product, other, True)
            chain["levels"] = [lvl for i, lvl in enumerate(chain["levels"])
                               if i == 0 or lvl["tag"] == level["tag"]]
            made_here[prior["path"]] = {
                "config": other, "chain": chain,
                "moment": _cube_moment(project, whole, product, other, name, m, level, 1)}
            prior["source"], prior["config"] = "config", other
        elif not Path(prior["path"]).exists():
            prior["source"] = "fallback"
            notes.append(f"moment {spec['moment']}: prior {Path(prior['path']).name} is made "
                         f"by derived/{whole}/{product}/{other} on a broad mask and is not there"
                         f" yet: the fallback prior is used (run that task first to use it)")
    for spec in moments:
        if spec.get("prior"):
            spec["prior"].pop("checked", None)
    return made_here, notes


def _planned_elsewhere(project: Project, whole: str, product: str, config: str, path: str
                       ) -> tuple[str, str, dict[str, Any]] | None:
    """(config, moment, level) of another config of the target that ``path`` is a map of: a
    moment of its list, or any the key defines (the file name says which, even when that
    config's own task does not make it)."""
    from hpcddf.phangs.moments import ALGORITHMS

    for other in whole_target_configs(project, whole, product):
        if other == config:
            continue
        levels = _chain(project, whole, product, other, False)["levels"]
        listed = project.derived_params(other, product).moments
        for name in [*listed, *sorted(set(project.moments) - set(listed))]:
            d = project.moments[name]
            if d.algorithm not in ALGORITHMS or d.algorithm == "mom1wprior" or not d.ext:
                continue
            for lvl in levels:
                if _derived_name(project, whole, other, product, f"{lvl['tag']}{d.ext}") == path:
                    return other, name, lvl
    return None


def _external_vfield(project: Project, whole: str) -> tuple[str | None, str | None]:
    """The window key's velocity field file of the target (in vfield_root), or a note."""
    win = project.window(whole)
    if win is None or not win.vfield_file:
        return None, None
    root = project.roots.get("vfield_root")
    if root is None:
        return None, (f"the window key names the velocity field {win.vfield_file} for {whole}, "
                      f"but the master key sets no vfield_root: not used")
    path = Path(root) / win.vfield_file
    if not path.is_file():
        return None, f"the window key's velocity field {path} does not exist: not used"
    return str(path), None


def _flat_window(project: Project, whole: str, config: str, product: str, kind: str
                 ) -> tuple[float, str]:
    """The velocity window (km/s) of a flat mask, and where it came from.

    Reference quirk: PHANGS' task passes the window key's width as ``v_window`` while its
    recipe reads ``window``, so 50 km/s was used whatever the window key said (unless the
    derived key set ``window``). Fixed here because the window key is where a target's window
    is meant to come from: its width is used; the derived key's ``<kind>_kw`` ``window``
    serves targets without a window-key entry; 50 km/s otherwise.
    """
    from hpcddf.phangs.masks import window_kms

    dp = project.derived_params(config, product)
    kw = _mapped_kw(project, getattr(dp, f"{kind}_kw"), FLATMASK_KW, f"{kind}_kw", config,
                    product)
    win = project.window(whole)
    if win is not None:
        return float(win.width_kms), f"window key {win.source}"
    if "window" in kw:
        try:
            return window_kms(kw["window"]), f"derived key {kind}_kw"
        except ConfigError:
            raise ConfigError(f"{kind}_kw window {kw['window']!r} of config {config} product "
                              f"{product} is not a velocity "
                              f"({_key_files(project, 'derived_key')})",
                              "write e.g. {'window':'50km/s'}") from None
    return DEFAULT_FLAT_WINDOW_KMS, "default"


def _vfield_and_flat_masks(project: Project, whole: str, product: str, config: str,
                           levels: list[dict[str, Any]], moments: list[dict[str, Any]],
                           skipped: list[dict[str, str]]
                           ) -> tuple[list[dict[str, Any]], dict[str, Any] | None,
                                      list[dict[str, Any]], list[str]]:
    """The velocity field and the flat masks the moments need.

    The field (``<stem>_vfield.fits``) takes, pixel by pixel, the first finite value of the
    config's mom1wprior maps from the finest level to the coarsest, then of the window key's
    velocity field (PHANGS' hierarchy, first finite wins). It is made when there is a
    mom1wprior map or a flat moment to feed. Flat masks (per level for flatstrictmask, one
    per config for flatbroadmask) are made only where a moment uses them; without any
    velocity field those moments move to ``skipped``. Returns (moments, vfield, flat masks,
    notes)."""
    distance = project.distance_mpc(whole)
    wp = [s for s in moments if s["algorithm"] == "mom1wprior"]
    flat = [s for s in moments if s.get("mask_kind") in FLAT_MASKS]
    if not wp and not flat:
        return moments, None, [], []
    external, note = _external_vfield(project, whole)
    notes = [note] if note else []
    order = [lvl["tag"] for lvl in _finest_first(levels, distance)]
    layers = [s["out"] for tag in order for s in wp if s["tag"] == tag]
    if not layers and external is None:
        for name in dict.fromkeys(s["moment"] for s in flat):
            skipped.append({"moment": name, "reason": f"flat masks need a velocity field: "
                                                      f"config {config} has no mom1wprior "
                                                      f"moment and the window key no usable "
                                                      f"vfield for {whole}"})
        return [s for s in moments if s not in flat], None, [], notes
    vfield = {"out": _derived_name(project, whole, config, product, "vfield"),
              "layers": layers, "external": external, "template": levels[0]["cube"],
              "after_round": max((s["round"] for s in wp), default=2)}
    by_tag = {lvl["tag"]: lvl for lvl in levels}
    wanted = dict.fromkeys((s["mask_kind"], s["tag"] if s["mask_kind"] == "flatstrictmask"
                            else levels[0]["tag"], s["mask"]) for s in flat)
    flatmasks = []
    for kind, tag, out in wanted:
        width, source = _flat_window(project, whole, config, product, kind)
        base = (by_tag[tag]["strictmask"] if kind == "flatstrictmask"
                else _derived_name(project, whole, config, product, "broadmask"))
        flatmasks.append({"kind": kind, "tag": tag, "cube": by_tag[tag]["cube"], "mask": base,
                          "vfield": vfield["out"], "out": out, "window_kms": width,
                          "window_from": source})
    return moments, vfield, flatmasks, notes


def _derived_rounds(project: Project, whole: str, product: str, config: str,
                    chain: dict[str, Any]) -> dict[str, Any]:
    """Moments of every round, the velocity field and flat masks of one derived task, the
    priors it makes for other configs, and the outputs all of that adds."""
    moments, skipped = _moments(project, whole, product, config, chain["levels"],
                                project.distance_mpc(whole))
    priors, notes = _other_config_priors(project, whole, product, config, moments)
    moments, vfield, flatmasks, vnotes = _vfield_and_flat_masks(
        project, whole, product, config, chain["levels"], moments, skipped)
    outputs = [p for m in moments for p in (m["out"], m["err"]) if p]
    outputs += ([vfield["out"]] if vfield else []) + [f["out"] for f in flatmasks]
    notes += list(dict.fromkeys(
        f"moment {m['moment']}: kwargs {', '.join(m['ignored_kwargs'])} not used by "
        f"{m['algorithm']}: ignored" for m in moments if m.get("ignored_kwargs")))
    return {"moments": moments, "skipped_moments": skipped, "priors": priors,
            "vfield": vfield, "flatmasks": flatmasks, "notes": notes + vnotes,
            "outputs": list(dict.fromkeys(outputs))}


def _build_derived(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for whole in sel.whole:
        # noise cubes, masks and moments are spectral-cube products: a continuum product ends
        # at its postprocessed 2-D image (PHANGS' derived loop is over line products too)
        for product in project.line_products:
            for config in whole_target_configs(project, whole, product):
                linked = linked_mask_configs(project, whole, product, config)
                chains = {c: _chain(project, whole, product, c, detailed)
                          for c in [config, *linked]}
                broad = _derived_name(project, whole, config, product, "broadmask")
                outputs = _chain_products(chains[config]) + [broad]
                sources = [config, *linked]
                params: dict[str, Any] = {"outputs": outputs}
                if detailed:
                    dp = project.derived_params(config, product)
                    rounds = _derived_rounds(project, whole, product, config, chains[config])
                    # a prior made here from another config needs that config's cube too
                    sources += [p["config"] for p in rounds["priors"].values()
                                if p["config"] not in sources]
                    params["outputs"] = outputs + rounds.pop("outputs")
                    params.update({
                        "target": whole, "product": product, "config": config,
                        "linked": linked, "chains": chains,
                        "distance_mpc": project.distance_mpc(whole),
                        "broadmask": {"out": broad, "kw": _mapped_kw(
                            project, dp.broadmask_kw, BROADMASK_KW, "broadmask_kw", config,
                            product)},
                        **rounds})
                params["inputs"] = [postprocess_cube(project, whole, product, c)
                                    for c in dict.fromkeys(sources)]
                deps = [Task("postprocess", _line_key(whole, product, c)).id
                        for c in dict.fromkeys(sources)]
                tasks.append(_task("derived", _line_key(whole, product, config), deps, params))
    return tasks


BUILDERS: dict[str, Callable[[Project, _Selection, bool], list[Task]]] = {
    "stage_ms": _build_stage_ms, "stage_line": _build_stage_line, "imaging": _build_imaging,
    "postprocess": _build_postprocess, "derived": _build_derived,
}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def select_stages(stages: Sequence[str] | None) -> list[str]:
    """The stages asked for, in pipeline order (all when None)."""
    if stages is None:
        return list(STAGES)
    wanted = [s.strip() for s in stages if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise ConfigError(f"unknown PHANGS stage {unknown[0]!r}" if unknown
                          else "no PHANGS stage given", f"use some of {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def _all_exist(paths: Iterable[str]) -> bool:
    paths = list(paths)
    return bool(paths) and all(Path(p).exists() for p in paths)


def _without_unrun(task: Task, by_id: dict[str, Task], keep: set[str]) -> Task:
    """Drop dependencies on stages not run, after checking their products are there."""
    dropped = [by_id[d] for d in task.depends if by_id[d].stage not in keep]
    if not dropped:
        return task
    if not _all_exist(task.outputs):
        made_by = {p: dep for dep in dropped for p in dep.outputs}
        missing = [p for p in task.inputs if p in made_by and not Path(p).exists()]
        if missing:
            dep = made_by[missing[0]]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"{missing[0]} does not exist{more}: task {task.id} needs it "
                              f"from {dep.id}",
                              f"run stage {dep.stage} first (add it to --stages)")
    return replace(task, depends=tuple(d for d in task.depends if by_id[d].stage in keep))


def plan_project(project: Project, targets: Sequence[str] | None = None,
                 stages: Sequence[str] | None = None) -> list[StageArray]:
    """The project's tasks, one StageArray per selected stage in pipeline order."""
    keep = select_stages(stages)
    sel = _selection(project, targets)
    needed = set(keep) | {PREVIOUS[s] for s in keep if s in PREVIOUS}
    built = {name: BUILDERS[name](project, sel, name in keep) for name in STAGES
             if name in needed}
    by_id = {t.id: t for tasks in built.values() for t in tasks}
    return [StageArray(name, tuple(_without_unrun(t, by_id, set(keep)) for t in built[name]))
            for name in keep]


def plan_tasks(plan: Sequence[StageArray]) -> list[Task]:
    return [t for array in plan for t in array.tasks]


def dry_run_document(plan: Sequence[StageArray]) -> dict[str, Any]:
    """The plan as JSON-able data: per stage its array size, tasks and their dependencies."""
    return {"stages": [{"name": a.name, "array_size": a.size,
                        "depends_on": DEPENDENCY_RULES[a.name],
                        "tasks": [t.to_dict() for t in a.tasks]} for a in plan],
            "total_tasks": sum(a.size for a in plan)}
