"""PHANGS key files -> a typed, validated project model (``load_project``).

A PHANGS project is a directory of whitespace-separated text keys, tied together by a master
key (algorithms.md B1). This module reads the master key and, through the readers of
:mod:`hpcddf.phangs.keyreaders`, every key family into the dataclasses of
:mod:`hpcddf.phangs.project`, whose :class:`Project` answers the questions the engine asks
when it expands the pipeline's loops into jobs (algorithms.md B2); the line rules and the
``file:line`` errors are in :mod:`hpcddf.phangs.keyfile`.
Pure Python: nothing here needs CASA, so the login node can validate a project before any
job is queued.

Reading rules kept from the reference: ``#`` comments and blank lines are skipped; key files
named in the master key are read in the order listed, repeatable entries accumulate and later
lines override earlier ones; configurations spread over several lines merge; the imaging and
derived keys take wildcards (config ``all``; product ``all``/``all_line``/``all_cont``; stage
``all``); literal dicts and lists go through ``ast.literal_eval`` (never ``eval``).

Deliberate deviations: every problem is a ``ConfigError`` naming ``file:line`` and the fix,
where the reference logs and skips. A silently dropped line is a bad surprise on a cluster,
found hours later as a missing cube. In particular:

* a line with the wrong number of columns (the reference warns and skips it);
* an unknown master-key entry, config type, config parameter, derived or moment parameter, a
  literal that does not parse or has the wrong type, a name (target, config, product, moment)
  referenced but never defined, a recipe file that does not exist, an RA/Dec astropy cannot
  parse;
* a single-valued master-key root given twice (the reference uses the last one);
* the last column of the config, derived, moment and override keys takes the rest of the line,
  so a literal dict may contain spaces (the reference splits it and then drops the line);
* relative roots in the master key are resolved against the master key's directory, not the
  current directory, so a job started anywhere on the cluster finds the same files;
* a float parameter accepts an int (``'channel_kms':5``); the reference compares types exactly
  and rejects it.

``overrides`` (``filename param value``) are tclean parameters of one named cube, applied by
the imaging planner over that cube's recipes (:mod:`hpcddf.phangs.overrides`; the reference
mostly ignores them); a line naming a cube the project does not image or a parameter tclean
does not have (or that the stages set themselves) is a ConfigError at its line.

Every master-key entry, config type and parameter, derived and moment parameter is either
used or refused (:mod:`hpcddf.phangs.keyschema`); a key that sets a refused one is a
ConfigError at its line, never silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpcddf.errors import ConfigError
from hpcddf.phangs.keyfile import Where, _columns, _fail, _suggest
from hpcddf.phangs.keyreaders import (
    _read_configs,
    _read_derived_key,
    _read_dir_key,
    _read_distances,
    _read_file_key,
    _read_imaging_key,
    _read_linmos,
    _read_moment_key,
    _read_ms_key,
    _read_overrides,
    _read_targets,
    _read_windows,
)
from hpcddf.phangs.keyschema import refuse
from hpcddf.phangs.overrides import check_overrides
from hpcddf.phangs.project import Project

_SINGLE_ENTRIES = ("key_dir", "imaging_root", "postprocess_root", "derived_root",
                   "release_root", "vfield_root")
_ROOT_LISTS = ("ms_root", "singledish_root", "cleanmask_root")
KEY_KINDS = ("ms_key", "singledish_key", "cleanmask_key", "distance_key", "window_key",
             "config_key", "target_key", "moment_key", "derived_key", "imaging_key",
             "linmos_key", "override_key", "dir_key", "casaversion_key", "alma_download_key")
_REQUIRED_KEYS = ("target_key", "config_key")


# ---------------------------------------------------------------------------------------------
# Master key
# ---------------------------------------------------------------------------------------------

@dataclass
class _Master:
    path: Path
    key_dir: Path
    roots: dict[str, Path]
    root_lists: dict[str, list[Path]]
    keys: dict[str, list[tuple[Path, Where]]]


def _join(base: Path, value: str) -> Path:
    """``value`` relative to ``base`` (absolute values kept), without '..' left in it.

    Reference quirk: roots are glued to file names as strings, so a root without a trailing
    '/' silently points elsewhere; fixed here by joining paths.
    """
    return Path(os.path.normpath(base / value))


def _read_master(path: Path) -> _Master:
    """``name value`` lines: roots relative to the master key's directory, key files
    relative to key_dir (default: that same directory)."""
    base = path.parent
    known = _SINGLE_ENTRIES + _ROOT_LISTS + KEY_KINDS
    single: dict[str, tuple[str, Where]] = {}
    root_lists: dict[str, list[Path]] = {k: [] for k in _ROOT_LISTS}
    entries: list[tuple[str, str, Where]] = []
    for where, (name, value) in _columns(path, ("name", "value")):
        if name not in known:
            _fail(where, f"unknown master key entry {name!r}", _suggest(name, known, "entries"))
        refuse(where, "master", name)
        if name in _SINGLE_ENTRIES:
            if name in single:
                _fail(where, f"{name} is set twice (first at line {single[name][1].line})",
                      "keep one of the two lines")
            single[name] = (value, where)
        elif name in _ROOT_LISTS:
            root_lists[name].append(_join(base, value))
        else:
            entries.append((name, value, where))
    key_dir = _join(base, single.pop("key_dir", (".", Where(path, 0)))[0])
    keys: dict[str, list[tuple[Path, Where]]] = {k: [] for k in KEY_KINDS}
    for name, value, where in entries:
        key_path = _join(key_dir, value)
        if not key_path.is_file():
            _fail(where, f"{name} file {key_path} does not exist",
                  f"create it or fix the name (relative to key_dir {key_dir})")
        keys[name].append((key_path, where))
    for name in _REQUIRED_KEYS:
        if not keys[name]:
            _fail(path, f"the master key names no {name}",
                  f"add a line '{name} <file>' (relative to key_dir {key_dir})")
    roots = {name: _join(base, value) for name, (value, _) in single.items()}
    return _Master(path, key_dir, roots, root_lists, keys)



# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def load_project(master_key_path: str | Path) -> Project:
    """Read and cross-check every key named in the master key; raise ConfigError on the first
    problem, naming its file and line."""
    path = Path(master_key_path).absolute()
    if not path.is_file():
        raise ConfigError(f"master key {path} does not exist", "give the path of master_key.txt")
    master = _read_master(path)
    keys = master.keys
    targets = _read_targets(keys["target_key"])
    ms_entries = _read_ms_key(keys["ms_key"], targets)
    configs = _read_configs(keys["config_key"], {e.array_tag for e in ms_entries})
    moments = _read_moment_key(keys["moment_key"])
    project = Project(
        master_key=path, key_dir=master.key_dir, roots=master.roots,
        ms_roots=master.root_lists["ms_root"],
        singledish_roots=master.root_lists["singledish_root"],
        cleanmask_roots=master.root_lists["cleanmask_root"],
        key_files={k: [p for p, _ in v] for k, v in keys.items() if v},
        target_defs=targets, configs=configs,
        linmos=_read_linmos(keys["linmos_key"], targets),
        dir_map=_read_dir_key(keys["dir_key"]),
        ms_entries=ms_entries,
        singledish_files=_read_file_key(keys["singledish_key"]),
        cleanmask_files=_read_file_key(keys["cleanmask_key"]),
        distances=_read_distances(keys["distance_key"]),
        windows=_read_windows(keys["window_key"]),
        recipes=_read_imaging_key(keys["imaging_key"], master.key_dir, configs),
        derived=_read_derived_key(keys["derived_key"], configs, moments),
        moments=moments,
        overrides=_read_overrides(keys["override_key"]),
    )
    _check_file_keys(project)
    check_overrides(project)
    return project


def _check_file_keys(project: Project) -> None:
    """singledish_key lines name a target (or mosaic) and a product of the config key; a
    continuum product's is refused while feathering continuum is not implemented."""
    places = set(project.target_defs) | set(project.linmos)
    for (target, product), ref in project.singledish_files.items():
        if target not in places:
            _fail(ref.source, f"singledish_key target {target!r} is not a target or mosaic",
                  _suggest(target, sorted(places), "targets"))
        if product in project.cont_products:
            refuse(ref.source, "singledish product", "cont_product")
        elif product not in project.line_products:
            _fail(ref.source, f"singledish_key product {product!r} is not a line product",
                  _suggest(product, project.line_products, "line products"))
