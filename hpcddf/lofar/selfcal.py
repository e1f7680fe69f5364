"""Step builders of the self-calibration on [data] mslist: ddf-pipeline's initial, dirin,
dirin_di, bootstrap, phase, ampphase and ampphase_di stages."""

from __future__ import annotations

from dataclasses import replace

from hpcddf.engine.paths import FROZEN_CONFIG_REL
from hpcddf.engine.runner import Command, Step
from hpcddf.errors import PlanError
from hpcddf.lofar.ddfcommands import (
    Solve,
    ddf_image,
    dirty_of,
    hpcddf_tool,
    make_mask,
)
from hpcddf.lofar.stepkit import (
    CLUSTER_CAT,
    DI_COL,
    EXT_MASK,
    EXT_MASK_RECORD,
    Reduction,
    applied,
    group_by_obsid,
    masked,
    restored,
    solve_all,
    step_of,
)

# ------------------------------------------------------------------------------ initial

def image_dirin_SSD_init(r: Reduction) -> Step:
    """The first dirty image, as ddf-pipeline makes it: a clean of no major cycle, which also
    computes this image's PSF into the cache that image_dirin_SSD then forces (--Cache-PSF=force
    reads whatever PSF the cache holds: after do_wide, without this, the wide image's)."""
    cmds = [hpcddf_tool(r.m, ["prepare-ms", "--colname", r.col, *sorted(set(r.mss + r.full_mss))],
                        "prepare-ms.log")]
    if r.get("control", "clearcache"):
        cmds.append(hpcddf_tool(r.m, ["clear-cache", "--cache-dir", r.m.cache_dir, r.mslist,
                                      r.full_mslist, *r.mss, *r.full_mss], "clear-cache.log"))
    cmds.append(ddf_image(r.cfg, r.m, r.image("image_dirin_SSD_init", colname=r.col, majorcycles=0, peakfactor=0.05)))
    return step_of("image_dirin_SSD_init", cmds, ["image_dirin_SSD_init.dirty.fits"], 60)


def tgss_args(r: Reduction) -> list[str]:
    """The external-mask tool's TGSS and region arguments, the same for every external mask."""
    args: list[str] = []
    if r.get("masking", "tgss"):
        args += ["--tgss", r.get("masking", "tgss"), "--tgss-radius", str(r.get("masking", "tgss_radius")),
                 "--tgss-flux", str(r.get("masking", "tgss_flux"))]
        if r.get("masking", "tgss_extended"):
            args += ["--tgss-extended", "--tgss-pointlike", str(r.get("masking", "tgss_pointlike"))]
    if r.get("masking", "region"):
        args += ["--region", r.get("masking", "region")]
    return args


def external_mask(r: Reduction) -> Step:
    args = ["external-mask", "--template", "image_dirin_SSD_init.dirty.fits", "--out", EXT_MASK,
            "--record", EXT_MASK_RECORD, *tgss_args(r)]
    if r.get("masking", "external_fits_mask"):
        args += ["--fits", r.get("masking", "external_fits_mask")]
    return step_of("external_mask", [hpcddf_tool(r.m, args, "external_mask.log")],
                 [EXT_MASK_RECORD], 10)


def image_dirin_SSD(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD", colname=r.col, majorcycles=1, cleanmask=EXT_MASK, cleanmask_optional=True,
                  automask_sigma=r.thr(0), peakfactor=0.01, rms_factor=3, reuse_psf=True,
                  reuse_dirty="forcedirty")
    return step_of("image_dirin_SSD", [ddf_image(r.cfg, r.m, img)], [restored("image_dirin_SSD")], 120)


def mask_diffuse(r: Reduction) -> Step:
    """MaskDiffuse from the first residual, and the first clean mask (T0 + external + diffuse)."""
    cmds = [make_mask(r.m, "image_dirin_SSD.residual01.fits",
                      r.get("masking", "thres_outmaskextended"), "mask_diffuse.makemask.log",
                      ["--OutMaskExtended=MaskDiffuse", "--OutNameNoiseMap=Noise"]),
            make_mask(r.m, restored("image_dirin_SSD"), r.thr(0), "image_dirin_SSD.makemask.log")]
    sources = [f"{restored('image_dirin_SSD')}.mask.fits", "--optional", EXT_MASK]
    if r.get("masking", "use_maskdiffuse"):  # MakeMask writes none when nothing is diffuse
        sources += ["--optional", "MaskDiffuse.fits"]
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", "image_dirin_SSD.mask.fits", *sources],
                            "image_dirin_SSD.mergemask.log"))
    return step_of("mask_diffuse", cmds, ["image_dirin_SSD.mask.fits"], 30)


def image_dirin_SSD_m(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m", colname=r.col, majorcycles=1,
                  cleanmask="image_dirin_SSD.mask.fits", automask_sigma=r.thr(0),
                  init_dico="image_dirin_SSD.DicoModel", reuse_psf=True,
                  reuse_dirty="forceresidual", predict_col="DD_PREDICT")
    return step_of("image_dirin_SSD_m", [ddf_image(r.cfg, r.m, img)], [restored("image_dirin_SSD_m")], 120)


# ------------------------------------------------------------------------------ dirin

def cluster(r: Reduction) -> Step:
    """The calibration directions: a given clusterfile, ClusterCat, or hpcddf's small-field clustering."""
    user = r.get("image", "clusterfile")
    ndir = r.get("solutions", "ndir")
    if user:
        cmds = [hpcddf_tool(r.m, ["cluster", "--copy", user, "--out", CLUSTER_CAT], "cluster.log")]
    else:
        catalogue = "image_dirin_SSD_m.app.restored.pybdsf.srl.fits"
        cmds = [Command(("MakeCatalog.py", f"--RestoredIm={restored('image_dirin_SSD_m')}"),
                        "cluster.makecatalog.log", timeout_s=r.m.timeout_s)]
        if ndir >= 6:  # ClusterCat's tessellation fails below 6 clusters on small catalogues
            avoid = ["--AvoidPolygons", "MaskDiffuse.pickle"] if r.get("masking", "use_maskdiffuse") else []
            cmds.append(Command(("ClusterCat.py", "--SourceCat", catalogue, "--NGen", "100",
                                 "--NCluster", str(ndir), "--DoPlot=0", "--NCPU", str(r.m.ncpu_ddf),
                                 "--OutClusterCat", CLUSTER_CAT, *avoid),
                                "cluster.clustercat.log", timeout_s=r.m.timeout_s))
        else:
            cmds.append(hpcddf_tool(r.m, ["cluster", "--catalogue", catalogue, "--ndir", str(ndir),
                                          "--out", CLUSTER_CAT], "cluster.log"))
    return step_of("cluster", cmds, [CLUSTER_CAT], 30, ndir=ndir)


def image_dirin_SSD_m_c(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m_c", colname=r.col, majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD.mask.fits", automask_sigma=r.thr(0),
                  init_dico="image_dirin_SSD_m.DicoModel", predict_col="DD_PREDICT")
    cmds = [ddf_image(r.cfg, r.m, img)] + masked(r, "image_dirin_SSD_m_c", r.thr(0))
    return step_of("image_dirin_SSD_m_c", cmds, [restored("image_dirin_SSD_m_c"),
                                                "image_dirin_SSD_m_c_masked.DicoModel"], 150)


# ------------------------------------------------------------------------------ dirin_di

def di_solve(r: Reduction, **kw) -> Solve:
    """A DI solve: its time interval [solutions] dt_di, its channels [solutions] NChanSols, each
    worked out from the MS's data where the config leaves it None (ddf-pipeline's give_dt_dnu)."""
    dt = r.get("solutions", "dt_di")
    return Solve(ms="", sols="", colname=r.col, di=True, dt_min=dt or 0.0, auto_dt=dt is None,
                 auto_nchan=r.get("solutions", "NChanSols") is None, **kw)


def DIS0(r: Reduction) -> Step:
    cmds, outs = solve_all(r, "DIS0", r.mss, di_solve(r))
    return step_of("DIS0", cmds, outs, 60, dt_min=r.get("solutions", "dt_di") or "auto")


def image_dirin_SSD_m_c_di(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m_c_di", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD_m_c.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_dirin_SSD_m_c_masked.DicoModel", imaging_weights=r.weights(0))
    cmds = [ddf_image(r.cfg, r.m, img)] + masked(r, "image_dirin_SSD_m_c_di", r.thr(1))
    return step_of("image_dirin_SSD_m_c_di", cmds, [restored("image_dirin_SSD_m_c_di")], 150)


def image_dirin_SSD_m_c_di_m(r: Reduction) -> Step:
    """The last DI-only image: the self-calibration below is measured against it."""
    img = r.image("image_dirin_SSD_m_c_di_m", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD_m_c_di.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_dirin_SSD_m_c_di_masked.DicoModel", reuse_psf=True,
                  imaging_weights=r.weights(0))
    cmds = [ddf_image(r.cfg, r.m, img)] + masked(r, "image_dirin_SSD_m_c_di_m", r.thr(1))
    return step_of("image_dirin_SSD_m_c_di_m", cmds, [restored("image_dirin_SSD_m_c_di_m"),
                                                     "image_dirin_SSD_m_c_di_m_masked.DicoModel"], 150)


def _last_di_image(r: Reduction) -> str:
    return "image_dirin_SSD_m_c_di_m" if r.di else "image_dirin_SSD_m_c"


# ------------------------------------------------------------------------------ self-cal on mslist

def DDS0(r: Reduction) -> Step:
    base = _last_di_image(r)
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel=f"{base}_masked.DicoModel",
                  base_image=base, clusterfile=CLUSTER_CAT, dt_min=r.get("solutions", "dt_slow"),
                  niterkf=r.niterkf(0), covq=0.02, uvmin=r.get("solutions", "uvmin"))
    cmds, outs = solve_all(r, "DDS0", r.mss, solve)
    return step_of("DDS0", cmds, outs, 90)


BOOTSTRAP_MEAN = "image_bootstrap.app.mean.fits"


def low_res(r: Reduction) -> dict:
    """The low-resolution image knobs (beam, cell, size, uv range) the bootstrap cube uses."""
    psf = r.get("image", "low_psf_arcsec")
    if psf is None:
        raise PlanError("the bootstrap needs a low-resolution beam: [image] low_psf_arcsec is not set",
                        "set [image] low_psf_arcsec (20 for LoTSS) or switch off [control] bootstrap")
    cell = r.get("image", "low_cell")
    size = r.get("image", "low_imsize") or int(r.get("image", "imsize") * r.get("image", "cellsize") / cell)
    return {"psf_arcsec": psf, "cellsize": cell, "imsize": size, "robust": r.get("image", "low_robust"),
            "uvrange": (r.get("image", "uvmin") or 0.0, 2.5 * 206.0 / psf)}


def _bootstrap_mask(r: Reduction, name: str, out: str) -> list[Command]:
    """The bootstrap clean's mask on its dirty image's grid: TGSS sources (when ``[masking]
    tgss`` is set) OR MakeMask's islands."""
    dirty = f"{name}.dirty.fits"
    cmds = [make_mask(r.m, dirty, r.thr(0), f"{name}.makemask.log")]
    optional = []
    if tgss_args(r):
        tgss = f"{name}.tgss_mask.fits"
        cmds.append(hpcddf_tool(r.m, [
            "external-mask", "--template", dirty, "--out", tgss, "--record", f"{name}.tgss_mask.json",
            *tgss_args(r)], f"{name}.tgss_mask.log"))
        optional = ["--optional", tgss]  # not written when no TGSS source falls in the image
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", out, f"{dirty}.mask.fits", *optional],
                            f"{name}.mergemask.log"))
    return cmds


def bootstrap(r: Reduction) -> Step:
    """Per observation: a low-resolution cube (one band per subband, DDS0 applied), PyBDSF with
    per-channel fluxes, the factor fit against the [bootstrap] catalogues, then SCALED_DATA (and
    DATA_DI_CORRECTED_SCALED) in every MS of that observation in both MS lists.

    As in ddf-pipeline, a dirty image comes first and the clean is masked. The mask is the
    ``[masking] tgss`` catalogue's sources drawn on the dirty image's grid (ddf-pipeline's
    bootstrap mask; the node reads the file, downloaded at submit if missing and the site names
    its URL), OR'd with MakeMask's mask of that dirty image at the first masking threshold,
    which is all there is without a TGSS file.
    A source outside the mask is left to the 15-sigma automask, whose noise on a dirty,
    sidelobe-limited image is high: it stays uncleaned, and PyBDSF then fits it with the
    narrower dirty beam and finds a third of its flux against the restoring beam (measured on
    the simulated field), which biases every factor.

    The clean is SSD whatever ``[image] cleanmode`` says, as ddf-pipeline's bootstrap: on the
    simulated field HMP's cube left one band's fluxes up to 40 % low while SSD's are within
    5 % in every band (measured per source with PyBDSF's per-channel fluxes)."""
    cmds: list[Command] = []
    outs: list[str] = []
    full = group_by_obsid(r.full_mss or r.mss)
    apps = []
    for obsid, mss in group_by_obsid(r.mss).items():
        lst, name = f"bootstrap_{obsid}_mslist.txt", f"image_bootstrap_{obsid}"  # DDF reads *.txt as a list
        cmds.append(hpcddf_tool(r.m, ["write-list", "--out", lst, *mss], f"{name}.list.log"))
        mask = f"{name}.mask.fits"
        img = r.image(name, mslist=lst, colname=r.col, majorcycles=5, automask_sigma=15.0,
                      clusterfile=CLUSTER_CAT, ddsols=applied(r, "DDS0"), apply=r.apply(6),
                      nband=len(mss), cubes="Ii", cleanmask=mask, deconv_mode="SSD", global_norm=None,
                      **low_res(r))
        cmds += [ddf_image(r.cfg, r.m, dirty_of(replace(img, cleanmask=None, cubes=None))),
                 *_bootstrap_mask(r, name, mask), ddf_image(r.cfg, r.m, img)]
        factors = f"{obsid}-bootstrap-factors.json"
        cmds.append(hpcddf_tool(r.m, ["bootstrap-fit", "--cube", f"{name}.cube.int.restored.fits",
                                      "--config", FROZEN_CONFIG_REL, "--out", factors],
                                f"{name}.fit.log"))
        targets = sorted(set(mss) | set(full.get(obsid, [])))
        di = ["--di-col", DI_COL] if r.di else []
        apply = ["bootstrap-apply", "--factors", factors, "--colname", r.col, *di, *targets]
        cmds.append(hpcddf_tool(r.m, apply, f"{name}.apply.log"))
        outs += [factors, f"{name}.cube.int.restored.fits"]
        apps.append(f"{name}.app.restored.fits")
    cmds.append(hpcddf_tool(r.m, ["mean-image", "--out", BOOTSTRAP_MEAN, *apps], "image_bootstrap.mean.log"))
    return step_of("bootstrap", cmds, outs + [BOOTSTRAP_MEAN], 300)


def image_phase1(r: Reduction) -> Step:
    base = _last_di_image(r)
    img = r.image("image_phase1", majorcycles=2, clusterfile=CLUSTER_CAT,
                  cleanmask=f"{base}.mask.fits", automask_sigma=r.thr(1),
                  init_dico=f"{base}_masked.DicoModel", ddsols=applied(r, "DDS0"),
                  apply=r.apply(0), imaging_weights=r.weights(1))
    return step_of("image_phase1", [ddf_image(r.cfg, r.m, img)], [restored("image_phase1")], 150)


def mask_phase1(r: Reduction) -> Step:
    return step_of("mask_phase1", masked(r, "image_phase1", r.thr(1)),
                 ["image_phase1.mask.fits", "image_phase1_masked.DicoModel"], 20)


def DDS1(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_phase1_masked.DicoModel",
                  base_image="image_phase1", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_slow"), niterkf=r.niterkf(1), covq=0.02,
                  uvmin=r.get("solutions", "uvmin"))
    cmds, outs = solve_all(r, "DDS1", r.mss, solve)
    return step_of("DDS1", cmds, outs, 90)


def image_ampphase1(r: Reduction) -> Step:
    img = r.image("image_ampphase1", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_phase1.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_phase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(1), imaging_weights=r.weights(2))
    cmds = [ddf_image(r.cfg, r.m, img)] + masked(r, "image_ampphase1", r.thr(1))
    return step_of("image_ampphase1", cmds, [restored("image_ampphase1"),
                                            "image_ampphase1_masked.DicoModel"], 150)


def Predict_DI1(r: Reduction) -> Step:
    img = r.image("Predict_DI1", colname=r.col, mode="Predict", clusterfile=CLUSTER_CAT,
                  init_dico="image_ampphase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(1), predict_col="DD_PREDICT")
    return step_of("Predict_DI1", [ddf_image(r.cfg, r.m, img)], [], 60)


def DIS1(r: Reduction) -> Step:
    cmds, outs = solve_all(r, "DIS1", r.mss, di_solve(r, update_weights=False))
    return step_of("DIS1", cmds, outs, 60)


def image_ampphase1_di(r: Reduction) -> Step:
    img = r.image("image_ampphase1_di", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_ampphase1.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_ampphase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(2), imaging_weights=r.weights(2))
    cmds = [ddf_image(r.cfg, r.m, img)] + masked(r, "image_ampphase1_di", r.thr(1))
    return step_of("image_ampphase1_di", cmds, [restored("image_ampphase1_di"),
                                               "image_ampphase1_di_masked.DicoModel"], 150)
