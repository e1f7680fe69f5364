"""The ddf-pipeline step sequence as data: which steps run, in which stage, in which order.

Each step is named after the ddf-pipeline image or solution set it makes (so users recognise
``image_ampphase1`` or ``DDS2_full``). ``stage`` is the stop point (``--control-exitafter``) that
ends the group the step belongs to. ``enabled`` says from the configuration whether the step
runs at all. Command builders for each step arrive with the reduction itself; the engine and
the plan only need this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hpcddf.lofar.config import PipelineConfig

Predicate = Callable[[PipelineConfig], bool]


def _always(cfg: PipelineConfig) -> bool:
    return True


def _opt(section: str, name: str) -> Predicate:
    def pred(cfg: PipelineConfig) -> bool:
        return bool(cfg.get(section, name))
    return pred


def _not(p: Predicate) -> Predicate:
    return lambda cfg: not p(cfg)


def _all(*ps: Predicate) -> Predicate:
    return lambda cfg: all(p(cfg) for p in ps)


_full = _opt("data", "full_mslist")
_di = _not(_opt("control", "skip_di"))
_low = _all(_full, _opt("image", "low_psf_arcsec"))
# [inputmodel] basedicomodel starts from a given model: everything up to DDS2_full is skipped
_from_scratch = _not(_opt("inputmodel", "basedicomodel"))


@dataclass(frozen=True)
class StepSpec:
    """One step of the reduction as the plan sees it."""

    name: str
    stage: str
    enabled: Predicate = _always
    description: str = ""


# Stage names are ddf-pipeline's stop points, plus "final" for the rest of the run.
STAGES: tuple[str, ...] = ("initial", "dirin", "dirin_di", "bootstrap", "phase", "ampphase",
                           "ampphase_di", "fullampphase", "fulllow", "final")

# A stage exists only when this holds; otherwise its enabled steps join the next stage.
STAGE_ENABLED: dict[str, Predicate] = {
    "initial": _from_scratch,
    "dirin": _from_scratch,
    "dirin_di": _all(_from_scratch, _di),
    "bootstrap": _all(_from_scratch, _opt("control", "bootstrap")),
    "phase": _from_scratch,
    "ampphase": _from_scratch,
    "ampphase_di": _all(_from_scratch, _di),
    "fullampphase": _full,
    "fulllow": _low,
    "final": _full,
}

STEPS: tuple[StepSpec, ...] = (
    StepSpec("redo_DI", "initial", _all(_from_scratch, _opt("control", "redo_DI")),
             "DP3 gaincal/applycal against a GSM/TGSS sky model"),
    # do_wide runs before ddf-pipeline's "from scratch" branch: a run from a previous model
    # ([inputmodel]) subtracts the outer sources too
    StepSpec("image_full_wide", "initial", _opt("image", "do_wide"), "wide-field image, 2 major cycles"),
    StepSpec("wide_mask", "initial", _opt("image", "do_wide"), "the wide image's mask (TGSS, region, MakeMask)"),
    StepSpec("image_full_wide_im", "initial", _opt("image", "do_wide"), "one more major cycle in that mask"),
    StepSpec("image_full_wide_predict", "initial", _opt("image", "do_wide"),
             "the model outside the central square predicted and subtracted: DATA_SUB"),
    StepSpec("image_full_wide_im_sub", "initial", _opt("image", "do_wide"), "check image of DATA_SUB"),
    StepSpec("image_dirin_SSD_init", "initial", _from_scratch, "DI dirty image"),
    StepSpec("external_mask", "initial", _from_scratch, "blank mask plus TGSS/region/FITS masks"),
    StepSpec("image_dirin_SSD", "initial", _from_scratch, "DI SSD clean, 1 major cycle"),
    StepSpec("mask_diffuse", "initial", _from_scratch, "MakeMask on the residual: MaskDiffuse"),
    StepSpec("image_dirin_SSD_m", "initial", _from_scratch, "DI clean with the mask, predict"),
    StepSpec("cluster", "dirin", _from_scratch, "MakeCatalog + ClusterCat: the facet directions"),
    StepSpec("image_dirin_SSD_m_c", "dirin", _from_scratch, "DI image on the clustered facets"),
    StepSpec("DIS0", "dirin_di", _all(_from_scratch, _di), "DI calibration (kMS CohJones) + ClipCal"),
    StepSpec("image_dirin_SSD_m_c_di", "dirin_di", _all(_from_scratch, _di), "image DI-corrected data"),
    StepSpec("image_dirin_SSD_m_c_di_m", "dirin_di", _all(_from_scratch, _di), "masked DI image"),
    StepSpec("DDS0", "bootstrap", _from_scratch, "first DD calibration (kMS KAFCA) + smoothing"),
    StepSpec("bootstrap", "bootstrap", _all(_from_scratch, _opt("control", "bootstrap")),
             "flux-scale bootstrap: SCALED_DATA"),
    StepSpec("image_phase1", "phase", _from_scratch, "image with DDS0 phase solutions"),
    StepSpec("mask_phase1", "ampphase", _from_scratch, "mask + MaskDicoModel of image_phase1"),
    StepSpec("DDS1", "ampphase", _from_scratch, "DD calibration against image_phase1"),
    StepSpec("image_ampphase1", "ampphase", _from_scratch, "image with DDS1 amp+phase solutions"),
    StepSpec("Predict_DI1", "ampphase_di", _all(_from_scratch, _di), "predict into DD_PREDICT"),
    StepSpec("DIS1", "ampphase_di", _all(_from_scratch, _di), "DI calibration + ClipCal"),
    StepSpec("image_ampphase1_di", "ampphase_di", _all(_from_scratch, _di), "image DI-corrected data"),
    StepSpec("DDS2_full", "fullampphase", _full, "DD calibration on the full MS list"),
    StepSpec("extended_mask", "fullampphase",
             _all(_full, _from_scratch, _opt("control", "bootstrap"), _opt("masking", "extended_size")),
             "extended-source mask from the bootstrap image"),
    StepSpec("Predict_DDS2", "fullampphase", _all(_full, _di), "predict with DDS2_full"),
    StepSpec("DIS2_full", "fullampphase", _all(_full, _di), "DI calibration on the full list"),
    StepSpec("image_full_ampphase_di", "fullampphase", _full, "full-bandwidth dirty image"),
    StepSpec("image_full_ampphase_di_m", "fulllow", _full, "full-bandwidth masked clean"),
    StepSpec("DDS3_full", "fulllow", _full, "fast DD calibration on the full list"),
    StepSpec("DDS3_full_slow", "fulllow", _all(_full, _opt("solutions", "do_very_slow")),
             "very slow amplitude solutions"),
    StepSpec("image_full_low", "fulllow", _low, "low-resolution image, 2 major cycles"),
    StepSpec("image_full_low_im", "fulllow", _low, "low-resolution image in its own mask"),
    StepSpec("image_full_low_m", "fulllow", _low, "the full extended masks and the final low-resolution image"),
    StepSpec("external_mask_ext_deep", "fulllow", _low, "the deep extended-emission mask (external_mask_ext-deep)"),
    StepSpec("image_full_ampphase_di_m.NS", "final", _full, "the final full-resolution image"),
    StepSpec("offsets", "final", _all(_full, _opt("offsets", "method")),
             "astrometric offsets and the _shift images"),
    StepSpec("spectral_restored", "final", _all(_full, _opt("control", "spectral_restored")),
             "multi-frequency restored images"),
    StepSpec("polcubes", "final", _all(_full, _opt("control", "polcubes")), "QU cubes"),
    StepSpec("stokesv", "final", _all(_full, _opt("control", "stokesv")), "Stokes V image"),
    StepSpec("dynspec", "final", _all(_full, _opt("spectra", "do_dynspec")), "dynamic spectra"),
    StepSpec("compress_ms", "final", _all(_full, _opt("compression", "compress_ms")),
             "dysco-compress the MSs"),
    StepSpec("quality", "final", _all(_full, _opt("control", "quality")),
             "quality report of the final image against the given catalogues"),
    StepSpec("summary", "final", _always, "summary.txt and cache clean-up"),
)

STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)

# Steps that need a core or two, not a node (masks, catalogues, reports): where the site allows
# it ([slurm] light_cpus), those ending a stage run as a small job of their own.
LIGHT_STEPS: frozenset[str] = frozenset({"external_mask", "extended_mask", "mask_diffuse", "cluster", "mask_phase1",
                                         "offsets", "quality", "summary"})
