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
                 every resolution), then the broad mask and the round-1 moments. The broad mask
                 joins this config's strict masks with those of its linked ``mask_configs``, so
                 the task waits for its own ``postprocess`` task AND for the ``postprocess``
                 task of every linked config (the predecessors of the linked ``derived``
                 tasks). It makes the linked configs' strict masks itself if they are not
                 there yet, under a per-file lock, so a linked task running at the same time
                 reuses rather than redoes them. Depending on those predecessors instead of on
                 sibling ``derived`` tasks keeps the array free of internal dependencies and of
                 cycles: two configs may list each other as mask configs.

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
from hpcddf.phangs.keys import Project, cube_filename

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
               "same target and product (their strict masks feed the broad mask)",
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
        return {**base, "kind": "cont"}
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
        return {**base, "kind": "cont"}
    line = project.configs.line_product[product]
    return {**base, "kind": "line", "restfreq_ghz": line_restfreq_ghz(project, product),
            **_window(project, target), "channel_kms": line.channel_kms,
            "statwt_edge_kms": line.statwt_edge_kms}


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
    return {"target": target, "product": product, "config": config, "kind": kind,
            "imagename": base, "vis": [vis], "recipes": recipes,
            "restfreq_ghz": line_restfreq_ghz(project, product) if kind == "line" else None,
            "clean_scales_arcsec": list(project.configs.interf_config[config].clean_scales_arcsec)}


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
                        "stem": _stem(whole, config, product)})
                tasks.append(_task("postprocess", _line_key(whole, product, config), deps,
                                   params))
    return tasks


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


def _moments(project: Project, whole: str, product: str, config: str, levels: list[dict]
             ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Round-1 moments to make at every level, and the moments left out (with why)."""
    from hpcddf.phangs.moments import ALGORITHMS

    made, skipped = [], []
    for name in project.derived_params(config, product).moments:
        m = project.moment_params(name)
        where = _key_files(project, "moment_key")
        if m.round != 1:
            skipped.append({"moment": name, "reason": f"round {m.round} moments are not made "
                                                      "by this version"})
            continue
        if m.mask in FLAT_MASKS:
            skipped.append({"moment": name, "reason": f"{m.mask} (flat masks need the "
                                                      "velocity field) is not made by this "
                                                      "version"})
            continue
        if m.algorithm not in ALGORITHMS:
            raise ConfigError(f"moment {name}: algorithm {m.algorithm!r} is unknown ({where})",
                              f"use one of {', '.join(ALGORITHMS)}")
        if not m.ext:
            raise ConfigError(f"moment {name} has no ext ({where})",
                              f"add a line '{name} ext _{name}'")
        for lvl in levels:
            out = _derived_name(project, whole, config, product, f"{lvl['tag']}{m.ext}")
            err = (_derived_name(project, whole, config, product, f"{lvl['tag']}{m.ext_error}")
                   if m.ext_error else None)
            mask = {"strictmask": lvl["strictmask"],
                    "broadmask": _derived_name(project, whole, config, product, "broadmask"),
                    None: None}[m.mask]
            made.append({"moment": name, "tag": lvl["tag"], "algorithm": m.algorithm,
                         "cube": lvl["cube"], "noise": lvl["noise"], "mask": mask, "out": out,
                         "err": err, "kwargs": dict(m.kwargs)})
    return made, skipped


def _build_derived(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for whole in sel.whole:
        for product in _products(project):
            for config in whole_target_configs(project, whole, product):
                linked = linked_mask_configs(project, whole, product, config)
                chains = {c: _chain(project, whole, product, c, detailed)
                          for c in [config, *linked]}
                broad = _derived_name(project, whole, config, product, "broadmask")
                outputs = _chain_products(chains[config]) + [broad]
                params: dict[str, Any] = {
                    "inputs": [chains[c]["cube_in"] for c in [config, *linked]],
                    "outputs": outputs}
                if detailed:
                    dp = project.derived_params(config, product)
                    moments, skipped = _moments(project, whole, product, config,
                                                chains[config]["levels"])
                    params["outputs"] = outputs + [p for m in moments
                                                   for p in (m["out"], m["err"]) if p]
                    params.update({
                        "target": whole, "product": product, "config": config,
                        "linked": linked, "chains": chains,
                        "distance_mpc": project.distance_mpc(whole),
                        "broadmask": {"out": broad, "kw": _mapped_kw(
                            project, dp.broadmask_kw, BROADMASK_KW, "broadmask_kw", config,
                            product)},
                        "moments": moments, "skipped_moments": skipped})
                deps = [Task("postprocess", _line_key(whole, product, c)).id
                        for c in [config, *linked]]
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
