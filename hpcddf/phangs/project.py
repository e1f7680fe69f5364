"""The typed model of a PHANGS project, as :func:`hpcddf.phangs.keys.load_project` reads it.

Targets, configurations (line and continuum products, interferometric, feather and
single-dish configs), measurement-set entries, windows, derived-product parameters and
moments as dataclasses, and :class:`Project`, which answers the questions the engine asks
when it expands the pipeline's loops into jobs (algorithms.md B2): which targets, products
and configurations there are, which measurement sets feed a target, which tclean recipe an
imaging stage uses, what the derived stages make, and where files go. Kept apart from the
parsers so the plan and the runners depend on the model, not on how key files are read.
"""


from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hpcddf.errors import ConfigError
from hpcddf.phangs.keyfile import Where, _fail, _natural, _suggest

STAGES = ("dirty", "multiscale", "singlescale")
_DIR_KINDS = ("imaging", "postprocess", "derived", "release")


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
    # channels per imaging chunk (hpcddf; PHANGS's ImagingChunkedHandler chunksize): a cube of
    # more channels is imaged as chunk tasks plus a gather (hpcddf.phangs.plan_chunks);
    # 0: sized from the site node's memory when the recipe fixes imsize, else one task
    chunksize: int = 0


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


@dataclass(frozen=True)
class Override:
    """An override key line's value (a literal, or the text as written) and where it is."""

    value: Any
    source: Where


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
    # None: no shuffled cube; a dict (``{}`` for the defaults): make one (hpcddf.phangs.shuffle)
    shuffle_kw: dict[str, Any] | None = None


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
    overrides: dict[str, dict[str, Override]]

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

    def cleanmask_ref(self, target: str, product: str) -> FileRef | None:
        """The cleanmask_key line for (target, product): the product's own line, else the
        target's ``all`` line, else (for a mosaic part) its mosaic's, the same way.

        Reference quirk: PHANGS takes a target's ``all`` line even when the product has its
        own line; fixed here (the more specific line wins)."""
        for owner in (target, self.mosaic_for(target)):
            for name in (product, "all"):
                ref = self.cleanmask_files.get((owner or "", name))
                if ref is not None:
                    return ref
        return None

    def cleanmask_file(self, target: str, product: str) -> Path | None:
        """The clean mask for (target, product) (:meth:`cleanmask_ref`) under the first
        cleanmask_root holding it; None if the key has no entry or no root holds the file."""
        ref = self.cleanmask_ref(target, product)
        if ref is None:
            return None
        return next((r / ref.file for r in self.cleanmask_roots if (r / ref.file).exists()),
                    None)

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
