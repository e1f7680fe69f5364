"""Every entry a PHANGS key can set, and what hpcddf does with it: used, or refused.

Why one table: the reference reads many settings it then ignores, and a user who sets one
finds out hours later, from a product that does not reflect it. Here every master-key entry,
config type and config parameter, derived-key parameter and moment parameter has exactly one
decision. A ``used`` entry says where it takes effect; a ``refused`` one says why and what to
do instead, and a key that sets it (to anything but its default) is a ConfigError naming
``file:line`` when the keys are read (:func:`refuse`, called by the readers). The unit test
walks the readers' tuples and the config dataclasses against this table, so a new field
added without a decision fails the test.

A stage still to be built is marked refused with ``NOT_YET`` until it lands (none today).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpcddf.phangs.keyfile import Where, _fail

NOT_YET = "not implemented in this version"


@dataclass(frozen=True)
class Decision:
    """``note``: where a used entry takes effect, or why a refused one is refused."""

    used: bool
    note: str
    fix: str = ""


def _used(note: str) -> Decision:
    return Decision(True, note)


def _refused(note: str, fix: str) -> Decision:
    return Decision(False, note, fix)


_DROP = "remove it from the key"

MASTER: dict[str, Decision] = {
    "key_dir": _used("keys.py: the directory key files are read from"),
    "imaging_root": _used("Project.imaging_dir: staged MSs and tclean products"),
    "postprocess_root": _used("Project.postprocess_dir: the postprocess stage's cubes"),
    "derived_root": _used("Project.derived_dir: convolved cubes, masks, moments"),
    "release_root": _used("plan_release: the release stage copies the products there"),
    "vfield_root": _used("plan_derived: the window key's external velocity fields"),
    "ms_root": _used("Project.input_ms: where measurement sets are found"),
    "singledish_root": _used("plan_casa.singledish_path: single-dish cubes to feather"),
    "cleanmask_root": _used("Project.cleanmask_file: where the clean-mask files are found"),
    "ms_key": _used("stage_ms: the measurement sets of each target"),
    "singledish_key": _used("postprocess: the single-dish cube a feather config feathers"),
    "cleanmask_key": _used("imaging: tclean's mask, regridded to the cube (casa_cleanmask)"),
    "distance_key": _used("derived: physical resolutions (phys_res, res_*_pc)"),
    "window_key": _used("derived: flat-mask windows and external velocity fields"),
    "config_key": _used("every stage: products and configs"),
    "target_key": _used("every stage: targets, vsys and vwidth"),
    "moment_key": _used("derived: moment definitions"),
    "derived_key": _used("derived: resolutions, masks, moments"),
    "imaging_key": _used("imaging: the tclean recipes"),
    "linmos_key": _used("postprocess: linear mosaics"),
    "override_key": _used("imaging: tclean parameters of named cubes (phangs.overrides)"),
    "dir_key": _used("Project.dir_for: per-target directory names"),
    "casaversion_key": _refused("hpcddf runs the one CASA of HPCDDF_CASA_ENV for every stage",
                                _DROP + " (the CASA version is a site setting)"),
    "alma_download_key": _refused("hpcddf does not download ALMA data",
                                  _DROP + " and point ms_root at the downloaded data"),
}

CONFIG_TYPE_DECISIONS: dict[str, Decision] = {
    "line_product": _used("stage_ms, stage_line, imaging, derived"),
    "cont_product": _used("stage_ms, stage_line, imaging"),
    "interf_config": _used("every stage"),
    "feather_config": _used("postprocess (feather) and derived"),
    "singledish_config": _used("postprocess feather: the single-dish step (phangs.singledish), "
                               "config 'tp' as PHANGS"),
    "array_tag": _used("stage_ms: per-array settings of the split"),
}

_RES_ANG = "plan_chain: the config's angular resolutions (derived convolves to each)"
_RES_PHYS = "plan_chain: the config's physical resolutions (derived convolves to each)"
_RES = {"res_min_arcsec": _used(_RES_ANG), "res_max_arcsec": _used(_RES_ANG),
        "res_min_pc": _used(_RES_PHYS), "res_max_pc": _used(_RES_PHYS),
        "res_step_factor": _used("plan_chain: the ratio of successive res_* resolutions"),
        "res_list": _used(_RES_ANG)}
_SCALES = "give the scales in arcsec with clean_scales_arcsec"

CONFIG_FIELDS: dict[str, dict[str, Decision]] = {
    "line_product": {
        "line_tag": _used("plan_common.line_restfreq_ghz: the rest frequency"),
        "channel_kms": _used("stage_line: the output channel width"),
        "statwt_edge_kms": _used("stage_ms/stage_line: line-free margins for uvcontsub, statwt"),
        "fitorder": _used("stage_ms: uvcontsub fit order"),
        "combinespw": _used("stage_ms contsub: spws merged for one continuum fit"),
        "lines_to_flag": _used("stage_ms: velocities kept out of the continuum fit"),
        "exclude_freq_ranges_ghz": _used("stage_ms: ranges kept out of the continuum fit"),
        "flag_edge_fraction": _used("stage_ms split: leaves out that fraction of each spw's "
                                    "channels at both ends"),
        "chunksize": _used("imaging: channels per chunk task (plan_chunks)"),
    },
    "cont_product": {
        "freq_ranges_ghz": _used("stage_ms: the channels split"),
        "channel_ghz": _used("stage_line: the averaged channel width"),
        "lines_to_flag": _used("stage_line: the line channels flagged"),
    },
    "interf_config": {
        "array_tags": _used("Project.input_ms: the arrays the config images"),
        "requires": _used("Project.has_data_for_config: OR-groups of array tags"),
        **_RES,
        "clean_scales_arcsec": _used("imaging: multiscale scales"),
        "clean_scales_beam": _refused("scales in beams are not implemented", _SCALES),
        "clean_scales_auto": _refused("automatic scales are not implemented", _SCALES),
        "clean_scales_auto_factor": _refused("automatic scales are not implemented", _SCALES),
        "clean_scales_max_las_fraction": _refused("automatic scales are not implemented",
                                                  _SCALES),
    },
    "feather_config": {
        "interf_config": _used("postprocess: the config whose cube is feathered"),
        **_RES,
    },
    "singledish_config": {
        "bl_order": _used("singledish: order of the baseline fitted to each spectrum"),
        "chan_dv_kms": _used("singledish: the channel width the cube is regridded to"),
        "do_plots": _used("singledish: a PNG of the mean spectrum"),
    },
    "array_tag": {
        "timebin": _used("stage_ms split: time averaging of that array's visibilities"),
    },
}

DERIVED: dict[str, Decision] = {
    "phys_res": _used("plan_chain: physical resolutions"),
    "ang_res": _used("plan_chain: angular resolutions"),
    "mask_configs": _used("plan_chain: configs joined into the broad mask"),
    "moments": _used("plan_moments: the moments made"),
    "noise_kw": _used("derived: noise cube parameters"),
    "strictmask_kw": _used("derived: strict mask parameters"),
    "broadmask_kw": _used("derived: broad mask parameters"),
    "flatstrictmask_kw": _used("plan_derived: flat strict mask window"),
    "flatbroadmask_kw": _used("plan_derived: flat broad mask window"),
    "convolve_kw": _used("derived: convolution parameters"),
    "shuffle_kw": _used("plan_derived: the velocity-shuffled cube (phangs.shuffle)"),
}

MOMENT: dict[str, Decision] = {name: _used("plan_moments: " + what) for name, what in (
    ("algorithm", "the moment function"), ("mask", "the mask it uses"),
    ("ext", "the output name"), ("ext_error", "the error map name"),
    ("round", "the round it is made in"), ("maps_to_pass", "mom1wprior's input maps"),
    ("other_exts", "mom1wprior's prior file"), ("kwargs", "the moment function's keywords"))}

# What a singledish_key line feathers, by the kind of its product.
SINGLEDISH_PRODUCTS: dict[str, Decision] = {
    "line_product": _used("postprocess: the cube feathered by each feather config"),
    "cont_product": _used("postprocess: the one-plane image feathered with the continuum image"),
}

SECTIONS: dict[str, dict[str, Decision]] = {
    "master": MASTER, "config type": CONFIG_TYPE_DECISIONS, "derived": DERIVED, "moment": MOMENT,
    "singledish product": SINGLEDISH_PRODUCTS,
    **{f"{kind} parameter": fields for kind, fields in CONFIG_FIELDS.items()},
}


def decision(section: str, name: str) -> Decision:
    """The table's decision; KeyError for an entry nobody decided (a bug the test catches)."""
    return SECTIONS[section][name]


def refuse(where: Where, section: str, name: str, value: Any = None,
           default: Any = None) -> None:
    """A ConfigError naming ``where`` if the table refuses ``name`` and ``value`` is not its
    default (a key may spell out a default it does not rely on: published keys do)."""
    d = decision(section, name)
    if d.used or (value is not None and value == default):
        return
    _fail(where, f"{section.replace(' parameter', '')} {name!r} is refused: {d.note}", d.fix)


def used_entries() -> list[tuple[str, str]]:
    return [(s, n) for s, table in SECTIONS.items() for n, d in table.items() if d.used]


def refused_entries() -> list[tuple[str, str]]:
    return [(s, n) for s, table in SECTIONS.items() for n, d in table.items() if not d.used]
