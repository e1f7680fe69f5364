"""The DDFacet/killMS reduction: every step of ddf-pipeline's sequence as a declared Step.

This module is the reduction's entry: which step names it can build (``BUILDERS``: the
builders live in ``selfcal`` (on [data] mslist) and ``fullband`` (on the full list and after),
their shared pieces in ``stepkit``), what it refuses, and the checks before anything is queued.

Each builder returns the step's commands (argv lists from the configuration), the outputs
that must exist for it to count as done, and the parameters its done-marker records. Image
and solution names are ddf-pipeline's, so ``image_full_ampphase_di_m.NS.app.restored.fits``
is where users and their scripts expect it.

A step bundles everything ddf-pipeline ran inside one "not done yet" branch (kMS and its
ClipCal, DDF and the mask made from its image): the marker is written only after the last of
them, so a kill between two sub-commands reruns the whole step instead of skipping one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Callable

from hpcddf.engine.runner import Step
from hpcddf.errors import PlanError
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.fullband import (
    FINAL_NS,
    DDS2_full,
    DDS3_full,
    DDS3_full_slow,
    DIS2_full,
    Predict_DDS2,
    compress_ms,
    image_full_ampphase_di,
    image_full_ampphase_di_m,
    image_full_ampphase_di_m_NS,
    offsets,
    quality,
    redo_DI,
    summary,
)
from hpcddf.lofar.lowres import BUILDERS as LOWRES_BUILDERS
from hpcddf.lofar.products import dynspec, polcubes, spectral_restored, stokesv
from hpcddf.lofar.selfcal import (
    DDS0,
    DDS1,
    DIS0,
    DIS1,
    Predict_DI1,
    bootstrap,
    cluster,
    external_mask,
    image_ampphase1,
    image_ampphase1_di,
    image_dirin_SSD,
    image_dirin_SSD_init,
    image_dirin_SSD_m,
    image_dirin_SSD_m_c,
    image_dirin_SSD_m_c_di,
    image_dirin_SSD_m_c_di_m,
    image_phase1,
    mask_diffuse,
    mask_phase1,
)
from hpcddf.lofar.stepkit import Reduction, read_list
from hpcddf.lofar.wide import (
    image_full_wide,
    image_full_wide_im,
    image_full_wide_im_sub,
    image_full_wide_predict,
    wide_mask,
)

__all__ = ["BUILDERS", "FINAL_NS", "Reduction", "build", "check_inputs", "read_list", "unbuildable"]




def check_inputs(cfg: PipelineConfig, step_names: list[str] | tuple[str, ...],
                 workdir: Path | None = None, pending: Collection[str] = ()) -> None:
    """Refuse, before anything is queued, a step whose external inputs are missing or wrong:
    the bootstrap's catalogues (files and PyBDSM columns) and the offsets' reference catalogue
    (``workdir``: the field directory a downloaded one lives in). ``pending`` catalogues are
    still to be downloaded (``--dry-run``): their files are not read."""
    try:  # the full check reads the tables (astropy); a bare login-node install checks the files
        from hpcddf.lofar.bootstrap import catalogues_from_config
        from hpcddf.lofar.offsets import reference_catalogue
    except ImportError:
        _files_exist(cfg, Path(workdir or "."), pending)
        return _check_quality(cfg, step_names)
    if "bootstrap" in step_names:
        catalogues_from_config(cfg, pending=pending, base=workdir)
    if "offsets" in step_names:
        reference_catalogue(cfg, workdir, pending)
    _check_quality(cfg, step_names)


def _check_quality(cfg: PipelineConfig, step_names: list[str] | tuple[str, ...]) -> None:
    if "quality" in step_names:
        try:
            from hpcddf.lofar.quality import check_comparisons, parse_comparison
        except ImportError:  # a bare login-node install: the node checks them
            return
        check_comparisons([parse_comparison(str(c)) for c in cfg.get("control", "quality")])


def _files_exist(cfg: PipelineConfig, workdir: Path, pending: Collection[str] = ()) -> None:
    from hpcddf.errors import ConfigError
    from hpcddf.lofar.catalogues import in_field
    paths = list(cfg.get("bootstrap", "catalogues") or []) + [cfg.get("offsets", "catalogue") or ""]
    for path in (in_field(workdir, p) for p in paths if p):
        if str(path) not in pending and not path.is_file():
            raise ConfigError(f"catalogue {path} does not exist", "fix the path in the config ($$ is the site's catalogue dir)")


BUILDERS: dict[str, Callable[[Reduction], Step]] = {
    f.__name__: f for f in (
        redo_DI, image_full_wide, wide_mask, image_full_wide_im, image_full_wide_predict,
        image_full_wide_im_sub, image_dirin_SSD_init, external_mask, image_dirin_SSD, mask_diffuse, image_dirin_SSD_m,
        cluster, image_dirin_SSD_m_c, DIS0, image_dirin_SSD_m_c_di, image_dirin_SSD_m_c_di_m,
        DDS0, bootstrap, image_phase1, mask_phase1, DDS1, image_ampphase1, Predict_DI1, DIS1,
        image_ampphase1_di, DDS2_full, Predict_DDS2, DIS2_full, image_full_ampphase_di,
        image_full_ampphase_di_m, DDS3_full, DDS3_full_slow, offsets, spectral_restored,
        polcubes, stokesv, dynspec, compress_ms, quality, summary)
}
BUILDERS["image_full_ampphase_di_m.NS"] = image_full_ampphase_di_m_NS
BUILDERS.update(LOWRES_BUILDERS)


# Steps that run on the unscaled data even when the bootstrap is on; and, after it, the steps
# that still image the scaled copy of DIS0's output (DIS1 then recalibrates from SCALED_DATA).
BEFORE_BOOTSTRAP = frozenset({
    "redo_DI", "image_full_wide", "wide_mask", "image_full_wide_im", "image_full_wide_predict",
    "image_full_wide_im_sub", "image_dirin_SSD_init", "external_mask", "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m",
    "cluster", "image_dirin_SSD_m_c", "DIS0", "image_dirin_SSD_m_c_di", "image_dirin_SSD_m_c_di_m",
    "DDS0", "bootstrap"})
BEFORE_DIS1 = frozenset({"image_phase1", "mask_phase1", "DDS1", "image_ampphase1", "Predict_DI1"})


def columns_at(r: Reduction, name: str) -> Reduction:
    """The reduction as step ``name`` sees it: which columns hold the (scaled) data."""
    if not r.get("control", "bootstrap") or name in BEFORE_BOOTSTRAP:
        return r
    return replace(r, scaled=True, di_scaled=name in BEFORE_DIS1)


def build(r: Reduction, stage: str, names: list[str] | tuple[str, ...]) -> list[Step]:
    """The steps of one stage, in order."""
    steps = []
    for name in names:
        if name not in BUILDERS:
            raise PlanError(f"step {name} has no builder in this hpcddf version",
                            "this is a bug: every step of hpcddf/lofar/steps.py needs one")
        steps.append(replace(BUILDERS[name](columns_at(r, name)), stage=stage))
    return steps


def unbuildable(step_names: list[str] | tuple[str, ...]) -> list[str]:
    """Planned steps without a builder (none: checked before anything is queued all the same,
    so that a step added to the table without one stops at submit, not on the node)."""
    return [n for n in step_names if n not in BUILDERS]
