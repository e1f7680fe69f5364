"""The readers of each PHANGS key family, called by :func:`hpcddf.phangs.keys.load_project`.

Targets (with RA/Dec through astropy), configurations (typed parameters checked against the
config dataclasses of :mod:`hpcddf.phangs.project`, several lines merged), linear mosaics,
directories, measurement sets, single-dish and clean-mask files, distances, windows, imaging
recipes, moments, derived products and overrides: each reads the key files the master key
names for it, in order, with the reading rules of :mod:`hpcddf.phangs.keys` and an error
naming ``file:line`` (:mod:`hpcddf.phangs.keyfile`) for every line it cannot use.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcddf.phangs.keyfile import (
    Where,
    _columns,
    _csv_rows,
    _fail,
    _float,
    _literal,
    _suggest,
)
from hpcddf.phangs.keyschema import refuse
from hpcddf.phangs.project import (
    CONFIG_TYPES,
    STAGES,
    Configs,
    DerivedParams,
    FileRef,
    MomentDef,
    MSEntry,
    Override,
    Target,
    Window,
)
from hpcddf.phangs.shuffle import check_shuffle_kw

MOMENT_MASKS = ("strictmask", "broadmask", "flatstrictmask", "flatbroadmask")
KW_PARAMS = ("noise_kw", "strictmask_kw", "broadmask_kw", "flatstrictmask_kw",
             "flatbroadmask_kw", "convolve_kw", "shuffle_kw")
DERIVED_PARAMS = ("phys_res", "ang_res", "mask_configs", "moments") + KW_PARAMS


# ---------------------------------------------------------------------------------------------
# Individual keys
# ---------------------------------------------------------------------------------------------

def _ra_deg(where: Where, text: str) -> float:
    from astropy.coordinates import Angle
    from astropy.units import hourangle
    return _angle(where, text, "RA", lambda t: Angle(t, unit=hourangle if ":" in t else None),
                  (0.0, 360.0), "01h36m41.7s, 01:36:41.7 (hours) or 24.17deg")


def _dec_deg(where: Where, text: str) -> float:
    from astropy.coordinates import Angle
    from astropy.units import deg
    return _angle(where, text, "Dec", lambda t: Angle(t, unit=deg if ":" in t else None),
                  (-90.0, 90.0 + 1e-12), "+15d47m01.1s, +15:47:01.1 (degrees) or 15.78deg")


def _angle(where: Where, text: str, what: str, parse: Any, limits: tuple[float, float],
           example: str) -> float:
    """Parse with astropy, turning its warnings (61 minutes, ...) into errors too."""
    from astropy.units import UnitsError
    from astropy.utils.exceptions import AstropyWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", AstropyWarning)
        try:
            value = float(parse(text).degree)
        except (ValueError, TypeError, UnitsError, AstropyWarning) as exc:
            _fail(where, f"{what} {text!r} cannot be parsed ({exc})", f"write it as {example}")
    if not limits[0] <= value < limits[1]:
        _fail(where, f"{what} {text!r} is out of range ({value:g} deg)", f"write it as {example}")
    return value


def _read_targets(files: list[tuple[Path, Where]]) -> dict[str, Target]:
    """Later definitions of a target replace earlier ones (as in the reference)."""
    targets: dict[str, Target] = {}
    cols = ("target", "ra", "dec", "vsys_kms", "vwidth_kms")
    for path, _ in files:
        for where, (name, ra, dec, vsys, vwidth) in _columns(path, cols):
            targets[name] = Target(name, ra, dec, _ra_deg(where, ra), _dec_deg(where, dec),
                                   _float(where, vsys, "vsys_kms"),
                                   _float(where, vwidth, "vwidth_kms"), where)
    return targets


def _check_param(where: Where, what: str, key: str, value: Any, expected: type,
                 default: Any) -> Any:
    """Type-check one config parameter against its default's type.

    Reference quirk: types are compared exactly, so ``'channel_kms':5`` is rejected; fixed
    here (an int passes as a float) because nobody means 5 to differ from 5.0. A bool never
    passes as a number.
    """
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, tuple):
        return list(value)
    if isinstance(value, expected) and not (expected is not bool and isinstance(value, bool)):
        return value
    _fail(where, f"{what}: parameter {key!r} must be {expected.__name__}, "
                 f"got {type(value).__name__} {value!r}",
          f"write it like the default, e.g. '{key}':{default!r}")


@functools.cache
def _config_fields(cls: type) -> dict[str, tuple[type, Any]]:
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = (typing.get_origin(hints[f.name]) or hints[f.name], default)
    return out


@dataclass
class _Pending:
    """A config being accumulated over several lines, remembering where each value came from."""

    first: Where
    params: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Where] = field(default_factory=dict)


def _read_configs(files: list[tuple[Path, Where]], ms_tags: set[str] | None = None) -> Configs:
    """``type name {dict}``; repeated lines of one config merge, later values win.
    ``ms_tags``: the ms key's array tags, which an ``array_tag`` config must name."""
    pending: dict[tuple[str, str], _Pending] = {}
    for path, _ in files:
        for where, (kind, name, text) in _columns(path, ("type", "name", "params"), rest=True):
            if kind not in CONFIG_TYPES:
                _fail(where, f"unknown config type {kind!r}",
                      _suggest(kind, CONFIG_TYPES, "types"))
            refuse(where, "config type", kind)
            allowed = _config_fields(CONFIG_TYPES[kind])
            params = _literal(where, text, dict, f"{kind} {name}", "{'channel_kms':2.5}")
            entry = pending.setdefault((kind, name), _Pending(where))
            for key, value in params.items():
                if key not in allowed:
                    _fail(where, f"{kind} {name}: unknown parameter {key!r}",
                          _suggest(str(key), allowed, f"{kind} parameters"))
                expected, default = allowed[key]
                entry.params[key] = _check_param(where, f"{kind} {name}", key, value,
                                                 expected, default)
                refuse(where, f"{kind} parameter", key, entry.params[key], default)
                entry.where[key] = where
    configs = Configs()
    for (kind, name), entry in pending.items():
        getattr(configs, kind)[name] = CONFIG_TYPES[kind](name=name, **entry.params)
    _validate_configs(configs, pending)
    _validate_array_tags(configs, pending, ms_tags)
    return configs


_TIMEBIN = re.compile(r"^\d+(\.\d*)?(s|min|h)$")


def _validate_array_tags(configs: Configs, pending: dict[tuple[str, str], _Pending],
                         ms_tags: set[str] | None) -> None:
    """An array_tag config averages the visibilities of that array in time when they are
    split (stage_ms): its name must be an array tag of the ms key (else it averages nothing)
    and its timebin a CASA time ('0s': no averaging)."""
    for name, tag in configs.array_tag.items():
        src = pending[("array_tag", name)]
        if ms_tags is not None and name not in ms_tags:
            _fail(src.first, f"array_tag {name} is no array tag of the ms key",
                  _suggest(name, sorted(ms_tags), "array tags"))
        if not _TIMEBIN.match(tag.timebin):
            _fail(src.where.get("timebin", src.first),
                  f"array_tag {name}: timebin {tag.timebin!r} is not a time",
                  "write e.g. '30s' (or '0s' for no averaging)")


def _validate_configs(configs: Configs, pending: dict[tuple[str, str], _Pending]) -> None:
    """Values the loops cannot do without, and names that must not collide."""
    for name, line in configs.line_product.items():
        src = pending[("line_product", name)]
        if not line.line_tag or line.channel_kms <= 0:
            _fail(src.first, f"line_product {name} needs line_tag and channel_kms > 0",
                  "add e.g. {'line_tag':'co21','channel_kms':2.5}")
        if not 0.0 <= line.flag_edge_fraction < 0.5:
            _fail(src.where["flag_edge_fraction"], f"line_product {name}: flag_edge_fraction "
                                                   f"{line.flag_edge_fraction:g} is not in [0, 0.5)",
                  "give the fraction of each spw's channels to drop at each end, e.g. 0.05")
    for name, interf in configs.interf_config.items():
        src = pending[("interf_config", name)]
        if not interf.array_tags or not all(isinstance(t, str) for t in interf.array_tags):
            _fail(src.where.get("array_tags", src.first),
                  f"interf_config {name} needs array_tags, a list of ms key array tags",
                  "add e.g. {'array_tags':['12m','7m']}")
        for group in interf.requires:
            unknown = set(str(group).split("|")) - set(interf.array_tags)
            if not isinstance(group, str) or unknown:
                _fail(src.where["requires"], f"interf_config {name}: requires entry {group!r} "
                                              f"names tags not in array_tags",
                      "write OR-groups of its array_tags, e.g. ['12m_1|12m_2']")
    for name, feather in configs.feather_config.items():
        src = pending[("feather_config", name)]
        if feather.interf_config not in configs.interf_config:
            _fail(src.where.get("interf_config", src.first),
                  f"feather_config {name}: interf_config {feather.interf_config!r} is not "
                  f"defined", _suggest(feather.interf_config, configs.interf_config,
                                       "interf configs"))
    for kind in ("interf_config", "feather_config"):
        for name, cfg in getattr(configs, kind).items():
            _check_res_fields(pending[(kind, name)], f"{kind} {name}", cfg)
    _validate_singledish_configs(configs, pending)
    for a, b in (("line_product", "cont_product"), ("interf_config", "feather_config")):
        for name in set(getattr(configs, a)) & set(getattr(configs, b)):
            _fail(pending[(b, name)].first, f"{name} is defined both as {a} and as {b}",
                  "give them different names")


def _check_res_fields(src: _Pending, what: str, cfg: Any) -> None:
    """The res_* fields define the config's derived resolutions (plan_chain): min and max go
    together, min <= max, a step > 1 for a range, list entries positive; a step with no range
    would do nothing, so it is an error too."""
    ranges = 0
    for unit in ("arcsec", "pc"):
        lo, hi = getattr(cfg, f"res_min_{unit}"), getattr(cfg, f"res_max_{unit}")
        where = src.where.get(f"res_min_{unit}", src.where.get(f"res_max_{unit}", src.first))
        if (lo > 0) != (hi > 0) or lo < 0 or hi < 0 or lo > hi:
            _fail(where, f"{what}: res_min_{unit} {lo:g} and res_max_{unit} {hi:g} do not make "
                         f"a range", f"give both, 0 < res_min_{unit} <= res_max_{unit}")
        if lo < hi and cfg.res_step_factor <= 1.0:
            _fail(src.where.get("res_step_factor", where),
                  f"{what}: res_step_factor {cfg.res_step_factor:g} must be > 1 for the range "
                  f"res_min_{unit}..res_max_{unit}", "write e.g. 'res_step_factor':1.1")
        ranges += lo > 0
    if cfg.res_step_factor != 1.0 and not ranges:
        _fail(src.where["res_step_factor"], f"{what}: res_step_factor without res_min/res_max "
                                            f"does nothing",
              "add 'res_min_arcsec' and 'res_max_arcsec' (or _pc), or remove it")
    for value in cfg.res_list:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(src.where["res_list"], f"{what}: res_list entry {value!r} is not a positive "
                                         f"resolution in arcsec", "write e.g. [1.0, 2.5]")


def _validate_singledish_configs(configs: Configs, pending: dict[tuple[str, str], _Pending]
                                 ) -> None:
    """The single-dish step (hpcddf.phangs.singledish) reads the singledish_config named 'tp',
    as PHANGS' single-dish handler does: another name would be read by nothing."""
    for name, sd in configs.singledish_config.items():
        src = pending[("singledish_config", name)]
        if name != "tp":
            _fail(src.first, f"singledish_config {name}: only the one named 'tp' is used "
                             f"(PHANGS' single-dish handler reads no other)",
                  "name it tp, or remove it")
        if sd.bl_order < 0:
            _fail(src.where["bl_order"], f"singledish_config {name}: bl_order {sd.bl_order} "
                                         f"is negative", "give a baseline order of 0 or more")
        if sd.chan_dv_kms < 0:
            _fail(src.where["chan_dv_kms"], f"singledish_config {name}: chan_dv_kms "
                                            f"{sd.chan_dv_kms:g} is negative",
                  "give a channel width in km/s, or 0 to keep the cube's channels")
        if sd.do_plots and importlib.util.find_spec("matplotlib") is None:
            _fail(src.where["do_plots"], f"singledish_config {name}: do_plots needs matplotlib, "
                                         f"which this Python cannot import",
                  "install hpcddf with the phangs extra, or set 'do_plots':False")


def _read_linmos(files: list[tuple[Path, Where]],
                 targets: dict[str, Target]) -> dict[str, list[str]]:
    linmos: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for path, _ in files:
        for where, (mosaic, part) in _columns(path, ("mosaic", "part")):
            if part not in targets:
                _fail(where, f"mosaic part {part!r} is not a target",
                      _suggest(part, targets, "targets"))
            if owner.setdefault(part, mosaic) != mosaic:
                _fail(where, f"{part} is already a part of mosaic {owner[part]}",
                      "a target can be part of one mosaic only")
            if part == mosaic:
                _fail(where, f"mosaic {mosaic} lists itself as a part", "remove the line")
            parts = linmos.setdefault(mosaic, [])
            if part not in parts:
                parts.append(part)
    return linmos


def _read_dir_key(files: list[tuple[Path, Where]]) -> dict[str, str]:
    return {target: directory for path, _ in files
            for _, (target, directory) in _columns(path, ("target", "dir"))}


def _read_ms_key(files: list[tuple[Path, Where]], targets: dict[str, Target]) -> list[MSEntry]:
    """Reference quirk: a repeated (target, project, array_tag, obsnum) with another file
    silently replaces the earlier line, dropping a measurement set; an error here. An exact
    repeat is harmless and kept once."""
    cols = ("target", "project", "field", "array_tag", "obsnum", "file")
    entries: dict[tuple[str, str, str, str], MSEntry] = {}
    for path, _ in files:
        for where, (target, proj, fld, tag, obsnum, fname) in _columns(path, cols):
            if target not in targets:
                _fail(where, f"target {target!r} is not in target_definitions",
                      _suggest(target, targets, "targets"))
            key = (target, proj, tag, obsnum)
            if key in entries and entries[key].file != fname:
                _fail(where, f"{target} {proj} {tag} obsnum {obsnum} is already given at line "
                             f"{entries[key].source.line} with file {entries[key].file}",
                      "give each measurement set its own obsnum")
            entries.setdefault(key, MSEntry(target, proj, fld, tag, obsnum, fname, where))
    return list(entries.values())


def _read_file_key(files: list[tuple[Path, Where]]) -> dict[tuple[str, str], FileRef]:
    return {(target, product): FileRef(fname, where) for path, _ in files
            for where, (target, product, fname) in _columns(path, ("target", "product", "file"))}


def _read_distances(files: list[tuple[Path, Where]]) -> dict[str, float]:
    """CSV ``target,dist_Mpc``; ``#`` (ECSV header) lines and a column-name row skipped."""
    out: dict[str, float] = {}
    for path, _ in files:
        for where, (target, dist), first in _csv_rows(path, ("target", "dist_mpc")):
            if first and not _is_number(dist):
                continue
            out[target] = _float(where, dist, "dist_mpc")
    return out


def _read_windows(files: list[tuple[Path, Where]]) -> dict[str, Window]:
    """CSV ``target,window_kms[,vfield_file]``; headers skipped as for distances."""
    out: dict[str, Window] = {}
    for path, _ in files:
        rows = _csv_rows(path, ("target", "window_kms", "vfield_file"), optional=1)
        for where, (target, width, vfield), first in rows:
            if first and not _is_number(width):
                continue
            out[target] = Window(_float(where, width, "window_kms"), vfield or None, where)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _expand(where: Where, value: str, what: str, known: list[str],
            wildcards: dict[str, list[str]]) -> list[str]:
    """A name or a wildcard (case-insensitive, as in the reference) as a list of names."""
    if value.lower() in wildcards:
        return wildcards[value.lower()]
    if value not in known:
        _fail(where, f"unknown {what} {value!r}",
              _suggest(value, known + list(wildcards), f"{what}s and wildcards"))
    return [value]


def _read_imaging_key(files: list[tuple[Path, Where]], key_dir: Path,
                      configs: Configs) -> dict[tuple[str, str, str], Path]:
    """``config product stage recipe``; recipes relative to key_dir; later lines override."""
    interf, line, cont = (list(configs.interf_config), list(configs.line_product),
                          list(configs.cont_product))
    recipes: dict[tuple[str, str, str], Path] = {}
    for path, _ in files:
        cols = ("config", "product", "stage", "recipe_file")
        for where, (config, product, stage, recipe) in _columns(path, cols):
            cs = _expand(where, config, "interf config", interf, {"all": interf})
            ps = _expand(where, product, "product", line + cont,
                         {"all_line": line, "all_cont": cont})
            ss = _expand(where, stage, "imaging stage", list(STAGES), {"all": list(STAGES)})
            recipe_path = key_dir / recipe
            if not recipe_path.is_file():
                _fail(where, f"recipe file {recipe_path} does not exist",
                      f"create it or fix the name (relative to key_dir {key_dir})")
            for c in cs:
                for p in ps:
                    for s in ss:
                        recipes[(c, p, s)] = recipe_path
    return recipes


def _read_moment_key(files: list[tuple[Path, Where]]) -> dict[str, MomentDef]:
    moments: dict[str, MomentDef] = {}
    params = [f.name for f in dataclasses.fields(MomentDef) if f.name != "name"]
    for path, _ in files:
        for where, (name, param, value) in _columns(path, ("moment", "param", "value"), rest=True):
            if param not in params:
                _fail(where, f"moment {name}: unknown parameter {param!r}",
                      _suggest(param, params, "moment parameters"))
            refuse(where, "moment", param)
            _set_moment_param(moments.setdefault(name, MomentDef(name)), where, param, value)
    return moments


def _set_moment_param(moment: MomentDef, where: Where, param: str, value: str) -> None:
    what = f"moment {moment.name} {param}"
    if param in ("algorithm", "mask", "ext", "ext_error"):
        text = None if value == "None" else value
        if param == "mask" and text is not None and text not in MOMENT_MASKS:
            _fail(where, f"{what}: unknown mask {text!r}",
                  f"use one of {', '.join(MOMENT_MASKS)} or None")
        setattr(moment, param, text)
    elif param == "round":
        if not value.isdigit():
            _fail(where, f"{what} must be an integer, got {value!r}", "write e.g. 1")
        moment.round = int(value)
    elif param == "maps_to_pass":
        moment.maps_to_pass = _literal(where, value, list, what, "['mom1']")
    else:  # other_exts, kwargs: dicts that merge over lines
        getattr(moment, param).update(_literal(where, value, dict, what, "{'key':1}"))


def _read_derived_key(files: list[tuple[Path, Where]], configs: Configs,
                      moments: dict[str, MomentDef]) -> dict[tuple[str, str], DerivedParams]:
    """``config product param value`` with wildcards; dicts merge, lists append uniquely."""
    all_configs = list(configs.interf_config) + list(configs.feather_config)
    line, cont = list(configs.line_product), list(configs.cont_product)
    derived = {(c, p): DerivedParams() for c in all_configs for p in line + cont}
    for path, _ in files:
        cols = ("config", "product", "param", "value")
        for where, (config, product, param, value) in _columns(path, cols, rest=True):
            if param not in DERIVED_PARAMS:
                _fail(where, f"unknown derived parameter {param!r}",
                      _suggest(param, DERIVED_PARAMS, "derived parameters"))
            cs = _expand(where, config, "config", all_configs, {"all": all_configs})
            ps = _expand(where, product, "product", line + cont,
                         {"all": line + cont, "all_line": line, "all_cont": cont})
            parsed = _derived_value(where, param, value, all_configs, moments)
            refuse(where, "derived", param, parsed, type(parsed)())
            for c in cs:
                for p in ps:
                    _merge_derived(derived[(c, p)], param, parsed)
    return derived


def _derived_value(where: Where, param: str, value: str, all_configs: list[str],
                   moments: dict[str, MomentDef]) -> Any:
    if param in ("phys_res", "ang_res"):
        unit = "pc" if param == "phys_res" else "arcsec"
        res = _literal(where, value, dict, param, f"{{'60{unit}':60.0}}")
        for tag, size in res.items():
            if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
                _fail(where, f"{param} {tag!r}: size must be a positive number, got {size!r}",
                      f"write e.g. {{'{tag}':60.0}} (in {unit})")
        return {str(tag): float(size) for tag, size in res.items()}
    if param in ("mask_configs", "moments"):
        names = _literal(where, value, list, param, "['12m+7m']" if param == "mask_configs"
                         else "['strictmom0']")
        known = all_configs if param == "mask_configs" else list(moments)
        for name in names:
            if name not in known:
                _fail(where, f"{param}: {name!r} is not defined"
                             + ("" if param == "mask_configs" else " in the moment key"),
                      _suggest(str(name), known, "configs" if param == "mask_configs"
                               else "moments"))
        return names
    if param == "shuffle_kw":
        return check_shuffle_kw(where, _literal(where, value, dict, param, "{'nchan':40}"))
    return _literal(where, value, dict, param, "{'key':1}")


def _merge_derived(params: DerivedParams, param: str, value: Any) -> None:
    current = getattr(params, param)
    if current is None:  # shuffle_kw: the first line asks for a shuffled cube
        setattr(params, param, dict(value))
    elif isinstance(current, dict):
        current.update(value)
    else:
        current.extend(v for v in value if v not in current)


def _read_overrides(files: list[tuple[Path, Where]]) -> dict[str, dict[str, Override]]:
    """``filename param value``: tclean parameters of a named cube (:mod:`.overrides`);
    later lines win. The file names are checked once the project is built."""
    from hpcddf.phangs.overrides import check_param, parse_value
    out: dict[str, dict[str, Override]] = {}
    for path, _ in files:
        for where, (fname, param, value) in _columns(path, ("filename", "param", "value"),
                                                      rest=True):
            check_param(where, param)
            out.setdefault(fname, {})[param] = Override(parse_value(value), where)
    return out
