"""PHANGS key files -> a typed, validated project model (``load_project``).

A PHANGS project is a directory of whitespace-separated text keys, tied together by a master
key (algorithms.md B1). This module reads every key type into dataclasses and answers the
questions the engine asks when it expands the pipeline's loops into jobs (algorithms.md B2):
which targets, products and configurations there are, which measurement sets feed a target,
which tclean recipe an imaging stage uses, what the derived stages make, and where files go.
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

``overrides`` (``filename param value``) are read and kept in :attr:`Project.overrides`, but
nothing here applies them: in the reference they are mostly unimplemented, so they are
informational for whoever wants to consult them.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import difflib
import functools
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

from hpcddf.errors import ConfigError

STAGES = ("dirty", "multiscale", "singlescale")
MOMENT_MASKS = ("strictmask", "broadmask", "flatstrictmask", "flatbroadmask")
KW_PARAMS = ("noise_kw", "strictmask_kw", "broadmask_kw", "flatstrictmask_kw",
             "flatbroadmask_kw", "convolve_kw", "shuffle_kw")
DERIVED_PARAMS = ("phys_res", "ang_res", "mask_configs", "moments") + KW_PARAMS

_SINGLE_ENTRIES = ("key_dir", "imaging_root", "postprocess_root", "derived_root",
                   "release_root", "vfield_root")
_ROOT_LISTS = ("ms_root", "singledish_root", "cleanmask_root")
KEY_KINDS = ("ms_key", "singledish_key", "cleanmask_key", "distance_key", "window_key",
             "config_key", "target_key", "moment_key", "derived_key", "imaging_key",
             "linmos_key", "override_key", "dir_key", "casaversion_key", "alma_download_key")
_REQUIRED_KEYS = ("target_key", "config_key")
_DIR_KINDS = ("imaging", "postprocess", "derived", "release")


# ---------------------------------------------------------------------------------------------
# Errors and line reading
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    """A line of a key file: every error names one so the user can go straight to it."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def _fail(where: Where | Path, problem: str, hint: str) -> NoReturn:
    raise ConfigError(f"{where}: {problem}", hint)


def _suggest(name: str, known: Iterable[str], what: str) -> str:
    """A hint naming the closest known name, or listing them when nothing is close."""
    known = list(known)
    best = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if best:
        return f"did you mean {best[0]!r}?"
    return f"use one of the known {what}: {', '.join(known) or '(none)'}"


def _lines(path: Path) -> Iterator[tuple[Where, str]]:
    """The non-blank, non-comment lines of a key file, stripped, with their line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read key file ({exc})", "check the path and that it is a text file")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield Where(path, number), line


def _columns(path: Path, columns: tuple[str, ...], rest: bool = False,
             ) -> Iterator[tuple[Where, list[str]]]:
    """Whitespace-separated columns; with ``rest`` the last column takes the rest of the line.

    Reference quirk: a line with the wrong word count is only warned about and skipped; fixed
    here (ConfigError) because the line was meant to do something.
    """
    n = len(columns)
    for where, line in _lines(path):
        words = line.split(None, n - 1) if rest else line.split()
        if len(words) != n:
            _fail(where, f"expected {n} columns ({' '.join(columns)}), got {len(words)}: {line!r}",
                  "fix the line to have exactly these columns, or comment it out with '#'")
        yield where, words


def _csv_rows(path: Path, columns: tuple[str, ...], optional: int = 0,
              ) -> Iterator[tuple[Where, list[str], bool]]:
    """Comma-separated rows (``#`` lines such as an ECSV header skipped); flags the first row.

    The first row may be a column-name header; the caller decides, since only it knows which
    column must be numeric.
    """
    first = True
    for where, line in _lines(path):
        row = [cell.strip() for cell in next(csv.reader([line]))]
        if not len(columns) - optional <= len(row) <= len(columns):
            count = f"{len(columns) - optional} or {len(columns)}" if optional else len(columns)
            _fail(where, f"expected {count} comma-separated columns "
                         f"({','.join(columns)}), got {len(row)}: {line!r}",
                  "fix the line, or comment it out with '#'")
        yield where, row + [""] * (len(columns) - len(row)), first
        first = False


def _float(where: Where, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        _fail(where, f"{what} must be a number, got {text!r}", f"write {what} as e.g. 10.5")


def _literal(where: Where, text: str, kind: type, what: str, example: str) -> Any:
    """A Python literal of type ``kind`` via ``ast.literal_eval`` (never ``eval``)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        _fail(where, f"{what}: cannot read {text!r} as a literal {kind.__name__}",
              f"write a Python literal {kind.__name__}, e.g. {example}")
    if not isinstance(value, kind):
        _fail(where, f"{what} must be a {kind.__name__}, got {type(value).__name__} {value!r}",
              f"write e.g. {example}")
    return value


def _natural(text: str) -> list[Any]:
    """Sort key putting obsnum '2' before '10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A target_definitions line: phase centre (as written and in degrees) and velocities."""

    name: str
    ra: str
    dec: str
    ra_deg: float
    dec_deg: float
    vsys_kms: float
    vwidth_kms: float
    source: Where


# Config classes: the annotated fields after ``name`` are the allowed parameters, their
# defaults the defaults, their annotations the types checked (algorithms.md B1).

@dataclass
class LineProduct:
    name: str
    line_tag: str = ""
    channel_kms: float = 0.0
    statwt_edge_kms: float = 50.0
    fitorder: int = 0
    combinespw: bool = False
    lines_to_flag: list = field(default_factory=list)
    exclude_freq_ranges_ghz: list = field(default_factory=list)
    flag_edge_fraction: float = 0.0


@dataclass
class ContProduct:
    name: str
    freq_ranges_ghz: list = field(default_factory=list)
    channel_ghz: float = 0.0
    lines_to_flag: list = field(default_factory=list)


@dataclass
class InterfConfig:
    """``requires`` holds OR-groups such as ``'12m_1|12m_2'``; a tag in no group is required."""

    name: str
    array_tags: list = field(default_factory=list)
    requires: list = field(default_factory=list)
    res_min_arcsec: float = 0.0
    res_max_arcsec: float = 0.0
    res_min_pc: float = 0.0
    res_max_pc: float = 0.0
    res_step_factor: float = 1.0
    res_list: list = field(default_factory=list)
    clean_scales_arcsec: list = field(default_factory=list)
    clean_scales_beam: list = field(default_factory=list)
    clean_scales_auto: bool = False
    clean_scales_auto_factor: float = 3.0
    clean_scales_max_las_fraction: float = 0.5


@dataclass
class FeatherConfig:
    name: str
    interf_config: str = ""
    res_min_arcsec: float = 0.0
    res_max_arcsec: float = 0.0
    res_min_pc: float = 0.0
    res_max_pc: float = 0.0
    res_step_factor: float = 1.0
    res_list: list = field(default_factory=list)


@dataclass
class SingledishConfig:
    name: str
    bl_order: int = 1
    chan_dv_kms: float = 0.0
    do_plots: bool = False


@dataclass
class ArrayTag:
    """Per-array settings (the reference's optional ``array_tag`` config type)."""

    name: str
    timebin: str = "0s"


CONFIG_TYPES: dict[str, type] = {
    "line_product": LineProduct, "cont_product": ContProduct, "interf_config": InterfConfig,
    "feather_config": FeatherConfig, "singledish_config": SingledishConfig,
    "array_tag": ArrayTag,
}


@dataclass
class Configs:
    """Every config_definitions entry by type, in order of first definition."""

    line_product: dict[str, LineProduct] = field(default_factory=dict)
    cont_product: dict[str, ContProduct] = field(default_factory=dict)
    interf_config: dict[str, InterfConfig] = field(default_factory=dict)
    feather_config: dict[str, FeatherConfig] = field(default_factory=dict)
    singledish_config: dict[str, SingledishConfig] = field(default_factory=dict)
    array_tag: dict[str, ArrayTag] = field(default_factory=dict)


@dataclass(frozen=True)
class MSEntry:
    """An ms_file_key line; ``path`` is filled in by :meth:`Project.input_ms`."""

    target: str
    project: str
    field: str
    array_tag: str
    obsnum: str
    file: str
    source: Where
    path: Path | None = None


@dataclass(frozen=True)
class FileRef:
    """A singledish_key / cleanmask_key entry: a file relative to one of the roots."""

    file: str
    source: Where


@dataclass(frozen=True)
class Window:
    """A window_key entry; :attr:`casa` is the string form the reference stores."""

    width_kms: float
    vfield_file: str | None
    source: Where

    @property
    def casa(self) -> str:
        return f"{self.width_kms:g}km/s"


@dataclass
class DerivedParams:
    """What the derived stages make for one (config, product) (derived_key)."""

    ang_res: dict[str, float] = field(default_factory=dict)
    phys_res: dict[str, float] = field(default_factory=dict)
    mask_configs: list[str] = field(default_factory=list)
    moments: list[str] = field(default_factory=list)
    noise_kw: dict[str, Any] = field(default_factory=dict)
    strictmask_kw: dict[str, Any] = field(default_factory=dict)
    broadmask_kw: dict[str, Any] = field(default_factory=dict)
    flatstrictmask_kw: dict[str, Any] = field(default_factory=dict)
    flatbroadmask_kw: dict[str, Any] = field(default_factory=dict)
    convolve_kw: dict[str, Any] = field(default_factory=dict)
    shuffle_kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class MomentDef:
    """A moment_key entry; ``mask`` None means unmasked."""

    name: str
    algorithm: str | None = None
    mask: str | None = None
    ext: str | None = None
    ext_error: str | None = None
    round: int = 1
    maps_to_pass: list = field(default_factory=list)
    other_exts: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)


def cube_filename(target: str, config: str | None, product: str | None,
                  ext: str | None = None) -> str:
    """``{target}_{config}_{product}_{ext}.fits`` with ``__`` -> ``_`` and ``_.`` -> ``.``.

    Missing parts (None or '') simply vanish through the collapsing, as in the reference.
    """
    name = f"{target}_{config or ''}_{product or ''}_{ext or ''}.fits"
    while "__" in name:
        name = name.replace("__", "_")
    return name.replace("_.", ".")


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


@dataclass
class Project:
    """A PHANGS project as read from its keys. Build it with :func:`load_project`."""

    master_key: Path
    key_dir: Path
    roots: dict[str, Path]
    ms_roots: list[Path]
    singledish_roots: list[Path]
    cleanmask_roots: list[Path]
    key_files: dict[str, list[Path]]
    target_defs: dict[str, Target]
    configs: Configs
    linmos: dict[str, list[str]]
    dir_map: dict[str, str]
    ms_entries: list[MSEntry]
    singledish_files: dict[tuple[str, str], FileRef]
    cleanmask_files: dict[tuple[str, str], FileRef]
    distances: dict[str, float]
    windows: dict[str, Window]
    recipes: dict[tuple[str, str, str], Path]
    derived: dict[tuple[str, str], DerivedParams]
    moments: dict[str, MomentDef]
    overrides: dict[str, dict[str, str]]

    # -- names --------------------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        return sorted(self.target_defs)

    @property
    def whole_targets(self) -> list[str]:
        """Targets with the parts of each linear mosaic replaced by the mosaic."""
        parts = {p for ps in self.linmos.values() for p in ps}
        return sorted((set(self.target_defs) - parts) | set(self.linmos))

    @property
    def line_products(self) -> list[str]:
        return list(self.configs.line_product)

    @property
    def cont_products(self) -> list[str]:
        return list(self.configs.cont_product)

    @property
    def interf_configs(self) -> list[str]:
        return list(self.configs.interf_config)

    @property
    def feather_configs(self) -> list[str]:
        return list(self.configs.feather_config)

    def mosaic_for(self, target: str) -> str | None:
        """The linear mosaic a target is a part of, if any."""
        for mosaic, parts in self.linmos.items():
            if target in parts:
                return mosaic
        return None

    def _all_targets(self) -> list[str]:
        """Targets plus mosaic names (a mosaic need not be in target_definitions)."""
        return sorted(set(self.target_defs) | set(self.linmos))

    def _check(self, name: str, known: Iterable[str], what: str) -> None:
        known = list(known)
        if name not in known:
            raise ConfigError(f"unknown {what} {name!r} in the project {self.master_key}",
                              _suggest(name, known, what + "s"))

    def _pick(self, wanted: str | Iterable[str] | None, pool: list[str], known: list[str],
              what: str) -> list[str]:
        names = _as_list(wanted)
        if names is None:
            return pool
        for name in names:
            self._check(name, known, what)
        return [name for name in pool if name in names]

    # -- loops --------------------------------------------------------------------------------

    def loop(self, targets: str | Iterable[str] | None = None,
             products: str | Iterable[str] | None = None,
             configs: str | Iterable[str] | None = None,
             just_line: bool = False, just_cont: bool = False,
             just_interf: bool = False, just_feather: bool = False,
             ) -> list[tuple[str, str, str]]:
        """(target, product, config) in the order target ▸ product ▸ config.

        Products are line then continuum, configs interferometric then feathered, each in
        definition order; a selection filters them and never reorders. Selected names must
        exist (a typo would otherwise give an empty loop and no error).
        """
        if just_line and just_cont:
            raise ConfigError("just_line and just_cont exclude each other", "pick one of them")
        if just_interf and just_feather:
            raise ConfigError("just_interf and just_feather exclude each other",
                              "pick one of them")
        all_targets = self._all_targets()
        all_products = self.line_products + self.cont_products
        all_configs = self.interf_configs + self.feather_configs
        product_pool = (self.line_products if just_line else
                        self.cont_products if just_cont else all_products)
        config_pool = (self.interf_configs if just_interf else
                       self.feather_configs if just_feather else all_configs)
        # a selection may name a mosaic (a whole target) that is not in target_definitions
        ts = self._pick(targets, self.targets if targets is None else all_targets,
                        all_targets, "target")
        ps = self._pick(products, product_pool, all_products, "product")
        cs = self._pick(configs, config_pool, all_configs, "config")
        return [(t, p, c) for t in ts for p in ps for c in cs]

    # -- measurement sets -----------------------------------------------------------------------

    def _array_tags(self, config: str) -> list[str]:
        self._check(config, self.interf_configs + self.feather_configs, "config")
        feather = self.configs.feather_config.get(config)
        interf = self.configs.interf_config[feather.interf_config if feather else config]
        return list(interf.array_tags)

    def has_data_for_config(self, target: str, config: str, strict: bool = True) -> bool:
        """Whether the ms key has data for every array the config needs (any, if not strict).

        A feather config needs what its interferometric config needs. ``requires`` OR-groups
        ('12m_1|12m_2') count as satisfied by any of their tags.
        Reference quirk: the non-strict test returns the inverse of what it says (False when
        some array is present); fixed here.
        """
        self._check(target, self._all_targets(), "target")
        tags = self._array_tags(config)
        present = {e.array_tag for e in self.ms_entries if e.target == target}
        if not strict:
            return bool(present & set(tags))
        feather = self.configs.feather_config.get(config)
        interf = self.configs.interf_config[feather.interf_config if feather else config]
        groups = [set(g.split("|")) for g in interf.requires]
        grouped = set().union(*groups)
        groups += [{tag} for tag in tags if tag not in grouped]
        return all(group & present for group in groups)

    def interf_configs_for(self, target: str) -> list[str]:
        """The interferometric configs this target has all the arrays for."""
        return [c for c in self.interf_configs if self.has_data_for_config(target, c)]

    def input_ms(self, target: str, configs: str | Iterable[str] | None = None,
                 must_exist: bool = True) -> list[MSEntry]:
        """The target's measurement sets, with ``path`` found under any ``ms_root``.

        With ``configs``, only the arrays of those configs the target has full data for (the
        reference's strict mode). Sorted by project, array tag, obsnum. A file found under no
        root is a ConfigError naming its ms key line, unless ``must_exist=False`` (path None).
        """
        self._check(target, self._all_targets(), "target")
        entries = [e for e in self.ms_entries if e.target == target]
        names = _as_list(configs)
        if names is not None:
            tags = {tag for c in names if self.has_data_for_config(target, c)
                    for tag in self._array_tags(c)}
            entries = [e for e in entries if e.array_tag in tags]
        entries.sort(key=lambda e: (e.project, e.array_tag, _natural(e.obsnum)))
        return [dataclasses.replace(e, path=self._find_ms(e, must_exist)) for e in entries]

    def _find_ms(self, entry: MSEntry, must_exist: bool) -> Path | None:
        for root in self.ms_roots:
            if (root / entry.file).exists():
                return root / entry.file
        if must_exist:
            _fail(entry.source, f"measurement set {entry.file} not found under any ms_root "
                                f"({', '.join(map(str, self.ms_roots)) or 'none set'})",
                  f"fix the path in the ms key, or add the ms_root holding it to "
                  f"{self.master_key}")
        return None

    def singledish_file(self, target: str, product: str) -> Path | None:
        """The single-dish cube for (target, product) under the first singledish_root holding
        it; None if the key has no entry or no root holds the file."""
        return self._find_file(self.singledish_files, self.singledish_roots, target, product)

    def cleanmask_file(self, target: str, product: str) -> Path | None:
        """The clean mask for (target, product), like :meth:`singledish_file`."""
        return self._find_file(self.cleanmask_files, self.cleanmask_roots, target, product)

    @staticmethod
    def _find_file(table: dict[tuple[str, str], FileRef], roots: list[Path], target: str,
                   product: str) -> Path | None:
        ref = table.get((target, product))
        if ref is None:
            return None
        return next((r / ref.file for r in roots if (r / ref.file).exists()), None)

    # -- recipes, derived products, moments -------------------------------------------------------

    def imaging_recipes(self, config: str, product: str,
                        stage: str | None = None) -> Path | dict[str, Path]:
        """The tclean recipe file for one stage, or {stage: file} for all three stages."""
        self._check(config, self.interf_configs, "interf config")
        self._check(product, self.line_products + self.cont_products, "product")
        stages = [stage] if stage is not None else list(STAGES)
        found: dict[str, Path] = {}
        for name in stages:
            self._check(name, STAGES, "imaging stage")
            recipe = self.recipes.get((config, product, name))
            if recipe is None:
                keys = ", ".join(map(str, self.key_files.get("imaging_key", [])))
                raise ConfigError(
                    f"no imaging recipe for config {config} product {product} stage {name}",
                    f"add a line '{config} {product} {name} <recipe.clean>' (or a wildcard "
                    f"line) to an imaging key ({keys or 'add imaging_key to the master key'})")
            found[name] = recipe
        return found[stage] if stage is not None else found

    def derived_params(self, config: str, product: str) -> DerivedParams:
        """A copy of the derived-product settings for (config, product)."""
        self._check(config, self.interf_configs + self.feather_configs, "config")
        self._check(product, self.line_products + self.cont_products, "product")
        return copy.deepcopy(self.derived[(config, product)])

    def moment_params(self, name: str) -> MomentDef:
        self._check(name, self.moments, "moment")
        return copy.deepcopy(self.moments[name])

    # -- per-target values and directories ------------------------------------------------------

    def distance_mpc(self, target: str) -> float | None:
        """Distance from the distance key; a mosaic part falls back to its mosaic's."""
        self._check(target, self._all_targets(), "target")
        if target in self.distances:
            return self.distances[target]
        return self.distances.get(self.mosaic_for(target) or "")

    def window(self, target: str) -> Window | None:
        """Velocity window from the window key; a mosaic part falls back to its mosaic's."""
        self._check(target, self._all_targets(), "target")
        if target in self.windows:
            return self.windows[target]
        return self.windows.get(self.mosaic_for(target) or "")

    def dir_for(self, target: str) -> str:
        """The per-target directory name (dir_key mapping, else the target itself)."""
        self._check(target, self._all_targets(), "target")
        return self.dir_map.get(target, target)

    def target_dir(self, target: str, kind: str) -> Path:
        """``<kind>_root/<dir_for(target)>`` for kind imaging/postprocess/derived/release."""
        self._check(kind, _DIR_KINDS, "directory kind")
        root = self.roots.get(f"{kind}_root")
        if root is None:
            raise ConfigError(f"{self.master_key}: no {kind}_root set",
                              f"add a line '{kind}_root <directory>' to the master key")
        return root / self.dir_for(target)

    def imaging_dir(self, target: str) -> Path:
        return self.target_dir(target, "imaging")

    def postprocess_dir(self, target: str) -> Path:
        return self.target_dir(target, "postprocess")

    def derived_dir(self, target: str) -> Path:
        return self.target_dir(target, "derived")

    @staticmethod
    def cube_filename(target: str, config: str | None, product: str | None,
                      ext: str | None = None) -> str:
        return cube_filename(target, config, product, ext)


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


def _read_configs(files: list[tuple[Path, Where]]) -> Configs:
    """``type name {dict}``; repeated lines of one config merge, later values win."""
    pending: dict[tuple[str, str], _Pending] = {}
    for path, _ in files:
        for where, (kind, name, text) in _columns(path, ("type", "name", "params"), rest=True):
            if kind not in CONFIG_TYPES:
                _fail(where, f"unknown config type {kind!r}",
                      _suggest(kind, CONFIG_TYPES, "types"))
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
                entry.where[key] = where
    configs = Configs()
    for (kind, name), entry in pending.items():
        getattr(configs, kind)[name] = CONFIG_TYPES[kind](name=name, **entry.params)
    _validate_configs(configs, pending)
    return configs


def _validate_configs(configs: Configs, pending: dict[tuple[str, str], _Pending]) -> None:
    """Values the loops cannot do without, and names that must not collide."""
    for name, line in configs.line_product.items():
        src = pending[("line_product", name)]
        if not line.line_tag or line.channel_kms <= 0:
            _fail(src.first, f"line_product {name} needs line_tag and channel_kms > 0",
                  "add e.g. {'line_tag':'co21','channel_kms':2.5}")
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
    for a, b in (("line_product", "cont_product"), ("interf_config", "feather_config")):
        for name in set(getattr(configs, a)) & set(getattr(configs, b)):
            _fail(pending[(b, name)].first, f"{name} is defined both as {a} and as {b}",
                  "give them different names")


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
    return _literal(where, value, dict, param, "{'key':1}")


def _merge_derived(params: DerivedParams, param: str, value: Any) -> None:
    current = getattr(params, param)
    if isinstance(current, dict):
        current.update(value)
    else:
        current.extend(v for v in value if v not in current)


def _read_overrides(files: list[tuple[Path, Where]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path, _ in files:
        for _, (fname, param, value) in _columns(path, ("filename", "param", "value"), rest=True):
            out.setdefault(fname, {})[param] = value
    return out


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
    configs = _read_configs(keys["config_key"])
    moments = _read_moment_key(keys["moment_key"])
    return Project(
        master_key=path, key_dir=master.key_dir, roots=master.roots,
        ms_roots=master.root_lists["ms_root"],
        singledish_roots=master.root_lists["singledish_root"],
        cleanmask_roots=master.root_lists["cleanmask_root"],
        key_files={k: [p for p, _ in v] for k, v in keys.items() if v},
        target_defs=targets, configs=configs,
        linmos=_read_linmos(keys["linmos_key"], targets),
        dir_map=_read_dir_key(keys["dir_key"]),
        ms_entries=_read_ms_key(keys["ms_key"], targets),
        singledish_files=_read_file_key(keys["singledish_key"]),
        cleanmask_files=_read_file_key(keys["cleanmask_key"]),
        distances=_read_distances(keys["distance_key"]),
        windows=_read_windows(keys["window_key"]),
        recipes=_read_imaging_key(keys["imaging_key"], master.key_dir, configs),
        derived=_read_derived_key(keys["derived_key"], configs, moments),
        moments=moments,
        overrides=_read_overrides(keys["override_key"]),
    )
