"""Step builders on the full MS list: the full-bandwidth calibration and images, the very
slow solutions, the low-resolution image, the final image and what follows it (offsets,
quality, archives, summary), and a run that starts from a previous model ([inputmodel])."""

from __future__ import annotations

from hpcddf.engine.paths import FROZEN_CONFIG_REL
from hpcddf.engine.runner import Command, Step
from hpcddf.lofar.brightlist import BRIGHT_CSV, BRIGHT_FITS, OFFSETS_SRL
from hpcddf.lofar.catalogues import redo_di_skymodel
from hpcddf.lofar.compress import archive_name
from hpcddf.lofar.ddfcommands import (
    Image,
    Solve,
    ddf_image,
    ddf_shift,
    hpcddf_tool,
    make_mask,
    sols_file,
)
from hpcddf.lofar.selfcal import di_solve
from hpcddf.lofar.stepkit import (
    CLUSTER_CAT,
    EXT_MASK,
    Reduction,
    applied,
    external_mask_now,
    from_model,
    group_by_obsid,
    masked,
    restored,
    solve_all,
    step_of,
)

REDO_DI_SOLUTIONS = "instrument_new.h5"  # redodi.H5PARM: inside each MS, as ddf-pipeline's parmdb


def _last_small_image(r: Reduction) -> str:
    return "image_ampphase1_di" if r.di else "image_ampphase1"


def base_dico(r: Reduction) -> str:
    """The model the full-bandwidth calibration starts from: the last small image's masked
    model, or the given previous model, unmasked (as ddf-pipeline does)."""
    if from_model(r):
        return f"{r.get('inputmodel', 'basedicomodel')}.DicoModel"
    return f"{_last_small_image(r)}_masked.DicoModel"


def base_image(r: Reduction) -> str:
    """killMS's --BaseImageName for DDS2_full: the last small image, or [inputmodel] baseimagename."""
    return r.get("inputmodel", "baseimagename") if from_model(r) else _last_small_image(r)


def base_mask(r: Reduction) -> str:
    """The first full-bandwidth image's clean mask: the last small image's, or [inputmodel]
    basemaskname (copied to the external mask, which it also is in ddf-pipeline)."""
    return EXT_MASK if from_model(r) else f"{_last_small_image(r)}.mask.fits"


def _inputmodel_setup(r: Reduction) -> list[Command]:
    """What the skipped steps would have left for DDS2_full: the imaging columns, the given
    clusterfile as the cluster catalogue, the given mask as the external mask."""
    return [hpcddf_tool(r.m, ["prepare-ms", "--colname", r.col, *sorted(set(r.mss + r.full_mss))],
                        "prepare-ms.log"),
            hpcddf_tool(r.m, ["cluster", "--copy", r.get("image", "clusterfile"), "--out", CLUSTER_CAT],
                        "cluster.log"),
            hpcddf_tool(r.m, ["merge-masks", "--out", EXT_MASK, r.get("inputmodel", "basemaskname")],
                        "external_mask.log")]


# ------------------------------------------------------------------------------ full mslist

def redo_DI(r: Reduction) -> Step:
    """[control] redo_DI: DP3's phase-only DI calibration of every MS of the full list against
    the GSM/TGSS sky model the login node downloaded (hpcddf.lofar.redodi, DP3 through its
    Python bindings), DATA -> CORRECTED_DATA; the array-factor beam unless the config has none."""
    kind = str(r.get("control", "redo_DI_type"))
    beam = "none" if r.get("image", "beam_model") in (None, "None") else "array_factor"
    cmd = Command((r.m.python, "-m", "hpcddf.lofar.redodi", "--skymodel", redo_di_skymodel(kind),
                   "--source-format", kind.lower(), "--beam", beam, "--threads", str(r.m.ncpu_kms),
                   *r.full_mss), "redo_DI.log", timeout_s=r.m.timeout_s)
    return step_of("redo_DI", [cmd], [f"{ms}/{REDO_DI_SOLUTIONS}" for ms in r.full_mss], 60 * len(r.full_mss),
                   sky_model=kind)


def DDS2_full(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.col, dicomodel=base_dico(r),
                  base_image=base_image(r), clusterfile=CLUSTER_CAT, dt_min=r.get("solutions", "dt_slow"),
                  niterkf=r.niterkf(4), covq=0.1, uvmin=r.get("solutions", "uvmin"))
    cmds, outs = solve_all(r, "DDS2_full", r.full_mss, solve)
    if from_model(r):
        cmds, outs = _inputmodel_setup(r) + cmds, [CLUSTER_CAT, EXT_MASK] + outs
    return step_of("DDS2_full", cmds, outs, 120)


def Predict_DDS2(r: Reduction) -> Step:
    img = r.image("Predict_DDS2", mslist=r.full_mslist, colname=r.col, mode="Predict",
                  clusterfile=CLUSTER_CAT, init_dico=base_dico(r),
                  ddsols=applied(r, "DDS2_full"), apply=r.apply(3), predict_col="DD_PREDICT")
    return step_of("Predict_DDS2", [ddf_image(r.cfg, r.m, img)], [], 60)


def DIS2_full(r: Reduction) -> Step:
    cmds, outs = solve_all(r, "DIS2_full", r.full_mss, di_solve(r, update_weights=False))
    return step_of("DIS2_full", cmds, outs, 90)


def _full_image(r: Reduction, name: str, **kw) -> Image:
    kw.setdefault("robust", r.get("image", "final_robust"))
    kw.setdefault("psf_arcsec", final_beam(r))
    kw.setdefault("global_norm", r.norm(1))
    return r.image(name, mslist=r.full_mslist, clusterfile=CLUSTER_CAT,
                   imaging_weights=r.weights(3), **kw)


def final_beam(r: Reduction) -> float | tuple[float, float, float] | None:
    """The full-resolution images' restoring beam: circular (final_psf_arcsec), or elliptical
    when [image] final_psf_minor_arcsec and final_psf_pa_deg are both set (as ddf-pipeline)."""
    major = r.get("image", "final_psf_arcsec")
    minor, pa = r.get("image", "final_psf_minor_arcsec"), r.get("image", "final_psf_pa_deg")
    if major is None or minor is None:
        return major
    return (float(major), float(minor), float(pa))


def image_full_ampphase_di(r: Reduction) -> Step:
    img = _full_image(r, "image_full_ampphase_di", majorcycles=0, automask_sigma=r.thr(2),
                      init_dico=base_dico(r), cleanmask=base_mask(r),
                      ddsols=applied(r, "DDS2_full"), apply=r.apply(3))
    cmds = [ddf_image(r.cfg, r.m, img)]
    return step_of("image_full_ampphase_di", cmds, [restored("image_full_ampphase_di")], 120)


def image_full_ampphase_di_m(r: Reduction) -> Step:
    cmds = [make_mask(r.m, restored("image_full_ampphase_di"), 10, "image_full_ampphase_di.makemask.log"),
            hpcddf_tool(r.m, ["merge-masks", "--out", "image_full_ampphase_di.mask.fits",
                              f"{restored('image_full_ampphase_di')}.mask.fits", "--optional", external_mask_now(r)],
                        "image_full_ampphase_di.mergemask.log")]
    img = _full_image(r, "image_full_ampphase_di_m", majorcycles=1, automask_sigma=r.thr(2),
                      init_dico=base_dico(r), cleanmask="image_full_ampphase_di.mask.fits",
                      ddsols=applied(r, "DDS2_full"), apply=r.apply(3), reuse_psf=True,
                      reuse_dirty="forceresidual")
    cmds += [ddf_image(r.cfg, r.m, img)] + masked(r, "image_full_ampphase_di_m", r.thr(2),
                                                    external=external_mask_now(r))
    return step_of("image_full_ampphase_di_m", cmds, [restored("image_full_ampphase_di_m"),
                                                     "image_full_ampphase_di_m_masked.DicoModel"], 180)


def DDS3_full(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_full_ampphase_di_m_masked.DicoModel",
                  base_image="image_full_ampphase_di_m", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_fast"), niterkf=r.niterkf(5), covq=0.1,
                  uvmin=r.get("solutions", "uvmin"), nchan=1)
    cmds, outs = solve_all(r, "DDS3_full", r.full_mss, solve)
    return step_of("DDS3_full", cmds, outs, 120)


SLOW_MERGED = "DDS3_full_slow_merged"


def DDS3_full_slow(r: Reduction) -> Step:
    """The very slow amplitude solutions on top of the fast smoothed ones (pre-applied to the
    model), then merged per observation with outliers clipped, as ddf-pipeline does. kMS's
    NIterKF here is its own 6, not the NIterKF list."""
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_full_ampphase_di_m_masked.DicoModel",
                  base_image="image_full_ampphase_di_m", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_very_slow"), niterkf=6, covq=0.1,
                  uvmin=r.get("solutions", "uvmin_very_slow"), nchan=1,
                  preapply_sols=f"[{applied(r, 'DDS3_full')}]")
    cmds, outs = solve_all(r, "DDS3_full_slow", r.full_mss, solve, smooth=False)
    merge_cmds, merge_outs = _merge_slow(r)
    return step_of("DDS3_full_slow", cmds + merge_cmds, outs + merge_outs, 120)


def _merge_slow(r: Reduction) -> tuple[list[Command], list[str]]:
    """MergeSols with ``--SigmaFilterOutliers [solutions] sigma_clip`` over each observation's
    MSs (ddf-pipeline groups them by solution start time: one observation each), then per-MS
    ``killMS.DDS3_full_slow_merged.sols.npz`` links for DDF. No SmoothSols."""
    solsdir = r.get("solutions", "SolsDir")
    cmds: list[Command] = []
    for obsid, mss in group_by_obsid(r.full_mss).items():
        lst, merged = f"solslist_DDS3_full_slow_{obsid}.txt", f"DDS3_full_slow_{obsid}_merged.npz"
        files = [sols_file(r.cfg, ms, "DDS3_full_slow") for ms in mss]
        merge = ["MergeSols.py", f"--SolsFilesIn={lst}", f"--SolFileOut={solsdir}/{merged}"]
        if r.get("solutions", "sigma_clip") is not None:
            merge += ["--SigmaFilterOutliers", _fmt_num(r.get("solutions", "sigma_clip"))]
        cmds += [hpcddf_tool(r.m, ["write-list", "--out", lst, *files], f"DDS3_full_slow.{obsid}.list.log"),
                 Command(tuple(merge), f"DDS3_full_slow.{obsid}.merge.log", timeout_s=r.m.timeout_s),
                 hpcddf_tool(r.m, ["link-sols", "--solsdir", solsdir, "--sols", SLOW_MERGED,
                                   "--target", merged, *mss], f"DDS3_full_slow.{obsid}.link.log")]
    return cmds, [sols_file(r.cfg, ms, SLOW_MERGED) for ms in r.full_mss]


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def final_sols(r: Reduction) -> str:
    """The final images' solutions: the fast smoothed ones, times the merged very slow ones
    (DDFacet multiplies the two sets per time, direction, station and channel)."""
    fast = applied(r, "DDS3_full")
    return f"[{fast},{SLOW_MERGED}]" if r.get("solutions", "do_very_slow") else fast


def image_full_ampphase_di_m_NS(r: Reduction) -> Step:
    name = "image_full_ampphase_di_m.NS"
    img = _full_image(r, name, majorcycles=1, automask_sigma=r.thr(2),
                      init_dico="image_full_ampphase_di_m_masked.DicoModel",
                      cleanmask="image_full_ampphase_di_m.mask.fits",
                      ddsols=final_sols(r), apply=r.apply(6), predict_col="DD_PREDICT",
                      rms_factor=r.get("image", "final_rmsfactor"))
    return step_of(name, [ddf_image(r.cfg, r.m, img)], [restored(name)], 180)


FINAL_NS = "image_full_ampphase_di_m.NS"


def offsets(r: Reduction) -> Step:
    """Per-direction astrometric offsets of the final image against the local reference
    catalogue, then DDFacet's RestoreAndShift with them (the ``_shift`` images).

    RestoreAndShift reads the final image's PSF and last-residual cache, which lives in this
    job's cache directory: the step runs in the same stage as the image."""
    method = r.get("offsets", "method")
    cmds = [hpcddf_tool(r.m, ["offsets", "--root", FINAL_NS, "--config", FROZEN_CONFIG_REL], "offsets.log"),
            ddf_shift(r.m, FINAL_NS, "facet-offset.txt")]
    outs = [f"{method}-facet_offsets.fits", "facet-offset.txt", "astromap.fits", f"{method}-offsets.png",
            f"{FINAL_NS}_shift.app.facetRestored.fits"]
    if makes_brightlist(r):
        cmds.append(Command((r.m.python, "-m", "hpcddf.lofar.brightlist", "--catalogue", f"{FINAL_NS}{OFFSETS_SRL}",
                             "--root", FINAL_NS, "--cutoff", str(r.get("spectra", "bright_threshold"))),
                            "brightlist.log", timeout_s=r.m.timeout_s))
        outs += [BRIGHT_CSV, BRIGHT_FITS]
    return step_of("offsets", cmds, outs, 120)


def makes_brightlist(r: Reduction) -> bool:
    """ddf-pipeline makes the dynamic spectra's bright-source list after the offsets whenever
    ``[spectra] bright_threshold`` is set (the offsets' catalogue is its input)."""
    return bool(r.get("offsets", "method")) and r.get("spectra", "bright_threshold") is not None


def quality(r: Reduction) -> Step:
    """``hpcddf quality`` as the last science step: its report in ``quality/``."""
    args = ["quality"]
    for c in r.get("control", "quality"):
        args += ["--catalogue", str(c)]
    return step_of("quality", [hpcddf_tool(r.m, args, "quality.log")],
                 ["quality/quality.json", "quality/quality.txt"], 120)


def compress_ms(r: Reduction) -> Step:
    """A Dysco-compressed ``<ms>.archive`` of every MS of the full list (ddf-pipeline's
    ``archivems``), each verified against its MS before it gets its name; the MSs are only read.

    The archive's DATA is the column the final image was made from (``img_col`` after the
    final stage's column switch): DATA_DI_CORRECTED when DI calibration runs (bootstrap-scaled,
    as DIS1/DIS2_full rewrite it from SCALED_DATA), else the calibration's input column
    (SCALED_DATA after the bootstrap, [data] colname without it). ddf-pipeline archives
    DATA_DI_CORRECTED, the same column in its default configuration."""
    mss = r.full_mss or r.mss
    cmd = Command((r.m.python, "-m", "hpcddf.lofar.compress", "--column", r.img_col, *mss),
                  "compress_ms.log", timeout_s=r.m.timeout_s)
    return step_of("compress_ms", [cmd], [archive_name(ms) for ms in mss], 30 * len(mss), column=r.img_col)


def summary(r: Reduction) -> Step:
    cmds = [hpcddf_tool(r.m, ["summary", "--config", FROZEN_CONFIG_REL, "--out", "summary.txt"],
                        "summary.log")]
    if r.get("control", "clearcache_end"):
        cmds.append(hpcddf_tool(r.m, ["clear-cache", "--cache-dir", r.m.cache_dir, r.mslist,
                                      r.full_mslist, *r.mss, *r.full_mss], "clear-cache-end.log"))
    return step_of("summary", cmds, ["summary.txt"], 10)
