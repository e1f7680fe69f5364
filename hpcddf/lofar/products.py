"""Step builders of the products after the final image: ddf-pipeline's spectral_restored band
images, the QU polarisation cubes (low and very-low resolution), the Stokes V images and the
dynamic spectra.

How many DDF.py calls the cube and band steps make depends on the frequencies of the MSs, so
these builders read them (the SPECTRAL_WINDOW subtables only) where they run: on the node,
in the field directory (``Reduction.workdir``). The MS lists those calls read are written by
the step's first command (``python -m hpcddf.lofar.cubes lists``) with the same rules.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hpcddf.engine.runner import Command, Step
from hpcddf.errors import PlanError
from hpcddf.lofar.brightlist import BRIGHT_CSV
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.cubes import (
    KINDS,
    CubeError,
    FreqGroup,
    MsFreq,
    assembled,
    band_groups,
    band_list,
    cube_image,
    fpack_tmp,
    fz_name,
    obsid_list,
    read_ms_freqs,
    stokes_groups,
    stokes_list,
)
from hpcddf.lofar.ddfcommands import Image, ddf_image, ddf_shift, hpcddf_tool
from hpcddf.lofar.fullband import FINAL_NS, final_beam, final_sols, makes_brightlist
from hpcddf.lofar.selfcal import low_res
from hpcddf.lofar.stepkit import CLUSTER_CAT, Reduction, group_by_obsid, step_of

VLOW_UVMAX_KM = 1.6    # ddf-pipeline's fixed outer uv limit of the very-low-resolution cubes
# DDF 0.9.1 that finds a valid cached dirty image for its MS list loads it and writes no dirty
# FITS at all, yet exits 0 (measured): a rerun of a step whose images were removed (after
# compression, by hand) would then miss them. Nothing reuses these dirty caches.
NO_DIRTY_CACHE = "--Cache-Dirty=off"
FINAL_MASK = "image_full_ampphase_di_m.mask.fits"
FINAL_DICO = "image_full_ampphase_di_m_masked.DicoModel"


def cubes_tool(r: Reduction, args: list[str], log_name: str) -> Command:
    return Command((r.m.python, "-m", "hpcddf.lofar.cubes", *args), log_name, timeout_s=r.m.timeout_s)


# ------------------------------------------------------------------------------ plan-time check

def check_polcubes(cfg: PipelineConfig) -> None:
    """The cubes' uv range and size derive from the low-resolution beam; ddf-pipeline dies
    with a NameError at the end of the run without it."""
    if cfg.get("control", "polcubes") and cfg.get("image", "low_psf_arcsec") is None:
        raise PlanError("[control] polcubes needs [image] low_psf_arcsec, which is not set",
                        "set [image] low_psf_arcsec (20 for LoTSS) or switch off [control] polcubes")


# ------------------------------------------------------------------------------ MS frequencies

def field_dir(r: Reduction) -> Path:
    """The field directory the MS names are relative to."""
    return r.workdir


def ms_freqs(r: Reduction) -> list[MsFreq]:
    try:
        return read_ms_freqs(r.full_mss, field_dir(r))
    except ImportError as exc:
        raise PlanError(f"cannot read the MSs' frequencies here: {exc}",
                        "run the node job with python-casacore installed") from None
    except CubeError as exc:
        raise PlanError(str(exc), "check the MSs of [data] full_mslist") from None


# ------------------------------------------------------------------------------ spectral_restored

def spectral_restored(r: Reduction) -> Step:
    """The final image again per ``[image] centralfreqs`` band from the final model (0 major
    cycles), shifted by the astrometric offsets when [offsets] method is set, then each
    band's images labelled with the band's central frequency."""
    centres = [float(f) for f in r.get("image", "centralfreqs")]
    bands = band_groups(ms_freqs(r), centres)
    cmds = [cubes_tool(r, ["lists", "--bands", ",".join(map(str, centres)), *r.full_mss],
                       "spectral_restored.lists.log")]
    outs = [band_list(i) for i in bands]
    for i in bands:
        name = f"{FINAL_NS}_Band{i}"
        cmds.append(ddf_image(r.cfg, r.m, _band_image(r, name, band_list(i))))
        outs.append(f"{name}.app.restored.fits")
        if r.get("offsets", "method"):
            cmds.append(ddf_shift(r.m, name, "facet-offset.txt"))
            outs.append(f"{name}_shift.app.facetRestored.fits")
    cmds.append(cubes_tool(r, ["bands", "--root", FINAL_NS, *[f"--band={i}={centres[i]}" for i in bands]],
                           "spectral_restored.bands.log"))
    return step_of("spectral_restored", cmds, outs, 120 * len(bands), bands=sorted(bands))


def _band_image(r: Reduction, name: str, mslist: str) -> Image:
    return r.image(name, mslist=mslist, majorcycles=0, init_dico=FINAL_DICO, cleanmask=FINAL_MASK,
                   automask_sigma=r.thr(2), robust=r.get("image", "final_robust"),
                   psf_arcsec=final_beam(r), clusterfile=CLUSTER_CAT, ddsols=final_sols(r),
                   apply=r.apply(6), global_norm=r.norm(1), imaging_weights=r.weights(2),
                   extra=("--GAClean-RMSFactorInitHMP=1",))


# ------------------------------------------------------------------------------ polcubes

@dataclass(frozen=True)
class CubeSet:
    """One resolution of the QU cubes (ddf-pipeline's "low" and "vlow")."""

    root: str
    uvrange: tuple[float, float]
    psf_arcsec: float
    cell: float
    imsize: int
    robust: float


def cube_sets(r: Reduction) -> list[CubeSet]:
    """The low set on the low-resolution image's grid, beam and uv range, and the very-low
    one (which ddf-pipeline makes whatever vlow_psf_arcsec says; None restores at psf_arcsec,
    irrelevant for dirty cubes)."""
    check_polcubes(r.cfg)
    low, g = low_res(r), r.get
    return [CubeSet("image_full_low", low["uvrange"], low["psf_arcsec"], low["cellsize"], int(low["imsize"]),
                    low["robust"]),
            CubeSet("image_full_vlow", (g("image", "uvmin") or 0.0, VLOW_UVMAX_KM),
                    g("image", "vlow_psf_arcsec") or g("image", "psf_arcsec"), g("image", "vlow_cell"),
                    int(g("image", "vlow_imsize")), g("image", "vlow_robust"))]


def cube_image_cmd(r: Reduction, cs: CubeSet, i: int, group: FreqGroup) -> Command:
    """DDF.py for frequency ``i``: a dirty I,Q,U cube with one plane per channel, apparent
    (``d``) and beam/Jones-corrected (``D``); one MS group per call, as DDF's channel selection
    breaks across MSs of different frequencies (ddf-pipeline#74)."""
    img = r.image(cube_image(cs.root, i), mslist=stokes_list(i), mode="Dirty", majorcycles=0,
                  psf_arcsec=cs.psf_arcsec, imsize=cs.imsize, cellsize=cs.cell, robust=cs.robust,
                  uvrange=cs.uvrange, clusterfile=CLUSTER_CAT, ddsols=final_sols(r), apply=r.apply(6),
                  global_norm=r.norm(2), imaging_weights=True, nband=group.nchan, cubes="dD",
                  extra=("--RIME-PolMode=IQU", "--Beam-Smooth=1", "--Selection-ChanStart=0",
                         f"--Selection-ChanEnd={group.nchan}", NO_DIRTY_CACHE))
    return ddf_image(r.cfg, r.m, img)


def polcubes(r: Reduction) -> Step:
    """Both cube sets: the per-frequency lists, a DDF.py per frequency, the stacked QU (and
    with split_polcubes Q and U) cubes, then their compression as [compression] says. With
    clearcache_end the earlier images' DDFacet caches go first, as in ddf-pipeline (disk)."""
    sets = cube_sets(r)
    groups = stokes_groups_of(r)
    split = bool(r.get("control", "split_polcubes"))
    cmds = [cubes_tool(r, ["lists", "--stokes", *r.full_mss], "polcubes.lists.log")]
    if r.get("control", "clearcache_end"):
        cmds.insert(0, hpcddf_tool(r.m, ["clear-cache", "--cache-dir", r.m.cache_dir, r.mslist,
                                         r.full_mslist, *r.mss, *r.full_mss], "polcubes.clear-cache.log"))
    cubes: list[str] = []
    for cs in sets:
        cmds += [cube_image_cmd(r, cs, i, g) for i, g in enumerate(groups)]
        cmds.append(cubes_tool(r, ["assemble", "--root", cs.root, "--count", str(len(groups)),
                                   *(["--split"] if split else [])], f"{cs.root}_QU.assemble.log"))
        cubes += assembled(cs.root, split)
    ccmds, outs = compression(r, cubes)
    return step_of("polcubes", cmds + ccmds, [stokes_list(i) for i in range(len(groups))] + outs,
                   60 * len(groups) * len(sets), nfreq=len(groups))


def stokes_groups_of(r: Reduction) -> list[FreqGroup]:
    try:
        return stokes_groups(ms_freqs(r))
    except CubeError as exc:
        raise PlanError(str(exc), "image fewer frequencies: a full_mslist of the MSs to cube") from None


def fpack_program() -> str | None:
    """fpack where the builder runs: its own commands when present, astropy's otherwise."""
    return shutil.which("fpack")


def compression(r: Reduction, files: list[str], fpack: str | None = None) -> tuple[list[Command], list[str]]:
    """[compression] compress_polcubes: ``fpack -q fpack_q`` of every cube into ``<file>.fz``,
    each verified before it gets its name; delete_compressed then removes the originals."""
    if not r.get("compression", "compress_polcubes"):
        return [], list(files)
    q, delete = str(r.get("compression", "fpack_q")), bool(r.get("compression", "delete_compressed"))
    fz = [str(fz_name(Path(f))) for f in files]
    outs = fz if delete else list(files) + fz
    flags = ["--q", q] + (["--delete"] if delete else [])
    fpack = fpack or fpack_program()
    if not fpack:
        return [cubes_tool(r, ["compress", *flags, *files], "polcubes.compress.log")], outs
    cmds = [cubes_tool(r, ["compress", "--fpack-clean", *files], "polcubes.fpack-clean.log")]
    cmds += [Command((fpack, "-q", q, "-O", str(fpack_tmp(Path(f))), f), f"{Path(f).name}.fpack.log",
                     timeout_s=r.m.timeout_s) for f in files]
    cmds.append(cubes_tool(r, ["compress", "--fpack-adopt", *flags, *files], "polcubes.fpack-adopt.log"))
    return cmds, outs


# ------------------------------------------------------------------------------ Stokes V

def stokesv(r: Reduction) -> Step:
    """A dirty I+V image per observation at full resolution (``.dirty.fits`` apparent,
    ``.dirty.corr.fits`` corrected; DynSpecMS reads the V plane of the latter)."""
    obsids = list(group_by_obsid(r.full_mss))
    cmds = [cubes_tool(r, ["lists", "--obsids", *r.full_mss], "stokesv.lists.log")]
    outs = [obsid_list(o) for o in obsids]
    for o in obsids:
        name = f"image_full_high_stokesV_{o}"
        img = r.image(name, mslist=obsid_list(o), mode="Dirty", majorcycles=0, psf_arcsec=final_beam(r),
                      robust=r.get("image", "final_robust"), clusterfile=CLUSTER_CAT, ddsols=final_sols(r),
                      apply=r.apply(6), global_norm=r.norm(2), imaging_weights=True,
                      extra=("--RIME-PolMode=IV", "--Beam-Smooth=1", NO_DIRTY_CACHE))
        cmds.append(ddf_image(r.cfg, r.m, img))
        outs += [f"{name}.{k}.fits" for k in KINDS]
    return step_of("stokesv", cmds, outs, 120 * len(obsids))


# ------------------------------------------------------------------------------ dynamic spectra

def dynspec(r: Reduction) -> Step:
    """Dynamic spectra of the catalogue's targets and of off positions per observation, from
    the final image's residual visibilities (DD_PREDICT, the final model through the final
    solutions) with ddf-pipeline's DynSpecMS settings (hpcddf.lofar.dynspec); the V fluxes
    from the Stokes V image when it is made. No beam: the tool applies none (a warning at
    submit says so when the config has one)."""
    obsids = list(group_by_obsid(r.full_mss))
    cmds = [cubes_tool(r, ["lists", "--obsids", *r.full_mss], "dynspec.lists.log")]
    outs = [obsid_list(o) for o in obsids]
    for o in obsids:
        cmds.append(Command((r.m.python, "-m", "hpcddf.lofar.dynspec", *_dynspec_args(r, o)),
                            f"dynspec.{o}.log", timeout_s=r.m.timeout_s))
        outs += [f"DynSpecs_{o}/Catalog.npy", f"DynSpecs_{o}.tgz"]
    return step_of("dynspec", cmds, outs, 120 * len(obsids))


def _dynspec_args(r: Reduction, obsid: str) -> list[str]:
    args = ["--ms", obsid_list(obsid), "--data", r.img_col, "--model", "DD_PREDICT",
            "--sols", final_sols(r), "--SolsDir", r.get("solutions", "SolsDir"), "--rad", "2",
            "--noff", "100", "--nMinOffPerFacet", "5", "--CutGainsMinMax", "0.1,1.5",
            "--SplitNonContiguous", "1", "--DicoFacet", f"{FINAL_NS}.DicoFacet",
            "--imageI", f"{FINAL_NS}.int.restored.fits", "--BeamModel", "None",
            "--NCPU", str(r.m.ncpu_ddf), "--SavePDF", "1", "--FitsCatalog", r.get("spectra", "catalogue")]
    if r.get("control", "stokesv"):
        args += ["--imageV", f"image_full_high_stokesV_{obsid}.dirty.corr.fits"]
    if makes_brightlist(r) or (r.workdir / BRIGHT_CSV).is_file():  # as ddf-pipeline: any list found
        args += ["--srclist", BRIGHT_CSV]
    return args
