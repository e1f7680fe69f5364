"""Step builders of ``[image] do_wide`` (ddf-pipeline's ``subtractOuterSquare``): a wide, low-
resolution image of the field, and its model outside the central square subtracted from every MS
of the full list into DATA_SUB, the column the reduction then starts from.

The chain, in ddf-pipeline's order:

* ``image_full_wide``: SSD, 2 major cycles on [data] mslist, ``wide_imsize`` x ``wide_cell``,
  uv range [image uvmin, 2.5 * 206 / wide_psf_arcsec] km, no IMAGING_WEIGHT, auto-mask at
  ``thresholds[0]``;
* ``wide_mask``: ``wide_external_mask.fits`` (TGSS and region, on its dirty image's grid), then
  MakeMask at ``[masking] wide_threshold`` OR'd with it;
* ``image_full_wide_im``: one more major cycle with that mask;
* ``image_full_wide_predict``: the model, zeroed inside the central
  ``floor(0.95 * imsize * cellsize / wide_cell)`` pixels (the main image's field), predicted on
  the full list into a column of its own (WIDE_PREDICT), then ``DATA_SUB = <colname> -
  WIDE_PREDICT`` per MS by ``hpcddf.lofar.wide_tool``, which recomputes it from the unchanged
  source column on every run: a kill anywhere in the step and a rerun never subtract twice
  (ddf-pipeline's in-place subtraction does);
* ``image_full_wide_im_sub``: a dirty image of DATA_SUB on the wide grid, to see the outer
  sources gone.

The wide steps read the configured ``[data] colname`` directly, whatever column the rest of the
reduction works on (they run first, and make that column).
"""

from __future__ import annotations

import math

from hpcddf.engine.runner import Command, Step
from hpcddf.lofar.ddfcommands import Image, ddf_image, dirty_of, hpcddf_tool, make_mask
from hpcddf.lofar.selfcal import tgss_args
from hpcddf.lofar.stepkit import SUB_COL, Reduction, restored, step_of

WIDE_PREDICT_COL = "WIDE_PREDICT"
WIDE_EXT_MASK = "wide_external_mask.fits"   # written only when TGSS or a region masks something
WIDE_EXT_MASK_RECORD = "wide_external_mask.json"
WIDE_MASK = "image_full_wide.mask.fits"
WIDE_STEPS = ("image_full_wide", "wide_mask", "image_full_wide_im", "image_full_wide_predict",
              "image_full_wide_im_sub")


def source_col(r: Reduction) -> str:
    """The column the subtraction reads: [data] colname as configured (never SCALED_DATA or
    DATA_SUB, which the reduction's own column logic may name)."""
    return r.cfg.get("data", "colname")


def wide_uvrange(r: Reduction) -> tuple[float, float]:
    """[image uvmin, 2.5 * 206 / wide_psf_arcsec] km: the baselines the wide beam resolves."""
    return (float(r.get("image", "uvmin") or 0.0), 2.5 * 206.0 / float(r.get("image", "wide_psf_arcsec")))


def mask_square_npix(r: Reduction) -> int:
    """The central square (wide pixels) whose model is not subtracted: 95 % of the main image's
    side, so sources inside the field are left to the main reduction."""
    side_arcsec = float(r.get("image", "imsize")) * float(r.get("image", "cellsize"))
    return math.floor(0.95 * side_arcsec / float(r.get("image", "wide_cell")))


def _wide_image(r: Reduction, name: str, **kw) -> Image:
    """An image on the wide grid from the source column: SSD, no killMS weights, no solutions."""
    kw.setdefault("mslist", r.mslist)
    kw.setdefault("colname", source_col(r))
    kw.setdefault("automask_sigma", r.thr(0))
    return r.image(name, robust=r.get("image", "wide_robust"),
                   psf_arcsec=r.get("image", "wide_psf_arcsec"), imsize=r.get("image", "wide_imsize"),
                   cellsize=r.get("image", "wide_cell"), uvrange=wide_uvrange(r), deconv_mode="SSD",
                   imaging_weights=False, global_norm=None, **kw)


def image_full_wide(r: Reduction) -> Step:
    """The wide image, 2 major cycles, auto-masked only (its masks come from it). The source
    column is checked in every MS first, so a wrong [data] colname fails before DDF starts."""
    mss = sorted(set(r.mss + r.full_mss))
    cmds = [hpcddf_tool(r.m, ["prepare-ms", "--colname", source_col(r), *mss], "image_full_wide.prepare-ms.log"),
            ddf_image(r.cfg, r.m, _wide_image(r, "image_full_wide", majorcycles=2))]
    return step_of("image_full_wide", cmds, [restored("image_full_wide"), "image_full_wide.dirty.fits"],
                   600, uvmax_km=wide_uvrange(r)[1])


def wide_mask(r: Reduction) -> Step:
    """``wide_external_mask.fits`` on the wide dirty image's grid (TGSS sources and the ds9
    region, as every external mask; [masking] external_fits_mask is on the main grid, so not
    here), then MakeMask of the wide image at ``wide_threshold`` OR'd with it."""
    ext = ["external-mask", "--template", "image_full_wide.dirty.fits", "--out", WIDE_EXT_MASK,
           "--record", WIDE_EXT_MASK_RECORD, *tgss_args(r)]
    image = restored("image_full_wide")
    cmds = [hpcddf_tool(r.m, ext, "wide_external_mask.log"),
            make_mask(r.m, image, r.get("masking", "wide_threshold"), "image_full_wide.makemask.log"),
            hpcddf_tool(r.m, ["merge-masks", "--out", WIDE_MASK, f"{image}.mask.fits",
                              "--optional", WIDE_EXT_MASK], "image_full_wide.mergemask.log")]
    return step_of("wide_mask", cmds, [WIDE_EXT_MASK_RECORD, WIDE_MASK], 30,
                   wide_threshold=r.get("masking", "wide_threshold"))


def image_full_wide_im(r: Reduction) -> Step:
    """One more major cycle from the wide model, in the wide mask (the PSF and last residual
    are reused when this job's cache still holds them)."""
    img = _wide_image(r, "image_full_wide_im", majorcycles=1, cleanmask=WIDE_MASK,
                      init_dico="image_full_wide.DicoModel", reuse_psf=True, reuse_dirty="forceresidual")
    return step_of("image_full_wide_im", [ddf_image(r.cfg, r.m, img)], [restored("image_full_wide_im")], 300)


def subtract_command(r: Reduction, mss: tuple[str, ...]) -> Command:
    """``DATA_SUB = <colname> - WIDE_PREDICT`` in every MS; the prediction column is dropped
    once DATA_SUB is complete (the DDF predict before it in the step makes it again)."""
    argv = (r.m.python, "-m", "hpcddf.lofar.wide_tool", "subtract", "--col", source_col(r),
            "--predict", WIDE_PREDICT_COL, "--out", SUB_COL, "--drop-predict", *mss)
    return Command(argv, "image_full_wide_predict.subtract.log", timeout_s=r.m.timeout_s)


# DDF 0.9.1 refuses a Predict whose --Deconv-Mode (default HMP) is not the InitDicoModel's type
# ("different minor cycle and IniDicoModel types [HMP vs SSD]"), and ddf_image passes no
# Deconv options outside Clean mode


def image_full_wide_predict(r: Reduction) -> Step:
    """The wide model outside the central square, predicted on the full list (DDF Predict with
    ``--Predict-MaskSquare=[0,N]``: zero the model inside N x N pixels), then subtracted. The
    wide uv range rides along with the grid options; DDFacet 0.9.1's Predict mode writes every
    row whatever --Selection-UVRangeKm says (measured), so the long baselines are subtracted too."""
    npix = mask_square_npix(r)
    img = _wide_image(r, "image_full_wide_predict", mslist=r.full_mslist, mode="Predict",
                      init_dico="image_full_wide_im.DicoModel", predict_col=WIDE_PREDICT_COL,
                      automask_sigma=None, extra=(f"--Predict-MaskSquare=[0,{npix}]",))
    mss = r.full_mss or r.mss
    cmds = [ddf_image(r.cfg, r.m, img), subtract_command(r, mss)]
    return step_of("image_full_wide_predict", cmds, [], 120 + 30 * len(mss), mask_square_npix=npix,
                   column=SUB_COL)


def image_full_wide_im_sub(r: Reduction) -> Step:
    """A dirty image of DATA_SUB on the wide grid: the check that only the central field is left."""
    img = dirty_of(_wide_image(r, "image_full_wide_im_sub", colname=SUB_COL))
    return step_of("image_full_wide_im_sub", [ddf_image(r.cfg, r.m, img)],
                   ["image_full_wide_im_sub.dirty.fits"], 120)
