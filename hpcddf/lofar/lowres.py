"""Step builders for ddf-pipeline's extended masks and its low-resolution image chain.

* ``extended_mask``: after the bootstrap, islands of extended emission in the bootstrap's
  low-resolution mean image become ``bootstrap-mask-low/high.fits`` (hpcddf.lofar.extmask),
  and ``external_mask_ext.fits`` = TGSS + ``[masking] region`` + ``bootstrap-mask-high.fits``
  replaces ``external_mask.fits`` in the full-bandwidth clean masks (see ``external_mask_now``).
* The low-resolution chain, one step per DDF image so a killed job reruns one image, not three:
  ``image_full_low`` (2 major cycles), ``image_full_low_im`` (masked, 1 more),
  ``image_full_low_m`` (masked with its own extended mask ``full-mask-low.fits``), then
  ``external_mask_ext-deep.fits``, which ddf-pipeline makes but never reads again: it is kept
  as the deliverable it is (the deep field's extended-emission mask on the final grid).

Every image of the chain uses the full MS list, the final solutions with ``apply_sols[6]`` and
``normalize[2]``, SSD with negative initial HMP components allowed, killMS's IMAGING_WEIGHT,
the smoothed beam, and no cluster catalogue (DDFacet's own facet layout), as ddf-pipeline.
"""

from __future__ import annotations

from dataclasses import replace

from hpcddf.engine.runner import Command, Step
from hpcddf.lofar.ddfcommands import Image, ddf_image, hpcddf_tool, make_mask
from hpcddf.lofar.fullband import final_sols
from hpcddf.lofar.selfcal import BOOTSTRAP_MEAN, low_res, tgss_args
from hpcddf.lofar.stepkit import (
    EXT_MASK_EXT,
    Reduction,
    extended_mask_on,
    from_model,
    restored,
    step_of,
)

EXT_MASK_EXT_RECORD = "external_mask_ext.json"
DEEP_MASK = "external_mask_ext-deep.fits"    # written only when something is masked
DEEP_MASK_RECORD = "external_mask_ext-deep.json"
BOOT_LOW, BOOT_HIGH = "bootstrap-mask-low.fits", "bootstrap-mask-high.fits"
FULL_LOW, FULL_HIGH = "full-mask-low.fits", "full-mask-high.fits"
LOW_EXT_FLAG = "image_full_low.external-mask.json"  # exists only when BOOT_LOW masks a pixel
FULL_SIZE_THRESH = 1500  # ddf-pipeline hard-codes it for the full mask; extended_size is unused there
DIRIN_TEMPLATE = "image_dirin_SSD.app.restored.fits"
DIRIN_TESSEL = "image_dirin_SSD_m_c.tessel.reg"
LOW_EXTRA = ("--Beam-Smooth=1", "--GAClean-AllowNegativeInitHMP=1")


# ------------------------------------------------------------------------------ mask commands

def _extmask(r: Reduction, image: str, template: str, region: str, root: str,
             size: int) -> tuple[list[Command], list[str]]:
    """MakeMask's noise map (with rmsfacet: its own command, log and timeout), then the
    extended-mask tool; the commands and the files they write."""
    args = ["--image", image, "--template", template, "--root", root,
            "--rms-thresh", str(r.get("masking", "extended_rms")), "--size-thresh", str(int(size))]
    outs = [f"{root}-mask-low.fits", f"{root}-mask-high.fits"]
    cmds: list[Command] = []
    if r.get("masking", "rmsfacet"):
        cmds.append(Command(("MakeMask.py", f"--RestoredIm={image}", "--OutName=rmsmapmask", "--Th=3.0",
                             "--Box=50,2", f"--OutNameNoiseMap={image}.noise"),
                            f"{root}-rms.makemask.log", timeout_s=r.m.timeout_s))
        args += ["--rmsfacet", "--region", region, "--noise-map", f"{image}.noise.fits"]
        outs.append(f"{root}-rms-low.fits")
    cmds.append(Command((r.m.python, "-m", "hpcddf.lofar.extmask", "extended", *args),
                        f"{root}-mask.log", timeout_s=r.m.timeout_s))
    return cmds, outs


def _external(r: Reduction, template: str, out: str, record: str, high: str | None) -> Command:
    """ddf-pipeline's make_external_mask through hpcddf's external-mask tool: TGSS sources and
    the region on the template's grid, OR'd with an extended mask on that grid (``--fits``)."""
    args = ["external-mask", "--template", template, "--out", out, "--record", record, *tgss_args(r)]
    if high:
        args += ["--fits", high]
    return hpcddf_tool(r.m, args, f"{out.removesuffix('.fits')}.log")


def _merged_mask(r: Reduction, image: str, optional: str | None) -> list[Command]:
    """MakeMask at ``[masking] low_threshold``, OR'd in place with an extended mask: the
    result keeps MakeMask's name (``<image>.mask.fits``), as in ddf-pipeline."""
    mask = f"{image}.mask.fits"
    root = image.removesuffix(".app.restored.fits")
    cmds = [make_mask(r.m, image, r.get("masking", "low_threshold"), f"{root}.makemask.log")]
    extra = ["--optional", optional] if optional else []
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", mask, mask, *extra], f"{root}.mergemask.log"))
    return cmds


# ------------------------------------------------------------------------------ steps

def extended_mask(r: Reduction) -> Step:
    """ddf-pipeline step #22: the bootstrap extended mask and ``external_mask_ext.fits``."""
    size = r.get("masking", "extended_size")
    cmds, outs = _extmask(r, BOOTSTRAP_MEAN, DIRIN_TEMPLATE, DIRIN_TESSEL, "bootstrap", size)
    cmds.append(_external(r, "image_dirin_SSD_init.dirty.fits", EXT_MASK_EXT, EXT_MASK_EXT_RECORD, BOOT_HIGH))
    return step_of("extended_mask", cmds, outs + [EXT_MASK_EXT_RECORD], 60, extended_size=int(size))


def _low_image(r: Reduction, name: str, **kw) -> Image:
    """One image of the chain (see the module docstring for what they share)."""
    return r.image(name, mslist=r.full_mslist, deconv_mode="SSD", imaging_weights=True,
                   ddsols=final_sols(r), apply=r.apply(6), global_norm=r.norm(2),
                   extra=LOW_EXTRA, **low_res(r), **kw)


def _params(r: Reduction) -> dict:
    low = low_res(r)
    return {"uvrange_km": list(low["uvrange"]), "imsize": low["imsize"], "cell_arcsec": low["cellsize"]}


def image_full_low(r: Reduction) -> Step:
    """2 major cycles, auto-mask 5 sigma, no model. ``bootstrap-mask-low.fits`` is the clean
    mask only if it masks a pixel (DDFacet refuses an empty one): a first command writes
    ``image_full_low.external-mask.json`` only then, and DDF gets the mask only if it exists."""
    cmd = ddf_image(r.cfg, r.m, _low_image(r, "image_full_low", majorcycles=2, automask_sigma=5.0))
    cmds = [cmd]
    if extended_mask_on(r):
        check = Command((r.m.python, "-m", "hpcddf.lofar.extmask", "nonempty", "--mask", BOOT_LOW,
                         "--flag", LOW_EXT_FLAG), "image_full_low.external-mask.log", timeout_s=r.m.timeout_s)
        use = (LOW_EXT_FLAG, (f"--Mask-External={BOOT_LOW}",))
        cmds = [check, replace(cmd, when_exists=(use, *cmd.when_exists))]
    return step_of("image_full_low", cmds, [restored("image_full_low"), "image_full_low.DicoModel"],
                   180, **_params(r))


def image_full_low_im(r: Reduction) -> Step:
    """MakeMask of image_full_low (OR the bootstrap low mask), then 1 major cycle from its
    model, its PSF and its last residual (when the cache still has them)."""
    mask = f"{restored('image_full_low')}.mask.fits"
    cmds = _merged_mask(r, restored("image_full_low"), BOOT_LOW if extended_mask_on(r) else None)
    img = _low_image(r, "image_full_low_im", majorcycles=1, automask_sigma=5.0, cleanmask=mask,
                     init_dico="image_full_low.DicoModel", reuse_psf=True, reuse_dirty="forceresidual")
    cmds.append(ddf_image(r.cfg, r.m, img))
    return step_of("image_full_low_im", cmds, [mask, restored("image_full_low_im"), "image_full_low_im.DicoModel"],
                   180, **_params(r))


def full_template(r: Reduction) -> tuple[str, str]:
    """The full-resolution grid and facet layout of the full extended mask: the DI image and
    the clustered facets, or, in a run from a previous model, the first full-bandwidth image."""
    if from_model(r):
        return "image_full_ampphase_di.app.restored.fits", "image_full_ampphase_di_m.tessel.reg"
    return DIRIN_TEMPLATE, DIRIN_TESSEL


def image_full_low_m(r: Reduction) -> Step:
    """``full-mask-low/high.fits`` from image_full_low_im (islands > 1500 px, as ddf-pipeline),
    its MakeMask OR full-mask-low, then 1 major cycle, auto-mask 4, final_rmsfactor."""
    template, region = full_template(r)
    image = restored("image_full_low_im")
    cmds, outs = _extmask(r, image, template, region, "full", FULL_SIZE_THRESH)
    cmds += _merged_mask(r, image, FULL_LOW)
    img = _low_image(r, "image_full_low_m", majorcycles=1, automask_sigma=4.0, cleanmask=f"{image}.mask.fits",
                     init_dico="image_full_low_im.DicoModel", rms_factor=r.get("image", "final_rmsfactor"))
    cmds.append(ddf_image(r.cfg, r.m, img))
    return step_of("image_full_low_m", cmds, outs + [f"{image}.mask.fits", restored("image_full_low_m")],
                   180, **_params(r))


def external_mask_ext_deep(r: Reduction) -> Step:
    """TGSS + region + ``full-mask-high.fits`` (only with ``[masking] extended_size``) on the
    full-bandwidth image's grid. ddf-pipeline stopped reading it in 2018; it is the field's
    deep extended-emission mask at full resolution, kept for users and mosaics."""
    high = FULL_HIGH if r.get("masking", "extended_size") else None
    cmd = _external(r, "image_full_ampphase_di.app.restored.fits", DEEP_MASK, DEEP_MASK_RECORD, high)
    return step_of("external_mask_ext_deep", [cmd], [DEEP_MASK_RECORD], 20)


BUILDERS = {f.__name__: f for f in (extended_mask, image_full_low, image_full_low_im, image_full_low_m,
                                    external_mask_ext_deep)}
