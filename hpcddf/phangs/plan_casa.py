"""The planners of the CASA stages: ``stage_ms``, ``stage_line``, ``imaging``, ``postprocess``.

One builder per stage turns the selected targets, products and configs into tasks with their
inputs, outputs and dependencies (:data:`hpcddf.phangs.plan.DEPENDENCY_RULES`), and, when the
stage runs (``detailed``), the parameters its runner passes to the CASA stages: windows, rest
frequencies, excluded velocities, continuum ranges and flagged lines, tclean recipes and the
postprocess (or feather) units of a whole target or linear mosaic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.overrides import apply_overrides
from hpcddf.phangs.plan_chunks import chunk_tasks, gather_params
from hpcddf.phangs.plan_common import (
    C_KMS,
    LINE_REST_GHZ,
    Task,
    _all_exist,
    _excluded_velocities,
    _interf_of,
    _key_files,
    _parts,
    _products,
    _Selection,
    _stem,
    _task,
    line_restfreq_ghz,
    read_recipe,
    whole_target_configs,
)
from hpcddf.phangs.plan_singledish import singledish_step
from hpcddf.phangs.project import Project

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
    tag = project.configs.array_tag.get(e.array_tag)
    base: dict[str, Any] = {"target": target, "product": product, "vis": str(e.path),
                            # the array_tag config's time averaging ('0s': none)
                            "timebin": tag.timebin if tag else "0s",
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
            "flag_edge_fraction": line.flag_edge_fraction, "combinespw": line.combinespw,
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


def _build_imaging(project: Project, sel: _Selection, detailed: bool,
                   node_mem_gb: float | None = None) -> list[Task]:
    """One imaging task per cube; a chunked cube's task gathers its chunk tasks, which come
    first in the stage (phase by phase, cube by cube, then every cube's imaging task): the
    submission makes each phase of a cube one array
    (:func:`hpcddf.phangs.plan_chunks.array_groups`)."""
    phases: list[list[Task]] = []
    tasks = []
    for target in sel.parts:
        for product in _products(project):
            for config in project.interf_configs_for(target):
                base = imaging_base(project, target, product, config)
                vis = _staged_line_path(project, target, product, config)
                mask = project.cleanmask_file(target, product)
                params: dict[str, Any] = {"inputs": [vis, *([str(mask)] if mask else [])],
                                          "outputs": [*_imaging_products(base), f"{base}.fits"]}
                deps = [Task("stage_line", _line_key(target, product, config)).id]
                if detailed:
                    params.update(_imaging_params(project, target, product, config, base, vis))
                    mine = chunk_tasks(project, _line_key(target, product, config), params,
                                       deps, node_mem_gb)
                    if mine:
                        phases = [a + b for a, b in zip(phases, mine)] if phases else mine
                        params = gather_params(params, mine[-1])
                        deps = [t.id for t in mine[-1]]
                tasks.append(_task("imaging", _line_key(target, product, config), deps, params))
    return [t for phase in phases for t in phase] + tasks


def _imaging_params(project: Project, target: str, product: str, config: str, base: str,
                    vis: str) -> dict[str, Any]:
    recipes = {stage: read_recipe(path)
               for stage, path in project.imaging_recipes(config, product).items()}
    kind = "line" if product in project.line_products else "cont"
    if kind == "cont":
        recipes = _continuum_recipes(project, config, product, recipes)
    recipes, overrides = apply_overrides(project, target, config, product, recipes)
    return {"target": target, "product": product, "config": config, "kind": kind,
            "imagename": base, "vis": [vis], "recipes": recipes, "overrides": overrides,
            "restfreq_ghz": line_restfreq_ghz(project, product) if kind == "line" else None,
            "clean_scales_arcsec": list(project.configs.interf_config[config].clean_scales_arcsec),
            "cleanmask": _str_or_none(cleanmask_path(project, target, product))}


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def cleanmask_path(project: Project, target: str, product: str) -> Path | None:
    """The cleanmask_key's FITS mask for (target, product) (:meth:`Project.cleanmask_ref`), or
    None: the imaging then makes its own S/N mask from the dirty cube. A key line whose file
    is under no cleanmask_root is a ConfigError naming that line, before anything is queued."""
    ref = project.cleanmask_ref(target, product)
    if ref is None:
        return None
    path = project.cleanmask_file(target, product)
    if path is None:
        raise _not_under_roots(project, ref, "clean mask", "cleanmask_root", project.cleanmask_roots)
    return path


def _not_under_roots(project: Project, ref: Any, what: str, root: str, roots: list[Path]) -> ConfigError:
    """A key line whose file none of the master key's roots holds: the error naming the line."""
    listed = ", ".join(map(str, roots)) or "none set"
    return ConfigError(f"{ref.source}: {what} {ref.file} not found under any {root} ({listed})",
                       f"fix the file name, or add the {root} holding it to {project.master_key}")


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
            step = singledish_step(project, owner, product, sd)
            if step is not None:  # baseline and regrid before feathering (singledish_config)
                unit["singledish_step"] = step
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
        raise _not_under_roots(project, ref, "single-dish cube", "singledish_root",
                               project.singledish_roots)
    return path
