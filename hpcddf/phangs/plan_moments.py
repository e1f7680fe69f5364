"""The moments of a ``derived`` task, round by round, as the moment key defines them.

Each moment of a config's list is checked against its algorithm (unknown kwargs are key errors
at planning, not TypeErrors on the node) and planned at every resolution level, in the round
its inputs allow: masked moments first, mom1wprior after the maps it combines (found by role,
by ``maps_to_pass`` or by PHANGS' map extensions), moments on flat masks after the velocity
field. A mom1wprior prior that is another config's map is made by this task under a lock (see
:func:`_other_config_priors`). Errors name the moment key line they come from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_chain import _chain, _derived_name, _finest_first
from hpcddf.phangs.plan_common import FLAT_MASKS, _key_files, whole_target_configs
from hpcddf.phangs.project import Project

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
    source is the fallback: the broad mom1 of the coarsest level made (see run_derived.py),
    which is also used when the named file is missing when the map is made.
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
